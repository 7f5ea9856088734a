"""img2img as diffusers' StableDiffusionImg2ImgPipeline does it: skip the first ``steps - int(steps * strength)``
evaluations and start from the encoded image noised to the first remaining timestep.

Supported for the schedulers whose steps do not depend on earlier steps (DDIM, Euler, Euler ancestral, LCM): there,
starting at row ``start`` of the txt2img tables is exactly diffusers' ``set_begin_index``. The multistep solvers
(PLMS, DPM++, LMS, UniPC) restart their warm-up at the begin index, which their tables do not encode yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime import schedulers
from sdtrt.runtime.schedulers import schedule

IMG2IMG_SCHEDULERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "lcm")
_VP = ("ddim", "lcm")  # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
_VE = ("euler", "euler_a")  # x = x_0 + sigma eps


def start_index(steps: int, strength: float) -> int:
    """The first evaluation to run, as diffusers' ``get_timesteps``."""
    init = min(int(steps * strength), steps)
    if init == 0:
        raise UsageError(f"strength {strength:g} with {steps} steps leaves no step to run; raise --strength or --steps")
    return steps - init


def check_scheduler(name: str) -> None:
    if name not in IMG2IMG_SCHEDULERS:
        raise UsageError(f"img2img supports the schedulers {', '.join(IMG2IMG_SCHEDULERS)} for now, not {name!r}")


def noise_coefs(name: str, config: Mapping[str, Any], tables: Any, start: int) -> tuple[float, float]:
    """(a, s) with ``x_start = a * x_0 + s * eps``: the scheduler's ``add_noise`` at evaluation ``start``."""
    check_scheduler(name)
    sched = schedulers.get_scheduler(name)
    if name in _VP:
        cfg = schedule.read_config({**config, **sched.overrides}, sched.module.DEFAULTS, name)
        alpha_bar = schedule.alphas_cumprod(cfg, name)
        t = int(round(float(tables.timesteps[start])))
        return math.sqrt(alpha_bar[t]), math.sqrt(1.0 - alpha_bar[t])
    c_in = float(tables.c_in[start])  # 1 / sqrt(sigma^2 + 1)
    return 1.0, math.sqrt(1.0 / c_in**2 - 1.0)


def prepare_image(image: Any, width: int, height: int) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (height, width, 3) uint8, resized with Lanczos as diffusers does."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UsageError("init image array must be (H, W, 3) uint8")
        if image.shape[:2] == (height, width):
            return image  # already prepared (Pipeline.validate does it once per request)
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UsageError("init image must be a PIL image or an (H, W, 3) uint8 array")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)
