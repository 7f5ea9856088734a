"""AUTOMATIC1111's sampler names and schedule types (web UI 1.9+) mapped onto sdtrt's schedulers.

A1111 1.9 split "DPM++ 2M Karras" into a sampler ("DPM++ 2M") and a schedule type ("Karras"). Its schedule type
"Automatic" means the sampler's own default, the ``'scheduler'`` option of its entry in
``modules/sd_samplers_kdiffusion.py``: Karras for DPM++ 2M (and DPM++ SDE, DPM++ 2S a, DPM2), Exponential for
DPM++ 2M SDE, and none for Euler, Euler a, LMS and Heun, which then take the model's own sigmas
(``model_wrap.get_sigmas``, the "Uniform" schedule of ``modules/sd_schedulers.py``). A sampler name that ends with a
schedule type's label ("DPM++ 2M Karras", "LMS Karras") means that sampler with that schedule type, whatever the
schedule type field says (``sd_samplers.get_sampler_and_scheduler``). DDIM, PLMS and UniPC are A1111 "timesteps"
samplers (``modules/sd_samplers_timesteps.py``): they ignore the schedule type, and so does sdtrt.

sdtrt's "uniform" variant of a sampler is the diffusers scheduler on the checkpoint's own timestep spacing, the
closest diffusers has to k-diffusion's uniform sigmas (k-diffusion interpolates log-sigma, diffusers sigma).
The infotext writes ``Schedule type`` exactly when A1111 would: whenever the resolved schedule is not the model's
own (``Karras``, ``Exponential``, or ``Uniform`` for a sampler whose Automatic is something else).

DDIM's ``eta`` (A1111's ``eta`` request field, infotext ``Eta DDIM``) is part of the scheduler name,
``ddim:eta=0.5``, so that everything keyed by the scheduler (captured loops, micro-batches) keys by eta too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sdtrt.errors import UsageError

ETA_PREFIX = "ddim:eta="


@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's schedule types, with the fields of ``GET /sdapi/v1/schedulers``."""

    name: str
    label: str
    default_rho: float = -1.0
    need_inner_model: bool = False
    aliases: tuple[str, ...] | None = None

    def api(self) -> dict:
        return {"name": self.name, "label": self.label, "aliases": list(self.aliases) if self.aliases else None,
                "default_rho": self.default_rho, "need_inner_model": self.need_inner_model}


# The schedule types sdtrt runs, as A1111 lists them in modules/sd_schedulers.py (same names, labels and fields).
SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic"),
    ScheduleType("uniform", "Uniform", need_inner_model=True),
    ScheduleType("karras", "Karras", default_rho=7.0),
    ScheduleType("exponential", "Exponential"),
)
_TYPE_BY_KEY = {k.lower(): t for t in SCHEDULE_TYPES for k in (t.name, t.label, *(t.aliases or ()))}


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler: its schedule-type variants among sdtrt's schedulers and what Automatic means for it."""

    name: str
    variants: Mapping[str, str]  # schedule type name -> sdtrt scheduler name
    automatic: str = "uniform"  # A1111's 'scheduler' option of the sampler (none: the model's own, "uniform")
    aliases: tuple[str, ...] = ()  # A1111's aliases (k_...)
    timesteps: bool = False  # an A1111 timesteps sampler: the schedule type is ignored
    options: Mapping[str, str] = field(default_factory=dict)  # as A1111's /sdapi/v1/samplers lists them


def _s(name: str, automatic: str = "uniform", aliases: tuple[str, ...] = (), timesteps: bool = False,
       **variants: str) -> Sampler:
    options = {"scheduler": automatic} if automatic != "uniform" else {}
    return Sampler(name, MappingProxyType(variants), automatic, aliases, timesteps, MappingProxyType(options))


SAMPLERS: tuple[Sampler, ...] = (
    _s("DPM++ 2M", "karras", ("k_dpmpp_2m",),
       uniform="dpmpp_2m", karras="dpmpp_2m_karras", exponential="dpmpp_2m_exponential"),
    _s("DPM++ 2M SDE", "exponential", ("k_dpmpp_2m_sde",),
       uniform="dpmpp_2m_sde", karras="dpmpp_2m_sde_karras", exponential="dpmpp_2m_sde_exponential"),
    _s("Euler a", aliases=("k_euler_a", "k_euler_ancestral"), uniform="euler_a"),
    _s("Euler", aliases=("k_euler",), uniform="euler", karras="euler_karras"),
    _s("LMS", aliases=("k_lms",), uniform="lms", karras="lms_karras"),
    _s("Heun", aliases=("k_heun",), uniform="heun", karras="heun_karras"),
    _s("DDIM", timesteps=True, uniform="ddim"),
    _s("PLMS", timesteps=True, uniform="pndm"),
    _s("UniPC", timesteps=True, uniform="unipc"),
    _s("LCM", aliases=("k_lcm",), uniform="lcm"),
)
_SAMPLER_BY_KEY = {k.lower(): s for s in SAMPLERS for k in (s.name, *s.aliases)}
# sdtrt name -> (A1111 sampler, schedule type name)
_FAMILY = {ours: (s, stype) for s in SAMPLERS for stype, ours in s.variants.items()}


def schedule_type(text: str | None) -> ScheduleType:
    """A1111's schedule type by name, label or alias (any case); None or "" is Automatic."""
    if not text:
        return SCHEDULE_TYPES[0]
    try:
        return _TYPE_BY_KEY[text.strip().lower()]
    except KeyError:
        raise UsageError(f"unknown schedule type {text!r}; choose one of: "
                         f"{', '.join(t.label for t in SCHEDULE_TYPES)}") from None


def _split_suffix(name: str) -> tuple[str, ScheduleType | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', Karras), as A1111's get_sampler_and_scheduler reads old names."""
    for stype in SCHEDULE_TYPES[1:]:
        for option in (stype.label, *(stype.aliases or ())):
            if name.lower().endswith(" " + option.lower()):
                return name[: -len(option) - 1], stype
    return name, None


def resolve(name: str | None, schedule: str | None, default: str, known: Mapping[str, object]) -> str:
    """The sdtrt scheduler for a sampler name (A1111's, any case, or sdtrt's own) and an A1111 schedule type.

    ``name`` None: the checkpoint's own scheduler ``default``. An sdtrt name keeps its exact meaning under
    Automatic; an A1111 name takes A1111 1.9's Automatic (the sampler's default schedule type). ``known``: the
    registered sdtrt names. ``UsageError`` for an unknown name or a schedule type the sampler does not have here.
    """
    stype = schedule_type(schedule)
    ours = default if name is None else name
    if ours in known or ours.startswith(ETA_PREFIX):
        sampler_and_type = _FAMILY.get(ours.split(":")[0])
        if stype.name == "automatic" or sampler_and_type is None:
            if stype.name != "automatic":
                raise UsageError(f"schedule type {stype.label!r} is not available with the scheduler {ours!r}")
            return ours
        sampler = sampler_and_type[0]
        if sampler.timesteps:
            return ours
    else:
        base, suffix = _split_suffix(ours)
        sampler = _SAMPLER_BY_KEY.get(base.lower())
        if sampler is None:
            raise UsageError(f"unknown sampler {name!r}; choose one of: "
                             f"{', '.join(repr(s.name) for s in SAMPLERS)} (or sdtrt's names: {', '.join(known)})")
        stype = suffix or stype
        if stype.name == "automatic":
            stype = schedule_type(sampler.automatic)
    if sampler.timesteps:
        return sampler.variants["uniform"]
    try:
        return sampler.variants[stype.name]
    except KeyError:
        have = ", ".join(schedule_type(k).label for k in sampler.variants)
        raise UsageError(f"schedule type {stype.label!r} is not available with {sampler.name!r} here; "
                         f"choose Automatic or one of: {have}") from None


def with_eta(name: str, eta: float | None) -> str:
    """``name`` with DDIM's eta folded in (``ddim:eta=0.5``); eta None or 0 leaves the name as it is."""
    if eta is None or eta == 0:
        return name
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or not 0 < eta <= 1:
        raise UsageError(f"eta must be a number between 0 and 1, got {eta!r}")
    base = name.split(":")[0]
    if base != "ddim":
        raise UsageError(f"eta applies to DDIM only (diffusers' DDIMScheduler), not to {name!r}")
    return f"{ETA_PREFIX}{float(eta)!r}"


def eta_of(name: str) -> float:
    """DDIM's eta in a scheduler name (0 when none is folded in); ``UsageError`` for a malformed one."""
    if not name.startswith(ETA_PREFIX):
        return 0.0
    text = name[len(ETA_PREFIX):]
    try:
        eta = float(text)
    except ValueError:
        raise UsageError(f"scheduler {name!r}: eta {text!r} is not a number") from None
    if not math.isfinite(eta) or not 0 <= eta <= 1:
        raise UsageError(f"scheduler {name!r}: eta must be between 0 and 1")
    return eta


def a1111_names(name: str) -> tuple[str, str | None]:
    """(A1111 sampler, schedule type label or None) for an sdtrt scheduler name, as A1111's infotext writes them:
    ``Schedule type`` only when the schedule is not the model's own (A1111 ``get_sigmas``)."""
    found = _FAMILY.get(name.split(":")[0])
    if found is None:
        return name, None
    sampler, stype = found
    if sampler.timesteps or (stype == "uniform" and sampler.automatic == "uniform"):
        return sampler.name, None
    return sampler.name, schedule_type(stype).label


def samplers_api(known: Mapping[str, object]) -> list[dict]:
    """``GET /sdapi/v1/samplers`` in A1111's shape: name, aliases (A1111's and sdtrt's), options."""
    return [{"name": s.name, "aliases": [*s.aliases, *(v for v in s.variants.values() if v in known)],
             "options": dict(s.options)} for s in SAMPLERS]


def schedulers_api() -> list[dict]:
    """``GET /sdapi/v1/schedulers`` in A1111's shape (name, label, aliases, default_rho, need_inner_model)."""
    return [t.api() for t in SCHEDULE_TYPES]
