"""The exported fp32 graphs against diffusers' and transformers' own modules, not against our export wrappers.

test_export.py validates each ONNX graph against the wrapper module it was traced from, so a bug in a wrapper
(the decoder's clamp dropped, the latent scaled the wrong way, another hidden layer) would pass there. Here the
reference is the library's public path, with the scaling and pixel mapping written out by hand as
StableDiffusionPipeline does them: ``vae.decode(latents / scaling_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)``,
``* 255``, round, NHWC; ``text_encoder(ids, output_hidden_states=True)``; ``vae.encode(2 * x / 255 - 1).latent_dist``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch


def _session(workdir: Path, component: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(workdir / "onnx" / f"{component}.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def vae(tiny_sd1_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd1_dir, subfolder="vae").eval()


def test_vae_decoder_is_diffusers_decode_and_postprocess(sd1_workdir_fp32, vae):
    # (B, 4, H/8, W/8) scaled latents, as the loop ends with them; 3x wider than N(0, I) so that part of the
    # decoded image leaves [-1, 1] and the clamp matters
    latent = torch.randn((2, 4, 8, 10), generator=torch.Generator().manual_seed(0)) * 3.0
    with torch.no_grad():
        decoded = vae.decode(latent / vae.config.scaling_factor).sample  # (B, 3, H, W), ideally in [-1, 1]
    assert ((decoded < -1) | (decoded > 1)).float().mean() > 0.01, "the test needs pixels outside [-1, 1]"
    want = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()  # (B, H, W, 3)

    image, finite = _session(sd1_workdir_fp32, "vae_decoder").run(None, {"latent": latent.numpy()})
    assert image.dtype == np.uint8 and image.shape == want.shape == (2, 64, 80, 3)
    assert finite.tolist() == [True, True]
    diff = np.abs(image.astype(np.int16) - want.astype(np.int16))
    # fp32 kernels of two libraries: a value at a .5 boundary may round either way, nothing more
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_text_encoder_is_transformers_hidden_states(sd1_workdir_fp32, tiny_sd1_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd1_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd1_dir, subfolder="text_encoder").eval()
    ids = tokenizer(["a photo of a cat", "an astronaut riding a horse on the moon"], padding="max_length",
                    max_length=77, truncation=True, return_tensors="pt").input_ids  # (2, 77)
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        # diffusers' encode_prompt with clip_skip=1 (A1111's "Clip skip: 2"): the layer before the last, then the
        # final LayerNorm (the module is encoder.final_layer_norm in transformers 5, .text_model's in 4.x)
        final_ln = getattr(encoder, "text_model", encoder).final_layer_norm
        want_last = out.last_hidden_state.numpy()
        want_penultimate = final_ln(out.hidden_states[-2]).numpy()
    assert not np.allclose(want_last, want_penultimate, atol=1e-3)  # the two outputs can tell layers apart

    last, penultimate = _session(sd1_workdir_fp32, "text_encoder").run(
        ["last_hidden_state", "penultimate_hidden_state"], {"input_ids": ids.numpy().astype(np.int32)})
    np.testing.assert_allclose(last, want_last, rtol=1e-4, atol=1e-4 * np.abs(want_last).max())
    np.testing.assert_allclose(penultimate, want_penultimate, rtol=1e-4, atol=1e-4 * np.abs(want_penultimate).max())


def test_vae_encoder_is_diffusers_latent_dist(sd1_workdir_fp32, vae):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)  # (B, H, W, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # diffusers' preprocess: [-1, 1] NCHW
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    s = vae.config.scaling_factor
    want_mean, want_std = (dist.mean * s).numpy(), (dist.std * s).numpy()  # (B, 4, H/8, W/8)

    mean, std = _session(sd1_workdir_fp32, "vae_encoder").run(["latent_mean", "latent_std"], {"image": pixels})
    assert mean.shape == want_mean.shape == (2, 4, 8, 6)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-4 * np.abs(want_mean).max())
    np.testing.assert_allclose(std, want_std, rtol=1e-4, atol=1e-4 * np.abs(want_std).max())
