"""--vae (a diffusers folder, an original-layout file, a diffusers-layout file; VAE-less checkpoints), --ema, and a
checkpoint's own noise schedule (alphas_cumprod)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.ldm_layout import save_single_file, vae_to_original
from sdtrt.checkpoint.single_file import load_single_file
from sdtrt.errors import CheckpointError, SdtrtError

VAE = "first_stage_model."
UNET_W = "model.diffusion_model.out.2.weight"


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vae-ema")
    f = d / "tiny.safetensors"
    save_single_file(load_checkpoint(tiny_sd1_dir), f)
    shutil.copytree(tiny_sd1_dir / "tokenizer", d / "tokenizer")
    return f


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory) -> Path:
    """A diffusers VAE folder with tiny-sd1's config and other (seed 1) weights."""
    from diffusers import AutoencoderKL

    from sdtrt.checkpoint.archs import CONFIG_ROOT

    cfg = json.loads((CONFIG_ROOT / "tiny-sd1" / "vae" / "config.json").read_text())
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL.from_config(cfg).save_pretrained(d)
    return d


def _same_vae(model, folder: Path) -> None:
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _write_vaeless(sd1_file: Path, out: Path) -> Path:
    shutil.copytree(sd1_file.parent / "tokenizer", out.parent / "tokenizer", dirs_exist_ok=True)
    save_file({k: v for k, v in load_file(str(sd1_file)).items() if not k.startswith(VAE)}, str(out))
    return out


def test_vae_folder_replaces_a_single_files_vae(sd1_file, other_vae):
    ckpt = load_checkpoint(sd1_file, vae=other_vae)
    _same_vae(ckpt.vae, other_vae)
    assert ckpt.vae_source == other_vae and ckpt.notes == (f"VAE from {other_vae}",)


@pytest.mark.parametrize("layout", ["original", "original-prefixed", "diffusers"])
def test_vae_file_in_either_layout_makes_a_vaeless_file_loadable(sd1_file, other_vae, tmp_path, layout):
    f = _write_vaeless(sd1_file, tmp_path / "no-vae.safetensors")
    with pytest.raises(CheckpointError, match="without VAE weights; pass --vae PATH"):
        load_checkpoint(f)
    sd = load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))
    if layout == "diffusers":
        vae_file = other_vae / "diffusion_pytorch_model.safetensors"
    else:
        orig = vae_to_original(sd)
        if layout == "original":
            orig = {k.removeprefix(VAE): v for k, v in orig.items()}
        vae_file = tmp_path / f"vae-{layout}.safetensors"
        save_file(orig, str(vae_file))
    _same_vae(load_checkpoint(f, vae=vae_file).vae, other_vae)


def test_vae_on_a_diffusers_folder(tiny_sd1_dir, other_vae, tmp_path):
    orig = tmp_path / "vae.safetensors"
    save_file(vae_to_original(load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))), str(orig))
    ckpt = load_checkpoint(tiny_sd1_dir, vae=orig)
    _same_vae(ckpt.vae, other_vae)
    assert ckpt.notes == (f"VAE from {orig}",)


def test_vae_with_other_latent_channels_is_refused(sd1_file, tmp_path):
    state = {k: v for k, v in load_file(str(sd1_file)).items() if k.startswith(VAE)}
    w = state[VAE + "decoder.conv_in.weight"]
    state[VAE + "decoder.conv_in.weight"] = torch.zeros(w.shape[0], 16, *w.shape[2:])
    f = tmp_path / "vae16.safetensors"
    save_file(state, str(f))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(sd1_file, vae=f)
    assert str(e.value) == f"{f}: a VAE with 16 latent channels; this model's UNet works in 4"


def test_vae_with_another_scaling_factor_is_refused(sd1_file, other_vae, tmp_path):
    d = tmp_path / "xl-vae"
    shutil.copytree(other_vae, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(sd1_file, vae=d)
    assert str(e.value) == (f"{d}: VAE scaling_factor 0.13025 differs from the model's 0.18215 "
                            "(a VAE of another model family?)")


def test_vae_that_is_not_a_vae(sd1_file, tmp_path):
    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(sd1_file, vae=f)
    assert str(e.value) == f"{f}: a LoRA file (1 adapted layers), not a checkpoint, not a VAE"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(sd1_file, vae=tmp_path / "missing")
    assert str(e.value) == f"{tmp_path / 'missing'}: no such VAE file or folder"


# ---- EMA ------------------------------------------------------------------------------------------------------


def _with_ema(sd1_file: Path, out: Path, *, keep_regular: bool = True) -> Path:
    state = load_file(str(sd1_file))
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + k.removeprefix("model.").replace(".", "")] = state[k] + 1
        if not keep_regular:
            del state[k]
    state["model_ema.num_updates"] = torch.tensor(5)
    shutil.copytree(sd1_file.parent / "tokenizer", out.parent / "tokenizer", dirs_exist_ok=True)
    save_file(state, str(out))
    return out


def test_ema_is_chosen_with_ema_and_said_either_way(sd1_file, tmp_path):
    f = _with_ema(sd1_file, tmp_path / "ema.safetensors")
    ref = load_file(str(sd1_file))[UNET_W]
    regular = load_single_file(f)
    assert torch.equal(regular.unet.conv_out.weight, ref)
    assert regular.notes == ("EMA weights present: using the regular ones (--ema for the EMA ones)",)
    ema = load_single_file(f, ema=True)
    assert torch.equal(ema.unet.conv_out.weight, ref + 1)
    assert ema.notes[0].startswith("EMA weights: using them for the UNet (")


def test_ema_only_file(sd1_file, tmp_path):
    f = _with_ema(sd1_file, tmp_path / "ema-only.safetensors", keep_regular=False)
    with pytest.raises(CheckpointError) as e:
        load_single_file(f)
    assert str(e.value) == f"{f}: a checkpoint with only EMA weights (model_ema.*); pass --ema to load them"
    got = load_single_file(f, ema=True)
    assert torch.equal(got.unet.conv_out.weight, load_file(str(sd1_file))[UNET_W] + 1)


def test_ema_without_ema_weights(sd1_file, tiny_sd1_dir):
    with pytest.raises(CheckpointError) as e:
        load_single_file(sd1_file, ema=True)
    assert str(e.value) == f"{sd1_file}: --ema given, but the file has no EMA weights (model_ema.*)"
    with pytest.raises(SdtrtError, match="--ema applies to single-file checkpoints"):
        load_checkpoint(tiny_sd1_dir, ema=True)


# ---- alphas_cumprod ---------------------------------------------------------------------------------------------


def _alphas(start: float, end: float) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(start**0.5, end**0.5, 1000, dtype=torch.float64) ** 2, 0).float()


@pytest.mark.parametrize(("end", "warns"), [(0.012, False), (0.02, True)])
def test_alphas_cumprod_that_disagrees_is_warned(sd1_file, tmp_path, caplog, end, warns):
    state = load_file(str(sd1_file))
    state["alphas_cumprod"] = _alphas(0.00085, end)
    f = tmp_path / "m.safetensors"
    shutil.copytree(sd1_file.parent / "tokenizer", tmp_path / "tokenizer")
    save_file(state, str(f))
    with caplog.at_level(logging.WARNING, logger="sdtrt"):
        load_single_file(f)
    msgs = [r.getMessage() for r in caplog.records if "alphas_cumprod" in r.getMessage()]
    assert bool(msgs) == warns
    if warns:
        assert msgs[0].startswith(f"{f}: its alphas_cumprod (the noise schedule it was trained with) differs")


def test_the_torch_backend_loads_the_source_as_it_was_exported(sd1_file, other_vae, tmp_path):
    """--vae (and --ema) recorded in the manifest's load options reach the torch backend, which reloads the source:
    it must run the VAE the graphs were exported with, not the file's own (or fail on a VAE-less file)."""
    from sdtrt.cli import main
    from sdtrt.export.manifest import read_manifest
    from sdtrt.runtime.backends.torch_backend import TorchBackend

    f = _write_vaeless(sd1_file, tmp_path / "no-vae.safetensors")
    wd = tmp_path / "wd"
    assert main(["export", str(f), str(wd), "--vae", str(other_vae), "--components", "text_encoder", "-q"]) == 0
    backend = TorchBackend(wd, read_manifest(wd), torch.device("cpu"))
    _same_vae(backend.source.vae, other_vae)
