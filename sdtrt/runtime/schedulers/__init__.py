"""Schedulers written for whole-loop CUDA-graph capture; one module per scheduler, all with the same interface.

    sched = get_scheduler("dpmpp_2m_karras")
    tables = sched.make_tables(scheduler_config, steps, start).to(device, dtype)  # host, float64, once
    x = tables.init_noise_sigma * randn(...)                                # (B, 4, H/8, W/8)
    history = new_history(tables, x)                                        # (S, B, 4, H/8, W/8), zeros
    noise = randn(tables.num_evals, ...) if tables.needs_noise else None    # drawn after x, as diffusers does
    for _ in range(start, tables.num_evals):  # captured: i is a 0-dim int64 device tensor the graph advances
        out = unet(x * at(tables.c_in, i), at(tables.timesteps, i), ...)
        x = sched.step(tables, i, x, out, history, at(noise, i) if noise is not None else None)
        i += 1

``step`` is pure tensor math over the tables: no host syncs, no branches on tensor values, the same kernels every
step; history is updated in place. ``at`` gathers row ``i`` without a host sync (``table[i]`` with a tensor ``i``
would call ``.item()``). Stochastic schedulers take one standard-normal tensor per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch

from sdtrt.errors import UsageError

from . import ddim, dpmpp_2m, euler, euler_ancestral, lcm, lms, pndm, unipc
from .tables import Tables, at, new_history

__all__ = [
    "A1111_NAME_OF",
    "A1111_SAMPLERS",
    "DIFFUSERS_CLASSES",
    "SCHEDULERS",
    "Scheduler",
    "Tables",
    "at",
    "get_scheduler",
    "get_scheduler_a1111",
    "name_for_config",
    "new_history",
]

StepFn = Callable[
    [Tables, "torch.Tensor | int", torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
    torch.Tensor,
]


@dataclass(frozen=True)
class Scheduler:
    """A scheduler under a user-facing name: its module plus the config keys that name pins."""

    name: str
    module: ModuleType
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_noise(self) -> bool:
        """Whether ``step`` consumes a fresh N(0, I) tensor every evaluation (fixed per scheduler)."""
        return self.module.NEEDS_NOISE

    def make_tables(self, config: Mapping[str, Any], steps: int, start: int = 0) -> Tables:
        """Per-step tables (float64, CPU) from a diffusers ``scheduler_config.json`` dict; cast with ``.to()``.
        ``start``: the first evaluation that runs (img2img); multistep solvers restart their warm-up there."""
        return self.module.make_tables({**config, **self.overrides}, steps, start)

    @property
    def step(self) -> StepFn:
        """``step(tables, i, x, model_output, history, noise) -> x_next``."""
        return self.module.step


def _frozen(**items: Any) -> Mapping[str, Any]:
    return MappingProxyType(items)


_DPMPP_2M = _frozen(algorithm_type="dpmsolver++", solver_order=2)

SCHEDULERS: Mapping[str, Scheduler] = MappingProxyType(
    {
        s.name: s
        for s in (
            Scheduler("ddim", ddim),
            # Every SD pipeline runs PNDM as PLMS; the Runge-Kutta warm-up is not supported.
            Scheduler("pndm", pndm, _frozen(skip_prk_steps=True)),
            Scheduler("euler", euler),
            Scheduler("euler_a", euler_ancestral),
            Scheduler("dpmpp_2m", dpmpp_2m, _frozen(**_DPMPP_2M, use_karras_sigmas=False)),
            Scheduler("dpmpp_2m_karras", dpmpp_2m, _frozen(**_DPMPP_2M, use_karras_sigmas=True)),
            Scheduler("lms", lms),
            Scheduler("unipc", unipc),
            Scheduler("lcm", lcm),
        )
    }
)

# AUTOMATIC1111 web-UI sampler names -> ours (the closest diffusers-equivalent scheduler; k-diffusion's own
# samplers differ in details such as the timestep grid).
A1111_SAMPLERS: Mapping[str, str] = MappingProxyType(
    {
        "DDIM": "ddim",
        "PLMS": "pndm",
        "Euler": "euler",
        "Euler a": "euler_a",
        "LMS": "lms",
        "DPM++ 2M": "dpmpp_2m",
        "DPM++ 2M Karras": "dpmpp_2m_karras",
        "UniPC": "unipc",
        "LCM": "lcm",
    }
)


# ours -> A1111's name (the first A1111 name listed for it)
A1111_NAME_OF: Mapping[str, str] = MappingProxyType({ours: a1111 for a1111, ours in reversed(list(A1111_SAMPLERS.items()))})


def get_scheduler(name: str) -> Scheduler:
    """The scheduler registered under a CLI name; ``UsageError`` listing the valid names otherwise."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}") from None


def get_scheduler_a1111(sampler_name: str) -> Scheduler:
    """The scheduler for an AUTOMATIC1111 sampler name (``"DPM++ 2M Karras"``, ``"Euler a"``, ...)."""
    try:
        return SCHEDULERS[A1111_SAMPLERS[sampler_name]]
    except KeyError:
        raise UsageError(
            f"unknown sampler {sampler_name!r}; choose one of: {', '.join(repr(n) for n in A1111_SAMPLERS)}"
        ) from None


# Our names -> the diffusers scheduler class each reproduces (configured with the name's ``overrides``).
DIFFUSERS_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "ddim": "DDIMScheduler",
        "pndm": "PNDMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
        "lms": "LMSDiscreteScheduler",
        "unipc": "UniPCMultistepScheduler",
        "lcm": "LCMScheduler",
    }
)


def name_for_config(config: Mapping[str, Any], default: str = "ddim") -> str:
    """Our name for the scheduler a diffusers ``scheduler_config.json`` describes (``default`` if none matches)."""
    cls = config.get("_class_name", "")
    if cls == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if config.get("use_karras_sigmas") else "dpmpp_2m"
    return next((name for name, c in DIFFUSERS_CLASSES.items() if c == cls), default)
