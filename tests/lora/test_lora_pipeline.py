"""LoRAs applied at run time on the base export: parity with diffusers on the checkpoint with the LoRA merged by
the test's own reference merge, stacking, negative scales, and switching back to bit-exact base images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sdtrt.runtime.pipeline import Pipeline
from tests.lora.lora_files import lora_modules, make_lora, merge_into, restore

PROMPT = "a photo of a cat"
STEPS = 4
FP32_LEVELS = (2, 0.05)  # tests/runtime/test_pipeline.py's seed-parity tolerance for fp32 compute


@pytest.fixture(scope="module")
def reference(tiny_sd1_dir):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)

    def run(loras=()) -> np.ndarray:
        saved = merge_into(pipe, list(loras))
        try:
            out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), height=64,
                       width=64, output_type="np").images
        finally:
            restore(pipe, saved)
        return (out * 255).round().astype(np.uint8)

    run.pipe = pipe
    return run


@pytest.fixture(scope="module")
def loras(reference, tmp_path_factory):
    """Random LoRAs: kohya linear-only (UNet + text encoder), kohya LoCon (conv too), PEFT (no alpha)."""
    d = tmp_path_factory.mktemp("loras")
    pipe = reference.pipe
    spec = {
        "kohya_linear": dict(modules=lora_modules(pipe, conv=False, text=True), layout="kohya", seed=1),
        "kohya_locon": dict(modules=lora_modules(pipe, conv=True, text=False), layout="kohya", seed=2),
        "peft": dict(modules=lora_modules(pipe, conv=True, text=True), layout="peft", seed=3, alpha=None),
    }
    out = {}
    for name, kw in spec.items():
        path = d / f"{name}.safetensors"
        out[name] = (str(path), make_lora(path, **kw))
    return out


@pytest.fixture(scope="module")
def pipes(sd1_workdir_fp32, sd1_workdir_fp16):
    return {
        "onnxruntime-fp32": Pipeline.load(sd1_workdir_fp32, backend="onnxruntime"),
        "torch": Pipeline.load(sd1_workdir_fp32, backend="torch"),
        "onnxruntime-fp16": Pipeline.load(sd1_workdir_fp16, backend="onnxruntime"),
    }


def _image(pipe: Pipeline, loras=()) -> np.ndarray:
    return np.asarray(pipe(PROMPT, num_inference_steps=STEPS, seed=0, scheduler="ddim", loras=loras).images[0])[None]


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


@pytest.mark.parametrize("backend", ["onnxruntime-fp32", "torch"])
@pytest.mark.parametrize("which", [
    [("kohya_linear", 1.0)],
    [("kohya_locon", 0.8)],
    [("peft", 1.0)],
    [("kohya_linear", 0.7), ("kohya_locon", 0.6)],  # stacked
    [("peft", -1.2)],  # negative scale
], ids=["kohya-linear", "kohya-locon", "peft", "stacked", "negative"])
def test_lora_parity_with_merged_diffusers(reference, loras, pipes, backend, which):
    got = _image(pipes[backend], [(loras[n][0], s) for n, s in which])
    ref = reference([(loras[n][1], s) for n, s in which])
    base = reference()
    assert _levels(ref, base)[1] > 1  # the LoRA really changes the image: a no-op LoRA would pass otherwise
    worst, mean = _levels(got, ref)
    assert worst <= FP32_LEVELS[0] and mean < FP32_LEVELS[1], (worst, mean)


@pytest.mark.parametrize("backend", ["onnxruntime-fp32", "onnxruntime-fp16", "torch"])
def test_switching_returns_to_the_base_image_bit_for_bit(loras, pipes, backend):
    pipe = pipes[backend]
    first = _image(pipe)
    a = _image(pipe, [(loras["kohya_locon"][0], 1.0)])
    b = _image(pipe, [(loras["peft"][0], 0.5), (loras["kohya_linear"][0], 1.0)])
    a_again = _image(pipe, [(loras["kohya_locon"][0], 1.0)])
    last = _image(pipe)
    assert _levels(a, first)[1] > 1 and _levels(b, a)[1] > 1
    assert np.array_equal(a_again, a)
    assert np.array_equal(last, first)


def test_text_embeddings_cached_per_lora_set(loras, pipes):
    """A LoRA that changes the text encoder must not reuse the base model's cached embedding (nor the reverse)."""
    pipe = pipes["onnxruntime-fp32"]
    calls = []
    original = pipe.text_encoders["text_encoder"].runner.run
    pipe.text_encoders["text_encoder"].runner.run = lambda: (calls.append(1), original())[1]
    try:
        pipe("a cached lora prompt", num_inference_steps=1, guidance_scale=1.0)
        pipe("a cached lora prompt", num_inference_steps=1, guidance_scale=1.0, loras=[(loras["kohya_linear"][0], 1)])
        pipe("a cached lora prompt", num_inference_steps=1, guidance_scale=1.0)
    finally:
        pipe.text_encoders["text_encoder"].runner.run = original
    assert len(calls) == 2  # base, then the LoRA set; the base embedding comes from the cache


def test_infotext_lora_hashes(loras, pipes):
    import hashlib
    from pathlib import Path

    path = loras["peft"][0]
    r = pipes["onnxruntime-fp32"](PROMPT, num_inference_steps=1, loras=[(path, 0.5)])
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    assert r.infotexts[0].endswith(f'Lora hashes: "peft: {h}", Backend: sdtrt {r.backend}')


@pytest.mark.parametrize("workdir", ["sd1_workdir_fp32", "sd1_workdir_fp16"])
def test_manifest_maps_every_target_to_its_weight(request, tiny_sd1_dir, workdir):
    """Each recorded initializer holds the module's weight, in the recorded dtype and layout."""
    import diffusers

    wd = request.getfixturevalue(workdir)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True,
                                                             safety_checker=None, requires_safety_checker=False)
    text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    roots = {"unet": (pipe.unet, ""), "text_encoder": (text_model, "text_model.")}
    from sdtrt.export.manifest import read_manifest

    manifest = read_manifest(wd)
    for comp, (root, prefix) in roots.items():
        lmap = manifest["components"][comp]["lora"]
        linear_conv = {n for n, m in root.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(lmap["targets"]) == {prefix + n for n in linear_conv} and lmap["unmapped"] == {}
        inits = {i.name: i for i in onnx.load(str(wd / f"onnx/{comp}.onnx")).graph.initializer}
        for name, t in lmap["targets"].items():
            w = root.get_submodule(name[len(prefix):]).weight.detach().numpy().astype(t["dtype"])
            got = numpy_helper.to_array(inits[t["initializer"]])
            assert np.array_equal(got.T if t["layout"] == "transposed" else got, w), name
