"""The builder's plain-Python parts on CPU: TensorRT compatibility, what gets (re)built, the TensorRT calls against
fakes that record them, and every error message."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import types

import pytest
from engine_manifests import sd15_manifest
from tqdm.auto import tqdm

from sdtrt.engines import builder, compat
from sdtrt.engines.builder import PlannedBuild, plan_builds, select_components
from sdtrt.engines.profiles import BuildSpec, ProfileSpec, component_profile
from sdtrt.engines.sidecar import Environment, engine_path, make_sidecar, sidecar_path, write_engine
from sdtrt.errors import EngineError, UsageError

M = sd15_manifest()
ENV = Environment("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
SPEC = BuildSpec(profile=ProfileSpec().resolved(512))


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Neither flavour importable (``import tensorrt`` / ``import tensorrt_rtx`` raise ImportError)."""
    for name in ("tensorrt", "rtx"):
        monkeypatch.setattr(compat.flavour(name), "_module", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: None)


def _fake_trt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", TF32="TF32")
    trt.IProgressMonitor = object
    return trt


def _with_module(monkeypatch, flavour: str, module) -> compat.Flavour:
    f = compat.flavour(flavour)
    monkeypatch.setattr(f, "_module", None)
    monkeypatch.setitem(sys.modules, f.module_name, module)
    return f


# -- compat ---------------------------------------------------------------------------------------------------------
def test_missing_flavour_messages(no_tensorrt):
    with pytest.raises(EngineError) as e:
        compat.flavour("tensorrt").module()
    assert str(e.value).startswith("TensorRT is not installed: pip install 'sdtrt[tensorrt]' (")
    with pytest.raises(EngineError) as e:
        compat.flavour("rtx").module()
    assert str(e.value).startswith("TensorRT-RTX is not installed: pip install 'sdtrt[tensorrt-rtx]' (")
    with pytest.raises(EngineError, match=r"^neither TensorRT nor TensorRT-RTX is installed: pip install "
                                          r"'sdtrt\[tensorrt\]' \(any NVIDIA GPU\) or 'sdtrt\[tensorrt-rtx\]'"):
        compat.flavour("auto")


def test_auto_prefers_tensorrt_then_tensorrt_rtx(monkeypatch):
    installed = {"tensorrt_rtx"}
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert compat.flavour("auto").name == "rtx"
    installed.add("tensorrt")
    assert compat.flavour("auto").name == "tensorrt"
    with pytest.raises(UsageError, match="unknown --tensorrt 'trt'; choose one of auto, tensorrt, rtx"):
        compat.flavour("trt")


def test_old_versions_are_refused(monkeypatch):
    _with_module(monkeypatch, "tensorrt", _fake_trt("8.6.1"))
    with pytest.raises(EngineError, match=r"^TensorRT 8\.6\.1 is too old: sdtrt needs TensorRT 10\.12 or newer"):
        compat.flavour("tensorrt").module()
    _with_module(monkeypatch, "rtx", _fake_trt("1.0.0.21"))
    with pytest.raises(EngineError, match=r"^TensorRT-RTX 1\.0\.0\.21 is too old: sdtrt needs TensorRT-RTX 1\.7 or newer"):
        compat.flavour("rtx").module()


@pytest.mark.parametrize(("version", "flags"), [("10.12.0.36", 1), ("10.13.0.35", 1), ("11.1.0.9", 0)])
def test_strongly_typed_flag_by_version(monkeypatch, version, flags):
    f = _with_module(monkeypatch, "tensorrt", _fake_trt(version))
    assert f.version() == version
    assert f.network_flags() == flags  # 10.x: 1 << STRONGLY_TYPED; 11.x: always strongly typed


def test_tensorrt_rtx_is_always_strongly_typed():
    rtx = compat.flavour("rtx")
    assert rtx.network_flags() == 0
    assert "STRONGLY_TYPED" in rtx.module().NetworkDefinitionCreationFlag.__members__  # kept, deprecated, ignored


NO_GPU = compat.Environment("rtx", "1.7.1.116", None, None)


def test_targets_are_checked_per_flavour():
    rtx, trt = compat.TensorRTRTX(), compat.TensorRT()
    assert rtx.resolve_targets(("sm89", "sm120", "sm89"), NO_GPU) == ("sm89", "sm120")
    with pytest.raises(UsageError, match="unknown --target sm90; TensorRT-RTX builds for sm75, sm80, sm86, sm89, sm120, "
                                         "sm121"):
        rtx.check_targets(("sm89", "sm90"))
    with pytest.raises(UsageError, match=r"^no GPU is visible: say which GPUs to build for with --target \(e\.g\. "
                                         r"--target sm89 for Ada"):
        rtx.resolve_targets((), NO_GPU)
    ada = compat.Environment("rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")
    assert rtx.resolve_targets((), ada) == ("sm89",)  # the visible GPU's
    h100 = compat.Environment("rtx", "1.7.1.116", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineError, match=r"^TensorRT-RTX does not run on NVIDIA H100 80GB HBM3 \(compute capability "
                                          r"9\.0\).*use TensorRT \(pip install 'sdtrt\[tensorrt\]'"):
        rtx.resolve_targets((), h100)
    with pytest.raises(UsageError, match="--target is for TensorRT-RTX"):
        trt.check_targets(("sm89",))
    trt.check_targets(())
    assert trt.resolve_targets((), h100) == ()


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
    # TensorRT-RTX, building ahead of time on a CPU machine
    assert compat.out_of_memory([(logging.ERROR, "[localCheckMacros.cpp::getErrorStr::132] Error Code 2: OutOfMemory "
                                                 "(Requested size was 68723824008 bytes.)")]) == (True, 68723824008)


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
    _engine(tmp_path, "unet", env=Environment("tensorrt", "10.12.0.36", ENV.gpu_name, "9.0"))  # stale
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
    _engine(tmp_path, "unet", env=Environment("tensorrt", ENV.version, "NVIDIA A100-SXM4-80GB", "8.0"), spec=old)
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
    with pytest.raises(EngineError, match=r"^neither TensorRT nor TensorRT-RTX is installed"):
        builder.build_engines(sd1_workdir_fp32, BuildSpec(), progress=False)
    with pytest.raises(UsageError, match="--target is for TensorRT-RTX"):
        builder.build_engines(sd1_workdir_fp32, BuildSpec(tensorrt="tensorrt", targets=("sm89",)), progress=False)
    assert not (sd1_workdir_fp32 / "engines").exists()


# -- TensorRT calls: TensorRT-RTX's real builder where it runs here, fakes for TensorRT proper ----------------------
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
    return _with_module(monkeypatch, "tensorrt", _fake_trt("10.13.0.35")).module()


@pytest.fixture
def rtx():
    return compat.flavour("rtx")


def _rtx_builder(rtx):
    return builder.create_builder(rtx, [])


def test_builder_config_sets_level_workspace_flags_and_one_profile(rtx):
    trt = rtx.module()
    b = _rtx_builder(rtx)
    spec = BuildSpec(profile=SPEC.profile, opt_level=5, workspace_mib=2048, refit=True, tf32=False)
    shapes = {"sample": ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64)), "timestep": ((1,), (1,), (1,))}
    config = builder.builder_config(trt, b, spec, shapes, "unet")
    assert config.builder_optimization_level == 5
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 2048 << 20
    assert config.get_flag(trt.BuilderFlag.REFIT) and not config.get_flag(trt.BuilderFlag.TF32)
    assert config.num_optimization_profiles == 1
    assert rtx.configure_build(config, ("sm89", "sm120")) == ["REQUIRE_USER_ALLOCATION"]
    assert config.num_compute_capabilities == 2
    assert [config.get_compute_capability(i) for i in range(2)] == [trt.ComputeCapability.SM89, trt.ComputeCapability.SM120]
    assert config.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)


def test_builder_config_defaults_leave_tensorrt_alone(rtx):
    trt = rtx.module()
    b = _rtx_builder(rtx)
    default = b.create_builder_config()
    config = builder.builder_config(trt, b, SPEC, {}, "unet")
    assert config.builder_optimization_level == 3
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == \
        default.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
    assert config.get_flag(trt.BuilderFlag.TF32) == default.get_flag(trt.BuilderFlag.TF32)
    assert not config.get_flag(trt.BuilderFlag.REFIT)


def test_builder_config_refused_profile(rtx):
    trt = rtx.module()
    b = _rtx_builder(rtx)
    # TensorRT-RTX checks a profile when it is added to the config: min above opt is refused there
    with pytest.raises(EngineError, match=r"unet: TensorRT (refused the optimization profile|refused the profile of "
                                          r"input sample)"):
        builder.builder_config(trt, b, SPEC, {"sample": ((2, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8))}, "unet")


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


def _uint8_intermediate_graph(path):
    """x (float) -> Cast(UINT8) -> Cast(FLOAT) -> y: a UINT8 tensor inside the graph, which TensorRT refuses."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["u8"], to=TensorProto.UINT8, name="/decoder/Cast_2"),
         helper.make_node("Cast", ["u8"], ["y"], to=TensorProto.FLOAT, name="/decoder/Cast_3")],
        "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_parser_errors_are_reported_with_their_descriptions(rtx, tmp_path):
    path = _uint8_intermediate_graph(tmp_path / "vae.onnx")
    with pytest.raises(EngineError) as e:
        builder.network_from_onnx(rtx, _rtx_builder(rtx), path, "vae_decoder")
    msg = str(e.value)
    assert msg.startswith(f"TensorRT-RTX's ONNX parser rejected {path} (vae_decoder): ")
    assert "TensorRT does not support UINT8 types for intermediate tensors" in msg
    assert msg.endswith("(node 0 '/decoder/Cast_2', Cast)")
    assert "\n" not in msg


def _provenance(path, env):
    return compat.TimingCache(path, env)


def test_timing_cache_from_another_gpu_is_replaced(fake_trt, tmp_path, caplog):
    path = tmp_path / "timing.cache"
    created = []

    def create(data):
        created.append(bytes(data))
        return f"cache<{bytes(data).decode()}>"

    config = _Recorder({"create_timing_cache": create, "set_timing_cache": lambda cache, ignore: True,
                        "get_timing_cache": _Recorder({"serialize": b"timings"})})
    a100 = compat.Environment("tensorrt", "10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0")
    _provenance(path, a100).save(config)  # made on an A100
    assert path.read_bytes() == b"timings"
    assert json.loads((tmp_path / "timing.cache.json").read_text())["gpu"] == "NVIDIA A100-SXM4-80GB"
    _provenance(path, a100).load(config)
    assert created[-1] == b"timings"  # same GPU and TensorRT: reused
    assert "ignoring timing cache" not in caplog.text
    _provenance(path, ENV).load(config)  # an H100 must not time kernels with an A100's cache
    assert created[-1] == b""
    assert "ignoring timing cache" in caplog.text and "NVIDIA A100-SXM4-80GB with 10.13.0.35" in caplog.text
    (tmp_path / "timing.cache.json").unlink()  # a cache nobody vouches for is not trusted either
    _provenance(path, a100).load(config)
    assert created[-1] == b""


def test_timing_cache_is_merged_with_disk_and_saved_atomically(fake_trt, tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"disk")
    cache = _Recorder({"combine": True, "serialize": b"merged"})
    config = _Recorder({"get_timing_cache": cache, "create_timing_cache": lambda data: f"parsed<{bytes(data).decode()}>"})
    _provenance(path, ENV).save(config)
    assert cache.calls == [("combine", "parsed<disk>", False), ("serialize",)]
    assert path.read_bytes() == b"merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache", "timing.cache.json"]


def test_tensorrt_rtx_has_no_timing_cache(rtx, tmp_path):
    config = _Recorder()
    cache = rtx.build_cache(tmp_path, NO_GPU)
    cache.load(config)
    cache.save(config)
    assert config.calls == [] and list(tmp_path.iterdir()) == []


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
    assert m.phases == ["Building engine", "Tactic selection"]
    m.interrupted = True
    assert m.step_complete("Building engine", 0) is False  # asks TensorRT to cancel
    m.close()
    assert m._bars == {}


@pytest.mark.parametrize("where", ["phase_start", "phase_finish"])
def test_ctrl_c_in_any_callback_cancels_the_build(fake_trt, monkeypatch, where):
    m = builder.progress_monitor(fake_trt, "unet", enabled=False)
    m.phase_start("Building engine", None, 3)

    class Interrupting:
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt

        def close(self):
            raise KeyboardInterrupt

    if where == "phase_start":
        monkeypatch.setattr(builder, "tqdm", Interrupting)
        m.phase_start("Tactic selection", "Building engine", 10)  # the bindings would swallow a raise here
    else:
        m._bars["Building engine"] = (Interrupting.__new__(Interrupting), 0)
        m.phase_finish("Building engine")
    assert m.interrupted
    assert m.step_complete("Building engine", 1) is False


def test_ctrl_c_during_a_real_build_cancels_it_and_writes_nothing(rtx, sd1_workdir_fp32, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    shutil.copytree(sd1_workdir_fp32, wd)
    calls = []

    def interrupting_tqdm(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:  # inside TensorRT's second phase_start callback
            raise KeyboardInterrupt
        return tqdm(*args, **kwargs)

    monkeypatch.setattr(builder, "tqdm", interrupting_tqdm)
    spec = BuildSpec(tensorrt="rtx", targets=("sm89",))
    with pytest.raises(KeyboardInterrupt):
        builder.build_engines(wd, spec, components=["unet"], progress=False)
    assert len(calls) >= 2
    assert not engine_path(wd, "unet").exists() and not sidecar_path(wd, "unet").exists()


def test_verify_onnx_catches_files_changed_after_export(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "unet.onnx").write_bytes(b"graph")
    entry = {"files": [{"path": "onnx/unet.onnx", "sha256": hashlib.sha256(b"graph").hexdigest()}]}
    builder.verify_onnx(tmp_path, "unet", entry)
    (tmp_path / "onnx" / "unet.onnx").write_bytes(b"edited")
    with pytest.raises(EngineError, match="unet file onnx/unet.onnx does not match its sha256 in the manifest; re-export"):
        builder.verify_onnx(tmp_path, "unet", entry)
