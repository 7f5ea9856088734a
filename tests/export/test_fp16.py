"""The fp16 pass: every float tensor fp16 except the islands and the timestep region; numbers close to fp32."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from sdtrt.errors import ExportError
from sdtrt.export.fp16 import convert_to_fp16, infer_types
from sdtrt.export.graph import GraphIO, optimise, trace_to_onnx


class Block(torch.nn.Module):
    """A little of everything SD graphs contain: timestep sinusoids, GroupNorm, LayerNorm, attention, resize."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.q = torch.nn.Linear(8, 8)
        self.t_proj = torch.nn.Linear(8, 8)
        self.register_buffer("freqs", torch.exp(-np.log(10000) * torch.arange(4) / 4))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = t[:, None] * self.freqs[None]  # (1, 4), must stay fp32
        emb = self.t_proj(torch.cat([emb.sin(), emb.cos()], dim=-1))  # (1, 8)
        h = self.gn(self.conv(x)) + emb[:, :, None, None]  # (B, 8, H, W)
        b, c, hh, ww = h.shape
        seq = self.ln(h.flatten(2).transpose(1, 2))  # (B, HW, 8)
        q = self.q(seq)
        attn = torch.softmax(q @ seq.transpose(1, 2) / np.sqrt(8), dim=-1)
        h = (attn @ seq).transpose(1, 2).reshape(b, c, hh, ww)
        return torch.nn.functional.interpolate(h, size=(hh * 2, ww * 2), mode="nearest")


IO = GraphIO(("x", "t"), ("y",), {"x": {0: "B", 2: "H", 3: "W"}, "y": {0: "B", 2: "H2", 3: "W2"}}, fp32_inputs=("t",))


@pytest.fixture(scope="module")
def graphs():
    m = Block().eval()
    fp32 = trace_to_onnx(m, (torch.randn(2, 4, 5, 6), torch.tensor([500.0])), IO, opset=17)
    return m, optimise(fp32, IO, "fp32"), optimise(fp32, IO, "fp16")


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_io_types(graphs):
    _, _, fp16 = graphs
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(fp16.graph.input) + list(fp16.graph.output)}
    assert types == {"x": TensorProto.FLOAT16, "t": TensorProto.FLOAT, "y": TensorProto.FLOAT16}


def test_weights_are_fp16_except_islands(graphs):
    _, _, fp16 = graphs
    types = infer_types(fp16)
    consumers = {}
    for n in fp16.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n.op_type)
    island_ops = {"InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos", "Mul", "Concat", "Unsqueeze", "Resize"}
    for init in fp16.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            # fp32 weights may only feed the fp32 islands or the timestep region
            assert set(consumers[init.name]) <= island_ops, (init.name, consumers[init.name])
    n_fp16 = sum(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert n_fp16 >= 6  # conv, linear weights and biases
    assert types  # inference succeeded on the converted graph


@pytest.mark.parametrize("op", ["InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos"])
def test_islands_compute_in_fp32(graphs, op):
    _, _, fp16 = graphs
    types = infer_types(fp16)
    nodes = [n for n in fp16.graph.node if n.op_type == op]
    assert nodes, f"no {op} in the graph"
    for n in nodes:
        assert types[n.input[0]] == TensorProto.FLOAT, f"{op} input is not fp32"
        assert types[n.output[0]] == TensorProto.FLOAT


def test_matmuls_compute_in_fp16(graphs):
    _, _, fp16 = graphs
    types = infer_types(fp16)
    for n in fp16.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            assert types[n.output[0]] == TensorProto.FLOAT16, n.name


def test_fp16_numbers_close_to_torch(graphs, tmp_path):
    m, fp32, fp16 = graphs
    x = np.random.default_rng(0).standard_normal((3, 4, 7, 4)).astype(np.float32)
    t = np.array([999.0], dtype=np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x.astype(np.float16).astype(np.float32)), torch.from_numpy(t)).numpy()
    outs = {}
    for name, model in (("fp32", fp32), ("fp16", fp16)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        xin = x.astype(np.float16) if name == "fp16" else x.astype(np.float16).astype(np.float32)
        outs[name] = sess.run(None, {"x": xin, "t": t})[0]
    assert outs["fp16"].dtype == np.float16 and outs["fp16"].shape == (3, 8, 14, 8)
    peak = np.abs(ref).max()
    assert np.abs(outs["fp32"] - ref).max() / peak < 1e-5
    err16 = np.abs(outs["fp16"].astype(np.float32) - ref).max() / peak
    assert 1e-5 < err16 < 1e-2  # really fp16, and still close


def test_timestep_region_keeps_precision(graphs, tmp_path):
    """sin(999 * f) in fp16 would be off by ~0.5 rad; the fp32 region keeps the graph sensitive to t = 999 vs 998.5."""
    _, _, fp16 = graphs
    path = tmp_path / "m.onnx"
    onnx.save(fp16, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 4, 2, 2), dtype=np.float16)
    a = sess.run(None, {"x": x, "t": np.array([999.0], np.float32)})[0]
    b = sess.run(None, {"x": x, "t": np.array([999.25], np.float32)})[0]
    assert not np.array_equal(a, b)


def test_unknown_fp32_input_is_refused(graphs):
    _, fp32, _ = graphs
    with pytest.raises(ExportError, match="no graph input named nope"):
        convert_to_fp16(fp32, fp32_inputs=("nope",))
