"""The pipeline against diffusers' StableDiffusionPipeline: same checkpoint, seed, scheduler, steps -> same image."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.runtime.pipeline import NonFiniteError, Pipeline
from sdtrt.runtime.png import save_png
from tests.a1111_infotext import parse_generation_parameters

PROMPT = "a photo of a cat"

# our name -> (diffusers class name, config overrides)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


@pytest.fixture(scope="module")
def reference(tiny_sd1_dir):
    """diffusers' own pipeline on the tiny checkpoint, fp32 on CPU."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)

    def embed(text: str, clip_skip: int) -> torch.Tensor:
        # diffusers' clip_skip path reaches for text_encoder.text_model, which transformers 5 removed; this is
        # the same computation: hidden state (clip_skip) layers from the end, through the final LayerNorm.
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = pipe.text_encoder(ids, output_hidden_states=True)
            return pipe.text_encoder.final_layer_norm(out.hidden_states[-clip_skip])

    @functools.cache
    def run(scheduler: str, steps: int = 6, seed: int = 0, guidance: float = 7.5, batch: int = 1,
            negative: str = "", clip_skip: int = 1) -> np.ndarray:
        cls, overrides = DIFFUSERS_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls).from_config({**base, **overrides})
        text = {"prompt": PROMPT, "negative_prompt": negative or None}
        if clip_skip != 1:
            text = {"prompt_embeds": embed(PROMPT, clip_skip), "negative_prompt_embeds": embed(negative, clip_skip)}
        out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), num_images_per_prompt=batch, height=64, width=64,
                   output_type="np")
        return (out.images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding

    return run


@pytest.fixture(scope="module")
def pipes(sd1_workdir_fp32, sd1_workdir_fp16):
    return {
        "onnxruntime-fp32": Pipeline.load(sd1_workdir_fp32, backend="onnxruntime"),
        "torch": Pipeline.load(sd1_workdir_fp32, backend="torch"),
        "onnxruntime-fp16": Pipeline.load(sd1_workdir_fp16, backend="onnxruntime"),
    }


def _images(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images])


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


# Every scheduler on ONNX Runtime; the torch backend runs the same function, so a deterministic, a multistep and a
# stochastic scheduler suffice there.
@pytest.mark.parametrize(
    "backend, scheduler",
    [("onnxruntime-fp32", s) for s in DIFFUSERS_SCHEDULERS] + [("torch", s) for s in ("ddim", "dpmpp_2m_karras", "euler_a")],
)
def test_seed_parity_with_diffusers(reference, pipes, scheduler, backend):
    ref = reference(scheduler)
    got = _images(pipes[backend](PROMPT, num_inference_steps=6, seed=0, scheduler=scheduler))
    assert got.shape == ref.shape == (1, 64, 64, 3)
    assert ref.std() > 5  # a real image, not a flat one that would match anything
    worst, mean = _levels(got, ref)
    max_worst, max_mean = _tolerance(pipes[backend])
    assert worst <= max_worst and mean < max_mean, (worst, mean)


# (worst, mean) level differences from diffusers' fp32 image: fp32 compute, and fp16 compute
FP32_LEVELS, FP16_LEVELS = (2, 0.05), (12, 1.5)


def _tolerance(pipe: Pipeline) -> tuple[int, float]:
    """The torch backend computes in fp16 on CUDA (whatever the export's precision): the fp16 tolerance there."""
    return FP16_LEVELS if getattr(pipe.backend, "dtype", torch.float32) == torch.float16 else FP32_LEVELS


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_karras", "euler_a"])
def test_seed_parity_fp16_graphs(reference, pipes, scheduler):
    ref = reference(scheduler)
    got = _images(pipes["onnxruntime-fp16"](PROMPT, num_inference_steps=6, seed=0, scheduler=scheduler))
    worst, mean = _levels(got, ref)
    assert worst <= FP16_LEVELS[0] and mean < FP16_LEVELS[1], (worst, mean)


def test_other_seed_other_image(pipes):
    a = _images(pipes["onnxruntime-fp32"](PROMPT, num_inference_steps=3, seed=1))
    b = _images(pipes["onnxruntime-fp32"](PROMPT, num_inference_steps=3, seed=2))
    assert _levels(a, b)[1] > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance": 1.0},  # no CFG: the UNet runs on B rows
        {"batch": 2},
        {"negative": "blurry"},
        {"clip_skip": 2},
        {"seed": 1234, "steps": 3},
    ],
    ids=["no-cfg", "batch2", "negative", "clip-skip-2", "seed"],
)
def test_options_parity_with_diffusers(reference, pipes, kwargs):
    ref = reference("ddim", **kwargs)
    got = _images(pipes["onnxruntime-fp32"](
        PROMPT, num_inference_steps=kwargs.get("steps", 6), seed=kwargs.get("seed", 0),
        guidance_scale=kwargs.get("guidance", 7.5), num_images_per_prompt=kwargs.get("batch", 1),
        negative_prompt=kwargs.get("negative", ""), clip_skip=kwargs.get("clip_skip", 1), scheduler="ddim",
    ))
    worst, mean = _levels(got, ref)
    assert got.shape == ref.shape
    assert worst <= 2 and mean < 0.05, (worst, mean)


def test_v_prediction_parity(tiny_sd2_dir, sd2_workdir_fp32):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd2_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ref = pipe(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(3), height=64, width=64,
               output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    ours = Pipeline.load(sd2_workdir_fp32, backend="onnxruntime")
    assert ours.default_scheduler == "ddim"
    got = _images(ours(PROMPT, num_inference_steps=5, seed=3))
    worst, mean = _levels(got, ref)
    assert worst <= 2 and mean < 0.05, (worst, mean)


def test_onnxruntime_equals_torch(pipes):
    a = pipes["onnxruntime-fp32"](PROMPT, num_inference_steps=4, seed=5)
    b = pipes["torch"](PROMPT, num_inference_steps=4, seed=5)
    worst, _ = _levels(_images(a), _images(b))
    # both fp32: the same image up to a level; the torch backend in fp16 (on CUDA): the fp16 tolerance
    assert worst <= (1 if _tolerance(pipes["torch"]) == FP32_LEVELS else FP16_LEVELS[0])
    device = pipes["onnxruntime-fp32"].device.type  # ONNX Runtime's CUDA EP where onnxruntime-gpu is installed
    assert a.backend == f"onnxruntime-{device}" and b.backend == "torch"


def test_text_embeddings_are_cached(pipes):
    pipe = pipes["onnxruntime-fp32"]
    calls = []
    runner = pipe.text_encoders["text_encoder"].runner
    original = runner.run
    runner.run = lambda: (calls.append(1), original())[1]
    try:
        pipe("a cached prompt", negative_prompt="a cached negative", num_inference_steps=1, seed=0)
        first = len(calls)
        pipe("a cached prompt", negative_prompt="a cached negative", num_inference_steps=1, seed=1)
    finally:
        runner.run = original
    assert first == 2  # prompt and negative prompt, once each
    assert len(calls) == 2  # the second request hits the cache


def test_timings_and_infotext(pipes):
    r = pipes["onnxruntime-fp32"](PROMPT, negative_prompt="ugly", num_inference_steps=2, seed=7,
                                  scheduler="dpmpp_2m_karras", guidance_scale=5)
    assert set(r.timings) == {"text_encoder", "denoise", "vae_decoder", "total"}
    # the stages are consecutive spans of one clock: they add up to the total
    stages = r.timings["text_encoder"] + r.timings["denoise"] + r.timings["vae_decoder"]
    assert r.timings["total"] == pytest.approx(stages, rel=1e-9, abs=1e-9)
    assert r.infotexts[0].splitlines()[:2] == [PROMPT, "Negative prompt: ugly"]
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 7, Size: 64x64" in r.infotexts[0]


def _expected_parameters(pipe: Pipeline, **request) -> dict[str, str]:
    """What A1111 must read back from an image made with ``request`` (the keys it takes into its UI)."""
    expected = {
        "Prompt": request["prompt"],
        "Negative prompt": request.get("negative_prompt", ""),
        "Steps": str(request["steps"]),
        "Sampler": request["sampler"],
        "CFG scale": request["cfg"],
        "Seed": str(request["seed"]),
        "Size-1": str(request["width"]),  # A1111: Size-1 is the width, Size-2 the height
        "Size-2": str(request["height"]),
        "Model": pipe.model_name,
        "Clip skip": str(request.get("clip_skip", 1)),
    }
    if "strength" in request:
        expected["Denoising strength"] = request["strength"]
    return expected


@pytest.mark.parametrize(
    "request_",
    [
        dict(prompt="a tall tower", negative_prompt="fog, rain", steps=1, sampler="Euler a", scheduler="euler_a",
             cfg="5.5", guidance=5.5, seed=11, width=48, height=64, clip_skip=2),
        dict(prompt="a wide field", steps=2, sampler="DDIM", scheduler="ddim", cfg="7", guidance=7, seed=3,
             width=72, height=56, clip_skip=1, batch=2),
    ],
    ids=["portrait-clip-skip-2", "landscape-batch"],
)
def test_infotext_reads_back_as_the_request_in_a1111(pipes, request_):
    pipe = pipes["onnxruntime-fp32"]
    r = pipe(request_["prompt"], negative_prompt=request_.get("negative_prompt", ""),
             num_inference_steps=request_["steps"], scheduler=request_["scheduler"], guidance_scale=request_["guidance"],
             seed=request_["seed"], width=request_["width"], height=request_["height"],
             clip_skip=request_["clip_skip"], num_images_per_prompt=request_.get("batch", 1))
    assert r.images[0].size == (request_["width"], request_["height"])  # PIL: (W, H)
    expected = _expected_parameters(pipe, **request_)
    for pos, text in enumerate(r.infotexts):
        parsed = parse_generation_parameters(text)
        assert {k: parsed.get(k) for k in expected} == expected, text
        if request_.get("batch", 1) > 1:
            assert (parsed["Batch size"], parsed["Batch pos"]) == (str(request_["batch"]), str(pos))
    if request_["clip_skip"] != 1:  # written out, not left to the reader's default
        assert f"Clip skip: {request_['clip_skip']}" in r.infotexts[0]


def test_png_parameters_are_the_requests_settings(pipes, tmp_path):
    from PIL import Image

    r = pipes["onnxruntime-fp32"](PROMPT, negative_prompt="dull", num_inference_steps=1, seed=5, scheduler="euler",
                                  guidance_scale=6, width=56, height=48, clip_skip=2)
    path = save_png(r.images[0], tmp_path / "a.png", r.infotexts[0])
    with Image.open(path) as im:  # the tEXt chunk as any PNG reader sees it, not through sdtrt.runtime.png
        assert im.format == "PNG" and im.size == (56, 48)
        text = im.text["parameters"]
        assert np.array_equal(np.asarray(im), np.asarray(r.images[0]))
    parsed = parse_generation_parameters(text)
    expected = _expected_parameters(pipes["onnxruntime-fp32"], prompt=PROMPT, negative_prompt="dull", steps=1,
                                    sampler="Euler", cfg="6", seed=5, width=56, height=48, clip_skip=2)
    assert {k: parsed.get(k) for k in expected} == expected, text
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left


def test_nan_latents_are_reported(pipes, monkeypatch):
    pipe = pipes["onnxruntime-fp32"]
    runner = pipe._unet
    original = runner.run

    def poisoned():
        original()
        runner.outputs["latent"].fill_(float("nan"))

    monkeypatch.setattr(runner, "run", poisoned)
    with pytest.raises(NonFiniteError, match="denoising loop produced NaN/inf latents"):
        pipe(PROMPT, num_inference_steps=2, seed=0)


def test_nan_pixels_are_reported(pipes, monkeypatch):
    pipe = pipes["onnxruntime-fp32"]
    runner = pipe._decoder
    original = runner.run

    def overflowing():
        original()
        runner.outputs["finite"].fill_(False)

    monkeypatch.setattr(runner, "run", overflowing)
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN/inf pixels.*--vae-precision fp32"):
        pipe(PROMPT, num_inference_steps=1, seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 60}, "height must be a multiple of 8"),
        ({"width": 4096}, "width must be a multiple of 8 between 8 and 2048"),
        ({"num_inference_steps": 0}, "steps must be an integer between 1 and 1000"),
        ({"num_images_per_prompt": 0}, "batch must be an integer between 1 and 64"),
        ({"guidance_scale": -1}, "guidance must be a number between 0 and 100"),
        ({"seed": -5}, r"seed must be -1 \(random\) or a non-negative integer"),
        ({"clip_skip": 3}, "clip-skip must be 1"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'; choose one of ddim, pndm"),
    ],
)
def test_bad_requests(pipes, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipes["onnxruntime-fp32"](PROMPT, **kwargs)


def test_long_prompt_is_truncated_with_a_warning(pipes, caplog):
    pipe = pipes["onnxruntime-fp32"]
    prompt = " ".join(["dog"] * 200)  # a prompt no other test embeds: the text encoder must run
    fed = []
    runner = pipe.text_encoders["text_encoder"].runner
    run = runner.run
    runner.run = lambda: (fed.append(runner.inputs["input_ids"].clone()), run())[1]
    try:
        with caplog.at_level("WARNING"):
            pipe(prompt, num_inference_steps=1, guidance_scale=1.0, prompt_syntax="plain")
    finally:
        runner.run = run
    assert "truncated to 77" in caplog.text
    # exactly what diffusers feeds: the tokenizer's max_length truncation, which keeps bos ... eos
    want = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert [ids.flatten().tolist() for ids in fed] == [want]
    assert want[-1] == pipe.tokenizer.eos_token_id


def test_clip_skip_is_part_of_the_text_cache_key(reference, pipes):
    """Alone, in a fresh pipeline: the last-layer embedding of a prompt must not answer for its clip-skip-2 one."""
    pipe = Pipeline.load(pipes["onnxruntime-fp32"].workdir, backend="onnxruntime")  # an empty text cache
    pipe(PROMPT, num_inference_steps=1, seed=0, scheduler="ddim", clip_skip=1)  # caches PROMPT and "" at layer -1
    got = _images(pipe(PROMPT, num_inference_steps=6, seed=0, scheduler="ddim", clip_skip=2))
    worst, mean = _levels(got, reference("ddim", clip_skip=2))
    assert worst <= 2 and mean < 0.05, (worst, mean)


def test_runner_buffers_are_kept_per_shape(pipes):
    """A captured graph reads fixed addresses: shape A, then B, then A again must give A's tensors back."""
    unet = pipes["onnxruntime-fp32"]._unet
    unet.activate({"2B": 2, "H": 8, "W": 8, "77T": 77})
    a = unet.inputs["encoder_hidden_states"]
    unet.activate({"2B": 1, "H": 8, "W": 8, "77T": 77})
    assert unet.inputs["encoder_hidden_states"].shape[0] == 1
    unet.activate({"2B": 2, "H": 8, "W": 8, "77T": 77})
    assert unet.inputs["encoder_hidden_states"] is a


def test_alternating_shapes_keep_their_prompts(pipes):
    pipe = pipes["onnxruntime-fp32"]
    first = _images(pipe("a red apple", num_inference_steps=2, seed=0))
    pipe("a blue car", num_inference_steps=2, seed=0, height=72, width=72)
    again = _images(pipe("a red apple", num_inference_steps=2, seed=0))
    assert np.array_equal(first, again)


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def img2img_reference(tiny_sd1_dir):
    """diffusers' StableDiffusionImg2ImgPipeline on the tiny checkpoint: (scheduler, strength, batch) -> uint8."""
    import diffusers

    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd1_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref_pipe.set_progress_bar_config(disable=True)
    base = dict(ref_pipe.scheduler.config)

    def run(init_image, scheduler: str, strength: float, batch: int) -> np.ndarray:
        cls, overrides = DIFFUSERS_SCHEDULERS[scheduler]
        ref_pipe.scheduler = getattr(diffusers, cls).from_config({**base, **overrides})
        ref = ref_pipe(PROMPT, image=init_image, strength=strength, num_inference_steps=10,
                       num_images_per_prompt=batch, generator=torch.Generator().manual_seed(4), output_type="np").images
        return (ref * 255).round().astype(np.uint8)

    return run


# Every scheduler, the multistep solvers (warm-up restarted at the first remaining step) at several strengths.
# 10 * 0.75 = 7.5: diffusers runs int(7.5) = 7 steps; a rounded start index would run 8.
IMG2IMG_CASES = (
    [(s, 0.75, b) for s in DIFFUSERS_SCHEDULERS for b in (1, 2)]
    + [(s, strength, 1) for s in ("pndm", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc") for strength in (0.3, 0.55, 1.0)]
)


@pytest.mark.parametrize("scheduler, strength, batch", IMG2IMG_CASES)
def test_img2img_parity_with_diffusers(img2img_reference, pipes, init_image, scheduler, strength, batch):
    ref = img2img_reference(init_image, scheduler, strength, batch)
    result = pipes["onnxruntime-fp32"](PROMPT, image=init_image, strength=strength, num_inference_steps=10, seed=4,
                                       scheduler=scheduler, num_images_per_prompt=batch)
    got = _images(result)
    assert got.shape == ref.shape == (batch, 64, 64, 3)
    worst, mean = _levels(got, ref)
    assert worst <= 2 and mean < 0.05, (worst, mean)
    assert f"Denoising strength: {strength:g}" in result.infotexts[0]
    if batch > 1 or strength != 0.75:
        return
    # the image matters: another init image gives another result
    other = _images(pipes["onnxruntime-fp32"](PROMPT, image=np.zeros((64, 64, 3), np.uint8), strength=0.75,
                                              num_inference_steps=10, seed=4, scheduler=scheduler))
    assert _levels(other, got[:1])[1] > 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 0.05, "num_inference_steps": 10}, "leaves no step to run"),
        ({"strength": 0.09, "num_inference_steps": 10}, "leaves no step to run"),  # int(0.9) = 0; round would run 1
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
    ],
)
def test_img2img_bad_requests(pipes, init_image, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipes["onnxruntime-fp32"](PROMPT, image=init_image, **{"scheduler": "ddim", **kwargs})
