"""``sdtrt check``'s plain-Python parts: seeded inputs, the exporter's metrics and tolerances, the report text."""

from __future__ import annotations

import numpy as np
import pytest
from engine_manifests import sd15_manifest

from sdtrt.engines import check
from sdtrt.errors import EngineError

M = sd15_manifest()


def test_random_inputs_follow_the_manifest_and_the_seed():
    dims = {"2B": 2, "H": 8, "W": 8}
    a = check.random_inputs(M["components"]["unet"], dims, seed=3, vocab_size=100)
    b = check.random_inputs(M["components"]["unet"], dims, seed=3, vocab_size=100)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        "sample": ((2, 4, 8, 8), np.float16), "timestep": ((1,), np.float32),
        "encoder_hidden_states": ((2, 77, 768), np.float16)}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert 1 <= a["timestep"][0] <= 999 and a["timestep"][0] == int(a["timestep"][0])
    ids = check.random_inputs(M["components"]["text_encoder"], {"B": 1}, seed=0, vocab_size=100)["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (1, 77) and 0 <= ids.min() and ids.max() < 100
    img = check.random_inputs(M["components"]["vae_encoder"], {"B": 1, "8H": 16, "8W": 24}, seed=0, vocab_size=1)["image"]
    assert img.dtype == np.uint8 and img.shape == (1, 16, 24, 3)


def test_compare_outputs_uses_the_exporters_metrics():
    entry = M["components"]["vae_decoder"]
    want = {"image": np.array([[10, 200], [30, 40]], np.uint8), "finite": np.array([True, True])}
    got = {"image": np.array([[12, 200], [30, 33]], np.uint8), "finite": np.array([True, False])}
    img, fin = check.compare_outputs(entry, got, want, "fp16")
    assert (img.kind, img.metric, img.tolerance, img.passed) == ("uint8", 7.0, 8.0, True)
    assert img.mean_abs == pytest.approx(9 / 4) and img.ref_max_abs == 200
    assert (fin.kind, fin.metric, fin.tolerance, fin.passed) == ("bool", 1.0, 0.0, False)

    entry = M["components"]["unet"]
    want = {"latent": np.array([1.0, -4.0, 2.0], np.float16)}
    got = {"latent": np.array([1.0, -4.04, 2.0], np.float16)}
    (lat,) = check.compare_outputs(entry, got, want, "fp32")
    assert lat.metric == pytest.approx(float(np.float16(4.04) - np.float16(4.0)) / 4.0)
    assert lat.tolerance == 1e-4 and not lat.passed
    (lat,) = check.compare_outputs(entry, got, want, "fp16")
    assert lat.tolerance == 2e-2 and lat.passed
    got = {"latent": np.array([1.0, np.nan, 2.0], np.float16)}
    (lat,) = check.compare_outputs(entry, got, want, "fp16")
    assert lat.metric == float("inf") and not lat.passed
    (lat,) = check.compare_outputs(entry, {"latent": np.zeros(2, np.float16)}, want, "fp16")
    assert lat.metric == float("inf") and lat.shape == (2,)


def test_tolerance_rows():
    assert check.tolerance_row("fp16", ["STRONGLY_TYPED"]) == "fp16"
    assert check.tolerance_row("fp32", ["STRONGLY_TYPED", "TF32"]) == "fp16"  # TF32 keeps fp16's 10-bit mantissa
    assert check.tolerance_row("fp32", ["STRONGLY_TYPED"]) == "fp32"


def _report(passed: bool) -> check.CheckReport:
    entry = M["components"]["vae_decoder"]
    want = {"image": np.array([10, 20], np.uint8), "finite": np.array([True])}
    got = {"image": np.array([11, 20], np.uint8), "finite": np.array([passed])}
    comp = check.ComponentCheck("vae_decoder", "fp16", "fp16", {"B": 1, "H": 8, "W": 8},
                                check.compare_outputs(entry, got, want, "fp16"))
    return check.CheckReport("/wd", "TensorRT 10.13.0.35", "NVIDIA H100 80GB HBM3 (compute capability 9.0)", 0, (comp,))


def test_format_report():
    text = check.format_report(_report(True))
    lines = text.splitlines()
    assert lines[0] == "/wd: TensorRT 10.13.0.35 on NVIDIA H100 80GB HBM3 (compute capability 9.0) vs ONNX Runtime (CPU), seed 0"
    assert lines[1] == "  vae_decoder (fp16 graph, fp16 tolerances) at B=1, H=8, W=8"
    assert lines[2].split() == ["image", "[2]", "max_levels", "1", "(tolerance", "8)", "max_abs", "1", "mean_abs",
                                "0.5", "ref_max_abs", "20", "ok"]
    assert lines[-1] == "all 2 outputs of 1 engines within tolerance"
    bad = _report(False)
    assert not bad.passed and bad.failures[0][1].output == "finite"
    assert check.format_report(bad).splitlines()[-1] == "1 of 2 outputs exceed their tolerance: vae_decoder.finite"


def test_check_engines_without_engines(sd1_workdir_fp32):
    with pytest.raises(EngineError, match=rf"^{sd1_workdir_fp32}: no TensorRT engines; build them"):
        check.check_engines(sd1_workdir_fp32)


def test_sdxl_inputs_time_ids_like_sizes_and_each_encoder_its_own_vocabulary(sdxl_refiner_workdir_fp32):
    from engine_manifests import sdxl_manifest

    unet = sdxl_manifest()["components"]["unet"]
    feeds = check.random_inputs(unet, {"2B": 2, "H": 8, "W": 8, "77T": 154}, seed=0, vocab_size=1)
    assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
        "sample": ((2, 4, 8, 8), np.float16), "timestep": ((1,), np.float32),
        "encoder_hidden_states": ((2, 154, 2048), np.float16), "text_embeds": ((2, 1280), np.float16),
        "time_ids": ((2, 6), np.float32)}
    ids = feeds["time_ids"]
    assert ids.min() >= 1 and ids.max() <= 999 and np.array_equal(ids, ids.round())  # sizes, not N(0, 1)
    # the refiner has tokenizer_2/ only: text_encoder_2's ids come from it, graphs without ids need none
    assert check._vocab_size(sdxl_refiner_workdir_fp32, "text_encoder_2") == 1000
    assert check._vocab_size(sdxl_refiner_workdir_fp32, "unet") == 1
