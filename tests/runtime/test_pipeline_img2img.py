"""img2img's start step against diffusers' own rule (StableDiffusionImg2ImgPipeline.get_timesteps), without models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import diffusers
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


def _diffusers_start(name: str, steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """diffusers' get_timesteps on a scheduler of ours' class: (the timesteps it runs, how many)."""
    sched = getattr(diffusers, DIFFUSERS_CLASSES[name]).from_config({**CONFIG, **get_scheduler(name).overrides})
    sched.set_timesteps(steps)
    timesteps, n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    return timesteps, n


@pytest.mark.parametrize("name", img2img.IMG2IMG_SCHEDULERS)
@pytest.mark.parametrize(("steps", "strength"), CASES)
def test_start_index_is_diffusers_get_timesteps(name, steps, strength):
    timesteps, n = _diffusers_start(name, steps, strength)
    start = img2img.start_index(steps, strength)
    assert steps - start == n, f"steps={steps} strength={strength}: we run {steps - start}, diffusers {n}"
    ours = get_scheduler(name).make_tables(CONFIG, steps).timesteps[start:]
    torch.testing.assert_close(ours, timesteps.to(torch.float32), rtol=0, atol=2e-4)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.09), (10, 0.05), (3, 0.3), (1, 0.99)])
def test_no_step_left_is_refused(steps, strength):
    # int(steps * strength) == 0 (0.9, 0.5, 0.9, 0.99): diffusers would run no step at all
    with pytest.raises(UsageError, match="leaves no step to run"):
        img2img.start_index(steps, strength)
