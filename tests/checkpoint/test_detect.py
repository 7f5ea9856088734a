"""Recognise before refusing: every kind of file people download is named, through every input path (single
file, --config, diffusers folder, the CLI), and the unsupported ones are refused with that name in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrt.checkpoint import load_checkpoint
from sdtrt.checkpoint.detect import detect_configs, detect_state
from sdtrt.checkpoint.single_file import load_single_file
from sdtrt.errors import CheckpointError

U = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."


def _conv_in(in_ch: int) -> dict[str, tuple[int, ...]]:
    return {U + "input_blocks.0.0.weight": (8, in_ch, 3, 3), U + "out.2.weight": (4, 8, 3, 3)}


def _sd(family: str = "sd1", in_ch: int = 4, vae: bool = True) -> dict[str, tuple[int, ...]]:
    te = {CLIP_L + "embeddings.token_embedding.weight": (10, 4)} if family == "sd1" else {
        OPEN_CLIP + "token_embedding.weight": (10, 4)}
    out = {**_conv_in(in_ch), **te}
    if vae:
        out |= {"first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
    return out


SDXL_TE = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 4),
           "conditioner.embedders.1.model.token_embedding.weight": (10, 4), U + "label_emb.0.0.weight": (8, 8)}
VAE_KEYS = {"first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
REFINER_TE = {"conditioner.embedders.0.model.token_embedding.weight": (10, 4), U + "label_emb.0.0.weight": (8, 8)}

# file stem -> (shapes, the message after "PATH: ")
CASES = {
    "sd15-inpainting": (_sd("sd1", 9), "a Stable Diffusion 1.x inpainting checkpoint (9-channel UNet); inpainting is not supported yet"),
    "sd2-inpainting": (_sd("sd2", 9), "a Stable Diffusion 2.x inpainting checkpoint (9-channel UNet); inpainting is not supported yet"),
    "instruct-pix2pix": (_sd("sd1", 8), "a Stable Diffusion 1.x instruct-pix2pix (image editing) checkpoint (8-channel UNet); "
                         "instruct-pix2pix is not supported yet"),
    "sd2-depth": (_sd("sd2", 5), "a Stable Diffusion 2.x depth-to-image checkpoint (5-channel UNet); depth-to-image is not supported yet"),
    "sdxl-base": ({**_conv_in(4), **SDXL_TE}, "a Stable Diffusion XL base checkpoint without VAE weights; pass --vae PATH "
                  "(a VAE .safetensors or diffusers folder) to export it"),
    "sdxl-refiner": ({**_conv_in(4), **REFINER_TE}, "a Stable Diffusion XL refiner checkpoint without VAE weights; pass "
                     "--vae PATH (a VAE .safetensors or diffusers folder) to export it"),
    "sdxl-inpainting": ({**_conv_in(9), **SDXL_TE, **VAE_KEYS},
                        "a Stable Diffusion XL inpainting checkpoint (9-channel UNet); SDXL inpainting is not supported yet"),
    "sdxl-pix2pix": ({**_conv_in(8), **SDXL_TE, **VAE_KEYS}, "a Stable Diffusion XL instruct-pix2pix (image editing) "
                     "checkpoint (8-channel UNet); SDXL instruct-pix2pix is not supported yet"),
    "sd3": ({U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), U + "pos_embed": (1, 36864, 1536)},
            "a Stable Diffusion 3 checkpoint (a diffusion transformer, not a UNet); Stable Diffusion 3 is not supported"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (8, 8)},
             "a Flux checkpoint (a diffusion transformer, not a UNet); Flux is not supported"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()},
             "a LoRA file (1 adapted layers), not a checkpoint; LoRA files are not supported yet (they patch a checkpoint's weights)"),
    "lora-peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 8),
                   "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (8, 4)},
                  "a LoRA file (1 adapted layers), not a checkpoint; LoRA files are not supported yet (they patch a checkpoint's weights)"),
    "controlnet": ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3), "control_model.zero_convs.0.0.weight": (8, 8, 1, 1)},
                   "a ControlNet; ControlNet is not supported yet"),
    "controlnet-diffusers": ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "conv_in.weight": (8, 4, 3, 3)},
                             "a ControlNet; ControlNet is not supported yet"),
    "vae-original": ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3),
                      "encoder.down.0.block.0.norm1.weight": (8,)},
                     "a VAE (original layout), not a whole checkpoint; pass it with --vae beside a checkpoint"),
    "vae-diffusers": ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3),
                       "encoder.down_blocks.0.resnets.0.norm1.weight": (8,)},
                      "a VAE (diffusers layout), not a whole checkpoint; pass it with --vae beside a checkpoint"),
    "vae-decoder": ({"decoder.conv_in.weight": (8, 4, 3, 3), "decoder.up.0.block.0.norm1.weight": (8,)},
                    "a VAE decoder without its encoder (original layout); decoder-only VAEs are not supported yet"),
    "ema-only": ({"model_ema.diffusion_modelinput_blocks00weight": (8, 4, 3, 3), "model_ema.decay": (),
                  "model_ema.num_updates": ()},
                 "a checkpoint with only EMA weights (model_ema.*); pass --ema to load them"),
    "no-vae": (_sd("sd1", 4, vae=False), "a Stable Diffusion 1.x checkpoint without VAE weights; pass --vae PATH (a VAE "
               ".safetensors or diffusers folder) to export it"),
    "text-encoder": ({CLIP_L + "embeddings.token_embedding.weight": (10, 4)},
                     "a text encoder only; sdtrt needs a whole checkpoint"),
    "unrelated": ({"fc.weight": (2, 2)}, "not a Stable Diffusion checkpoint (no UNet weights found)"),
}


def _write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize("stem", sorted(CASES))
def test_each_kind_is_named_and_refused(tmp_path, stem):
    shapes, message = CASES[stem]
    f = _write(tmp_path / f"{stem}.safetensors", shapes)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f)
    assert str(e.value) == f"{f}: {message}"


@pytest.mark.parametrize("stem", ["sd15-inpainting", "sdxl-base", "lora", "vae-original"])
def test_config_does_not_bypass_detection(tmp_path, tiny_sd1_dir, stem):
    shapes, message = CASES[stem]
    f = _write(tmp_path / f"{stem}.safetensors", shapes)
    with pytest.raises(CheckpointError) as e:
        load_single_file(f, config_dir=tiny_sd1_dir)
    assert str(e.value) == f"{f}: {message}"


def test_a_config_of_an_unsupported_model_is_refused(tmp_path, tiny_sd1_dir):
    from sdtrt.checkpoint.ldm_layout import save_single_file

    f = tmp_path / "m.safetensors"
    save_single_file(load_checkpoint(tiny_sd1_dir), f)
    shutil.copytree(tiny_sd1_dir / "tokenizer", tmp_path / "tokenizer")
    cfg = tmp_path / "cfg"
    shutil.copytree(tiny_sd1_dir, cfg)
    unet_cfg = json.loads((cfg / "unet" / "config.json").read_text())
    (cfg / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "in_channels": 9}))
    with pytest.raises(CheckpointError) as e:
        load_single_file(f, config_dir=cfg)
    assert str(e.value) == (f"{cfg}: a Stable Diffusion 1.x inpainting model (9-channel UNet); "
                            "inpainting is not supported yet")


@pytest.mark.parametrize(("in_ch", "message"), [
    (9, "a Stable Diffusion 1.x inpainting model (9-channel UNet); inpainting is not supported yet"),
    (8, "a Stable Diffusion 1.x instruct-pix2pix (image editing) model (8-channel UNet); instruct-pix2pix is not supported yet"),
])
def test_diffusers_folder_of_an_unsupported_model(tmp_path, tiny_sd1_dir, in_ch, message):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_sd1_dir, d)
    unet_cfg = json.loads((d / "unet" / "config.json").read_text())
    (d / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "in_channels": in_ch}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value) == f"{d}: {message}"


@pytest.mark.parametrize(("index", "message"), [
    ({"_class_name": "StableDiffusionXLInpaintPipeline", "text_encoder": [], "text_encoder_2": []},
     "a Stable Diffusion XL inpainting model; SDXL inpainting is not supported yet"),
    ({"_class_name": "StableDiffusionInstructPix2PixPipeline", "text_encoder": [], "unet": []},
     "a Stable Diffusion instruct-pix2pix (image editing) model; instruct-pix2pix is not supported yet"),
    ({"_class_name": "StableDiffusion3Pipeline", "text_encoder": [], "text_encoder_2": [], "transformer": []},
     "a Stable Diffusion 3 model (a diffusion transformer, not a UNet); Stable Diffusion 3 is not supported"),
    ({"_class_name": "FluxPipeline", "text_encoder": [], "text_encoder_2": [], "transformer": []},
     "a Flux model (a diffusion transformer, not a UNet); Flux is not supported"),
    ({"_class_name": "PixArtSigmaPipeline", "text_encoder": [], "transformer": []},
     "a PixArtSigmaPipeline model (a diffusion transformer, not a UNet); PixArtSigmaPipeline is not supported"),
    ({"_class_name": "StableDiffusionControlNetPipeline", "controlnet": [], "unet": []},
     "a ControlNet pipeline (StableDiffusionControlNetPipeline); ControlNet is not supported yet"),
])
def test_diffusers_folder_of_an_unsupported_pipeline(tmp_path, index, message):
    d = tmp_path / "xl"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value) == f"{d}: {message}"


def test_supported_files_are_named_without_refusal():
    assert detect_state(_sd("sd1")).kind == "sd1" and detect_state(_sd("sd1")).unsupported is None
    assert detect_state(_sd("sd2")).kind == "sd2"
    both = {**_sd("sd1"), "model_ema.diffusion_modelinput_blocks00weight": (8, 4, 3, 3)}
    assert detect_state(both).ema == "both" and detect_state(both).unsupported is None
    assert detect_configs({"text_encoder": {"hidden_act": "gelu"}, "unet": {"in_channels": 4}}).kind == "sd2"
    # A UNet alone gets no verdict here: recognition says what is missing against the closest known architecture.
    assert detect_state(_conv_in(4)).unsupported is None


def test_cli_refuses_in_one_line(tmp_path):
    shapes, message = CASES["sd15-inpainting"]
    f = _write(tmp_path / "sd15-inpainting.safetensors", shapes)
    r = subprocess.run([sys.executable, "-m", "sdtrt", "export", str(f), str(tmp_path / "wd")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr == f"sdtrt: error: {f}: {message}\n"
    assert not (tmp_path / "wd").exists()


def test_old_clip_key_layout_is_accepted(tiny_sd1_dir, tmp_path):
    """Files saved with transformers < 4.x name CLIP's tensors without the ``text_model.`` level."""
    from safetensors.torch import load_file

    from sdtrt.checkpoint.ldm_layout import save_single_file

    f = tmp_path / "new.safetensors"
    ref = load_checkpoint(tiny_sd1_dir)
    save_single_file(ref, f)
    state = load_file(str(f))
    old = {k.replace(CLIP_L, "cond_stage_model.transformer."): v for k, v in state.items()}
    assert not any(k.startswith(CLIP_L) for k in old)
    g = tmp_path / "old.safetensors"
    save_file(old, str(g))
    shutil.copytree(tiny_sd1_dir / "tokenizer", tmp_path / "tokenizer")
    got = load_checkpoint(g)
    assert got.arch == "tiny-sd1"
    want = ref.text_encoder.state_dict()
    for k, v in got.text_encoder.state_dict().items():
        assert torch.equal(v, want[k]), k
