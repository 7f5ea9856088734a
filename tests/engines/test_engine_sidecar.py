"""Engine sidecars: what they record, each reason an engine is refused (with the exact rebuild command), atomicity."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from engine_manifests import sd15_manifest, with_onnx_files

from sdtrt.engines import compat, sidecar
from sdtrt.engines.compat import Environment
from sdtrt.engines.profiles import BuildSpec, ProfileSpec, component_profile
from sdtrt.engines.sidecar import (
    engine_path,
    make_sidecar,
    read_sidecar,
    rebuild_command,
    recorded_spec,
    sidecar_path,
    stale_message,
    stale_reason,
    write_engine,
)
from sdtrt.errors import EngineError

M = sd15_manifest()
H100 = Environment("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
SPEC = BuildSpec(profile=ProfileSpec().resolved(512))
PLAN = b"serialized plan bytes"


def _write(workdir, component="unet", env=H100, spec=SPEC, manifest=M, plan=PLAN):
    entry = manifest["components"][component]
    prof = component_profile(component, entry, spec.profile, 8)
    side = make_sidecar(component, entry, spec, env, profile=prof.to_json(), input_shapes=prof.input_shapes(entry),
                        flags=["STRONGLY_TYPED", "TF32"], build_seconds=12.3456)
    return write_engine(workdir, component, plan, side)


def _reason(workdir, component="unet", env=H100, manifest=M, plan_sha=None):
    return stale_reason(read_sidecar(workdir, component), component=component, manifest=manifest, env=env,
                        plan_sha256=plan_sha)


def test_written_sidecar_records_what_made_the_plan(tmp_path):
    path = _write(tmp_path)
    assert path == tmp_path / "engines" / "unet.plan"
    assert path.read_bytes() == PLAN
    s = json.loads(sidecar_path(tmp_path, "unet").read_text())
    assert s["format_version"] == 2 and s["component"] == "unet"
    assert s["tensorrt"] == {"flavour": "tensorrt", "version": "10.13.0.35", "targets": []}
    assert s["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert s["onnx"] == [{"path": "onnx/unet.onnx", "sha256": "unet-sha"}]
    assert s["precision"] == "fp16"
    assert s["profile"]["axes"] == {"2B": [1, 2, 2], "H": [64, 64, 64], "W": [64, 64, 64]}
    assert s["input_shapes"]["sample"] == [[1, 4, 64, 64], [2, 4, 64, 64], [2, 4, 64, 64]]
    assert s["flags"] == ["STRONGLY_TYPED", "TF32"]
    assert s["build_seconds"] == 12.346
    assert s["build"]["profile"] == {"static": True, "batch": 1, "height": 512, "width": 512, "max_batch": None,
                                     "min_side": None, "max_side": None, "max_chunks": 3}
    assert s["plan"] == {"path": "engines/unet.plan", "sha256": hashlib.sha256(PLAN).hexdigest(), "bytes": len(PLAN)}
    assert recorded_spec(s) == SPEC


def test_fresh_engine_has_no_stale_reason(tmp_path):
    _write(tmp_path)
    assert _reason(tmp_path, plan_sha=hashlib.sha256(PLAN).hexdigest()) is None


def test_other_tensorrt_version(tmp_path):
    _write(tmp_path, env=Environment("tensorrt", "10.12.0.36", H100.gpu_name, "9.0"))
    assert _reason(tmp_path) == ("the unet engine cannot run here: it was built with TensorRT 10.12.0.36, this is "
                                 "TensorRT 10.13.0.35 (a plan only loads in the version that built it)")


def test_other_gpu(tmp_path):
    _write(tmp_path, env=Environment("tensorrt", H100.version, "NVIDIA A100-SXM4-80GB", "8.0"))
    assert _reason(tmp_path) == ("the unet engine cannot run here: it was built for NVIDIA A100-SXM4-80GB (compute "
                                 "capability 8.0), this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0)")


def test_same_compute_capability_other_model_is_another_gpu(tmp_path):
    _write(tmp_path, env=Environment("tensorrt", H100.version, "NVIDIA H100 PCIe", "9.0"))
    assert "built for NVIDIA H100 PCIe (compute capability 9.0)" in _reason(tmp_path)


def test_same_gpu_name_other_compute_capability_is_another_gpu(tmp_path):
    # a renamed or virtualised GPU: the name alone does not make it the same GPU
    _write(tmp_path, env=Environment("tensorrt", H100.version, H100.gpu_name, "8.0"))
    assert "(compute capability 8.0), this GPU is" in _reason(tmp_path)


RTX = BuildSpec(profile=SPEC.profile, tensorrt="rtx", targets=("sm89", "sm120"))
RTX_AOT = Environment("rtx", "1.7.1.116", None, None)  # an ahead-of-time build on a machine without a GPU


def test_rtx_sidecar_records_flavour_targets_and_no_gpu(tmp_path):
    _write(tmp_path, env=RTX_AOT, spec=RTX)
    s = read_sidecar(tmp_path, "unet")
    assert s["tensorrt"] == {"flavour": "rtx", "version": "1.7.1.116", "targets": ["sm89", "sm120"]}
    assert s["gpu"] is None
    assert s["build"]["tensorrt"] == "rtx" and s["build"]["targets"] == ["sm89", "sm120"]
    assert recorded_spec(s) == RTX


def test_rtx_engine_runs_on_any_gpu_among_its_targets(tmp_path):
    _write(tmp_path, env=RTX_AOT, spec=RTX)
    assert _reason(tmp_path, env=RTX_AOT) is None  # planning another build here, without a GPU
    assert _reason(tmp_path, env=Environment("rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")) is None
    assert _reason(tmp_path, env=Environment("rtx", "1.7.1.116", "NVIDIA GeForce RTX 5090", "12.0")) is None
    assert _reason(tmp_path, env=Environment("rtx", "1.7.1.116", "NVIDIA RTX A6000", "8.6")) == (
        "the unet engine cannot run here: it was built for sm89, sm120, this GPU is NVIDIA RTX A6000 (compute "
        "capability 8.6) (sm86)")
    assert _reason(tmp_path, env=Environment("rtx", "1.8.0.1", "NVIDIA GeForce RTX 4090", "8.9")) == (
        "the unet engine cannot run here: it was built with TensorRT-RTX 1.7.1.116, this is TensorRT-RTX 1.8.0.1 (a "
        "plan only loads in the version that built it)")


def test_a_plan_of_one_flavour_is_never_taken_for_the_other(tmp_path):
    _write(tmp_path, env=RTX_AOT, spec=RTX)
    assert _reason(tmp_path, env=H100) == "the unet engine cannot run here: it was built with TensorRT-RTX, not TensorRT"
    _write(tmp_path, env=H100)
    assert _reason(tmp_path, env=Environment("rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")) == (
        "the unet engine cannot run here: it was built with TensorRT, not TensorRT-RTX")


def test_other_onnx(tmp_path):
    _write(tmp_path)
    reexported = with_onnx_files(M, "unet", [("onnx/unet.onnx", "a" * 64)])
    assert _reason(tmp_path, manifest=reexported) == (
        "the unet engine was built from another export: onnx/unet.onnx has sha256 aaaaaaaaaaaa..., "
        "the engine was built from unet-sha...")
    with_data = with_onnx_files(M, "unet", [("onnx/unet.onnx", "unet-sha"), ("onnx/unet.onnx.data", "b" * 64)])
    assert _reason(tmp_path, manifest=with_data) == (
        "the unet engine was built from another export: onnx/unet.onnx.data has sha256 bbbbbbbbbbbb..., "
        "the engine was built from no such file")


def test_plan_hash_mismatch(tmp_path):
    _write(tmp_path)
    engine_path(tmp_path, "unet").write_bytes(b"truncated")
    assert _reason(tmp_path, plan_sha=hashlib.sha256(b"truncated").hexdigest()) == (
        "unet.plan does not match the sha256 its sidecar records (corrupt, truncated or replaced)")


def test_component_not_in_manifest_or_misnamed(tmp_path):
    _write(tmp_path)
    gone = {**M, "components": {k: v for k, v in M["components"].items() if k != "unet"}}
    assert _reason(tmp_path, manifest=gone) == "the workdir's manifest has no unet graph any more (re-exported without it)"
    sidecar_path(tmp_path, "vae_decoder").write_text(sidecar_path(tmp_path, "unet").read_text())
    assert _reason(tmp_path, component="vae_decoder") == "vae_decoder.json describes a 'unet' engine"


def test_missing_corrupt_and_future_sidecars(tmp_path):
    wd = tmp_path / "wd"
    _write(wd)
    sidecar_path(wd, "unet").unlink()
    with pytest.raises(EngineError) as e:
        read_sidecar(wd, "unet")
    assert str(e.value) == (f"{wd}/engines/unet.plan has no sidecar unet.json (not built by sdtrt, or the build was "
                            f"interrupted); rebuild it: `sdtrt build {wd} --components unet`")
    sidecar_path(wd, "unet").write_text("{not json")
    with pytest.raises(EngineError, match=r"unet.json: unreadable engine sidecar .*rebuild it: `sdtrt build"):
        read_sidecar(wd, "unet")
    sidecar_path(wd, "unet").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(EngineError, match="engine sidecar format 1 is not 2; rebuild it"):
        read_sidecar(wd, "unet")


def test_a_sidecar_without_its_build_settings_is_stale(tmp_path):
    _write(tmp_path)
    side = read_sidecar(tmp_path, "unet")
    del side["build"]["tf32"]
    sidecar_path(tmp_path, "unet").write_text(json.dumps(side))
    assert _reason(tmp_path) == "unet.json does not record its build settings"


def test_rebuild_command_is_exact():
    assert rebuild_command("/data/wd", SPEC, ["unet"]) == (
        "sdtrt build /data/wd --static --batch 1 --height 512 --width 512 --components unet")
    dyn = BuildSpec(profile=ProfileSpec(static=False, batch=2).resolved(512), opt_level=4, refit=True)
    assert rebuild_command("/my work/wd", dyn) == (
        "sdtrt build '/my work/wd' --dynamic --batch 2 --height 512 --width 512 --max-batch 4 --min-side 256 "
        "--max-side 1024 --opt-level 4 --refit")
    assert rebuild_command("wd", None, ["unet", "vae_decoder"]) == "sdtrt build wd --components unet,vae_decoder"
    assert rebuild_command("wd", RTX, ["unet"]) == (
        "sdtrt build wd --static --batch 1 --height 512 --width 512 --tensorrt rtx --target sm89,sm120 --components unet")


def test_stale_message_one_command_when_the_settings_agree():
    msg = stale_message("/wd", [("text_encoder", "reason one", SPEC), ("unet", "reason two", SPEC)])
    assert msg == (
        "/wd: 2 engines are stale: reason one; reason two. Rebuild: `sdtrt build /wd --static --batch 1 --height 512 "
        "--width 512 --components text_encoder,unet` (or `sdtrt build /wd --rebuild-stale` to rebuild every stale "
        "engine with its recorded settings)")


def test_stale_message_one_command_per_engine_when_they_differ():
    other = BuildSpec(profile=ProfileSpec(batch=2).resolved(512))
    msg = stale_message("/wd", [("unet", "r1", SPEC), ("vae_decoder", "r2", other)])
    assert msg.startswith("/wd: 2 engines are stale: r1; r2. Rebuild: "
                          "`sdtrt build /wd --static --batch 1 --height 512 --width 512 --components unet` && "
                          "`sdtrt build /wd --static --batch 2 --height 512 --width 512 --components vae_decoder`")
    one = stale_message("/wd", [("unet", "r1", None)])
    assert one.startswith("/wd: an engine is stale: r1. Rebuild: `sdtrt build /wd --components unet`")


def test_failed_plan_write_leaves_no_temp_and_no_trusted_plan(tmp_path, monkeypatch):
    _write(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".plan"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, plan=b"new plan")
    files = sorted(p.name for p in (tmp_path / "engines").iterdir())
    assert files == ["unet.plan"]  # the old plan stays, its sidecar is gone: it is never loaded again
    assert engine_path(tmp_path, "unet").read_bytes() == PLAN
    with pytest.raises(EngineError, match="has no sidecar"):
        read_sidecar(tmp_path, "unet")


def test_failed_sidecar_write_leaves_no_temp_and_no_sidecar(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the plan's fsync succeeds, the sidecar's fails
            raise OSError("I/O error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="I/O error"):
        _write(tmp_path)
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["unet.plan"]


def test_plan_may_be_any_buffer(tmp_path):
    _write(tmp_path, plan=bytearray(b"abc"))
    assert read_sidecar(tmp_path, "unet")["plan"]["bytes"] == 3


def test_current_environment_needs_tensorrt_then_a_gpu(monkeypatch):
    import sys

    trt = compat.flavour("tensorrt")
    monkeypatch.setattr(trt, "_module", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"^TensorRT is not installed: pip install 'sdtrt\[tensorrt\]'"):
        sidecar.current_environment(trt)
    monkeypatch.setattr(trt, "version", lambda: "10.13.0.35")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(EngineError, match="no CUDA GPU is visible: TensorRT builds and runs engines on the GPU they are "
                                          "for"):
        sidecar.current_environment(trt)
    # TensorRT-RTX builds ahead of time without one
    env = sidecar.current_environment(compat.flavour("rtx"))
    assert (env.flavour, env.gpu_name, env.compute_capability) == ("rtx", None, None)
