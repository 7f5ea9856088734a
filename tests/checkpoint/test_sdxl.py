"""SDXL checkpoints (base and refiner) as diffusers folders: known architectures and their real configs,
``init_random`` folders diffusers itself loads, ``load_diffusers_dir`` into the Checkpoint contract, ``--vae``,
and every refusal message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdtrt.checkpoint import KNOWN_ARCHS, load_checkpoint
from sdtrt.checkpoint.archs import arch_spec, build_models, family_of, read_component_configs, time_id_count
from sdtrt.checkpoint.diffusers_dir import load_diffusers_dir, match_arch
from sdtrt.errors import CheckpointError

XL_ARCHS = ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl", "sdxl-refiner")


def _configs(arch: str):
    return read_component_configs(arch_spec(arch).config_dir)


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- architectures -------------------------------------------------------------------------------------------


def test_sdxl_archs_are_known_with_their_families():
    assert set(XL_ARCHS) <= set(KNOWN_ARCHS)
    for arch, family, ids in [("tiny-sdxl", "sdxl", 6), ("sdxl", "sdxl", 6), ("tiny-sdxl-refiner", "sdxl-refiner", 5),
                              ("sdxl-refiner", "sdxl-refiner", 5)]:
        configs = _configs(arch)
        assert arch_spec(arch).family == family_of(configs) == family
        assert time_id_count(configs) == ids
        assert match_arch(configs) == arch
    assert arch_spec("sdxl").default_size == arch_spec("sdxl-refiner").default_size == 1024


def test_family_comes_from_the_configs():
    base = _configs("tiny-sdxl")
    assert family_of(base, {"requires_aesthetics_score": True}) == "sdxl-refiner"
    assert family_of({k: v for k, v in base.items() if k != "text_encoder"}) == "sdxl-refiner"
    assert family_of(_configs("tiny-sd2")) == "sd2" and family_of(_configs("tiny-sd1")) == "sd1"


def test_cli_arch_choices_are_known_archs():
    from sdtrt.cli import build_parser

    init = build_parser()._subparsers._group_actions[0].choices["init-random"]
    arch = next(a for a in init._actions if a.dest == "arch")
    assert tuple(arch.choices) == KNOWN_ARCHS


def test_full_size_configs_are_sdxl_1_0():
    base, ref = _configs("sdxl"), _configs("sdxl-refiner")
    u = base["unet"]
    assert (u["block_out_channels"], u["transformer_layers_per_block"], u["attention_head_dim"]) == (
        [320, 640, 1280], [1, 2, 10], [5, 10, 20])
    assert (u["cross_attention_dim"], u["addition_time_embed_dim"], u["projection_class_embeddings_input_dim"]) == (
        2048, 256, 2816)
    r = ref["unet"]
    assert (r["block_out_channels"], r["transformer_layers_per_block"], r["attention_head_dim"]) == (
        [384, 768, 1536, 1536], 4, [6, 12, 24, 24])
    assert (r["cross_attention_dim"], r["projection_class_embeddings_input_dim"]) == (1280, 2560)
    assert "text_encoder" not in ref
    for c in (base, ref):
        assert c["vae"]["scaling_factor"] == 0.13025
        assert c["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
        g = c["text_encoder_2"]
        assert (g["hidden_size"], g["num_hidden_layers"], g["projection_dim"], g["hidden_act"]) == (1280, 32, 1280, "gelu")
    index = json.loads((arch_spec("sdxl").config_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    index = json.loads((arch_spec("sdxl-refiner").config_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert (index["force_zeros_for_empty_prompt"], index["requires_aesthetics_score"]) == (False, True)


def test_full_size_modules_build_with_sdxl_1_0_parameter_counts():
    counts = {}
    for arch in ("sdxl", "sdxl-refiner"):
        with torch.device("meta"):
            models = build_models(_configs(arch))
        counts[arch] = {c: sum(p.numel() for p in m.parameters()) for c, m in models.items()}
    assert counts["sdxl"] == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684,
                              "vae": 83_653_863}
    assert counts["sdxl-refiner"] == {"text_encoder_2": 694_659_840, "unet": 2_259_526_660, "vae": 83_653_863}


# ---- init_random ----------------------------------------------------------------------------------------------


def test_init_random_folders_load_in_diffusers(tiny_sdxl_dir, tiny_sdxl_refiner_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    ckpt = load_checkpoint(tiny_sdxl_dir)
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
        _same_weights(getattr(base, comp), getattr(ckpt, comp))
    assert (base.tokenizer.pad_token, base.tokenizer.pad_token_id) == ("<|endoftext|>", 999)
    assert (base.tokenizer_2.pad_token, base.tokenizer_2.pad_token_id) == ("!", 0)
    assert base.config.force_zeros_for_empty_prompt is True

    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_refiner_dir, local_files_only=True)
    rckpt = load_checkpoint(tiny_sdxl_refiner_dir)
    assert ref.text_encoder is None and ref.tokenizer is None
    for comp in ("text_encoder_2", "unet", "vae"):
        _same_weights(getattr(ref, comp), getattr(rckpt, comp))
    assert (ref.config.requires_aesthetics_score, ref.config.force_zeros_for_empty_prompt) == (True, False)
    assert sorted(p.name for p in tiny_sdxl_refiner_dir.iterdir()) == [
        "model_index.json", "scheduler", "sdtrt_arch.json", "text_encoder_2", "tokenizer_2", "unet", "vae"]


@pytest.mark.parametrize("arch", ["sdxl", "sdxl-refiner"])
def test_init_random_full_size_writes_clips_tokenizers(tmp_path, monkeypatch, arch):
    from sdtrt.checkpoint import random_init
    from sdtrt.checkpoint.clip_vocab import CLIP_VOCAB_SIZE, clip_disagreement
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    # The weights stay tiny (full-size SDXL is 7 GB); the tokenizers are what the full-size arch gets.
    tiny = _configs(arch.replace("sdxl", "tiny-sdxl"))
    monkeypatch.setattr(random_init, "build_models", lambda configs: build_models(tiny))
    d = random_init.init_random(tmp_path / arch, arch)
    tok2 = load_tokenizer(d / "tokenizer_2")
    assert len(tok2) == CLIP_VOCAB_SIZE and tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert clip_disagreement(tok2) is None
    if arch == "sdxl":
        tok = load_tokenizer(d / "tokenizer")
        assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407 and clip_disagreement(tok) is None
    else:
        assert not (d / "tokenizer").exists()


# ---- load_diffusers_dir -----------------------------------------------------------------------------------------


def test_loads_sdxl_base_into_the_checkpoint_contract(tiny_sdxl_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ckpt = load_diffusers_dir(tiny_sdxl_dir)
    assert (ckpt.arch, ckpt.family, ckpt.format) == ("tiny-sdxl", "sdxl", "diffusers")
    assert type(ckpt.text_encoder) is CLIPTextModel and type(ckpt.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(ckpt.unet, UNet2DConditionModel) and isinstance(ckpt.vae, AutoencoderKL)
    assert ckpt.pipeline_config == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
    assert ckpt.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert ckpt.vae.config.scaling_factor == 0.13025
    assert ckpt.tokenizer.pad_token == "<|endoftext|>" and ckpt.tokenizer_2.pad_token == "!"
    for m in (ckpt.text_encoder, ckpt.text_encoder_2, ckpt.unet, ckpt.vae):
        assert not m.training and {p.dtype for p in m.parameters()} == {torch.float32}


def test_loads_sdxl_refiner(tiny_sdxl_refiner_dir):
    ckpt = load_checkpoint(tiny_sdxl_refiner_dir)
    assert (ckpt.arch, ckpt.family) == ("tiny-sdxl-refiner", "sdxl-refiner")
    assert ckpt.text_encoder is None and ckpt.tokenizer is None
    assert ckpt.text_encoder_2.config.projection_dim == 48 and ckpt.tokenizer_2.pad_token_id == 0
    assert ckpt.pipeline_config == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}


@pytest.fixture
def xl_copy(tiny_sdxl_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sdxl_dir, tmp_path / "xl"))


@pytest.mark.parametrize(("file", "changes", "message"), [
    ("unet/config.json", {"in_channels": 9},
     "{d}: a Stable Diffusion XL inpainting model (9-channel UNet); SDXL inpainting is not supported yet"),
    ("unet/config.json", {"in_channels": 8}, "{d}: a Stable Diffusion XL instruct-pix2pix (image editing) model "
     "(8-channel UNet); SDXL instruct-pix2pix is not supported yet"),
    ("model_index.json", {"_class_name": "StableDiffusionXLInpaintPipeline"},
     "{d}: a Stable Diffusion XL inpainting model; SDXL inpainting is not supported yet"),
    ("unet/config.json", {"cross_attention_dim": 72}, "{d}: unet cross_attention_dim=72 does not match text_encoder "
     "hidden_size=32 + text_encoder_2 hidden_size=32: mismatched components"),
    ("unet/config.json", {"projection_class_embeddings_input_dim": 100}, "{d}/unet/config.json: unet "
     "projection_class_embeddings_input_dim=100 is not text_encoder_2 projection_dim=48 + 6 time ids x "
     "addition_time_embed_dim=8: mismatched components"),
    ("unet/config.json", {"class_embed_type": "projection"},
     "{d}/unet/config.json: unet uses class_embed_type='projection' (extra conditioning): not supported yet"),
    ("text_encoder_2/config.json", {"model_type": "t5"},
     "{d}/text_encoder_2/config.json: text encoder model_type 't5': only CLIP text encoders are supported"),
])
def test_sdxl_folder_refusals(xl_copy, file, changes, message):
    _edit_json(xl_copy / file, **changes)
    assert _error(xl_copy) == message.format(d=xl_copy)


def test_sdxl_folder_missing_parts(xl_copy, tiny_sdxl_refiner_dir, tmp_path):
    shutil.rmtree(xl_copy / "text_encoder_2")
    assert _error(xl_copy) == (f"{xl_copy / 'text_encoder_2'}: missing text_encoder_2 folder (a diffusers checkpoint "
                               "needs text_encoder, text_encoder_2, unet, vae, scheduler)")
    ref = Path(shutil.copytree(tiny_sdxl_refiner_dir, tmp_path / "ref"))
    shutil.rmtree(ref / "tokenizer_2")
    assert _error(ref).startswith(f"{ref}: no tokenizer found in the checkpoint (looked for {ref / 'tokenizer_2'})")
    assert _error(ref, tokenizer_dir=tmp_path) == (
        f"{tmp_path}: an SDXL model needs a --tokenizer folder holding tokenizer_2/")
    assert load_checkpoint(ref, tokenizer_dir=tiny_sdxl_refiner_dir).tokenizer_2.pad_token == "!"
    # An export's workdir holds tokenizer/ and tokenizer_2/; naming one of them takes its siblings too.
    assert load_checkpoint(ref, tokenizer_dir=tiny_sdxl_refiner_dir / "tokenizer").tokenizer_2.pad_token == "!"


def test_component_only_folders_are_named(tiny_sdxl_dir, tmp_path):
    vae = Path(shutil.copytree(tiny_sdxl_dir / "vae", tmp_path / "vae"))
    assert _error(vae) == f"{vae}: a VAE folder, not a whole checkpoint; pass it with --vae beside a checkpoint"
    cn = tmp_path / "controlnet"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert _error(cn) == f"{cn}: a ControlNet (ControlNetModel, diffusers layout); ControlNet is not supported yet"
    flux = tmp_path / "flux-transformer"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert _error(flux) == (f"{flux}: a diffusion transformer (FluxTransformer2DModel), not a UNet; "
                            "FluxTransformer2DModel is not supported")


def test_vae_of_sdxl_replaces_and_another_family_is_refused(tiny_sdxl_dir, tiny_sd1_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    # An SDXL VAE file (as the fp16-fixed SDXL VAE is distributed: diffusers keys, no config): used as given.
    state = {k: v + 0.5 for k, v in load_file(tiny_sdxl_dir / "vae" / "diffusion_pytorch_model.safetensors").items()}
    f = tmp_path / "sdxl_vae.safetensors"
    save_file(state, str(f))
    ckpt = load_checkpoint(tiny_sdxl_dir, vae=f)
    assert ckpt.vae_source == f and ckpt.notes == (f"VAE from {f}",)
    got = ckpt.vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # A VAE folder of another family (SD 1.x's scaling factor 0.18215): refused before any model loads.
    assert _error(tiny_sdxl_dir, vae=tiny_sd1_dir / "vae") == (
        f"{tiny_sd1_dir / 'vae'}: VAE scaling_factor 0.18215 differs from the model's 0.13025 "
        "(a VAE of another model family?)")
