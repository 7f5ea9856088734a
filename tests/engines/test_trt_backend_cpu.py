"""The TensorRT backend's plain-Python parts on CPU: shape refusal before any work, one execution context per shape
bound once, buffers kept per shape, capture guards, scratch sizing, the flavour read from the sidecars, stale engines
refused together, load errors, and what ``--backend auto`` accepts. Execution contexts and deserialized engines are
fakes: running a plan needs a GPU."""

from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import torch
from engine_manifests import sd15_manifest, with_onnx_files

from sdtrt.engines import compat
from sdtrt.engines.compat import Environment
from sdtrt.engines.profiles import BuildSpec, ProfileSpec, component_profile
from sdtrt.engines.sidecar import make_sidecar, write_engine
from sdtrt.errors import EngineError, ShapeError
from sdtrt.runtime.backends import trt_backend
from sdtrt.runtime.backends.trt_backend import (
    LoadedEngine,
    MissingEngineRunner,
    TensorRTBackend,
    TensorRTRunner,
    allocate_scratch,
    create_context,
    load_engines,
)

M = sd15_manifest()
ENV = Environment("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
SPEC = BuildSpec(profile=ProfileSpec().resolved(512))
CPU = torch.device("cpu")


class FakeContext:
    """An execution context that computes output shapes from input shapes as the UNet does."""

    def __init__(self, accept_shapes=True, execute_ok=True, out_shape=None):
        self.calls = []
        self.shapes = {}
        self.accept_shapes, self.execute_ok, self.out_shape = accept_shapes, execute_ok, out_shape

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, shape))
        self.shapes[name] = shape
        return self.accept_shapes

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name, ptr))
        return True

    def get_tensor_shape(self, name):
        return self.out_shape or self.shapes["sample"]

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3", stream))
        return self.execute_ok


def _unet_runner(ctx, monkeypatch, capturing=False, spec=SPEC, capturable=True, warmed=lambda: None):
    """A unet runner whose contexts are ``ctx`` (one context) or made by ``ctx()`` (a factory)."""
    monkeypatch.setattr(trt_backend, "_stream_handle", lambda device: 1234)
    monkeypatch.setattr(trt_backend, "_capturing", lambda: capturing)
    entry = M["components"]["unet"]
    prof = component_profile("unet", entry, spec.profile, 8)
    new_context = ctx if callable(ctx) else (lambda: ctx)
    return TensorRTRunner("unet", entry, prof, CPU, new_context=new_context, capturable=lambda c, s: capturable,
                          warmed=warmed, hint="rebuild hint")


def test_shape_outside_profile_is_refused_before_any_work(monkeypatch):
    ctx = FakeContext()
    r = _unet_runner(ctx, monkeypatch)
    with pytest.raises(ShapeError) as e:
        r.activate({"2B": 2, "H": 96, "W": 96})
    assert str(e.value).startswith("the unet engine cannot run this shape: H = 96 (768 px) is outside H 64 (512 px)")
    assert str(e.value).endswith("; rebuild hint")
    assert ctx.calls == [] and r.inputs == {}


def test_activate_binds_every_tensor_once_per_shape(monkeypatch):
    ctx = FakeContext()
    r = _unet_runner(ctx, monkeypatch)
    r.activate({"2B": 2, "H": 64, "W": 64})
    assert [c for c in ctx.calls if c[0] == "set_input_shape"] == [
        ("set_input_shape", "sample", (2, 4, 64, 64)), ("set_input_shape", "timestep", (1,)),
        ("set_input_shape", "encoder_hidden_states", (2, 77, 768))]
    addresses = {c[1]: c[2] for c in ctx.calls if c[0] == "set_tensor_address"}
    assert addresses == {n: t.data_ptr() for n, t in (*r.inputs.items(), *r.outputs.items())}
    assert r.inputs["sample"].dtype == torch.float16 and r.inputs["timestep"].dtype == torch.float32
    n = len(ctx.calls)
    r.activate({"2B": 2, "H": 64, "W": 64})  # same shape: nothing to do
    assert len(ctx.calls) == n
    r.run()
    assert ctx.calls[-1] == ("execute_async_v3", 1234)


def test_buffers_and_contexts_are_kept_per_shape_so_captured_graphs_find_them(monkeypatch):
    made = []

    def new_context():
        made.append(FakeContext())
        return made[-1]

    r = _unet_runner(new_context, monkeypatch)
    r.activate({"2B": 2, "H": 64, "W": 64})  # A: CFG rows
    cfg_sample = r.inputs["sample"]
    r.run()
    r.activate({"2B": 1, "H": 64, "W": 64})  # B: guidance <= 1, B rows
    assert r.inputs["sample"].shape == (1, 4, 64, 64)
    r.run()
    r.activate({"2B": 2, "H": 64, "W": 64})  # A again
    assert r.inputs["sample"] is cfg_sample  # same tensor, same address
    r.run()
    # A -> B -> A: two contexts, each bound once to its own shape and never re-bound; A's runs went to A's context
    assert len(made) == 2
    a, b = made
    assert [c[2] for c in a.calls if c[0] == "set_input_shape" and c[1] == "sample"] == [(2, 4, 64, 64)]
    assert [c[2] for c in b.calls if c[0] == "set_input_shape" and c[1] == "sample"] == [(1, 4, 64, 64)]
    assert [c[0] for c in a.calls].count("execute_async_v3") == 2
    assert [c[0] for c in b.calls].count("execute_async_v3") == 1
    r.release({"2B": 1, "H": 64, "W": 64})
    assert list(r._contexts) == [(("2B", 2), ("H", 64), ("W", 64))]
    r.deactivate()
    assert r.inputs == {} and r._by_shape == {} and r._contexts == {}


def test_refused_shape_and_wrong_output_shape(monkeypatch):
    r = _unet_runner(FakeContext(accept_shapes=False), monkeypatch)
    with pytest.raises(ShapeError, match=r"unet: TensorRT refused shape \(2, 4, 64, 64\) for input sample"):
        r.activate({"2B": 2, "H": 64, "W": 64})
    with pytest.raises(ShapeError):  # not left looking active: the same shape is tried again
        r.activate({"2B": 2, "H": 64, "W": 64})
    r = _unet_runner(FakeContext(out_shape=(2, 4, 32, 32)), monkeypatch)
    with pytest.raises(EngineError, match=r"computes latent with shape \(2, 4, 32, 32\) where the manifest says "
                                          r"\(2, 4, 64, 64\); rebuild"):
        r.activate({"2B": 2, "H": 64, "W": 64})


def test_failed_enqueue_is_an_error(monkeypatch):
    r = _unet_runner(FakeContext(execute_ok=False), monkeypatch)
    r.activate({"2B": 2, "H": 64, "W": 64})
    with pytest.raises(EngineError, match=r"unet: TensorRT execute_async_v3 failed at \{'2B': 2, 'H': 64, 'W': 64\}"):
        r.run()


def test_first_run_at_a_new_shape_must_not_be_captured(monkeypatch):
    ctx = FakeContext()
    warm = []
    r = _unet_runner(ctx, monkeypatch, capturing=True, warmed=lambda: warm.append(1))
    r.activate({"2B": 2, "H": 64, "W": 64})
    with pytest.raises(EngineError, match="must enqueue it once eagerly before capture"):
        r.run()
    monkeypatch.setattr(trt_backend, "_capturing", lambda: False)
    r.run()  # warm-up
    assert warm == [1]  # the runtime cache is saved once, after the first eager enqueue
    monkeypatch.setattr(trt_backend, "_capturing", lambda: True)
    r.run()  # captured
    assert [c for c in ctx.calls if c[0] == "execute_async_v3"] == [("execute_async_v3", 1234)] * 2
    assert warm == [1]


def test_a_context_warmed_at_one_shape_is_not_taken_as_warm_at_another(monkeypatch):
    r = _unet_runner(FakeContext, monkeypatch)
    r.activate({"2B": 2, "H": 64, "W": 64})
    r.run()
    r.activate({"2B": 1, "H": 64, "W": 64})
    monkeypatch.setattr(trt_backend, "_capturing", lambda: True)
    with pytest.raises(EngineError, match=r"first run at shape \{'2B': 1, 'H': 64, 'W': 64\} is being captured"):
        r.run()


def test_an_enqueue_the_flavour_cannot_capture_is_refused_under_capture(monkeypatch):
    ctx = FakeContext()
    r = _unet_runner(ctx, monkeypatch, capturable=False)
    r.activate({"2B": 2, "H": 64, "W": 64})
    r.run()  # eager: fine
    monkeypatch.setattr(trt_backend, "_capturing", lambda: True)
    with pytest.raises(EngineError, match="enqueue cannot be captured into a CUDA graph on this stream"):
        r.run()
    assert [c[0] for c in ctx.calls].count("execute_async_v3") == 1


def test_missing_engine_runner_fails_only_when_used():
    r = MissingEngineRunner("vae_encoder", "no TensorRT engine for vae_encoder; build it")
    r.deactivate()
    with pytest.raises(EngineError, match="no TensorRT engine for vae_encoder"):
        r.activate({"B": 1})


def test_scratch_is_the_largest_engines_and_shared(monkeypatch):
    engines = {c: LoadedEngine(c, object(), None, n) for c, n in (("text_encoder", 10), ("unet", 300), ("vae_decoder", 200))}
    scratch = allocate_scratch(engines, CPU)
    assert scratch.numel() == 300 and scratch.dtype == torch.uint8

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "empty", oom)
    with pytest.raises(EngineError, match=r"GPU out of memory allocating 0\.00 GiB of TensorRT scratch memory \(the unet "
                                          r"engine's activations at its largest profile shape\)"):
        allocate_scratch(engines, CPU)


class FakeFlavour(compat.TensorRT):
    """TensorRT with a fake module (dtypes, I/O modes and the allocation strategy as plain strings)."""

    def __init__(self):
        super().__init__()
        trt = types.ModuleType("tensorrt")
        trt.__version__ = "10.13.0.35"
        trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
        trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
        trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", BF16="bf16", INT32="i32", INT64="i64",
                                             UINT8="u8", BOOL="b")
        self._module = trt

    def logger(self):
        class Logger:
            @contextlib.contextmanager
            def capture(self):
                yield []

        return Logger()


@pytest.fixture
def fake_trt():
    return FakeFlavour()


def test_contexts_use_the_shared_scratch(fake_trt):
    calls = []

    class Ctx:
        def set_device_memory(self, ptr, size):
            calls.append((ptr, size))

    class Engine:
        def create_execution_context(self, strategy):
            calls.append(strategy)
            return Ctx()

    scratch = torch.empty(300, dtype=torch.uint8)
    create_context(fake_trt, LoadedEngine("unet", Engine(), None, 300), scratch)
    assert calls == ["USER_MANAGED", (scratch.data_ptr(), 300)]
    with pytest.raises(EngineError, match="shared scratch of 300 bytes is below the 400 the engine needs"):
        create_context(fake_trt, LoadedEngine("unet", Engine(), None, 400), scratch)

    class NoContext:
        def create_execution_context(self, strategy):
            return None

    with pytest.raises(EngineError, match="TensorRT could not create an execution context for the unet engine"):
        create_context(fake_trt, LoadedEngine("unet", NoContext(), None, 1), scratch)


def _engine(workdir, component, env=ENV, spec=SPEC):
    entry = M["components"][component]
    prof = component_profile(component, entry, spec.profile, 8)
    side = make_sidecar(component, entry, spec, env, profile=prof.to_json(), input_shapes=prof.input_shapes(entry),
                        flags=["STRONGLY_TYPED"], build_seconds=1.0)
    write_engine(workdir, component, b"plan " + component.encode(), side)


def test_stale_engines_are_refused_together_with_the_rebuild_command(tmp_path):
    old = Environment("tensorrt", "10.12.0.36", ENV.gpu_name, ENV.compute_capability)
    for c in ("text_encoder", "unet", "vae_decoder"):
        _engine(tmp_path, c, env=old if c != "vae_decoder" else ENV)

    class Runtime:
        def deserialize_cuda_engine(self, data):
            raise AssertionError("once an engine is stale, nothing more is deserialized")

    with pytest.raises(EngineError) as e:
        load_engines(Runtime(), compat.flavour("tensorrt"), tmp_path, M, ENV, ["text_encoder", "unet", "vae_decoder"])
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: 2 engines are stale: the text_encoder engine cannot run here: it was built with "
                          "TensorRT 10.12.0.36, this is TensorRT 10.13.0.35 (a plan only loads in the version that built "
                          "it); the unet engine cannot run here: it was built with TensorRT 10.12.0.36")
    assert (f"Rebuild: `sdtrt build {tmp_path} --static --batch 1 --height 512 --width 512 --components text_encoder,unet`"
            in msg)
    assert msg.endswith(f"(or `sdtrt build {tmp_path} --rebuild-stale` to rebuild every stale engine with its recorded "
                        "settings)")


def test_out_of_memory_while_loading_names_the_engine(tmp_path, fake_trt, monkeypatch):
    _engine(tmp_path, "unet")

    class Logger:
        @contextlib.contextmanager
        def capture(self):
            yield [(logging.ERROR, "Requested amount of GPU memory (2147483648 bytes) could not be allocated.")]

    class Runtime:
        def deserialize_cuda_engine(self, data):
            return None

    monkeypatch.setattr(fake_trt, "logger", lambda: Logger())
    with pytest.raises(EngineError) as e:
        load_engines(Runtime(), fake_trt, tmp_path, M, ENV, ["unet"])
    assert str(e.value) == ("GPU out of memory loading the unet engine: its plan holds 0.00 GiB of weights (TensorRT "
                            "asked for 2.00 GiB); free GPU memory or use a smaller model/precision")


def test_backend_needs_a_cuda_device_then_the_flavour_that_built_the_engines(monkeypatch, tmp_path):
    with pytest.raises(EngineError, match="the tensorrt backend runs on a CUDA GPU, not on cpu"):
        TensorRTBackend(tmp_path, M, CPU)
    with pytest.raises(EngineError, match=rf"^{tmp_path}: no TensorRT engines; build them: `sdtrt build {tmp_path}`"):
        TensorRTBackend(tmp_path, M, torch.device("cuda"))
    _engine(tmp_path, "unet")  # built with TensorRT, which is not installed here
    monkeypatch.setattr(compat.flavour("tensorrt"), "_module", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"^TensorRT is not installed: pip install 'sdtrt\[tensorrt\]'"):
        TensorRTBackend(tmp_path, M, torch.device("cuda"))


def test_engines_of_both_flavours_are_refused(tmp_path):
    _engine(tmp_path, "unet")
    _engine(tmp_path, "text_encoder", env=RTX_AOT, spec=RTX_SPEC)
    with pytest.raises(EngineError) as e:
        trt_backend.engines_flavour(tmp_path, ["text_encoder", "unet"])
    assert str(e.value) == (f"{tmp_path}: the engines were built by different TensorRT flavours (text_encoder with "
                            f"TensorRT-RTX; unet with TensorRT); rebuild them with one: `sdtrt build {tmp_path} "
                            "--tensorrt tensorrt` or `--tensorrt rtx`")
    assert trt_backend.engines_flavour(tmp_path, ["text_encoder"]).name == "rtx"
    assert trt_backend.engines_flavour(tmp_path, ["unet"]).name == "tensorrt"


RTX_AOT = Environment("rtx", "1.7.1.116", None, None)
RTX_SPEC = BuildSpec(profile=SPEC.profile, tensorrt="rtx", targets=("sm89", "sm86"))


def _ready(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(compat, "visible_gpu", lambda device=None: gpu)
    return trt_backend.engines_ready(tmp_path, M)


def test_auto_picks_tensorrt_only_when_every_engine_is_there_and_fresh(tmp_path, monkeypatch):
    ada = ("NVIDIA GeForce RTX 4090", "8.9")
    assert _ready(tmp_path, monkeypatch, ada) == "no TensorRT engines are built"
    for c in ("text_encoder", "unet", "vae_decoder"):
        _engine(tmp_path, c, env=RTX_AOT, spec=RTX_SPEC)
    # a partial build (vae_encoder failed, or was not asked for) is not used
    assert _ready(tmp_path, monkeypatch, ada) == "no engine for vae_encoder (a partial build)"
    _engine(tmp_path, "vae_encoder", env=RTX_AOT, spec=RTX_SPEC)
    assert _ready(tmp_path, monkeypatch, ada) is None
    assert _ready(tmp_path, monkeypatch, ("NVIDIA RTX A6000", "8.6")) is None
    assert _ready(tmp_path, monkeypatch, ("NVIDIA RTX 2080", "7.5")) == (
        "the text_encoder engine cannot run here: it was built for sm89, sm86, this GPU is NVIDIA RTX 2080 (compute "
        "capability 7.5) (sm75)")
    assert _ready(tmp_path, monkeypatch, ("NVIDIA H100 80GB HBM3", "9.0")) == (
        "TensorRT-RTX does not run on NVIDIA H100 80GB HBM3 (compute capability 9.0): it supports compute capabilities "
        "7.5, 8.0, 8.6, 8.9, 12.0, 12.1; use TensorRT (pip install 'sdtrt[tensorrt]', sdtrt build --tensorrt tensorrt)")
    (tmp_path / "onnx").mkdir(exist_ok=True)
    changed = with_onnx_files(M, "unet", [("onnx/unet.onnx", "another-export")])
    monkeypatch.setattr(compat, "visible_gpu", lambda device=None: ada)
    assert "the unet engine was built from another export" in trt_backend.engines_ready(tmp_path, changed)


def test_auto_backend_says_why_it_does_not_use_the_engines(tmp_path, monkeypatch, caplog):
    from sdtrt.runtime import backends

    for c in ("text_encoder", "unet", "vae_decoder"):
        _engine(tmp_path, c, env=RTX_AOT, spec=RTX_SPEC)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "visible_gpu", lambda device=None: ("NVIDIA GeForce RTX 4090", "8.9"))
    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert backends.resolve_backend_name("auto", tmp_path, M) == ("torch", torch.device("cuda"))
    assert "not using the TensorRT engines" in caplog.text and "no engine for vae_encoder (a partial build)" in caplog.text
    _engine(tmp_path, "vae_encoder", env=RTX_AOT, spec=RTX_SPEC)
    assert backends.resolve_backend_name("auto", tmp_path, M) == ("tensorrt", torch.device("cuda"))


def test_load_backend_tensorrt_without_gpu_is_a_usage_error(tmp_path):
    from sdtrt.errors import UsageError
    from sdtrt.runtime.backends import load_backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UsageError, match="the tensorrt backend needs an NVIDIA GPU"):
        load_backend("tensorrt", tmp_path, M)


class FakeEngine:
    """A deserialized unet engine as TensorRT describes it (dtypes as fake trt.DataType members)."""

    def __init__(self, trt, sample_dtype="HALF", profile_max=(2, 4, 64, 64)):
        io = [("sample", "INPUT", sample_dtype), ("timestep", "INPUT", "FLOAT"),
              ("encoder_hidden_states", "INPUT", "HALF"), ("latent", "OUTPUT", "HALF")]
        self._io = io
        self._trt = trt
        self.num_io_tensors = len(io)
        self.num_optimization_profiles = 1
        self.device_memory_size_v2 = 4096
        self._profiles = {"sample": [(1, 4, 64, 64), (2, 4, 64, 64), profile_max], "timestep": [(1,), (1,), (1,)],
                          "encoder_hidden_states": [(1, 77, 768), (2, 77, 768), (2, 77, 768)]}

    def get_tensor_name(self, i):
        return self._io[i][0]

    def get_tensor_mode(self, name):
        return getattr(self._trt.TensorIOMode, dict((n, m) for n, m, _ in self._io)[name])

    def get_tensor_dtype(self, name):
        return getattr(self._trt.DataType, dict((n, d) for n, _, d in self._io)[name])

    def get_tensor_profile_shape(self, name, profile):
        return self._profiles[name]


@pytest.fixture
def io_trt(fake_trt):
    return fake_trt


def test_fresh_engines_load_with_their_profiles(tmp_path, io_trt):
    _engine(tmp_path, "unet")

    class Runtime:
        def deserialize_cuda_engine(self, data):
            assert bytes(data) == b"plan unet"
            return FakeEngine(io_trt.module())

    loaded = load_engines(Runtime(), io_trt, tmp_path, M, ENV, ["unet"])
    assert loaded["unet"].device_memory == 4096
    assert loaded["unet"].profile.dims("max") == {"2B": 2, "H": 64, "W": 64}


def test_engine_io_must_match_manifest_and_sidecar(tmp_path, io_trt):
    _engine(tmp_path, "unet")
    for engine, message in [
        (FakeEngine(io_trt.module(), sample_dtype="FLOAT"), "the unet engine has inputs {'sample': 'float32'"),
        (FakeEngine(io_trt.module(), profile_max=(4, 4, 64, 64)), "the unet engine's profile for sample is [[1, 4, 64, 64], "
                                                         "[2, 4, 64, 64], [4, 4, 64, 64]], its sidecar says"),
    ]:
        class Runtime:
            def deserialize_cuda_engine(self, data, engine=engine):
                return engine

        with pytest.raises(EngineError) as e:
            load_engines(Runtime(), io_trt, tmp_path, M, ENV, ["unet"])
        assert message in str(e.value)
        assert str(e.value).endswith(f"rebuild it: `sdtrt build {tmp_path} --static --batch 1 --height 512 --width 512 "
                                     "--components unet`")


def test_out_of_memory_for_io_buffers_names_the_engine_and_size(monkeypatch):
    r = _unet_runner(FakeContext(), monkeypatch)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "zeros", oom)
    with pytest.raises(EngineError) as e:
        r.activate({"2B": 2, "H": 64, "W": 64})
    # sample + latent: 2*4*64*64 fp16 each; timestep: 4 bytes; encoder_hidden_states: 2*77*768 fp16
    nbytes = 2 * (2 * 4 * 64 * 64 * 2) + 4 + 2 * 77 * 768 * 2
    assert str(e.value) == (f"GPU out of memory allocating the unet engine's I/O buffers for {{'2B': 2, 'H': 64, 'W': 64}} "
                            f"({nbytes / 2**30:.2f} GiB)")


class FakeRuntimeCache:
    def __init__(self, accept=True):
        self.blob, self.accept, self.loaded = b"", accept, None

    def deserialize(self, data):
        self.loaded = bytes(data)
        if self.accept:
            self.blob = bytes(data)
        return self.accept

    def serialize(self):
        return self.blob


class FakeRuntimeConfig:
    def __init__(self, cache):
        self.cache = cache

    def create_runtime_cache(self):
        return self.cache


def test_runtime_cache_is_loaded_once_shared_and_saved_when_it_grows(tmp_path):
    path = tmp_path / "runtime.cache"
    path.write_bytes(b"kernels A")
    fake = FakeRuntimeCache()
    cache = compat.RuntimeCache(path)
    assert cache.cache_for(FakeRuntimeConfig(fake)) is fake and fake.loaded == b"kernels A"
    assert cache.cache_for(FakeRuntimeConfig(FakeRuntimeCache())) is fake  # one cache for every context
    cache.save()
    assert path.read_bytes() == b"kernels A"  # nothing new: not rewritten
    fake.blob = b"kernels A + kernels for a new shape"
    cache.save()
    assert path.read_bytes() == b"kernels A + kernels for a new shape"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runtime.cache"]  # atomic: no temp left


def test_runtime_cache_from_another_gpu_is_replaced(tmp_path, caplog):
    path = tmp_path / "runtime.cache"
    path.write_bytes(b"kernels for another GPU")
    fake = FakeRuntimeCache(accept=False)  # TensorRT-RTX checks GPU, driver and version, and refuses
    cache = compat.RuntimeCache(path)
    cache.cache_for(FakeRuntimeConfig(fake))
    assert "ignoring runtime cache" in caplog.text
    fake.blob = b"this GPU's kernels"
    cache.save()  # smaller than the refused file, but it is this GPU's: written
    assert path.read_bytes() == b"this GPU's kernels"


def test_a_prompt_of_more_chunks_than_the_engine_takes_is_refused_before_any_work(monkeypatch):
    from engine_manifests import sdxl_manifest

    monkeypatch.setattr(trt_backend, "_stream_handle", lambda device: 1234)
    monkeypatch.setattr(trt_backend, "_capturing", lambda: False)
    entry = sdxl_manifest()["components"]["unet"]
    prof = component_profile("unet", entry, ProfileSpec(max_chunks=2).resolved(1024), 8)
    ctx = FakeContext()
    r = TensorRTRunner("unet", entry, prof, CPU, new_context=lambda: ctx, capturable=lambda c, s: True, hint="rebuild hint")
    with pytest.raises(ShapeError) as e:
        r.check({"2B": 2, "H": 128, "W": 128, "77T": 231})
    assert str(e.value).startswith("the unet engine cannot run this shape: 77T = 231 (3 prompt chunks) is outside "
                                   "77T 77..154 (1..2 prompt chunks of 75 tokens: built with --max-chunks 2)")
    with pytest.raises(ShapeError):
        r.activate({"2B": 2, "H": 128, "W": 128, "77T": 231})
    assert ctx.calls == [] and r.inputs == {}
    r.activate({"2B": 2, "H": 128, "W": 128, "77T": 154})  # two chunks: bound at that length
    shapes = {c[1]: c[2] for c in ctx.calls if c[0] == "set_input_shape"}
    assert shapes["encoder_hidden_states"] == (2, 154, 2048) and shapes["time_ids"] == (2, 6)
    assert r.inputs["time_ids"].dtype == torch.float32 and r.inputs["text_embeds"].dtype == torch.float16
