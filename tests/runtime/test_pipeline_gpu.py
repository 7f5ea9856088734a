"""On a GPU: the captured whole-loop CUDA graph equals the eager loop, and the steady state allocates nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU (CUDA is not available)", allow_module_level=True)


@pytest.fixture(scope="module")
def pipe(sd1_workdir_fp32):
    p = Pipeline.load(sd1_workdir_fp32, backend="torch")
    assert p.device.type == "cuda" and p.use_cuda_graph
    return p


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m_karras", "euler_a", "unipc"])
def test_graph_replay_equals_eager(pipe, scheduler):
    kwargs = dict(num_inference_steps=8, seed=11, scheduler=scheduler)
    eager = np.asarray(pipe("a photo of a cat", **kwargs).images[0])  # first call: eager, then captured
    key = next(k for k in pipe._loops if k.scheduler == scheduler)
    assert pipe._loops[key].graph is not None
    replayed = np.asarray(pipe("a photo of a cat", **kwargs).images[0])
    assert np.array_equal(eager, replayed)


def test_steady_state_allocates_nothing(pipe):
    kwargs = dict(num_inference_steps=10, seed=3, scheduler="dpmpp_2m")
    pipe("warm", **kwargs)
    pipe("warm", **kwargs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for seed in range(3):
        pipe("warm", **{**kwargs, "seed": seed})
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["reserved_bytes.all.current"] == before["reserved_bytes.all.current"]


def test_graph_not_replayed_for_another_shape(pipe):
    a = pipe("a cat", num_inference_steps=4, seed=0, scheduler="ddim")
    b = pipe("a cat", num_inference_steps=4, seed=0, scheduler="ddim", height=72, width=72)
    assert a.images[0].size == (64, 64) and b.images[0].size == (72, 72)
    again = pipe("a cat", num_inference_steps=4, seed=0, scheduler="ddim")
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(again.images[0]))
