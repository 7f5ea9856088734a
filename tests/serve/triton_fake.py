"""``triton_python_backend_utils`` for running model.py in-process: the real module that PyTriton's wheel ships,
plus stand-ins for the classes Triton's Python backend stub adds to it from C++ (``c_python_backend_utils``), which
exist only inside a running stub. test_triton_server.py checks each stand-in against the real class, read from a
running tritonserver (``CHECKED``)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np


def triton_dir() -> Path | None:
    """PyTriton's ``tritonserver`` folder (the binary, backends, stubs), found without importing pytriton; None
    when nvidia-pytriton is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return path if (path / "bin" / "tritonserver").is_file() else None


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] = (), error: TritonError | None = None) -> None:
        self._tensors, self._error = list(output_tensors), error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    """Built by tests (Triton builds the real one): only what the model reads is checked."""

    def __init__(self, **inputs: np.ndarray) -> None:
        self._inputs = [Tensor(name, array) for name, array in inputs.items()]

    def inputs(self) -> list[Tensor]:
        return self._inputs


# stand-in -> the members whose names and signatures must match the real class
CHECKED: dict[type, tuple[str, ...]] = {
    Tensor: ("__init__", "name", "as_numpy"),
    TritonError: ("__init__", "message"),
    InferenceResponse: ("__init__", "output_tensors", "has_error", "error"),
    InferenceRequest: ("inputs",),
}


def pb_utils(directory: Path) -> types.ModuleType:
    """A fresh ``triton_python_backend_utils``: the wheel's file from ``directory`` with the stand-ins added, as the
    stub adds the real classes."""
    path = directory / "backends" / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for cls in CHECKED:
        setattr(module, cls.__name__, cls)
    return module
