"""Peak memory of one request: GPU memory on CUDA, the process's resident set on CPU.

All contenders live in one process, so absolute figures include everyone's weights; the deltas (peak during a
request over what was in use just before it, and what loading a contender added) are the per-contender figures.
On CUDA, ``torch.cuda.max_memory_allocated`` sees only PyTorch's allocator (diffusers, the torch backend, sdtrt's
static buffers); TensorRT and ONNX Runtime allocate outside it, so the device-wide used memory
(``cudaMemGetInfo``) is recorded beside it. On Linux the resident high-water mark is reset through
``/proc/self/clear_refs`` before each request.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def gpu_used_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def in_use_bytes(cuda: bool) -> int | None:
    """What loading a contender adds to: device-wide used memory on CUDA, resident set on CPU."""
    return gpu_used_bytes() if cuda else rss_bytes()


class PeakProbe:
    """``start()`` just before a request, ``stop()`` just after: ``{"peak_bytes", "peak_delta_bytes", ...}``."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._hwm_resettable = True
        self._before = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
            return
        self._before = rss_bytes() or 0
        if self._hwm_resettable:
            try:
                _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (Linux >= 4.0)
            except OSError as e:
                log.info("cannot reset the resident high-water mark (%s); peaks are process-lifetime", e)
                self._hwm_resettable = False

    def stop(self) -> dict[str, int | None]:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return {"peak_bytes": int(peak), "peak_delta_bytes": int(peak - self._before),
                    "device_used_bytes": gpu_used_bytes()}
        kib = _status_kib("VmHWM")
        peak = None if kib is None else kib * 1024
        return {"peak_bytes": peak, "peak_delta_bytes": None if peak is None else max(0, peak - self._before),
                "device_used_bytes": None}
