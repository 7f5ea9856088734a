"""A1111 prompt rules in the pipeline: the image diffusers makes from the embeddings A1111's rule gives.

The reference embeddings are built here by hand from the rule (fragments tokenized apart, BOS + tokens + EOS padded
to 77, hidden states times the weights and rescaled to the original mean), with diffusers' own tokenizer and text
encoder, then handed to diffusers' StableDiffusionPipeline as ``prompt_embeds``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest

STEPS = 4


@pytest.fixture(scope="module")
def ckpt(tiny_sd1_dir, tmp_path_factory):
    """tiny-sd1 with a trained-looking final LayerNorm bias. Random init leaves it 0, so every token's hidden state
    has mean 0 over its channels and the chunk mean A1111 rescales to is rounding noise (a ratio of two ~1e-8
    numbers); CLIP's trained bias keeps that mean well away from 0, as it is here."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1-ln"
    shutil.copytree(tiny_sd1_dir, path)
    weights = path / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("final_layer_norm.bias"))
    tensors[key] = 0.2 + 0.3 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(1))
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def ref_pipe(ckpt):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(ckpt, tmp_path_factory):
    from tests.conftest import _export

    return Pipeline.load(_export(ckpt, tmp_path_factory.mktemp("wd") / "sd1-ln", "fp32"), backend="onnxruntime")


def a1111_embeds(ref_pipe, fragments: list[tuple[str, float]]) -> torch.Tensor:
    """(1, 77, C): A1111's rule for one chunk, written out."""
    tok = ref_pipe.tokenizer
    ids, weights = [tok.bos_token_id], [1.0]
    for text, weight in fragments:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids += [tok.eos_token_id]
    weights += [1.0]
    ids += [tok.pad_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = ref_pipe.text_encoder(torch.tensor([ids]))[0]  # (1, 77, C)
    weighted = z * torch.tensor(weights)[None, :, None]
    return weighted * (z.mean() / weighted.mean())


def reference_image(ref_pipe, **text) -> np.ndarray:
    out = ref_pipe(**text, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), height=64, width=64,
                   output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def ours(pipe, prompt: str, **kw) -> np.ndarray:
    result = pipe(prompt, num_inference_steps=STEPS, seed=0, scheduler="ddim", **kw)
    return np.stack([np.asarray(im) for im in result.images])


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()) <= 2 and float(d.mean()) < 0.05


def test_emphasis_gives_diffusers_image_from_a1111_embeddings(ref_pipe, pipe):
    fragments = [("a photo of a ", 1.0), ("cat", 1.3), (" on a ", 1.0), ("mat", 1 / 1.1), (", sunny", 1.21)]
    empty = a1111_embeds(ref_pipe, [("", 1.0)])
    ref = reference_image(ref_pipe, prompt_embeds=a1111_embeds(ref_pipe, fragments), negative_prompt_embeds=empty)
    got = ours(pipe, "a photo of a (cat:1.3) on a [mat]((, sunny))")
    assert _close(got, ref)
    # the weights matter: the unweighted text is another image
    plain = reference_image(ref_pipe, prompt="a photo of a cat on a mat, sunny")
    assert not _close(got, plain)


def test_unit_weights_and_plain_syntax_are_the_text_as_diffusers_reads_it(ref_pipe, pipe):
    ref = reference_image(ref_pipe, prompt="a photo of a cat")
    assert _close(ours(pipe, "a photo of a cat"), ref)
    assert np.array_equal(ours(pipe, "a photo of a (cat:1.0)"), ours(pipe, "a photo of a cat"))
    literal = reference_image(ref_pipe, prompt="a photo of a (cat:1.5)")
    assert _close(ours(pipe, "a photo of a (cat:1.5)", prompt_syntax="plain"), literal)
    assert not _close(ours(pipe, "a photo of a (cat:1.5)"), literal)


def test_negative_prompt_is_weighted_too(ref_pipe, pipe):
    negative = [("blurry", 1.4)]
    ref = reference_image(ref_pipe, prompt_embeds=a1111_embeds(ref_pipe, [("a photo of a cat", 1.0)]),
                          negative_prompt_embeds=a1111_embeds(ref_pipe, negative))
    assert _close(ours(pipe, "a photo of a cat", negative_prompt="(blurry:1.4)"), ref)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "a [cat:dog:0.5]"}, r"^prompt: prompt editing \[cat:dog:0.5\]"),
        ({"prompt": "a cat", "negative_prompt": "[blurry|dark]"}, r"^prompt: alternation"),
        ({"prompt": "a (cat:1.2.3)"}, r"^prompt: the emphasis weight '1.2.3'"),
        ({"prompt": "a cat", "prompt_syntax": "markdown"}, r"^prompt syntax must be one of a1111, plain"),
    ],
)
def test_refused_syntax_before_any_work(pipe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipe.validate(GenerateRequest(**kwargs))
