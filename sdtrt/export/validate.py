"""Every export checks itself: the ONNX graph runs in ONNX Runtime against the torch module on the same inputs.

Tolerances (``TOLERANCES``), per output, on inputs drawn from a seeded generator at two shapes per component:

* float outputs: ``rel = max|onnx - torch| / max|torch|`` (error relative to the output's peak, so one number
  works for hidden states of norm ~30 and noise predictions of norm ~1). fp32 graphs must agree to 1e-4 (only
  operator-order rounding differs); fp16 graphs to 2e-2 (fp16 has 11 significant bits, ~5e-4 per rounding, and
  errors compound through ~100 layers; measured 1e-3 to 5e-3 on the tiny checkpoints).
* uint8 images: the largest difference in pixel levels. fp32: 1 level (a value at x.5 may round either way);
  fp16: 8 levels of 255 (~3%), with the mean difference also reported.
* bool flags (the decoder's ``finite``): the number of disagreeing elements, which must be 0.

For fp16 graphs the float inputs are rounded to fp16 first and the torch module (fp32) sees the same rounded
values, so only the graph's own precision is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtrt.errors import ExportError
from sdtrt.export.component import ComponentExport

TOLERANCES: dict[tuple[str, str], float] = {
    ("fp32", "float"): 1e-4,
    ("fp16", "float"): 2e-2,
    ("fp32", "uint8"): 1.0,
    ("fp16", "uint8"): 8.0,
    ("fp32", "bool"): 0.0,
    ("fp16", "bool"): 0.0,
}
METRICS = {"float": "rel_to_peak", "uint8": "max_levels", "bool": "mismatches"}


@dataclass(frozen=True)
class OutputError:
    output: str
    kind: str  # float, uint8 or bool
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    ref_max_abs: float
    metric: float  # rel for float outputs, max level difference for uint8
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.metric)) and self.metric <= self.tolerance

    def as_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "ref_max_abs": self.ref_max_abs,
            "metric": METRICS[self.kind],
            "value": self.metric,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Case:
    """One check: the inputs as ONNX Runtime is fed them, and the torch module's outputs on the same values."""

    feeds: dict[str, np.ndarray]
    refs: tuple[np.ndarray, ...]


def reference_cases(comp: ComponentExport, precision: str, seed: int = 0) -> list[Case]:
    """The torch module's outputs at each check size. Float inputs of fp16 graphs (all but the fp32 inputs) are
    rounded to fp16 first and the module sees the same rounded values. Computed before the graph is exported, so an
    exporter that owns the checkpoint can free the module before ONNX Runtime loads the graph."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for size in comp.check_sizes:
        args = comp.make_inputs(size, gen)
        feeds: dict[str, np.ndarray] = {}
        torch_args = []
        for spec, value in zip(comp.inputs, args, strict=True):
            arr = value.numpy()
            if precision == "fp16" and spec.dtype == "float" and spec.name not in comp.io.fp32_inputs:
                arr = arr.astype(np.float16)
                value = torch.from_numpy(arr.astype(np.float32))
            feeds[spec.name] = arr
            torch_args.append(value)
        with torch.no_grad():
            ref = comp.module(*torch_args)
        cases.append(Case(feeds, tuple(r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,)))))
    return cases


def compare_with_onnx(comp: ComponentExport, path: Path, precision: str, cases: list[Case]) -> list[list[OutputError]]:
    """Run ``path`` in ONNX Runtime on each case and measure its outputs against the torch references.
    Returns the errors per case; raises nothing (the caller decides what fails)."""
    session = _session(path)
    fp16_inputs = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    results: list[list[OutputError]] = []
    for case in cases:
        fed = {name for name, arr in case.feeds.items() if arr.dtype == np.float16}
        if fed != fp16_inputs:
            raise ExportError(f"{comp.name}: the exported graph's fp16 inputs are {sorted(fp16_inputs)}, the check "
                              f"rounded {sorted(fed)} to fp16")
        outs = session.run([s.name for s in comp.outputs], case.feeds)
        errors = []
        for spec, got, want in zip(comp.outputs, outs, case.refs, strict=True):
            if got.shape != want.shape:
                raise ExportError(f"{comp.name}: output {spec.name} has shape {got.shape} in ONNX Runtime, {want.shape} in torch")
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            peak = float(np.abs(want.astype(np.float64)).max())
            kind = spec.dtype if spec.dtype in ("uint8", "bool") else "float"
            if kind == "float":
                metric = float(diff.max() / max(peak, 1e-12))
            else:
                metric = float(diff.max()) if kind == "uint8" else float((diff != 0).sum())
            errors.append(
                OutputError(
                    output=spec.name,
                    kind=kind,
                    shape=tuple(got.shape),
                    max_abs=float(diff.max()),
                    mean_abs=float(diff.mean()),
                    ref_max_abs=peak,
                    metric=metric if np.all(np.isfinite(got.astype(np.float64))) else float("inf"),
                    tolerance=TOLERANCES[(precision, kind)],
                )
            )
        results.append(errors)
    return results


def validate_component(comp: ComponentExport, path: Path, precision: str, seed: int = 0) -> list[list[OutputError]]:
    """Run ``path`` in ONNX Runtime and ``comp.module`` in torch on the same inputs, for each check size."""
    return compare_with_onnx(comp, path, precision, reference_cases(comp, precision, seed))


def raise_if_failed(component: str, precision: str, results: list[list[OutputError]]) -> None:
    for errors in results:
        for e in errors:
            if not e.passed:
                what = {"float": "relative error", "uint8": "max level difference", "bool": "mismatches"}[e.kind]
                raise ExportError(
                    f"{component} ({precision}) failed validation against torch: output {e.output} at shape "
                    f"{list(e.shape)} has {what} {e.metric:.3g} > tolerance {e.tolerance:g}"
                    + ("" if precision == "fp32" else "; if it overflows in fp16 try --precision fp32 (or --vae-precision fp32)")
                )
