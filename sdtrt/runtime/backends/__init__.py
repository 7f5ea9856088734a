"""Backend choice, made once at load: ``auto`` picks tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime-cpu.

``auto`` picks TensorRT only when every exported component has an engine that can run here (its flavour installed,
this GPU among what it was built for, built from this export); otherwise it says why and takes the next one, so a
partial or stale build never fails a request that another backend can serve."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from sdtrt.errors import UsageError
from sdtrt.runtime.backends.base import Backend, Runner

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime", "torch")


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _engines_usable(workdir: Path, manifest: Mapping | None) -> bool:
    if manifest is None or not (workdir / "engines").is_dir():
        return False
    from sdtrt.runtime.backends.trt_backend import engines_ready

    reason = engines_ready(workdir, manifest)
    if reason is not None:
        log.warning("backend auto: not using the TensorRT engines in %s: %s", workdir, reason)
    return reason is None


def resolve_backend_name(name: str, workdir: Path, manifest: Mapping | None = None) -> tuple[str, torch.device]:
    """The concrete backend and device ``name`` means here; ``auto`` follows the order in the module docstring
    (TensorRT only with ``manifest`` given and every engine usable)."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda and _engines_usable(workdir, manifest):
            return "tensorrt", torch.device("cuda")
        if cuda and _ort_has_cuda():
            return "onnxruntime", torch.device("cuda")
        if cuda:
            return "torch", torch.device("cuda")
        return "onnxruntime", torch.device("cpu")
    if name == "tensorrt" and not cuda:
        raise UsageError("the tensorrt backend needs an NVIDIA GPU; none is visible (try --backend onnxruntime)")
    if name == "onnxruntime":
        return name, torch.device("cuda" if cuda and _ort_has_cuda() else "cpu")
    return name, torch.device("cuda" if cuda else "cpu")


def load_backend(name: str, workdir: Path, manifest: Mapping) -> Backend:
    concrete, device = resolve_backend_name(name, workdir, manifest)
    if concrete == "tensorrt":
        from sdtrt.runtime.backends.trt_backend import TensorRTBackend  # noqa: PLC0415 - optional dependency

        backend = TensorRTBackend(workdir, manifest, device)
    elif concrete == "onnxruntime":
        from sdtrt.runtime.backends.ort_backend import OrtBackend

        backend = OrtBackend(workdir, manifest, device)
    else:
        from sdtrt.runtime.backends.torch_backend import TorchBackend

        backend = TorchBackend(workdir, manifest, device)
    log.info("backend: %s on %s", backend.name, device)
    return backend


__all__ = ["BACKENDS", "Backend", "Runner", "load_backend", "resolve_backend_name"]
