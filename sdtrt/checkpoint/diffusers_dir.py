"""Load a diffusers-format Stable Diffusion 1.x / 2.x / XL (base or refiner) folder, offline, into a ``Checkpoint``.

Every way a folder can be wrong (missing parts, corrupt weights, unsupported variants) is reported as a one-line
``CheckpointError`` naming the file or folder, before or instead of a traceback from diffusers/transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from sdtrt.checkpoint.archs import (
    FAMILY_COMPONENTS,
    KNOWN_ARCHS,
    TEXT_ENCODERS,
    arch_spec,
    family_of,
    read_component_configs,
    time_id_count,
)
from sdtrt.checkpoint.clip_vocab import resolve_tokenizers
from sdtrt.checkpoint.detect import detect_component_folder, detect_configs
from sdtrt.checkpoint.model import Checkpoint
from sdtrt.checkpoint.random_init import ARCH_FILE
from sdtrt.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)

COMPONENT_DIRS = ("text_encoder", "unet", "vae", "scheduler")  # SD 1.x/2.x; SDXL: FAMILY_COMPONENTS + scheduler
_WEIGHT_STEMS = {"text_encoder": "model", "text_encoder_2": "model", "unet": "diffusion_pytorch_model",
                 "vae": "diffusion_pytorch_model"}
# model_index.json settings (not components) the runtime needs, with the defaults of diffusers' SDXL pipelines.
PIPELINE_SETTINGS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}

# Config keys that fix the weights' shapes and the graph; the rest (sample_size, upcast_attention, scaling
# factors, ...) may differ between checkpoints of one architecture.
_ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "text_encoder": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
    ),
    "unet": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "down_block_types",
        "mid_block_type",
        "up_block_types",
        "layers_per_block",
        "attention_head_dim",
        "num_attention_heads",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "use_linear_projection",
        "only_cross_attention",
        "norm_num_groups",
    ),
    "vae": (
        "in_channels",
        "out_channels",
        "latent_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "norm_num_groups",
    ),
}


def load_diffusers_dir(
    path: Path, tokenizer_dir: Path | None = None, *, allow_pickle: bool = False, vae: Path | None = None
) -> Checkpoint:
    """Load a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``, and the family's text
    encoders and tokenizers: ``text_encoder/`` + ``tokenizer/`` for SD 1.x/2.x, both of those and
    ``text_encoder_2/`` + ``tokenizer_2/`` for SDXL base, the latter two alone for the SDXL refiner) as fp32
    eval-mode modules, from local files only.

    ``tokenizer_dir`` replaces (or stands in for a missing) ``tokenizer/`` (SDXL: a folder holding ``tokenizer/``
    and/or ``tokenizer_2/``); without either, a CLIP-sized text encoder gets CLIP's own tokenizer. ``vae`` (a VAE
    file or folder) replaces ``vae/``. Pickle weights (``.bin``) are refused unless ``allow_pickle``. ``arch`` is
    the known architecture the configs match, or ``None``; ``pipeline_config`` holds SDXL's
    ``force_zeros_for_empty_prompt`` and ``requires_aesthetics_score`` (diffusers' defaults where absent).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    _check_folder(path)
    index = _read_json(path / "model_index.json")
    det = _check_pipeline(path, index)
    needed = (*FAMILY_COMPONENTS.get(det.family or "sd1", FAMILY_COMPONENTS["sd1"]), "scheduler")
    for comp in needed:
        if not (path / comp).is_dir():
            raise CheckpointError(
                f"{path / comp}: missing {comp} folder (a diffusers checkpoint needs {', '.join(_sorted(needed))})"
            )
    configs = {c: cfg for c, cfg in read_component_configs(path).items() if c in needed}
    family = _check_supported(path, configs, index)
    arch = match_arch(configs, hint=_read_arch_hint(path))

    tokenizers = resolve_tokenizers(path, path, tokenizer_dir, configs, family)
    if vae is not None:  # checked before any model is loaded
        from sdtrt.checkpoint.vae import build_vae, check_vae, read_vae

        vae_state, vae_config = read_vae(vae, allow_pickle=allow_pickle)
        check_vae(vae, vae_state, vae_config, configs["vae"])
    comps = [c for c in FAMILY_COMPONENTS[family] if not (c == "vae" and vae is not None)]
    weights = {comp: _find_weights(path / comp, comp, allow_pickle) for comp in comps}
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
               "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    models = {comp: _load_component(path / comp, classes[comp], *weights[comp]) for comp in comps}
    notes: tuple[str, ...] = ()
    if vae is not None:
        models["vae"] = build_vae(vae, vae_state, configs["vae"])
        notes = (f"VAE from {vae}",)
    for model in models.values():
        if model.dtype != torch.float32:  # fp16 variants
            model.to(torch.float32)
        model.eval()
    logger.info("loaded %s (diffusers, arch=%s, family=%s)", path, arch, family)
    return Checkpoint(
        source=path,
        format="diffusers",
        arch=arch,
        family=family,
        text_encoder=models.get("text_encoder"),
        tokenizer=tokenizers.get("text_encoder"),
        unet=models["unet"],
        vae=models["vae"],
        scheduler_config=configs["scheduler"],
        notes=notes,
        vae_source=vae,
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=tokenizers.get("text_encoder_2"),
        pipeline_config=pipeline_config(family, index),
    )


def pipeline_config(family: str, index: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json``'s settings the runtime needs: for SDXL families ``force_zeros_for_empty_prompt`` and
    ``requires_aesthetics_score`` (bools; diffusers' pipeline defaults, True and False, where absent); {} for SD."""
    if not family.startswith("sdxl"):
        return {}
    return {k: bool(index[k]) if index.get(k) is not None else default for k, default in PIPELINE_SETTINGS.items()}


def _sorted(comps: tuple[str, ...]) -> list[str]:
    order = ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
    return sorted(comps, key=order.index)


def match_arch(configs: dict[str, dict[str, Any]], hint: str | None = None) -> str | None:
    """The known architecture whose configs equal ``configs`` on the architecture-defining keys (text encoders
    present or not, each compared), else ``None``.

    ``hint`` (from ``sdtrt_arch.json``) is tried first.
    """
    order = ([hint] if hint in KNOWN_ARCHS else []) + [a for a in KNOWN_ARCHS if a != hint]
    key = _arch_key(configs)
    for name in order:
        if _known_arch_key(name) == key:
            return name
    if hint is not None:
        logger.warning("%s says arch %r, but the component configs do not match it", ARCH_FILE, hint)
    return None


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a diffusers checkpoint folder (it is a file)")
    if not (path / "model_index.json").is_file():
        hint = ""
        if any(path.glob("*.safetensors")) or any(path.glob("*.ckpt")):
            hint = " (for a single-file checkpoint, pass the .safetensors/.ckpt file itself)"
        component = _component_folder(path)
        if component is not None:
            raise component.refusal(path)
        raise CheckpointError(f"not a diffusers checkpoint folder: {path} has no model_index.json{hint}")


def _component_folder(path: Path):
    """A folder of one diffusers model (``config.json``, no ``model_index.json``), named; None otherwise."""
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return detect_component_folder(config) if isinstance(config, dict) else None


def _read_json(f: Path) -> dict[str, Any]:
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return obj


def _check_pipeline(path: Path, index: dict[str, Any]):
    """What ``model_index.json`` says the folder is (``detect.Detected``); refuses what sdtrt cannot run."""
    name = index.get("_class_name", "?")
    det = detect_configs({}, index)
    if det.unsupported is not None:
        raise det.refusal(path)
    want = FAMILY_COMPONENTS.get(det.family or "sd1", FAMILY_COMPONENTS["sd1"])
    missing = [c for c in want if not isinstance(index.get(c), list) or not any(index[c])]
    if missing:
        raise CheckpointError(
            f"{path / 'model_index.json'}: {name} has no {', '.join(missing)}: not a Stable Diffusion checkpoint"
        )
    return det


def _check_supported(path: Path, configs: dict[str, dict[str, Any]], index: dict[str, Any]) -> str:
    """Refuse what sdtrt cannot run, naming the config file; return the family."""
    for comp, cfg in configs.items():
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{_config_file(path, comp)}: expected a JSON object")
    unet, vae, unet_cfg, vae_cfg = configs["unet"], configs["vae"], _config_file(path, "unet"), _config_file(path, "vae")
    sched_cfg = _config_file(path, "scheduler")
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{sched_cfg}: prediction_type {prediction!r}: not supported yet (epsilon, v_prediction)")
    for comp in TEXT_ENCODERS:
        te = configs.get(comp)
        if te is not None and te.get("model_type", "clip_text_model") != "clip_text_model":
            raise CheckpointError(f"{_config_file(path, comp)}: text encoder model_type {te.get('model_type')!r}: "
                                  "only CLIP text encoders are supported")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{unet_cfg}: {unet['_class_name']} is not supported yet (only UNet2DConditionModel)")
    det = detect_configs(configs, index)
    if det.unsupported is not None:
        raise det.refusal(path)
    if unet.get("out_channels", 4) != 4:
        raise CheckpointError(f"{unet_cfg}: unet has out_channels={unet['out_channels']}: not supported yet")
    family = family_of(configs, index)
    xl = family.startswith("sdxl")
    for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if unet.get(k) is not None and not (xl and k == "addition_embed_type" and unet[k] == "text_time"):
            raise CheckpointError(f"{unet_cfg}: unet uses {k}={unet[k]!r} (extra conditioning): not supported yet")
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{vae_cfg}: {vae['_class_name']} is not supported yet (only AutoencoderKL)")
    if vae.get("latent_channels", 4) != 4:
        raise CheckpointError(f"{vae_cfg}: vae has latent_channels={vae['latent_channels']}: not supported yet")
    encoders = [c for c in FAMILY_COMPONENTS[family] if c in TEXT_ENCODERS]
    hidden = [configs[c].get("hidden_size") for c in encoders]
    cross = unet.get("cross_attention_dim")
    if not xl and hidden[0] != cross:
        raise CheckpointError(
            f"{path}: unet cross_attention_dim={cross} does not match text_encoder hidden_size={hidden[0]}: "
            "mismatched components"
        )
    if xl:
        _check_sdxl(path, configs, family, encoders, hidden)
    return family


def _check_sdxl(path: Path, configs: dict[str, dict[str, Any]], family: str, encoders: list[str],
                hidden: list[Any]) -> None:
    """SDXL's UNet reads the text encoders' hidden states concatenated, and bigG's pooled output + time ids."""
    unet = configs["unet"]
    cross = unet.get("cross_attention_dim")
    if not all(isinstance(h, int) for h in hidden) or sum(hidden) != cross:
        sizes = " + ".join(f"{c} hidden_size={h}" for c, h in zip(encoders, hidden, strict=True))
        raise CheckpointError(f"{path}: unet cross_attention_dim={cross} does not match {sizes}: mismatched components")
    want = 5 if family == "sdxl-refiner" else 6
    if time_id_count(configs) != want:
        raise CheckpointError(
            f"{_config_file(path, 'unet')}: unet projection_class_embeddings_input_dim="
            f"{unet.get('projection_class_embeddings_input_dim')} is not text_encoder_2 projection_dim="
            f"{configs['text_encoder_2'].get('projection_dim')} + {want} time ids x addition_time_embed_dim="
            f"{unet.get('addition_time_embed_dim')}: mismatched components"
        )


def _config_file(path: Path, comp: str) -> Path:
    return path / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")


def _read_arch_hint(path: Path) -> str | None:
    f = path / ARCH_FILE
    if not f.is_file():
        return None
    try:
        arch = json.loads(f.read_text()).get("arch")
    except (OSError, ValueError, AttributeError):
        logger.warning("%s: unreadable, ignored", f)
        return None
    return arch if isinstance(arch, str) else None


def _find_weights(comp_dir: Path, comp: str, allow_pickle: bool) -> tuple[Path, str | None, bool]:
    """(file to name in errors, variant, use_safetensors) for a component; safetensors files are checked here."""
    stem = _WEIGHT_STEMS[comp]
    for variant in (None, "fp16"):
        v = f".{variant}" if variant else ""
        single, sharded = comp_dir / f"{stem}{v}.safetensors", comp_dir / f"{stem}.safetensors.index{v}.json"
        if single.is_file():
            _check_safetensors(single)
            return single, variant, True
        if sharded.is_file():
            for shard in _shards(sharded):
                _check_safetensors(shard)
            return sharded, variant, True
    for variant in (None, "fp16"):
        v = f".{variant}" if variant else ""
        for f in (comp_dir / f"{stem}{v}.bin", comp_dir / f"{stem}.bin.index{v}.json"):
            if f.is_file():
                if not allow_pickle:
                    raise CheckpointError(
                        f"{f}: pickle-format weights are not loaded by default; convert to safetensors, "
                        "or pass --allow-pickle if you trust the file"
                    )
                return f, variant, False
    raise CheckpointError(f"{comp_dir}: no {comp} weights ({stem}.safetensors not found)")


def _shards(index_file: Path) -> list[Path]:
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no weight_map")
    shards = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing shard listed in {index_file.name}")
    return shards


def _check_safetensors(f: Path) -> None:
    """Read the header (cheap): catches truncated, empty and non-safetensors files with a clear message."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as st:
            n = len(list(st.keys()))
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError... for bad files
        raise CheckpointError(f"{f}: not a valid safetensors file, truncated or corrupt ({one_line(e)})") from None
    if n == 0:
        raise CheckpointError(f"{f}: safetensors file holds no tensors")


def _load_component(comp_dir: Path, cls: type, weights: Path, variant: str | None, use_safetensors: bool):
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": use_safetensors, "output_loading_info": True}
    if variant is not None:
        kwargs["variant"] = variant
    if cls.__module__.startswith("diffusers"):
        # Without accelerate, diffusers warns and falls back to low_cpu_mem_usage=False anyway.
        kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    try:
        model, info = cls.from_pretrained(str(comp_dir), **kwargs)
    except Exception as e:  # diffusers/transformers/safetensors/torch raise many types for bad weights
        raise CheckpointError(f"{weights}: cannot load {comp_dir.name} weights ({one_line(e)})") from e
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"{len(missing)} missing" if missing else f"{len(mismatched)} wrongly shaped"
        first = (missing or mismatched)[0]
        raise CheckpointError(
            f"{weights}: {what} {comp_dir.name} tensors (e.g. {first}): weights do not match {comp_dir.name}/config.json"
        )
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids")]
    if unexpected:
        logger.warning("%s: %d unexpected tensors ignored (e.g. %s)", weights, len(unexpected), unexpected[0])
    return model


def _arch_key(configs: dict[str, dict[str, Any]]) -> tuple:
    """The architecture-defining part of ``configs``, with defaults filled in and per-block values expanded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = []
    for comp, defaults in (
        ("text_encoder", _clip_text_defaults()),
        ("text_encoder_2", _clip_text_defaults()),
        ("unet", _init_defaults(UNet2DConditionModel)),
        ("vae", _init_defaults(AutoencoderKL)),
    ):
        if comp not in configs:  # a text encoder the family does not have
            out.append(None)
            continue
        keys = _ARCH_KEYS["text_encoder"] + (("projection_dim",) if comp == "text_encoder_2" else ())
        keys = keys if comp in TEXT_ENCODERS else _ARCH_KEYS[comp]
        cfg = {k: _listify(configs[comp].get(k, defaults.get(k))) for k in keys}
        if comp == "unet":
            n = len(cfg["down_block_types"] or [])
            # diffusers' SD UNet names the head count attention_head_dim; num_attention_heads falls back to it.
            if cfg["num_attention_heads"] is None:
                cfg["num_attention_heads"] = cfg["attention_head_dim"]
            for k in (
                "attention_head_dim",
                "num_attention_heads",
                "transformer_layers_per_block",
                "only_cross_attention",
            ):
                if not isinstance(cfg[k], list):
                    cfg[k] = [cfg[k]] * n
        out.append(tuple(sorted((k, json.dumps(v)) for k, v in cfg.items())))
    return tuple(out)


@functools.cache
def _known_arch_key(name: str) -> tuple:
    return _arch_key(read_component_configs(arch_spec(name).config_dir))


@functools.cache
def _init_defaults(cls: type) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@functools.cache
def _clip_text_defaults() -> dict[str, Any]:
    from transformers import CLIPTextConfig

    return CLIPTextConfig().to_dict()


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v

