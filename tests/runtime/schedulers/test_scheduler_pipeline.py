"""The new schedulers through the whole pipeline, against diffusers' StableDiffusion(Img2Img)Pipeline on the tiny
checkpoint: same seed, same image (Heun: two UNet evaluations a step but the last; DPM++ 2M SDE and DDIM with eta:
step noise drawn before the loop from the request's generator, in diffusers' order)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.schedulers import DIFFUSERS_CLASSES, get_scheduler
from sdtrt.runtime.schedulers.a1111 import eta_of

PROMPT = "a photo of a cat"
FP32_LEVELS = (2, 0.05)  # (worst, mean) level differences from diffusers' fp32 image, as tests/runtime/test_pipeline
NEW = ("heun", "heun_karras", "euler_karras", "lms_karras", "dpmpp_2m_exponential", "dpmpp_2m_sde",
       "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential", "ddim:eta=0.5", "ddim:eta=1.0")


def _diffusers_scheduler(name: str, base: dict):
    import diffusers

    overrides = {k: v for k, v in get_scheduler(name).overrides.items() if k != "eta"}
    return getattr(diffusers, DIFFUSERS_CLASSES[name.split(":")[0]]).from_config({**base, **overrides})


@pytest.fixture(scope="module")
def reference(tiny_sd1_dir):
    import diffusers

    pipes = {}
    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionImg2ImgPipeline):
        pipes[cls.__name__] = cls.from_pretrained(tiny_sd1_dir, local_files_only=True, safety_checker=None,
                                                  requires_safety_checker=False)
        pipes[cls.__name__].set_progress_bar_config(disable=True)
    base = dict(pipes["StableDiffusionPipeline"].scheduler.config)  # the checkpoint's own (PNDM), read once

    @functools.cache
    def run(name: str, strength: float | None = None, steps: int = 6, seed: int = 0) -> np.ndarray:
        pipe = pipes["StableDiffusionPipeline" if strength is None else "StableDiffusionImg2ImgPipeline"]
        pipe.scheduler = _diffusers_scheduler(name, base)
        kwargs = {"eta": eta_of(name)} if name.startswith("ddim") else {}
        if strength is not None:
            kwargs.update(image=_init_image(), strength=strength)
        else:
            kwargs.update(height=64, width=64)
        out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np",
                   **kwargs)
        return (out.images * 255).round().astype(np.uint8)

    return run


@functools.cache
def _init_image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(sd1_workdir_fp32):
    return Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")


def _images(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images])


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert ref.std() > 5  # a real image, not a flat one that would match anything
    d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert d.max() <= FP32_LEVELS[0] and d.mean() < FP32_LEVELS[1], (int(d.max()), float(d.mean()))


@pytest.mark.parametrize("name", NEW)
def test_txt2img_parity_with_diffusers(reference, pipe, name):
    _assert_close(_images(pipe(PROMPT, num_inference_steps=6, seed=0, scheduler=name)), reference(name))


def test_stochastic_schedulers_use_the_seed(reference, pipe):
    """Step noise comes from the request's generator: another seed, another image; eta=0 is plain DDIM."""
    a = _images(pipe(PROMPT, num_inference_steps=6, seed=0, scheduler="dpmpp_2m_sde"))
    b = _images(pipe(PROMPT, num_inference_steps=6, seed=1, scheduler="dpmpp_2m_sde"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1
    plain = _images(pipe(PROMPT, num_inference_steps=6, seed=0, scheduler="ddim"))
    assert np.abs(plain.astype(int) - reference("ddim:eta=0.5").astype(int)).max() > 2  # eta changes the image


# img2img: Heun starts at evaluation 2 * start (its order is 2); the VP-sigma names (DPM++ 2M SDE, DPM++ 2M
# Exponential) and DDIM with eta are noised by schedulers.add_noise_coefs (sdtrt.runtime.img2img.noise_coefs).
IMG2IMG = [("heun", 0.75), ("heun", 0.5), ("heun_karras", 0.6), ("euler_karras", 0.75), ("lms_karras", 0.5),
           ("dpmpp_2m_sde", 0.75), ("dpmpp_2m_sde_karras", 0.5), ("dpmpp_2m_exponential", 0.6), ("ddim:eta=0.5", 0.75)]


@pytest.mark.parametrize(("name", "strength"), IMG2IMG)
def test_img2img_parity_with_diffusers(reference, pipe, name, strength):
    got = _images(pipe(PROMPT, image=_init_image(), strength=strength, num_inference_steps=6, seed=0, scheduler=name))
    _assert_close(got, reference(name, strength))
