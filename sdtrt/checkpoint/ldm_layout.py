"""diffusers -> original (CompVis / LDM) state-dict layout, the one A1111 and the original SD releases store.

The reverse direction is diffusers' own ``single_file_utils.convert_*`` functions; this module is written as
their exact inverse (``tests/checkpoint/test_ldm_layout.py`` round-trips every key and tensor through them).

Original layout, per component:

* UNet ``model.diffusion_model.``: ``time_embed.{0,2}``; ``input_blocks.0.0`` (conv_in); then per down block
  ``b`` and layer ``l``: ``input_blocks.{1 + b*(L+1) + l}.{0: resnet, 1: attention}`` and, for all but the last
  block, ``input_blocks.{1 + b*(L+1) + L}.0.op`` (downsample); ``middle_block.{0: resnet, 1: attention,
  2: resnet}``; per up block ``output_blocks.{b*(L+1) + l}.{0: resnet, 1: attention}`` with the upsample conv
  at ``.1.conv`` (no attention) or ``.2.conv``; ``out.{0,2}``. Resnets use ``in_layers`` / ``emb_layers`` /
  ``out_layers`` / ``skip_connection``; attention blocks keep diffusers' names.
* VAE ``first_stage_model.``: ``encoder.down.{i}.block.{j}``, ``.downsample.conv``; ``mid.block_1``,
  ``mid.attn_1`` (q/k/v/proj_out as 1x1 convs), ``mid.block_2``; ``decoder.up.{n-1-i}`` (numbered in reverse);
  ``nin_shortcut``; ``norm_out``; ``quant_conv`` / ``post_quant_conv``.
* Text encoder, SD 1.x ``cond_stage_model.transformer.`` + Hugging Face CLIP keys (``text_model.*``);
  SD 2.x ``cond_stage_model.model.`` in OpenCLIP layout (fused ``attn.in_proj_weight``, ``mlp.c_fc``, ...).
  Real SD 2.x files carry 24 OpenCLIP layers and a ``text_projection``; diffusers keeps 23 layers and no
  projection, so only what the model has is written.
* SDXL (Stability's ``sgm`` layout): the UNet as above plus ``label_emb.0.{0,2}`` (diffusers' ``add_embedding``,
  the pooled-text + time-id embedding); text encoders under ``conditioner.embedders.``: base ``0.transformer.``
  (CLIP ViT-L, Hugging Face keys) and ``1.model.`` (OpenCLIP ViT-bigG layout, all layers, ``text_projection``
  as ``x @ P``); the refiner has only bigG, as ``0.model.``. ``TEXT_LAYOUTS`` says which, per family.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdtrt import __version__
from sdtrt.errors import CheckpointError, UsageError
from sdtrt.fsutil import atomic_path

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
HF, OPEN_CLIP = "hf", "open_clip"  # text-encoder key layouts: Hugging Face CLIP names, or OpenCLIP's fused ones
# family -> text-encoder component -> (original prefix, layout)
TEXT_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": (SD1_TEXT_PREFIX, HF)},
    "sd2": {"text_encoder": (SD2_TEXT_PREFIX, OPEN_CLIP)},
    "sdxl": {"text_encoder": (SDXL_CLIP_L_PREFIX, HF), "text_encoder_2": (SDXL_BIGG_PREFIX, OPEN_CLIP)},
    "sdxl-refiner": {"text_encoder_2": (REFINER_BIGG_PREFIX, OPEN_CLIP)},
}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + time ids
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")

_BLOCK_RE = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_RE = re.compile(r"(encoder|decoder)\.(.+)")
_CLIP_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


# ---- key maps: diffusers key -> original key (None: no original equivalent) ---------------------------------


def _swap_head(rest: str, table: dict[str, str]) -> str | None:
    """``rest`` with its leading module path replaced per ``table`` (longest match), or None."""
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return None


def _unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    if (top := _swap_head(key, _UNET_TOP)) is not None:
        return UNET_PREFIX + top
    per_block = layers_per_block + 1
    if m := _BLOCK_RE.fullmatch(key):
        side, b, kind, n, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            first = 1 + b * per_block
            if kind == "resnets" and (r := _swap_head(rest, _UNET_RESNET)) is not None:
                return f"{UNET_PREFIX}input_blocks.{first + n}.0.{r}"
            if kind == "attentions":
                return f"{UNET_PREFIX}input_blocks.{first + n}.1.{rest}"
            if kind == "downsamplers" and n == 0 and rest.startswith("conv."):
                return f"{UNET_PREFIX}input_blocks.{first + layers_per_block}.0.op{rest[len('conv') :]}"
            return None
        first = b * per_block
        if kind == "resnets" and (r := _swap_head(rest, _UNET_RESNET)) is not None:
            return f"{UNET_PREFIX}output_blocks.{first + n}.0.{r}"
        if kind == "attentions":
            return f"{UNET_PREFIX}output_blocks.{first + n}.1.{rest}"
        if kind == "upsamplers" and n == 0 and rest.startswith("conv."):
            slot = 2 if b in up_blocks_with_attention else 1
            return f"{UNET_PREFIX}output_blocks.{first + layers_per_block}.{slot}.{rest}"
        return None
    if m := _MID_RE.fullmatch(key):
        kind, n, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions" and n == 0:
            return f"{UNET_PREFIX}middle_block.1.{rest}"
        if kind == "resnets" and n in (0, 1) and (r := _swap_head(rest, _UNET_RESNET)) is not None:
            return f"{UNET_PREFIX}middle_block.{2 * n}.{r}"
    return None


def _vae_key(key: str, n_up: int) -> str | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return VAE_PREFIX + key
    m = _VAE_RE.fullmatch(key)
    if not m:
        return None
    side, rest = m.group(1), m.group(2)
    if rest.startswith(("conv_in.", "conv_out.")):
        return f"{VAE_PREFIX}{side}.{rest}"
    if (top := _swap_head(rest, _VAE_TOP)) is not None:
        return f"{VAE_PREFIX}{side}.{top}"
    if bm := _BLOCK_RE.fullmatch(rest):
        updown, i, kind, n, tail = bm.group(1), int(bm.group(2)), bm.group(3), int(bm.group(4)), bm.group(5)
        if (updown == "down") != (side == "encoder"):
            return None
        name = f"down.{i}" if updown == "down" else f"up.{n_up - 1 - i}"
        if kind == "resnets":
            return f"{VAE_PREFIX}{side}.{name}.block.{n}.{tail.replace('conv_shortcut.', 'nin_shortcut.')}"
        if kind in ("downsamplers", "upsamplers") and n == 0 and tail.startswith("conv."):
            sampler = "downsample" if updown == "down" else "upsample"
            return f"{VAE_PREFIX}{side}.{name}.{sampler}.{tail}"
        return None
    if mm := _MID_RE.fullmatch(rest):
        kind, n, tail = mm.group(1), int(mm.group(2)), mm.group(3)
        if kind == "resnets" and n in (0, 1):
            return f"{VAE_PREFIX}{side}.mid.block_{n + 1}.{tail.replace('conv_shortcut.', 'nin_shortcut.')}"
        if kind == "attentions" and n == 0 and (a := _swap_head(tail, _VAE_ATTN)) is not None:
            return f"{VAE_PREFIX}{side}.mid.attn_1.{a}"
    return None


def _open_clip_key(key: str, prefix: str = SD2_TEXT_PREFIX) -> str | None:
    if key in _OPEN_CLIP_TOP:
        return prefix + _OPEN_CLIP_TOP[key]
    m = _CLIP_LAYER_RE.fullmatch(key)
    if not m:
        return None
    i, module, param = m.group(1), m.group(2), m.group(3)
    head = f"{prefix}transformer.resblocks.{i}."
    if module in _OPEN_CLIP_LAYER:
        return f"{head}{_OPEN_CLIP_LAYER[module]}.{param}"
    if module in (f"self_attn.{p}" for p in _QKV):
        return f"{head}attn.in_proj_{param}"  # q, k and v fuse into one tensor
    return None


def _n_up_blocks(keys: Iterable[str]) -> int:
    ids = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def _up_blocks_with_attention(keys: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}


def canonical_clip_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face CLIP text-model state dict with ``text_model.``-prefixed keys, whatever the transformers
    version (5.x drops the prefix on ``CLIPTextModel``); ``text_projection.*`` stays top-level."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state_dict.items()
    }


def original_key_map(
    component: str, keys: Iterable[str], *, family: str = "sd1", layers_per_block: int = 2
) -> dict[str, str]:
    """Map each diffusers key of ``component`` (``text_encoder`` / ``text_encoder_2`` with canonical
    ``text_model.`` keys, ``unet`` or ``vae``) to its original key; keys with no original equivalent are left out.

    Several diffusers keys may map to one original key (OpenCLIP's fused q/k/v).
    """
    keys = list(keys)
    if component == "unet":
        with_attn = _up_blocks_with_attention(keys)
        pairs = ((k, _unet_key(k, layers_per_block, with_attn)) for k in keys)
    elif component == "vae":
        n_up = _n_up_blocks(keys)
        pairs = ((k, _vae_key(k, n_up)) for k in keys)
    elif component in ("text_encoder", "text_encoder_2"):
        prefix, layout = _text_layout(family, component)
        pairs = ((k, prefix + k if layout == HF else _open_clip_key(k, prefix)) for k in keys)
    else:
        raise UsageError(f"unknown component {component!r}; expected text_encoder, text_encoder_2, unet or vae")
    return {k: v for k, v in pairs if v is not None}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def _text_layout(family: str, component: str) -> tuple[str, str]:
    _check_family(family)
    layout = TEXT_LAYOUTS[family].get(component)
    if layout is None:
        raise UsageError(f"a {family} checkpoint has no {component}")
    return layout


def _map_all(component: str, state_dict: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    keymap = original_key_map(component, state_dict, **kwargs)
    unmapped = [k for k in state_dict if k not in keymap]
    if unmapped:
        raise CheckpointError(
            f"{component} has {len(unmapped)} tensors with no place in the original SD layout "
            f"(e.g. {unmapped[0]}): not a Stable Diffusion {component}"
        )
    return keymap


# ---- state-dict conversion ------------------------------------------------------------------------------------


def unet_to_original(state_dict: dict[str, Any], layers_per_block: int) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` (same tensors, renamed)."""
    keymap = _map_all("unet", state_dict, layers_per_block=layers_per_block)
    return {keymap[k]: t for k, t in state_dict.items()}


def vae_to_original(state_dict: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*``; mid-block attention linears become
    1x1 convs, ``(C, C) -> (C, C, 1, 1)``."""
    keymap = _map_all("vae", state_dict)
    out = {}
    for k, t in state_dict.items():
        is_attn_linear = ".mid_block.attentions." in k and k.endswith(".weight") and t.ndim == 2
        out[keymap[k]] = t[:, :, None, None] if is_attn_linear else t
    return out


def text_encoder_to_original(state_dict: dict[str, Any], family: str, component: str = "text_encoder") -> dict[str, Any]:
    """Hugging Face CLIP text-model state dict (any key style) of ``component`` -> its original keys in
    ``family`` (``TEXT_LAYOUTS``).

    Hugging Face layout (SD 1.x, SDXL's CLIP ViT-L): the same keys under the prefix. OpenCLIP layout (SD 2.x,
    SDXL's bigG): q/k/v fused (concatenated in that order along dim 0) and ``text_projection`` transposed.
    """
    import torch

    prefix, layout = _text_layout(family, component)
    sd = canonical_clip_keys(state_dict)
    if layout == HF:
        return {prefix + k: t for k, t in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)  # a buffer OpenCLIP recomputes; older transformers saved it
    keymap = _map_all(component, sd, family=family)
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for k, t in sd.items():
        orig = keymap[k]
        if orig.endswith(("in_proj_weight", "in_proj_bias")):
            fused.setdefault(orig, {})[k.split(".")[-2]] = t
        elif k == "text_projection.weight":
            out[orig] = t.T  # OpenCLIP: x @ text_projection, (width, embed_dim); torch Linear: (embed_dim, width)
        else:
            out[orig] = t
    for orig, parts in fused.items():
        if set(parts) != set(_QKV):
            raise CheckpointError(f"{component}: {orig} needs q, k and v projections, found only {sorted(parts)}")
        out[orig] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def to_original_state_dict(text_encoder, unet, vae, family: str, text_encoder_2=None) -> dict[str, Any]:
    """The whole checkpoint in the original single-file layout: text encoder(s) (``cond_stage_model.``, SDXL:
    ``conditioner.embedders.``), UNet (``model.diffusion_model.``) and VAE (``first_stage_model.``). Tensors
    share storage with the modules where no reshaping is needed; nothing is copied to another device or dtype.
    ``text_encoder`` is None for ``sdxl-refiner``; ``text_encoder_2`` is SDXL's second one."""
    _check_family(family)
    out: dict[str, Any] = {}
    for comp, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if comp in TEXT_LAYOUTS[family]:
            if model is None:
                raise UsageError(f"a {family} checkpoint needs its {comp}")
            out.update(text_encoder_to_original(model.state_dict(), family, comp))
    out.update(unet_to_original(unet.state_dict(), _layers_per_block(unet.config)))
    out.update(vae_to_original(vae.state_dict()))
    return out


def models_to_original(models: dict[str, Any], family: str) -> dict[str, Any]:
    """``to_original_state_dict`` of ``archs.build_models``' dict of modules."""
    return to_original_state_dict(models.get("text_encoder"), models["unet"], models["vae"], family,
                                  text_encoder_2=models.get("text_encoder_2"))


def _layers_per_block(config: Any) -> int:
    n = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    if isinstance(n, (list, tuple)):
        if len(set(n)) != 1:
            raise CheckpointError(f"unet layers_per_block={list(n)}: the original layout needs one value")
        n = n[0]
    return int(n)


def save_single_file(checkpoint, path: Path) -> None:
    """Write ``checkpoint`` as one original-layout ``.safetensors`` file (fp32, what the modules hold), atomically.

    The header metadata records the architecture, family, prediction type and what wrote the file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: a single-file checkpoint is written as .safetensors")
    state = to_original_state_dict(checkpoint.text_encoder, checkpoint.unet, checkpoint.vae, checkpoint.family,
                                   text_encoder_2=checkpoint.text_encoder_2)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}
    metadata = {
        "format": "pt",
        "sdtrt_arch": checkpoint.arch or "",
        "sdtrt_family": checkpoint.family,
        "sdtrt_prediction_type": checkpoint.prediction_type,
        "made_by": f"sdtrt {__version__} save_single_file",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("wrote %s (%d tensors, %s)", path, len(tensors), checkpoint.family)
