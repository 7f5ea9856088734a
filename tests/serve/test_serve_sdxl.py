"""An SDXL WORKDIR behind the server, driven by real clients (webuiapi, openai, plain HTTP) on a loopback uvicorn:
each image equals the pipeline's own for the same settings, the native size is the default, and sizes the model
cannot take are refused."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import requests
import webuiapi

from sdtrt.runtime.pipeline import Pipeline
from sdtrt.serve.app import ServeSpec, create_app
from tests.serve.test_serve_app import LiveServer, b64_pixels, pixels

BACKEND = "onnxruntime"


@pytest.fixture(scope="module")
def ref(sdxl_workdir_fp32) -> Pipeline:
    return Pipeline.load(sdxl_workdir_fp32, backend=BACKEND)


@pytest.fixture(scope="module")
def server(sdxl_workdir_fp32):
    s = LiveServer(create_app(Pipeline.load(sdxl_workdir_fp32, backend=BACKEND), ServeSpec(max_batch=4, max_queue=8)))
    yield s
    s.close()


def alone(ref: Pipeline, **kw) -> np.ndarray:
    return pixels(ref("a red fox", num_inference_steps=4, seed=7, guidance_scale=6.0, **kw).images[0])


def test_webuiapi_txt2img_on_sdxl(server, ref):
    api = webuiapi.WebUIApi(port=server.port)
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=7, steps=4, cfg_scale=6.0, width=64,
                    height=64, sampler_name="Euler")
    assert np.array_equal(pixels(r.image), alone(ref, negative_prompt="blurry", scheduler="euler"))
    assert r.info["sd_model_name"] == ref.model_name


def test_a1111_lists_the_sdxl_model_and_defaults_to_its_native_size(server, ref):
    models = requests.get(f"{server.url}/sdapi/v1/sd-models", timeout=30).json()
    assert [m["model_name"] for m in models] == [ref.model_name]
    body = {"prompt": "a red fox", "seed": 7, "steps": 4, "cfg_scale": 6.0, "sampler_name": "Euler"}  # no size
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = b64_pixels(r.json()["images"][0])
    assert image.shape == (64, 64, 3)  # tiny-sdxl's native size (1024 for SDXL 1.0)
    assert np.array_equal(image, alone(ref, scheduler="euler"))


def test_openai_images_on_sdxl(server, ref):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    r = client.images.generate(prompt="a red fox", n=1, size="64x64", response_format="b64_json",
                               extra_body={"seed": 7, "steps": 4, "guidance_scale": 6.0, "sampler": "euler"})
    assert np.array_equal(b64_pixels(r.data[0].b64_json), alone(ref, scheduler="euler"))


def test_sdxl_refuses_clip_skip_in_one_clear_error(server):
    body = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64,
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code in (400, 422), r.text
    assert "clip skip 2 is not available for sdxl" in r.text
