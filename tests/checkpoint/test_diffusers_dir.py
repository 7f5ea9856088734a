"""Loading diffusers folders (and the ``load_checkpoint`` dispatcher): results and every refusal message."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.archs import arch_spec, read_component_configs
from sdtrt.checkpoint.diffusers_dir import load_diffusers_dir, match_arch
from sdtrt.checkpoint.tokenizer import write_generated_tokenizer
from sdtrt.errors import CheckpointError, UsageError

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TE_WEIGHTS = "text_encoder/model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture
def sd1_copy(tiny_sd1_dir, tmp_path) -> Path:
    """A private, modifiable copy of the tiny-sd1 checkpoint."""
    return Path(shutil.copytree(tiny_sd1_dir, tmp_path / "ckpt"))


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_diffusers_dir(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("fixture", "arch", "family", "prediction", "hidden"),
    [("tiny_sd1_dir", "tiny-sd1", "sd1", "epsilon", 32), ("tiny_sd2_dir", "tiny-sd2", "sd2", "v_prediction", 64)],
)
def test_loads_tiny_checkpoints(request, fixture, arch, family, prediction, hidden):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    d = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(d)
    assert (ckpt.source, ckpt.format, ckpt.arch, ckpt.family) == (d, "diffusers", arch, family)
    assert ckpt.prediction_type == prediction
    assert ckpt.scheduler_config == json.loads((d / "scheduler/scheduler_config.json").read_text())
    assert isinstance(ckpt.text_encoder, CLIPTextModel) and ckpt.text_encoder.config.hidden_size == hidden
    assert isinstance(ckpt.unet, UNet2DConditionModel) and isinstance(ckpt.vae, AutoencoderKL)
    for m in (ckpt.text_encoder, ckpt.unet, ckpt.vae):
        assert not m.training
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert len(ckpt.tokenizer) == 1000 and ckpt.tokenizer.model_max_length == 77


def test_weights_are_the_files(tiny_sd1_dir):
    from safetensors.torch import load_file

    ckpt = load_diffusers_dir(tiny_sd1_dir)
    for module, f in ((ckpt.unet, UNET_WEIGHTS), (ckpt.vae, VAE_WEIGHTS), (ckpt.text_encoder, TE_WEIGHTS)):
        on_disk, loaded = load_file(tiny_sd1_dir / f), module.state_dict()
        assert set(on_disk) <= set(loaded)
        assert all(torch.equal(on_disk[k], loaded[k]) for k in on_disk)


def test_arch_is_matched_from_configs_without_sidecar(sd1_copy):
    (sd1_copy / "sdtrt_arch.json").unlink()
    assert load_diffusers_dir(sd1_copy).arch == "tiny-sd1"


def test_match_arch_normalises_defaults_and_per_block_values():
    configs = read_component_configs(arch_spec("tiny-sd1").config_dir)
    assert match_arch(configs) == "tiny-sd1"
    same = copy.deepcopy(configs)
    same["unet"]["attention_head_dim"] = [8, 8, 8]  # int and per-block list mean the same
    del same["unet"]["norm_num_groups"]  # 32 is diffusers' default
    same["unet"]["sample_size"] = 32  # not architecture-defining
    assert match_arch(same) == "tiny-sd1"
    other = copy.deepcopy(configs)
    other["text_encoder"]["num_hidden_layers"] = 3
    assert match_arch(other) is None
    assert match_arch(other, hint="tiny-sd1") is None  # a stale sidecar does not override the configs
    assert match_arch(read_component_configs(arch_spec("sd21").config_dir)) == "sd21"


def test_tokenizer_dir_replaces_missing_tokenizer(sd1_copy, tiny_sd2_dir):
    shutil.rmtree(sd1_copy / "tokenizer")
    msg = _error(sd1_copy)
    assert msg == (
        f"{sd1_copy}: no tokenizer found in the checkpoint (looked for {sd1_copy / 'tokenizer'}) and its text encoder's 1000 tokens are "
        "not CLIP's vocabulary; pass --tokenizer DIR with a CLIP tokenizer folder"
    )
    ckpt = load_checkpoint(sd1_copy, tokenizer_dir=tiny_sd2_dir / "tokenizer")
    assert ckpt.tokenizer.pad_token == "!"  # the tiny-sd2 tokenizer was used


def test_tokenizer_larger_than_the_embedding_is_refused(sd1_copy, tmp_path):
    write_generated_tokenizer(tmp_path / "big", 49408)
    msg = _error(sd1_copy, tokenizer_dir=tmp_path / "big")
    assert (
        msg == f"{tmp_path / 'big'}: tokenizer has 49408 tokens but the text encoder embeds only 1000: wrong tokenizer"
    )


def test_missing_folder(tmp_path):
    assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or directory"


def test_file_is_not_a_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    assert _error(tmp_path / "x.txt") == f"{tmp_path / 'x.txt'}: not a diffusers checkpoint folder (it is a file)"


def test_no_model_index(sd1_copy, tmp_path):
    (sd1_copy / "model_index.json").unlink()
    assert _error(sd1_copy) == f"not a diffusers checkpoint folder: {sd1_copy} has no model_index.json"
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "model.safetensors").write_bytes(b"")
    assert _error(tmp_path / "loose").endswith(
        "(for a single-file checkpoint, pass the .safetensors/.ckpt file itself)"
    )


def test_broken_model_index(sd1_copy):
    (sd1_copy / "model_index.json").write_text("{broken")
    assert _error(sd1_copy).startswith(f"{sd1_copy / 'model_index.json'}: not valid JSON")


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae", "scheduler"])
def test_missing_component_folder(sd1_copy, component):
    shutil.rmtree(sd1_copy / component)
    assert _error(sd1_copy) == (
        f"{sd1_copy / component}: missing {component} folder "
        "(a diffusers checkpoint needs text_encoder, unet, vae, scheduler)"
    )


def test_missing_weights_file(sd1_copy):
    (sd1_copy / UNET_WEIGHTS).unlink()
    assert _error(sd1_copy) == f"{sd1_copy / 'unet'}: no unet weights (diffusion_pytorch_model.safetensors not found)"


@pytest.mark.parametrize("weights", [UNET_WEIGHTS, TE_WEIGHTS, VAE_WEIGHTS])
def test_truncated_weights(sd1_copy, weights):
    data = (sd1_copy / weights).read_bytes()
    (sd1_copy / weights).write_bytes(data[: len(data) // 2])
    msg = _error(sd1_copy)
    assert msg.startswith(f"{sd1_copy / weights}: not a valid safetensors file, truncated or corrupt (")
    assert "incomplete metadata" in msg


@pytest.mark.parametrize(
    ("content", "detail"), [(b"this is not a safetensors file" * 10, "header too large"), (b"", "")]
)
def test_garbage_weights(sd1_copy, content, detail):
    (sd1_copy / VAE_WEIGHTS).write_bytes(content)
    msg = _error(sd1_copy)
    assert msg.startswith(f"{sd1_copy / VAE_WEIGHTS}: not a valid safetensors file, truncated or corrupt (")
    assert detail in msg


def test_weights_missing_a_tensor(sd1_copy):
    from safetensors.torch import load_file, save_file

    sd = load_file(sd1_copy / VAE_WEIGHTS)
    del sd["decoder.conv_norm_out.weight"]
    save_file(sd, sd1_copy / VAE_WEIGHTS, metadata={"format": "pt"})
    assert _error(sd1_copy) == (
        f"{sd1_copy / VAE_WEIGHTS}: 1 missing vae tensors (e.g. decoder.conv_norm_out.weight): "
        "weights do not match vae/config.json"
    )


def test_weights_of_the_wrong_shape(sd1_copy):
    from safetensors.torch import load_file, save_file

    sd = load_file(sd1_copy / UNET_WEIGHTS)
    sd["conv_in.weight"] = torch.zeros(3, 3)
    save_file(sd, sd1_copy / UNET_WEIGHTS, metadata={"format": "pt"})
    msg = _error(sd1_copy)
    assert msg.startswith(f"{sd1_copy / UNET_WEIGHTS}: cannot load unet weights (")
    assert "size mismatch for conv_in.weight" in msg


def test_pickle_weights_need_allow_pickle(sd1_copy):
    from safetensors.torch import load_file

    sd = load_file(sd1_copy / UNET_WEIGHTS)
    torch.save(sd, sd1_copy / "unet/diffusion_pytorch_model.bin")
    (sd1_copy / UNET_WEIGHTS).unlink()
    msg = _error(sd1_copy)
    assert msg == (
        f"{sd1_copy / 'unet/diffusion_pytorch_model.bin'}: pickle-format weights are not loaded by default; "
        "convert to safetensors, or pass --allow-pickle if you trust the file"
    )
    ckpt = load_checkpoint(sd1_copy, allow_pickle=True)
    assert torch.equal(ckpt.unet.state_dict()["conv_in.weight"], sd["conv_in.weight"])


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("unet/config.json", {"in_channels": 9}, "a Stable Diffusion 1.x inpainting model (9-channel UNet); inpainting is not supported yet"),
        ("unet/config.json", {"in_channels": 5}, "a Stable Diffusion 1.x depth-to-image model (5-channel UNet); depth-to-image is not supported yet"),
        ("unet/config.json", {"class_embed_type": "projection"}, "unet uses class_embed_type='projection'"),
        ("unet/config.json", {"cross_attention_dim": 64}, "does not match text_encoder hidden_size=32"),
        ("vae/config.json", {"latent_channels": 16}, "vae has latent_channels=16: not supported yet"),
        ("vae/config.json", {"_class_name": "AutoencoderTiny"}, "AutoencoderTiny is not supported yet"),
        ("text_encoder/config.json", {"model_type": "t5"}, "only CLIP text encoders are supported"),
        ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type 'sample': not supported"),
        ("model_index.json", {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
         "text_encoder_2: missing text_encoder_2 folder (a diffusers checkpoint needs text_encoder, text_encoder_2, unet, "
         "vae, scheduler)"),
    ],
)
def test_unsupported_variants_are_refused(sd1_copy, file, changes, message):
    _edit_json(sd1_copy / file, **changes)
    assert message in _error(sd1_copy)


def test_scheduler_config_must_be_an_object(sd1_copy):
    (sd1_copy / "scheduler/scheduler_config.json").write_text("[1, 2]")
    assert _error(sd1_copy) == f"{sd1_copy / 'scheduler/scheduler_config.json'}: expected a JSON object"


# load_checkpoint: dispatch by what the path is.


def test_load_checkpoint_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "missing.safetensors")
    assert str(e.value) == f"{tmp_path / 'missing.safetensors'}: no such file or directory"


def test_load_checkpoint_sends_files_to_single_file(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("sdtrt.checkpoint.single_file")
    fake.load_single_file = lambda path, **kw: calls.append((path, kw)) or "loaded"
    monkeypatch.setitem(sys.modules, "sdtrt.checkpoint.single_file", fake)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    out = load_checkpoint(str(f), config_dir=tmp_path, tokenizer_dir=str(tmp_path / "tok"), allow_pickle=True)
    assert out == "loaded"
    assert calls == [(f, {"config_dir": tmp_path, "tokenizer_dir": tmp_path / "tok", "allow_pickle": True, "vae": None,
                          "ema": False})]


def test_load_checkpoint_config_dir_is_for_files_only(tiny_sd1_dir, tmp_path):
    with pytest.raises(UsageError, match="only applies to single-file checkpoints"):
        load_checkpoint(tiny_sd1_dir, config_dir=tmp_path)
