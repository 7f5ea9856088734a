"""Rules TensorRT's ONNX parser enforces, checked at export so a graph it would refuse never reaches a WORKDIR.

Each rule was confirmed by feeding small graphs to TensorRT-RTX 1.7's ``OnnxParser`` (onnx-tensorrt, the parser of
TensorRT 10/11, has the same checks):

* ``uint8-io-only``: a UINT8 tensor must be a graph input, an initializer or a graph output, and only a ``Cast``
  may read or write one. The parser refuses ``Cast(to=UINT8)`` into an intermediate tensor ("TensorRT does not
  support UINT8 types for intermediate tensors") and every layer but Cast/Identity refuses a UINT8 input
  ("first input has type UInt8"). sdtrt allows Cast only, one step stricter than the parser, which also lets
  an Identity through: pixel graphs need nothing else.
* ``tensorrt-dtype``: every tensor has a type TensorRT can represent. UINT16, INT16, UINT32, UINT64, UINT4,
  FLOAT8E5M2, STRING and complex tensors are refused wherever they appear ("Failed to convert ONNX data type").
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from sdtrt.errors import ExportError
from sdtrt.export.fp16 import infer_types

UINT8 = TensorProto.UINT8
# The element types the parser converted in our probes (DOUBLE is narrowed to FLOAT by the parser).
TENSORRT_DTYPES = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT8E4M3FN,
    TensorProto.INT4,
})


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node (``node`` is empty for a graph input or initializer)."""

    rule: str
    node: str
    op_type: str
    tensor: str
    detail: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.op_type else "graph"
        return f"{where}, tensor {self.tensor!r}: {self.detail} [rule {self.rule}]"


def _dtype(t: int) -> str:
    return TensorProto.DataType.Name(t)


def find_violations(model: onnx.ModelProto) -> list[Violation]:
    """Every place ``model`` breaks a rule in the module docstring, in graph order. Reads the graph's structure
    and types only (never copies the weights)."""
    g = model.graph
    types = infer_types(model)
    inputs = {i.name for i in g.input} | {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    found: list[Violation] = []

    for vi in g.input:
        t = vi.type.tensor_type.elem_type
        if t not in TENSORRT_DTYPES:
            found.append(Violation("tensorrt-dtype", "", "", vi.name, f"graph input of type {_dtype(t)}, which TensorRT cannot represent"))
    for init in g.initializer:
        if init.data_type not in TENSORRT_DTYPES:
            found.append(Violation("tensorrt-dtype", "", "", init.name, f"initializer of type {_dtype(init.data_type)}, which TensorRT cannot represent"))

    for node in g.node:
        name = node.name or f"<unnamed #{len(found)}>"
        for x in node.input:
            if x and types.get(x) == UINT8:
                if node.op_type != "Cast":
                    found.append(Violation("uint8-io-only", name, node.op_type, x,
                                           "reads a UINT8 tensor; TensorRT takes UINT8 only through a Cast at a graph input"))
                elif x not in inputs:
                    found.append(Violation("uint8-io-only", name, node.op_type, x,
                                           "reads a UINT8 tensor that is not a graph input; TensorRT allows UINT8 only on network inputs and outputs"))
        for y in node.output:
            t = types.get(y)
            if not y or t is None:
                continue
            if t not in TENSORRT_DTYPES:
                found.append(Violation("tensorrt-dtype", name, node.op_type, y, f"writes type {_dtype(t)}, which TensorRT cannot represent"))
            elif t == UINT8 and node.op_type != "Cast":
                found.append(Violation("uint8-io-only", name, node.op_type, y,
                                       "writes a UINT8 tensor; TensorRT makes UINT8 only with a Cast that writes a graph output"))
            elif t == UINT8 and y not in outputs:
                found.append(Violation("uint8-io-only", name, node.op_type, y,
                                       "writes a UINT8 tensor that is not a graph output; TensorRT allows UINT8 only on network inputs and outputs"))
    return found


def check_trt_rules(model: onnx.ModelProto, component: str) -> None:
    """Raise ``ExportError`` naming the first violation (and how many more) if ``model`` breaks a TensorRT rule."""
    found = find_violations(model)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ExportError(f"{component}: graph TensorRT would refuse: {found[0]}{more}")
