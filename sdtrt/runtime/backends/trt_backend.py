"""TensorRT backend: the WORKDIR's engines, run on the runtime's stream with I/O bound to its static torch buffers.

At load, the engines' sidecars say which flavour built them (TensorRT or TensorRT-RTX, never mixed); every sidecar is
checked against this GPU, this flavour and version, this export and the plan's bytes (stale engines are refused
together, with the commands that rebuild them), then each plan is deserialized once. All execution contexts share
one device-memory scratch, as large as the largest engine needs (``device_memory_size_v2``): the pipeline runs one
engine at a time on one stream, so they never overlap. TensorRT-RTX compiles kernels for this GPU at run time and
keeps them in ``engines/runtime.cache``, loaded at start and saved after a warm-up at a new shape.

A runner keeps, per shape, its buffers and an execution context of its own, bound once (``set_input_shape`` +
``set_tensor_address`` with ``data_ptr()``): a CUDA graph captured at one shape replays the very context and
addresses it recorded, even after other shapes ran in between (TensorRT promises nothing for a context re-bound to
another shape). ``run()`` is one ``execute_async_v3`` on ``torch.cuda.current_stream()``: the pipeline's whole-loop
capture records it. A context is enqueued once eagerly before it may be captured; an enqueue that cannot be captured
raises ``EngineError``, and the pipeline keeps that loop eager.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtrt.engines import compat
from sdtrt.engines.compat import Environment, Flavour
from sdtrt.engines.profiles import ComponentProfile, check_shape
from sdtrt.engines.refit import EngineRefit
from sdtrt.engines.sidecar import (
    engine_path,
    engines_dir,
    read_sidecar,
    rebuild_command,
    recorded_spec,
    stale_message,
    stale_reason,
)
from sdtrt.errors import EngineError, ShapeError
from sdtrt.lora.deltas import LoraDeltas
from sdtrt.lora.targets import LORA_ROOTS
from sdtrt.runtime.backends.base import DTYPES, BufferedRunner, resolve_shape

if TYPE_CHECKING:  # run time goes through a compat.Flavour; this import is for type checkers and the API check
    import tensorrt as trt

log = logging.getLogger(__name__)


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


@dataclass
class _Context:
    context: Any  # trt.IExecutionContext, bound to one shape's buffers
    enqueued: bool = False  # run eagerly at least once: may be captured


class TensorRTRunner(BufferedRunner):
    """One engine over static buffers, one execution context per shape; ``activate`` refuses shapes outside the
    engine's profile. ``new_context`` makes a context pointed at the shared scratch; ``capturable(context, stream)``
    says whether its enqueues may be captured; ``warmed`` runs after a context's first (eager) enqueue."""

    def __init__(self, name: str, entry: Mapping, profile: ComponentProfile, device: torch.device, *,
                 new_context: Callable[[], Any], capturable: Callable[[Any, int], bool],
                 warmed: Callable[[], None] = lambda: None, hint: str = "") -> None:
        super().__init__(name, entry, device)
        self._profile = profile
        self._hint = hint
        self._new_context = new_context
        self._capturable = capturable
        self._warmed = warmed
        self._contexts: dict[tuple, _Context] = {}
        self._ctx: _Context | None = None

    def check(self, dims: Mapping[str, int]) -> None:
        check_shape(self._profile, dims, self._hint)

    def activate(self, dims: Mapping[str, int]) -> None:
        if dict(dims) == self._dims:
            return
        check_shape(self._profile, dims, self._hint)  # before any allocation or TensorRT call
        try:
            super().activate(dims)  # buffers kept per shape, then _bind()
        except torch.cuda.OutOfMemoryError:
            specs = (*self._entry["inputs"], *self._entry["outputs"])
            nbytes = sum(math.prod(resolve_shape(s["shape"], dims)) * DTYPES[s["dtype"]].itemsize for s in specs)
            raise EngineError(f"GPU out of memory allocating the {self.name} engine's I/O buffers for {dict(dims)} "
                              f"({compat.gib(nbytes)})") from None

    def _bind(self) -> None:
        key = tuple(sorted(self._dims.items()))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = _Context(self._new_context())
            self._bind_context(ctx.context)
            self._contexts[key] = ctx
        self._ctx = ctx

    def _bind_context(self, context: Any) -> None:
        for name, t in self.inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ShapeError(f"{self.name}: TensorRT refused shape {tuple(t.shape)} for input {name} "
                                 f"(built for {self._profile.describe()})")
        for name, t in (*self.inputs.items(), *self.outputs.items()):
            if not context.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"{self.name}: TensorRT refused the address of {name} {tuple(t.shape)}")
        for name, t in self.outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if shape != tuple(t.shape):
                raise EngineError(f"{self.name}: the engine computes {name} with shape {shape} where the manifest says "
                                  f"{tuple(t.shape)}; rebuild the engine from this export")

    def run(self) -> None:
        ctx = self._ctx
        if ctx is None:
            raise EngineError(f"{self.name}: run() before activate()")
        stream = _stream_handle(self.device)
        if _capturing():
            if not ctx.enqueued:
                raise EngineError(f"{self.name}: the first run at shape {self._dims} is being captured into a CUDA "
                                  "graph; TensorRT must enqueue it once eagerly before capture")
            if not self._capturable(ctx.context, stream):
                raise EngineError(f"{self.name}: TensorRT says this engine's enqueue cannot be captured into a CUDA "
                                  "graph on this stream")
        if not ctx.context.execute_async_v3(stream):
            raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed at {self._dims}")
        if not ctx.enqueued:
            ctx.enqueued = True
            self._warmed()

    def release(self, dims: Mapping[str, int]) -> None:
        key = tuple(sorted(dict(dims).items()))
        if self._contexts.get(key) is self._ctx:
            self._ctx = None
        self._contexts.pop(key, None)
        super().release(dims)

    def deactivate(self) -> None:
        super().deactivate()
        self._contexts.clear()
        self._ctx = None


class MissingEngineRunner:
    """Stands for a component that was exported but has no engine: fails, clearly, only when it is used."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._message = message

    def check(self, dims: Mapping[str, int]) -> None:
        raise EngineError(self._message)

    def activate(self, dims: Mapping[str, int]) -> None:
        raise EngineError(self._message)

    def run(self) -> None:
        raise EngineError(self._message)

    def release(self, dims: Mapping[str, int]) -> None:
        pass

    def deactivate(self) -> None:
        pass


@dataclass
class LoadedEngine:
    component: str
    engine: Any  # trt.ICudaEngine
    profile: ComponentProfile
    device_memory: int  # bytes of scratch it needs at its largest profile shape


class TensorRTBackend:
    """``TensorRTBackend(workdir, manifest, device)``: loads and checks every engine in ``WORKDIR/engines``."""

    name = "tensorrt"
    capturable = True

    def __init__(self, workdir: Path, manifest: Mapping, device: torch.device) -> None:
        if device.type != "cuda":
            raise EngineError(f"the tensorrt backend runs on a CUDA GPU, not on {device}")
        self.workdir = Path(workdir)
        self.device = device
        self._manifest = manifest
        present = [c for c in manifest["components"] if engine_path(self.workdir, c).is_file()]
        if not present:
            raise EngineError(f"{self.workdir}: no TensorRT engines; build them: `{_cmd('sdtrt', 'build', self.workdir)}`")
        self.flavour = engines_flavour(self.workdir, present)
        trt = self.flavour.module()
        with torch.cuda.device(device):
            env = self.flavour.environment(device)
            self.flavour.check_device(env)
            runtime = trt.Runtime(self.flavour.logger())
            if runtime is None:
                raise EngineError(f"could not create a {self.flavour.title} runtime")
            self._engines = load_engines(runtime, self.flavour, self.workdir, manifest, env, present)
            self._runtime = runtime
            self._scratch = allocate_scratch(self._engines, device)
        self._cache = self.flavour.runtime_cache(engines_dir(self.workdir))
        self._refits = lora_refits(self.flavour, self._engines, manifest, self.workdir)
        log.info("%s: loaded %s; shared scratch %s", self.flavour.label(), ", ".join(self._engines),
                 compat.gib(self._scratch.numel()))

    @property
    def components(self) -> tuple[str, ...]:
        """The components that have a loaded engine."""
        return tuple(self._engines)

    def profile(self, component: str) -> ComponentProfile:
        return self._engines[component].profile

    def runner(self, component: str) -> TensorRTRunner | MissingEngineRunner:
        entry = self._manifest["components"].get(component)
        if entry is None:
            raise EngineError(f"{self.workdir}: the workdir has no {component} graph; export it")
        build = _cmd("sdtrt", "build", self.workdir, "--components", component)
        loaded = self._engines.get(component)
        if loaded is None:
            return MissingEngineRunner(component, f"{self.workdir}: no TensorRT engine for {component}; build it: `{build}`")
        hint = (f"build engines that cover it: `{_cmd('sdtrt', 'build', self.workdir)} --static --batch N --height H "
                "--width W` (one size) or with --dynamic (a range)")

        def new_context() -> Any:
            with torch.cuda.device(self.device):
                return create_context(self.flavour, loaded, self._scratch, self._cache)

        return TensorRTRunner(component, entry, loaded.profile, self.device, new_context=new_context,
                              capturable=self.flavour.capturable, warmed=self.save_cache, hint=hint)

    def apply_lora(self, lora: LoraDeltas) -> None:
        """Refit the LoRA-targetable engines (``sdtrt.engines.refit``); the pipeline re-captures its loops after."""
        with torch.cuda.device(self.device):
            for comp, refit in self._refits.items():
                refit.apply(lora.by_component.get(comp, {}))

    def save_cache(self) -> None:
        """Keep what the flavour compiled at run time (TensorRT-RTX's runtime cache) for the next process."""
        if self._cache is not None:
            self._cache.save()


def lora_refits(flavour: Flavour, engines: Mapping[str, LoadedEngine], manifest: Mapping,
                workdir: Path) -> dict[str, EngineRefit]:
    """An ``EngineRefit`` per loaded engine a LoRA may change (those with a LoRA map in the manifest)."""
    out = {}
    for comp, loaded in engines.items():
        entry = manifest["components"][comp]
        if comp in LORA_ROOTS and "lora" in entry:
            out[comp] = EngineRefit(flavour.module(), flavour.logger(), loaded.engine, comp,
                                    workdir / entry["files"][0]["path"], entry["lora"]["targets"], workdir)
    return out


def engines_flavour(workdir: Path, components: list[str]) -> Flavour:
    """The flavour that built the workdir's engines, from their sidecars (unreadable ones are reported later by
    ``load_engines``); ``EngineError`` when they were built by both."""
    names: dict[str, list[str]] = {}
    for c in components:
        try:
            record = read_sidecar(workdir, c).get("tensorrt") or {}
        except EngineError:
            continue
        names.setdefault(str(record.get("flavour")), []).append(c)
    if len(names) > 1:
        which = "; ".join(f"{', '.join(cs)} with {compat.flavour(n).title if n in compat.FLAVOURS else n}"
                          for n, cs in names.items())
        raise EngineError(f"{workdir}: the engines were built by different TensorRT flavours ({which}); rebuild them "
                          f"with one: `{_cmd('sdtrt', 'build', workdir, '--tensorrt', 'tensorrt')}` or `--tensorrt rtx`")
    name = next(iter(names), "auto")
    return compat.flavour(name if name in compat.FLAVOURS else "auto")


def engines_ready(workdir: Path, manifest: Mapping, device: Any = None) -> str | None:
    """Why ``--backend auto`` must not pick TensorRT for this workdir (one sentence), or None when every exported
    component has an engine that is fresh here. Reads sidecars only (the plans' hashes are checked at load)."""
    components = list(manifest["components"])
    missing = [c for c in components if not engine_path(workdir, c).is_file()]
    if len(missing) == len(components):
        return "no TensorRT engines are built"
    if missing:
        return f"no engine for {', '.join(missing)} (a partial build)"
    try:
        flavour = engines_flavour(workdir, components)
        if not flavour.installed():
            return f"the engines were built with {flavour.title}, which is not installed"
        env = flavour.environment(device)
        flavour.check_device(env)
        for c in components:
            reason = stale_reason(read_sidecar(workdir, c), component=c, manifest=manifest, env=env)
            if reason is not None:
                return reason
    except EngineError as e:
        return str(e)
    return None


def _cmd(*args: Any) -> str:
    return shlex.join(str(a) for a in args)


def load_engines(runtime: trt.Runtime, flavour: Flavour, workdir: Path, manifest: Mapping, env: Environment,
                 components: list[str]) -> dict[str, LoadedEngine]:
    """Check every sidecar and plan hash (all problems reported together), deserializing each fresh plan once."""
    problems: list[tuple[str, str, Any]] = []
    engines: dict[str, LoadedEngine] = {}
    for c in components:
        try:
            sidecar = read_sidecar(workdir, c)
        except EngineError as e:
            problems.append((c, str(e).split("; rebuild")[0], None))
            continue
        spec = recorded_spec(sidecar)
        reason = stale_reason(sidecar, component=c, manifest=manifest, env=env)
        if reason is None:
            data = engine_path(workdir, c).read_bytes()
            reason = stale_reason(sidecar, component=c, manifest=manifest, env=env,
                                  plan_sha256=hashlib.sha256(data).hexdigest())
        if reason is not None:
            problems.append((c, reason, spec))
            continue
        if not problems:  # once one is stale the load fails: only keep checking
            engine = deserialize(runtime, flavour, data, c, engine_path(workdir, c))
            del data
            profile = ComponentProfile.from_json(sidecar["profile"])
            check_engine_io(flavour.module(), engine, manifest["components"][c], sidecar, c, workdir)
            engines[c] = LoadedEngine(c, engine, profile, int(engine.device_memory_size_v2))
    if problems:
        raise EngineError(stale_message(workdir, problems))
    return engines


def deserialize(runtime: trt.Runtime, flavour: Flavour, data: bytes, component: str, path: Path) -> trt.ICudaEngine:
    with flavour.logger().capture() as messages:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        oom, asked = compat.out_of_memory(messages)
        if oom:
            what = f" (TensorRT asked for {compat.gib(asked)})" if asked else ""
            raise EngineError(f"GPU out of memory loading the {component} engine: its plan holds {compat.gib(len(data))} "
                              f"of weights{what}; free GPU memory or use a smaller model/precision")
        raise EngineError(f"{flavour.title} could not load {path}: {compat.errors_text(messages)}")
    return engine


def check_engine_io(trt: Any, engine: trt.ICudaEngine, entry: Mapping, sidecar: Mapping, component: str,
                    workdir: Path) -> None:
    """The engine's I/O names, modes, dtypes and profile shapes are what the manifest and sidecar say."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    modes = {n: engine.get_tensor_mode(n) for n in names}
    got_in = {n: compat.dtype_name(trt, engine.get_tensor_dtype(n)) for n in names if modes[n] == trt.TensorIOMode.INPUT}
    got_out = {n: compat.dtype_name(trt, engine.get_tensor_dtype(n)) for n in names if modes[n] == trt.TensorIOMode.OUTPUT}
    want_in = {s["name"]: s["dtype"] for s in entry["inputs"]}
    want_out = {s["name"]: s["dtype"] for s in entry["outputs"]}
    again = f"rebuild it: `{rebuild_command(workdir, recorded_spec(sidecar), [component])}`"
    if (got_in, got_out) != (want_in, want_out):
        raise EngineError(f"the {component} engine has inputs {got_in} and outputs {got_out}, the manifest says "
                          f"{want_in} and {want_out}; {again}")
    if engine.num_optimization_profiles != 1:
        raise EngineError(f"the {component} engine has {engine.num_optimization_profiles} optimization profiles, "
                          f"sdtrt builds one; {again}")
    for name, recorded in sidecar["input_shapes"].items():
        actual = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
        if actual != recorded:
            raise EngineError(f"the {component} engine's profile for {name} is {actual}, its sidecar says {recorded}; {again}")


def allocate_scratch(engines: Mapping[str, LoadedEngine], device: torch.device) -> torch.Tensor:
    """One uint8 CUDA buffer as large as the largest engine's ``device_memory_size_v2``, shared by all contexts."""
    biggest = max(engines.values(), key=lambda e: e.device_memory)
    size = max(biggest.device_memory, 1)
    try:
        return torch.empty(size, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        raise EngineError(f"GPU out of memory allocating {compat.gib(size)} of TensorRT scratch memory (the "
                          f"{biggest.component} engine's activations at its largest profile shape); free GPU memory "
                          "or build a smaller profile (--static, or lower --max-batch / --max-side)") from None


def create_context(flavour: Flavour, loaded: LoadedEngine, scratch: torch.Tensor,
                   cache: compat.RuntimeCache | None = None) -> trt.IExecutionContext:
    """An execution context without memory of its own, pointed at the shared scratch."""
    if scratch.numel() < loaded.device_memory:
        raise EngineError(f"{loaded.component}: shared scratch of {scratch.numel()} bytes is below the "
                          f"{loaded.device_memory} the engine needs")
    context = flavour.create_context(loaded.engine, loaded.component, cache)
    context.set_device_memory(scratch.data_ptr(), scratch.numel())  # returns None; size checked above
    return context
