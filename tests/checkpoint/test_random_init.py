"""Random-weight checkpoints: layout, determinism by seed, a real diffusers run, refusal and atomicity."""

from __future__ import annotations

import json

import pytest
import torch

from sdtrt.checkpoint import random_init
from sdtrt.checkpoint.archs import arch_spec
from sdtrt.checkpoint.random_init import init_random
from sdtrt.errors import CheckpointError
from sdtrt.fsutil import sha256_file

WEIGHTS = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def _digests(d):
    return {str(f.relative_to(d)): sha256_file(f) for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def seed1_dir(tmp_path_factory):
    return init_random(tmp_path_factory.mktemp("seed1") / "tiny-sd1", "tiny-sd1", seed=1)


@pytest.mark.parametrize(
    ("fixture", "arch", "family"), [("tiny_sd1_dir", "tiny-sd1", "sd1"), ("tiny_sd2_dir", "tiny-sd2", "sd2")]
)
def test_layout(request, fixture, arch, family):
    from safetensors import safe_open

    d = request.getfixturevalue(fixture)
    spec = arch_spec(arch)
    assert json.loads((d / "sdtrt_arch.json").read_text())["arch"] == arch
    assert json.loads((d / "sdtrt_arch.json").read_text())["family"] == family
    assert json.loads((d / "sdtrt_arch.json").read_text())["seed"] == 0
    assert (d / "model_index.json").read_bytes() == (spec.config_dir / "model_index.json").read_bytes()
    sched = "scheduler/scheduler_config.json"
    assert (d / sched).read_bytes() == (spec.config_dir / sched).read_bytes()
    assert sorted(p.name for p in (d / "tokenizer").iterdir()) == sorted(
        ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert len(json.loads((d / "tokenizer/vocab.json").read_text())) == 1000
    for w in WEIGHTS:
        with safe_open(str(d / w), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert not list(d.parent.glob(".*"))  # no temporary leftovers beside it


def test_same_seed_gives_identical_files(tiny_sd1_dir, tmp_path):
    again = init_random(tmp_path / "again", "tiny-sd1", seed=0)
    assert _digests(again) == _digests(tiny_sd1_dir)


def test_other_seed_gives_other_weights_same_tokenizer(tiny_sd1_dir, seed1_dir):
    a, b = _digests(tiny_sd1_dir), _digests(seed1_dir)
    for w in WEIGHTS:
        assert a[w] != b[w]
    assert {k: v for k, v in a.items() if k.startswith("tokenizer/")} == {
        k: v for k, v in b.items() if k.startswith("tokenizer/")
    }


def test_caller_rng_is_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    init_random(tmp_path / "c", "tiny-sd2", seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    ("fixture", "scheduler", "pad_id", "unet_calls"),
    # PNDM (PLMS) spends one extra UNet call on its first step.
    [("tiny_sd1_dir", "PNDMScheduler", 999, 3), ("tiny_sd2_dir", "DDIMScheduler", 0, 2)],
)
def test_diffusers_pipeline_runs_with_sane_magnitudes(request, fixture, scheduler, pad_id, unet_calls):
    from diffusers import StableDiffusionPipeline

    d = request.getfixturevalue(fixture)
    pipe = StableDiffusionPipeline.from_pretrained(d, local_files_only=True, safety_checker=None)
    assert type(pipe.scheduler).__name__ == scheduler
    assert pipe.tokenizer.pad_token_id == pad_id
    peaks: dict[str, list[float]] = {}

    def record(name):
        def hook(module, args, out):
            x = out[0] if isinstance(out, tuple) else getattr(out, "sample", getattr(out, "last_hidden_state", out))
            assert torch.isfinite(x).all(), name
            peaks.setdefault(name, []).append(x.abs().max().item())

        return hook

    pipe.text_encoder.register_forward_hook(record("text_encoder"))
    pipe.unet.register_forward_hook(record("unet"))
    pipe.vae.decoder.register_forward_hook(record("vae_decoder"))  # before the pipeline's clamp to [0, 1]
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert (image >= 0).all() and (image <= 1).all() and image.std() > 0.01
    assert len(peaks["text_encoder"]) == 2  # prompt and negative prompt (classifier-free guidance)
    assert len(peaks["unet"]) == unet_calls and len(peaks["vae_decoder"]) == 1
    assert all(0 < v < 1e3 for vs in peaks.values() for v in vs), peaks


def test_unknown_arch(tmp_path):
    with pytest.raises(CheckpointError, match="unknown architecture 'sd3'"):
        init_random(tmp_path / "x", "sd3")
    assert list(tmp_path.iterdir()) == []


def test_nonempty_folder_is_refused_unless_overwrite(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "mine.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="folder exists and is not empty"):
        init_random(d, "tiny-sd1")
    assert (d / "mine.txt").read_text() == "precious"
    messages: list[str] = []
    init_random(d, "tiny-sd1", overwrite=True, progress=messages.append)
    assert not (d / "mine.txt").exists() and (d / "model_index.json").is_file()
    assert "saving unet" in messages and messages[-1] == f"wrote {d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_empty_folder_is_fine_and_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    init_random(tmp_path / "empty", "tiny-sd1")
    assert (tmp_path / "empty" / "sdtrt_arch.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        init_random(tmp_path / "file", "tiny-sd1")


def _fail(*args, **kwargs):
    raise OSError("disk full")


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    # The weights are already written when the tokenizer step fails.
    monkeypatch.setattr(random_init, "write_generated_tokenizer", _fail)
    with pytest.raises(OSError, match="disk full"):
        init_random(tmp_path / "ckpt", "tiny-sd1")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_old_folder(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "old.txt").write_text("old")
    monkeypatch.setattr(random_init, "write_generated_tokenizer", _fail)
    with pytest.raises(OSError, match="disk full"):
        init_random(d, "tiny-sd1", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in d.iterdir()] == ["old.txt"]
