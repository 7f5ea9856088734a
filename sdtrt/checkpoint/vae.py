"""``--vae PATH``: another VAE for a checkpoint (a fine-tuned VAE, or the one a VAE-less file needs).

PATH is a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or one ``.safetensors``
file in the original (``encoder.down.0.block...``, optionally ``first_stage_model.``-prefixed) or diffusers
(``encoder.down_blocks...``) key layout; a whole checkpoint's VAE may be taken too. Every form becomes the
original layout under ``first_stage_model.`` (so a single-file checkpoint loads it as its own) and is checked
against the model: latent channels, and a folder's ``scaling_factor`` against the model's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sdtrt.checkpoint.detect import VAE, detect_state
from sdtrt.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_vae(path: Path, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(state dict in original layout under first_stage_model., the folder's config or None)``."""
    from sdtrt.checkpoint.ldm_layout import vae_to_original
    from sdtrt.checkpoint.single_file import read_state_dict

    path = Path(path)
    config = None
    if path.is_dir():
        cfg_file, weights = path / "config.json", path / _DIFFUSERS_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise CheckpointError(f"{path}: not a diffusers VAE folder (needs config.json and {_DIFFUSERS_WEIGHTS})")
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({one_line(e)})") from None
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{cfg_file}: a {config['_class_name']}, not an AutoencoderKL VAE")
        state = read_state_dict(weights)
    elif path.exists():
        state = read_state_dict(path, allow_pickle=allow_pickle)
    else:
        raise CheckpointError(f"{path}: no such VAE file or folder")
    det = detect_state({k: tuple(v.shape) for k, v in state.items()})
    if det.kind not in ("vae",) and not any(k.startswith(VAE) for k in state):
        raise CheckpointError(f"{path}: {det.description}, not a VAE")
    if any(k.startswith(VAE) for k in state):
        state = {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}  # a whole checkpoint's VAE
    state = {k.removeprefix("vae."): v for k, v in state.items()}
    if any(".down_blocks." in k or ".up_blocks." in k for k in state):
        try:
            return vae_to_original(state), config
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return {VAE + k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                   "post_quant_conv."))}, config


def check_vae(path: Path, state: dict[str, Any], config: dict[str, Any] | None, model_vae: dict[str, Any]) -> None:
    """Refuse a VAE whose latent channels or scaling factor differ from the model's."""
    check_latents(path, state, int(model_vae.get("latent_channels", 4)))
    check_scaling(path, config, model_vae)


def check_latents(path: Path, state: dict[str, Any], want: int) -> None:
    """Refuse a VAE (original layout) whose latents do not have the ``want`` channels the UNet works in."""
    conv = state.get(VAE + "decoder.conv_in.weight")
    if conv is None:
        raise CheckpointError(f"{path}: no decoder.conv_in weight: not a complete VAE")
    got = int(conv.shape[1])
    if got != want:
        raise CheckpointError(f"{path}: a VAE with {got} latent channels; this model's UNet works in {want}")


def check_scaling(path: Path, config: dict[str, Any] | None, model_vae: dict[str, Any]) -> None:
    """Refuse a VAE folder whose ``scaling_factor`` is not the model's (a file carries none: the model's applies)."""
    if config is not None:
        mine, theirs = model_vae.get("scaling_factor", 0.18215), config.get("scaling_factor", 0.18215)
        if abs(float(mine) - float(theirs)) > 1e-6:
            raise CheckpointError(
                f"{path}: VAE scaling_factor {theirs} differs from the model's {mine} (a VAE of another model family?)"
            )


def build_vae(path: Path, state: dict[str, Any], vae_config: dict[str, Any]):
    """An fp32 eval-mode ``AutoencoderKL`` of ``vae_config`` holding ``state`` (original layout)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    weights = {k: v.to(torch.float32) for k, v in convert_ldm_vae_checkpoint(state, vae_config).items()}
    vae = AutoencoderKL.from_config(vae_config)
    try:
        vae.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: VAE weights do not fit the model's VAE: {one_line(e)}") from None
    return vae.eval()
