"""Triton Python-backend model for an sdtrt WORKDIR; ``sdtrt export-triton`` copies this file to ``REPO/NAME/1/model.py``.

Each model instance is its own process: ``initialize`` loads ``Pipeline.load(WORKDIR, backend=BACKEND)`` (both
from the config's ``parameters``) on the instance's GPU. Triton's dynamic batcher hands ``execute`` several
requests at once; every request row becomes one ``GenerateRequest`` (batch 1), rows that share a ``batch_key`` run
as one micro-batch of at most ``max_batch_size`` rows, and each request is answered with its rows' images as one
``IMAGE`` (rows, H, W, 3) uint8 tensor, or with an error response of one line. ``execute`` never raises.

Triton's Python backend embeds the system's Python with its own ``sys.path`` (``PYTHONPATH`` is not passed on), so
before anything outside the standard library is imported, the ``PYTHON_PATH`` parameter of the ``config.pbtxt``
next to this file's version folder (``sdtrt export-triton --python-path``: a virtualenv's site-packages, a source
tree) is put in front of ``sys.path``. Only that one parameter is read here, with the standard library; the rest
of the config comes to ``initialize`` from Triton.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_PATH = "PYTHON_PATH"  # the config.pbtxt parameter: absolute directories joined with os.pathsep
_PARAMETER = re.compile(
    r'parameters\s*:?\s*\{\s*key\s*:\s*"' + PYTHON_PATH + r'"\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"')


def python_path(config_text: str) -> list[str]:
    """The entries of the ``PYTHON_PATH`` parameter in ``config_text`` (config.pbtxt as ``sdtrt export-triton``
    writes it, spacing aside), in order; [] without one."""
    m = _PARAMETER.search(config_text)
    if m is None:
        return []
    value = codecs.escape_decode(m.group(1).encode("utf-8"))[0].decode("utf-8")  # text format's \" \\ \ooo
    return [p for p in value.split(os.pathsep) if p]


def prepend_python_path(config_file: Path) -> list[str]:
    """Put the ``PYTHON_PATH`` entries of ``config_file`` in front of ``sys.path`` (no-op without the file or the
    parameter); return them."""
    try:
        entries = python_path(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:  # imported as sdtrt.serve.triton_model, not as a repository's model.py
        return []
    if sys.path[: len(entries)] != entries:  # importing twice adds nothing
        sys.path[:0] = entries
    return entries


# REPO/NAME/1/model.py -> REPO/NAME/config.pbtxt; before numpy, pb_utils (which imports numpy) and sdtrt
prepend_python_path(Path(__file__).resolve().parent.parent / "config.pbtxt")

try:
    import numpy as np

    from sdtrt.errors import SdtrtError, UsageError, one_line
    from sdtrt.runtime.request import BatchKey, GenerateRequest, batch_key
except ImportError as e:  # the first thing a user sees in Triton's log when the environment is wrong
    raise ImportError(f"sdtrt is not importable in Triton's Python environment ({e}; sys.path {sys.path}); "
                      "install it there, export with --python-path naming the site-packages that hold it, or point "
                      "the model's EXECUTION_ENV_PATH parameter at a conda-pack'd env") from e

try:
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub
except ImportError:  # importable without Triton: for tests and for ``sdtrt export-triton``
    pb_utils = None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonInput:
    """One input: a single value per request row (dims [1] after the batch dim)."""

    name: str
    data_type: str  # Triton's type name in config.pbtxt
    field: str  # the GenerateRequest field it sets
    optional: bool = True


INPUTS: tuple[TritonInput, ...] = (
    TritonInput("PROMPT", "TYPE_STRING", "prompt", optional=False),
    TritonInput("NEGATIVE_PROMPT", "TYPE_STRING", "negative_prompt"),
    TritonInput("SEED", "TYPE_INT64", "seed"),
    TritonInput("STEPS", "TYPE_INT32", "steps"),
    TritonInput("GUIDANCE", "TYPE_FP32", "guidance"),
    TritonInput("HEIGHT", "TYPE_INT32", "height"),
    TritonInput("WIDTH", "TYPE_INT32", "width"),
    TritonInput("SCHEDULER", "TYPE_STRING", "scheduler"),  # empty string: the checkpoint's own
)
OUTPUT_NAME, OUTPUT_TYPE, OUTPUT_DIMS = "IMAGE", "TYPE_UINT8", (-1, -1, 3)  # per row: (H, W, 3)


def _value(inp: TritonInput, v: Any) -> Any:
    if inp.data_type == "TYPE_STRING":
        try:
            text = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError:
            raise UsageError(f"{inp.name} is not valid UTF-8") from None
        return None if inp.field == "scheduler" and not text else text
    if inp.data_type == "TYPE_FP32":
        return float(str(np.float32(v)))  # the decimal the client sent (7.3, not 7.300000190734863)
    return int(v)


def request_rows(get: Any) -> list[GenerateRequest]:
    """The ``GenerateRequest`` of each row of one Triton request; ``get(name)`` is its input as a numpy array
    (leading batch dim) or None when absent. ``UsageError`` on a malformed request."""
    columns: dict[str, np.ndarray] = {}
    for inp in INPUTS:
        arr = get(inp.name)
        if arr is None:
            if not inp.optional:
                raise UsageError(f"input {inp.name} is required")
            continue
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[1] != 1:
            raise UsageError(f"input {inp.name} must have shape (rows, 1), got {tuple(arr.shape)}")
        columns[inp.name] = arr[:, 0]
    rows = len(columns["PROMPT"])
    if rows == 0:
        raise UsageError("input PROMPT has no rows")
    for name, col in columns.items():
        if len(col) != rows:
            raise UsageError(f"input {name} has {len(col)} rows but PROMPT has {rows}")
    fields = {inp.name: inp for inp in INPUTS}
    return [
        GenerateRequest(**{fields[name].field: _value(fields[name], col[i]) for name, col in columns.items()})
        for i in range(rows)
    ]


def _message(e: BaseException) -> str:
    if isinstance(e, SdtrtError):  # written for users, as the CLI prints them
        return one_line(e).removeprefix(f"{type(e).__name__}: ")
    return f"internal error: {one_line(e)}"


class TritonPythonModel:
    """Triton's Python-backend protocol: ``initialize(args)``, ``execute(requests)``, ``finalize()``."""

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        from sdtrt.runtime.pipeline import Pipeline

        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        if "WORKDIR" not in params:
            raise UsageError("the model config has no WORKDIR parameter; re-run `sdtrt export-triton`")
        workdir = params["WORKDIR"]["string_value"]
        backend = params.get("BACKEND", {}).get("string_value", "auto")
        self.max_batch = int(config.get("max_batch_size", 0))
        if self.max_batch < 1:
            raise UsageError("this model needs max_batch_size >= 1 (inputs carry a batch dimension)")
        kind, device_id = args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0))
        if kind == "GPU":
            torch.cuda.set_device(device_id)  # before loading: backends place everything on the current device
        self.pipeline = Pipeline.load(workdir, backend=backend)
        if kind != "GPU" and self.pipeline.device.type == "cuda":
            log.warning("instance %s is KIND_CPU but backend %s runs on %s", args.get("model_instance_name"),
                        self.pipeline.backend.name, self.pipeline.device)
        log.info("sdtrt Triton instance %s: %s on %s, micro-batches of up to %d rows",
                 args.get("model_instance_name"), self.pipeline.backend.name, self.pipeline.device, self.max_batch)

    def execute(self, requests: list[Any]) -> list[Any]:
        errors: dict[int, str] = {}  # request index -> message
        rows_of: list[int] = []
        groups: dict[BatchKey, list[tuple[int, int, GenerateRequest]]] = {}  # (request, row, validated request)
        for i, request in enumerate(requests):
            try:
                reqs = [self.pipeline.validate(r) for r in request_rows(functools.partial(_input, request))]
                if len({(r.height, r.width) for r in reqs}) > 1:
                    raise UsageError("the rows of one request must share HEIGHT and WIDTH")
            except Exception as e:  # one bad request must not fail the others
                if not isinstance(e, SdtrtError):
                    log.exception("request %d could not be read", i)
                errors[i] = _message(e)
                rows_of.append(0)
                continue
            rows_of.append(len(reqs))
            for j, r in enumerate(reqs):
                groups.setdefault(batch_key(r), []).append((i, j, r))

        images: dict[tuple[int, int], np.ndarray] = {}
        for group in groups.values():
            limit = self.pipeline.max_rows(group[0][2], self.max_batch)  # what the engines take at this size
            for start in range(0, len(group), limit):
                chunk = [row for row in group[start : start + limit] if row[0] not in errors]
                if not chunk:
                    continue
                try:
                    results = self.pipeline.generate_batch([r for _, _, r in chunk])
                except Exception as e:  # answered as errors, never raised to Triton
                    if not isinstance(e, SdtrtError):
                        log.exception("generate_batch failed")
                    for i, _, _ in chunk:
                        errors.setdefault(i, _message(e))
                    continue
                for (i, j, _), res in zip(chunk, results, strict=True):
                    if isinstance(res, BaseException):  # this row's own failure (e.g. an fp16 overflow)
                        errors.setdefault(i, _message(res))
                    else:
                        images[i, j] = np.asarray(res.images[0], dtype=np.uint8)  # (H, W, 3)

        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
            else:
                pixels = np.stack([images[i, j] for j in range(rows_of[i])])  # (rows, H, W, 3)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, pixels)]))
        return responses

    def finalize(self) -> None:
        self.pipeline = None


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
