"""``sdtrt export-triton WORKDIR REPO``: a Triton Inference Server model repository that serves a WORKDIR.

    REPO/<model_name>/config.pbtxt     inputs and output, dynamic batching, instance groups, WORKDIR, BACKEND
                                       and PYTHON_PATH (``--python-path``, when given)
    REPO/<model_name>/1/model.py       ``sdtrt/serve/triton_model.py``, copied verbatim (Triton's Python backend)

The model directory is written whole, atomically (a temporary sibling renamed into place), so a Triton polling the
repository never sees half of it. The config is rendered as text and parsed with Triton's own ``ModelConfig``
protobuf before anything is written. The WORKDIR is recorded as an absolute path: mount it at the same path
inside Triton's container.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sdtrt
from sdtrt.errors import UsageError
from sdtrt.export.manifest import read_manifest
from sdtrt.fsutil import atomic_dir, write_bytes_atomic
from sdtrt.runtime.backends import BACKENDS
from sdtrt.runtime.request import MAX_BATCH
from sdtrt.serve import triton_model
from sdtrt.serve.triton_model import INPUTS, OUTPUT_DIMS, OUTPUT_NAME, OUTPUT_TYPE, PYTHON_PATH

CONFIG = "config.pbtxt"
VERSION = "1"
MODEL_FILE = "model.py"
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonSpec:
    """What the repository asks of Triton. ``gpus`` None: ``instances_per_gpu`` on every visible GPU. ``cpu``:
    KIND_CPU instances (testing without a GPU). ``execution_env``: a conda-pack'd tarball with sdtrt installed,
    recorded as the Python backend's EXECUTION_ENV_PATH verbatim (it may use ``$$TRITON_MODEL_DIRECTORY``).
    ``python_path``: absolute directories model.py puts in front of ``sys.path`` before importing sdtrt (Triton's
    Python backend ignores PYTHONPATH): a virtualenv's site-packages, the source tree of an editable install."""

    model_name: str = "sdtrt"
    max_batch_size: int = 4
    max_queue_delay_us: int = 10000
    instances_per_gpu: int = 1
    gpus: tuple[int, ...] | None = None
    backend: str = "auto"
    cpu: bool = False
    execution_env: str | None = None
    python_path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not _MODEL_NAME.fullmatch(self.model_name):
            raise UsageError(f"model name must be letters, digits, '_', '.' or '-' (a directory name), got {self.model_name!r}")
        for label, v, lo, hi in (("max batch size", self.max_batch_size, 1, MAX_BATCH),
                                 ("max queue delay (microseconds)", self.max_queue_delay_us, 0, None),
                                 ("instances per GPU", self.instances_per_gpu, 1, None)):
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise UsageError(f"{label} must be an integer {bound}, got {v!r}")
        if self.gpus is not None:
            object.__setattr__(self, "gpus", tuple(self.gpus))  # a list from the CLI is fine too
            if self.cpu:
                raise UsageError("GPU ids and CPU instances exclude each other")
            if not self.gpus or not all(_is_int(g) and g >= 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
                raise UsageError(f"GPU ids must be distinct non-negative integers, got {self.gpus!r}")
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.execution_env is not None and (not isinstance(self.execution_env, str) or not self.execution_env):
            raise UsageError(f"the execution environment must be a path to a .tar.gz, got {self.execution_env!r}")
        object.__setattr__(self, "python_path", tuple(self.python_path))
        for entry in self.python_path:
            # os.pathsep joins them in config.pbtxt; a relative one would be relative to Triton's working directory
            if not isinstance(entry, str) or not entry or os.pathsep in entry or not os.path.isabs(entry):
                raise UsageError(f"python path entries must be absolute directories, got {entry!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _quote(s: str) -> str:
    """``s`` as a protobuf text-format string literal (UTF-8 passes through; quotes, backslashes and control
    characters are escaped)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render_config(spec: TritonSpec, workdir: str | Path) -> str:
    """``config.pbtxt`` for ``spec`` serving ``workdir`` (recorded as an absolute path)."""
    workdir = Path(workdir).resolve()
    inputs = ",\n".join(
        f'  {{ name: "{inp.name}" data_type: {inp.data_type} dims: [ 1 ]{" optional: true" if inp.optional else ""} }}'
        for inp in INPUTS
    )
    group = f"count: {spec.instances_per_gpu} kind: {'KIND_CPU' if spec.cpu else 'KIND_GPU'}"
    if spec.gpus is not None:
        group += f" gpus: [ {', '.join(str(g) for g in spec.gpus)} ]"
    params = {"WORKDIR": str(workdir), "BACKEND": spec.backend}
    if spec.execution_env is not None:
        params["EXECUTION_ENV_PATH"] = spec.execution_env
    if spec.python_path:
        params[PYTHON_PATH] = os.pathsep.join(spec.python_path)
    lines = [
        f"# written by sdtrt {sdtrt.__version__} export-triton; model.py is sdtrt/serve/triton_model.py",
        f"name: {_quote(spec.model_name)}",
        'backend: "python"',
        f"max_batch_size: {spec.max_batch_size}",
        "input [",
        inputs,
        "]",
        "output [",
        f'  {{ name: "{OUTPUT_NAME}" data_type: {OUTPUT_TYPE} dims: [ {", ".join(str(d) for d in OUTPUT_DIMS)} ] }}',
        "]",
        # requests wait up to the delay for others to share a micro-batch of up to max_batch_size rows
        f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} }}",
        f"instance_group [ {{ {group} }} ]",
        *(f"parameters {{ key: {_quote(k)} value {{ string_value: {_quote(v)} }} }}" for k, v in params.items()),
    ]
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> Any:
    """``text`` parsed into Triton's ``ModelConfig`` protobuf; ``UsageError`` when it does not parse."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise UsageError(f"checking a Triton model config needs tritonclient ({e}); pip install 'tritonclient[grpc]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise UsageError(f"invalid Triton model config: {e}") from None


def model_source() -> str:
    """The text of the ``model.py`` the repository gets."""
    return Path(triton_model.__file__).read_text(encoding="utf-8")


def export_triton(workdir: str | Path, repo: str | Path, spec: TritonSpec = TritonSpec(), *, overwrite: bool = False) -> Path:
    """Write ``REPO/<spec.model_name>/`` serving ``workdir``; return that model directory. ``UsageError`` when it
    exists (unless ``overwrite``) or a ``spec.python_path`` entry is not a directory here; the manifest's
    ``CheckpointError`` when ``workdir`` is not a complete export."""
    workdir = Path(workdir).resolve()
    read_manifest(workdir)
    for entry in spec.python_path:
        if not Path(entry).is_dir():
            raise UsageError(f"python path entry {entry} is not a directory")
    model_dir = Path(repo) / spec.model_name
    if model_dir.exists() and not overwrite:
        raise UsageError(f"{model_dir} already exists; pass --overwrite to replace it")
    text = render_config(spec, workdir)
    parse_config(text)  # a config Triton would refuse fails here, before anything is written
    with atomic_dir(model_dir) as tmp:
        write_bytes_atomic(tmp / CONFIG, text.encode("utf-8"))
        write_bytes_atomic(tmp / VERSION / MODEL_FILE, model_source().encode("utf-8"))
    return model_dir
