"""The capture fallback, on CPU: a loop whose capture fails (an engine whose enqueue TensorRT cannot capture, out of
memory, kernels that refuse capture) keeps that key eager for good; the request that tried still gets its image,
later requests of the key never try again, and other keys still capture. ``LoopGraph`` itself (real CUDA graphs)
is tested on a GPU in test_pipeline_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.errors import EngineError
from sdtrt.runtime import pipeline as pipeline_module
from sdtrt.runtime.pipeline import Pipeline


class FailingCapture:
    """Stands for ``LoopGraph``: the capture raises what the runtime raises under capture."""

    attempts: list = []
    error: BaseException = EngineError("unet: TensorRT says this engine's enqueue cannot be captured into a CUDA "
                                       "graph on this stream")

    def __init__(self, key, loop, buffers, **kwargs):
        FailingCapture.attempts.append(key)
        raise FailingCapture.error


@pytest.fixture
def pipe(sd1_workdir_fp32, monkeypatch):
    p = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")
    p.use_cuda_graph = True  # as on a GPU: every new key tries to capture after its eager warm-up
    FailingCapture.attempts = []
    monkeypatch.setattr(pipeline_module, "LoopGraph", FailingCapture)
    return p


@pytest.mark.parametrize("error", [
    EngineError("unet: TensorRT says this engine's enqueue cannot be captured into a CUDA graph on this stream"),
    torch.cuda.OutOfMemoryError("CUDA out of memory"),
    RuntimeError("operation not permitted when stream is capturing"),
])
def test_a_failed_capture_keeps_that_key_eager_and_the_request_succeeds(pipe, sd1_workdir_fp32, caplog, error):
    FailingCapture.error = error
    kwargs = dict(num_inference_steps=4, seed=3, scheduler="ddim")
    first = pipe("a red cube", **kwargs)  # eager run, then the capture fails
    assert len(FailingCapture.attempts) == 1
    assert "running" in caplog.text and "eagerly" in caplog.text
    second = pipe("a red cube", **kwargs)  # same key: eager, no second attempt
    assert len(FailingCapture.attempts) == 1
    np.testing.assert_array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    reference = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")("a red cube", **kwargs)  # never tried to capture
    np.testing.assert_array_equal(np.asarray(first.images[0]), np.asarray(reference.images[0]))
    pipe("a red cube", num_inference_steps=5, seed=3, scheduler="ddim")  # another key still tries
    assert len(FailingCapture.attempts) == 2
    assert pipe.use_cuda_graph  # the fallback is per key, not for the whole process
