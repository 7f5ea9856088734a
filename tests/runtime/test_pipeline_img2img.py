"""img2img's start step against diffusers' own rule (StableDiffusionImg2ImgPipeline.get_timesteps), without models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.runtime import img2img
from sdtrt.runtime.schedulers import DIFFUSERS_CLASSES, get_scheduler

CONFIG = json.loads(
    (Path(__file__).resolve().parents[2] / "sdtrt/checkpoint/configs/sd15/scheduler/scheduler_config.json").read_text()
)

# steps * strength with a fractional part >= 0.5 (7.5, 3.5, 13.8, 1.5, 22.5, 6.6): diffusers truncates
# (int), so round() would start one step earlier on every one of these.
CASES = [(10, 0.75), (10, 0.35), (20, 0.69), (3, 0.5), (30, 0.75), (11, 0.6), (10, 0.6), (25, 1.0), (1, 1.0)]


def _diffusers_start(name: str, steps: int, strength: float, config: dict = CONFIG) -> tuple[torch.Tensor, int, Any]:
    """diffusers' get_timesteps on a scheduler of ours' class: (the timesteps it runs, how many, the scheduler)."""
    sched = getattr(diffusers, DIFFUSERS_CLASSES[name]).from_config({**config, **get_scheduler(name).overrides})
    sched.set_timesteps(steps)
    timesteps, n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    return timesteps, n, sched


@pytest.mark.parametrize("name", img2img.IMG2IMG_SCHEDULERS)
@pytest.mark.parametrize(("steps", "strength"), CASES)
def test_start_index_is_diffusers_get_timesteps(name, steps, strength):
    timesteps, n, _ = _diffusers_start(name, steps, strength)
    start = img2img.start_index(steps, strength)
    assert steps - start == n, f"steps={steps} strength={strength}: we run {steps - start}, diffusers {n}"
    ours = get_scheduler(name).make_tables(CONFIG, steps, start).timesteps[start:]  # Heun: row start = 2 * start
    torch.testing.assert_close(ours, timesteps.to(torch.float32), rtol=0, atol=2e-4)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.09), (10, 0.05), (3, 0.3), (1, 0.99)])
def test_no_step_left_is_refused(steps, strength):
    # int(steps * strength) == 0 (0.9, 0.5, 0.9, 0.99): diffusers would run no step at all
    with pytest.raises(UsageError, match="leaves no step to run"):
        img2img.start_index(steps, strength)


SD2_V = {**json.loads(
    (Path(__file__).resolve().parents[2] / "sdtrt/checkpoint/configs/sd21/scheduler/scheduler_config.json").read_text()
), "prediction_type": "v_prediction"}


@pytest.mark.parametrize("config", [CONFIG, SD2_V], ids=["sd15", "sd2"])
@pytest.mark.parametrize("name", img2img.IMG2IMG_SCHEDULERS)
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.75), (25, 0.3), (4, 1.0)])
def test_noise_coefs_are_diffusers_add_noise(name, steps, strength, config):
    """x_start = a * x0 + s * eps at the first timestep that runs, as the scheduler's add_noise after get_timesteps."""
    timesteps, _, sched = _diffusers_start(name, steps, strength, config)
    start = img2img.start_index(steps, strength)
    a, s = img2img.noise_coefs(name, config, get_scheduler(name).make_tables(config, steps, start), start)
    one, zero = torch.ones((1, 1), dtype=torch.float32), torch.zeros((1, 1), dtype=torch.float32)
    want_a = float(sched.add_noise(one, zero, timesteps[:1]))  # x0 = 1, eps = 0
    want_s = float(sched.add_noise(zero, one, timesteps[:1]))  # x0 = 0, eps = 1
    assert a == pytest.approx(want_a, rel=1e-5) and s == pytest.approx(want_s, rel=1e-5), (a, s, want_a, want_s)


def test_every_scheduler_runs_img2img():
    for name in ("pndm", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc", "heun", "dpmpp_2m_sde", "ddim:eta=0.5"):
        img2img.check_scheduler(name)
    with pytest.raises(UsageError, match="^img2img supports the schedulers ddim, pndm, .*, not 'dpm2'$"):
        img2img.check_scheduler("dpm2")


def test_prepare_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # (H, W, 3)
    assert img2img.prepare_image(pixels, 56, 40) is pixels  # already the size: untouched
    # resized to (width, height) with Lanczos, as diffusers' VaeImageProcessor.resize
    want = np.asarray(Image.fromarray(pixels).resize((64, 48), resample=Image.LANCZOS))
    got = img2img.prepare_image(pixels, 64, 48)
    assert got.shape == (48, 64, 3) and got.dtype == np.uint8 and np.array_equal(got, want)
    assert np.array_equal(img2img.prepare_image(Image.fromarray(pixels), 64, 48), want)
    rgba = Image.fromarray(np.dstack([pixels, np.full((40, 56), 255, np.uint8)]), "RGBA")
    assert np.array_equal(img2img.prepare_image(rgba, 56, 40), pixels)  # converted to RGB
    for bad in (pixels.astype(np.float32), pixels[..., :2], pixels[0]):
        with pytest.raises(UsageError, match=r"^init image array must be \(H, W, 3\) uint8$"):
            img2img.prepare_image(bad, 56, 40)
    with pytest.raises(UsageError, match=r"^init image must be a PIL image or an \(H, W, 3\) uint8 array$"):
        img2img.prepare_image("a.png", 56, 40)
