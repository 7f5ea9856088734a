"""Micro-batching in front of one pipeline: a bounded queue and one worker thread that owns the device.

Jobs wait in a FIFO of at most ``max_queue`` jobs; when it is full a submission is refused at once (the server
answers 429 with Retry-After), so a request is either answered or refused, never dropped. The worker takes the
oldest job, then gathers queued jobs with the same batch key (size, scheduler, steps, guidance, ...) for up to
``window_s`` or until the pass holds ``max_batch`` images (or fewer, when ``capacity`` says the backend's engines
take fewer at that size), and runs them in one ``generate_batch``. A job of more than ``max_batch`` images, or a
request of more jobs than the queue holds, is refused as a usage error: it could never run. Jobs whose caller
gave up (timeout, cancelled future) are skipped, not run. ``close()`` stops admissions and lets the worker finish
everything already admitted. Every admitted future is resolved, whatever happens to the worker.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.runtime.request import MAX_BATCH, BatchKey, GenerateRequest, batch_key
from sdtrt.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(SdtrtError):
    """The queue is full: the server answers 429 with ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(SdtrtError):
    """The server is draining for shutdown and admits nothing new (503)."""


@dataclass(frozen=True)
class BatcherSpec:
    max_batch: int = 4  # images per pipeline pass
    max_queue: int = 64  # jobs waiting, not counting the pass that runs
    window_s: float = 0.01  # how long an idle worker waits for companions of the first job

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise UsageError(f"max batch must be between 1 and {MAX_BATCH}, got {self.max_batch}")
        if self.max_queue < 1:
            raise UsageError(f"max queue must be at least 1, got {self.max_queue}")
        if not 0 <= self.window_s <= 10:
            raise UsageError(f"batch window must be between 0 and 10 s, got {self.window_s}")


@dataclass(eq=False)
class _Job:
    request: GenerateRequest  # validated
    key: BatchKey
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


RunBatch = Callable[[list[GenerateRequest]], list]  # Pipeline.generate_batch: a Result or an exception per request
Capacity = Callable[[GenerateRequest, int], int]  # Pipeline.max_rows: images a pass with these settings may hold


class Batcher:
    """``submit(requests) -> futures``: one future per request, resolved with its ``Result`` or its error."""

    def __init__(self, run_batch: RunBatch, spec: BatcherSpec = BatcherSpec(), metrics: Metrics | None = None,
                 capacity: Capacity | None = None) -> None:
        self.spec = spec
        self._run_batch = run_batch
        self._capacity = capacity or (lambda request, limit: limit)
        self._metrics = metrics or Metrics()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._pass_seconds = 1.0  # running mean of one pass, for Retry-After
        self._thread = threading.Thread(target=self._work, name="sdtrt-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def alive(self) -> bool:
        """The worker runs and admits requests."""
        return self._thread.is_alive() and not self._closing

    def retry_after(self) -> int:
        """Seconds until the queue has likely room again: the passes ahead of a newcomer, at least 1."""
        passes = self.depth / self.spec.max_batch + 1
        return max(1, min(600, math.ceil(passes * self._pass_seconds)))

    def submit(self, requests: Sequence[GenerateRequest]) -> list[Future]:
        """Admit all of ``requests`` (validated) or none: ``QueueFull`` / ``ShuttingDown`` otherwise."""
        for r in requests:
            if r.batch > self.spec.max_batch:
                raise UsageError(f"a request of {r.batch} images is over this server's limit of {self.spec.max_batch} "
                                 "per pass (--max-batch)")
        if len(requests) > self.spec.max_queue:
            raise UsageError(f"this request needs {len(requests)} queue slots; the server has {self.spec.max_queue} "
                             "(--max-queue)")
        jobs = [_Job(r, batch_key(r), Future()) for r in requests]
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + len(jobs) > self.spec.max_queue:
                self._metrics.rejected.inc(len(jobs))
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.spec.max_queue} requests waiting); "
                                "retry later", self.retry_after())
            self._queue.extend(jobs)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return [j.future for j in jobs]

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting; the worker finishes every admitted job, then exits."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        batch: list[_Job] = []
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as e:  # a bug or an interpreter exit: refuse everything rather than hang anyone
            log.critical("the batcher's worker stopped", exc_info=e)
            with self._cond:
                self._closing = True
                pending, self._queue = list(self._queue), deque()
            error = SdtrtError(f"the GPU worker stopped ({type(e).__name__}: {e})")
            for job in [*(batch or []), *pending]:
                if job.future.running() or (not job.future.done() and job.future.set_running_or_notify_cancel()):
                    job.future.set_exception(error)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest live job plus compatible companions; None once closing and empty."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return None
                first = self._queue.popleft()
                if first.future.set_running_or_notify_cancel():
                    break  # else its caller gave up while it waited: skip it
            batch, rows = [first], first.request.batch
            limit = self._capacity(first.request, self.spec.max_batch)
            deadline = time.perf_counter() + self.spec.window_s
            while rows < limit:
                for job in list(self._queue):
                    if job.key == first.key and rows + job.request.batch <= limit:
                        self._queue.remove(job)
                        if job.future.set_running_or_notify_cancel():
                            batch.append(job)
                            rows += job.request.batch
                left = deadline - time.perf_counter()
                if rows >= limit or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _run(self, batch: list[_Job]) -> None:
        m = self._metrics
        t0 = time.perf_counter()
        for job in batch:
            m.queue_wait.observe(t0 - job.enqueued)
        m.batch_images.observe(sum(j.request.batch for j in batch))
        m.batch_requests.observe(len(batch))
        try:
            results = self._run_batch([j.request for j in batch])
            if len(results) != len(batch):
                raise SdtrtError(f"the pipeline answered {len(results)} results for {len(batch)} requests")
        except Exception as e:  # the worker goes on: every job of the pass gets the error
            if not isinstance(e, SdtrtError):
                log.exception("generation failed")
            for job in batch:
                job.future.set_exception(e)
            return
        dt = time.perf_counter() - t0
        m.generate_seconds.observe(dt)
        self._pass_seconds = 0.8 * self._pass_seconds + 0.2 * dt
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):  # this request's own failure (e.g. its rows overflowed)
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
