"""img2img trajectories: every scheduler started mid-schedule, against diffusers' scheduler after
``StableDiffusionImg2ImgPipeline.get_timesteps`` (``set_begin_index``), both over the same fake UNet.

The multistep solvers are the point: diffusers restarts their warm-up at the begin index (PLMS's ``counter`` and
``ets``, DPM++'s and UniPC's ``lower_order_nums``, UniPC's ``last_sample``, LMS's ``derivatives``), so tables that
simply start at row ``start`` of the txt2img tables would combine history that was never computed.
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch

from sdtrt.runtime import img2img
from sdtrt.runtime.schedulers import add_noise_coefs, get_scheduler, new_history
from tests.runtime.schedulers.test_scheduler_parity import (
    CONFIGS,
    NAMES,
    SHAPE,
    TOL,
    _diffusers_scheduler,
    fake_unet,
    max_rel_err,
    step_kwargs,
)

MULTISTEP = ("pndm", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc", "dpmpp_2m_sde")
CASES = [(10, 0.75), (10, 0.5), (10, 0.3), (20, 0.69), (6, 1.0), (4, 0.5)]


def run_diffusers_img2img(name: str, config, steps: int, strength: float) -> torch.Tensor:
    sched = _diffusers_scheduler(name, config, steps)
    timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    gen = torch.Generator().manual_seed(0)
    kwargs = step_kwargs(name, gen)
    x0 = torch.randn(SHAPE, generator=gen)
    x = sched.add_noise(x0, torch.randn(SHAPE, generator=gen), timesteps[:1])
    for t in timesteps:
        out = fake_unet(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours_img2img(name: str, config, steps: int, strength: float) -> torch.Tensor:
    sched = get_scheduler(name)
    start = img2img.start_index(steps, strength)
    tables = sched.make_tables(config, steps, start).to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=gen)
    a, s = add_noise_coefs(name, config, sched.make_tables(config, steps, start), start)
    x = a * x0 + s * torch.randn(SHAPE, generator=gen)
    history = new_history(tables, x)
    i = torch.full((), start, dtype=torch.int64)
    for k in range(start, tables.num_evals):
        out = fake_unet(x * tables.c_in[k], tables.timesteps[k])
        noise = torch.randn(SHAPE, generator=gen) if tables.needs_noise else None
        x = sched.step(tables, i, x, out, history, noise)
        i += 1
    return x


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize(("steps", "strength"), CASES)
@pytest.mark.parametrize("name", NAMES)
def test_img2img_trajectory_parity(name, config_name, steps, strength):
    config = CONFIGS[config_name]
    ref = run_diffusers_img2img(name, config, steps, strength)
    ours = run_ours_img2img(name, config, steps, strength)
    assert max_rel_err(ours, ref) <= TOL, max_rel_err(ours, ref)


@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_tables_restart_their_warm_up(name):
    """From start > 0 the tables differ from the txt2img ones (a warm-up row), and start=0 is txt2img exactly."""
    config = CONFIGS["sd15"]
    sched = get_scheduler(name)
    plain = sched.make_tables(config, 10)
    assert all(torch.equal(getattr(plain, f), getattr(sched.make_tables(config, 10, 0), f))
               for f in vars(plain) if isinstance(getattr(plain, f), torch.Tensor))
    restarted = sched.make_tables(config, 10, 3)
    differs = [f for f in vars(plain) if isinstance(getattr(plain, f), torch.Tensor)
               and f not in ("timesteps", "c_in") and not torch.equal(getattr(plain, f)[3:], getattr(restarted, f)[3:])]
    assert differs, f"{name}: start=3 tables equal the txt2img rows"
    torch.testing.assert_close(restarted.timesteps, plain.timesteps, rtol=0, atol=0)


def test_heun_rows_from_start_are_diffusers_evaluations_from_twice_start():
    """diffusers starts Heun (order 2) at evaluation 2 * start; our row ``start`` is that evaluation."""
    config = CONFIGS["sd15"]
    sched = get_scheduler("heun")
    plain, restarted = sched.make_tables(config, 10), sched.make_tables(config, 10, 3)
    assert plain.num_evals == 19 and restarted.num_evals == 19 - 3
    for f in ("timesteps", "c_in", "coef", "save"):
        assert torch.equal(getattr(restarted, f)[3:], getattr(plain, f)[6:]), f


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc",
                                  "lcm"])
def test_add_noise_coefs_equal_img2img_noise_coefs(name):
    """schedulers.add_noise_coefs is img2img.noise_coefs for every scheduler that module knows (it can delegate)."""
    config = CONFIGS["sd15"]
    tables = get_scheduler(name).make_tables(config, 10, 3)
    assert add_noise_coefs(name, config, tables, 3) == img2img.noise_coefs(name, config, tables, 3)
