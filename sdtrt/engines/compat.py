"""The one module that imports TensorRT, and the one place that knows how its flavours and versions differ.

Two flavours build and run sdtrt's engines, each behind one ``Flavour`` adapter:

* **TensorRT** 10.12+ / 11.x (``import tensorrt``): every NVIDIA GPU, and the only one for the data-center GPUs
  (Hopper 9.0, Blackwell 10.0). Builds on the GPU it runs on; a plan is tied to that GPU model and TensorRT version.
  Keeps a persistent *timing cache* (``engines/timing.cache``) between builds.
* **TensorRT-RTX** 1.x (``import tensorrt_rtx``): GPUs of compute capability 7.5, 8.0, 8.6, 8.9, 12.0 and 12.1
  (Turing, Ampere, Ada, Blackwell RTX/GeForce and workstation). Builds ahead of time for a list of compute
  capabilities (``--target``), on a machine without a GPU; kernels are specialised on the user's GPU at run time and
  kept in a persistent *runtime cache* (``engines/runtime.cache``); its timing-cache calls are no-ops.

What differs, and where it is handled here: the module and its minimum version (``module``), strong typing
(``network_flags``: the flag is required on 10.x and deprecated since 11.0 / in RTX), compute-capability targets
(``resolve_targets``, ``configure_build``), the build cache (``build_cache``), what makes a plan stale on this machine
(``mismatch``), which GPUs can run a plan (``check_device``), and how execution contexts are made and captured
(``create_context``, ``capturable``). Other modules get the module through a flavour (imported lazily, so
``import sdtrt`` never needs TensorRT) and import ``tensorrt`` only under ``TYPE_CHECKING``, which keeps them
visible to type checkers and to the TensorRT API check; names only one flavour has are used only in this module.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sdtrt.errors import EngineError, UsageError
from sdtrt.fsutil import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:  # run time goes through Flavour.module(); these imports are for type checkers and the API check
    import tensorrt as trt  # noqa: F401
    import tensorrt_rtx as rtx  # noqa: F401

log = logging.getLogger(__name__)

FLAVOURS: tuple[str, ...] = ("auto", "tensorrt", "rtx")
# TensorRT-RTX's ComputeCapability members, as --target spells them, and the compute capability each means
RTX_TARGETS: dict[str, str] = {"sm75": "7.5", "sm80": "8.0", "sm86": "8.6", "sm89": "8.9", "sm120": "12.0",
                               "sm121": "12.1"}


@dataclass(frozen=True)
class Environment:
    """What a build or a load happens on: the flavour, its version, and the GPU (None: no GPU visible)."""

    flavour: str  # "tensorrt" | "rtx"
    version: str
    gpu_name: str | None
    compute_capability: str | None  # "8.9"

    def gpu_text(self) -> str:
        if self.gpu_name is None:
            return "no GPU"
        return f"{self.gpu_name} (compute capability {self.compute_capability})"


def version_tuple(text: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; stops at the first part that is not a number."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def sm_name(compute_capability: str) -> str:
    """``"8.9"`` -> ``"sm89"``."""
    return "sm" + compute_capability.replace(".", "")


def visible_gpu(device: Any = None) -> tuple[str, str] | None:
    """(name, compute capability) of the current (or given) CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return props.name, f"{props.major}.{props.minor}"


class Flavour:
    """One TensorRT flavour. Subclasses fill in the differences; everything else is shared."""

    name = ""
    title = ""
    module_name = ""
    extra = ""  # the pip extra that installs it
    min_version: tuple[int, ...] = ()

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._logger: Any = None
        self._lock = threading.Lock()

    # -- the module --------------------------------------------------------------------------------------------
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module_name) is not None

    def module(self) -> ModuleType:
        """The flavour's module, imported once. ``EngineError`` when it is missing, cannot load or is too old."""
        if self._module is not None:
            return self._module
        try:
            mod = importlib.import_module(self.module_name)
        except ImportError as e:
            raise EngineError(f"{self.title} is not installed: pip install 'sdtrt[{self.extra}]' ({e})") from None
        except OSError as e:  # the bindings are there but the library (or CUDA) could not be loaded
            raise EngineError(f"{self.title} is installed but could not be loaded ({e}); check the CUDA driver "
                              "and libraries") from None
        # __version__ is set by the package's __init__.py, not by the bindings, so the .api lists omit it.
        found = str(getattr(mod, "__version__", "0"))
        if version_tuple(found) < self.min_version:
            need = ".".join(map(str, self.min_version))
            raise EngineError(f"{self.title} {found} is too old: sdtrt needs {self.title} {need} or newer "
                              f"(pip install -U 'sdtrt[{self.extra}]')")
        self._module = mod
        return mod

    def version(self) -> str:
        """The version string, e.g. ``"10.13.0.35"`` (recorded in every engine's sidecar)."""
        return str(getattr(self.module(), "__version__", "unknown"))

    def label(self) -> str:
        return f"{self.title} {self.version()}"

    def logger(self) -> Any:
        """The process's one logger for this flavour (TensorRT keeps the first logger it is given): forwards to
        ``logging`` and lets a caller ``capture()`` the warnings and errors of one build or load."""
        with self._lock:
            if self._logger is None:
                self._logger = _make_logger(self.module())()
            return self._logger

    def network_flags(self) -> int:
        return 0  # strongly typed always (TensorRT 11, TensorRT-RTX: the flag is deprecated and ignored)

    # -- building ------------------------------------------------------------------------------------------------
    def environment(self, device: Any = None) -> Environment:
        gpu = visible_gpu(device)
        return Environment(self.name, self.version(), *(gpu or (None, None)))

    def check_targets(self, targets: tuple[str, ...]) -> None:
        """``UsageError`` for ``--target`` values this flavour cannot build for (before anything is imported)."""

    def resolve_targets(self, targets: tuple[str, ...], env: Environment) -> tuple[str, ...]:
        """The compute capabilities a build is for (``--target``); empty means "the GPU it runs on"."""
        return targets

    def check_refit(self, refit: bool, env: Environment) -> None:
        """``UsageError`` when refittable engines cannot be built on ``env``."""

    def configure_build(self, config: Any, targets: tuple[str, ...]) -> list[str]:
        """Flavour-specific builder settings; returns the flags set, for the sidecar."""
        return []

    def build_cache(self, path: Path, env: Environment) -> BuildCache:
        """The cache a build reuses, kept at ``path`` (the workdir's ``engines/timing.cache``)."""
        return BuildCache()

    # -- plans on this machine ---------------------------------------------------------------------------------
    def mismatch(self, record: Mapping[str, Any], env: Environment) -> str | None:
        """Why a plan built as ``record`` (a sidecar's ``tensorrt`` and ``gpu``) cannot run on ``env``, or None."""
        if record.get("flavour") != self.name:
            return f"it was built with {_title(record.get('flavour'))}, not {self.title}"
        if record.get("version") != env.version:
            return (f"it was built with {self.title} {record.get('version')}, this is {self.title} {env.version} "
                    "(a plan only loads in the version that built it)")
        return None

    def check_device(self, env: Environment) -> None:
        """``EngineError`` when plans of this flavour cannot run on ``env``'s GPU at all."""
        if env.gpu_name is None:
            raise EngineError(f"no CUDA GPU is visible: {self.title} engines run on an NVIDIA GPU")

    def create_context(self, engine: Any, component: str, cache: RuntimeCache | None = None) -> Any:
        """An execution context without device memory of its own (the caller points it at shared scratch)."""
        trt = self.module()
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError(f"{self.title} could not create an execution context for the {component} engine")
        return context

    def capturable(self, context: Any, stream: int) -> bool:
        """Whether ``context``'s enqueues on ``stream`` may be recorded into a CUDA graph."""
        return True

    def runtime_cache(self, engines_dir: Path) -> RuntimeCache | None:
        """The persistent cache of kernels compiled at run time, where the flavour has one."""
        return None


class TensorRT(Flavour):
    name = "tensorrt"
    title = "TensorRT"
    module_name = "tensorrt"
    extra = "tensorrt"
    min_version = (10, 12)  # name-based I/O, device_memory_size_v2, set_device_memory(ptr, size), IProgressMonitor

    def network_flags(self) -> int:
        trt = self.module()
        if version_tuple(self.version())[0] >= 11:
            return 0  # always strongly typed; the flag is deprecated
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def environment(self, device: Any = None) -> Environment:
        env = super().environment(device)
        if env.gpu_name is None:
            raise EngineError("no CUDA GPU is visible: TensorRT builds and runs engines on the GPU they are for "
                              "(TensorRT-RTX builds ahead of time without one: --tensorrt rtx --target sm89)")
        return env

    def check_targets(self, targets: tuple[str, ...]) -> None:
        if targets:
            raise UsageError("--target is for TensorRT-RTX (--tensorrt rtx): TensorRT builds for the GPU it runs on")

    def build_cache(self, path: Path, env: Environment) -> BuildCache:
        return TimingCache(path, env)

    def mismatch(self, record: Mapping[str, Any], env: Environment) -> str | None:
        reason = super().mismatch(record, env)
        if reason is not None:
            return reason
        gpu = record.get("gpu") or {}
        if (gpu.get("name"), gpu.get("compute_capability")) != (env.gpu_name, env.compute_capability):
            return (f"it was built for {gpu.get('name')} (compute capability {gpu.get('compute_capability')}), "
                    f"this GPU is {env.gpu_text()}")
        return None


class TensorRTRTX(Flavour):
    name = "rtx"
    title = "TensorRT-RTX"
    module_name = "tensorrt_rtx"
    extra = "tensorrt-rtx"
    min_version = (1, 7)

    def check_targets(self, targets: tuple[str, ...]) -> None:
        unknown = [t for t in targets if t not in RTX_TARGETS]
        if unknown:
            raise UsageError(f"unknown --target {', '.join(unknown)}; TensorRT-RTX builds for "
                             f"{', '.join(RTX_TARGETS)}")

    def resolve_targets(self, targets: tuple[str, ...], env: Environment) -> tuple[str, ...]:
        if targets:
            return tuple(dict.fromkeys(targets))
        if env.compute_capability is None:
            raise UsageError("no GPU is visible: say which GPUs to build for with --target (e.g. --target sm89 for "
                             f"Ada; any of {', '.join(RTX_TARGETS)})")
        self.check_device(env)
        return (sm_name(env.compute_capability),)

    def check_refit(self, refit: bool, env: Environment) -> None:
        if refit and env.gpu_name is None:  # its refit path compiles the graph with CUDA at build time
            raise UsageError("TensorRT-RTX builds refittable engines (--refit, for LoRA) only on a machine with an "
                             "NVIDIA GPU; build without --refit here, or with --refit on the GPU")

    def configure_build(self, config: Any, targets: tuple[str, ...]) -> list[str]:
        rtx = self.module()
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            config.set_compute_capability(getattr(rtx.ComputeCapability, target.upper()), i)
        # the runtime's own whole-loop CUDA graph captures enqueues: no allocations inside them
        config.set_flag(rtx.BuilderFlag.REQUIRE_USER_ALLOCATION)
        return ["REQUIRE_USER_ALLOCATION"]

    def mismatch(self, record: Mapping[str, Any], env: Environment) -> str | None:
        reason = super().mismatch(record, env)
        if reason is not None or env.compute_capability is None:
            return reason
        targets = list(record.get("targets") or [])
        if sm_name(env.compute_capability) not in targets:
            return (f"it was built for {', '.join(targets) or 'no target'}, this GPU is {env.gpu_text()} "
                    f"({sm_name(env.compute_capability)})")
        return None

    def check_device(self, env: Environment) -> None:
        super().check_device(env)
        assert env.compute_capability is not None
        if sm_name(env.compute_capability) not in RTX_TARGETS:
            raise EngineError(f"TensorRT-RTX does not run on {env.gpu_text()}: it supports compute capabilities "
                              f"{', '.join(RTX_TARGETS.values())}; use TensorRT (pip install 'sdtrt[tensorrt]', "
                              "sdtrt build --tensorrt tensorrt)")

    def create_context(self, engine: Any, component: str, cache: RuntimeCache | None = None) -> Any:
        rtx = self.module()
        config = engine.create_runtime_config()
        if config is None:
            raise EngineError(f"TensorRT-RTX could not create a runtime config for the {component} engine")
        config.set_execution_context_allocation_strategy(rtx.ExecutionContextAllocationStrategy.USER_MANAGED)
        if cache is not None and not config.set_runtime_cache(cache.cache_for(config)):
            log.warning("%s: TensorRT-RTX refused the runtime cache; kernels are compiled anew", component)
        context = engine.create_execution_context(config)
        if context is None:
            raise EngineError(f"TensorRT-RTX could not create an execution context for the {component} engine")
        return context

    def capturable(self, context: Any, stream: int) -> bool:
        return bool(context.is_stream_capturable(stream))

    def runtime_cache(self, engines_dir: Path) -> RuntimeCache:
        return RuntimeCache(engines_dir / "runtime.cache")


_FLAVOURS: dict[str, Flavour] = {"tensorrt": TensorRT(), "rtx": TensorRTRTX()}


def _title(name: Any) -> str:
    f = _FLAVOURS.get(str(name))
    return f.title if f is not None else f"an unknown TensorRT flavour ({name!r})"


def flavour(name: str) -> Flavour:
    """The flavour ``name`` means: ``tensorrt``, ``rtx``, or ``auto`` (TensorRT when importable, else TensorRT-RTX)."""
    if name not in FLAVOURS:
        raise UsageError(f"unknown --tensorrt {name!r}; choose one of {', '.join(FLAVOURS)}")
    if name != "auto":
        return _FLAVOURS[name]
    for f in _FLAVOURS.values():
        if f.installed():
            return f
    raise EngineError("neither TensorRT nor TensorRT-RTX is installed: pip install 'sdtrt[tensorrt]' (any NVIDIA "
                      "GPU) or 'sdtrt[tensorrt-rtx]' (RTX GPUs; also builds ahead of time without a GPU)")


# -- caches -------------------------------------------------------------------------------------------------------
class BuildCache:
    """What a builder reuses between builds; nothing by default (TensorRT-RTX has no timing cache)."""

    def load(self, config: Any) -> None:
        pass

    def save(self, config: Any) -> None:
        pass


class TimingCache(BuildCache):
    """TensorRT's persistent timing cache, with a provenance file beside it (``timing.cache.json``): a cache from
    another GPU or TensorRT version is dropped with a warning. TensorRT itself cannot say so: an unreadable blob
    comes back as an empty cache that it accepts."""

    def __init__(self, path: Path, env: Environment) -> None:
        self.path = path
        self.meta_path = path.with_name(path.name + ".json")
        self._env = env

    def _provenance(self) -> dict[str, Any]:
        env = self._env
        return {"flavour": env.flavour, "version": env.version, "gpu": env.gpu_name,
                "compute_capability": env.compute_capability}

    def load(self, config: Any) -> None:
        data = self.path.read_bytes() if self.path.is_file() else b""
        if data:
            try:
                made = json.loads(self.meta_path.read_text())
            except (OSError, ValueError):
                made = None
            if made != self._provenance():
                log.warning("ignoring timing cache %s: made by %s, not by this GPU and TensorRT", self.path,
                            "an unknown build" if made is None else f"{made.get('gpu')} with {made.get('version')}")
                data = b""
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineError("TensorRT could not set up its timing cache")

    def save(self, config: Any) -> None:
        """Merge this build's timings with what is on disk now (another build may have saved since) and save."""
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("TensorRT returned no timing cache; %s not updated", self.path)
            return
        if self.path.is_file():
            disk = config.create_timing_cache(self.path.read_bytes())
            if disk is None or not cache.combine(disk, False):
                log.warning("could not merge %s into this build's timings; overwriting it", self.path)
        data = cache.serialize()
        if data is None:
            log.warning("TensorRT could not serialize the timing cache; %s not updated", self.path)
            return
        try:
            self.meta_path.unlink(missing_ok=True)
            write_bytes_atomic(self.path, bytes(memoryview(data)))
            write_json_atomic(self.meta_path, self._provenance())
        except OSError as e:  # the engine is fine without it
            log.warning("could not save the timing cache %s: %s", self.path, e)


class RuntimeCache:
    """TensorRT-RTX's runtime cache (kernels it compiled for this GPU), one per backend, shared by every context.
    Loaded at start; TensorRT-RTX checks the blob against this GPU, driver and version and refuses it otherwise
    (``deserialize`` returns False: it is then replaced). ``save`` writes it atomically when it grew."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: Any = None
        self._saved_size = 0

    def cache_for(self, config: Any) -> Any:
        if self._cache is None:
            cache = config.create_runtime_cache()
            if cache is None:
                raise EngineError("TensorRT-RTX could not create a runtime cache")
            data = self.path.read_bytes() if self.path.is_file() else b""
            if data and not cache.deserialize(data):
                log.warning("ignoring runtime cache %s: made on another GPU, driver or TensorRT-RTX version, or "
                            "corrupt; kernels are compiled anew", self.path)
                data = b""  # replaced by this GPU's at the next save, whatever its size
            self._saved_size = len(data)
            self._cache = cache
        return self._cache

    def save(self) -> None:
        if self._cache is None:
            return
        blob = self._cache.serialize()
        data = bytes(memoryview(blob)) if blob is not None else b""
        if len(data) <= self._saved_size:
            return
        try:
            write_bytes_atomic(self.path, data)
            self._saved_size = len(data)
        except OSError as e:  # kernels are compiled again next time
            log.warning("could not save the runtime cache %s: %s", self.path, e)


# -- shared helpers -------------------------------------------------------------------------------------------------
def dtype_name(trt: ModuleType, dtype: Any) -> str:
    """A ``trt.DataType`` as the manifest spells dtypes (``float16``, ``int32``, ...)."""
    names = {
        trt.DataType.FLOAT: "float32",
        trt.DataType.HALF: "float16",
        trt.DataType.BF16: "bfloat16",
        trt.DataType.INT32: "int32",
        trt.DataType.INT64: "int64",
        trt.DataType.UINT8: "uint8",
        trt.DataType.BOOL: "bool",
    }
    return names.get(dtype, str(dtype))


def _make_logger(trt: ModuleType) -> type:
    levels = {
        trt.ILogger.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.ERROR: logging.ERROR,
        trt.ILogger.WARNING: logging.WARNING,
        trt.ILogger.INFO: logging.DEBUG,  # TensorRT's INFO is chatty; keep it out of normal logs
        trt.ILogger.VERBOSE: logging.DEBUG - 1,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            super().__init__()
            self._captures: list[list[tuple[int, str]]] = []
            self._watches: list[tuple[re.Pattern, list[str]]] = []
            self._mutex = threading.Lock()  # TensorRT logs from its own threads

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.WARNING)
            with self._mutex:
                captured = bool(self._captures) and level >= logging.WARNING
                for messages in self._captures if captured else ():
                    messages.append((level, msg))
                for pattern, found in self._watches:
                    if pattern.search(msg):
                        found.append(msg)
            # errors inside a capture reach the user in the exception built from them: logged once, not twice
            log.log(logging.DEBUG if captured and level >= logging.ERROR else level, "[TRT] %s", msg)

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[tuple[int, str]]]:
            """Collect the (level, message) of every warning and error logged inside the block."""
            messages: list[tuple[int, str]] = []
            with self._mutex:
                self._captures.append(messages)
            try:
                yield messages
            finally:
                with self._mutex:
                    self._captures.remove(messages)

        @contextlib.contextmanager
        def watch(self, pattern: re.Pattern) -> Iterator[list[str]]:
            """Collect the messages of any severity that match ``pattern`` (what the builder reports it did)."""
            entry: tuple[re.Pattern, list[str]] = (pattern, [])
            with self._mutex:
                self._watches.append(entry)
            try:
                yield entry[1]
            finally:
                with self._mutex:
                    self._watches.remove(entry)

    return Logger


_OOM = re.compile(r"out of memory|outofmemory|could not be allocated|insufficient memory|allocator error|"
                  r"cudaErrorMemoryAllocation", re.I)
_ASKED = re.compile(r"(?:Requested amount of (?:GPU )?memory|requested size (?:of|was)|allocating)\s*\(?(\d+)"
                    r"(?:\s*bytes|-byte)?", re.I)


def out_of_memory(messages: list[tuple[int, str]]) -> tuple[bool, int | None]:
    """Whether captured TensorRT log lines report a GPU allocation failure, and the largest size asked for (bytes)."""
    oom = any(_OOM.search(m) for _, m in messages)
    asked = [int(n) for _, m in messages for n in _ASKED.findall(m)]
    return oom, (max(asked) if asked else None)


def errors_text(messages: list[tuple[int, str]], last: int = 3) -> str:
    """The last few errors TensorRT logged (warnings when there were none), for an exception message."""
    errors = [m for level, m in messages if level >= logging.ERROR] or [m for _, m in messages]
    return " | ".join(m.strip() for m in errors[-last:]) or "TensorRT logged no error"


def gib(nbytes: int | float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
