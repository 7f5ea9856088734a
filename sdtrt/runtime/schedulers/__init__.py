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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch

from sdtrt.errors import UsageError

from . import a1111, ddim, dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral, heun, lcm, lms, pndm, schedule, unipc
from .tables import Tables, at, new_history

__all__ = [
    "A1111_NAME_OF",
    "A1111_SAMPLERS",
    "DIFFUSERS_CLASSES",
    "SCHEDULERS",
    "Scheduler",
    "Tables",
    "a1111_names",
    "add_noise_coefs",
    "at",
    "get_scheduler",
    "get_scheduler_a1111",
    "name_for_config",
    "new_history",
    "resolve",
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
    # how the scheduler's add_noise reads its schedule at img2img's first evaluation (see ``add_noise_coefs``)
    add_noise: str = "ve"

    @property
    def needs_noise(self) -> bool:
        """Whether ``step`` consumes a fresh N(0, I) tensor every evaluation (fixed per scheduler name)."""
        return bool(self.module.NEEDS_NOISE or self.overrides.get("eta"))

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
_SDE = _frozen(algorithm_type="sde-dpmsolver++", solver_order=2)
_KARRAS = _frozen(use_karras_sigmas=True)
_EXPONENTIAL = _frozen(use_exponential_sigmas=True)
_VP_T, _VP_SIGMA = "vp_t", "vp_sigma"

SCHEDULERS: Mapping[str, Scheduler] = MappingProxyType(
    {
        s.name: s
        for s in (
            Scheduler("ddim", ddim, _frozen(eta=0.0), add_noise=_VP_T),  # eta > 0: "ddim:eta=X" (get_scheduler)
            # Every SD pipeline runs PNDM as PLMS; the Runge-Kutta warm-up is not supported.
            Scheduler("pndm", pndm, _frozen(skip_prk_steps=True), add_noise=_VP_T),
            Scheduler("euler", euler),
            Scheduler("euler_a", euler_ancestral),
            Scheduler("dpmpp_2m", dpmpp_2m, _frozen(**_DPMPP_2M, use_karras_sigmas=False), add_noise=_VP_SIGMA),
            Scheduler("dpmpp_2m_karras", dpmpp_2m, _frozen(**_DPMPP_2M, use_karras_sigmas=True), add_noise=_VP_SIGMA),
            Scheduler("lms", lms),
            Scheduler("unipc", unipc, add_noise=_VP_SIGMA),
            Scheduler("lcm", lcm, add_noise=_VP_T),
            # A1111 1.9+ samplers and schedule types (sdtrt.runtime.schedulers.a1111)
            Scheduler("euler_karras", euler, _KARRAS),
            Scheduler("lms_karras", lms, _KARRAS),
            Scheduler("heun", heun),
            Scheduler("heun_karras", heun, _KARRAS),
            Scheduler("dpmpp_2m_exponential", dpmpp_2m, _frozen(**_DPMPP_2M, **_EXPONENTIAL), add_noise=_VP_SIGMA),
            Scheduler("dpmpp_2m_sde", dpmpp_2m_sde, _SDE, add_noise=_VP_SIGMA),
            Scheduler("dpmpp_2m_sde_karras", dpmpp_2m_sde, _frozen(**_SDE, **_KARRAS), add_noise=_VP_SIGMA),
            Scheduler("dpmpp_2m_sde_exponential", dpmpp_2m_sde, _frozen(**_SDE, **_EXPONENTIAL), add_noise=_VP_SIGMA),
        )
    }
)

# AUTOMATIC1111 web-UI sampler names (before 1.9's schedule types) -> ours (the closest diffusers-equivalent
# scheduler; k-diffusion's own samplers differ in details such as the timestep grid). ``resolve`` reads 1.9's
# sampler + schedule type pairs.
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
        "Heun": "heun",
        "DPM++ 2M SDE": "dpmpp_2m_sde_exponential",
        "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    }
)


# ours -> A1111's name (the first A1111 name listed for it)
A1111_NAME_OF: Mapping[str, str] = MappingProxyType({ours: a1111 for a1111, ours in reversed(list(A1111_SAMPLERS.items()))})


def get_scheduler(name: str) -> Scheduler:
    """The scheduler registered under a CLI name, or DDIM with its eta folded in (``ddim:eta=0.5``);
    ``UsageError`` listing the valid names otherwise."""
    if name.startswith(a1111.ETA_PREFIX):
        eta = a1111.eta_of(name)
        return Scheduler(name, ddim, _frozen(eta=eta), add_noise=_VP_T)
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}") from None


def resolve(name: str | None, schedule_type: str | None = None, *, default: str, eta: float | None = None) -> str:
    """The sdtrt scheduler name for a request: ``name`` is an sdtrt name or an A1111 sampler name (any case,
    "DPM++ 2M Karras" style included), ``schedule_type`` A1111's (None: Automatic), ``default`` the checkpoint's
    own scheduler (used when ``name`` is None), ``eta`` DDIM's. See ``sdtrt.runtime.schedulers.a1111``."""
    name = a1111.resolve(name, schedule_type, default, SCHEDULERS)
    name = a1111.with_eta(name, eta)
    get_scheduler(name)  # a malformed "ddim:eta=..." is refused here
    return name


def a1111_names(name: str) -> tuple[str, str | None]:
    """(A1111 sampler name, ``Schedule type`` label or None) for an sdtrt scheduler name."""
    return a1111.a1111_names(name)


def add_noise_coefs(name: str, config: Mapping[str, Any], tables: Tables, start: int) -> tuple[float, float]:
    """(a, s) with img2img's first latents ``a * x_0 + s * eps``: the scheduler's ``add_noise`` at evaluation
    ``start`` of ``tables`` (made with this ``start``), as diffusers' img2img pipeline noises the encoded image.

    VP timestep schedulers (DDIM, PLMS, LCM) read ``alpha_bar`` at the integer timestep; the DPM-Solver family and
    UniPC read the VP pair of the step's VE sigma; the Euler family (Euler, Euler a, LMS, Heun) adds ``sigma * eps``
    to ``x_0`` (its ``c_in = 1 / sqrt(sigma^2 + 1)`` scales the UNet input).
    """
    sched = get_scheduler(name)
    if sched.add_noise == _VP_T:
        cfg = schedule.read_config({**config, **sched.overrides}, sched.module.DEFAULTS, name)
        alpha_bar = schedule.alphas_cumprod(cfg, name)
        t = int(round(float(tables.timesteps[start])))
        return math.sqrt(alpha_bar[t]), math.sqrt(1.0 - alpha_bar[t])
    if sched.add_noise == _VP_SIGMA:
        cfg = schedule.read_config({**config, **sched.overrides}, sched.module.DEFAULTS, name)
        sigma = float(dpmpp_2m.multistep_grid(cfg, tables.steps, name, unipc=sched.module is unipc)[1][start])
        a = 1.0 / math.sqrt(sigma**2 + 1.0)
        return a, sigma * a
    c_in = float(tables.c_in[start])  # 1 / sqrt(sigma^2 + 1)
    return 1.0, math.sqrt(1.0 / c_in**2 - 1.0)


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
        "euler_karras": "EulerDiscreteScheduler",
        "lms_karras": "LMSDiscreteScheduler",
        "heun": "HeunDiscreteScheduler",
        "heun_karras": "HeunDiscreteScheduler",
        "dpmpp_2m_exponential": "DPMSolverMultistepScheduler",
        "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
        "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
        "dpmpp_2m_sde_exponential": "DPMSolverMultistepScheduler",
    }
)


def name_for_config(config: Mapping[str, Any], default: str = "ddim") -> str:
    """Our name for the scheduler a diffusers ``scheduler_config.json`` describes (``default`` if none matches)."""
    cls = config.get("_class_name", "")
    if cls == "DPMSolverMultistepScheduler":
        sde = "_sde" if config.get("algorithm_type") == "sde-dpmsolver++" else ""
        spacing = "_karras" if config.get("use_karras_sigmas") else ""
        spacing = "_exponential" if config.get("use_exponential_sigmas") else spacing
        return f"dpmpp_2m{sde}{spacing}"
    if cls in ("EulerDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler") and config.get(
        "use_karras_sigmas"
    ):
        return {"EulerDiscreteScheduler": "euler", "LMSDiscreteScheduler": "lms", "HeunDiscreteScheduler": "heun"}[cls] + "_karras"
    return next((name for name, c in DIFFUSERS_CLASSES.items() if c == cls), default)
