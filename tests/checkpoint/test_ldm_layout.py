"""diffusers -> original layout: exact round trips through diffusers' own converters, and the known key names."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.archs import arch_spec, build_models, family_of, read_component_configs
from sdtrt.checkpoint.ldm_layout import (
    SD2_TEXT_PREFIX,
    canonical_clip_keys,
    models_to_original,
    original_key_map,
    save_single_file,
    text_encoder_to_original,
    to_original_state_dict,
    unet_to_original,
)
from sdtrt.errors import CheckpointError, UsageError


def _back_to_diffusers(orig, text_encoder, configs, family):
    """diffusers' own single-file conversion of ``orig``, per component."""
    if family == "sd1":
        text = convert_ldm_clip_checkpoint(orig)
    else:
        text = convert_open_clip_checkpoint(text_encoder, orig, prefix=SD2_TEXT_PREFIX)
    return {
        "text_encoder": text,
        "unet": convert_ldm_unet_checkpoint(orig, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(orig, configs["vae"]),
    }


def _assert_same(ours: dict, theirs: dict, *, values: bool) -> None:
    assert sorted(ours) == sorted(theirs)
    for k, t in ours.items():
        assert theirs[k].shape == t.shape, k
        if values:
            assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), k


@pytest.mark.parametrize(("fixture", "family"), [("tiny_sd1_dir", "sd1"), ("tiny_sd2_dir", "sd2")])
def test_round_trip_through_diffusers_converters_is_exact(request, fixture, family):
    d = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(d)
    assert ckpt.family == family
    orig = to_original_state_dict(ckpt.text_encoder, ckpt.unet, ckpt.vae, family)
    prefixes = ("cond_stage_model.", "model.diffusion_model.", "first_stage_model.")
    assert all(k.startswith(prefixes) for k in orig)

    back = _back_to_diffusers(orig, ckpt.text_encoder, read_component_configs(d), family)
    _assert_same(canonical_clip_keys(ckpt.text_encoder.state_dict()), back["text_encoder"], values=True)
    _assert_same(ckpt.unet.state_dict(), back["unet"], values=True)
    _assert_same(ckpt.vae.state_dict(), back["vae"], values=True)
    fused_away = 4 * ckpt.text_encoder.config.num_hidden_layers if family == "sd2" else 0  # q,k,v -> in_proj, x2
    assert len(orig) == len(back["text_encoder"]) - fused_away + len(back["unet"]) + len(back["vae"])


@pytest.mark.parametrize(("arch", "n_keys"), [("sd15", 1130), ("sd21", 1214)])
def test_full_size_layouts_round_trip_in_shape(arch, n_keys):
    """sd15/sd21 on the meta device: key sets and shapes only (no memory, no init)."""
    configs = read_component_configs(arch_spec(arch).config_dir)
    family = family_of(configs)
    with torch.device("meta"):
        models = build_models(configs)
    text_encoder, unet, vae = models["text_encoder"], models["unet"], models["vae"]
    orig = models_to_original(models, family)
    # The real SD 1.5 / 2.1 files: 1131 keys with position_ids / 1214 without OpenCLIP's 24th layer + projection.
    assert len(orig) == n_keys
    back = _back_to_diffusers(orig, text_encoder, configs, family)
    _assert_same(canonical_clip_keys(text_encoder.state_dict()), back["text_encoder"], values=False)
    _assert_same(unet.state_dict(), back["unet"], values=False)
    _assert_same(vae.state_dict(), back["vae"], values=False)


# Key names and shapes as they appear in the released v1-5 / v2-1_768 files.
_SD15_KEYS = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
_SD21_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear projections in 2.x
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias": (3072,),
    "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight": (1024, 4096),
    "cond_stage_model.model.transformer.resblocks.22.ln_2.bias": (1024,),
    "cond_stage_model.model.ln_final.weight": (1024,),
}


@pytest.mark.parametrize(("arch", "expected"), [("sd15", _SD15_KEYS), ("sd21", _SD21_KEYS)])
def test_full_size_key_names_match_released_files(arch, expected):
    configs = read_component_configs(arch_spec(arch).config_dir)
    with torch.device("meta"):
        models = build_models(configs)
    orig = models_to_original(models, family_of(configs))
    assert {k: tuple(orig[k].shape) for k in expected if k in orig} == expected
    if arch == "sd21":
        assert not any(".resblocks.23." in k for k in orig)  # diffusers keeps 23 of OpenCLIP's 24 layers


def test_open_clip_fuses_qkv_in_order_and_transposes_projection():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = read_component_configs(arch_spec("tiny-sd2").config_dir)["text_encoder"]
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    sd = canonical_clip_keys(model.state_dict())
    orig = text_encoder_to_original(model.state_dict(), "sd2")
    layer = "text_model.encoder.layers.1.self_attn"
    fused = orig[f"{SD2_TEXT_PREFIX}transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([sd[f"{layer}.{p}_proj.weight"] for p in "qkv"]))
    proj = orig[f"{SD2_TEXT_PREFIX}text_projection"]
    assert proj.shape == (64, 32) and torch.equal(proj, sd["text_projection.weight"].T)
    # diffusers reads the q/k/v split size from text_projection.shape[0]: the width, as in OpenCLIP.
    back = convert_open_clip_checkpoint(model, orig, prefix=SD2_TEXT_PREFIX)
    sd.pop("text_projection.weight")  # diffusers ignores SD 2.x's projection (its pipelines do not use it)
    _assert_same(sd, back, values=True)


def test_original_key_map_names_fused_tensors():
    keys = [f"text_model.encoder.layers.0.self_attn.{p}_proj.bias" for p in "qkv"]
    names = original_key_map("text_encoder", keys, family="sd2")
    assert set(names.values()) == {f"{SD2_TEXT_PREFIX}transformer.resblocks.0.attn.in_proj_bias"}
    assert original_key_map("unet", ["not.a.unet.key"]) == {}


def test_unmappable_tensors_are_refused(tiny_sd1_dir):
    ckpt = load_checkpoint(tiny_sd1_dir)
    sd = dict(ckpt.unet.state_dict(), **{"class_embedding.linear_1.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"unet has 1 tensors with no place .* \(e.g. class_embedding.linear_1"):
        unet_to_original(sd, layers_per_block=2)
    with pytest.raises(UsageError, match="unknown model family 'sd3'"):
        to_original_state_dict(ckpt.text_encoder, ckpt.unet, ckpt.vae, "sd3")
    with pytest.raises(UsageError, match="a sdxl checkpoint needs its text_encoder_2"):
        to_original_state_dict(ckpt.text_encoder, ckpt.unet, ckpt.vae, "sdxl")


def test_save_single_file_is_atomic_safetensors_with_metadata(tiny_sd2_dir, tmp_path):
    from safetensors import safe_open

    ckpt = load_checkpoint(tiny_sd2_dir)
    out = tmp_path / "m.safetensors"
    save_single_file(ckpt, out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(to_original_state_dict(ckpt.text_encoder, ckpt.unet, ckpt.vae, "sd2"))
    assert (meta["sdtrt_arch"], meta["sdtrt_family"], meta["sdtrt_prediction_type"]) == (
        "tiny-sd2",
        "sd2",
        "v_prediction",
    )
    assert meta["made_by"].startswith("sdtrt ")
    with pytest.raises(UsageError, match=r"m\.ckpt: a single-file checkpoint is written as \.safetensors"):
        save_single_file(ckpt, tmp_path / "m.ckpt")
