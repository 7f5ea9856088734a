"""torch module -> optimised ONNX file: trace, fold constants, convert precision, infer shapes, save.

Composable steps, each a plain function of a ``ModelProto``; ``export_graph`` strings them together.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
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
    """Whether ``model`` is too big to serialise as one protobuf. Summed element by element: protobuf's own
    ``ByteSize()`` on the whole model encodes it (4 GB more memory and 7 s for a 1.7 GB UNet) and fails past 2 GiB."""
    g = model.graph
    size = sum(x.ByteSize() for field in (g.initializer, g.sparse_initializer, g.node, g.input, g.output, g.value_info)
               for x in field)
    return size >= PROTOBUF_LIMIT - (64 << 20)  # the margin covers names, opsets and framing


# Initializers at most this big stay in the skeleton that shape inference sees: shape arithmetic reads them.
SKELETON_KEEP_BYTES = 1024


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its weights: initializers over ``SKELETON_KEEP_BYTES`` become typed graph inputs, small
    ones (shape constants) stay. Shape inference and the checker see the same graph at a tiny fraction of the
    memory, and it works past protobuf's 2 GiB limit."""
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    names = {i.name for i in src.input}
    for init in src.initializer:
        if init.ByteSize() <= SKELETON_KEEP_BYTES:
            g.initializer.append(init)
        elif init.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return out


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, so parsers see shapes for every intermediate tensor: inferred on the weightless
    skeleton (never serialising the weights) and written into ``model.graph.value_info`` in place."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def check_graph(model: onnx.ModelProto) -> None:
    """The ONNX checker on the skeleton (structure, types, opset rules), so the weights are never serialised."""
    try:
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph is not valid ONNX: {str(e).splitlines()[0]}") from e


def to_precision(model: onnx.ModelProto, io: GraphIO, precision: str) -> onnx.ModelProto:
    """fp32 traced graph -> folded, precision-converted graph (a new model; ``model`` is left as it was)."""
    if precision == "fp16":
        # torch's exporter already folded constants, so convert first and fold once, on the half-size graph
        # (folding the fp32 graph first doubled the peak memory of a full-size UNet export).
        model = convert_to_fp16(model, fp32_inputs=io.fp32_inputs)
    return fold_and_clean(model)  # fp16: folds casts of constants into fp16/fp32 initializers


def optimise(model: onnx.ModelProto, io: GraphIO, precision: str) -> onnx.ModelProto:
    """fp32 traced graph -> folded, precision-converted, shape-inferred, checked graph."""
    model = infer_shapes(to_precision(model, io, precision))
    check_graph(model)
    return model


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and a full-size export's peak is the sum
    of what each step left behind)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def write_in_pieces(model: onnx.ModelProto, f) -> None:
    """Serialise ``model`` to ``f`` without ever holding the whole serialised graph in memory: first the model
    without its initializers, then one ``ModelProto{graph{initializer: [t]}}`` per weight. Protobuf parses
    concatenated messages as one merged message (repeated fields append), so ONNX, ONNX Runtime and TensorRT read
    the file as the model itself; a full-size UNet no longer needs its 1.7 GB twice more while it is written."""
    skel = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set(skel, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set(skel.graph, field, value)
    f.write(skel.SerializeToString())
    for init in model.graph.initializer:
        piece = onnx.ModelProto()
        piece.graph.initializer.append(init)  # one tensor copied at a time
        f.write(piece.SerializeToString())


def _set(msg, field, value) -> None:
    """Copy one set field (as ``ListFields`` gives it) into ``msg``: repeated, message or scalar."""
    if hasattr(value, "CopyFrom"):
        getattr(msg, field.name).CopyFrom(value)
    elif hasattr(value, "extend"):
        getattr(msg, field.name).extend(value)
    else:
        setattr(msg, field.name, value)


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` to ``path`` atomically; weights go to ``<name>.data`` beside it when the graph is over
    2 GiB. Returns the files written (graph first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    external = is_large(model)
    if not external:
        data_path.unlink(missing_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write_in_pieces(model, f)
        return [path]
    # External data is written under its final name (the graph references it by name); the graph file, renamed
    # last, is what makes the pair visible, and the manifest hashes both.
    with tempfile.TemporaryDirectory(prefix=".sdtrt-save-", dir=path.parent) as tmp:
        tmp_graph = Path(tmp) / path.name
        onnx.save_model(model, str(tmp_graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        umask = os.umask(0)
        os.umask(umask)
        for f in (tmp_graph, Path(tmp) / data_name):
            f.chmod(0o666 & ~umask)  # onnx writes the data file 0600
        os.replace(Path(tmp) / data_name, data_path)
        os.replace(tmp_graph, path)
    return [path, data_path]


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], io: GraphIO, path: Path,
                 *, precision: str, opset: int, traced: Callable[[], None] | None = None,
                 inspect: Callable[[onnx.ModelProto], None] | None = None) -> list[Path]:
    """Trace, optimise, check against TensorRT's parser rules and save one component graph; returns the files
    written (none when a check fails). ``traced`` runs once the module has been traced (the torch module is no
    longer needed: a caller that owns it frees it there); ``inspect`` sees the final graph before it is saved
    (the LoRA map reads its initializers there)."""
    # The steps of ``optimise``, each result rebound here so that every earlier model is freed as soon as the
    # next exists: a full-size UNet is 3.4 GB in fp32.
    log.info("tracing %s", path.name)
    model = trace_to_onnx(module, args, io, opset)
    del module, args
    if traced is not None:
        traced()
    release_memory()
    if precision == "fp16":  # to_precision's two steps, so that the fp32 model is gone before folding
        log.info("converting %s to fp16", path.name)
        model = convert_to_fp16(model, fp32_inputs=io.fp32_inputs)
        release_memory()
    log.info("folding %s", path.name)
    model = fold_and_clean(model)
    release_memory()
    log.info("checking %s", path.name)
    model = infer_shapes(model)
    check_graph(model)
    check_trt_rules(model, path.stem)
    if inspect is not None:
        inspect(model)
    log.info("saving %s", path.name)
    files = save_graph(model, path)
    del model
    release_memory()
    return files
