"""Random-weight checkpoints of the known architectures, for tests and benchmarks without downloads.

Weights come from the models' own initialisers (diffusers: PyTorch's default ``kaiming_uniform``-style init;
transformers' CLIP: normal with ``initializer_range`` and depth-scaled projections). That keeps activations of
order one through a whole Stable Diffusion run: the text encoder ends in a LayerNorm, the UNet and VAE blocks are
GroupNorm'd and residual, and the pipeline clamps the decoded image. ``tests/checkpoint/test_random_init.py``
checks the magnitudes of every stage of a tiny run, so no extra weight scaling is applied.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sdtrt import __version__
from sdtrt.checkpoint.archs import arch_spec, build_models, read_component_configs
from sdtrt.checkpoint.clip_vocab import CLIP_VOCAB_SIZE, clip_tokenizer, pad_token
from sdtrt.checkpoint.tokenizer import write_generated_tokenizer
from sdtrt.errors import CheckpointError
from sdtrt.fsutil import atomic_dir

logger = logging.getLogger(__name__)

ARCH_FILE = "sdtrt_arch.json"
TOKENIZER_SEED = 0  # the tokenizer depends on the architecture only, not on the weight seed


def init_random(
    out_dir: Path,
    arch: str,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a diffusers-format checkpoint folder of ``arch`` with random weights seeded by ``seed``; return it.

    The folder has ``model_index.json``, ``text_encoder/`` + ``tokenizer/`` (SD, SDXL base) and ``text_encoder_2/``
    + ``tokenizer_2/`` (SDXL base and refiner), ``unet/``, ``vae/``, ``scheduler/`` and ``sdtrt_arch.json``, as
    diffusers' own pipelines load them. Tokenizers are CLIP's for the full-size archs, generated ones of the text
    encoder's small vocabulary for the tiny ones; each pads as the real model's does (``clip_vocab.pad_token``).
    Weights are fp32 safetensors, identical for identical seeds. It is
    written atomically: on failure nothing is left behind. An existing non-empty ``out_dir`` is an error unless
    ``overwrite``. ``progress`` is called with a short description at each stage (full-size archs take about
    30 s, 5 GB of RAM and 4 GB of disk on two CPU cores; full-size SDXL about 14 GB of RAM and 14 GB of disk (fp32)).
    """
    import torch

    spec = arch_spec(arch)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir}: folder exists and is not empty (pass --overwrite to replace it)"
        )
    configs = read_component_configs(spec.config_dir)

    def stage(msg: str) -> None:
        logger.info("init_random %s: %s", arch, msg)
        if progress is not None:
            progress(msg)

    with atomic_dir(out_dir) as tmp:
        stage("initialising weights")
        # fork_rng: seed deterministically without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models = build_models(configs)
        for name in list(models):
            stage(f"saving {name}")
            models.pop(name).save_pretrained(tmp / name)  # safetensors is the default in both libraries
            if not any((tmp / name).glob("*.safetensors")):
                raise CheckpointError(f"{tmp / name}: {name} was not saved as safetensors")
        stage("writing scheduler, tokenizer and model_index.json")
        (tmp / "scheduler").mkdir()
        shutil.copyfile(
            spec.config_dir / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json"
        )
        shutil.copyfile(spec.config_dir / "model_index.json", tmp / "model_index.json")
        for te, tok_dir in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if te not in configs:
                continue
            vocab_size = configs[te]["vocab_size"]
            if vocab_size == CLIP_VOCAB_SIZE:  # full-size archs: CLIP's real tokenizer, as the real models have
                clip_tokenizer(spec.family, te).save_pretrained(str(tmp / tok_dir))
            else:  # tiny archs embed a small vocabulary: a generated tokenizer of that size
                write_generated_tokenizer(tmp / tok_dir, vocab_size, TOKENIZER_SEED,
                                          pad_token=pad_token(spec.family, te))
        meta = {"arch": spec.name, "family": spec.family, "seed": seed, "made_by": f"sdtrt {__version__} init_random"}
        (tmp / ARCH_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    stage(f"wrote {out_dir}")
    return out_dir
