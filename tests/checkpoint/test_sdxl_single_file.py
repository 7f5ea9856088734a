"""SDXL single files in Stability's original (sgm) layout: recognised by tensor names and shapes, converted to
the same modules diffusers' own ``from_single_file`` builds, giving the source modules' outputs exactly; and the
refusals (inpainting, missing parts, unknown shapes) in one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.archs import CONFIG_ROOT, arch_spec, build_models, read_component_configs
from sdtrt.checkpoint.ldm_layout import models_to_original, save_single_file
from sdtrt.checkpoint.single_file import _known_candidates, _recognise, load_single_file
from sdtrt.errors import CheckpointError

U = "model.diffusion_model."


def _write_file(ckpt_dir: Path, out_dir: Path, *, extras: bool = True) -> Path:
    """``ckpt_dir`` as one sgm-layout file beside copies of its tokenizer folders; ``extras`` adds what real SDXL
    files carry besides the modules (OpenCLIP's logit_scale, CLIP's position_ids, the denoiser's sigmas)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = out_dir / "model.safetensors"
    save_single_file(load_checkpoint(ckpt_dir), f)
    for tok in ("tokenizer", "tokenizer_2"):
        if (ckpt_dir / tok).is_dir():
            shutil.copytree(ckpt_dir / tok, out_dir / tok)
    if extras:
        state = load_file(str(f))
        bigg = "conditioner.embedders.1.model." if any(k.startswith("conditioner.embedders.1.") for k in state) else (
            "conditioner.embedders.0.model.")
        state[bigg + "logit_scale"] = torch.tensor(4.6052)
        if "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state:
            state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
        save_file(state, str(f))
    return f


@pytest.fixture(scope="module")
def xl_file(tiny_sdxl_dir, tmp_path_factory) -> Path:
    return _write_file(tiny_sdxl_dir, tmp_path_factory.mktemp("xl-file"))


@pytest.fixture(scope="module")
def refiner_file(tiny_sdxl_refiner_dir, tmp_path_factory) -> Path:
    return _write_file(tiny_sdxl_refiner_dir, tmp_path_factory.mktemp("refiner-file"))


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@torch.no_grad()
def _outputs(ckpt) -> dict[str, torch.Tensor]:
    """Every module's outputs on fixed inputs: what the exporter's graphs compute."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 998, (2, 77), generator=g)
    out = {}
    hidden = []
    if ckpt.text_encoder is not None:
        o = ckpt.text_encoder(ids, output_hidden_states=True)
        out["te_last"], out["te_penult"] = o.last_hidden_state, o.hidden_states[-2]
        hidden.append(o.hidden_states[-2])
    o = ckpt.text_encoder_2(ids, output_hidden_states=True)
    out["te2_embeds"], out["te2_penult"] = o.text_embeds, o.hidden_states[-2]
    hidden.append(o.hidden_states[-2])
    n_ids = 6 if ckpt.family == "sdxl" else 5
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0][:n_ids]] * 2)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    out["unet"] = ckpt.unet(sample, torch.tensor([500.0]), torch.cat(hidden, -1),
                            added_cond_kwargs={"text_embeds": o.text_embeds, "time_ids": time_ids}).sample
    out["vae_decode"] = ckpt.vae.decode(sample).sample
    out["vae_encode"] = ckpt.vae.encode(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1).latent_dist.mean
    return out


@pytest.mark.parametrize(("fixture", "source", "arch", "family"), [
    ("xl_file", "tiny_sdxl_dir", "tiny-sdxl", "sdxl"),
    ("refiner_file", "tiny_sdxl_refiner_dir", "tiny-sdxl-refiner", "sdxl-refiner"),
])
def test_single_file_gives_the_source_modules_outputs(request, fixture, source, arch, family):
    f, src = request.getfixturevalue(fixture), request.getfixturevalue(source)
    got = load_checkpoint(f)
    assert (got.format, got.arch, got.family) == ("single-file", arch, family)
    assert got.pipeline_config == load_checkpoint(src).pipeline_config
    assert (got.text_encoder is None) == (family == "sdxl-refiner")
    assert got.tokenizer_2.pad_token == "!"
    want, have = _outputs(load_checkpoint(src)), _outputs(got)
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k


def _write_folder(d: Path, configs: dict, tokenizers_from: Path, seed: int) -> Path:
    """A diffusers SDXL folder of ``configs`` with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = build_models(configs)
    for comp, model in models.items():
        model.save_pretrained(d / comp)
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    shutil.copyfile(tokenizers_from / "model_index.json", d / "model_index.json")
    for tok in ("tokenizer", "tokenizer_2"):
        if (tokenizers_from / tok).is_dir():
            shutil.copytree(tokenizers_from / tok, d / tok)
    return d


@pytest.mark.parametrize("arch", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_matches_diffusers_from_single_file(tmp_path, tiny_sdxl_dir, tiny_sdxl_refiner_dir, arch):
    """The independent check: diffusers' own StableDiffusionXLPipeline.from_single_file reads the same file into
    the same weights. diffusers tells SDXL's two encoders apart by their widths (768 vs 1280), so the base here
    gets a wider bigG (48) than tiny-sdxl's (two 32-wide encoders would be read as two CLIP-Ls); loading it
    through --config checks that path too."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    configs = read_component_configs(arch_spec(arch).config_dir)
    src = tiny_sdxl_dir if arch == "tiny-sdxl" else tiny_sdxl_refiner_dir
    if arch == "tiny-sdxl":
        configs["text_encoder_2"].update(hidden_size=48, intermediate_size=96)
        configs["unet"]["cross_attention_dim"] = 80
    folder = _write_folder(tmp_path / "folder", configs, src, seed=3)
    f = tmp_path / "file" / "model.safetensors"
    f.parent.mkdir()
    save_single_file(load_checkpoint(folder), f)
    cls = StableDiffusionXLPipeline if arch == "tiny-sdxl" else StableDiffusionXLImg2ImgPipeline
    ref = cls.from_single_file(str(f), config=str(folder), local_files_only=True)
    got = load_single_file(f, config_dir=folder, tokenizer_dir=folder)
    assert got.family == ("sdxl" if arch == "tiny-sdxl" else "sdxl-refiner")
    assert got.arch == (None if arch == "tiny-sdxl" else "tiny-sdxl-refiner")
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
        a, b = getattr(ref, comp), getattr(got, comp)
        assert (a is None) == (b is None), comp
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), comp
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k]), (comp, k)


def test_sgm_layout_of_full_size_sdxl():
    """The names and shapes the real sd_xl_base_1.0 / sd_xl_refiner_1.0 files use, recognised back."""
    for arch in ("sdxl", "sdxl-refiner"):
        configs = read_component_configs(CONFIG_ROOT / arch)
        with torch.device("meta"):
            state = models_to_original(build_models(configs), arch_spec(arch).family)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        bigg = "conditioner.embedders.1.model." if arch == "sdxl" else "conditioner.embedders.0.model."
        assert shapes[bigg + "text_projection"] == (1280, 1280)
        assert shapes[bigg + "positional_embedding"] == (77, 1280)
        assert shapes[bigg + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
        if arch == "sdxl":
            assert shapes[U + "label_emb.0.0.weight"] == (1280, 2816)
            assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
            assert shapes[U + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
            assert shapes[U + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
            assert not any(k.startswith(U + "input_blocks.1.1.") for k in shapes)  # level 0 has no attention
        else:
            assert shapes[U + "label_emb.0.0.weight"] == (1536, 2560)
            assert shapes[U + "input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight"] == (1536, 1280)
            assert shapes[U + "middle_block.1.transformer_blocks.3.attn2.to_k.weight"] == (1536, 1280)
        cand = _recognise(Path(f"{arch}.safetensors"), state, _known_candidates(xl=True))
        assert cand.name == arch


def test_sdxl_file_without_vae_takes_vae(tiny_sdxl_dir, xl_file, tmp_path):
    state = {k: v for k, v in load_file(str(xl_file)).items() if not k.startswith("first_stage_model.")}
    f = tmp_path / "novae.safetensors"
    save_file(state, str(f))
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_sdxl_dir / tok, tmp_path / tok)
    assert _error(f) == (f"{f}: a Stable Diffusion XL base checkpoint without VAE weights; pass --vae PATH (a VAE "
                         ".safetensors or diffusers folder) to export it")
    got = load_checkpoint(f, vae=tiny_sdxl_dir / "vae")
    assert got.arch == "tiny-sdxl"
    want = load_checkpoint(tiny_sdxl_dir).vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.vae.state_dict().items())


def _edited(xl_file: Path, tmp_path: Path, name: str, edit) -> Path:
    state = load_file(str(xl_file))
    edit(state)
    f = tmp_path / name
    save_file(state, str(f))
    for tok in ("tokenizer", "tokenizer_2"):
        if (xl_file.parent / tok).is_dir() and not (tmp_path / tok).exists():
            shutil.copytree(xl_file.parent / tok, tmp_path / tok)
    return f


def test_sdxl_inpainting_file_is_refused(xl_file, tmp_path):
    def nine_channels(state):
        state[U + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)

    f = _edited(xl_file, tmp_path, "inpaint.safetensors", nine_channels)
    assert _error(f) == (f"{f}: a Stable Diffusion XL inpainting checkpoint (9-channel UNet); "
                         "SDXL inpainting is not supported yet")


def test_unknown_sdxl_shapes_name_the_closest(xl_file, tmp_path):
    key = U + "output_blocks.2.1.transformer_blocks.1.attn1.to_q.weight"
    f = _edited(xl_file, tmp_path, "odd.safetensors", lambda state: state.pop(key))
    assert _error(f) == (
        f"{f}: unknown architecture: matches none of tiny-sdxl, tiny-sdxl-refiner, sdxl, sdxl-refiner "
        f"(closest: tiny-sdxl, 1 mismatched tensor, e.g. {key}: missing); pass --config DIR with a "
        "diffusers-format folder describing it")


def test_sdxl_unet_without_clip_l_is_named(xl_file, tmp_path):
    f = _edited(xl_file, tmp_path, "nol.safetensors", lambda state: [
        state.pop(k) for k in list(state) if k.startswith("conditioner.embedders.0.")])
    key = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    assert _error(f) == (
        f"{f}: unknown architecture: matches none of tiny-sdxl, tiny-sdxl-refiner, sdxl, sdxl-refiner (closest: "
        f"tiny-sdxl, 52 mismatched tensors, e.g. {key}: missing); pass --config DIR with a "
        "diffusers-format folder describing it")


def test_a_quick_check_failure_is_named_when_the_full_compare_finds_nothing(tiny_sd1_dir, tmp_path):
    """An SD 1.x file with SDXL's label_emb: the converters ignore the extra tensor, so only the quick check tells;
    the message gave "0 mismatched tensor, e.g. " before."""
    f = tmp_path / "m.safetensors"
    save_single_file(load_checkpoint(tiny_sd1_dir), f)
    state = {k: v for k, v in load_file(str(f)).items()}
    state[U + "label_emb.0.0.weight"] = torch.zeros(128, 96)
    with pytest.raises(CheckpointError) as e:
        _recognise(f, state, _known_candidates(xl=False))
    assert str(e.value) == (
        f"{f}: unknown architecture: matches none of tiny-sd1, tiny-sd2, sd15, sd21 (closest: tiny-sd1, UNet "
        "label_emb (128, 96): SDXL-style conditioning); pass --config DIR with a diffusers-format folder describing it")


def test_sdxl_file_without_its_tokenizers(xl_file, tmp_path):
    f = tmp_path / "alone" / "model.safetensors"
    f.parent.mkdir()
    shutil.copyfile(xl_file, f)
    assert _error(f).startswith(f"{f}: no tokenizer found beside the checkpoint (looked for {f.parent / 'tokenizer'})")
    assert load_checkpoint(f, tokenizer_dir=xl_file.parent).tokenizer_2.pad_token == "!"
