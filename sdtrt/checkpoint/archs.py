"""The known Stable Diffusion architectures, as data (``configs/<arch>/``), and model construction from them.

Nothing here touches a hub: every config a known architecture needs ships inside the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.errors import CheckpointError

CONFIG_ROOT = Path(__file__).parent / "configs"
KNOWN_ARCHS: tuple[str, ...] = ("tiny-sd1", "tiny-sd2", "sd15", "sd21")
COMPONENTS: tuple[str, ...] = ("text_encoder", "unet", "vae", "scheduler")


@dataclass(frozen=True)
class ArchSpec:
    """A known architecture: ``family`` is ``sd1`` or ``sd2``; ``config_dir`` is a diffusers-layout folder of configs."""

    name: str
    family: str
    default_size: int
    config_dir: Path


def arch_spec(name: str) -> ArchSpec:
    if name not in KNOWN_ARCHS:
        raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(KNOWN_ARCHS)}")
    d = CONFIG_ROOT / name
    meta = json.loads((d / "arch.json").read_text())
    return ArchSpec(name=name, family=meta["family"], default_size=int(meta["default_size"]), config_dir=d)


def read_component_configs(config_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``text_encoder/config.json``, ``unet/config.json``, ``vae/config.json`` and
    ``scheduler/scheduler_config.json`` from a diffusers-layout folder."""
    d = Path(config_dir)
    files = {
        "text_encoder": d / "text_encoder" / "config.json",
        "unet": d / "unet" / "config.json",
        "vae": d / "vae" / "config.json",
        "scheduler": d / "scheduler" / "scheduler_config.json",
    }
    out: dict[str, dict[str, Any]] = {}
    for comp, f in files.items():
        if not f.is_file():
            raise CheckpointError(f"{f}: missing {comp} config")
        try:
            out[comp] = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    return out


def family_of(configs: dict[str, dict[str, Any]]) -> str:
    """``sd2`` for OpenCLIP-style text encoders (gelu, SD 2.x), else ``sd1`` (CLIP ViT-L, quick_gelu)."""
    return "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"


def build_models(configs: dict[str, dict[str, Any]]):
    """Instantiate (text_encoder, unet, vae) from component configs, with freshly initialised weights, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    te_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    return text_encoder.eval(), unet.eval(), vae.eval()
