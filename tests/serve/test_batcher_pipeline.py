"""The micro-batcher in front of the real ``Pipeline.generate_batch``: companions share the whole batch key.

The fake runners of test_batcher.py accept any mix of requests; the pipeline refuses (UsageError, a 422 for the
whole pass) requests that differ in guidance, clip skip or img2img strength, and would otherwise give them the
first request's settings. Each request must come back as it would alone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest as G
from sdtrt.serve.batcher import Batcher, BatcherSpec
from sdtrt.serve.metrics import Metrics


@pytest.fixture(scope="module")
def pipe(sd1_workdir_fp32: Path) -> Pipeline:
    return Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")


def test_companions_share_guidance_clip_skip_and_strength(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    same = {"steps": 2, "scheduler": "euler"}  # size, scheduler and steps: the same for every request
    reqs = [
        G("a", seed=1, **same),
        G("b", seed=2, guidance=3.0, **same),
        G("c", seed=3, clip_skip=2, **same),
        G("d", seed=4, **same),  # companion of seed 1
        G("e", seed=5, init_image=image, strength=0.5, **same),
        G("f", seed=6, init_image=image, strength=1.0, **same),
        G("g", seed=7, init_image=image, strength=0.5, **same),  # companion of seed 5
        G("h", seed=8, guidance=3.0, **same),  # companion of seed 2
    ]
    reqs = [pipe.validate(r) for r in reqs]
    gate, entered, passes = threading.Event(), threading.Event(), []

    def run_batch(batch):  # the real generate_batch, held on its first pass until every job is queued
        entered.set()
        gate.wait(60)
        passes.append([r.seed for r in batch])
        return pipe.generate_batch(batch)

    batcher = Batcher(run_batch, BatcherSpec(max_batch=4, max_queue=16, window_s=0.0), Metrics(),
                      capacity=pipe.max_rows)
    try:
        (held,) = batcher.submit([pipe.validate(G("held", seed=99, steps=1))])
        assert entered.wait(30)
        futures = batcher.submit(reqs)
        gate.set()
        results = [f.result(300) for f in futures]
        held.result(300)
    finally:
        gate.set()
        batcher.close(60)
    assert passes == [[99], [1, 4], [2, 8], [3], [5, 7], [6]]
    for req, res in zip(reqs, results, strict=True):
        alone = pipe.generate(req)
        assert res.request == alone.request and res.infotexts == alone.infotexts
        # onnxruntime's CPU kernels compute each row alike whatever the batch: bitwise equal
        assert np.array_equal(np.asarray(res.images[0]), np.asarray(alone.images[0])), req.seed
