"""The same app as a Ray Serve deployment: one replica per GPU, autoscaled on ongoing requests.

``sdtrt serve WORKDIR --ray`` runs it; or ``serve run sdtrt.serve.ray_app:build workdir=WORKDIR`` (Ray's own
CLI; any ``ServeSpec`` field, ``lora_dir`` included, and ``backend``, ``min_replicas``, ``max_replicas`` as
``key=value``). Each replica loads the pipeline and runs its own batcher, so micro-batching happens per replica and
Ray spreads requests over replicas.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from sdtrt.errors import UsageError
from sdtrt.serve.app import ServeSpec, create_app


@dataclasses.dataclass(frozen=True)
class RaySpec:
    min_replicas: int = 1
    max_replicas: int | None = None  # None: one per GPU in the cluster (1 without GPUs)
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0


def _deployment_class():
    from ray import serve

    @serve.ingress()
    class SdtrtDeployment:
        """One pipeline and its batcher per replica; the HTTP app is built after the model loads."""

        def __init__(self, workdir: str, spec: ServeSpec, backend: str) -> None:
            from sdtrt.runtime.pipeline import Pipeline

            self.spec = spec
            self.pipeline = Pipeline.load(workdir, backend=backend)

        def __serve_build_asgi_app__(self):
            self.sdtrt_app = create_app(self.pipeline, self.spec)  # ("app" is Ray's own attribute)
            return self.sdtrt_app

        def check_health(self) -> None:  # Ray Serve restarts a replica whose worker died
            if not self.sdtrt_app.state.batcher.alive:
                raise RuntimeError("the sdtrt batcher's worker is not running")

    return SdtrtDeployment


def build_application(workdir: str | Path, spec: ServeSpec | None = None, ray_spec: RaySpec | None = None, *,
                      backend: str = "auto"):
    """A bound Ray Serve application (pass it to ``serve.run``). Needs a running Ray (``ray.init()``)."""
    spec, ray_spec = spec or ServeSpec(), ray_spec or RaySpec()
    import ray
    from ray import serve

    workdir = Path(workdir).resolve()
    from sdtrt.export.manifest import read_manifest

    read_manifest(workdir)  # a bad workdir fails here, not in every replica
    if spec.lora_dir is not None:
        from sdtrt.serve.loras import check_lora_dir

        check_lora_dir(spec.lora_dir)  # the replicas need it at the same path, as the workdir
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    per_replica = ray_spec.gpus_per_replica if ray_spec.gpus_per_replica is not None else (1.0 if gpus else 0.0)
    max_replicas = ray_spec.max_replicas or max(1, int(gpus // per_replica) if per_replica else 1)
    if ray_spec.min_replicas < 0 or max_replicas < max(1, ray_spec.min_replicas):
        raise UsageError(f"replicas: need 0 <= min ({ray_spec.min_replicas}) <= max ({max_replicas}) and max >= 1")
    deployment = serve.deployment(_deployment_class()).options(
        name="sdtrt",
        autoscaling_config={
            "min_replicas": ray_spec.min_replicas,
            "initial_replicas": max(1, ray_spec.min_replicas),
            "max_replicas": max_replicas,
            # a replica is "busy enough" when it holds a full batch; beyond that, add a replica
            "target_ongoing_requests": spec.max_batch,
        },
        # a replica holds what its batcher can (a pass + its queue); beyond that, requests wait at Ray's proxy, up
        # to max_queue of them, and the rest are refused there with 429 + Retry-After, as on one machine
        max_ongoing_requests=spec.max_queue + spec.max_batch,
        max_queued_requests=spec.max_queue,
        backpressure_config={"status_code": 429, "retry_after_s": 5},
        # scale-down and shutdown wait for admitted requests, as long as one may take
        graceful_shutdown_timeout_s=spec.timeout_s + 30,
        ray_actor_options={"num_gpus": per_replica, "num_cpus": ray_spec.cpus_per_replica},
    )
    return deployment.bind(str(workdir), spec, backend)


_CASTS = {"int": int, "float": float, "str": str}


def _field_casts(spec_class: type) -> dict[str, type]:
    """``key=value`` casts for every field of a spec dataclass, read from its annotations: a field added to the
    spec is accepted by the builder without another list to keep in step (an unknown type fails at import)."""
    casts = {}
    for f in dataclasses.fields(spec_class):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        casts[f.name] = _CASTS[kind.removesuffix(" | None")]
    return casts


_SPEC_CASTS = _field_casts(ServeSpec)
_RAY_CASTS = _field_casts(RaySpec)


def _cast(key: str, value: Any, cast: type) -> Any:
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r}: expected {'an integer' if cast is int else 'a number'}") from None


def build(args: dict[str, Any]):
    """Application builder for ``serve run sdtrt.serve.ray_app:build workdir=... [max_batch=4 ...]``."""
    args = dict(args)
    if "workdir" not in args:
        raise UsageError("pass workdir=PATH")
    workdir, backend = args.pop("workdir"), args.pop("backend", "auto")
    spec_kw, ray_kw = {}, {}
    for key, value in args.items():
        if key in _SPEC_CASTS:
            spec_kw[key] = _cast(key, value, _SPEC_CASTS[key])
        elif key in _RAY_CASTS:
            ray_kw[key] = _cast(key, value, _RAY_CASTS[key])
        else:
            raise UsageError(f"unknown argument {key!r}; known: workdir, backend, {', '.join([*_SPEC_CASTS, *_RAY_CASTS])}")
    return build_application(workdir, ServeSpec(**spec_kw), RaySpec(**ray_kw), backend=backend)


def run_ray(workdir: str | Path, spec: ServeSpec, ray_spec: RaySpec, *, host: str, port: int, backend: str,
            announce=None) -> None:
    """``sdtrt serve --ray``: join the Ray cluster (RAY_ADDRESS) or start a local one, deploy, serve until a signal."""
    import logging
    import signal
    import threading

    import ray
    from ray import serve

    from sdtrt.serve.server import warn_if_open

    announce = announce or logging.getLogger(__name__).info
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything starts, so a signal never leaves Ray behind
        signal.signal(sig, on_signal)
    warn_if_open(host, spec)
    started = not ray.is_initialized()
    if started:
        # RAY_ADDRESS: join that cluster; otherwise start a local one (never attach to a stray one by accident)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)  # replica logs shown
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ray's core installs its own (log and abort): ours again
            signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        if not stop.is_set():
            serve.run(build_application(workdir, spec, ray_spec, backend=backend), name="sdtrt", route_prefix="/")
            announce(f"serving {workdir} on Ray Serve at http://{host}:{port} (A1111 API /sdapi/v1, OpenAI API /v1)")
            stop.wait()
            announce("draining: finishing admitted requests")
        serve.delete("sdtrt")  # replicas finish their admitted requests (graceful_shutdown_timeout_s)
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
