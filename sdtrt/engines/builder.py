"""``sdtrt build``: a WORKDIR's ONNX graphs -> TensorRT engines, one small step at a time (after Polygraphy):
ONNX path -> strongly typed network -> builder config (one optimization profile, the flavour's settings and build
cache, progress monitor) -> serialized plan -> ``engines/<component>.plan`` + sidecar, written atomically.

The flavour (TensorRT or TensorRT-RTX, ``compat``) is resolved once per call and recorded in the spec, so the
sidecar and the rebuild commands name it. An engine that is fresh (this flavour and version, this GPU or among its
targets, this export, intact plan) and was built with the requested settings is skipped. TensorRT's timing cache
``engines/timing.cache`` is loaded before and merged back after every build, so later builds reuse earlier kernel
timings; TensorRT-RTX has none (it compiles kernels on the user's GPU and caches them at run time).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from sdtrt.engines import compat
from sdtrt.engines.compat import Environment, Flavour
from sdtrt.engines.profiles import BuildSpec, component_profile, dynamic_sides
from sdtrt.engines.sidecar import (
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
from sdtrt.fsutil import sha256_file

if TYPE_CHECKING:  # run time goes through a compat.Flavour; this import is for type checkers and the API check
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
            if reason and recorded is not None and recorded.tensorrt != spec.tensorrt:
                recorded = None  # built with the other flavour: this call's flavour and targets decide
            out.append(PlannedBuild(c, recorded or spec, reason) if reason else PlannedBuild(c, None, "up to date"))
        elif reason:
            out.append(PlannedBuild(c, spec, reason))
        elif recorded is None or recorded.settings() != spec.settings():
            out.append(PlannedBuild(c, spec, "built with other settings"))
        else:
            out.append(PlannedBuild(c, None, "up to date"))
    return out


def resolve_flavour(spec: BuildSpec) -> tuple[BuildSpec, Flavour, Environment]:
    """``spec`` with the flavour and its targets filled in and checked (``--target`` without a flavour that takes
    it, an unknown target, no GPU and no target, a GPU the flavour cannot build for)."""
    flavour = compat.flavour(spec.tensorrt)
    flavour.check_targets(spec.targets)
    env = current_environment(flavour)
    flavour.check_refit(spec.refit, env)
    return replace(spec, tensorrt=flavour.name, targets=flavour.resolve_targets(spec.targets, env)), flavour, env


def build_engines(workdir: str | Path, spec: BuildSpec, *, components: Iterable[str] | None = None,
                  progress: bool = True, announce: Callable[[str], None] | None = None) -> list[Path]:
    """Build the engines of ``components`` (default: every exported one) into ``WORKDIR/engines``.
    Returns the paths of the engines written by this call; up-to-date ones are skipped (and logged).
    ``announce`` is told, once, which TensorRT flavour builds and for which GPUs."""
    workdir = Path(workdir)
    manifest = read_manifest(workdir)
    names = select_components(manifest, components)
    model = manifest["model"]
    spec = replace(spec, profile=spec.profile.resolved(int(model["default_size"]), dynamic_sides(model)))
    vae_scale = int(manifest["model"]["vae_scale_factor"])
    for name in names:  # every profile is valid for this model before any heavy work
        component_profile(name, manifest["components"][name], spec.profile, vae_scale)
    spec, flavour, env = resolve_flavour(spec)
    what = (f"{flavour.label()}, " + (f"ahead of time for {', '.join(spec.targets)}" if env.gpu_name is None
                                      else f"on {env.gpu_text()}" + (f" for {', '.join(spec.targets)}" if spec.targets else "")))
    (announce or log.info)(f"building with {what}")
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
    flavour = compat.flavour(spec.tensorrt)
    trt = flavour.module()
    entry = manifest["components"][component]
    verify_onnx(workdir, component, entry)
    profile = component_profile(component, entry, spec.profile, int(manifest["model"]["vae_scale_factor"]))
    shapes = profile.input_shapes(entry)
    cache = flavour.build_cache(timing_cache_path(workdir), env)
    logger = flavour.logger()
    t0 = time.perf_counter()
    with logger.capture() as messages, logger.watch(ATTENTION_MATCH) as matched:
        builder = create_builder(flavour, messages)
        network, parser = network_from_onnx(flavour, builder, workdir / entry["files"][0]["path"], component)
        check_network_io(trt, network, entry, component)
        config = builder_config(trt, builder, spec, shapes, component)
        extra_flags = flavour.configure_build(config, spec.targets)
        cache.load(config)
        monitor = progress_monitor(trt, component, enabled=progress)
        config.progress_monitor = monitor
        try:
            plan = serialize_plan(builder, network, config, component, messages, monitor, gpu=env.gpu_name is not None)
        finally:
            monitor.close()
        cache.save(config)
        flags = ["STRONGLY_TYPED"] + [name for name, on in (("TF32", config.get_flag(trt.BuilderFlag.TF32)),
                                                            ("REFIT", config.get_flag(trt.BuilderFlag.REFIT))) if on]
        flags += extra_flags
        attention = attention_report(trt, network, matched)
        del parser  # owns the weights the network points at: kept alive until the plan exists
    seconds = time.perf_counter() - t0
    sidecar = make_sidecar(component, entry, spec, env, profile=profile.to_json(), input_shapes=shapes, flags=flags,
                           build_seconds=seconds, phases=list(dict.fromkeys(monitor.phases)), attention=attention)
    path = write_engine(workdir, component, plan, sidecar)
    log.info("%s: built %s in %.1f s", component, path, seconds)
    return path


# TensorRT's builder logs (at VERBOSE) each node it matches to its fused multi-head-attention pattern
ATTENTION_MATCH = re.compile(r"Found (\S+) to be part of self-attention pattern")


def attention_report(trt: Any, network: trt.INetworkDefinition, matched: list[str]) -> dict[str, int]:
    """How many Softmax layers the network has, and how many of them the builder matched to its fused attention
    (MHA) pattern: a change to the exported graph that breaks the fusion shows up as ``mha_pattern < softmax_layers``."""
    softmax = {network.get_layer(i).name for i in range(network.num_layers)
               if network.get_layer(i).type == trt.LayerType.SOFTMAX}
    names = {m.group(1) for m in map(ATTENTION_MATCH.search, matched) if m}
    return {"softmax_layers": len(softmax), "mha_pattern": len(softmax & names)}


def verify_onnx(workdir: Path, component: str, entry: Mapping) -> None:
    for f in entry["files"]:
        if sha256_file(workdir / f["path"]) != f["sha256"]:
            raise EngineError(f"{workdir}: {component} file {f['path']} does not match its sha256 in the manifest; re-export")


def create_builder(flavour: Flavour, messages: list[tuple[int, str]]) -> trt.Builder:
    trt = flavour.module()
    try:
        builder = trt.Builder(flavour.logger())
    except (TypeError, RuntimeError) as e:  # pybind11 raises when createInferBuilder returns null
        raise EngineError(f"could not create a {flavour.title} builder ({e}: {compat.errors_text(messages)}); "
                          "is a CUDA GPU visible and the driver recent enough?") from None
    if builder is None:
        raise EngineError(f"could not create a {flavour.title} builder: {compat.errors_text(messages)}")
    return builder


def network_from_onnx(flavour: Flavour, builder: trt.Builder, onnx_path: Path,
                      component: str) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Parse ``onnx_path`` (external data beside it is found by path) into a strongly typed network."""
    trt = flavour.module()
    network = builder.create_network(flavour.network_flags())
    if network is None:
        raise EngineError(f"{component}: {flavour.title} could not create a network definition")
    parser = trt.OnnxParser(network, flavour.logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        text = "; ".join(
            " ".join(e.desc().split()) + (f" (node {e.node()} {e.node_name()!r}, {e.node_operator()})" if e.node() >= 0 else "")
            for e in errors
        ) or "no error description"
        raise EngineError(f"{flavour.title}'s ONNX parser rejected {onnx_path} ({component}): {text}")
    return network, parser


def check_network_io(trt: Any, network: trt.INetworkDefinition, entry: Mapping, component: str) -> None:
    """The parsed network's inputs and outputs, names and dtypes, are the manifest's."""
    got_in = {network.get_input(i).name: compat.dtype_name(trt, network.get_input(i).dtype) for i in range(network.num_inputs)}
    got_out = {network.get_output(i).name: compat.dtype_name(trt, network.get_output(i).dtype) for i in range(network.num_outputs)}
    want_in = {s["name"]: s["dtype"] for s in entry["inputs"]}
    want_out = {s["name"]: s["dtype"] for s in entry["outputs"]}
    if (got_in, got_out) != (want_in, want_out):
        raise EngineError(f"{component}: the TensorRT network has inputs {got_in} and outputs {got_out}, the manifest "
                          f"says {want_in} and {want_out}; re-export the workdir")


def builder_config(trt: Any, builder: trt.Builder, spec: BuildSpec, shapes: Shapes, component: str) -> trt.IBuilderConfig:
    """Optimization level, workspace limit, refit and TF32 flags, and the one optimization profile.
    No precision flags: the network is strongly typed. Tactic sources are left to TensorRT."""
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


def serialize_plan(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig, component: str,
                   messages: list[tuple[int, str]], monitor: Any = None, gpu: bool = True) -> trt.IHostMemory:
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.interrupted:
        raise KeyboardInterrupt
    if plan is None:
        raise build_error(component, messages, gpu)
    return plan


def build_error(component: str, messages: list[tuple[int, str]], gpu: bool = True) -> EngineError:
    """The error for a failed build: out of memory (with the size TensorRT asked for) or TensorRT's errors. ``gpu``:
    the build runs on a GPU (an ahead-of-time build without one runs out of host memory)."""
    oom, asked = compat.out_of_memory(messages)
    if oom:
        what = f"; TensorRT asked for {compat.gib(asked)}" if asked else ""
        free = "Free GPU memory (other processes), cap the builder with --workspace MiB," if gpu else "Free memory,"
        return EngineError(f"{'GPU out of memory' if gpu else 'out of memory'} building the {component} engine{what}. "
                           f"{free} or build a smaller profile (--static, or lower --max-batch / --max-side)")
    return EngineError(f"TensorRT could not build the {component} engine: {compat.errors_text(messages)}")


def progress_monitor(trt: Any, component: str, *, enabled: bool = True) -> Any:
    """A ``trt.IProgressMonitor`` drawing one tqdm bar per active build phase (nested phases below their parent).
    TensorRT calls it while it builds; Python delivers Ctrl-C inside whichever callback runs next, and the bindings
    swallow exceptions raised in callbacks, so every callback catches it and sets ``interrupted``: the next
    ``step_complete`` returns False, TensorRT cancels the build, and ``serialize_plan`` raises KeyboardInterrupt.
    ``phases``: the names of the phases TensorRT reported, in order."""

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            super().__init__()
            self._bars: dict[str, tuple[Any, int]] = {}
            self._lock = threading.Lock()
            self.interrupted = False
            self.phases: list[str] = []

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    self.phases.append(phase_name)
                    depth = self._bars[parent_phase][1] + 1 if parent_phase in self._bars else 0
                    bar = tqdm(total=num_steps, desc=f"{component}: {phase_name}", unit="step", position=depth,
                               leave=False, disable=not enabled)
                    self._bars[phase_name] = (bar, depth)
            except KeyboardInterrupt:
                self.interrupted = True

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
            try:
                with self._lock:
                    entry = self._bars.pop(phase_name, None)
                if entry is not None:
                    entry[0].close()
            except KeyboardInterrupt:
                self.interrupted = True

        def close(self) -> None:
            with self._lock:
                bars, self._bars = list(self._bars.values()), {}
            for bar, _ in bars:
                bar.close()

    return ProgressMonitor()
