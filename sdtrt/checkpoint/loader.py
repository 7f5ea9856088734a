"""One entry point for every checkpoint kind: a diffusers folder or a single file (CompVis / A1111 layout)."""

from __future__ import annotations

import os
from pathlib import Path

from sdtrt.checkpoint.model import Checkpoint
from sdtrt.errors import CheckpointError, UsageError


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    vae: str | os.PathLike | None = None,
    ema: bool = False,
) -> Checkpoint:
    """Load a checkpoint offline: a folder as diffusers format, a file as a single-file checkpoint.

    ``config_dir`` (component configs for a single file of a custom architecture) only applies to files;
    ``tokenizer_dir`` replaces the checkpoint's tokenizer; ``allow_pickle`` permits ``.ckpt`` / ``.bin`` weights;
    ``vae`` (a VAE file or diffusers folder) replaces or supplies the VAE; ``ema`` takes a file's EMA weights.
    """
    vae_path = Path(vae).expanduser() if vae is not None else None
    path = Path(path).expanduser()
    tok = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else None
    if path.is_dir():
        if config_dir is not None:
            raise UsageError(
                f"{path}: a config folder only applies to single-file checkpoints, not to a diffusers folder"
            )
        from sdtrt.checkpoint.diffusers_dir import load_diffusers_dir

        if ema:
            raise UsageError(f"{path}: --ema applies to single-file checkpoints; a diffusers folder holds one set of weights")
        return load_diffusers_dir(path, tok, allow_pickle=allow_pickle, vae=vae_path)
    if path.is_file():
        from sdtrt.checkpoint.single_file import load_single_file  # written alongside; imported only when needed

        cfg = Path(config_dir).expanduser() if config_dir is not None else None
        return load_single_file(path, config_dir=cfg, tokenizer_dir=tok, allow_pickle=allow_pickle, vae=vae_path,
                                ema=ema)
    if path.exists():
        raise CheckpointError(f"{path}: neither a file nor a folder")
    raise CheckpointError(f"{path}: no such file or directory")
