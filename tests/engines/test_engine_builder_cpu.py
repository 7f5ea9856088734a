"""The builder's plain-Python parts on CPU: TensorRT compatibility, what gets (re)built, the TensorRT calls against
fakes that record them, and every error message."""

from __future__ import annotations

import hashlib
import logging
import sys
import types

import pytest
from engine_manifests import sd15_manifest

from sdtrt.engines import builder, compat
from sdtrt.engines.builder import PlannedBuild, plan_builds, select_components
from sdtrt.engines.profiles import BuildSpec, ProfileSpec, component_profile
from sdtrt.engines.sidecar import Environment, engine_path, make_sidecar, sidecar_path, write_engine
from sdtrt.errors import EngineError, UsageError

M = sd15_manifest()
ENV = Environment("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
SPEC = BuildSpec(profile=ProfileSpec().resolved(512))


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setattr(compat, "_trt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def _fake_trt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", TF32="TF32")
    trt.IProgressMonitor = object
    return trt


# -- compat ---------------------------------------------------------------------------------------------------------
def test_missing_tensorrt_message(no_tensorrt):
    with pytest.raises(EngineError) as e:
        compat.tensorrt()
    assert str(e.value).startswith(
        "TensorRT is not installed: pip install 'sdtrt[tensorrt]' on a machine with an NVIDIA GPU (")


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "_trt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("8.6.1"))
    with pytest.raises(EngineError, match=r"^TensorRT 8\.6\.1 is too old: sdtrt needs TensorRT 10\.12 or newer"):
        compat.tensorrt()


@pytest.mark.parametrize(("version", "flags"), [("10.12.0.36", 1), ("10.13.0.35", 1), ("11.1.0.9", 0)])
def test_strongly_typed_flag_by_version(monkeypatch, version, flags):
    monkeypatch.setattr(compat, "_trt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(version))
    assert compat.version() == version
    assert compat.network_flags() == flags  # 10.x: 1 << STRONGLY_TYPED; 11.x: always strongly typed


def test_version_tuple():
    assert compat.version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert compat.version_tuple("11.1.0b1") == (11, 1, 0)
    assert compat.version_tuple("") == ()


def test_out_of_memory_parsing():
    msgs = [(logging.WARNING, "Requested amount of GPU memory (17179869184 bytes) could not be allocated. There may "
                              "not be enough free memory for allocation to succeed."),
            (logging.ERROR, "[defaultAllocator.cpp::allocate::31] Error Code 1: Cuda Runtime (out of memory)")]
    assert compat.out_of_memory(msgs) == (True, 17179869184)
    assert compat.out_of_memory(msgs[1:]) == (True, None)
    assert compat.out_of_memory([(logging.ERROR, "Could not find any implementation for node X")]) == (False, None)
    assert compat.out_of_memory([(logging.ERROR, "autotuning: User allocator error allocating 15485030400-byte buffer")]) \
        == (True, 15485030400)


def test_build_error_messages():
    oom = [(logging.WARNING, "Requested amount of GPU memory (17179869184 bytes) could not be allocated.")]
    assert str(builder.build_error("unet", oom)) == (
        "GPU out of memory building the unet engine; TensorRT asked for 16.00 GiB. Free GPU memory (other processes), "
        "cap the builder with --workspace MiB, or build a smaller profile (--static, or lower --max-batch / --max-side)")
    other = [(logging.WARNING, "a warning"), (logging.ERROR, "Error Code 10: Internal Error (no implementation)")]
    assert str(builder.build_error("vae_decoder", other)) == (
        "TensorRT could not build the vae_decoder engine: Error Code 10: Internal Error (no implementation)")


# -- what gets built ------------------------------------------------------------------------------------------------
def _engine(workdir, component="unet", env=ENV, spec=SPEC, plan=b"plan"):
    entry = M["components"][component]
    prof = component_profile(component, entry, spec.profile, 8)
    side = make_sidecar(component, entry, spec, env, profile=prof.to_json(), input_shapes=prof.input_shapes(entry),
                        flags=["STRONGLY_TYPED"], build_seconds=1.0)
    write_engine(workdir, component, plan, side)


def test_select_components():
    assert select_components(M, None) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert select_components(M, ["unet", "unet", "text_encoder"]) == ["unet", "text_encoder"]
    with pytest.raises(UsageError, match="unknown component"):
        select_components(M, ["clip"])
    partial = {**M, "components": {"unet": M["components"]["unet"]}}
    with pytest.raises(UsageError, match="the workdir has no exported vae_decoder; run `sdtrt export` with it first"):
        select_components(partial, ["vae_decoder"])


def test_plan_builds_skips_fresh_and_rebuilds_the_rest(tmp_path):
    _engine(tmp_path, "text_encoder")  # fresh, same settings
    _engine(tmp_path, "unet", env=Environment("10.12.0.36", ENV.gpu_name, "9.0"))  # stale
    _engine(tmp_path, "vae_decoder", spec=BuildSpec(profile=ProfileSpec(batch=2).resolved(512)))  # other settings
    plans = plan_builds(tmp_path, M, SPEC, ENV, ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
    assert plans[0] == PlannedBuild("text_encoder", None, "up to date")
    assert plans[1].spec == SPEC and "built with TensorRT 10.12.0.36" in plans[1].reason
    assert plans[2] == PlannedBuild("vae_decoder", SPEC, "built with other settings")
    assert plans[3] == PlannedBuild("vae_encoder", SPEC, "no engine yet")


def test_plan_builds_checks_the_plan_bytes(tmp_path):
    _engine(tmp_path, "unet")
    engine_path(tmp_path, "unet").write_bytes(b"corrupt")
    (p,) = plan_builds(tmp_path, M, SPEC, ENV, ["unet"])
    assert p.spec == SPEC and "does not match the sha256" in p.reason


def test_plan_builds_without_sidecar(tmp_path):
    _engine(tmp_path, "unet")
    sidecar_path(tmp_path, "unet").unlink()
    (p,) = plan_builds(tmp_path, M, SPEC, ENV, ["unet"])
    assert p.spec == SPEC and p.reason.endswith("has no sidecar unet.json (not built by sdtrt, or the build was interrupted)")


def test_rebuild_stale_uses_each_engines_recorded_settings(tmp_path):
    old = BuildSpec(profile=ProfileSpec(static=False, batch=2).resolved(512), opt_level=5)
    _engine(tmp_path, "unet", env=Environment(ENV.tensorrt_version, "NVIDIA A100-SXM4-80GB", "8.0"), spec=old)
    _engine(tmp_path, "vae_decoder", spec=old)  # fresh: kept even though its settings differ from SPEC
    plans = plan_builds(tmp_path, M, BuildSpec(profile=SPEC.profile, rebuild_stale=True), ENV,
                        ["unet", "vae_decoder", "vae_encoder"])
    assert plans[0].spec == old and "built for NVIDIA A100-SXM4-80GB" in plans[0].reason
    assert plans[1] == PlannedBuild("vae_decoder", None, "up to date")
    assert plans[2].spec == BuildSpec(profile=SPEC.profile, rebuild_stale=True)


def test_build_engines_checks_usage_before_needing_tensorrt(sd1_workdir_fp32, no_tensorrt):
    with pytest.raises(UsageError, match="unknown component"):
        builder.build_engines(sd1_workdir_fp32, SPEC, components=["clip"])
    with pytest.raises(UsageError, match=r"--height 64 is outside --min-side..--max-side \(256..1024 px\)"):
        # tiny-sd1 is 64 px natively: a range starting at 256 px cannot hold it
        builder.build_engines(sd1_workdir_fp32, BuildSpec(profile=ProfileSpec(static=False, min_side=256)))
    with pytest.raises(EngineError, match=r"^TensorRT is not installed"):
        builder.build_engines(sd1_workdir_fp32, BuildSpec(), progress=False)
    assert not (sd1_workdir_fp32 / "engines").exists()


# -- TensorRT calls, against fakes ------------------------------------------------------------------------------------
class _Recorder:
    """Records attribute sets and method calls; methods return what ``returns`` says (default None)."""

    def __init__(self, returns=None):
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "returns", returns or {})

    def __setattr__(self, name, value):
        self.calls.append(("set", name, value))

    def __getattr__(self, name):
        def method(*args):
            self.calls.append((name, *args))
            r = self.returns.get(name)
            return r(*args) if callable(r) else r
        return method


@pytest.fixture
def fake_trt(monkeypatch):
    trt = _fake_trt("10.13.0.35")
    monkeypatch.setattr(compat, "_trt", trt)
    return trt


def test_builder_config_sets_level_workspace_flags_and_one_profile(fake_trt):
    profile = _Recorder()
    config = _Recorder({"add_optimization_profile": 0})
    b = _Recorder({"create_builder_config": config, "create_optimization_profile": profile})
    spec = BuildSpec(profile=SPEC.profile, opt_level=5, workspace_mib=2048, refit=True, tf32=False)
    shapes = {"sample": ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64)), "timestep": ((1,), (1,), (1,))}
    assert builder.builder_config(b, spec, shapes, "unet") is config
    assert config.calls == [("set", "builder_optimization_level", 5), ("set_memory_pool_limit", "WORKSPACE", 2048 << 20),
                            ("set_flag", "REFIT"), ("clear_flag", "TF32"), ("add_optimization_profile", profile)]
    assert profile.calls == [("set_shape", "sample", (1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64)),
                             ("set_shape", "timestep", (1,), (1,), (1,))]


def test_builder_config_defaults_leave_tensorrt_alone(fake_trt):
    config = _Recorder({"add_optimization_profile": 0})
    b = _Recorder({"create_builder_config": config, "create_optimization_profile": _Recorder()})
    builder.builder_config(b, SPEC, {}, "unet")
    assert config.calls[0] == ("set", "builder_optimization_level", 3)
    assert [c[0] for c in config.calls[1:]] == ["add_optimization_profile"]


def test_builder_config_refused_profile(fake_trt):
    config = _Recorder({"add_optimization_profile": -1})
    b = _Recorder({"create_builder_config": config, "create_optimization_profile": _Recorder()})
    with pytest.raises(EngineError, match="unet: TensorRT refused the optimization profile"):
        builder.builder_config(b, SPEC, {"sample": ((1,), (1,), (1,))}, "unet")

    def bad_shape(*args):
        raise RuntimeError("Shape provided for min is inconsistent with other shapes.")

    b = _Recorder({"create_builder_config": _Recorder(), "create_optimization_profile": _Recorder({"set_shape": bad_shape})})
    with pytest.raises(EngineError, match=r"unet: TensorRT refused the profile of input sample \(min \(2,\), opt \(1,\)"):
        builder.builder_config(b, SPEC, {"sample": ((2,), (1,), (1,))}, "unet")


class _ParserError:
    def __init__(self, desc, node=-1, name="", op=""):
        self._d, self._n, self._name, self._op = desc, node, name, op

    def desc(self):
        return self._d

    def node(self):
        return self._n

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op


def test_parser_errors_are_reported_with_their_descriptions(fake_trt, monkeypatch, tmp_path):
    errors = [_ParserError("Unsupported ONNX data type: UINT16", 3, "/vae/Cast_3", "Cast"), _ParserError("Model invalid")]

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(errors)

        def parse_from_file(self, path):
            return False

        def get_error(self, i):
            return errors[i]

    fake_trt.OnnxParser = Parser
    monkeypatch.setattr(compat, "logger", lambda: object())
    b = _Recorder({"create_network": object()})
    with pytest.raises(EngineError) as e:
        builder.network_from_onnx(b, tmp_path / "vae.onnx", "vae_decoder")
    assert str(e.value) == (f"TensorRT's ONNX parser rejected {tmp_path}/vae.onnx (vae_decoder): Unsupported ONNX data "
                            "type: UINT16 (node 3 '/vae/Cast_3', Cast); Model invalid")
    assert b.calls == [("create_network", 1)]  # strongly typed on 10.x


def test_timing_cache_from_another_gpu_is_replaced(fake_trt, tmp_path, caplog):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"old cache")
    created = []

    def create(data):
        created.append(bytes(data))
        return f"cache<{bytes(data).decode()}>"

    config = _Recorder({"create_timing_cache": create, "set_timing_cache": lambda cache, ignore: cache == "cache<>"})
    builder.load_timing_cache(config, path)
    assert created == [b"old cache", b""]
    assert ("set_timing_cache", "cache<>", False) in config.calls
    assert "ignoring timing cache" in caplog.text


def test_timing_cache_is_merged_with_disk_and_saved_atomically(fake_trt, tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"disk")
    cache = _Recorder({"combine": True, "serialize": b"merged"})
    config = _Recorder({"get_timing_cache": cache, "create_timing_cache": lambda data: f"parsed<{bytes(data).decode()}>"})
    builder.save_timing_cache(config, path)
    assert cache.calls == [("combine", "parsed<disk>", False), ("serialize",)]
    assert path.read_bytes() == b"merged"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


def test_serialize_plan_none_becomes_an_error(fake_trt):
    b = _Recorder({"build_serialized_network": None})
    msgs = [(logging.ERROR, "Error Code 4: API Usage Error")]
    with pytest.raises(EngineError, match="TensorRT could not build the unet engine: Error Code 4: API Usage Error"):
        builder.serialize_plan(b, object(), object(), "unet", msgs)


def test_progress_monitor_nests_phases_and_cancels(fake_trt):
    m = builder.progress_monitor(fake_trt, "unet", enabled=True)
    m.phase_start("Building engine", None, 3)
    m.phase_start("Tactic selection", "Building engine", 10)
    assert m._bars["Tactic selection"][1] == 1
    assert m.step_complete("Tactic selection", 4) is True
    assert m._bars["Tactic selection"][0].n == 5
    m.phase_finish("Tactic selection")
    assert list(m._bars) == ["Building engine"]
    m.interrupted = True
    assert m.step_complete("Building engine", 0) is False  # asks TensorRT to cancel
    m.close()
    assert m._bars == {}


def test_verify_onnx_catches_files_changed_after_export(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "unet.onnx").write_bytes(b"graph")
    entry = {"files": [{"path": "onnx/unet.onnx", "sha256": hashlib.sha256(b"graph").hexdigest()}]}
    builder.verify_onnx(tmp_path, "unet", entry)
    (tmp_path / "onnx" / "unet.onnx").write_bytes(b"edited")
    with pytest.raises(EngineError, match="unet file onnx/unet.onnx does not match its sha256 in the manifest; re-export"):
        builder.verify_onnx(tmp_path, "unet", entry)
