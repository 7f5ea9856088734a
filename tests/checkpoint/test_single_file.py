"""Loading single-file (original layout) checkpoints: exact weights, architecture recognition, every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.archs import CONFIG_ROOT, arch_spec, build_models, family_of, read_component_configs
from sdtrt.checkpoint.ldm_layout import models_to_original, save_single_file
from sdtrt.checkpoint.model import Checkpoint
from sdtrt.checkpoint.single_file import _known_candidates, _recognise, load_single_file
from sdtrt.errors import CheckpointError

UNET_OUT = "model.diffusion_model.out.2.weight"


class NotATensor:
    """Pickled beside the weights: ``torch.load(weights_only=True)`` must refuse it."""


def _saved(ckpt_dir: Path, out_dir: Path) -> Path:
    out_dir.mkdir()
    f = out_dir / f"{ckpt_dir.name}.safetensors"
    save_single_file(load_checkpoint(ckpt_dir), f)
    shutil.copytree(ckpt_dir / "tokenizer", out_dir / "tokenizer")
    return f


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1_dir, tmp_path_factory) -> Path:
    """tiny-sd1 as one original-layout file, with tokenizer/ beside it; read-only."""
    return _saved(tiny_sd1_dir, tmp_path_factory.mktemp("sf") / "sd1")


@pytest.fixture(scope="module")
def sd2_file(tiny_sd2_dir, tmp_path_factory) -> Path:
    """tiny-sd2 (v-prediction) as one original-layout file, with tokenizer/ beside it; read-only."""
    return _saved(tiny_sd2_dir, tmp_path_factory.mktemp("sf") / "sd2")


@pytest.fixture
def ref1(tiny_sd1_dir) -> Checkpoint:
    return load_checkpoint(tiny_sd1_dir)


def _with_tokenizer(tmp_path: Path, tokenizer_from: Path) -> Path:
    shutil.copytree(tokenizer_from / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_single_file(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _assert_same_modules(ref: Checkpoint, got: Checkpoint, cast=lambda t: t) -> None:
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(ref, name), getattr(got, name)
        assert type(a) is type(b) and not b.training
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb), name
        for k in sa:
            assert sb[k].dtype == torch.float32 and torch.equal(cast(sa[k]), sb[k]), f"{name}.{k}"
        buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())  # incl. non-persistent ones
        assert buffers_a.keys() == buffers_b.keys()
        assert all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a), name


@pytest.mark.parametrize(
    ("dir_fixture", "file_fixture", "arch", "family", "prediction"),
    [
        ("tiny_sd1_dir", "sd1_file", "tiny-sd1", "sd1", "epsilon"),
        ("tiny_sd2_dir", "sd2_file", "tiny-sd2", "sd2", "v_prediction"),
    ],
)
def test_saved_file_loads_back_bit_for_bit(request, dir_fixture, file_fixture, arch, family, prediction):
    ref = load_checkpoint(request.getfixturevalue(dir_fixture))
    f = request.getfixturevalue(file_fixture)
    got = load_single_file(f)
    assert (got.source, got.format, got.arch, got.family, got.prediction_type) == (
        f,
        "single-file",
        arch,
        family,
        prediction,
    )
    assert got.scheduler_config == read_component_configs(arch_spec(arch).config_dir)["scheduler"]
    _assert_same_modules(ref, got)
    assert got.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    ids = got.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(got.text_encoder(ids)[0], ref.text_encoder(ids)[0])


def test_load_checkpoint_dispatches_files(sd1_file):
    assert load_checkpoint(sd1_file).format == "single-file"


# ---- architecture recognition ---------------------------------------------------------------------------------


def test_config_dir_of_a_known_arch_names_it(sd1_file, tiny_sd1_dir, ref1):
    got = load_single_file(sd1_file, config_dir=tiny_sd1_dir)
    assert (got.arch, got.family, got.prediction_type) == ("tiny-sd1", "sd1", "epsilon")
    _assert_same_modules(ref1, got)


def test_config_dir_describes_a_custom_arch(tmp_path, tiny_sd1_dir):
    cfg_dir = Path(shutil.copytree(CONFIG_ROOT / "tiny-sd1", tmp_path / "config"))
    unet_cfg = cfg_dir / "unet" / "config.json"
    custom = {
        "block_out_channels": [32, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
    }
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), **custom}))
    configs = read_component_configs(cfg_dir)
    torch.manual_seed(1)
    models = build_models(configs)
    te, unet, vae = models["text_encoder"], models["unet"], models["vae"]
    ref = Checkpoint(tmp_path, "diffusers", None, "sd1", te, None, unet, vae, configs["scheduler"])
    f = _with_tokenizer(tmp_path / "file", tiny_sd1_dir) / "custom.safetensors"
    save_single_file(ref, f)

    msg = _error(f)
    assert msg.startswith(
        f"{f}: unknown architecture: matches none of tiny-sd1, tiny-sd2, sd15, sd21 (closest: tiny-sd1, "
    )
    assert msg.endswith("; pass --config DIR with a diffusers-format folder describing it")
    got = load_single_file(f, config_dir=cfg_dir)
    assert (got.arch, got.family, got.format) == (None, "sd1", "single-file")
    _assert_same_modules(ref, got)


def test_config_dir_that_does_not_fit(sd1_file, tiny_sd2_dir, tmp_path):
    msg = _error(sd1_file, config_dir=tiny_sd2_dir)
    assert msg.startswith(f"{sd1_file}: does not match the architecture described by {tiny_sd2_dir} (")
    assert " mismatched tensors, e.g. " in msg
    assert (
        _error(sd1_file, config_dir=tmp_path / "nope")
        == f"{tmp_path / 'nope'}: config folder not found (expected a diffusers-format folder)"
    )


def test_one_reshaped_tensor_is_an_unknown_arch(sd1_file, tmp_path):
    state = load_file(str(sd1_file))
    state[UNET_OUT] = state[UNET_OUT][:, :16].contiguous()
    f = _with_tokenizer(tmp_path, sd1_file.parent) / "m.safetensors"
    save_file(state, str(f))
    assert _error(f) == (
        f"{f}: unknown architecture: matches none of tiny-sd1, tiny-sd2, sd15, sd21 (closest: tiny-sd1, "
        f"1 mismatched tensor, e.g. {UNET_OUT}: got shape (4, 16, 3, 3), expected (4, 32, 3, 3)); "
        "pass --config DIR with a diffusers-format folder describing it"
    )


def test_one_missing_tensor_is_an_unknown_arch(sd2_file, tmp_path):
    state = load_file(str(sd2_file))
    key = "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.bias"
    del state[key]
    f = _with_tokenizer(tmp_path, sd2_file.parent) / "m.safetensors"
    save_file(state, str(f))
    assert f"(closest: tiny-sd2, 1 mismatched tensor, e.g. {key}: missing); pass --config DIR" in _error(f)


def _full_size_state(arch: str) -> dict:
    """A meta-device state dict laid out as the released files are, extras included."""
    configs = read_component_configs(arch_spec(arch).config_dir)
    with torch.device("meta"):
        state = models_to_original(build_models(configs), family_of(configs))
        state.update(
            {"betas": torch.empty(1000), "alphas_cumprod": torch.empty(1000), "model_ema.decay": torch.empty(())}
        )
        if arch == "sd21":  # OpenCLIP's 24th layer and projection, both ignored by diffusers' converter
            for k in [k for k in state if ".resblocks.22." in k]:
                state[k.replace(".resblocks.22.", ".resblocks.23.")] = torch.empty_like(state[k])
            state["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024)
        else:
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77)
    return state


@pytest.mark.parametrize(("arch", "prediction"), [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_full_size_layouts_are_recognised(arch, prediction):
    cand = _recognise(Path(f"{arch}.safetensors"), _full_size_state(arch), _known_candidates(xl=False))
    assert cand.name == arch and cand.configs["scheduler"]["prediction_type"] == prediction


def test_full_size_near_miss_names_the_closest():
    state = _full_size_state("sd15")
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    state[key] = torch.empty(1280, 1280, device="meta")  # 2.x-style linear projection in a 1.x file
    with pytest.raises(CheckpointError) as e:
        _recognise(Path("x.safetensors"), state, _known_candidates(xl=False))
    assert (
        f"(closest: sd15, 1 mismatched tensor, e.g. {key}: got shape (1280, 1280), expected (1280, 1280, 1, 1))"
        in str(e.value)
    )


# ---- dtypes, EMA, pickles -------------------------------------------------------------------------------------


def test_fp16_file_loads_as_fp32(sd1_file, tmp_path, ref1):
    state = {k: v.half() for k, v in load_file(str(sd1_file)).items()}
    f = _with_tokenizer(tmp_path, sd1_file.parent) / "m-fp16.safetensors"
    save_file(state, str(f))
    got = load_single_file(f)
    assert got.arch == "tiny-sd1"
    _assert_same_modules(ref1, got, cast=lambda t: t.half().float())


def test_ema_weights_are_ignored(sd1_file, tmp_path, ref1):
    state = load_file(str(sd1_file))
    # As in the original training checkpoints: model_ema.<flattened UNet key>, plus bookkeeping.
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + k.removeprefix("model.").replace(".", "")] = torch.zeros_like(state[k])
    state["model_ema.num_updates"] = torch.tensor(5)
    f = _with_tokenizer(tmp_path, sd1_file.parent) / "m-ema.safetensors"
    save_file(state, str(f))
    _assert_same_modules(ref1, load_single_file(f))


def test_pickle_is_refused_by_default(sd1_file, tmp_path):
    f = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file))}, f)
    assert _error(f) == (
        f"{f}: refusing to load a pickle checkpoint: unpickling can run arbitrary code; convert it to .safetensors "
        "or pass --allow-pickle (loads with torch.load(weights_only=True))"
    )


@pytest.mark.parametrize("name", ["m.ckpt", "m.pt"])
def test_pickle_loads_with_allow_pickle(sd1_file, tmp_path, ref1, name):
    state = load_file(str(sd1_file))
    f = _with_tokenizer(tmp_path, sd1_file.parent) / name
    # .ckpt: Lightning-style wrapper with bookkeeping; .pt: a bare state dict.
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6} if name.endswith(".ckpt") else state, f)
    got = load_single_file(f, allow_pickle=True)
    assert got.arch == "tiny-sd1"
    _assert_same_modules(ref1, got)


def test_pickle_with_objects_is_refused_even_with_allow_pickle(tmp_path):
    f = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callback": NotATensor()}, f)
    msg = _error(f, allow_pickle=True)
    assert msg.startswith(f"{f}: cannot load pickle checkpoint with torch.load(weights_only=True): UnpicklingError: ")
    assert "NotATensor" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note about our fake header
def test_corrupt_pickle_is_reported(tmp_path):
    f = tmp_path / "m.pth"
    f.write_bytes(b"\x80\x04not really a pickle" * 10)
    assert _error(f, allow_pickle=True).startswith(
        f"{f}: cannot load pickle checkpoint with torch.load(weights_only=True): "
    )


# ---- bad files ------------------------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    assert _error(tmp_path / "nope.safetensors") == f"{tmp_path / 'nope.safetensors'}: no such file"
    assert _error(tmp_path) == f"{tmp_path}: is a folder, not a single-file checkpoint"


def test_truncated_safetensors(sd1_file, tmp_path):
    f = tmp_path / "half.safetensors"
    data = sd1_file.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert _error(f).startswith(f"{f}: not a valid safetensors file (SafetensorError: ")


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, bytes(range(256)) * 4])
def test_garbage_safetensors(tmp_path, content):
    f = tmp_path / "garbage.safetensors"
    f.write_bytes(content)
    assert _error(f).startswith(f"{f}: not a valid safetensors file (")


def test_unrelated_safetensors(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}, str(f))
    assert _error(f) == f"{f}: not a Stable Diffusion checkpoint (no UNet weights found)"


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx")
    assert _error(f) == (
        f"{f}: unsupported checkpoint file type '.onnx' (expected .safetensors, or .ckpt/.pt/.pth/.bin with --allow-pickle)"
    )


# ---- tokenizer ------------------------------------------------------------------------------------------------


def test_missing_tokenizer(sd1_file, tmp_path):
    f = Path(shutil.copy(sd1_file, tmp_path / "alone.safetensors"))
    assert _error(f) == (
        f"{f}: no tokenizer found beside the checkpoint (looked for {tmp_path / 'tokenizer'}) and its text encoder's 1000 tokens are "
        "not CLIP's vocabulary; pass --tokenizer DIR with a CLIP tokenizer folder"
    )


def test_tokenizer_dir_is_used(sd1_file, tmp_path, tiny_sd1_dir, ref1):
    f = Path(shutil.copy(sd1_file, tmp_path / "alone.safetensors"))
    got = load_single_file(f, tokenizer_dir=tiny_sd1_dir / "tokenizer")
    assert got.tokenizer.get_vocab() == ref1.tokenizer.get_vocab()
    assert _error(f, tokenizer_dir=tmp_path / "tok") == f"{tmp_path / 'tok'}: tokenizer folder not found"
