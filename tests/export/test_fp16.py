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


ISLAND_OPS = {"InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"}


def _timestep_region(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from the fp32 input ``t`` alone (with constants), up to the first matmul/conv or cast to
    fp16: the only place besides the islands where an fp32 weight belongs. Worked out here from the graph, not
    from the converter's own bookkeeping."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type in ("Constant", "ConstantOfShape") for o in n.output}
    region = {"t"}
    for n in model.graph.node:  # topologically sorted
        inputs = [x for x in n.input if x and x not in constants]
        to_fp16 = n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
        if inputs and all(x in region for x in inputs) and n.op_type not in ("MatMul", "Gemm", "Conv") and not to_fp16:
            region.update(n.output)
    return region


def test_weights_are_fp16_except_islands(graphs):
    _, _, fp16 = graphs
    region = _timestep_region(fp16)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in fp16.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    kept = [i.name for i in fp16.graph.initializer if i.data_type == TensorProto.FLOAT]
    for name in kept:
        # an fp32 weight feeds only an island op, or a node of the timestep region (all its outputs there)
        for n in consumers[name]:
            assert n.op_type in ISLAND_OPS or all(o in region for o in n.output), (name, n.op_type, n.name)
    # the sinusoid frequencies (t * freqs, before sin/cos) are one of them: fp16 would wreck sin(999 * f)
    freq_muls = [n for n in fp16.graph.node if n.op_type == "Mul" and n.output[0] in region]
    assert any(x in kept for n in freq_muls for x in n.input), "the timestep frequencies were converted to fp16"
    # ... and GroupNorm's affine Mul/Add (outside the islands) run in fp16 with fp16 weights
    gn_affine = [n for n in fp16.graph.node if n.op_type in ("Mul", "Add") and n.name.startswith("/gn/")]
    assert gn_affine and not any(x in kept for n in gn_affine for x in n.input)
    n_fp16 = sum(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert n_fp16 >= 6  # conv, linear weights and biases


def test_type_inference_types_every_tensor(graphs):
    _, _, fp16 = graphs
    types = infer_types(fp16)
    untyped = [o for n in fp16.graph.node for o in n.output if types.get(o, TensorProto.UNDEFINED) == TensorProto.UNDEFINED]
    assert not untyped
    assert types["y"] == TensorProto.FLOAT16 and types["t"] == TensorProto.FLOAT


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
