"""TensorRT backend: the WORKDIR's engines, run on the runtime's stream with I/O bound to its static torch buffers.

At load, every engine's sidecar is checked against this GPU, this TensorRT, this export and the plan's bytes (stale
engines are refused together, with the commands that rebuild them), then each plan is deserialized once. All
execution contexts share one device-memory scratch, as large as the largest engine needs
(``device_memory_size_v2``): the pipeline runs one engine at a time on one stream, so they never overlap.

A runner binds its buffers once per shape (``set_input_shape`` + ``set_tensor_address`` with ``data_ptr()``) and
keeps the buffers of every shape it has run, so a CUDA graph captured for one shape still finds its buffers after
another shape ran. ``run()`` is one ``execute_async_v3`` on ``torch.cuda.current_stream()``: the pipeline's whole-loop
capture records it; TensorRT needs one eager enqueue after a shape change before it is captured.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtrt.engines import compat
from sdtrt.engines.profiles import ComponentProfile, check_shape
from sdtrt.engines.sidecar import (
    Environment,
    current_environment,
    engine_path,
    read_sidecar,
    rebuild_command,
    recorded_spec,
    stale_message,
    stale_reason,
)
from sdtrt.errors import EngineError, ShapeError
from sdtrt.runtime.backends.base import DTYPES, BufferedRunner, resolve_shape

if TYPE_CHECKING:  # run time goes through compat.tensorrt(); this import is for type checkers and the API check
    import tensorrt as trt

log = logging.getLogger(__name__)


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


class TensorRTRunner(BufferedRunner):
    """One execution context over static buffers; ``activate`` refuses shapes outside the engine's profile."""

    def __init__(self, name: str, entry: Mapping, context: trt.IExecutionContext, profile: ComponentProfile,
                 device: torch.device, hint: str = "") -> None:
        super().__init__(name, entry, device)
        self._context = context
        self._profile = profile
        self._hint = hint
        self._enqueued = False  # since the last (re)binding

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
        ctx = self._context
        for name, t in self.inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ShapeError(f"{self.name}: TensorRT refused shape {tuple(t.shape)} for input {name} "
                                 f"(built for {self._profile.describe()})")
        for name, t in (*self.inputs.items(), *self.outputs.items()):
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"{self.name}: TensorRT refused the address of {name} {tuple(t.shape)}")
        for name, t in self.outputs.items():
            shape = tuple(ctx.get_tensor_shape(name))
            if shape != tuple(t.shape):
                raise EngineError(f"{self.name}: the engine computes {name} with shape {shape} where the manifest says "
                                  f"{tuple(t.shape)}; rebuild the engine from this export")
        self._enqueued = False

    def run(self) -> None:
        if not self._enqueued and _capturing():
            raise EngineError(f"{self.name}: the first run at a new shape is being captured into a CUDA graph; "
                              "TensorRT must enqueue it once eagerly before capture")
        if not self._context.execute_async_v3(_stream_handle(self.device)):
            raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed at {self._dims}")
        self._enqueued = True



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
        trt = compat.tensorrt()
        if device.type != "cuda":
            raise EngineError(f"the tensorrt backend runs on a CUDA GPU, not on {device}")
        self.workdir = Path(workdir)
        self.device = device
        self._manifest = manifest
        with torch.cuda.device(device):
            env = current_environment(device)
            present = [c for c in manifest["components"] if engine_path(self.workdir, c).is_file()]
            if not present:
                raise EngineError(f"{self.workdir}: no TensorRT engines; build them: `{_cmd('sdtrt', 'build', self.workdir)}`")
            runtime = trt.Runtime(compat.logger())
            if runtime is None:
                raise EngineError("could not create a TensorRT runtime")
            self._engines = load_engines(runtime, self.workdir, manifest, env, present)
            self._runtime = runtime
            self._scratch = allocate_scratch(self._engines, device)
        log.info("tensorrt: loaded %s; shared scratch %s", ", ".join(self._engines), compat.gib(self._scratch.numel()))

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
        with torch.cuda.device(self.device):
            context = create_context(loaded, self._scratch)
        hint = (f"build engines that cover it: `{_cmd('sdtrt', 'build', self.workdir)} --static --batch N --height H "
                "--width W` (one size) or with --dynamic (a range)")
        return TensorRTRunner(component, entry, context, loaded.profile, self.device, hint)


def _cmd(*args: Any) -> str:
    return shlex.join(str(a) for a in args)


def load_engines(runtime: trt.Runtime, workdir: Path, manifest: Mapping, env: Environment,
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
            engine = deserialize(runtime, data, c, engine_path(workdir, c))
            del data
            profile = ComponentProfile.from_json(sidecar["profile"])
            check_engine_io(engine, manifest["components"][c], sidecar, c, workdir)
            engines[c] = LoadedEngine(c, engine, profile, int(engine.device_memory_size_v2))
    if problems:
        raise EngineError(stale_message(workdir, problems))
    return engines


def deserialize(runtime: trt.Runtime, data: bytes, component: str, path: Path) -> trt.ICudaEngine:
    with compat.logger().capture() as messages:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        oom, asked = compat.out_of_memory(messages)
        if oom:
            what = f" (TensorRT asked for {compat.gib(asked)})" if asked else ""
            raise EngineError(f"GPU out of memory loading the {component} engine: its plan holds {compat.gib(len(data))} "
                              f"of weights{what}; free GPU memory or use a smaller model/precision")
        raise EngineError(f"TensorRT could not load {path}: {compat.errors_text(messages)}")
    return engine


def check_engine_io(engine: trt.ICudaEngine, entry: Mapping, sidecar: Mapping, component: str, workdir: Path) -> None:
    """The engine's I/O names, modes, dtypes and profile shapes are what the manifest and sidecar say."""
    trt = compat.tensorrt()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    modes = {n: engine.get_tensor_mode(n) for n in names}
    got_in = {n: compat.dtype_name(engine.get_tensor_dtype(n)) for n in names if modes[n] == trt.TensorIOMode.INPUT}
    got_out = {n: compat.dtype_name(engine.get_tensor_dtype(n)) for n in names if modes[n] == trt.TensorIOMode.OUTPUT}
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


def create_context(loaded: LoadedEngine, scratch: torch.Tensor) -> trt.IExecutionContext:
    """An execution context without memory of its own, pointed at the shared scratch."""
    trt = compat.tensorrt()
    context = loaded.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise EngineError(f"TensorRT could not create an execution context for the {loaded.component} engine")
    if scratch.numel() < loaded.device_memory:
        raise EngineError(f"{loaded.component}: shared scratch of {scratch.numel()} bytes is below the "
                          f"{loaded.device_memory} the engine needs")
    context.set_device_memory(scratch.data_ptr(), scratch.numel())  # returns None; size checked above
    return context
