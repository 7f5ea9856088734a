"""``run_bench`` and ``write_reports`` in a short mode on the tiny checkpoint: the fields, not the speeds.

Expectations follow the device, as the benchmark does: with a CUDA GPU, diffusers and the torch backend run fp16,
the fp32 reference runs on the GPU (not reused from the diffusers contender), ONNX Runtime runs only with its CUDA
execution provider, and reports are named after the GPU.
"""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sdtrt.bench import BenchSpec, run_bench, write_reports
from sdtrt.bench.report import anchor_line, markdown
from sdtrt.bench.run import psnr
from sdtrt.bench.spec import SHORT
from sdtrt.errors import UsageError

SPEC = BenchSpec(contenders=("diffusers", "sdtrt-onnxruntime", "sdtrt-torch"), threads=1, **SHORT)
STAT_KEYS = {"n", "p50", "p90", "mean", "std", "min", "max"}

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# ONNX Runtime on a GPU machine runs only with its CUDA execution provider (onnxruntime-gpu); else it is skipped
ORT_RUNS = not CUDA or "CUDAExecutionProvider" in ort.get_available_providers()
ORT_SKIPPED = {} if ORT_RUNS else {
    "sdtrt-onnxruntime": "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu); it would run on "
                         "the CPU"}
RAN = {"diffusers", "sdtrt-torch"} | ({"sdtrt-onnxruntime"} if ORT_RUNS else set())
COMPUTE = "float16" if CUDA else "float32"  # diffusers and the torch backend: fp16 on CUDA
ENGINE_LABELS = {"diffusers": f"diffusers {COMPUTE}", "sdtrt-torch": f"torch {COMPUTE}",
                 "sdtrt-onnxruntime": f"onnxruntime-{DEVICE} fp32"}


def _report_prefix() -> str:
    """``cpu-<n>core-`` or the GPU's name, lower case, without "nvidia", words joined by dashes."""
    if not CUDA:
        import os

        return f"cpu-{os.cpu_count()}core-"
    words = torch.cuda.get_device_properties(0).name.lower().replace("nvidia", "").replace("_", " ").split()
    return "-".join(words)[:40] + "-"


@pytest.fixture(scope="module")
def short_result(sd1_workdir_fp32):
    return run_bench(sd1_workdir_fp32, SPEC, progress=False)


def test_result_fields(short_result):
    r = short_result
    assert r["format"] == "sdtrt-bench/1"
    assert r["device"] == DEVICE and r["baseline"] == "diffusers" and r["scheduler"] == "pndm"
    env = r["environment"]
    for key in ("date", "cpu", "cpu_count", "torch_threads", "versions", "load_average_start", "load_average_end"):
        assert key in env
    assert env["torch_threads"] == 1
    assert {"torch", "diffusers"} <= set(env["versions"])
    assert {"onnxruntime", "onnxruntime-gpu"} & set(env["versions"])  # GPU machines may have only the -gpu wheel
    assert r["checkpoint"]["arch"] == "tiny-sd1" and r["checkpoint"]["weights"].startswith("random")
    assert r["spec"]["batch_sizes"] == [1, 2] and r["spec"]["steps"] == 2
    # on CPU the diffusers contender is fp32 and is the reference; on CUDA it is fp16 and the reference runs apart
    assert r["reference"] == {"engine": "diffusers", "dtype": "float32", "device": DEVICE, "batch": 1,
                              "reused_contender": None if CUDA else "diffusers"}
    assert set(r["contenders"]) == RAN
    assert r["skipped"] == ORT_SKIPPED and r["failed"] == {}
    assert (r["environment"]["gpu"] is not None) == CUDA
    for name, c in r["contenders"].items():
        assert c["load_s"] > 0 and c["first_image_s"] > 0, name
        assert set(c["batches"]) == {"1", "2"}
        for batch in ("1", "2"):
            b = c["batches"][batch]
            assert b["runs"] == 2
            assert set(b["end_to_end_s"]) == STAT_KEYS and b["end_to_end_s"]["n"] == 2
            assert b["images_per_s"]["p50"] > 0
            assert set(b["alone_end_to_end_s"]) == STAT_KEYS and b["alone_end_to_end_s"]["n"] == 2
            ratio = b["end_to_end_s"]["p50"] / b["alone_end_to_end_s"]["p50"]
            assert b["interference"] == {"interleaved_over_alone": pytest.approx(ratio), "flagged": ratio > 1.1}
            stages = b["stages_ms"]
            for stage in ("text_encoder_ms", "unet_eval_ms", "scheduler_step_ms", "step_ms", "host_step_ms",
                          "vae_decoder_ms", "unet_ms_per_step", "overhead_ms_per_step"):
                assert set(stages[stage]) == STAT_KEYS, (name, stage)
            # the request's time, split: UNet per step is every UNet call (PNDM: steps + 1) over the steps
            assert stages["unet_ms_per_step"]["min"] > 0 and stages["overhead_ms_per_step"]["min"] > 0, name
            assert b["memory"]["peak_bytes"] > 0
        assert set(r["speedup_vs_baseline"]["1"]) == set(r["contenders"])
    assert r["speedup_vs_baseline"]["1"]["diffusers"] == 1.0
    assert r["interference"] == {"limit": 1.1, "flagged": {
        n: [int(b) for b, f in c["batches"].items() if f["interference"]["flagged"]]
        for n, c in r["contenders"].items() if any(f["interference"]["flagged"] for f in c["batches"].values())}}
    assert r["contenders"]["diffusers"]["dtype"] == COMPUTE
    assert r["contenders"]["sdtrt-torch"]["compute_dtype"] == COMPUTE


def test_quality_against_diffusers_fp32(short_result):
    q = {n: c["quality"] for n, c in short_result["contenders"].items()}
    if CUDA:  # fp16 against the fp32 reference: test_seed_parity_fp16_graphs' tolerance
        assert q["diffusers"]["max_abs_diff"] <= 12
        fp16, fp32 = ("diffusers", "sdtrt-torch"), RAN - {"diffusers", "sdtrt-torch"}
    else:
        assert q["diffusers"] == {"psnr_db": None, "max_abs_diff": 0}  # it is the reference
        fp16, fp32 = (), RAN - {"diffusers"}
    for name in fp32:  # fp32 graphs: the same image up to rounding
        assert q[name]["max_abs_diff"] <= 2, name
        assert q[name]["psnr_db"] is None or q[name]["psnr_db"] > 40, name
    for name in fp16:
        assert q[name]["max_abs_diff"] <= 12, name
        assert q[name]["psnr_db"] is None or q[name]["psnr_db"] > 30, name


def test_reports(short_result, tmp_path):
    paths = write_reports(short_result, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert all(p.parent == tmp_path and p.stem == paths[0].stem for p in paths)
    assert paths[0].stem.startswith(_report_prefix())
    assert json.loads(paths[0].read_text()) == short_result
    md = paths[1].read_text()
    assert md.startswith(f"# sdtrt benchmark: {_report_prefix()}")
    for text in ("## End to end, batch 1", "## Alone vs interleaved", "## Per stage, batch 1", "## Throughput",
                 "## Memory", "| UNet per step | rest per step (overhead) |",
                 f"![latency and throughput]({paths[2].name})"):
        assert text in md
    for name in RAN:  # one row per contender that ran, with its engine and precision
        assert f"| {name} | {ENGINE_LABELS[name]} |" in md, name
        for b in ("1", "2"):  # and one alone-vs-interleaved row per batch size
            f = short_result["contenders"][name]["batches"][b]
            assert (f"| {name} | {b} | {f['alone_end_to_end_s']['p50']:.3g} | {f['end_to_end_s']['p50']:.3g} | "
                    f"{f['interference']['interleaved_over_alone']:.2f}x |") in md, (name, b)
    with Image.open(paths[2]) as im:
        im.verify()
    with Image.open(paths[2]) as im:
        assert im.format == "PNG" and im.size[0] > 800


def test_contender_not_available_is_skipped_with_reason(sd1_workdir_fp32):
    # never runnable on this workdir: on CPU for want of CUDA graphs, on a GPU for want of engines (or TensorRT)
    r = run_bench(sd1_workdir_fp32, BenchSpec(contenders=("sdtrt-torch", "sdtrt-tensorrt-graph"), steps=1, runs=1,
                                              warmup=1, batch_sizes=(1,), height=64, width=64, threads=1,
                                              reference_device="none"), progress=False)
    assert set(r["contenders"]) == {"sdtrt-torch"}
    reasons = {f"no TensorRT engines are built (run `sdtrt build {sd1_workdir_fp32}`)"} if CUDA else \
        {"CUDA graphs need an NVIDIA GPU"}
    assert set(r["skipped"]) == {"sdtrt-tensorrt-graph"} and r["skipped"]["sdtrt-tensorrt-graph"] in reasons
    assert r["baseline"] is None and r["speedup_vs_baseline"] == {} and r["reference"] is None
    assert r["contenders"]["sdtrt-torch"]["quality"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"contenders": ("diffusers", "nope")}, "unknown contender(s) nope"),
    ({"batch_sizes": (1, 0)}, "batch sizes must be positive integers"),
    ({"height": 60}, "height must be a multiple of 8"),
    ({"runs": 0}, "runs must be an integer >= 1"),
    ({"reference_device": "tpu"}, "reference device must be one of"),
])
def test_spec_errors(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchSpec(**kwargs)


def test_psnr():
    import numpy as np

    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255
    assert psnr(a, a) == {"psnr_db": None, "max_abs_diff": 0}
    got = psnr(b, a)
    assert got["max_abs_diff"] == 255 and got["psnr_db"] == pytest.approx(10 * np.log10(48))


def test_reports_of_a_gpu_shaped_result(short_result, tmp_path):
    """The writers on what a GPU run returns (a graph contender's UNet and scheduler times are not observable),
    checked here because GPU sessions are rare."""
    import copy

    r = copy.deepcopy(short_result)
    r["device"] = "cuda"
    r["environment"].update(cuda="13.0", gpu={"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30,
                                              "capability": "9.0", "multiprocessors": 132, "driver": "580.159.04",
                                              "cudnn": 91000})
    graph = copy.deepcopy(r["contenders"]["sdtrt-torch"])
    graph.update(cuda_graph=True, device="cuda")
    for b in graph["batches"].values():
        b["stages_ms"]["unet_eval_ms"] = b["stages_ms"]["scheduler_step_ms"] = None
        b["memory"]["device_used_bytes"] = 3 << 30
    r["contenders"]["sdtrt-torch-graph"] = graph
    for per_batch in r["speedup_vs_baseline"].values():
        per_batch["sdtrt-torch-graph"] = per_batch["sdtrt-torch"]
    r["skipped"] = {"sdtrt-tensorrt": "the tensorrt package is not installed"}
    paths = write_reports(r, tmp_path)
    assert paths[0].name.startswith("h100-80gb-hbm3-")
    md = paths[1].read_text()
    assert "NVIDIA H100 80GB HBM3 (driver 580.159.04, CUDA 13.0)" in md
    assert "| sdtrt-torch-graph | torch float32 + CUDA graph |" in md
    assert "- sdtrt-tensorrt: the tensorrt package is not installed" in md
    assert "GPU memory" in md
    with Image.open(paths[2]) as im:
        assert im.format == "PNG"


def test_contender_failing_at_a_batch_size_drops_out(sd1_workdir_fp32, tmp_path, monkeypatch):
    """An engine without a shape (or an OOM) at one batch size ends that contender's run, not the benchmark."""
    from sdtrt.bench.contenders import SdtrtContender
    from sdtrt.errors import ShapeError

    call = SdtrtContender._call

    def no_batch_2(self, batch):
        if batch == 2:
            raise ShapeError("batch 2 is outside the engine's profile")
        return call(self, batch)

    monkeypatch.setattr(SdtrtContender, "_call", no_batch_2)
    # sdtrt-torch: an SdtrtContender that runs on either device (ONNX Runtime needs onnxruntime-gpu on a GPU)
    r = run_bench(sd1_workdir_fp32, BenchSpec(contenders=("diffusers", "sdtrt-torch"), steps=1, runs=1, warmup=1,
                                              batch_sizes=(1, 2), height=64, width=64, threads=1), progress=False)
    assert r["failed"] == {"sdtrt-torch": "failed at batch 2: ShapeError: batch 2 is outside the engine's profile"}
    assert set(r["contenders"]["sdtrt-torch"]["batches"]) == {"1"}
    assert set(r["speedup_vs_baseline"]["2"]) == {"diffusers"}
    paths = write_reports(r, tmp_path)
    assert "- sdtrt-torch: failed at batch 2" in paths[1].read_text()


def test_reports_are_never_overwritten(short_result, tmp_path):
    first = write_reports(short_result, tmp_path)
    before = [p.read_bytes() for p in first]
    second = write_reports(short_result, tmp_path)
    third = write_reports(short_result, tmp_path)
    assert [p.name for p in second] == [f"{first[0].stem}-2{p.suffix}" for p in first]
    assert [p.name for p in third] == [f"{first[0].stem}-3{p.suffix}" for p in first]
    assert [p.read_bytes() for p in first] == before
    assert second[1].read_text().startswith(f"# sdtrt benchmark: {first[0].stem}-2\n")
    assert f"![latency and throughput]({second[2].name})" in second[1].read_text()
    # a stem given by name too, and a lone leftover file of a stem is enough to move on
    (tmp_path / "mine.png").write_bytes(b"")
    assert [p.name for p in write_reports(short_result, tmp_path, stem="mine")] == ["mine-2.json", "mine-2.md",
                                                                                   "mine-2.png"]


def test_summary_shows_every_batch_size(short_result):
    from sdtrt.bench.report import summary_lines

    text = "\n".join(summary_lines(short_result))
    for name, c in short_result["contenders"].items():
        for b in ("1", "2"):
            f = c["batches"][b]
            assert (f"batch {b:>2}: p50 {f['end_to_end_s']['p50']:.3f} s  p90 {f['end_to_end_s']['p90']:.3f} s"
                    in text), (name, b)
            assert f"alone {f['alone_end_to_end_s']['p50']:.3f} s" in text, (name, b)


def test_interference_limit():
    from sdtrt.bench.run import interference

    assert interference(1.0, 1.1) == {"interleaved_over_alone": 1.1, "flagged": False}
    assert interference(2.0, 2.3)["flagged"] and not interference(2.0, 1.0)["flagged"]


def test_a_disturbed_contender_is_flagged_in_the_reports(short_result, tmp_path):
    import copy

    from sdtrt.bench.report import summary_lines

    r = copy.deepcopy(short_result)
    f = r["contenders"]["sdtrt-torch"]["batches"]["2"]
    f["alone_end_to_end_s"]["p50"] = f["end_to_end_s"]["p50"] / 2
    f["interference"] = {"interleaved_over_alone": 2.0, "flagged": True}
    md = write_reports(r, tmp_path)[1].read_text()
    assert "| sdtrt-torch | 2 |" in md and "| 2.00x | **disturbed** |" in md
    assert "DISTURBED (interleaved 200% of alone)" in "\n".join(summary_lines(r))


def test_overhead_per_step_is_the_request_minus_the_models():
    """Per step: UNet = all UNet calls over the steps; the rest = wall time minus text encoder, UNet and VAE."""
    from sdtrt.bench.contenders import Contender

    c = Contender("x", BenchSpec(steps=2), cuda=False)
    c.text.host[:] = [(0.000, 0.001)]
    c.unet.host[:] = [(0.001, 0.003), (0.004, 0.006), (0.0065, 0.0075)]  # PNDM: steps + 1 calls
    c.vae.host[:] = [(0.008, 0.009)]
    got = c._per_step(0.010)
    assert got == {"unet_ms_per_step": pytest.approx(2.5), "overhead_ms_per_step": pytest.approx(1.5)}
    c.unet.reset()  # a replayed CUDA graph: no UNet call is observable
    assert c._per_step(0.010) == {"unet_ms_per_step": None, "overhead_ms_per_step": None}


def test_sdxl_bench_against_diffusers_sdxl_pipeline(sdxl_workdir_fp32, tmp_path):
    """An SDXL WORKDIR benches against diffusers' own StableDiffusionXLPipeline in one run: same image, the
    speed-up is the two p50s of that run, the report has both rows with their PSNR, and the size is the model's
    native one (no height or width given)."""
    short = {k: v for k, v in SHORT.items() if k not in ("height", "width")}
    spec = BenchSpec(contenders=("diffusers", "sdtrt-onnxruntime"), threads=1,
                     **{**short, "batch_sizes": (1,), "runs": 1})  # 2 steps: at 1, guidance 5 vs 7.5 differ by 2 levels
    r = run_bench(sdxl_workdir_fp32, spec, progress=False)
    assert r["checkpoint"]["arch"] == "tiny-sdxl" and r["failed"] == {}
    assert r["spec"]["height"] == r["spec"]["width"] == 64  # tiny-sdxl's default_size, from the manifest
    ran = {"diffusers"} | ({"sdtrt-onnxruntime"} if ORT_RUNS else set())
    assert set(r["contenders"]) == ran
    d = r["contenders"]["diffusers"]
    # guidance passed explicitly: diffusers' SDXL pipeline would otherwise run 5.0 against sdtrt's 7.5
    assert d["pipeline"] == "StableDiffusionXLPipeline" and d["guidance"] == 7.5
    p50 = {n: c["batches"]["1"]["end_to_end_s"]["p50"] for n, c in r["contenders"].items()}
    assert r["speedup_vs_baseline"]["1"] == {n: pytest.approx(p50["diffusers"] / t) for n, t in p50.items()}
    if ORT_RUNS and not CUDA:  # both fp32 on the CPU: the same image as diffusers' SDXL pipeline
        q = r["contenders"]["sdtrt-onnxruntime"]["quality"]
        assert q["max_abs_diff"] <= 2, q
        assert r["contenders"]["diffusers"]["quality"] == {"psnr_db": None, "max_abs_diff": 0}  # it is the reference
    md = next(p for p in write_reports(r, tmp_path, stem="sdxl") if p.suffix == ".md").read_text()
    assert "PSNR vs fp32 (dB)" in md and "tiny-sdxl" in md
    table = md.split("## End to end, batch 1")[1].split("\n## ")[0]  # the headline table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for name in ran:
        cells = [c.strip() for c in rows[name].split("|")]
        assert f"{r['speedup_vs_baseline']['1'][name]:.2f}x" in cells, rows[name]
    assert "Published anchor" not in md  # 64 px, 2 steps: no published figure to compare with
    at_1024 = {**r, "spec": {**r["spec"], "height": 1024, "width": 1024, "steps": 30}}
    assert "Published anchor: TensorRT ≈ 1.47 s end to end on an H100" in markdown(at_1024)
    if ORT_RUNS and not CUDA:
        psnr_db = r["contenders"]["sdtrt-onnxruntime"]["quality"]["psnr_db"]
        want = "identical" if psnr_db is None else f"{psnr_db:.1f}"
        assert want in [c.strip() for c in rows["sdtrt-onnxruntime"].split("|")]


def test_diffusers_pipeline_from_single_file_checkpoint(tiny_sdxl_dir, tiny_sdxl_refiner_dir, tmp_path):
    """A single-file checkpoint (loaded by sdtrt) runs under diffusers' pipeline for its family: an SDXL file makes
    the folder's image in the diffusers contender; SDXL keeps force_zeros_for_empty_prompt; the refiner (img2img
    only) is refused in one line."""
    import shutil

    import diffusers

    from sdtrt.bench.contenders import DiffusersContender, pipeline_from_checkpoint
    from sdtrt.checkpoint.ldm_layout import save_single_file
    from sdtrt.checkpoint.loader import load_checkpoint

    for tok in ("tokenizer", "tokenizer_2"):  # tiny-sdxl's tokenizers are not CLIP's: they go beside the file
        shutil.copytree(tiny_sdxl_dir / tok, tmp_path / tok)
    save_single_file(load_checkpoint(tiny_sdxl_dir), tmp_path / "tiny-sdxl.safetensors")
    spec = BenchSpec(steps=2, height=64, width=64)
    images = []
    for src in (tiny_sdxl_dir, tmp_path / "tiny-sdxl.safetensors"):
        c = DiffusersContender("diffusers", spec, False, src, "euler", dtype=torch.float32)
        c.load()
        assert c.info["pipeline"] == "StableDiffusionXLPipeline"
        images.append(c.generate(1).images.astype(int))
        c.close()
    assert abs(images[0] - images[1]).max() <= 2

    sched = diffusers.EulerDiscreteScheduler()
    pipe = pipeline_from_checkpoint(load_checkpoint(tiny_sdxl_dir), sched)
    assert type(pipe) is diffusers.StableDiffusionXLPipeline and pipe.scheduler is sched
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert pipe.config.force_zeros_for_empty_prompt is True
    with pytest.raises(UsageError, match="sdxl-refiner checkpoint is not benched"):
        pipeline_from_checkpoint(load_checkpoint(tiny_sdxl_refiner_dir), sched)


def test_size_defaults_to_the_models_native_size():
    spec = BenchSpec(steps=2)
    assert spec.height is None and spec.width is None
    assert spec.at_native_size(1024).height == spec.at_native_size(1024).width == 1024  # SDXL
    assert BenchSpec(height=512, width=768).at_native_size(1024) == BenchSpec(height=512, width=768)
    with pytest.raises(UsageError, match="height must be a multiple of 8"):
        BenchSpec(height=1020)


def test_published_anchor_only_for_its_model_size_and_steps():
    r = {"spec": {"height": 1024, "width": 1024, "steps": 30}, "checkpoint": {"family": "sdxl"}}
    assert "1.47 s" in anchor_line(r) and "SDXL TensorRT" not in anchor_line(r)
    assert "stable-diffusion-xl-1.0-tensorrt model card" in anchor_line(r)
    for spec, family in (({"height": 1024, "width": 1024, "steps": 50}, "sdxl"),
                         ({"height": 1024, "width": 768, "steps": 30}, "sdxl"),
                         ({"height": 1024, "width": 1024, "steps": 30}, "sd1")):
        assert anchor_line({"spec": spec, "checkpoint": {"family": family}}) is None
