"""Optimization profiles: what shapes an engine is built for, from the manifest's symbolic shapes.

Axis names in the manifest are a coefficient and a letter: ``B`` (images), ``2B`` (UNet rows: ``[uncond; cond]``
under classifier-free guidance), ``H``/``W`` (latent sides, pixels / ``vae_scale_factor``), ``8H``/``8W``
(pixel sides) and ``77T`` (the UNet's text length: T prompt chunks of 77 tokens). One profile per build:

* ``--static`` (the default; fastest, and what whole-loop CUDA graphs want): every axis at exactly ``--batch``,
  ``--height``, ``--width`` -- except the UNet's CFG rows, which span ``B..2B`` (min ``B``: a request with
  guidance <= 1 runs ``B`` rows; opt = max = ``2B``, the CFG case the engine is tuned for), and the text
  encoders, which the pipeline runs on one prompt chunk at a time, so batch 1.
* ``--dynamic``: batch ``1..--max-batch`` (UNet rows ``1..2*max-batch``), sides ``--min-side..--max-side`` px
  (the family's range by default, ``DYNAMIC_SIDES``: 256..1024 for SD, 512..1536 for SDXL, widened to include
  the opt size), opt at ``--batch``/``--height``/``--width``; the text encoders batch ``1..max-batch`` with opt 1.

Either way the UNet's text axis spans ``1..--max-chunks`` prompt chunks (opt 1): long prompts are the exception,
and a prompt of more chunks than the engine was built for is refused with a ``ShapeError`` naming the range.
Workdirs exported before the text axis (a fixed 77) have no such axis, and their profiles are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from sdtrt.errors import ShapeError, UsageError

DEFAULT_MAX_BATCH = 4
DEFAULT_MIN_SIDE = 256
DEFAULT_MAX_SIDE = 1024
#: --dynamic's default side range (px) by the manifest's model family; others get DEFAULT_MIN_SIDE..DEFAULT_MAX_SIDE
DYNAMIC_SIDES: dict[str, tuple[int, int]] = {"sdxl": (512, 1536), "sdxl-refiner": (512, 1536)}
DEFAULT_MAX_CHUNKS = 3  # 225 tokens: most long prompts, at 3x the cross-attention keys of a short one
MAX_CHUNKS = 8
CHUNK_TOKENS = 75  # a chunk's tokens between its start and end tokens (77 in all)
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
MAX_SIDE = 2048
MAX_BATCH = 64
SIDE_MULTIPLE = 8
ONE_PROMPT = ("text_encoder", "text_encoder_2")  # components the pipeline runs on one prompt chunk at a time

_AXIS = re.compile(r"^(\d*)([A-Z])$")


def _check_int(name: str, value: Any, lo: int, hi: int, multiple: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi or value % multiple:
        what = f"a multiple of {multiple} " if multiple > 1 else "an integer "
        raise UsageError(f"--{name.replace('_', '-')} must be {what}between {lo} and {hi}, got {value!r}")


@dataclass(frozen=True)
class ProfileSpec:
    """The shapes to build for. ``height``/``width`` None: the model's native size (``resolved`` fills them)."""

    static: bool = True
    batch: int = 1
    height: int | None = None  # px
    width: int | None = None  # px
    max_batch: int | None = None  # --dynamic only (default DEFAULT_MAX_BATCH, at least batch)
    min_side: int | None = None  # --dynamic only, px
    max_side: int | None = None  # --dynamic only, px
    max_chunks: int = DEFAULT_MAX_CHUNKS  # the UNet's text axis: 1..max_chunks prompt chunks, static or dynamic

    def __post_init__(self) -> None:
        _check_int("batch", self.batch, 1, MAX_BATCH)
        _check_int("max_chunks", self.max_chunks, 1, MAX_CHUNKS)
        for name in ("height", "width", "min_side", "max_side"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), SIDE_MULTIPLE, MAX_SIDE, SIDE_MULTIPLE)
        if self.max_batch is not None:
            _check_int("max_batch", self.max_batch, 1, MAX_BATCH)
        if self.static:
            given = [f"--{n.replace('_', '-')}" for n in ("max_batch", "min_side", "max_side") if getattr(self, n) is not None]
            if given:
                raise UsageError(f"{', '.join(given)} only apply to --dynamic engines")
            return
        if self.max_batch is not None and self.max_batch < self.batch:
            raise UsageError(f"--max-batch {self.max_batch} is below --batch {self.batch}")
        lo, hi = self.min_side, self.max_side
        if lo is not None and hi is not None and lo > hi:
            raise UsageError(f"--min-side {lo} is above --max-side {hi}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                raise UsageError(f"--{name} {v} is outside --min-side..--max-side ({lo or '-'}..{hi or '-'} px)")

    def resolved(self, default_size: int, sides: tuple[int, int] = (DEFAULT_MIN_SIDE, DEFAULT_MAX_SIDE)) -> ProfileSpec:
        """Every None filled in: native size for height/width, ``sides`` (the family's default range, px, see
        ``dynamic_sides``) widened to include them for the dynamic range."""
        h = self.height if self.height is not None else int(default_size)
        w = self.width if self.width is not None else int(default_size)
        if self.static:
            return replace(self, height=h, width=w)
        return replace(
            self,
            height=h,
            width=w,
            max_batch=self.max_batch if self.max_batch is not None else max(DEFAULT_MAX_BATCH, self.batch),
            min_side=self.min_side if self.min_side is not None else min(sides[0], h, w),
            max_side=self.max_side if self.max_side is not None else max(sides[1], h, w),
        )

    def cli_args(self) -> list[str]:
        """The ``sdtrt build`` flags that make this (resolved) profile."""
        args = ["--static" if self.static else "--dynamic", "--batch", str(self.batch)]
        if self.height is not None:
            args += ["--height", str(self.height)]
        if self.width is not None:
            args += ["--width", str(self.width)]
        for name in ("max_batch", "min_side", "max_side"):
            if getattr(self, name) is not None:
                args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        if self.max_chunks != DEFAULT_MAX_CHUNKS:
            args += ["--max-chunks", str(self.max_chunks)]
        return args


def dynamic_sides(model: Mapping[str, Any]) -> tuple[int, int]:
    """--dynamic's default side range (px) for a manifest's ``model`` (by its family)."""
    return DYNAMIC_SIDES.get(str(model.get("family")), (DEFAULT_MIN_SIDE, DEFAULT_MAX_SIDE))


@dataclass(frozen=True)
class BuildSpec:
    """Everything ``sdtrt build`` decides. ``rebuild_stale``: rebuild only the engines that are stale (other GPU,
    TensorRT, ONNX, or a corrupt plan), each with the settings its sidecar records; fresh engines are kept and
    components without an engine are built with this spec."""

    profile: ProfileSpec = ProfileSpec()
    opt_level: int = DEFAULT_OPT_LEVEL  # builder optimization level, 0 (fast build) .. 5 (slowest, best)
    workspace_mib: int | None = None  # memory pool limit WORKSPACE; None: TensorRT's default (the whole GPU)
    refit: bool = False  # refittable engines (new weights without a rebuild)
    tf32: bool = True  # TensorRT's default: fp32 layers may use TF32 tensor cores
    rebuild_stale: bool = False
    tensorrt: str = "auto"  # the flavour: auto | tensorrt | rtx (resolved before a build: compat.flavour)
    targets: tuple[str, ...] = ()  # TensorRT-RTX compute capabilities ("sm89", ...); empty: the visible GPU's

    def __post_init__(self) -> None:
        _check_int("opt_level", self.opt_level, 0, 5)
        if self.workspace_mib is not None:
            _check_int("workspace", self.workspace_mib, 1, 1 << 30)
        if self.tensorrt not in ("auto", "tensorrt", "rtx"):
            raise UsageError(f"unknown --tensorrt {self.tensorrt!r}; choose one of auto, tensorrt, rtx")
        if not isinstance(self.targets, tuple):
            raise UsageError(f"targets must be a tuple of compute capability names, got {self.targets!r}")

    def settings(self) -> dict[str, Any]:
        """What a sidecar records and a later build compares (``rebuild_stale`` is how to build, not what)."""
        return {"profile": asdict(self.profile), "opt_level": self.opt_level, "workspace_mib": self.workspace_mib,
                "refit": self.refit, "tf32": self.tf32, "tensorrt": self.tensorrt, "targets": list(self.targets)}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BuildSpec:
        return cls(profile=ProfileSpec(**settings["profile"]), opt_level=settings["opt_level"],
                   workspace_mib=settings["workspace_mib"], refit=settings["refit"], tf32=settings["tf32"],
                   tensorrt=settings["tensorrt"], targets=tuple(settings["targets"]))

    def cli_args(self) -> list[str]:
        args = self.profile.cli_args()
        if self.tensorrt != "auto":
            args += ["--tensorrt", self.tensorrt]
        if self.targets:
            args += ["--target", ",".join(self.targets)]
        if self.opt_level != DEFAULT_OPT_LEVEL:
            args += ["--opt-level", str(self.opt_level)]
        if self.workspace_mib is not None:
            args += ["--workspace", str(self.workspace_mib)]
        if self.refit:
            args.append("--refit")
        if not self.tf32:
            args.append("--no-tf32")
        return args


@dataclass(frozen=True)
class AxisRange:
    name: str  # as in the manifest: "B", "2B", "H", "8W", ...
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ComponentProfile:
    """The built range of every symbolic axis of one component's inputs and outputs."""

    component: str
    axes: tuple[AxisRange, ...]
    vae_scale: int

    def dims(self, which: str = "opt") -> dict[str, int]:
        """Axis sizes at ``min``, ``opt`` or ``max``, as the runtime passes them to ``activate``."""
        return {a.name: getattr(a, which) for a in self.axes}

    def input_shapes(self, entry: Mapping) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per graph input, its (min, opt, max) shape for ``IOptimizationProfile.set_shape``."""
        out = {}
        for spec in entry["inputs"]:
            out[spec["name"]] = tuple(_resolve(spec["shape"], self.dims(w)) for w in ("min", "opt", "max"))
        return out

    def describe(self) -> str:
        return ", ".join(_axis_text(a.name, a.min, a.max, self.vae_scale) for a in self.axes)

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "vae_scale": self.vae_scale,
                "axes": {a.name: [a.min, a.opt, a.max] for a in self.axes}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ComponentProfile:
        axes = tuple(AxisRange(n, *map(int, v)) for n, v in obj["axes"].items())
        return cls(obj["component"], axes, int(obj["vae_scale"]))


def parse_axis(name: str) -> tuple[int, str]:
    """``"2B"`` -> ``(2, "B")``, ``"H"`` -> ``(1, "H")``."""
    m = _AXIS.match(name)
    if not m or m.group(2) not in "BHWT":
        raise ShapeError(f"unknown axis {name!r} in the manifest (expected B, 2B, H, W, 8H, 8W, 77T)")
    return int(m.group(1) or 1), m.group(2)


def _resolve(shape: list, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def _chunks(v: int, coef: int) -> str:
    n = v / coef
    return f"{n:g} prompt chunk{'' if n == 1 else 's'}"


def _axis_text(name: str, lo: int, hi: int, scale: int) -> str:
    coef, letter = parse_axis(name)
    rng = f"{lo}" if lo == hi else f"{lo}..{hi}"
    if letter == "T":
        chunks = f"{lo // coef}" if lo == hi else f"{lo // coef}..{hi // coef}"
        return (f"{name} {rng} ({chunks} prompt chunks of {CHUNK_TOKENS} tokens: "
                f"built with --max-chunks {hi // coef})")
    if letter == "B":
        return f"{name} {rng}" + (" (rows: CFG runs 2B, guidance <= 1 runs B)" if coef > 1 else "")
    if coef == 1:
        px = f"{lo * scale}" if lo == hi else f"{lo * scale}..{hi * scale}"
        return f"{name} {rng} ({px} px)"
    return f"{name} {rng} px" if coef == scale else f"{name} {rng}"


def _value_text(name: str, v: int, scale: int) -> str:
    coef, letter = parse_axis(name)
    if letter == "T":
        return f"{name} = {v} ({_chunks(v, coef)})"
    return f"{name} = {v}" + (f" ({v * scale} px)" if letter != "B" and coef == 1 else "")


def _batch_range(component: str, coef: int, p: ProfileSpec) -> tuple[int, int, int]:
    if component in ONE_PROMPT and coef == 1:
        return (1, 1, 1) if p.static else (1, 1, p.max_batch)
    if coef == 1:
        return (p.batch,) * 3 if p.static else (1, p.batch, p.max_batch)
    # CFG rows: B rows without guidance, coef * B with it
    lo = p.batch if p.static else 1
    hi = coef * (p.batch if p.static else p.max_batch)
    return lo, coef * p.batch, hi


def _side_range(coef: int, px: int, p: ProfileSpec, scale: int) -> tuple[int, int, int]:
    if p.static:
        return (coef * (px // scale),) * 3
    return coef * (p.min_side // scale), coef * (px // scale), coef * (p.max_side // scale)


def component_profile(component: str, entry: Mapping, profile: ProfileSpec, vae_scale: int) -> ComponentProfile:
    """The built range of each axis of ``component`` (a manifest entry) for a resolved ``profile``."""
    if profile.height is None or profile.width is None or (not profile.static and profile.max_batch is None):
        raise ValueError("component_profile needs a resolved ProfileSpec")
    for side in (profile.height, profile.width, *(() if profile.static else (profile.min_side, profile.max_side))):
        if side % vae_scale:
            raise UsageError(f"image sides must be multiples of the VAE scale factor {vae_scale} px, got {side}")
    names: list[str] = []
    for spec in (*entry["inputs"], *entry["outputs"]):
        names += [d for d in spec["shape"] if isinstance(d, str) and d not in names]
    axes = []
    for name in names:
        coef, letter = parse_axis(name)
        if letter == "B":
            lo, opt, hi = _batch_range(component, coef, profile)
        elif letter == "T":  # one prompt chunk is the common case: tuned for it
            lo, opt, hi = coef, coef, coef * profile.max_chunks
        else:
            lo, opt, hi = _side_range(coef, profile.height if letter == "H" else profile.width, profile, vae_scale)
        axes.append(AxisRange(name, lo, opt, hi))
    return ComponentProfile(component, tuple(axes), vae_scale)


def check_shape(profile: ComponentProfile, dims: Mapping[str, int], hint: str = "") -> None:
    """Raise ``ShapeError`` naming the built range when ``dims`` (axis -> size) falls outside ``profile``."""
    bad = []
    for a in profile.axes:
        if a.name not in dims:
            raise ShapeError(f"{profile.component}: no size given for axis {a.name!r}")
        v = int(dims[a.name])
        if not a.min <= v <= a.max:
            bad.append(f"{_value_text(a.name, v, profile.vae_scale)} is outside {_axis_text(a.name, a.min, a.max, profile.vae_scale)}")
    if bad:
        raise ShapeError(f"the {profile.component} engine cannot run this shape: {'; '.join(bad)} "
                         f"(built for {profile.describe()})" + (f"; {hint}" if hint else ""))
