"""A small SD 1.x checkpoint for the CPU benchmark: between tiny-sd1 and SD 1.5 in UNet cost.

    python benchmarks/init_small.py DIR [--seed 0]

tiny-sd1's text encoder, tokenizer, VAE and scheduler (``sdtrt init-random --arch tiny-sd1``) with a wider UNet of
three levels, 64/128/256 channels (tiny-sd1: 32/64/64; SD 1.5: four levels, 320/640/1280/1280), random weights.
Not an sdtrt architecture: it is a diffusers folder whose configs describe it, which ``sdtrt export`` takes as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from sdtrt.checkpoint.random_init import init_random

UNET = {"block_out_channels": [64, 128, 256]}  # everything else as tiny-sd1's UNet


def init_small(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import UNet2DConditionModel

    out_dir = Path(out_dir)
    init_random(out_dir, "tiny-sd1", seed, overwrite=True)
    config = {k: v for k, v in json.loads((out_dir / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**config, **UNET})
    shutil.rmtree(out_dir / "unet")
    unet.save_pretrained(out_dir / "unet")
    meta_path = out_dir / "sdtrt_arch.json"
    meta = json.loads(meta_path.read_text())
    meta.update(arch="small-sd1", made_by=meta["made_by"] + " + benchmarks/init_small.py", unet=UNET)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(init_small(a.dir, a.seed))


if __name__ == "__main__":
    main()
