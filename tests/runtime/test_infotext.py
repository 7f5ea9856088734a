"""sdtrt.runtime.infotext (pure: request + model facts) and png.save_result, read back by A1111's own reader rules
(tests/a1111_infotext.py, independent of sdtrt's code)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from sdtrt.runtime.infotext import ModelFacts, build_infotext, model_facts
from sdtrt.runtime.png import read_parameters, save_result
from sdtrt.runtime.request import GenerateRequest
from tests.a1111_infotext import parse_generation_parameters

FACTS = ModelFacts(name="v1-5-pruned-emaonly", short_hash="6ce0161689", backend="tensorrt")
NAMES = ("ddim", "euler", "euler_karras", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_exponential", "heun")


def req(**kw) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a cat, (fluffy:1.2)", "steps": 20, "guidance": 7, "seed": 42, **kw}).validated(
        default_size=64, default_scheduler="ddim", scheduler_names=NAMES)


def test_a1111_reads_back_every_setting():
    r = req(scheduler="DPM++ 2M", negative_prompt="blurry: low, quality", clip_skip=2, height=48)
    parsed = parse_generation_parameters(build_infotext(r, FACTS))
    assert parsed["Prompt"] == "a cat, (fluffy:1.2)"
    assert parsed["Negative prompt"] == "blurry: low, quality"
    assert parsed["Steps"] == "20" and parsed["CFG scale"] == "7" and parsed["Seed"] == "42"
    # A1111 1.9+: DPM++ 2M under Automatic runs Karras and writes it as the schedule type
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "48")
    assert (parsed["Model"], parsed["Model hash"]) == ("v1-5-pruned-emaonly", "6ce0161689")
    assert parsed["Clip skip"] == "2" and parsed["Backend"] == "sdtrt tensorrt"


@pytest.mark.parametrize(("kw", "sampler", "schedule_type"), [
    ({"scheduler": "Euler"}, "Euler", None),  # the model's own sigmas: A1111 writes no schedule type
    ({"scheduler": "euler", "schedule_type": "Karras"}, "Euler", "Karras"),
    ({"scheduler": "dpmpp_2m"}, "DPM++ 2M", "Uniform"),  # not what A1111's Automatic would run: said so
    ({"scheduler": "DPM++ 2M SDE"}, "DPM++ 2M SDE", "Exponential"),
    ({"scheduler": "Heun"}, "Heun", None),
    ({"scheduler": "DDIM"}, "DDIM", None),
])
def test_sampler_and_schedule_type(kw, sampler, schedule_type):
    parsed = parse_generation_parameters(build_infotext(req(**kw), FACTS))
    assert parsed["Sampler"] == sampler
    assert parsed.get("Schedule type") == schedule_type


def test_eta_ddim_batch_and_img2img():
    r = req(scheduler="DDIM", eta=0.5, batch=3, init_image=np.zeros((64, 64, 3), np.uint8), strength=0.6)
    parsed = parse_generation_parameters(build_infotext(r, FACTS, batch_pos=2))
    assert parsed["Eta DDIM"] == "0.5" and parsed["Denoising strength"] == "0.6"
    assert (parsed["Batch size"], parsed["Batch pos"]) == ("3", "2")
    # an A1111 batch split into batch-1 requests: the user's batch and the image's own seed
    one = req(seed=10)
    parsed = parse_generation_parameters(build_infotext(one, FACTS, batch_pos=1, batch_size=4, seed=11))
    assert (parsed["Seed"], parsed["Batch size"], parsed["Batch pos"]) == ("11", "4", "1")
    assert "Batch size" not in parse_generation_parameters(build_infotext(req(), FACTS))


def test_model_name_with_a_comma_is_quoted_as_a1111_quotes_it():
    parsed = parse_generation_parameters(build_infotext(req(), ModelFacts(name="my model, v2")))
    assert parsed["Model"] == "my model, v2" and "Model hash" not in parsed


def test_lora_hashes():
    text = build_infotext(req(), FACTS, lora_hashes="detail: 0123456789ab, style: ba9876543210")
    assert parse_generation_parameters(text)["Lora hashes"] == "detail: 0123456789ab, style: ba9876543210"


def test_model_facts_are_a1111s_name_and_short_hash(tmp_path):
    """A1111 sd_models.CheckpointInfo: name_for_extra = file name without extension, shorthash = sha256[0:10]."""
    ckpt = tmp_path / "dreamy.v2.safetensors"
    ckpt.write_bytes(b"not really weights")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    facts = model_facts({"source": {"path": str(ckpt), "sha256": sha}}, "onnxruntime")
    assert facts == ModelFacts("dreamy.v2", sha[:10], "onnxruntime")
    folder = model_facts({"source": {"path": str(tmp_path / "my-diffusers-model")}})
    assert (folder.name, folder.short_hash) == ("my-diffusers-model", None)


def test_save_result_writes_parameters_a1111_reads(tmp_path):
    from PIL import Image

    r = req(scheduler="DPM++ 2M SDE", batch=2)
    texts = [build_infotext(r, FACTS, batch_pos=i) for i in range(2)]
    result = SimpleNamespace(images=[Image.new("RGB", (64, 64), (i * 90, 20, 30)) for i in range(2)], infotexts=texts)
    paths = save_result(result, tmp_path / "out.png")
    assert paths == [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    for i, path in enumerate(paths):
        parsed = parse_generation_parameters(read_parameters(path))
        assert parsed["Sampler"] == "DPM++ 2M SDE" and parsed["Batch pos"] == str(i)
        with Image.open(path) as im:
            assert im.getpixel((0, 0)) == (i * 90, 20, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]  # no temp files left
