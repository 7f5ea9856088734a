"""tiny-sdxl and tiny-sdxl-refiner checkpoints and their exports, built from the committed configs
(``sdtrt/checkpoint/configs/tiny-sdxl*``) until ``init_random`` writes them: then tests/conftest.py's
``tiny_sdxl_dir`` / ``sdxl_workdir_fp32`` fixtures replace this module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtrt.checkpoint.archs import CONFIG_ROOT

_WORKDIRS: dict[tuple[str, str], Path] = {}


def make_checkpoint(arch: str, root: Path, seed: int = 0):
    """A random-weight ``arch`` Checkpoint (fp32, CPU, eval) whose tokenizers are generated into ``root``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtrt.checkpoint.model import Checkpoint
    from sdtrt.checkpoint.tokenizer import load_tokenizer, write_generated_tokenizer

    d = CONFIG_ROOT / arch

    def read(p: str) -> dict:
        return json.loads((d / p).read_text())

    index = read("model_index.json")
    encoders, tokenizers = {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, cls, tok, pad in (("text_encoder", CLIPTextModel, "tokenizer", "<|endoftext|>"),
                                    ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2", "!")):
            if not (d / name).is_dir():
                continue
            cfg = {k: v for k, v in read(f"{name}/config.json").items() if not k.startswith("_")}
            encoders[name] = cls(CLIPTextConfig(**cfg)).eval()
            if not (root / tok).is_dir():
                write_generated_tokenizer(root / tok, cfg["vocab_size"], pad_token=pad)  # SDXL's second pads with "!"
            tokenizers[tok] = load_tokenizer(root / tok)
        unet = UNet2DConditionModel.from_config(read("unet/config.json")).eval()
        vae = AutoencoderKL.from_config(read("vae/config.json")).eval()
    return Checkpoint(
        source=root, format="diffusers", arch=arch, family=read("arch.json")["family"],
        text_encoder=encoders.get("text_encoder"), tokenizer=tokenizers.get("tokenizer"), unet=unet, vae=vae,
        scheduler_config=read("scheduler/scheduler_config.json"), text_encoder_2=encoders["text_encoder_2"],
        tokenizer_2=tokenizers["tokenizer_2"],
        pipeline_config={k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index},
    )


def sdxl_workdir(factory: pytest.TempPathFactory, arch: str, precision: str) -> Path:
    """``arch`` exported with every component at ``precision`` (the VAE at its family default), once per test
    session; read-only for tests."""
    from sdtrt.export.pipeline import export_checkpoint
    from sdtrt.export.spec import ExportSpec

    key = (arch, precision)
    if key not in _WORKDIRS:
        root = factory.mktemp(f"{arch}-{precision}")
        ckpt = make_checkpoint(arch, root / "ckpt")
        export_checkpoint(ckpt, root / "wd", ExportSpec(precision=precision), progress=False, release=True)
        _WORKDIRS[key] = root / "wd"
    return _WORKDIRS[key]
