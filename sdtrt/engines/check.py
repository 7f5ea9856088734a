"""``sdtrt check``: every engine against ONNX Runtime (CPU) on the same seeded random inputs, at the engine's opt
shape, with the exporter's tolerances (``sdtrt.export.validate.TOLERANCES``) and metrics:

* float outputs: max |trt - ort| / max |ort| (error relative to the output's peak);
* uint8 images: the largest difference in pixel levels; bool flags: the number of disagreeing elements.

Both run the same graph, so the fp16 rows apply to fp16 graphs, and also to fp32 graphs whose engine was built with
TF32 (TensorRT's default: fp32 matmuls and convolutions on TF32 tensor cores keep fp16's 10-bit mantissa); fp32
engines built with ``--no-tf32`` are held to the fp32 rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.checkpoint.model import TOKENIZER_DIRS
from sdtrt.engines.sidecar import read_sidecar
from sdtrt.errors import UsageError
from sdtrt.export.manifest import read_manifest
from sdtrt.export.validate import METRICS, TOLERANCES, OutputError
from sdtrt.runtime.backends.base import resolve_shape

log = logging.getLogger(__name__)

_NP = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
       "bool": np.bool_}


@dataclass(frozen=True)
class ComponentCheck:
    component: str
    precision: str  # the graph's, from the manifest
    tolerances: str  # the TOLERANCES row used: "fp16" or "fp32"
    dims: dict[str, int]  # the opt shape it ran at
    errors: tuple[OutputError, ...]

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.errors)


@dataclass(frozen=True)
class CheckReport:
    workdir: str
    tensorrt: str  # flavour and version, e.g. "TensorRT-RTX 1.7.1.116"
    gpu: str
    seed: int
    components: tuple[ComponentCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.components)

    @property
    def failures(self) -> list[tuple[str, OutputError]]:
        return [(c.component, e) for c in self.components for e in c.errors if not e.passed]


def tolerance_row(precision: str, flags: Iterable[str]) -> str:
    return "fp16" if precision == "fp16" or "TF32" in flags else "fp32"


def random_inputs(entry: Mapping, dims: Mapping[str, int], seed: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Seeded inputs like the exporter's checks: token ids below ``vocab_size``, pixels 0..255, a timestep and
    SDXL's time ids (sizes in px) in 1..999, standard normal floats rounded to the graph's dtype."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in entry["inputs"]:
        shape = resolve_shape(spec["shape"], dims)
        dtype = spec["dtype"]
        if dtype in ("int32", "int64"):
            arr = rng.integers(0, vocab_size, size=shape)
        elif dtype == "uint8":
            arr = rng.integers(0, 256, size=shape)
        elif spec["name"] in ("timestep", "time_ids"):
            arr = rng.integers(1, 1000, size=shape).astype(np.float32)
        else:
            arr = rng.standard_normal(size=shape)
        out[spec["name"]] = np.ascontiguousarray(arr.astype(_NP[dtype]))
    return out


def compare_outputs(entry: Mapping, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                    tolerances: str) -> tuple[OutputError, ...]:
    """Per output of ``entry``: ``got`` (engine) against ``want`` (ONNX Runtime) with the exporter's metrics."""
    errors = []
    for spec in entry["outputs"]:
        name = spec["name"]
        g, w = np.asarray(got[name]), np.asarray(want[name])
        kind = spec["dtype"] if spec["dtype"] in ("uint8", "bool") else "float"
        if g.shape != w.shape:
            metric, diff, peak = float("inf"), np.full(1, np.inf), float("nan")
        else:
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            peak = float(np.abs(w.astype(np.float64)).max()) if w.size else 0.0
            if kind == "float":
                metric = float(diff.max() / max(peak, 1e-12)) if diff.size else 0.0
            else:
                metric = float(diff.max()) if kind == "uint8" else float((diff != 0).sum())
            if not np.all(np.isfinite(g.astype(np.float64))):
                metric = float("inf")
        errors.append(OutputError(
            output=name, kind=kind, shape=tuple(g.shape), max_abs=float(diff.max()) if diff.size else 0.0,
            mean_abs=float(diff.mean()) if diff.size else 0.0, ref_max_abs=peak, metric=metric,
            tolerance=TOLERANCES[(tolerances, kind)],
        ))
    return tuple(errors)


def _run(runner: Any, dims: Mapping[str, int], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run on a stream of its own on CUDA (the legacy default stream synchronises with every other stream,
    which TensorRT warns about and CUDA graphs refuse), as the pipeline runs engines."""
    cuda = runner.device.type == "cuda"
    with torch.cuda.stream(torch.cuda.Stream(runner.device)) if cuda else contextlib.nullcontext():
        runner.activate(dims)
        for name, arr in feeds.items():
            runner.inputs[name].copy_(torch.from_numpy(arr))
        runner.run()
        if cuda:
            torch.cuda.current_stream(runner.device).synchronize()
        return {name: t.cpu().numpy().copy() for name, t in runner.outputs.items()}


def _vocab_size(workdir: Path, component: str) -> int:
    """Token ids ``component`` can embed (its tokenizer's vocabulary); 1 for graphs without token ids."""
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    folder = TOKENIZER_DIRS.get(component)
    return len(load_tokenizer(workdir / folder)) if folder is not None else 1


def check_engines(workdir: str | Path, *, seed: int = 0, components: Iterable[str] | None = None) -> CheckReport:
    """Run each engine (default: every built one) and the ONNX graph it was built from on the same inputs."""
    from sdtrt.runtime.backends.ort_backend import OrtBackend
    from sdtrt.runtime.backends.trt_backend import TensorRTBackend

    workdir = Path(workdir)
    manifest = read_manifest(workdir)
    trt = TensorRTBackend(workdir, manifest, torch.device("cuda"))
    ort = OrtBackend(workdir, manifest, torch.device("cpu"))
    names = list(trt.components if components is None else components)
    missing = [n for n in names if n not in trt.components]
    if missing:
        raise UsageError(f"{workdir}: no engine for {', '.join(missing)}; build it with `sdtrt build {workdir}`")
    results = []
    for i, name in enumerate(names):
        entry = manifest["components"][name]
        sidecar = read_sidecar(workdir, name)
        dims = trt.profile(name).dims("opt")
        feeds = random_inputs(entry, dims, seed + i, _vocab_size(workdir, name))
        got = _run(trt.runner(name), dims, feeds)
        want = _run(ort.runner(name), dims, feeds)
        row = tolerance_row(entry["precision"], sidecar.get("flags", []))
        results.append(ComponentCheck(name, entry["precision"], row, dims, compare_outputs(entry, got, want, row)))
        log.info("checked %s at %s", name, dims)
    env = trt.flavour.environment()
    return CheckReport(str(workdir), trt.flavour.label(), env.gpu_text(), seed, tuple(results))


def format_report(report: CheckReport) -> str:
    """Per-output error statistics against tolerances, one line each, for ``sdtrt check``."""
    lines = [f"{report.workdir}: {report.tensorrt} on {report.gpu} vs ONNX Runtime (CPU), seed {report.seed}"]
    for c in report.components:
        dims = ", ".join(f"{k}={v}" for k, v in c.dims.items())
        lines.append(f"  {c.component} ({c.precision} graph, {c.tolerances} tolerances) at {dims}")
        for e in c.errors:
            verdict = "ok" if e.passed else "FAIL"
            lines.append(f"    {e.output:<26} {str(list(e.shape)):<18} {METRICS[e.kind]} {e.metric:.3g} "
                         f"(tolerance {e.tolerance:g})  max_abs {e.max_abs:.3g}  mean_abs {e.mean_abs:.3g}  "
                         f"ref_max_abs {e.ref_max_abs:.3g}  {verdict}")
    n = sum(len(c.errors) for c in report.components)
    bad = report.failures
    if bad:
        lines.append(f"{len(bad)} of {n} outputs exceed their tolerance: " + ", ".join(f"{c}.{e.output}" for c, e in bad))
    else:
        lines.append(f"all {n} outputs of {len(report.components)} engines within tolerance")
    return "\n".join(lines)
