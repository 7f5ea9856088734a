"""The one module that imports TensorRT, and the one place that knows how its versions differ.

sdtrt targets TensorRT 10.12+ and 11.x with strongly typed networks only: precision comes from the ONNX graphs the
exporter writes (fp16 where it said fp16, fp32 islands where it kept them), never from builder precision flags
(TensorRT 11 removed ``BuilderFlag.FP16`` and all weak typing). What differs between the supported versions:

* ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` must be passed to ``create_network`` on 10.x; on 11.x every
  network is strongly typed and the flag is deprecated, so nothing is passed (``network_flags``).
* Releases before 10.12 lack parts of the name-based API used here (``device_memory_size_v2``,
  ``set_device_memory(ptr, size)``, ``IProgressMonitor``) and are refused by ``tensorrt()``.

Other modules get the module from ``tensorrt()`` (imported lazily, so ``import sdtrt`` never needs TensorRT) and
import it only under ``TYPE_CHECKING``, which keeps them visible to type checkers and to the TensorRT API check.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from sdtrt.errors import EngineError

log = logging.getLogger(__name__)

MIN_VERSION = (10, 12)
MISSING = "TensorRT is not installed: pip install 'sdtrt[tensorrt]' on a machine with an NVIDIA GPU"

_trt: ModuleType | None = None
_logger: Any = None
_lock = threading.Lock()


def version_tuple(text: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; stops at the first part that is not a number."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def tensorrt() -> ModuleType:
    """The ``tensorrt`` module, imported once. ``EngineError`` when it is missing, cannot load or is too old."""
    global _trt
    if _trt is not None:
        return _trt
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"{MISSING} ({e})") from None
    except OSError as e:  # the bindings are there but libnvinfer (or CUDA) could not be loaded
        raise EngineError(f"TensorRT is installed but could not be loaded ({e}); check the CUDA driver and libraries") from None
    # __version__ is set by the tensorrt package's __init__.py, not by the bindings, so the .api lists omit it.
    found = getattr(trt, "__version__", "0")
    if version_tuple(found) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise EngineError(f"TensorRT {found} is too old: sdtrt needs TensorRT {need} or newer (pip install 'sdtrt[tensorrt]')")
    _trt = trt
    return trt


def version() -> str:
    """The TensorRT version string, e.g. ``"10.13.0.35"`` (recorded in every engine's sidecar)."""
    return str(getattr(tensorrt(), "__version__", "unknown"))


def major() -> int:
    return version_tuple(version())[0]


def network_flags() -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT."""
    trt = tensorrt()
    if major() >= 11:
        return 0  # always strongly typed; the flag is deprecated
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def dtype_name(dtype: Any) -> str:
    """A ``trt.DataType`` as the manifest spells dtypes (``float16``, ``int32``, ...)."""
    trt = tensorrt()
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


def logger() -> Any:
    """The process's one TensorRT logger (TensorRT keeps the first logger it is given): forwards to ``logging``
    and lets a caller ``capture()`` the warnings and errors of one build or load for its error message."""
    global _logger
    with _lock:
        if _logger is None:
            _logger = _make_logger(tensorrt())()
        return _logger


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
            self._mutex = threading.Lock()  # TensorRT logs from its own threads

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.WARNING)
            log.log(level, "[TRT] %s", msg)
            if level >= logging.WARNING:
                with self._mutex:
                    for messages in self._captures:
                        messages.append((level, msg))

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

    return Logger


_OOM = re.compile(r"out of memory|outofmemory|could not be allocated|insufficient memory|allocator error|"
                  r"cudaErrorMemoryAllocation", re.I)
_ASKED = re.compile(r"(?:Requested amount of (?:GPU )?memory|requested size of|allocating)\s*\(?(\d+)(?:\s*bytes|-byte)?", re.I)


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
