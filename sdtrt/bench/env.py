"""The machine and software a benchmark ran on, for the JSON report."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

import sdtrt

_PACKAGES = ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy", "pillow")


def _version(pkg: str) -> str | None:
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(sdtrt.__file__).resolve().parent.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def capture_environment() -> dict[str, Any]:
    """Device, driver, CUDA, library versions, CPU and load: what makes figures comparable, or not."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sdtrt": sdtrt.__version__,
        "sdtrt_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _mem_total_bytes(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "cuda": None,
        "gpu": None,
        "load_average_start": load_average(),
    }
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["cuda"] = torch.version.cuda
        env["gpu"] = {
            "name": props.name,
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "driver": _nvidia_driver(),
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def device_label(env: dict[str, Any]) -> str:
    """A short device name for file names: ``h100``-style GPU name or ``cpu-2core``."""
    if env.get("gpu"):
        name = env["gpu"]["name"].lower().replace("nvidia", "").strip()
        return "-".join(p for p in name.replace("_", " ").split() if p)[:40]
    return f"cpu-{env.get('cpu_count') or 0}core"
