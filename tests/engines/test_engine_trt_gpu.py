"""TensorRT end to end on a GPU: build tiny-sd1 engines, check them against ONNX Runtime, generate with them and
compare to the onnxruntime backend, graph replay equals eager, no memory growth, stale and out-of-profile refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from sdtrt.engines.builder import build_engines
from sdtrt.engines.check import check_engines, format_report
from sdtrt.engines.profiles import BuildSpec, ProfileSpec
from sdtrt.engines.sidecar import engine_path, sidecar_path, timing_cache_path
from sdtrt.errors import EngineError, ShapeError
from sdtrt.export.spec import FAMILIES

COMPONENTS = FAMILIES["sd1"].components

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

STATIC = BuildSpec(profile=ProfileSpec(batch=1, height=64, width=64), tensorrt="tensorrt")
REQUEST = {"num_inference_steps": 6, "guidance_scale": 7.5, "seed": 0, "height": 64, "width": 64}


def _copy(src, tmp_path_factory, name):
    dst = tmp_path_factory.mktemp("trt") / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def trt_workdir(sd1_workdir_fp16, tmp_path_factory):
    """tiny-sd1 fp16 with static 64x64 batch-1 engines."""
    wd = _copy(sd1_workdir_fp16, tmp_path_factory, "sd1-fp16")
    build_engines(wd, STATIC, progress=False)
    return wd


@pytest.fixture(scope="module")
def trt_pipe(trt_workdir):
    from sdtrt.runtime.pipeline import Pipeline

    return Pipeline.load(trt_workdir, backend="tensorrt")


def _images(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images])


def test_build_writes_plans_sidecars_and_timing_cache(trt_workdir):
    from sdtrt.engines import compat

    for c in COMPONENTS:
        assert engine_path(trt_workdir, c).stat().st_size > 0
        side = json.loads(sidecar_path(trt_workdir, c).read_text())
        assert side["tensorrt"] == {"flavour": "tensorrt", "version": compat.flavour("tensorrt").version(), "targets": []}
        assert side["gpu"]["name"] == torch.cuda.get_device_name()
        assert "STRONGLY_TYPED" in side["flags"] and side["precision"] == "fp16"
    assert timing_cache_path(trt_workdir).stat().st_size > 0
    assert not [p for p in (trt_workdir / "engines").iterdir() if p.name.endswith(".tmp")]


def test_second_build_skips_fresh_engines(trt_workdir):
    before = {c: engine_path(trt_workdir, c).stat().st_mtime_ns for c in COMPONENTS}
    assert build_engines(trt_workdir, STATIC, progress=False) == []
    assert {c: engine_path(trt_workdir, c).stat().st_mtime_ns for c in COMPONENTS} == before


def test_engines_agree_with_onnxruntime(trt_workdir):
    report = check_engines(trt_workdir)
    assert report.passed, format_report(report)
    assert {c.component for c in report.components} == set(COMPONENTS)


def test_generate_matches_the_onnxruntime_backend(trt_workdir, trt_pipe):
    from sdtrt.runtime.pipeline import Pipeline

    ort = Pipeline.load(trt_workdir, backend="onnxruntime")
    got, want = _images(trt_pipe("a photo of a cat", **REQUEST)), _images(ort("a photo of a cat", **REQUEST))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() <= 2.0 and diff.max() <= 24, (diff.mean(), diff.max())  # fp16 engines vs fp16 ONNX, 6 steps


def test_graph_replay_equals_eager(trt_pipe):
    assert trt_pipe.backend.capturable and trt_pipe.use_cuda_graph
    req = {**REQUEST, "num_inference_steps": 5}  # a loop key no other test ran: the first call is eager
    assert not any(key.steps == 5 for key in trt_pipe._loops)
    first = _images(trt_pipe("graph replay", **{**req, "seed": 7}))  # eager, then captured
    assert any(key.steps == 5 and st.graph is not None for key, st in trt_pipe._loops.items())
    _images(trt_pipe("graph replay", **{**req, "seed": 8}))
    again = _images(trt_pipe("graph replay", **{**req, "seed": 7}))  # replayed
    np.testing.assert_array_equal(first, again)


def test_no_cuda_memory_growth_across_requests(trt_pipe):
    for seed in range(2):
        trt_pipe("memory", **{**REQUEST, "seed": seed})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for seed in range(2, 7):
        trt_pipe("memory", **{**REQUEST, "seed": seed})
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_guidance_1_runs_b_rows_on_the_static_engine(trt_pipe):
    result = trt_pipe("no guidance", **{**REQUEST, "guidance_scale": 1.0})
    assert _images(result).shape == (1, 64, 64, 3)


def test_shape_outside_the_profile_is_refused(trt_pipe):
    with pytest.raises(ShapeError, match=r"H = 16 \(128 px\) is outside H 8 \(64 px\)"):
        trt_pipe("too big", **{**REQUEST, "height": 128})


def test_stale_engine_is_refused_then_rebuilt(trt_workdir, tmp_path_factory):
    from sdtrt.runtime.pipeline import Pipeline

    wd = _copy(trt_workdir, tmp_path_factory, "stale")
    side = json.loads(sidecar_path(wd, "unet").read_text())
    side["tensorrt_version"] = "10.12.0.0"
    sidecar_path(wd, "unet").write_text(json.dumps(side))
    with pytest.raises(EngineError) as e:
        Pipeline.load(wd, backend="tensorrt")
    assert "the unet engine was built with TensorRT 10.12.0.0" in str(e.value)
    assert f"sdtrt build {wd} --static --batch 1 --height 64 --width 64 --components unet" in str(e.value)
    assert build_engines(wd, BuildSpec(rebuild_stale=True, tensorrt="tensorrt"), progress=False) == [engine_path(wd, "unet")]
    Pipeline.load(wd, backend="tensorrt")


def test_dynamic_engines_run_several_sizes(sd1_workdir_fp16, tmp_path_factory):
    from sdtrt.runtime.pipeline import Pipeline

    wd = _copy(sd1_workdir_fp16, tmp_path_factory, "dynamic")
    spec = BuildSpec(profile=ProfileSpec(static=False, batch=1, height=64, width=64, max_batch=2, min_side=32,
                                         max_side=128), tensorrt="tensorrt")
    build_engines(wd, spec, progress=False)
    pipe = Pipeline.load(wd, backend="tensorrt")
    for h, w, b in ((64, 64, 1), (96, 64, 1), (32, 128, 2)):
        result = pipe("dynamic", **{**REQUEST, "height": h, "width": w}, num_images_per_prompt=b)
        assert _images(result).shape == (b, h, w, 3)


def test_fp32_engines_without_tf32_hold_fp32_tolerances(sd1_workdir_fp32, tmp_path_factory):
    wd = _copy(sd1_workdir_fp32, tmp_path_factory, "fp32")
    build_engines(wd, BuildSpec(profile=STATIC.profile, tf32=False, tensorrt="tensorrt"), progress=False)
    report = check_engines(wd)
    assert {c.tolerances for c in report.components} == {"fp32"}
    assert report.passed, format_report(report)
