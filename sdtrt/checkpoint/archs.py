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
KNOWN_ARCHS: tuple[str, ...] = (
    "tiny-sd1", "tiny-sd2", "sd15", "sd21", "tiny-sdxl", "tiny-sdxl-refiner", "sdxl", "sdxl-refiner",
)
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sdxl-refiner")
# Model components per family, in the order their text hidden states are concatenated (text encoders first).
FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd1": ("text_encoder", "unet", "vae"),
    "sd2": ("text_encoder", "unet", "vae"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae"),
    "sdxl-refiner": ("text_encoder_2", "unet", "vae"),
}
TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
COMPONENTS: tuple[str, ...] = ("text_encoder", "unet", "vae", "scheduler")  # what every SD 1.x/2.x folder has
_CONFIG_FILES = {
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


@dataclass(frozen=True)
class ArchSpec:
    """A known architecture: ``family`` is one of ``FAMILIES``; ``config_dir`` is a diffusers-layout folder of
    configs (with ``model_index.json``)."""

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
    """Read the component configs of a diffusers-layout folder: ``unet``, ``vae``, ``scheduler`` always;
    ``text_encoder`` and ``text_encoder_2`` where their folders exist (SD: the first; SDXL base: both; SDXL
    refiner: the second), at least one of them."""
    d = Path(config_dir)
    out: dict[str, dict[str, Any]] = {}
    for comp, rel in _CONFIG_FILES.items():
        f = d / rel
        if comp in TEXT_ENCODERS and not f.is_file() and not f.parent.is_dir():
            continue
        if not f.is_file():
            raise CheckpointError(f"{f}: missing {comp} config")
        try:
            out[comp] = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not any(c in out for c in TEXT_ENCODERS):
        raise CheckpointError(f"{d / _CONFIG_FILES['text_encoder']}: missing text_encoder config")
    return out


def time_id_count(configs: dict[str, dict[str, Any]]) -> int | None:
    """How many micro-conditioning numbers (time ids) an SDXL UNet embeds: 6 for the base (original size, crop
    top-left, target size), 5 for the refiner (the target size replaced by an aesthetic score); None if not
    SDXL-style or the dimensions do not add up."""
    unet = configs.get("unet") or {}
    if unet.get("addition_embed_type") != "text_time":
        return None
    te2 = configs.get("text_encoder_2") or {}
    pooled, per_id = te2.get("projection_dim"), unet.get("addition_time_embed_dim")
    total = unet.get("projection_class_embeddings_input_dim")
    if not all(isinstance(v, int) and v > 0 for v in (pooled, per_id, total)):
        return None
    n, rest = divmod(total - pooled, per_id)
    return n if rest == 0 and n > 0 else None


def family_of(configs: dict[str, dict[str, Any]], index: dict[str, Any] | None = None) -> str:
    """The model family, from the configs: a UNet with ``addition_embed_type == "text_time"`` is SDXL, its refiner
    when it embeds 5 time ids, has no ``text_encoder`` or (``index``, ``model_index.json``) requires an aesthetic
    score; else ``sd2`` for an OpenCLIP-style text encoder (gelu), else ``sd1`` (CLIP ViT-L, quick_gelu)."""
    if (configs.get("unet") or {}).get("addition_embed_type") == "text_time":
        refiner = ("text_encoder" not in configs or time_id_count(configs) == 5
                   or bool((index or {}).get("requires_aesthetics_score")))
        return "sdxl-refiner" if refiner else "sdxl"
    return "sd2" if (configs.get("text_encoder") or {}).get("hidden_act") == "gelu" else "sd1"


def build_models(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Instantiate the model components the configs describe, freshly initialised, in eval mode:
    ``{"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection, "unet", "vae"}`` (text
    encoders only where configured), in ``FAMILY_COMPONENTS`` order. Builds on the current default device (use
    ``with torch.device("meta")`` for shapes alone)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out: dict[str, Any] = {}
    for comp, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if comp in configs:
            cfg = {k: v for k, v in configs[comp].items() if not k.startswith("_")}
            out[comp] = cls(CLIPTextConfig(**cfg))
    out["unet"] = UNet2DConditionModel.from_config(configs["unet"])
    out["vae"] = AutoencoderKL.from_config(configs["vae"])
    return {k: m.eval() for k, m in out.items()}
