"""A checkpoint -> the torch modules its graphs compute, one per component: what the exporter traces and what the
torch backend runs, so every backend computes the same function. Which wrapper a component gets is the family's
data (``sdtrt.export.spec.FAMILIES``); this module only maps its kinds to classes."""

from __future__ import annotations

from typing import Any

import torch

from sdtrt.checkpoint.model import Checkpoint
from sdtrt.errors import ExportError
from sdtrt.export.clip import (
    MAX_LENGTH,
    PenultimateGraph,
    PooledPenultimateGraph,
    TextEncoderGraph,
    text_encoder_export,
)
from sdtrt.export.component import ComponentExport
from sdtrt.export.spec import family_spec
from sdtrt.export.unet import SDXLUNetGraph, UNetGraph, time_ids_count, unet_export
from sdtrt.export.vae import VaeDecoderGraph, VaeEncoderGraph, vae_decoder_export, vae_encoder_export, vae_scale_factor

TEXT_GRAPHS: dict[str, type[torch.nn.Module]] = {
    "clip": TextEncoderGraph,
    "penultimate": PenultimateGraph,
    "pooled_penultimate": PooledPenultimateGraph,
}
UNET_GRAPHS: dict[str, type[UNetGraph]] = {"sd": UNetGraph, "sdxl": SDXLUNetGraph}


def graph_modules(ckpt: Checkpoint) -> dict[str, torch.nn.Module]:
    """{component: wrapper module} for every component of ``ckpt``'s family, in export order. The wrappers hold the
    checkpoint's own modules (no copies); both VAE graphs share one VAE."""
    fam = family_spec(ckpt.family)
    out: dict[str, torch.nn.Module] = {}
    for name, kind in fam.text_encoders:
        encoder = getattr(ckpt, name)
        if encoder is None:
            raise ExportError(f"this {ckpt.family} checkpoint has no {name}")
        out[name] = TEXT_GRAPHS[kind](encoder)
    out["unet"] = UNET_GRAPHS[fam.unet](ckpt.unet)
    out["vae_decoder"] = VaeDecoderGraph(ckpt.vae)
    out["vae_encoder"] = VaeEncoderGraph(ckpt.vae)
    return out


def pooled_dim(ckpt: Checkpoint) -> int | None:
    """The width of SDXL's pooled text embedding (``text_encoder_2``'s projection), None without one."""
    te2 = ckpt.text_encoder_2
    return None if te2 is None else int(te2.text_projection.out_features)


def component_exports(ckpt: Checkpoint, names: tuple[str, ...]) -> list[ComponentExport]:
    """The exports of ``names`` (components of ``ckpt``'s family)."""
    modules = graph_modules(ckpt)
    s = vae_scale_factor(ckpt)
    makers = {
        "unet": lambda m: unet_export(m, s, pooled_dim(ckpt)),
        "vae_decoder": vae_decoder_export,
        "vae_encoder": vae_encoder_export,
    }
    return [makers[n](modules[n]) if n in makers else text_encoder_export(n, modules[n]) for n in names]


def model_info(ckpt: Checkpoint) -> dict[str, Any]:
    """What the manifest says of the model (its configs, not its weights): ``manifest["model"]``."""
    fam = family_spec(ckpt.family)
    unet = ckpt.unet.config
    widths = {n: int(getattr(ckpt, n).config.hidden_size) for n in fam.text_encoder_names}
    if sum(widths.values()) != unet.cross_attention_dim:
        raise ExportError(f"the UNet attends to text of width {unet.cross_attention_dim}, the {ckpt.family} text "
                          f"encoders give {' + '.join(f'{w} ({n})' for n, w in widths.items())}: they do not belong together")
    info: dict[str, Any] = {
        "family": ckpt.family,
        "prediction_type": ckpt.prediction_type,
        "vae_scale_factor": vae_scale_factor(ckpt),
        "vae_scaling_factor": float(ckpt.vae.config.scaling_factor),
        "latent_channels": int(unet.in_channels),
        "text_encoders": list(fam.text_encoder_names),
        "text_hidden_size": int(unet.cross_attention_dim),  # the text encoders' hidden sizes, concatenated
        "max_length": MAX_LENGTH,
        "default_size": int(unet.sample_size) * vae_scale_factor(ckpt),
    }
    if UNET_GRAPHS[fam.unet].COND_INPUTS:
        pooled = pooled_dim(ckpt)
        info |= {
            "pooled_dim": pooled,
            "time_ids": time_ids_count(ckpt.unet, pooled),
            # diffusers' SDXL pipelines default to True and False when model_index.json does not say
            "force_zeros_for_empty_prompt": bool(ckpt.pipeline_config.get("force_zeros_for_empty_prompt", True)),
            "requires_aesthetics_score": bool(ckpt.pipeline_config.get("requires_aesthetics_score", False)),
        }
    return info
