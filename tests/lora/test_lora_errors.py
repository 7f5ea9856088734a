"""Bad LoRA input, each one clear line: missing or corrupt files, pickles, LoHa tensors, keys for another model,
scales out of range (library and CLI, exit 2), and the LoRA layer math itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdtrt.errors import LoraError
from sdtrt.lora.deltas import LoraLibrary, parse_lora_arg
from sdtrt.lora.files import read_lora

# a manifest fragment with two mapped modules, as the exporter writes it
MANIFEST = {"components": {
    "unet": {"lora": {"targets": {
        "down_blocks.0.attentions.0.proj_in": {"initializer": "w1", "dtype": "float32", "layout": "as_is",
                                               "shape": [8, 6, 1, 1]},
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": {"initializer": "w2", "dtype": "float16",
                                                                   "layout": "transposed", "shape": [5, 4]},
    }, "unmapped": {"conv_out": "ambiguous: identical weights (a, b match more than one way)"}}},
    "text_encoder": {"lora": {"targets": {
        "text_model.encoder.layers.0.self_attn.q_proj": {"initializer": "w3", "dtype": "float32",
                                                         "layout": "transposed", "shape": [4, 4]}},
        "unmapped": {}}},
}}
Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _kohya(name="lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", out=5, inp=4, r=2):
    g = torch.Generator().manual_seed(0)
    return {f"{name}.lora_down.weight": torch.randn(r, inp, generator=g),
            f"{name}.lora_up.weight": torch.randn(out, r, generator=g), f"{name}.alpha": torch.tensor(1.0)}


def test_kohya_and_peft_keys_map_to_the_same_module(tmp_path):
    lib = LoraLibrary(MANIFEST)
    k = _save(tmp_path / "k.safetensors", _kohya())
    t = _kohya()
    p = _save(tmp_path / "p.safetensors", {f"unet.{Q}.lora_A.weight": t[next(iter(t))],
                                           f"unet.{Q}.lora_B.weight": list(t.values())[1]})
    dk = lib.deltas(lib.check([(k, 1.0)])).by_component["unet"][Q]
    dp = lib.deltas(lib.check([(p, 1.0)])).by_component["unet"][Q]
    torch.testing.assert_close(dk * 2, dp)  # alpha 1 of rank 2 halves it; PEFT without alpha: alpha = rank


def test_delta_math_linear_and_conv(tmp_path):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 6, 1, 1, generator=g), torch.randn(8, 2, 1, 1, generator=g)
    te_down, te_up = torch.randn(3, 4, generator=g), torch.randn(4, 3, generator=g)
    path = _save(tmp_path / "c.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": te_down,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": te_up,
    })
    lib = LoraLibrary(MANIFEST)
    got = lib.deltas(lib.check([(path, -0.5), (path, 1.5)])).by_component  # stacked: 1.0 in all
    want = (up[:, :, 0, 0] @ down[:, :, 0, 0]).reshape(8, 6, 1, 1) * (4.0 / 2)
    torch.testing.assert_close(got["unet"]["down_blocks.0.attentions.0.proj_in"], want)
    torch.testing.assert_close(got["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"], te_up @ te_down)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such LoRA file"),
    ("pickle", "LoRA files are read as .safetensors only"),
    ("corrupt", "not a readable safetensors file"),
    ("loha", "only plain LoRA and LoCon are supported"),
    ("no_up", "has no up weight"),
    ("other_arch", "1 of 2 layers match this model's modules (e.g. 'lora_unet_input_blocks_1_1_proj_in' matches "
                   "none): made for another architecture?"),
    ("sdxl_te2", "1 of 2 layers match this model's modules (e.g. 'lora_te2_text_model_encoder_layers_0_self_attn"
                 "_q_proj' matches none): made for another architecture?"),
    ("shape", "makes a (5, 6) update for unet module " + Q + ", whose weight is (5, 4): made for another architecture?"),
    ("unmapped", "unet module conv_out cannot be changed in this export (ambiguous: identical weights"),
    ("scale", "scale must be a number in [-4, 4], got 4.5"),
])
def test_bad_lora_is_one_clear_line(tmp_path, case, message):
    lib = LoraLibrary(MANIFEST)
    path, scale = tmp_path / "bad.safetensors", 1.0
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "pickle":
        path = tmp_path / "bad.pt"
        path.write_bytes(b"\x80\x04")
    elif case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif case == "loha":
        _save(path, {"lora_unet_conv_out.hada_w1_a": torch.zeros(2, 2)})
    elif case == "no_up":
        _save(path, {"lora_unet_conv_out.lora_down.weight": torch.zeros(2, 2)})
    elif case in ("other_arch", "sdxl_te2"):
        other = "lora_unet_input_blocks_1_1_proj_in" if case == "other_arch" else \
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
        _save(path, {**_kohya(), **_kohya(other, 4, 4)})
    elif case == "shape":
        _save(path, _kohya(inp=6))
    elif case == "unmapped":
        _save(path, _kohya("lora_unet_conv_out", 4, 4))
    else:
        _save(path, _kohya())
        scale = 4.5
    with pytest.raises(LoraError) as e:
        lib.check([(str(path), scale)])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_an_export_without_a_lora_map_says_re_export(tmp_path):
    lib = LoraLibrary({"components": {"unet": {}, "text_encoder": {}}})
    with pytest.raises(LoraError, match=r"no LoRA map .* run `sdtrt export` again"):
        lib.check([(_save(tmp_path / "k.safetensors", _kohya()), 1.0)])


@pytest.mark.parametrize("arg, parsed", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.8", ("a.safetensors", 0.8)),
    ("C:/x/a.safetensors:-1", ("C:/x/a.safetensors", -1.0)), ("dir:x/a.safetensors", ("dir:x/a.safetensors", 1.0)),
])
def test_parse_lora_arg(arg, parsed):
    assert parse_lora_arg(arg) == parsed


def test_read_lora_hash_and_name(tmp_path):
    import hashlib

    path = _save(tmp_path / "my_style.safetensors", _kohya())
    f = read_lora(path)
    assert f.name == "my_style" and f.short_hash == hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
