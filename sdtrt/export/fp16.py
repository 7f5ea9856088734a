"""fp32 ONNX -> fp16 ONNX with fp32 islands, the form TensorRT's strongly typed networks need.

A strongly typed network (TensorRT 10.12+, the only kind TensorRT 11 builds) runs every tensor in the type the
graph gives it; there is no builder flag that lowers precision. So precision is decided here, in the graph:

* every float tensor becomes float16: inputs, initializers, constants and ``Cast(to=FLOAT)`` targets, and so
  everything computed from them;
* *islands* stay float32: the ops in ``keep_ops`` (LayerNorm, GroupNorm, InstanceNorm, Softmax by default, whose
  reductions lose too much in fp16) get a ``Cast`` to float32 on each float input and compute in float32; their
  consumers get a ``Cast`` back to float16;
* *fp32 regions* start at the graph inputs named in ``fp32_inputs`` (the UNet's ``timestep``) and extend through
  element-wise and shape ops until the first matrix multiply or convolution, as diffusers keeps its sinusoidal
  timestep projection in float32 (``sin(1000 * f)`` has no useful digits left in fp16).

Exporting in fp32 and converting the graph, rather than tracing a half-precision torch module, keeps the export
cheap on CPUs (no fp16 kernels needed) and makes the precision of every tensor an explicit, testable decision.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdtrt.errors import ExportError

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

DEFAULT_KEEP_OPS = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax"})
# Ops that end an fp32 region: from here on, the values are activations like any other.
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
# Inputs that the ONNX spec requires to be float32 whatever the data type (Resize's roi and scales).
FP32_INPUT_SLOTS = {"Resize": (1, 2)}
# Ops whose output dtype comes from an attribute we do not rewrite: refuse rather than guess.
UNSUPPORTED_OPS = frozenset({"EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


def infer_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, by ONNX type inference on a skeleton of the graph that declares the
    initializers as typed inputs and never copies their data (so graphs over protobuf's 2 GB limit work too)."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    g = skeleton.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    names = {i.name for i in model.graph.input}
    g.input.extend(
        helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        for init in model.graph.initializer
        if init.name not in names
    )
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[node.output[0]] = FLOAT
    return types


def _to_fp16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)


def _copy_without_weights(src: onnx.ModelProto) -> onnx.ModelProto:
    """``src`` with every field but the graph's initializers (which the caller adds, converted): a graph of
    gigabytes is never copied whole. protobuf (upb) frees a message's memory only when the whole message goes,
    so building a new model and dropping the old is the way to shrink one."""
    out = onnx.ModelProto(ir_version=src.ir_version, producer_name=src.producer_name,
                          producer_version=src.producer_version, domain=src.domain, model_version=src.model_version,
                          doc_string=src.doc_string)
    out.opset_import.extend(src.opset_import)
    out.metadata_props.extend(src.metadata_props)
    out.functions.extend(src.functions)
    g, sg = out.graph, src.graph
    g.name, g.doc_string = sg.name, sg.doc_string
    g.node.extend(sg.node)
    g.input.extend(sg.input)
    g.output.extend(sg.output)
    g.sparse_initializer.extend(sg.sparse_initializer)
    return out


def convert_to_fp16(
    model: onnx.ModelProto,
    *,
    keep_ops: frozenset[str] = DEFAULT_KEEP_OPS,
    fp32_inputs: tuple[str, ...] = (),
    fp32_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """Return ``model`` converted to float16 everywhere except the islands and regions described in the module
    docstring. ``model`` is left as it was; the result is a new model whose weights are converted one tensor at a
    time, so the peak is the fp32 graph plus the fp16 one (the caller frees the fp32 one by dropping it).

    Graph input and output names are kept; their element types change to float16 unless named in
    ``fp32_inputs`` / ``fp32_outputs``. Non-float tensors (token ids, shapes, uint8 pixels) are untouched.
    """
    types = infer_types(model)
    src = model.graph
    model = _copy_without_weights(model)
    g = model.graph
    bad = sorted({n.op_type for n in g.node if n.op_type in UNSUPPORTED_OPS})
    if bad:
        raise ExportError(f"fp16 conversion does not support op(s) {', '.join(bad)}")
    unknown = [n for n in fp32_inputs if n not in {i.name for i in g.input}]
    if unknown:
        raise ExportError(f"fp16 conversion: no graph input named {', '.join(unknown)}")

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    init_names = {i.name for i in src.initializer}
    const_outputs = {n.output[0] for n in g.node if n.op_type in ("Constant", "ConstantOfShape")}
    constants = init_names | const_outputs

    # 1. Decide each node's compute precision: island, fp32 region, or fp16.
    # Regions grow only from ``fp32_inputs``; island outputs are fp32 but do not start a region.
    region = set(fp32_inputs)
    fp32_tensors = set(fp32_inputs)
    node_fp32: list[bool] = []
    for node in g.node:
        float_ins = [x for x in node.input if is_float(x) and x not in constants]
        in_region = bool(float_ins) and node.op_type not in COMPUTE_OPS and all(x in region for x in float_ins)
        if in_region:
            region.update(o for o in node.output if is_float(o))
        fp32 = in_region or node.op_type in keep_ops
        node_fp32.append(fp32)
        if fp32:
            fp32_tensors.update(o for o in node.output if is_float(o))

    # 2. Constants keep fp32 when every consumer computes in fp32; otherwise they become fp16.
    consumers: dict[str, list[int]] = {}
    for idx, node in enumerate(g.node):
        for x in node.input:
            consumers.setdefault(x, []).append(idx)
    for name in constants:
        if is_float(name) and consumers.get(name) and all(node_fp32[i] for i in consumers[name]):
            fp32_tensors.add(name)

    def actual(name: str) -> int:
        return FLOAT if name in fp32_tensors else FLOAT16

    # 3. Rewrite sources: initializers, constants, casts, graph inputs.
    for init in src.initializer:
        convert = init.data_type == FLOAT and init.name not in fp32_tensors
        g.initializer.append(_to_fp16_tensor(init) if convert else init)
    for idx, node in enumerate(g.node):
        if node.op_type == "Constant" and is_float(node.output[0]) and node.output[0] not in fp32_tensors:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(_to_fp16_tensor(a.t))
                elif a.name in ("value_float", "value_floats"):
                    raise ExportError("fp16 conversion: scalar-attribute Constant nodes are not supported")
        elif node.op_type == "ConstantOfShape" and is_float(node.output[0]) and node.output[0] not in fp32_tensors:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(_to_fp16_tensor(a.t))
        elif node.op_type == "Cast" and not node_fp32[idx]:
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = FLOAT16
    for vi in g.input:
        if vi.type.tensor_type.elem_type == FLOAT and vi.name not in fp32_inputs:
            vi.type.tensor_type.elem_type = FLOAT16

    # 4. Insert casts on every float edge whose producer and consumer precisions differ.
    cast_cache: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            out = f"{name}__to_{'fp32' if to == FLOAT else 'fp16'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}__cast"))
            cast_cache[key] = out
        return cast_cache[key]

    for idx, node in enumerate(list(g.node)):
        slots = FP32_INPUT_SLOTS.get(node.op_type, ())
        for k, x in enumerate(node.input):
            if not is_float(x):
                continue
            want = FLOAT if (node_fp32[idx] or k in slots) else FLOAT16
            if actual(x) != want:
                node.input[k] = cast(x, want)
        new_nodes.append(node)

    # 5. Graph outputs: keep names, fix types.
    for vi in g.output:
        if vi.type.tensor_type.elem_type != FLOAT:
            continue
        want = FLOAT if vi.name in fp32_outputs else FLOAT16
        if actual(vi.name) != want:
            inner = f"{vi.name}__{'fp32' if actual(vi.name) == FLOAT else 'fp16'}"
            for node in new_nodes:
                node.output[:] = [inner if o == vi.name else o for o in node.output]
                node.input[:] = [inner if x == vi.name else x for x in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [vi.name], to=want, name=f"{vi.name}__out_cast"))
        vi.type.tensor_type.elem_type = want

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale float types; re-inferred after cleanup
    return _toposort(model)


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Casts were appended out of order; sort the nodes so every input is produced before use."""
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"fp16 conversion left a graph with a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model
