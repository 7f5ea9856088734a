"""``sdtrt build``: a WORKDIR's ONNX graphs -> TensorRT engines, one small step at a time (after Polygraphy):
ONNX path -> strongly typed network -> builder config (one optimization profile, timing cache, progress monitor)
-> serialized plan -> ``engines/<component>.plan`` + sidecar, written atomically.

An engine that is fresh (this GPU, this TensorRT, this export, intact plan) and was built with the requested
settings is skipped. The timing cache ``engines/timing.cache`` is loaded before and merged back after every build,
so later builds (other components, other profiles) reuse earlier kernel timings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from sdtrt.engines import compat
from sdtrt.engines.profiles import BuildSpec, component_profile
from sdtrt.engines.sidecar import (
    Environment,
    current_environment,
    engine_path,
    make_sidecar,
    read_sidecar,
    recorded_spec,
    stale_reason,
    timing_cache_path,
    write_engine,
)
from sdtrt.errors import EngineError, UsageError
from sdtrt.export.manifest import read_manifest
from sdtrt.export.spec import COMPONENTS
from sdtrt.fsutil import sha256_file, write_bytes_atomic

if TYPE_CHECKING:  # run time goes through compat.tensorrt(); this import is for type checkers and the API check
    import tensorrt as trt

log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class PlannedBuild:
    """What ``build_engines`` will do for one component: build with ``spec``, or skip it (``spec`` None)."""

    component: str
    spec: BuildSpec | None
    reason: str


def select_components(manifest: Mapping, components: Iterable[str] | None) -> list[str]:
    exported = [c for c in COMPONENTS if c in manifest["components"]]
    if components is None:
        return exported
    names = list(dict.fromkeys(components))
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown or not names:
        raise UsageError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMPONENTS)}")
    missing = [c for c in names if c not in exported]
    if missing:
        raise UsageError(f"the workdir has no exported {', '.join(missing)}; run `sdtrt export` with it first")
    return names


def plan_builds(workdir: Path, manifest: Mapping, spec: BuildSpec, env: Environment,
                components: list[str]) -> list[PlannedBuild]:
    """Decide per component: build (no engine, stale engine, other settings) or skip (fresh, same settings)."""
    out = []
    for c in components:
        if not engine_path(workdir, c).is_file():
            out.append(PlannedBuild(c, spec, "no engine yet"))
            continue
        try:
            sidecar = read_sidecar(workdir, c)
        except EngineError as e:
            out.append(PlannedBuild(c, spec, str(e).split(";")[0]))
            continue
        reason = stale_reason(sidecar, component=c, manifest=manifest, env=env)
        if reason is None:
            reason = stale_reason(sidecar, component=c, manifest=manifest, env=env,
                                  plan_sha256=sha256_file(engine_path(workdir, c)))
        recorded = recorded_spec(sidecar)
        if spec.rebuild_stale:
            out.append(PlannedBuild(c, recorded or spec, reason) if reason else PlannedBuild(c, None, "up to date"))
        elif reason:
            out.append(PlannedBuild(c, spec, reason))
        elif recorded is None or recorded.settings() != spec.settings():
            out.append(PlannedBuild(c, spec, "built with other settings"))
        else:
            out.append(PlannedBuild(c, None, "up to date"))
    return out


def build_engines(workdir: str | Path, spec: BuildSpec, *, components: Iterable[str] | None = None,
                  progress: bool = True) -> list[Path]:
    """Build the engines of ``components`` (default: every exported one) into ``WORKDIR/engines``.
    Returns the paths of the engines written by this call; up-to-date ones are skipped (and logged)."""
    workdir = Path(workdir)
    manifest = read_manifest(workdir)
    names = select_components(manifest, components)
    spec = replace(spec, profile=spec.profile.resolved(int(manifest["model"]["default_size"])))
    vae_scale = int(manifest["model"]["vae_scale_factor"])
    for name in names:  # every profile is valid for this model before any heavy work
        component_profile(name, manifest["components"][name], spec.profile, vae_scale)
    env = current_environment()
    built = []
    for todo in plan_builds(workdir, manifest, spec, env, names):
        if todo.spec is None:
            log.info("%s: engine up to date, skipped", todo.component)
            continue
        log.info("%s: building (%s)", todo.component, todo.reason)
        built.append(build_engine(workdir, manifest, todo.component, todo.spec, env, progress=progress))
    return built


def build_engine(workdir: Path, manifest: Mapping, component: str, spec: BuildSpec, env: Environment, *,
                 progress: bool = True) -> Path:
    """Build one component's engine with a resolved ``spec`` and write it with its sidecar."""
    trt = compat.tensorrt()
    entry = manifest["components"][component]
    verify_onnx(workdir, component, entry)
    profile = component_profile(component, entry, spec.profile, int(manifest["model"]["vae_scale_factor"]))
    shapes = profile.input_shapes(entry)
    cache_path = timing_cache_path(workdir)
    logger = compat.logger()
    t0 = time.perf_counter()
    with logger.capture() as messages:
        builder = create_builder(logger, messages)
        network, parser = network_from_onnx(builder, workdir / entry["files"][0]["path"], component)
        check_network_io(network, entry, component)
        config = builder_config(builder, spec, shapes, component)
        load_timing_cache(config, cache_path)
        monitor = progress_monitor(trt, component, enabled=progress)
        config.progress_monitor = monitor
        try:
            plan = serialize_plan(builder, network, config, component, messages, monitor)
        finally:
            monitor.close()
        save_timing_cache(config, cache_path)
        flags = ["STRONGLY_TYPED"] + [name for name, on in (("TF32", config.get_flag(trt.BuilderFlag.TF32)),
                                                            ("REFIT", config.get_flag(trt.BuilderFlag.REFIT))) if on]
        del parser  # owns the weights the network points at: kept alive until the plan exists
    seconds = time.perf_counter() - t0
    sidecar = make_sidecar(component, entry, spec, env, profile=profile.to_json(), input_shapes=shapes, flags=flags,
                           build_seconds=seconds)
    path = write_engine(workdir, component, plan, sidecar)
    log.info("%s: built %s in %.1f s", component, path, seconds)
    return path


def verify_onnx(workdir: Path, component: str, entry: Mapping) -> None:
    for f in entry["files"]:
        if sha256_file(workdir / f["path"]) != f["sha256"]:
            raise EngineError(f"{workdir}: {component} file {f['path']} does not match its sha256 in the manifest; re-export")


def create_builder(logger: Any, messages: list[tuple[int, str]]) -> trt.Builder:
    trt = compat.tensorrt()
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:  # pybind11 raises when createInferBuilder returns null
        raise EngineError(f"could not create a TensorRT builder ({e}: {compat.errors_text(messages)}); "
                          "is a CUDA GPU visible and the driver recent enough?") from None
    if builder is None:
        raise EngineError(f"could not create a TensorRT builder: {compat.errors_text(messages)}")
    return builder


def network_from_onnx(builder: trt.Builder, onnx_path: Path, component: str) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Parse ``onnx_path`` (external data beside it is found by path) into a strongly typed network."""
    trt = compat.tensorrt()
    network = builder.create_network(compat.network_flags())
    if network is None:
        raise EngineError(f"{component}: TensorRT could not create a network definition")
    parser = trt.OnnxParser(network, compat.logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        text = "; ".join(
            f"{e.desc()}" + (f" (node {e.node()} {e.node_name()!r}, {e.node_operator()})" if e.node() >= 0 else "")
            for e in errors
        ) or "no error description"
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path} ({component}): {text}")
    return network, parser


def check_network_io(network: trt.INetworkDefinition, entry: Mapping, component: str) -> None:
    """The parsed network's inputs and outputs, names and dtypes, are the manifest's."""
    got_in = {network.get_input(i).name: compat.dtype_name(network.get_input(i).dtype) for i in range(network.num_inputs)}
    got_out = {network.get_output(i).name: compat.dtype_name(network.get_output(i).dtype) for i in range(network.num_outputs)}
    want_in = {s["name"]: s["dtype"] for s in entry["inputs"]}
    want_out = {s["name"]: s["dtype"] for s in entry["outputs"]}
    if (got_in, got_out) != (want_in, want_out):
        raise EngineError(f"{component}: the TensorRT network has inputs {got_in} and outputs {got_out}, the manifest "
                          f"says {want_in} and {want_out}; re-export the workdir")


def builder_config(builder: trt.Builder, spec: BuildSpec, shapes: Shapes, component: str) -> trt.IBuilderConfig:
    """Optimization level, workspace limit, refit and TF32 flags, and the one optimization profile.
    No precision flags: the network is strongly typed. Tactic sources are left to TensorRT."""
    trt = compat.tensorrt()
    config = builder.create_builder_config()
    if config is None:
        raise EngineError(f"{component}: TensorRT could not create a builder config")
    config.builder_optimization_level = spec.opt_level
    if spec.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if spec.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not spec.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        try:
            profile.set_shape(name, lo, opt, hi)
        except RuntimeError as e:
            raise EngineError(f"{component}: TensorRT refused the profile of input {name} "
                              f"(min {lo}, opt {opt}, max {hi}): {e}") from None
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"{component}: TensorRT refused the optimization profile {dict(shapes)}")
    return config


def load_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Use the workdir's timing cache; one from another GPU or TensorRT (or corrupt) is replaced by an empty one."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if data:
        log.warning("ignoring timing cache %s: made by another GPU or TensorRT version, or corrupt", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise EngineError("TensorRT could not set up an empty timing cache")


def save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Merge this build's timings with what is on disk now (another build may have saved since) and save."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache; %s not updated", path)
        return
    if path.is_file():
        disk = config.create_timing_cache(path.read_bytes())
        if disk is None or not cache.combine(disk, False):
            log.warning("could not merge %s into this build's timings; overwriting it", path)
    data = cache.serialize()
    if data is None:
        log.warning("TensorRT could not serialize the timing cache; %s not updated", path)
        return
    try:
        write_bytes_atomic(path, bytes(memoryview(data)))
    except OSError as e:  # the engine is fine without it
        log.warning("could not save the timing cache %s: %s", path, e)


def serialize_plan(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig, component: str,
                   messages: list[tuple[int, str]], monitor: Any = None) -> trt.IHostMemory:
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.interrupted:
        raise KeyboardInterrupt
    if plan is None:
        raise build_error(component, messages)
    return plan


def build_error(component: str, messages: list[tuple[int, str]]) -> EngineError:
    """The error for a failed build: out of GPU memory (with the size TensorRT asked for) or TensorRT's errors."""
    oom, asked = compat.out_of_memory(messages)
    if oom:
        what = f"; TensorRT asked for {compat.gib(asked)}" if asked else ""
        return EngineError(f"GPU out of memory building the {component} engine{what}. Free GPU memory (other "
                           "processes), cap the builder with --workspace MiB, or build a smaller profile (--static, "
                           "or lower --max-batch / --max-side)")
    return EngineError(f"TensorRT could not build the {component} engine: {compat.errors_text(messages)}")


def progress_monitor(trt: Any, component: str, *, enabled: bool = True) -> Any:
    """A ``trt.IProgressMonitor`` drawing one tqdm bar per active build phase (nested phases below their parent).
    TensorRT calls it from its own threads; Ctrl-C inside a step cancels the build (``interrupted``)."""

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            super().__init__()
            self._bars: dict[str, tuple[Any, int]] = {}
            self._lock = threading.Lock()
            self.interrupted = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._bars[parent_phase][1] + 1 if parent_phase in self._bars else 0
                bar = tqdm(total=num_steps, desc=f"{component}: {phase_name}", unit="step", position=depth,
                           leave=False, disable=not enabled)
                self._bars[phase_name] = (bar, depth)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    entry = self._bars.get(phase_name)
                    if entry is not None:
                        entry[0].update(max(0, step + 1 - entry[0].n))
                return not self.interrupted
            except KeyboardInterrupt:
                self.interrupted = True
                return False  # asks TensorRT to cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                entry = self._bars.pop(phase_name, None)
            if entry is not None:
                entry[0].close()

        def close(self) -> None:
            with self._lock:
                bars, self._bars = list(self._bars.values()), {}
            for bar, _ in bars:
                bar.close()

    return ProgressMonitor()
