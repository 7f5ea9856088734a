"""torch module -> optimised ONNX file: trace, fold constants, convert precision, infer shapes, save.

Composable steps, each a plain function of a ``ModelProto``; ``export_graph`` strings them together.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from sdtrt.errors import ExportError
from sdtrt.export.fp16 import convert_to_fp16
from sdtrt.export.trt_rules import check_trt_rules
from sdtrt.fsutil import atomic_path

log = logging.getLogger(__name__)

# protobuf cannot serialise a message over 2 GiB: weights of larger graphs go to an external-data file.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class GraphIO:
    """Names, dynamic axes and fp32 exceptions of one exported graph."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    fp32_inputs: tuple[str, ...] = ()


def trace_to_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], io: GraphIO, opset: int) -> onnx.ModelProto:
    """Trace ``module`` on ``args`` with the TorchScript-based exporter and return the (fp32) ONNX model.

    The tracing exporter is used rather than ``dynamo=True``: diffusers' UNet and VAE branch on Python values of
    shapes, which tracing records for the traced shape while the dynamic axes keep sizes symbolic. This is the path
    TensorRT's own diffusion demo takes, and it is stable across torch 2.x.
    """
    with tempfile.TemporaryDirectory(prefix="sdtrt-trace-") as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes are expected here
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(io.input_names),
                    output_names=list(io.output_names),
                    dynamic_axes={k: dict(v) for k, v in io.dynamic_axes.items()},
                    do_constant_folding=True,
                )
            except Exception as e:  # the tracer raises many types; all mean the same to a user
                raise ExportError(f"ONNX tracing failed: {type(e).__name__}: {e}") from e
        return onnx.load(str(path), load_external_data=True)


def fold_and_clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node removal and topological sort with onnx-graphsurgeon."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)  # keep the opset we chose
    out.ir_version = model.ir_version
    return out


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big to serialise as one protobuf. Measured from the weights, because protobuf's own
    ``ByteSize()`` fails past 2 GiB instead of answering."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights >= PROTOBUF_LIMIT - (64 << 20):
        return True
    return model.ByteSize() >= PROTOBUF_LIMIT


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, so parsers see shapes for every intermediate tensor (in memory below 2 GiB,
    through a temporary file above)."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory(prefix="sdtrt-infer-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True, location="in.onnx.data")
        onnx.shape_inference.infer_shapes_path(str(src), str(dst))
        return onnx.load(str(dst), load_external_data=True)


def optimise(model: onnx.ModelProto, io: GraphIO, precision: str) -> onnx.ModelProto:
    """fp32 traced graph -> folded, precision-converted, shape-inferred graph."""
    model = fold_and_clean(model)
    if precision == "fp16":
        model = convert_to_fp16(model, fp32_inputs=io.fp32_inputs)
        model = fold_and_clean(model)  # folds casts of constants into fp16/fp32 initializers
    model = infer_shapes(model)
    if not is_large(model):
        onnx.checker.check_model(model)  # large graphs are checked from their files by save_graph
    return model


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` to ``path`` atomically; weights go to ``<name>.data`` beside it when the graph is over
    2 GiB. Returns the files written (graph first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    external = is_large(model)
    if not external:
        data_path.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        return [path]
    # External data is written under its final name (the graph references it by name); the graph file, renamed
    # last, is what makes the pair visible, and the manifest hashes both.
    with tempfile.TemporaryDirectory(prefix=".sdtrt-save-", dir=path.parent) as tmp:
        tmp_graph = Path(tmp) / path.name
        onnx.save_model(model, str(tmp_graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(tmp_graph))  # from the file: the only way the checker takes > 2 GiB
        umask = os.umask(0)
        os.umask(umask)
        for f in (tmp_graph, Path(tmp) / data_name):
            f.chmod(0o666 & ~umask)  # onnx writes the data file 0600
        os.replace(Path(tmp) / data_name, data_path)
        os.replace(tmp_graph, path)
    return [path, data_path]


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], io: GraphIO, path: Path,
                 *, precision: str, opset: int) -> list[Path]:
    """Trace, optimise, check against TensorRT's parser rules and save one component graph; returns the files
    written (none when a check fails)."""
    log.info("tracing %s", path.name)
    model = trace_to_onnx(module, args, io, opset)
    model = optimise(model, io, precision)
    check_trt_rules(model, path.stem)
    return save_graph(model, path)
