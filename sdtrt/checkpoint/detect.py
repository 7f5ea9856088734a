"""What is this checkpoint? One answer for every input path, from tensor names and shapes (a single file) or from
component configs (a diffusers folder, ``--config``), before anything is built or converted.

The key sets are the ones diffusers' ``single_file_utils`` and A1111 recognise: ``model.diffusion_model.`` (UNet,
original layout) with ``cond_stage_model.transformer.`` (SD 1.x, CLIP) or ``cond_stage_model.model.`` (SD 2.x,
OpenCLIP); ``conditioner.embedders.{0,1}.`` and ``label_emb`` (SDXL base; the refiner has only the OpenCLIP
embedder, as ``0.model.``); the UNet's ``conv_in`` input channels (4 text-to-image, 9 inpainting,
8 instruct-pix2pix, 5 depth, 7 upscaler); ``first_stage_model.`` (VAE); ``model_ema.`` (EMA copies, flattened
names); LoRA (``lora_down``/``lora_A``, ...), ControlNet (``input_hint_block``, ``controlnet_cond_embedding``),
VAE-only files (``encoder.``/``decoder.``) and transformer (not UNet) models: SD3's ``joint_blocks``, Flux's
``double_blocks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.errors import CheckpointError

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
XL_TEXT = "conditioner.embedders."
XL_CLIP_L = XL_TEXT + "0.transformer."
XL_BIGG = XL_TEXT + "1.model."
REFINER_BIGG = XL_TEXT + "0.model."
LABEL_EMB = "model.diffusion_model.label_emb."
VAE = "first_stage_model."
EMA = "model_ema."
CONV_IN = UNET + "input_blocks.0.0.weight"
_UNET_INPUTS = {9: ("inpainting", "inpainting"), 8: ("instruct-pix2pix", "instruct-pix2pix (image editing)"),
                5: ("depth-to-image", "depth-to-image"), 7: ("upscaler", "the x4 upscaler")}
_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL base",
                 "sdxl-refiner": "Stable Diffusion XL refiner", None: "Stable Diffusion"}
# Diffusion transformers (not UNets) people mistake for SD checkpoints: a tensor-name mark -> (kind, what).
_TRANSFORMERS = {"joint_blocks.": ("sd3", "Stable Diffusion 3"), "double_blocks.": ("flux", "Flux"),
                 "double_layers.": ("auraflow", "AuraFlow")}
# model_index.json pipeline classes sdtrt cannot run (a prefix of the class name) -> (kind, what, why).
_PIPELINES = (
    ("StableDiffusionXLInpaint", "sdxl-inpainting", "a Stable Diffusion XL inpainting model",
     "SDXL inpainting is not supported yet"),
    ("StableDiffusionXLInstructPix2Pix", "sdxl-instruct-pix2pix", "a Stable Diffusion XL instruct-pix2pix (image "
     "editing) model", "instruct-pix2pix is not supported yet"),
    ("StableDiffusionInstructPix2Pix", "sd-instruct-pix2pix", "a Stable Diffusion instruct-pix2pix (image editing) "
     "model", "instruct-pix2pix is not supported yet"),
    ("StableDiffusion3", "sd3", "a Stable Diffusion 3 model (a diffusion transformer, not a UNet)",
     "Stable Diffusion 3 is not supported"),
    ("Flux", "flux", "a Flux model (a diffusion transformer, not a UNet)", "Flux is not supported"),
)

_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_unet_", "lora_te")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Detected:
    """What a checkpoint is. ``kind`` is a short tag (``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``, ``sd1-inpainting``,
    ``sdxl-inpainting``, ``lora``, ``vae``, ``sd3``, ...); ``description`` reads after "this is"; ``unsupported`` says why it cannot be exported (None:
    it can); ``needs_vae``: a checkpoint without VAE weights, exportable with ``--vae``; ``ema``: the file has
    EMA weights (``both`` beside the regular ones, ``only`` without them, ``none``)."""

    kind: str
    description: str
    family: str | None = None
    unsupported: str | None = None
    needs_vae: bool = False
    ema: str = "none"

    def refusal(self, path: Path | str) -> CheckpointError:
        why = f"; {self.unsupported}" if self.unsupported else ""
        return CheckpointError(f"{path}: {self.description}{why}")


def detect_state(shapes: Shapes) -> Detected:
    """Name what a state dict (key -> shape, original or diffusers layout) holds."""
    keys = list(shapes)
    if any(m in k for k in keys for m in _LORA_MARKS):
        n = sum(k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight")) for k in keys)
        return Detected("lora", f"a LoRA file ({n} adapted layers), not a checkpoint",
                        unsupported="LoRA files are not supported yet (they patch a checkpoint's weights)")
    if any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in keys):
        return Detected("controlnet", "a ControlNet", unsupported="ControlNet is not supported yet")
    for mark, (kind, what) in _TRANSFORMERS.items():
        if any(k.removeprefix(UNET).startswith(mark) for k in keys):
            return Detected(kind, f"a {what} checkpoint (a diffusion transformer, not a UNet)",
                            unsupported=f"{what} is not supported")
    has = _prefixes(keys)
    if XL_TEXT in has or any(k.startswith(LABEL_EMB) for k in keys):
        return _sdxl(shapes, has)
    ema = "both" if EMA in has and UNET in has else "only" if EMA in has else "none"
    if UNET in has:
        return _sd(shapes, has, ema)
    if ema == "only":
        return Detected("ema-only", "a checkpoint with only EMA weights (model_ema.*)", unsupported="pass --ema to load them",
                        ema="only")
    vae = _vae(keys)
    if vae is not None:
        return vae
    if SD1_TEXT in has or SD2_TEXT in has or any(k.startswith("text_model.") for k in keys):
        return Detected("text-encoder", "a text encoder only", unsupported="sdtrt needs a whole checkpoint")
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return Detected("unet", "a UNet only (diffusers layout)", unsupported="load it as part of a diffusers folder")
    return Detected("unknown", "not a Stable Diffusion checkpoint (no UNet weights found)",
                    unsupported="")


def _prefixes(keys: list[str]) -> set[str]:
    out = set()
    for p in (UNET, SD1_TEXT, SD2_TEXT, VAE, EMA, XL_TEXT, XL_CLIP_L, XL_BIGG, REFINER_BIGG):
        if any(k.startswith(p) for k in keys):
            out.add(p)
    return out


def _sdxl(shapes: Shapes, has: set[str]) -> Detected:
    """SDXL (sgm layout): base with both embedders, refiner with bigG as embedder 0; UNet channels as for SD."""
    if XL_BIGG in has or XL_CLIP_L in has:
        family = "sdxl"
    elif REFINER_BIGG in has:
        family = "sdxl-refiner"
    else:  # a UNet alone: the context width tells (2048 = CLIP-L + bigG, 1280 = bigG alone)
        dims = {s[-1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")}
        family = "sdxl" if dims == {2048} else "sdxl-refiner" if dims == {1280} else None
    name = _FAMILY_NAMES[family] if family else "Stable Diffusion XL"
    conv_in = shapes.get(CONV_IN)
    in_ch = conv_in[1] if conv_in is not None and len(conv_in) == 4 else None
    if in_ch is not None and in_ch != 4:
        tag, what = _UNET_INPUTS.get(in_ch, (f"{in_ch}-channel", f"{in_ch}-channel"))
        return Detected(f"sdxl-{tag}", f"a Stable Diffusion XL {what} checkpoint ({in_ch}-channel UNet)",
                        family=family, unsupported=f"SDXL {tag} is not supported yet")
    complete = {"sdxl": XL_CLIP_L in has and XL_BIGG in has, "sdxl-refiner": REFINER_BIGG in has}.get(family, False)
    if not complete:  # no verdict: recognition lists what is missing against the closest known architecture
        return Detected(family or "sdxl", f"a {name} checkpoint without all its text encoders", family=family)
    if VAE not in has:
        return Detected(family, f"a {name} checkpoint without VAE weights", family=family,
                        unsupported="pass --vae PATH (a VAE .safetensors or diffusers folder) to export it",
                        needs_vae=True)
    return Detected(family, f"a {name} checkpoint", family=family)


def _sd(shapes: Shapes, has: set[str], ema: str) -> Detected:
    family = "sd1" if SD1_TEXT in has else "sd2" if SD2_TEXT in has else _family_from_context(shapes)
    name = _FAMILY_NAMES[family]
    conv_in = shapes.get(CONV_IN)
    in_ch = conv_in[1] if conv_in is not None and len(conv_in) == 4 else None
    if in_ch is not None and in_ch != 4:
        tag, what = _UNET_INPUTS.get(in_ch, (f"{in_ch}-channel", f"{in_ch}-channel"))
        return Detected(f"{family or 'sd'}-{tag}", f"a {name} {what} checkpoint ({in_ch}-channel UNet)",
                        family=family, unsupported=f"{tag} is not supported yet", ema=ema)
    if SD1_TEXT not in has and SD2_TEXT not in has:
        # No verdict: recognition lists what is missing against the closest known architecture.
        return Detected(family or "sd", f"a {name} UNet without its text encoder", family=family, ema=ema)
    if VAE not in has:
        return Detected(family, f"a {name} checkpoint without VAE weights", family=family,
                        unsupported="pass --vae PATH (a VAE .safetensors or diffusers folder) to export it",
                        needs_vae=True, ema=ema)
    return Detected(family, f"a {name} checkpoint", family=family, ema=ema)


def _family_from_context(shapes: Shapes) -> str | None:
    dims = {s[-1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")}
    return "sd1" if dims == {768} else "sd2" if dims == {1024} else None


def _vae(keys: list[str]) -> Detected | None:
    stripped = [k.removeprefix(VAE).removeprefix("vae.") for k in keys]
    enc = "encoder.conv_in.weight" in stripped
    dec = "decoder.conv_in.weight" in stripped
    if not (enc or dec):
        return None
    layout = "diffusers" if any(".up_blocks." in k or ".down_blocks." in k for k in stripped) else "original"
    if not enc:
        return Detected("vae-decoder", f"a VAE decoder without its encoder ({layout} layout)",
                        unsupported="decoder-only VAEs are not supported yet")
    return Detected("vae", f"a VAE ({layout} layout), not a whole checkpoint",
                    unsupported="pass it with --vae beside a checkpoint")


def detect_configs(configs: Mapping[str, Any], index: Mapping[str, Any] | None = None) -> Detected:
    """The same answer from component configs (a diffusers folder or ``--config``: text_encoder(s), unet, vae)
    and, for a folder, its ``model_index.json`` (``index``)."""
    index = index or {}
    unet = configs.get("unet") or {}
    cls = str(index.get("_class_name", ""))
    for prefix, kind, what, why in _PIPELINES:
        if cls.startswith(prefix):
            return Detected(kind, what, unsupported=why)
    if "ControlNet" in cls:
        return Detected("controlnet", f"a ControlNet pipeline ({cls})", unsupported="ControlNet is not supported yet")
    if "transformer" in index and "unet" not in index:
        return Detected("transformer", f"a {cls or 'diffusers'} model (a diffusion transformer, not a UNet)",
                        unsupported=f"{cls or 'it'} is not supported")
    if "text_encoder_2" in index or "XL" in cls or unet.get("addition_embed_type") == "text_time":
        return _sdxl_configs(configs, index)
    te = configs.get("text_encoder") or {}
    family = "sd2" if te.get("hidden_act") == "gelu" else "sd1"
    name = _FAMILY_NAMES[family]
    in_ch = unet.get("in_channels", 4)
    if in_ch != 4:
        tag, what = _UNET_INPUTS.get(in_ch, (f"{in_ch}-channel", f"{in_ch}-channel"))
        return Detected(f"{family}-{tag}", f"a {name} {what} model ({in_ch}-channel UNet)", family=family,
                        unsupported=f"{tag} is not supported yet")
    return Detected(family, f"a {name} model", family=family)


def _sdxl_configs(configs: Mapping[str, Any], index: Mapping[str, Any]) -> Detected:
    unet = configs.get("unet") or {}
    components = [c for c in ("text_encoder", "text_encoder_2") if _present(c, configs, index)]
    from sdtrt.checkpoint.archs import time_id_count

    # The refiner: bigG alone, an aesthetic score among its time ids (5 of them, not 6).
    refiner = (components == ["text_encoder_2"] or bool(index.get("requires_aesthetics_score"))
               or time_id_count(dict(configs)) == 5)
    family = "sdxl-refiner" if refiner else "sdxl"
    name = _FAMILY_NAMES[family]
    in_ch = unet.get("in_channels", 4)
    if in_ch != 4:
        tag, what = _UNET_INPUTS.get(in_ch, (f"{in_ch}-channel", f"{in_ch}-channel"))
        return Detected(f"sdxl-{tag}", f"a Stable Diffusion XL {what} model ({in_ch}-channel UNet)", family=family,
                        unsupported=f"SDXL {tag} is not supported yet")
    return Detected(family, f"a {name} model", family=family)


def _present(comp: str, configs: Mapping[str, Any], index: Mapping[str, Any]) -> bool:
    spec = index.get(comp)
    if spec is not None:  # model_index.json: ["transformers", "CLIPTextModel"], or [null, null] for none
        return isinstance(spec, list) and any(x is not None for x in spec)
    return comp in configs


def detect_component_folder(config: Mapping[str, Any]) -> Detected | None:
    """What a folder holding one diffusers component (its ``config.json``, no ``model_index.json``) is, or None."""
    cls = str(config.get("_class_name") or (config.get("architectures") or [""])[0])
    if cls.startswith("ControlNet"):
        return Detected("controlnet", f"a ControlNet ({cls}, diffusers layout)", unsupported="ControlNet is not supported yet")
    if cls == "AutoencoderKL":
        return Detected("vae", "a VAE folder, not a whole checkpoint", unsupported="pass it with --vae beside a checkpoint")
    if cls.startswith("UNet2D"):
        return Detected("unet", f"a UNet only ({cls})", unsupported="load it as part of a diffusers folder")
    if cls.startswith("CLIPText"):
        return Detected("text-encoder", "a text encoder only", unsupported="sdtrt needs a whole checkpoint")
    if cls.endswith("Transformer2DModel"):
        return Detected("transformer", f"a diffusion transformer ({cls}), not a UNet", unsupported=f"{cls} is not supported")
    return None
