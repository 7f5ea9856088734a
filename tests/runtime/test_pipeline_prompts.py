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


# -- prompts longer than one chunk -------------------------------------------------------------------------------
def chunk_embeds(ref_pipe, token_chunks: list[list[int]]) -> torch.Tensor:
    """(1, 77 k, C): each chunk [BOS] + ids + [EOS] + padding encoded alone, laid side by side (A1111's rule)."""
    tok = ref_pipe.tokenizer
    out = []
    for ids in token_chunks:
        full = [tok.bos_token_id, *ids, tok.eos_token_id]
        full += [tok.pad_token_id] * (77 - len(full))
        with torch.no_grad():
            out.append(ref_pipe.text_encoder(torch.tensor([full]))[0])
    return torch.cat(out, dim=1)


LONG = " ".join(["cat", "dog", "tree", "house"] * 30)  # no commas: the chunks split at exactly 75 tokens


def _long_chunks(ref_pipe, text: str) -> list[list[int]]:
    ids = ref_pipe.tokenizer(text, add_special_tokens=False).input_ids
    assert 75 < len(ids) <= 150, len(ids)
    return [ids[:75], ids[75:]]


def test_long_prompt_and_long_negative_run_as_two_chunks(ref_pipe, pipe):
    """Both 2 chunks: one UNet call on 154 text tokens, diffusers' image from the chunked embeddings."""
    negative = " ".join(["house", "tree", "dog"] * 36)
    ref = reference_image(ref_pipe, prompt_embeds=chunk_embeds(ref_pipe, _long_chunks(ref_pipe, LONG)),
                          negative_prompt_embeds=chunk_embeds(ref_pipe, _long_chunks(ref_pipe, negative)))
    got = ours(pipe, LONG, negative_prompt=negative)
    assert _close(got, ref)
    # the second chunk matters: cut to its first chunk, the prompt is another image
    cut = reference_image(ref_pipe, prompt_embeds=chunk_embeds(ref_pipe, _long_chunks(ref_pipe, LONG)[:1]),
                          negative_prompt_embeds=chunk_embeds(ref_pipe, _long_chunks(ref_pipe, negative)[:1]))
    assert not _close(got, cut)


def _separate_passes_reference(ref_pipe, cond: torch.Tensor, uncond: torch.Tensor, guidance: float = 7.5) -> np.ndarray:
    """A1111's default when the prompt and negative prompt differ in length: the UNet runs cond and uncond in
    separate calls, each at its own length (diffusers' pipeline cannot: it needs equal shapes), written out with
    diffusers' own UNet, DDIM scheduler and VAE."""
    import diffusers

    sched = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            eps_u = ref_pipe.unet(x, t, encoder_hidden_states=uncond).sample
            eps_c = ref_pipe.unet(x, t, encoder_hidden_states=cond).sample
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        image = ref_pipe.vae.decode(latents / ref_pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)


def test_different_chunk_counts_run_as_separate_unet_calls(ref_pipe, pipe):
    cond = chunk_embeds(ref_pipe, _long_chunks(ref_pipe, LONG))  # (1, 154, C)
    uncond = a1111_embeds(ref_pipe, [("", 1.0)])  # (1, 77, C)
    ref = _separate_passes_reference(ref_pipe, cond, uncond)
    got = ours(pipe, LONG)
    assert _close(got, ref)



def test_break_starts_a_new_chunk(ref_pipe, pipe):
    tok = ref_pipe.tokenizer
    chunks = [tok("a photo of a cat", add_special_tokens=False).input_ids, tok("a dog", add_special_tokens=False).input_ids]
    cond, uncond = chunk_embeds(ref_pipe, chunks), a1111_embeds(ref_pipe, [("", 1.0)])
    got = ours(pipe, "a photo of a cat BREAK a dog")
    assert _close(got, _separate_passes_reference(ref_pipe, cond, uncond))
    # the second chunk reaches the UNet: without it, another image
    assert not _close(got, _separate_passes_reference(ref_pipe, cond[:, :77], uncond))


def test_requests_of_different_lengths_share_a_batch(pipe):
    """Micro-batched together, each request still gets its image alone: rows are grouped by text length."""
    short, long_ = (GenerateRequest(prompt=p, steps=STEPS, seed=s, scheduler="ddim")
                    for p, s in (("a photo of a cat", 1), (LONG, 2)))
    together = pipe.generate_batch([short, long_])
    for req, res in zip((short, long_), together, strict=True):
        alone = np.asarray(pipe.generate(req).images[0])
        assert _close(np.asarray(res.images[0])[None], alone[None])


def test_an_export_with_a_fixed_text_length_refuses_long_prompts(pipe, tmp_path):
    import json
    import shutil

    workdir = tmp_path / "old"
    shutil.copytree(pipe.workdir, workdir)
    manifest = json.loads((workdir / "manifest.json").read_text())
    for spec in manifest["components"]["unet"]["inputs"]:
        if spec["name"] == "encoder_hidden_states":
            spec["shape"][1] = 77  # as exports before the text axis was dynamic
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    old = Pipeline.load(workdir, backend="onnxruntime")
    with pytest.raises(UsageError, match="this export's UNet takes prompts of one 75-token chunk; re-export"):
        old.validate(GenerateRequest(prompt=LONG))
    old.validate(GenerateRequest(prompt="a photo of a cat"))
