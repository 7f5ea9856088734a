"""Capture readiness: ``step`` must be replayable from a CUDA graph.

That means no host syncs (``.item()``, ``.nonzero()``, ``if tensor:``), no tensors leaving the device, the same
sequence of kernels on every step (so one captured step, or one captured loop, serves every ``i``), ``i`` usable as
a 0-dim device tensor the graph advances itself, and history updated in place.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sdtrt.runtime.schedulers import SCHEDULERS, at, get_scheduler, new_history

aten = torch.ops.aten

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
STEPS = 7  # enough to wrap every ring buffer (LMS keeps 3, PLMS 3 + 1, UniPC order + 1)
SHAPE = (2, 4, 8, 8)  # (B, C, H/8, W/8)
# Ops that read a device value on the host, or create a tensor from host data.
FORBIDDEN = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.nonzero_static,
    aten.is_nonzero,
    aten.equal,
    aten.lift_fresh,
    aten.lift_fresh_copy,
}


class StepTrace(TorchDispatchMode):
    """Fails on host syncs and on tensors created off ``device``; records the ops of each step."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in FORBIDDEN:
            raise AssertionError(f"step() called {func}, which needs the host")
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device != self.device:
                raise AssertionError(f"step() made a tensor on {leaf.device} via {func}")
        self.ops.append(str(func))
        return out


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * torch.tanh(x) + 0.01 * (t / 1000) * torch.cos(x)


def _configs(name: str) -> list[dict]:
    configs = [SD15, {**SD15, "prediction_type": "v_prediction"}]
    if name in ("ddim", "lcm"):
        configs.append({**SD15, "clip_sample": True})
    return configs


def run_loop(name: str, config: dict, device: torch.device, *, tensor_index: bool, trace: bool = False):
    """The denoising loop; returns (x, history, history data_ptr before, per-step op traces)."""
    sched = get_scheduler(name)
    tables = sched.make_tables(config, STEPS).to(device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=gen) * tables.init_noise_sigma).to(device)
    noise = torch.randn((tables.num_evals, *SHAPE), generator=gen).to(device)  # (E, B, C, H/8, W/8)
    history = new_history(tables, x)
    ptr = history.data_ptr()
    i = torch.zeros((), dtype=torch.int64, device=device)
    traces = []
    for k in range(tables.num_evals):
        out = fake_unet(x * tables.c_in[k], tables.timesteps[k].to(device))
        index = i if tensor_index else k
        step_noise = noise[k] if tables.needs_noise else None
        if trace:
            with StepTrace(device) as mode:
                x = sched.step(tables, index, x, out, history, step_noise)
            traces.append(mode.ops)
        else:
            x = sched.step(tables, index, x, out, history, step_noise)
        i += 1  # in place, as a captured graph would advance it
    return x, history, ptr, traces


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_has_no_host_sync_and_same_ops_every_step(name: str) -> None:
    for config in _configs(name):
        _, _, _, traces = run_loop(name, config, torch.device("cpu"), tensor_index=True, trace=True)
        assert traces[0], "no ops traced"
        for k, ops in enumerate(traces):
            assert ops == traces[0], f"step {k} runs different ops than step 0"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_runs_on_meta_tensors(name: str) -> None:
    """On the meta device nothing has a value: any data-dependent host logic would fail here."""
    for config in _configs(name):
        x, _, _, _ = run_loop(name, config, torch.device("meta"), tensor_index=True, trace=True)
        assert x.shape == SHAPE and x.device.type == "meta"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_tensor_index_matches_int_index_and_history_in_place(name: str) -> None:
    for config in _configs(name):
        x_int, _, _, _ = run_loop(name, config, torch.device("cpu"), tensor_index=False)
        x_dev, history, ptr, _ = run_loop(name, config, torch.device("cpu"), tensor_index=True)
        torch.testing.assert_close(x_dev, x_int, rtol=0, atol=0)
        assert history.data_ptr() == ptr, "history was reallocated"
        if history.shape[0]:
            assert history.abs().amax() > 0, "history was never written"


def test_tables_cast_once() -> None:
    """``.to(device, dtype)`` casts the coefficient tables; timesteps stay float32 and slot tables int64."""
    tables = get_scheduler("unipc").make_tables(SD15, STEPS)
    assert tables.coef.dtype == torch.float64
    half = tables.to("cpu", torch.float16)
    assert half.coef.dtype == torch.float16 and half.pred.dtype == torch.float16
    assert half.timesteps.dtype == torch.float32
    assert half.slot.dtype == torch.int64
    assert half.num_evals == tables.num_evals == STEPS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", SCHEDULERS)
def test_cuda_graph_replay_matches_eager(name: str) -> None:
    """One captured step, replayed for every i (advanced inside the graph), equals the eager loop."""
    device = torch.device("cuda")
    sched = get_scheduler(name)
    tables = sched.make_tables(SD15, STEPS).to(device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(SHAPE, generator=gen) * tables.init_noise_sigma).to(device)
    noise = torch.randn((tables.num_evals, *SHAPE), generator=gen).to(device)  # (E, B, C, H/8, W/8)

    def one_step(i, x, history):
        out = fake_unet(x * at(tables.c_in, i), at(tables.timesteps, i))
        step_noise = at(noise, i) if tables.needs_noise else None
        return sched.step(tables, i, x, out, history, step_noise)

    # Eager reference.
    x_ref, history_ref = x0.clone(), new_history(tables, x0)
    for k in range(tables.num_evals):
        x_ref = one_step(torch.tensor(k, device=device), x_ref, history_ref)

    # Static buffers; warm up on a side stream, then capture one step.
    x, history = x0.clone(), new_history(tables, x0)
    i = torch.zeros((), dtype=torch.int64, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scratch_x, scratch_h = x.clone(), history.clone()
        for _ in range(2):
            one_step(i, scratch_x, scratch_h)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(one_step(i, x, history))
        i.add_(1)
    x.copy_(x0)
    history.zero_()
    i.zero_()
    for _ in range(tables.num_evals):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6)
