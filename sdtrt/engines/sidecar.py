"""Engine files and their JSON sidecars: ``WORKDIR/engines/<component>.plan`` + ``<component>.json``.

A sidecar says what made its plan: the ONNX files (sha256, from the manifest), the TensorRT flavour (TensorRT or
TensorRT-RTX), its version and the compute capabilities built for, the GPU it was built on (none for TensorRT-RTX's
ahead-of-time builds), the build settings and profile, flags, build time and the plan's own sha256. A plan is only
loaded when its sidecar matches this machine (the flavour's rules: ``compat.Flavour.mismatch``), this export and the
plan's bytes; otherwise it is refused with the exact ``sdtrt build`` command that makes a fresh one. A plan of one
flavour is never handed to the other. The plan is written first and the sidecar last (each
atomically, the old sidecar removed before), so an interrupted write leaves a plan without sidecar: never trusted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdtrt.engines import compat
from sdtrt.engines.compat import Environment
from sdtrt.engines.profiles import BuildSpec
from sdtrt.errors import EngineError, UsageError
from sdtrt.fsutil import atomic_path, write_json_atomic

FORMAT_VERSION = 2  # 2: the flavour and its targets (TensorRT-RTX)
ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"


def engines_dir(workdir: str | Path) -> Path:
    return Path(workdir) / ENGINES_DIR


def engine_path(workdir: str | Path, component: str) -> Path:
    return engines_dir(workdir) / f"{component}.plan"


def sidecar_path(workdir: str | Path, component: str) -> Path:
    return engines_dir(workdir) / f"{component}.json"


def timing_cache_path(workdir: str | Path) -> Path:
    return engines_dir(workdir) / TIMING_CACHE


def current_environment(flavour: compat.Flavour, device: Any = None) -> Environment:
    """This process's TensorRT flavour and GPU (None without one; TensorRT proper requires one)."""
    return flavour.environment(device)


def onnx_files(entry: Mapping) -> list[dict[str, str]]:
    """The component's ONNX files (graph and external data) with their sha256, as the manifest records them."""
    return [{"path": f["path"], "sha256": f["sha256"]} for f in entry["files"]]


def make_sidecar(component: str, entry: Mapping, spec: BuildSpec, env: Environment, *, profile: Mapping,
                 input_shapes: Mapping, flags: list[str], build_seconds: float,
                 phases: list[str] | None = None, attention: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A sidecar without its ``plan`` field (``write_engine`` adds it from the bytes it writes)."""
    return {
        "format_version": FORMAT_VERSION,
        "component": component,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt": {"flavour": env.flavour, "version": env.version, "targets": list(spec.targets)},
        "gpu": None if env.gpu_name is None else {"name": env.gpu_name, "compute_capability": env.compute_capability},
        "onnx": onnx_files(entry),
        "precision": entry["precision"],
        "build": spec.settings(),
        "profile": dict(profile),
        "input_shapes": {k: [list(s) for s in v] for k, v in input_shapes.items()},
        "flags": list(flags),
        "build_seconds": round(float(build_seconds), 3),
        "build_phases": list(phases or []),  # what the builder's progress monitor reported
        "attention": dict(attention) if attention is not None else None,  # Softmax layers, and those matched to fused MHA
    }


def write_engine(workdir: str | Path, component: str, plan: Any, sidecar: Mapping[str, Any]) -> Path:
    """Write ``plan`` (bytes or TensorRT's ``IHostMemory``) and its sidecar atomically; returns the plan's path."""
    data = memoryview(plan).cast("B")
    path, side = engine_path(workdir, component), sidecar_path(workdir, component)
    record = {**sidecar, "plan": {"path": f"{ENGINES_DIR}/{path.name}", "sha256": hashlib.sha256(data).hexdigest(),
                                  "bytes": data.nbytes}}
    side.unlink(missing_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    write_json_atomic(side, record)
    return path


def read_sidecar(workdir: str | Path, component: str) -> dict[str, Any]:
    """The sidecar of ``component``'s engine; ``EngineError`` (with the rebuild command) if missing or unreadable."""
    path = sidecar_path(workdir, component)
    again = f"rebuild it: `{rebuild_command(workdir, None, [component])}`"
    if not path.is_file():
        raise EngineError(f"{engine_path(workdir, component)} has no sidecar {path.name} (not built by sdtrt, or "
                          f"the build was interrupted); {again}")
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: unreadable engine sidecar ({e}); {again}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format_version") != FORMAT_VERSION:
        found = sidecar.get("format_version") if isinstance(sidecar, dict) else "?"
        raise EngineError(f"{path}: engine sidecar format {found} is not {FORMAT_VERSION}; {again}")
    return sidecar


def recorded_spec(sidecar: Mapping[str, Any]) -> BuildSpec | None:
    try:
        return BuildSpec.from_settings(sidecar["build"])
    except (KeyError, TypeError, ValueError, UsageError):
        return None


def _short(h: str) -> str:
    return h[:12]


def stale_reason(sidecar: Mapping[str, Any], *, component: str, manifest: Mapping, env: Environment,
                 plan_sha256: str | None = None) -> str | None:
    """Why the engine this sidecar describes must not be used here (one sentence), or None when it is fresh.
    ``plan_sha256``: the plan's actual hash, when the caller has read it."""
    if sidecar.get("component") != component:
        return f"{component}.json describes a {sidecar.get('component')!r} engine"
    entry = manifest.get("components", {}).get(component)
    if entry is None:
        return f"the workdir's manifest has no {component} graph any more (re-exported without it)"
    record = {**(sidecar.get("tensorrt") or {}), "gpu": sidecar.get("gpu")}
    problem = compat.flavour(env.flavour).mismatch(record, env)
    if problem is not None:
        return f"the {component} engine cannot run here: {problem}"
    built, now = sidecar.get("onnx", []), onnx_files(entry)
    if built != now:
        was = {f["path"]: f["sha256"] for f in built}
        changed = [f for f in now if was.get(f["path"]) != f["sha256"]]
        if changed:
            f = changed[0]
            old = was.get(f["path"])
            return (f"the {component} engine was built from another export: {f['path']} has sha256 "
                    f"{_short(f['sha256'])}..., the engine was built from {_short(old) + '...' if old else 'no such file'}")
        return f"the {component} engine was built from other ONNX files ({', '.join(f['path'] for f in built)})"
    if recorded_spec(sidecar) is None:
        return f"{component}.json does not record its build settings"
    if plan_sha256 is not None and plan_sha256 != sidecar.get("plan", {}).get("sha256"):
        return f"{component}.plan does not match the sha256 its sidecar records (corrupt, truncated or replaced)"
    return None


def rebuild_command(workdir: str | Path, spec: BuildSpec | None, components: list[str] | None = None) -> str:
    """The ``sdtrt build`` command line that rebuilds ``components`` with ``spec`` (None: the defaults)."""
    args = ["sdtrt", "build", str(workdir), *(spec.cli_args() if spec is not None else [])]
    if components:
        args += ["--components", ",".join(components)]
    return shlex.join(args)


def stale_message(workdir: str | Path, problems: list[tuple[str, str, BuildSpec | None]]) -> str:
    """One message for every stale engine (component, reason, recorded spec): reasons, then the commands that
    rebuild them with the settings they were built with."""
    reasons = "; ".join(reason for _, reason, _ in problems)
    specs = {spec for _, _, spec in problems}
    if len(specs) == 1:
        cmds = [rebuild_command(workdir, specs.pop(), [c for c, _, _ in problems])]
    else:
        cmds = [rebuild_command(workdir, spec, [c]) for c, _, spec in problems]
    n = len(problems)
    what = f"{n} engines are stale" if n > 1 else "an engine is stale"
    return (f"{workdir}: {what}: {reasons}. Rebuild: " + " && ".join(f"`{c}`" for c in cmds)
            + f" (or `{shlex.join(['sdtrt', 'build', str(workdir), '--rebuild-stale'])}` to rebuild every stale "
            "engine with its recorded settings)")
