"""The same app as a Ray Serve deployment, on a Ray started in this process (CPU, loopback only)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import webuiapi  # noqa: E402

from sdtrt.errors import CheckpointError, UsageError  # noqa: E402
from sdtrt.runtime.pipeline import Pipeline  # noqa: E402
from sdtrt.serve.app import ServeSpec  # noqa: E402
from sdtrt.serve.ray_app import RaySpec, build, build_application  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster on loopback
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def test_ray_serve_deployment_answers_with_the_pipelines_image(ray_cluster, sd1_workdir_fp32):
    app = build_application(sd1_workdir_fp32, ServeSpec(max_batch=2, max_queue=8), RaySpec(max_replicas=1),
                            backend="onnxruntime")
    serve.run(app, name="sdtrt", route_prefix="/")
    try:
        api = webuiapi.WebUIApi(port=ray_cluster)
        # webuiapi sends eta=1.0 unless told otherwise, which A1111 (and sdtrt) give to DDIM: eta=0 for plain DDIM
        r = api.txt2img(prompt="a ship at sea", seed=5, steps=4, width=64, height=64, cfg_scale=7.5, sampler_name="DDIM",
                        eta=0)
        alone = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")(
            "a ship at sea", seed=5, num_inference_steps=4, height=64, width=64, scheduler="ddim")
        assert np.array_equal(np.asarray(r.images[0].convert("RGB")), np.asarray(alone.images[0]))
        assert r.info["backend"] == "onnxruntime-cpu"
    finally:
        serve.delete("sdtrt")


def test_builder_arguments_are_checked(ray_cluster, sd1_workdir_fp32, tmp_path):
    with pytest.raises(UsageError, match="pass workdir=PATH"):
        build({})
    with pytest.raises(UsageError, match="unknown argument 'max_batchh'"):
        build({"workdir": str(sd1_workdir_fp32), "max_batchh": "2"})
    with pytest.raises(CheckpointError, match="no such workdir"):
        build({"workdir": str(tmp_path / "missing")})
    with pytest.raises(UsageError, match=r"replicas: need 0 <= min \(3\) <= max \(2\)"):
        build({"workdir": str(sd1_workdir_fp32), "min_replicas": "3", "max_replicas": "2"})


def _other_value(field, default):
    """A valid non-default value for a spec field, as ``serve run`` passes it: a string."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "str | None":
        return "a-key", "a-key"
    if kind.startswith("int"):
        return str((default or 1) + 1), (default or 1) + 1
    if kind.startswith("float"):
        return str((default or 1.0) * 2), (default or 1.0) * 2
    raise AssertionError(f"no test value for a {kind} field ({field.name}): add one")


def test_builder_takes_every_spec_field(monkeypatch, sd1_workdir_fp32):
    """Every ServeSpec and RaySpec field as ``serve run ... key=value`` (strings), each reaching the spec."""
    import dataclasses

    from sdtrt.serve import ray_app

    built = {}
    monkeypatch.setattr(ray_app, "build_application",
                        lambda workdir, spec, ray_spec, backend: built.update(spec=spec, ray_spec=ray_spec, backend=backend))
    for spec_class, key in ((ServeSpec, "spec"), (RaySpec, "ray_spec")):
        fields = dataclasses.fields(spec_class)
        assert {f.name for f in fields} >= ({"max_steps", "max_connections"} if spec_class is ServeSpec else set())
        for f in fields:
            text, value = _other_value(f, getattr(spec_class(), f.name))
            built.clear()
            build({"workdir": str(sd1_workdir_fp32), "backend": "onnxruntime", f.name: text})
            assert getattr(built[key], f.name) == value, f.name
            assert built["backend"] == "onnxruntime"
    # all at once, and the real builder (needs no cluster to bind)
    monkeypatch.undo()
    app = build({"workdir": str(sd1_workdir_fp32), "max_steps": "50", "max_connections": "8", "max_batch": "2"})
    assert app is not None
    with pytest.raises(UsageError, match="max_steps='many': expected an integer"):
        build({"workdir": str(sd1_workdir_fp32), "max_steps": "many"})
    with pytest.raises(UsageError, match="max steps must be between 1 and 1000, got 5000"):
        build({"workdir": str(sd1_workdir_fp32), "max_steps": "5000"})
