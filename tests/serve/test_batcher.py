"""The micro-batcher over a fake pipeline: grouping, limits, refusals, cancellation, errors, draining."""

from __future__ import annotations

import threading

import pytest

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.runtime.request import GenerateRequest
from sdtrt.serve.batcher import Batcher, BatcherSpec, QueueFull, ShuttingDown
from sdtrt.serve.metrics import Metrics


def req(seed: int = 0, steps: int = 4, batch: int = 1, **kw) -> GenerateRequest:
    return GenerateRequest("p", seed=seed, steps=steps, batch=batch, **kw).validated(
        default_size=64, default_scheduler="ddim", scheduler_names=("ddim", "euler"))


class GatedRunner:
    """``run_batch`` that records each pass and, while the gate is closed, holds the first pass."""

    def __init__(self) -> None:
        self.passes: list[list[int]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_with: Exception | None = None

    def __call__(self, requests):
        self.entered.set()
        self.gate.wait(30)
        self.passes.append([r.seed for r in requests])
        if self.fail_with is not None:
            raise self.fail_with
        return [f"image-{r.seed}" for r in requests]


@pytest.fixture
def runner():
    r = GatedRunner()
    yield r
    r.gate.set()


def make(runner, **spec) -> Batcher:
    return Batcher(runner, BatcherSpec(**{"window_s": 0.0, **spec}), Metrics())


def hold_first_pass(batcher: Batcher, runner: GatedRunner) -> object:
    """Submit a job with a unique key and wait until the worker is inside its pass (so later jobs queue up)."""
    (f,) = batcher.submit([req(seed=999, steps=1)])
    assert runner.entered.wait(10)
    return f


def test_compatible_jobs_share_a_pass_up_to_max_batch_in_fifo_order(runner):
    b = make(runner, max_batch=4, max_queue=16)
    first = hold_first_pass(b, runner)
    futures = b.submit([req(seed=s) for s in range(6)])
    runner.gate.set()
    assert [f.result(10) for f in futures] == [f"image-{s}" for s in range(6)]
    assert first.result(10) == "image-999"
    b.close(10)
    assert runner.passes == [[999], [0, 1, 2, 3], [4, 5]]


def test_incompatible_jobs_run_in_separate_passes_oldest_first(runner):
    b = make(runner, max_batch=4, max_queue=16)
    hold_first_pass(b, runner)
    futures = b.submit([req(seed=1), req(seed=2, steps=5), req(seed=3), req(seed=4, scheduler="euler")])
    runner.gate.set()
    for f in futures:
        f.result(10)
    b.close(10)
    assert runner.passes[1:] == [[1, 3], [2], [4]]


def test_batch_sizes_count_images(runner):
    b = make(runner, max_batch=4, max_queue=16)
    hold_first_pass(b, runner)
    futures = b.submit([req(seed=1, batch=3), req(seed=2, batch=2), req(seed=3, batch=1), req(seed=4, batch=2)])
    runner.gate.set()
    for f in futures:
        f.result(10)
    b.close(10)
    assert runner.passes[1:] == [[1, 3], [2, 4]]


def test_requests_that_could_never_run_are_usage_errors_not_429(runner):
    b = make(runner, max_batch=4, max_queue=3)
    with pytest.raises(UsageError, match=r"a request of 6 images is over this server's limit of 4 per pass \(--max-batch\)"):
        b.submit([req(batch=6)])
    with pytest.raises(UsageError, match=r"this request needs 4 queue slots; the server has 3 \(--max-queue\)"):
        b.submit([req(seed=s) for s in range(4)])
    assert b.depth == 0
    b.close(10)


def test_capacity_caps_a_pass_below_max_batch(runner):
    seen = []

    def capacity(request, limit):  # like an engine built for 2 images at this size
        seen.append((request.seed, limit))
        return 2

    b = Batcher(runner, BatcherSpec(max_batch=4, max_queue=16, window_s=0.0), Metrics(), capacity=capacity)
    hold_first_pass(b, runner)
    futures = b.submit([req(seed=s) for s in range(5)])
    runner.gate.set()
    for f in futures:
        f.result(10)
    b.close(10)
    assert runner.passes[1:] == [[0, 1], [2, 3], [4]]
    assert seen == [(999, 4), (0, 4), (2, 4), (4, 4)]  # asked with each pass's first request, up to max_batch


def test_per_request_errors_fail_only_their_request():
    def run(requests):
        return [SdtrtError(f"NaN in {r.seed}") if r.seed == 2 else f"image-{r.seed}" for r in requests]

    b = Batcher(run, BatcherSpec(max_batch=4, window_s=0.05), Metrics())
    f1, f2, f3 = b.submit([req(seed=1), req(seed=2), req(seed=3)])
    assert f1.result(10) == "image-1" and f3.result(10) == "image-3"
    with pytest.raises(SdtrtError, match="NaN in 2"):
        f2.result(10)
    b.close(10)


def test_a_pipeline_answering_the_wrong_number_of_results_fails_the_pass():
    b = Batcher(lambda requests: ["one"], BatcherSpec(max_batch=4, window_s=0.05), Metrics())
    futures = b.submit([req(seed=1), req(seed=2)])
    for f in futures:
        with pytest.raises(SdtrtError, match="the pipeline answered 1 results for 2 requests"):
            f.result(10)
    b.close(10)


def test_a_dying_worker_resolves_every_admitted_future_and_refuses_new_ones(runner):
    class Die(BaseException):
        pass

    runner.fail_with = Die("boom")
    b = make(runner, max_batch=1, max_queue=16)
    hold_first_pass(b, runner)
    queued = b.submit([req(seed=1), req(seed=2)])
    runner.gate.set()
    for f in queued:
        with pytest.raises(SdtrtError, match=r"the GPU worker stopped \(Die: boom\)"):
            f.result(10)
    b._thread.join(10)
    assert not b.alive
    with pytest.raises(ShuttingDown):
        b.submit([req(seed=3)])


def test_full_queue_refuses_all_or_nothing_with_retry_after(runner):
    b = make(runner, max_batch=2, max_queue=3)
    hold_first_pass(b, runner)
    admitted = b.submit([req(seed=1), req(seed=2)])
    with pytest.raises(QueueFull, match=r"the queue is full \(2 of 3 requests waiting\); retry later") as e:
        b.submit([req(seed=3), req(seed=4)])  # two would not fit: neither is admitted
    # (2 waiting / 2 per pass + this pass) x 1 s per pass (the first-pass estimate): 2 s
    assert e.value.retry_after == 2
    assert b.depth == 2
    more = b.submit([req(seed=5)])
    runner.gate.set()
    assert [f.result(10) for f in admitted + more] == ["image-1", "image-2", "image-5"]
    b.close(10)
    assert sorted(s for p in runner.passes for s in p) == [1, 2, 5, 999]


def test_cancelled_job_is_skipped_not_run(runner):
    b = make(runner, max_batch=4, max_queue=16)
    hold_first_pass(b, runner)
    f1, f2 = b.submit([req(seed=1), req(seed=2)])
    assert f1.cancel()
    runner.gate.set()
    assert f2.result(10) == "image-2"
    b.close(10)
    assert runner.passes[1:] == [[2]]


def test_a_failed_pass_fails_each_of_its_jobs_and_the_worker_goes_on(runner):
    b = make(runner, max_batch=4, max_queue=16)
    runner.fail_with = SdtrtError("NaN in the UNet")
    runner.gate.set()
    futures = b.submit([req(seed=1), req(seed=2)])
    for f in futures:
        with pytest.raises(SdtrtError, match="NaN in the UNet"):
            f.result(10)
    runner.fail_with = None
    (f,) = b.submit([req(seed=3)])
    assert f.result(10) == "image-3"
    b.close(10)


def test_close_finishes_admitted_jobs_then_refuses(runner):
    b = make(runner, max_batch=1, max_queue=16)
    hold_first_pass(b, runner)
    futures = b.submit([req(seed=s) for s in range(3)])
    closer = threading.Thread(target=b.close)
    closer.start()
    runner.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [f.result(0) for f in futures] == ["image-0", "image-1", "image-2"]
    with pytest.raises(ShuttingDown, match="shutting down"):
        b.submit([req()])


def test_metrics_count_passes_and_refusals(runner):
    m = Metrics()
    b = Batcher(runner, BatcherSpec(max_batch=2, max_queue=1, window_s=0.0), m)
    hold_first_pass(b, runner)
    b.submit([req(seed=1)])
    with pytest.raises(QueueFull):
        b.submit([req(seed=2)])
    runner.gate.set()
    b.close(10)
    text = m.render().decode()
    assert "sdtrt_rejected_total 1.0" in text
    assert "sdtrt_batch_images_count 2.0" in text
    assert "sdtrt_queue_depth 0.0" in text
    assert "sdtrt_batch_requests_sum 2.0" in text and "sdtrt_batch_images_sum 2.0" in text
    # durations are differences of one clock: two waits and two passes of this short test, not clock readings
    for name in ("queue_wait", "generate_seconds"):
        metric = {"queue_wait": m.queue_wait, "generate_seconds": m.generate_seconds}[name]
        (sample,) = [x for x in metric.collect()[0].samples if x.name.endswith("_sum")]
        assert 0 <= sample.value < 60, (name, sample.value)


def test_retry_after_follows_the_queue_and_is_capped(runner):
    b = make(runner, max_batch=4, max_queue=64)
    assert b.retry_after() == 1  # an empty queue: the next pass, 1 s
    hold_first_pass(b, runner)
    b.submit([req(seed=s) for s in range(10)])
    assert b.retry_after() == 4  # ceil((10 / 4 + 1) x 1 s)
    b._pass_seconds = 1000.0
    assert b.retry_after() == 600
    runner.gate.set()
    b.close(10)


def test_spec_limits_are_inclusive():
    BatcherSpec(max_batch=1, max_queue=1, window_s=0.0)
    BatcherSpec(max_batch=64, window_s=10)
    with pytest.raises(UsageError, match="batch window must be between 0 and 10 s, got 10.5"):
        BatcherSpec(window_s=10.5)


@pytest.mark.parametrize(("spec", "message"), [
    (dict(max_batch=0), "max batch must be between 1 and 64, got 0"),
    (dict(max_batch=65), "max batch must be between 1 and 64, got 65"),
    (dict(max_queue=0), "max queue must be at least 1, got 0"),
    (dict(window_s=-1), "batch window must be between 0 and 10 s, got -1"),
])
def test_spec_checks(spec, message):
    with pytest.raises(UsageError, match=message):
        BatcherSpec(**spec)
