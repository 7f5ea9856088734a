"""Per-call timers and summary statistics.

A ``CallTimer`` wraps one function (a runner's ``run``, a module's ``forward``) and records each call: host
``perf_counter`` stamps always, and on CUDA a pair of CUDA events on the current stream. Recording an event does
not synchronize, so the measured loop keeps its own behaviour; events are read back only after the request has
returned (which syncs anyway). Calls made while a CUDA graph is being captured pass through unrecorded.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch


class CallTimer:
    """Records the calls of the functions it wraps; ``reset()`` before a request, read after it."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: list[tuple[float, float]] = []  # (start, end) perf_counter seconds
        self.events: list[tuple[Any, Any]] = []  # (start, end) torch.cuda.Event, on CUDA

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.cuda and torch.cuda.is_current_stream_capturing():
                return fn(*args, **kwargs)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            t1 = time.perf_counter()
            if self.cuda:
                end.record()
                self.events.append((start, end))
            self.host.append((t0, t1))
            return out

        return timed

    def reset(self) -> None:
        self.host.clear()
        self.events.clear()

    @property
    def calls(self) -> int:
        return len(self.host)

    def spans_ms(self) -> list[tuple[float, float]]:
        """(start, end) of every call in ms from the first call's start: device time on CUDA, else host time.
        Call after the request returned (CUDA: its events must have completed)."""
        if not self.host:
            return []
        if self.cuda:
            first = self.events[0][0]
            return [(first.elapsed_time(s), first.elapsed_time(e)) for s, e in self.events]
        t0 = self.host[0][0]
        return [((s - t0) * 1e3, (e - t0) * 1e3) for s, e in self.host]

    def host_spans_ms(self) -> list[tuple[float, float]]:
        if not self.host:
            return []
        t0 = self.host[0][0]
        return [((s - t0) * 1e3, (e - t0) * 1e3) for s, e in self.host]


def install(obj: Any, attr: str, timer: CallTimer) -> Callable[[], None]:
    """Replace ``obj.attr`` (a bound method) by its timed wrapper; returns a function that restores it."""
    had_own = attr in vars(obj)
    original = getattr(obj, attr)
    setattr(obj, attr, timer.wrap(original))

    def restore() -> None:
        if had_own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)

    return restore


def durations(spans: Sequence[tuple[float, float]]) -> list[float]:
    return [e - s for s, e in spans]


def loop_figures(spans: Sequence[tuple[float, float]], host: Sequence[tuple[float, float]]) -> dict[str, float | None]:
    """Per-evaluation figures of an eagerly run denoising loop, from its UNet calls' spans (ms):
    ``unet_eval_ms`` the mean UNet call; ``scheduler_step_ms`` the mean time between one UNet call's end and the
    next one's start (CFG combine, scheduler step, next input's scaling); ``step_ms`` the mean start-to-start
    period (device time on CUDA); ``host_step_ms`` the same period on the host clock, i.e. the time Python takes
    to issue one evaluation when the device does not hold it back."""
    if not spans:
        return {"unet_eval_ms": None, "scheduler_step_ms": None, "step_ms": None, "host_step_ms": None}
    n = len(spans)
    gaps = [spans[i + 1][0] - spans[i][1] for i in range(n - 1)]
    period = (spans[-1][0] - spans[0][0]) / (n - 1) if n > 1 else spans[0][1] - spans[0][0]
    host_period = (host[-1][0] - host[0][0]) / (n - 1) if n > 1 else host[0][1] - host[0][0]
    return {
        "unet_eval_ms": float(np.mean(durations(spans))),
        "scheduler_step_ms": float(np.mean(gaps)) if gaps else None,
        "step_ms": float(period),
        "host_step_ms": float(host_period),
    }


def summarize(values: Iterable[float | None]) -> dict[str, float | int] | None:
    """n, p50, p90, mean, std, min, max of the finite values; None if there are none."""
    xs = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if xs.size == 0:
        return None
    return {
        "n": int(xs.size),
        "p50": float(np.percentile(xs, 50)),
        "p90": float(np.percentile(xs, 90)),
        "mean": float(xs.mean()),
        "std": float(xs.std(ddof=1)) if xs.size > 1 else 0.0,
        "min": float(xs.min()),
        "max": float(xs.max()),
    }
