"""Load a single-file Stable Diffusion 1.x / 2.x / XL checkpoint (original CompVis / A1111 / sgm layout), offline.

Steps: read the tensors (safetensors; pickles only on request, and only through ``torch.load(weights_only=True)``)
-> recognise the architecture by converting the key layout with diffusers' own ``single_file_utils`` functions
for each candidate and comparing every key and shape with what the candidate's models expect (shapes only, on
the meta device) -> convert for real, cast to fp32 -> load strictly into modules built from the candidate's
configs. Tokenizers are not part of such files: they come from ``tokenizer_dir``, or ``tokenizer/`` (and SDXL's
``tokenizer_2/``) folders beside the file, or are CLIP's own for CLIP-sized text encoders. Every refusal is a
one-line ``CheckpointError`` naming the file.

Weights are assigned, not copied: fp32 tensors of a ``.safetensors`` file stay in safetensors' private
(copy-on-write) memory map of it, so loading is fast and costs no extra memory; replace such a file by rename
(as ``fsutil`` does), never by rewriting it in place, while a process holds it loaded.
"""

from __future__ import annotations

import functools
import logging
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.checkpoint.archs import (
    FAMILY_COMPONENTS,
    KNOWN_ARCHS,
    arch_spec,
    build_models,
    family_of,
    read_component_configs,
)
from sdtrt.checkpoint.clip_vocab import resolve_tokenizers
from sdtrt.checkpoint.detect import detect_configs, detect_state
from sdtrt.checkpoint.ldm_layout import (
    HF,
    SD1_TEXT_PREFIX,
    TEXT_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    canonical_clip_keys,
    original_key_map,
)
from sdtrt.checkpoint.model import Checkpoint
from sdtrt.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_EMA_PREFIX = "model_ema."
_POSITION_IDS = "text_model.embeddings.position_ids"  # a non-persistent buffer; older files carry it
_TOKEN_EMBEDDING = {HF: "text_model.embeddings.token_embedding.weight", "open_clip": "token_embedding.weight"}
_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL: (time_embed_dim, pooled + time ids)
_FAILED = 1 << 30  # mismatch count of a candidate whose conversion threw: farther than any real count

Shapes = dict[str, dict[str, tuple[int, ...] | None]]  # component -> diffusers key -> shape


@dataclass(frozen=True)
class _Candidate:
    """An architecture a file may be: a known one, or the one described by ``--config``."""

    label: str  # arch name, or the config folder
    name: str | None  # known arch name; None for a config folder
    configs: dict[str, dict[str, Any]]
    family: str
    index: dict[str, Any]  # its model_index.json ({} if none): SDXL's pipeline settings come from it

    @property
    def components(self) -> tuple[str, ...]:
        return FAMILY_COMPONENTS[self.family]


@dataclass(frozen=True)
class _Fit:
    """How far a file is from a candidate: ``count`` mismatched tensors, ``example`` the first one described."""

    candidate: _Candidate
    count: int
    example: str


def load_single_file(
    path: str | Path,
    *,
    config_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    allow_pickle: bool = False,
    vae: str | Path | None = None,
    ema: bool = False,
) -> Checkpoint:
    """Load an original-layout single-file checkpoint into fp32, eval-mode modules.

    First ``detect.detect_state`` names what the file is, and anything sdtrt cannot export (inpainting, LoRA, a
    VAE alone, SD3, ...) is refused with that name, whatever ``config_dir`` says. The architecture is then
    recognised among the known ones of its kind (SD 1.x/2.x: ``tiny-sd1``, ``tiny-sd2``, ``sd15``, ``sd21``;
    SDXL: ``tiny-sdxl``, ``tiny-sdxl-refiner``, ``sdxl``, ``sdxl-refiner``) or, with ``config_dir`` (a
    diffusers-format folder of text encoder/unet/vae/scheduler configs), checked against that one only;
    ``scheduler_config`` (and so the prediction type) and SDXL's ``pipeline_config`` come from the same place. A file with EMA weights
    (``model_ema.*``) loads its regular weights, or the EMA ones with ``ema``; ``vae`` (see ``sdtrt.checkpoint.vae``)
    replaces the file's VAE or supplies a missing one. fp16/bf16 files are cast to fp32. Pickle files (``.ckpt``,
    ``.pt``, ``.pth``, ``.bin``) are refused unless ``allow_pickle``.
    """
    path = Path(path)
    state = _modern_clip_keys(read_state_dict(path, allow_pickle=allow_pickle))
    det = detect_state({k: tuple(v.shape) for k, v in state.items()})
    exportable = det.unsupported is None or (det.needs_vae and vae is not None) or (det.kind == "ema-only" and ema)
    if not exportable:
        raise det.refusal(path)
    if ema and det.ema == "none":
        raise CheckpointError(f"{path}: --ema given, but the file has no EMA weights (model_ema.*)")
    state, notes = _pick_weights(path, state, ema)
    if det.kind == "ema-only":  # now that the EMA UNet is in place, name what it is
        det = detect_state({k: tuple(v.shape) for k, v in state.items()})
        if det.unsupported is not None and not (det.needs_vae and vae is not None):
            raise det.refusal(path)
    vae_config = None
    if vae is not None:
        from sdtrt.checkpoint.vae import check_latents, read_vae

        vae_state, vae_config = read_vae(Path(vae), allow_pickle=allow_pickle)
        conv_in = state.get(_CONV_IN)
        if conv_in is not None:  # the UNet's input channels are the latent channels (4 for what gets this far)
            check_latents(Path(vae), vae_state, int(conv_in.shape[1]))
        state = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)} | vae_state
        notes += (f"VAE from {vae}",)

    xl = (det.family or det.kind).startswith("sdxl")
    candidates = [_config_candidate(Path(config_dir))] if config_dir is not None else _known_candidates(xl)
    cand = _recognise(path, state, candidates)
    if vae is not None:
        from sdtrt.checkpoint.vae import check_scaling

        check_scaling(Path(vae), vae_config, cand.configs["vae"])
    _check_alphas(path, state, cand.configs["scheduler"])
    explicit = Path(tokenizer_dir) if tokenizer_dir is not None else None
    tokenizers = resolve_tokenizers(path, path.parent, explicit, cand.configs, cand.family)
    weights = _to_fp32(path, _convert(state, cand))
    del state
    models = _build_and_load(path, weights, cand)

    arch = cand.name
    if arch is None:
        from sdtrt.checkpoint.diffusers_dir import match_arch

        arch = match_arch(cand.configs)
    from sdtrt.checkpoint.diffusers_dir import pipeline_config

    logger.info("loaded %s (single-file, arch=%s, family=%s)", path, arch, cand.family)
    return Checkpoint(
        source=path,
        format="single-file",
        arch=arch,
        family=cand.family,
        text_encoder=models.get("text_encoder"),
        tokenizer=tokenizers.get("text_encoder"),
        unet=models["unet"],
        vae=models["vae"],
        scheduler_config=cand.configs["scheduler"],
        notes=notes,
        vae_source=Path(vae) if vae is not None else None,
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=tokenizers.get("text_encoder_2"),
        pipeline_config=pipeline_config(cand.family, cand.index),
    )


def _modern_clip_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Old SD 1.x files store CLIP without the ``text_model.`` level (transformers < 4.x names); add it."""
    old = SD1_TEXT_PREFIX + "embeddings."
    if not any(k.startswith((old, SD1_TEXT_PREFIX + "encoder.", SD1_TEXT_PREFIX + "final_layer_norm.")) for k in state):
        return state
    return {
        (SD1_TEXT_PREFIX + "text_model." + k[len(SD1_TEXT_PREFIX):]
         if k.startswith(SD1_TEXT_PREFIX) and not k.startswith(SD1_TEXT_PREFIX + "text_model.") else k): v
        for k, v in state.items()
    }


def _pick_weights(path: Path, state: dict[str, Any], ema: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The UNet weights to load: regular, or (``ema``) the ``model_ema.`` copies, whose names are the UNet's
    without ``model.`` and without dots (``model_ema.diffusion_modelinput_blocks00weight``)."""
    ema_keys = {k for k in state if k.startswith(_EMA_PREFIX)}
    if not ema_keys:
        return state, ()
    rest = {k: v for k, v in state.items() if k not in ema_keys}
    if not ema:
        logger.info("%s: %d EMA tensors (model_ema.*) not used; --ema loads them", path, len(ema_keys))
        return rest, ("EMA weights present: using the regular ones (--ema for the EMA ones)",)
    flat = {k[len(_EMA_PREFIX):]: state[k] for k in ema_keys}
    unet_keys = [k for k in rest if k.startswith(UNET_PREFIX)]
    if not unet_keys:  # an EMA-only file: rebuild the UNet names from the flattened ones
        unet_keys = _unflatten_ema_names(flat)
    picked, missing = {}, []
    for k in unet_keys:
        name = "".join(k.split(".")[1:])
        if name in flat:
            picked[k] = flat[name]
        else:
            missing.append(k)
    if missing:
        raise CheckpointError(f"{path}: --ema: no EMA copy of {len(missing)} UNet tensors (e.g. {missing[0]})")
    out = {k: v for k, v in rest.items() if not k.startswith(UNET_PREFIX)} | picked
    return out, (f"EMA weights: using them for the UNet ({len(picked)} tensors)",)


def _unflatten_ema_names(flat: dict[str, Any]) -> list[str]:
    """UNet keys of the known layouts whose flattened names are in ``flat`` (an EMA-only file)."""
    names = {}
    for cand in _known_candidates(False) + _known_candidates(True):
        lpb = _layers_per_block(cand.configs["unet"])
        for k in original_key_map("unet", _expected_shapes(cand)["unet"], family=cand.family, layers_per_block=lpb).values():
            names.setdefault("".join(k.split(".")[1:]), k)
    return [names[n] for n in flat if n in names]


def _check_alphas(path: Path, state: dict[str, Any], scheduler: dict[str, Any]) -> None:
    """Warn when the file's ``alphas_cumprod`` (the noise schedule it was trained with) is not the scheduler's."""
    import torch

    got = state.get("alphas_cumprod")
    if got is None:
        return
    n = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 0.00085)), float(scheduler.get("beta_end", 0.012))
    if scheduler.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    want = torch.cumprod(1 - betas, 0)
    got = got.to(torch.float64).flatten()
    if got.shape != want.shape or float((got - want).abs().max()) > 1e-4:
        logger.warning("%s: its alphas_cumprod (the noise schedule it was trained with) differs from the scheduler "
                       "config's %s %s..%s over %d steps; images may be off", path,
                       scheduler.get("beta_schedule", "scaled_linear"), start, end, n)


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, or of a pickle (only with ``allow_pickle``, through
    ``torch.load(weights_only=True)``, unwrapping a top-level ``state_dict``). Non-tensor entries are dropped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a single-file checkpoint")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: refusing to load a pickle checkpoint: unpickling can run arbitrary code; convert it to "
                ".safetensors or pass --allow-pickle (loads with torch.load(weights_only=True))"
            )
        return _read_pickle(path)
    raise CheckpointError(
        f"{path}: unsupported checkpoint file type {suffix or '(no extension)'!r} "
        f"(expected .safetensors, or {'/'.join(PICKLE_SUFFIXES)} with --allow-pickle)"
    )


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: all mean a damaged or foreign file
        raise CheckpointError(f"{path}: not a valid safetensors file ({one_line(e)})") from None


def _read_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden objects, RuntimeError/EOFError for damaged files
        raise CheckpointError(
            f"{path}: cannot load pickle checkpoint with torch.load(weights_only=True): {_unpickle_reason(e)}"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning-style wrapper: {"state_dict": ..., "global_step": ..., ...}
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint (holds a {type(obj).__name__}, not a state dict)"
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _unpickle_reason(e: BaseException) -> str:
    # torch's weights_only refusal is a page of advice; the reason is the "WeightsUnpickler error" part.
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\s*\n|$)", str(e), re.S)
    return f"{type(e).__name__}: {' '.join(m.group(1).split())}" if m else one_line(e)


# ---- candidates ---------------------------------------------------------------------------------------------


def _known_candidates(xl: bool) -> list[_Candidate]:
    """The known architectures of SDXL (``xl``) or of SD 1.x/2.x, in ``KNOWN_ARCHS`` order."""
    out = []
    for name in KNOWN_ARCHS:
        spec = arch_spec(name)
        if spec.family.startswith("sdxl") != xl:
            continue
        configs = read_component_configs(spec.config_dir)
        index = _read_index(spec.config_dir)
        out.append(_Candidate(label=name, name=name, configs=configs, family=family_of(configs, index), index=index))
    return out


def _read_index(config_dir: Path) -> dict[str, Any]:
    import json

    f = config_dir / "model_index.json"
    try:
        index = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({one_line(e)})") from None
    return index if isinstance(index, dict) else {}


def _config_candidate(config_dir: Path) -> _Candidate:
    if not config_dir.is_dir():
        raise CheckpointError(f"{config_dir}: config folder not found (expected a diffusers-format folder)")
    configs = read_component_configs(config_dir)
    index = _read_index(config_dir)
    det = detect_configs(configs, index)
    if det.unsupported is not None:  # --config describes a model sdtrt cannot run: refused like the file would be
        raise det.refusal(config_dir)
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(
            f"{config_dir / 'scheduler' / 'scheduler_config.json'}: prediction_type {prediction!r}: "
            "not supported yet (epsilon, v_prediction)"
        )
    family = family_of(configs, index)
    configs = {c: cfg for c, cfg in configs.items() if c in (*FAMILY_COMPONENTS[family], "scheduler")}
    return _Candidate(label=str(config_dir), name=None, configs=configs, family=family, index=index)


# ---- recognition --------------------------------------------------------------------------------------------


def _recognise(path: Path, state: dict[str, Any], candidates: list[_Candidate]) -> _Candidate:
    """The first candidate whose converted keys and shapes equal its models' exactly; else a CheckpointError."""
    import torch

    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}  # shapes only: conversion is free
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    fits: list[_Fit] = []
    for cand in candidates:
        reason = _signature_mismatch(shapes, cand)
        if reason is not None:
            logger.debug("%s: not %s (%s)", path, cand.label, reason)
            continue
        fit = _fit(meta, cand)
        if fit.count == 0:
            logger.debug("%s: recognised as %s", path, cand.label)
            return cand
        fits.append(fit)
    if not fits:  # every candidate failed the cheap check: compare fully, for the closest one's details
        fits = [_fit(meta, cand) for cand in candidates]
    best = min(fits, key=lambda f: f.count)
    if best.count == 0:  # every tensor fits, yet the quick check found a conflict (a tensor the converters skip)
        detail = _signature_mismatch(shapes, best.candidate) or "no difference found"
    elif best.count >= _FAILED:
        detail = best.example
    else:
        detail = f"{best.count} mismatched tensor{'s' if best.count > 1 else ''}, e.g. {best.example}"
    if len(candidates) == 1 and candidates[0].name is None:
        raise CheckpointError(f"{path}: does not match the architecture described by {best.candidate.label} ({detail})")
    raise CheckpointError(
        f"{path}: unknown architecture: matches none of {', '.join(c.label for c in candidates)} "
        f"(closest: {best.candidate.label}, {detail}); pass --config DIR with a diffusers-format folder describing it"
    )


def _signature_mismatch(shapes: dict[str, tuple[int, ...]], cand: _Candidate) -> str | None:
    """Why ``cand`` cannot fit, from a few signature tensors (text widths, UNet conv_in, context size, SDXL's
    pooled + time-id embedding), or None. Only definite conflicts count: a value the configs leave out is not
    checked here."""
    unet = cand.configs["unet"]
    for comp, (prefix, layout) in TEXT_LAYOUTS[cand.family].items():
        token = shapes.get(prefix + _TOKEN_EMBEDDING[layout])
        if token is None or len(token) != 2:
            return f"no {cand.family} {comp} ({prefix}*)"
        width = cand.configs[comp].get("hidden_size")
        if width not in (None, token[1]):
            return f"{comp} width {token[1]}, expected {width}"
    conv_in = shapes.get(_CONV_IN)
    boc = unet.get("block_out_channels")
    if conv_in is None or len(conv_in) != 4:
        return "no UNet conv_in"
    if (boc and conv_in[0] != boc[0]) or conv_in[1] != unet.get("in_channels", conv_in[1]):
        return f"UNet conv_in {conv_in}"
    context = next(
        (s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight")), None
    )
    cross = unet.get("cross_attention_dim")
    if context is not None and isinstance(cross, int) and context[-1] != cross:
        return f"UNet context size {context[-1]}, expected {cross}"
    label = shapes.get(_LABEL_EMB)
    adm = unet.get("projection_class_embeddings_input_dim")
    if label is not None and adm is None:
        return f"UNet label_emb {_fmt(label)}: SDXL-style conditioning"
    if label is None and adm is not None:
        return "no UNet label_emb (SDXL's pooled-text and time-id embedding)"
    if label is not None and len(label) == 2 and label[1] != adm:
        return f"UNet label_emb {_fmt(label)}, expected (*, {adm})"
    return None


def _fit(meta_state: dict[str, Any], cand: _Candidate) -> _Fit:
    expected = _expected_shapes(cand)
    try:
        converted = _convert(meta_state, cand)
    except Exception as e:  # diffusers' converters index freely; a foreign layout can make them throw
        return _Fit(cand, _FAILED, f"its key layout cannot be converted ({one_line(e)})")
    got: Shapes = {
        c: {k: (tuple(t.shape) if t is not None else None) for k, t in converted[c].items()} for c in cand.components
    }
    wrong, missing, unexpected = [], [], []
    lpb = _layers_per_block(cand.configs["unet"])
    for comp in cand.components:
        exp, have = expected[comp], got[comp]
        names = original_key_map(comp, exp, family=cand.family, layers_per_block=lpb)
        for k, shape in exp.items():
            name = names.get(k, f"{comp}.{k}")
            if k not in have:
                missing.append(f"{name}: missing")
            elif have[k] != shape:
                wrong.append(f"{name}: got shape {_fmt(have[k])}, expected {_fmt(shape)}")
        extra = [k for k in have if k not in exp]
        extra_names = original_key_map(comp, extra, family=cand.family, layers_per_block=lpb) if extra else {}
        unexpected += [f"{extra_names.get(k, f'{comp}.{k}')}: unexpected" for k in extra]
    problems = wrong + missing + unexpected
    return _Fit(cand, len(problems), problems[0] if problems else "")


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "none" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def _expected_shapes(cand: _Candidate) -> Shapes:
    return _known_expected_shapes(cand.name) if cand.name is not None else _model_shapes(cand.configs, cand.label)


@functools.cache
def _known_expected_shapes(name: str) -> Shapes:
    return _model_shapes(read_component_configs(arch_spec(name).config_dir), name)


def _model_shapes(configs: dict[str, dict[str, Any]], label: str) -> Shapes:
    import torch

    try:
        with torch.device("meta"):  # shapes without allocating or initialising weights
            models = build_models(configs)
    except Exception as e:  # a config the model classes reject
        raise CheckpointError(f"{label}: cannot build models from the configs: {one_line(e)}") from e
    out: Shapes = {}
    for comp, model in models.items():
        sd = model.state_dict()
        if comp.startswith("text_encoder"):
            sd = canonical_clip_keys(sd)
        out[comp] = {k: tuple(t.shape) for k, t in sd.items()}
    return out


# ---- conversion and loading ---------------------------------------------------------------------------------


def _convert(state: dict[str, Any], cand: _Candidate) -> dict[str, dict[str, Any]]:
    """Original layout -> diffusers layout per component of ``cand`` (text encoder keys canonical,
    ``text_model.``-prefixed), by diffusers' own converters. Works on real and on meta tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    out: dict[str, dict[str, Any]] = {}
    for comp, (prefix, layout) in TEXT_LAYOUTS[cand.family].items():
        if layout == HF:
            mine = {k: v for k, v in state.items() if k.startswith(prefix)}  # not another encoder's HF keys
            text = convert_ldm_clip_checkpoint(mine, remove_prefix=prefix)
        else:
            # text_model.config.hidden_size splits the fused q/k/v when the file has no text_projection (SD 2.x).
            width = cand.configs[comp].get("hidden_size")
            text_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
            text = convert_open_clip_checkpoint(text_model, state, prefix=prefix)
        text.pop(_POSITION_IDS, None)
        out[comp] = text
    unet_config = {"layers_per_block": 2, **cand.configs["unet"]}  # the converter needs it; 2 is diffusers' default
    out["unet"] = convert_ldm_unet_checkpoint(state, unet_config)
    out["vae"] = convert_ldm_vae_checkpoint(state, cand.configs["vae"])
    return out


def _to_fp32(path: Path, weights: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    import torch

    n_cast = 0
    out: dict[str, dict[str, Any]] = {}
    for comp, sd in weights.items():
        out[comp] = {}
        for k, t in sd.items():
            if not t.is_floating_point():
                raise CheckpointError(f"{path}: {comp} tensor {k} has dtype {t.dtype}; expected floating point weights")
            if t.dtype != torch.float32:
                n_cast += 1
                t = t.to(torch.float32)
            out[comp][k] = t.contiguous()
    if n_cast:
        logger.info("%s: cast %d tensors to fp32", path, n_cast)
    return out


def _build_and_load(path: Path, weights: dict[str, dict[str, Any]], cand: _Candidate):
    """Modules built from ``cand.configs`` (on the meta device: no wasted random init) with ``weights`` assigned
    strictly; falls back to a regular CPU build if a module keeps state the weights do not cover."""
    import torch

    with torch.device("meta"):
        models = build_models(cand.configs)
    for comp, model in models.items():
        _load_strict(path, comp, model, weights[comp], assign=True)
        if not _materialize_buffers(model):
            logger.debug("%s: %s has unknown non-persistent buffers; building it on the CPU", path, comp)
            models = build_models(cand.configs)
            for c, m in models.items():
                _load_strict(path, c, m, weights[c], assign=False)
            break
    return {c: m.eval() for c, m in models.items()}


def _load_strict(path: Path, comp: str, model, weights: dict[str, Any], *, assign: bool) -> None:
    if comp.startswith("text_encoder") and not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers >= 5: CLIPTextModel's own keys have no text_model. prefix.
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: {comp} weights do not fit the model: {', '.join(parts)} tensors")
    try:
        model.load_state_dict(weights, strict=True, assign=assign)
    except RuntimeError as e:  # shape mismatches; keys were checked above
        raise CheckpointError(f"{path}: {comp} weights do not fit the model: {one_line(e)}") from e


def _materialize_buffers(model) -> bool:
    """Recreate non-persistent buffers left on the meta device; False if one of unknown kind remains."""
    import torch

    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        if attr != "position_ids":  # CLIP's (1, n) arange is the only such buffer in SD models
            return False
        owner = model.get_submodule(owner_name)
        value = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape)
        owner.register_buffer(attr, value, persistent=False)
    return True


def _layers_per_block(unet_config: dict[str, Any]) -> int:
    n = unet_config.get("layers_per_block", 2)
    return int(n[0] if isinstance(n, (list, tuple)) else n)

