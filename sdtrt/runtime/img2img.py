"""img2img as diffusers' StableDiffusionImg2ImgPipeline does it: skip the first ``steps - int(steps * strength)``
evaluations and start from the encoded image noised to the first remaining timestep.

Every scheduler runs it: ``make_tables(config, steps, start)`` gives tables whose rows from ``start`` on are
diffusers' steps after ``set_begin_index(start)``, the multistep solvers' warm-up (PLMS's counter, DPM++'s and
UniPC's lower-order steps, LMS's list of derivatives) restarting at ``start`` as it does after ``set_timesteps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime import schedulers

IMG2IMG_SCHEDULERS: tuple[str, ...] = tuple(schedulers.SCHEDULERS)  # and DDIM with eta, "ddim:eta=X"


def start_index(steps: int, strength: float) -> int:
    """The first evaluation to run, as diffusers' ``get_timesteps``."""
    init = min(int(steps * strength), steps)
    if init == 0:
        raise UsageError(f"strength {strength:g} with {steps} steps leaves no step to run; raise --strength or --steps")
    return steps - init


def check_scheduler(name: str) -> None:
    """``UsageError`` unless ``name`` can start mid-schedule (every registered scheduler can)."""
    if name.split(":")[0] not in IMG2IMG_SCHEDULERS:
        raise UsageError(f"img2img supports the schedulers {', '.join(IMG2IMG_SCHEDULERS)}, not {name!r}")


def noise_coefs(name: str, config: Mapping[str, Any], tables: Any, start: int) -> tuple[float, float]:
    """(a, s) with ``x_start = a * x_0 + s * eps``: the scheduler's ``add_noise`` at evaluation ``start`` of
    ``tables`` (made with this ``start``)."""
    check_scheduler(name)
    return schedulers.add_noise_coefs(name, config, tables, start)


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
