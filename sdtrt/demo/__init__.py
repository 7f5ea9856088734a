"""The demo checkpoint: a toy-size Stable Diffusion trained by ``tools/train_demo_model.py`` on rendered
``a {colour} {shape} on a {colour} background`` images, shipped as package data in ``checkpoint/``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sdtrt.errors import CheckpointError
from sdtrt.fsutil import atomic_dir

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
_REQUIRED = ("model_index.json", "tokenizer/vocab.json", "text_encoder/config.json", "unet/config.json",
             "vae/config.json", "scheduler/scheduler_config.json")


def init_demo(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the shipped demo checkpoint to ``out_dir`` as a diffusers-format folder (atomically); return it.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; so is an installation without the weights.
    """
    out_dir = Path(out_dir)
    missing = [f for f in _REQUIRED if not (CHECKPOINT_DIR / f).is_file()]
    weights = sorted(CHECKPOINT_DIR.glob("*/*.safetensors"))
    if missing or len(weights) < 3:
        raise CheckpointError(
            f"{CHECKPOINT_DIR}: the demo checkpoint is incomplete in this installation "
            f"({', '.join(missing) or 'weights missing'}); reinstall sdtrt or run tools/train_demo_model.py"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: folder exists and is not empty (pass --overwrite to replace it)")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(CHECKPOINT_DIR, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    logger.info("init_demo: wrote %s", out_dir)
    return out_dir
