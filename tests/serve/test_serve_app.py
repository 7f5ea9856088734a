"""The HTTP server on the tiny checkpoint, driven by real clients: webuiapi (A1111), openai, and plain requests.

Each server runs in a thread of this process on a free loopback port (uvicorn, as `sdtrt serve` runs it). Images are
compared pixel for pixel with `sdtrt generate` and with the pipeline run alone: on onnxruntime's CPU backend a row of
a micro-batch is bitwise the image its request makes alone.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import webuiapi
from PIL import Image

from sdtrt import cli
from sdtrt.errors import UsageError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest
from sdtrt.serve.app import ServeSpec, create_app
from sdtrt.serve.server import ThreadedServer
from tests.a1111_infotext import parse_generation_parameters

BACKEND = "onnxruntime"


class LiveServer(ThreadedServer):
    def close(self) -> None:
        super().close()
        assert not self.thread.is_alive()


class Gated:
    """A pipeline whose passes wait for ``gate`` (so tests decide when the GPU worker is busy)."""

    def __init__(self, pipe: Pipeline) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.passes: list[int] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_batch(self, reqs):
        self.passes.append(len(reqs))
        self.entered.set()
        self.gate.wait(120)
        return self._pipe.generate_batch(reqs)


@pytest.fixture(scope="module")
def pipe(sd1_workdir_fp32: Path) -> Pipeline:
    return Pipeline.load(sd1_workdir_fp32, backend=BACKEND)


@pytest.fixture(scope="module")
def ref(sd1_workdir_fp32: Path) -> Pipeline:
    """A second pipeline for reference images, so it never races a server's worker."""
    return Pipeline.load(sd1_workdir_fp32, backend=BACKEND)


@pytest.fixture(scope="module")
def server(pipe: Pipeline):
    s = LiveServer(create_app(pipe, ServeSpec(max_batch=4, max_queue=16)))
    yield s
    s.close()


@pytest.fixture
def a1111(server: LiveServer) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(port=server.port)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def b64_pixels(data: str) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(base64.b64decode(data))))


def cli_generate(workdir: Path, tmp_path: Path, *args: str) -> list[np.ndarray]:
    out = tmp_path / "cli.png"
    assert cli.main(["generate", str(workdir), *args, "--backend", BACKEND, "-q", "-o", str(out)]) == 0
    paths = sorted(tmp_path.glob("cli*.png"))
    return [pixels(Image.open(p)) for p in paths]


# -- A1111 ------------------------------------------------------------------------------------------------------------
def test_webuiapi_txt2img_equals_sdtrt_generate(a1111, sd1_workdir_fp32, tmp_path):
    # webuiapi sends eta=1.0 unless told otherwise, and A1111 runs DDIM with the request's eta
    # (sd_samplers_timesteps: p.eta if p.eta is not None else opts.eta_ddim): so does sdtrt
    r = a1111.txt2img(prompt="a red fox in the snow", negative_prompt="blurry", seed=1234, steps=5, cfg_scale=7.0,
                      width=64, height=48, sampler_name="DDIM")
    expected = cli_generate(sd1_workdir_fp32, tmp_path, "a red fox in the snow", "--negative-prompt", "blurry",
                            "--seed", "1234", "--steps", "5", "--guidance", "7", "--width", "64", "--height", "48",
                            "--scheduler", "ddim", "--eta", "1")
    assert len(r.images) == 1
    assert np.array_equal(pixels(r.images[0]), expected[0])
    assert r.images[0].info["parameters"] == r.info["infotexts"][0]
    # the PNG's text as A1111 reads it, against the request (not against our own infotext)
    params = parse_generation_parameters(r.images[0].info["parameters"])
    assert {k: params.get(k) for k in ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size-1",
                                       "Size-2", "Clip skip")} == {
        "Prompt": "a red fox in the snow", "Negative prompt": "blurry", "Steps": "5", "Sampler": "DDIM",
        "CFG scale": "7", "Seed": "1234", "Size-1": "64", "Size-2": "48", "Clip skip": "1"}
    assert r.info["all_seeds"] == [1234]
    assert (r.info["sampler_name"], r.info["steps"], r.info["width"], r.info["height"]) == ("DDIM", 5, 64, 48)
    assert "Seed: 1234" in r.info["infotexts"][0] and "Sampler: DDIM" in r.info["infotexts"][0]
    assert r.parameters["prompt"] == "a red fox in the snow"


def test_webuiapi_batch_has_a1111_seeds_each_image_reproduces_alone(a1111, server, sd1_workdir_fp32, tmp_path):
    """A1111's batch semantics (the A1111 endpoints' default): image j of seed S is the image of seed S + j alone,
    and "DPM++ 2M" under the Automatic schedule type is Karras (A1111 1.9+)."""
    r = a1111.txt2img(prompt="two boats", seed=7, steps=4, cfg_scale=5.0, width=64, height=64, batch_size=2,
                      sampler_name="DPM++ 2M")
    for j in range(2):
        expected = cli_generate(sd1_workdir_fp32, tmp_path / str(j), "two boats", "--seed", str(7 + j), "--steps", "4",
                                "--guidance", "5", "--scheduler", "DPM++ 2M", "--schedule-type", "Karras")
        assert np.array_equal(pixels(r.images[j]), expected[0]), j
        params = parse_generation_parameters(r.images[j].info["parameters"])
        assert (params["Seed"], params["Batch size"], params["Batch pos"]) == (str(7 + j), "2", str(j))
        assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert r.info["all_seeds"] == [7, 8] and r.info["batch_size"] == 2
    assert (r.info["sampler_name"], r.info["scheduler"]) == ("DPM++ 2M", "Karras")
    # diffusers' generator semantics on request: the images `sdtrt generate --seed 7 --batch 2` makes
    body = {"prompt": "two boats", "seed": 7, "steps": 4, "cfg_scale": 5.0, "width": 64, "height": 64, "batch_size": 2,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_seeds": "generator"}
    g = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60).json()
    expected = cli_generate(sd1_workdir_fp32, tmp_path, "two boats", "--seed", "7", "--steps", "4", "--guidance", "5",
                            "--batch", "2", "--scheduler", "dpmpp_2m_karras")
    assert [b64_pixels(im).tolist() for im in g["images"]] == [e.tolist() for e in expected]
    assert json.loads(g["info"])["all_seeds"] == [7, 7]
    assert not np.array_equal(pixels(r.images[1]), expected[1])  # the two semantics differ past the first image


def test_a1111_batch_is_split_into_seeds_that_run_in_one_pass(pipe, ref):
    """batch_size 3 with A1111's seeds: three single-image requests (seeds S, S+1, S+2) in one pipeline pass."""
    gated = Gated(pipe)
    gated.gate.set()
    s = LiveServer(create_app(gated, ServeSpec(max_batch=4, max_queue=16)))
    try:
        body = {"prompt": "a barn", "seed": 20, "steps": 2, "width": 64, "height": 64, "batch_size": 3,
                "sampler_name": "Euler a"}
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert gated.passes == [3]  # one generate_batch call with three requests
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [20, 21, 22] and info["batch_size"] == 3
        for j, image in enumerate(r.json()["images"]):
            alone = ref(prompt="a barn", seed=20 + j, num_inference_steps=2, guidance_scale=7.0, height=64, width=64,
                        scheduler="euler_a")
            assert np.array_equal(b64_pixels(image), pixels(alone.images[0])), j
    finally:
        s.close()


def test_new_samplers_and_eta_over_the_a1111_api(a1111, sd1_workdir_fp32, tmp_path):
    for sampler, extra, ours in (("Heun", {}, ["--scheduler", "heun"]),
                                 ("DPM++ 2M SDE", {"scheduler": "Karras"}, ["--scheduler", "dpmpp_2m_sde_karras"]),
                                 ("DDIM", {"eta": 0.5}, ["--scheduler", "ddim", "--eta", "0.5"])):
        r = a1111.txt2img(prompt="a kite", seed=3, steps=3, width=64, height=64, sampler_name=sampler, **extra)
        expected = cli_generate(sd1_workdir_fp32, tmp_path / sampler, "a kite", "--seed", "3", "--steps", "3",
                                "--guidance", "7", *ours)
        assert np.array_equal(pixels(r.images[0]), expected[0]), sampler
    params = parse_generation_parameters(r.images[0].info["parameters"])
    assert params["Eta DDIM"] == "0.5" and params["Sampler"] == "DDIM"
    # webuiapi sends eta=1.0 by default: it is DDIM's only, so Euler a is unchanged by it
    a = a1111.txt2img(prompt="a kite", seed=3, steps=2, width=64, height=64, sampler_name="Euler a", eta=1.0)
    b = a1111.txt2img(prompt="a kite", seed=3, steps=2, width=64, height=64, sampler_name="Euler a", eta=0.3)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_prompt_syntax_plain_over_both_apis_equals_sdtrt_generate(a1111, server, sd1_workdir_fp32, tmp_path):
    """sdtrt's `prompt_syntax` field (A1111 body, OpenAI extra_body): "plain" sends `(cat:1.5)` as text, the image
    `sdtrt generate --prompt-syntax plain` makes; the default is A1111's syntax, `cat` weighted 1.5, another image."""
    prompt = "a photo of a (cat:1.5)"
    (tmp_path / "plain").mkdir()
    (tmp_path / "a1111").mkdir()
    common = ("--seed", "7", "--steps", "2", "--width", "64", "--height", "64", "--scheduler", "euler")
    plain = cli_generate(sd1_workdir_fp32, tmp_path / "plain", prompt, *common, "--prompt-syntax", "plain")[0]
    weighted = cli_generate(sd1_workdir_fp32, tmp_path / "a1111", prompt, *common)[0]
    assert not np.array_equal(plain, weighted)
    body = {"prompt": prompt, "seed": 7, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7.5}
    for extra, expected in (({"prompt_syntax": "plain"}, plain), ({}, weighted), ({"prompt_syntax": "a1111"}, weighted)):
        r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(b64_pixels(r.json()["images"][0]), expected), extra
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for extra, expected in (({"prompt_syntax": "plain"}, plain), ({}, weighted)):
        resp = client.images.generate(prompt=prompt, size="64x64", response_format="b64_json",
                                      extra_body={"seed": 7, "steps": 2, "sampler": "euler", **extra})
        assert np.array_equal(b64_pixels(resp.data[0].b64_json), expected), extra
    with pytest.raises(openai.BadRequestError, match="prompt_syntax: Input should be 'a1111' or 'plain'"):
        client.images.generate(prompt="x", size="64x64", extra_body={"prompt_syntax": "markdown"})


def test_webuiapi_img2img_equals_sdtrt_generate(a1111, sd1_workdir_fp32, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    r = a1111.img2img(images=[init], prompt="a painting", seed=99, steps=6, cfg_scale=7.5, denoising_strength=0.5,
                      width=64, height=64, sampler_name="Euler a")
    expected = cli_generate(sd1_workdir_fp32, tmp_path, "a painting", "--seed", "99", "--steps", "6", "--strength", "0.5",
                            "--init-image", str(tmp_path / "init.png"), "--scheduler", "euler_a")
    assert np.array_equal(pixels(r.images[0]), expected[0])
    assert r.info["denoising_strength"] == 0.5


def test_random_seed_is_reported_and_reproduces(a1111, ref):
    r = a1111.txt2img(prompt="a lighthouse", seed=-1, steps=3, width=64, height=64, sampler_name="Euler")
    seed = r.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and r.info["all_seeds"] == [seed]
    again = ref(prompt="a lighthouse", seed=seed, num_inference_steps=3, guidance_scale=7.0, height=64, width=64,
                scheduler="euler")
    assert np.array_equal(pixels(r.images[0]), pixels(again.images[0]))


def test_n_iter_runs_one_request_per_iteration_with_seed_plus_k(a1111, ref):
    r = a1111.txt2img(prompt="hills", seed=10, steps=3, width=64, height=64, n_iter=2, sampler_name="DDIM", eta=0)
    assert r.info["all_seeds"] == [10, 11]
    for k, image in enumerate(r.images):
        alone = ref(prompt="hills", seed=10 + k, num_inference_steps=3, guidance_scale=7.0, height=64, width=64,
                    scheduler="ddim")
        assert np.array_equal(pixels(image), pixels(alone.images[0]))


def test_a1111_listing_endpoints(a1111, server):
    samplers = {s["name"]: s for s in a1111.get_samplers()}
    assert list(samplers)[:3] == ["DPM++ 2M", "DPM++ 2M SDE", "Euler a"]
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"} and "dpmpp_2m" in samplers["DPM++ 2M"]["aliases"]
    schedule_types = requests.get(f"{server.url}/sdapi/v1/schedulers", timeout=10).json()
    assert schedule_types == [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
        {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        {"name": "exponential", "label": "Exponential", "aliases": None, "default_rho": -1.0,
         "need_inner_model": False},
    ]
    assert [s["label"] for s in a1111.get_schedulers()] == ["Automatic", "Uniform", "Karras", "Exponential"]
    models = requests.get(f"{server.url}/sdapi/v1/sd-models", timeout=10).json()
    assert models[0]["model_name"] == "tiny-sd1"
    assert requests.get(f"{server.url}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == "tiny-sd1"


# -- OpenAI -----------------------------------------------------------------------------------------------------------
def test_openai_client_images_equal_sdtrt_generate(server, sd1_workdir_fp32, tmp_path):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    resp = client.images.generate(prompt="a castle on a hill", n=2, size="64x64", response_format="b64_json",
                                  extra_body={"seed": 42, "steps": 4, "sampler": "euler_a", "guidance_scale": 6.0})
    expected = cli_generate(sd1_workdir_fp32, tmp_path, "a castle on a hill", "--seed", "42", "--steps", "4",
                            "--batch", "2", "--scheduler", "euler_a", "--guidance", "6")
    assert [b64_pixels(d.b64_json).tolist() for d in resp.data] == [e.tolist() for e in expected]
    assert resp.seed == 42  # sdtrt's extra field


def test_openai_client_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="width must be a multiple of 8 between 8 and 2048, got 65"):
        client.images.generate(prompt="x", size="65x64")
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported; use 'b64_json'"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.BadRequestError, match=r"size must be 'WIDTHxHEIGHT'"):
        client.images.generate(prompt="x", size="big")
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 64"):
        client.images.generate(prompt="x", n=65)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="64x64", extra_body={"sampler": "nope"})
    assert e.value.body["type"] == "invalid_request_error"
    assert "unknown scheduler 'nope'" in e.value.body["message"]


# -- bad input: one clear 4xx JSON error each, never a 500 -----------------------------------------------------------------
BAD = [
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65}, 422, "width must be a multiple of 8 between 8 and 2048, got 65"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 4096}, 422, "width: Input should be less than or equal to 2048"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM2"}, 422,
     "unknown scheduler 'DPM2'; choose one of ddim, pndm, euler, "),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM++ SDE"}, 422, "or an A1111 sampler: 'DPM++ 2M', "),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Euler a", "scheduler": "Karras"}, 422,
     "schedule type 'Karras' is not available with 'Euler a' here; choose Automatic or one of: Uniform"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "Beta"}, 422, "unknown schedule type 'Beta'; choose one of: "
     "Automatic, Uniform, Karras, Exponential"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DDIM", "eta": 2}, 422, "eta must be a number between 0 and 1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_seeds": "other"}, 422, "batch_seeds: Input should be 'a1111' or "
     "'generator'"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 422, "enable_hr: hires fix is not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "subseed_strength": 0.5}, 422, "variation seeds are not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_vae": "x"}}, 422, "'sd_vae' is not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}, 422,
     "this server serves 'tiny-sd1', not 'other'"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 3}}, 422,
     "clip-skip must be 1 (last layer) or 2 (penultimate layer), got 3"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 8, "n_iter": 9}, 422, "batch_size x n_iter is 72"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -5}, 422, "seed: Input should be greater than or equal to -1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images: Field required"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, 422, "init_images[0]: not valid base64"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]}, 422,
     "init_images[0]: not a readable image"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["a", "b"]}, 422, "exactly one image is supported, got 2"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["a"], "mask": "m"}, 422, "inpainting masks are not supported"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["a"], "denoising_strength": 0}, 422,
     "denoising_strength: Input should be greater than 0"),
    # every scheduler runs img2img now (multistep warm-up restarts mid-schedule); A1111 syntax sdtrt lacks is refused
    ("/sdapi/v1/txt2img", {"prompt": "a [cat:dog:0.5]"}, 422, "prompt: prompt editing [cat:dog:0.5]"),
    ("/sdapi/v1/txt2img", {"prompt": "a [cat|dog]"}, 422, "prompt: alternation [cat|dog]"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "prompt_syntax": "markdown"}, 422,
     "prompt_syntax: Input should be 'a1111' or 'plain'"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_input_gets_one_clear_json_error(server, path, body, status, message):
    if path.endswith("img2img") and body.get("init_images") == ["a"]:
        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, format="PNG")
        body = {**body, "init_images": [base64.b64encode(png.getvalue()).decode()]}
    r = requests.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_malformed_json_is_a_422_not_a_500(server):
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=b"{not json", headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == 422
    assert "JSON decode error" in r.json()["detail"]


# -- health, metrics, schema --------------------------------------------------------------------------------------------
def test_health_metrics_and_openapi(server, a1111):
    a1111.txt2img(prompt="m", seed=1, steps=2, width=64, height=64, sampler_name="DDIM")
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "tiny-sd1" and health["max_queue"] == 16
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    for name in ("sdtrt_requests_total", "sdtrt_request_seconds_bucket", "sdtrt_queue_depth", "sdtrt_batch_images_bucket",
                 "sdtrt_generate_seconds_bucket", "sdtrt_queue_wait_seconds_bucket"):
        assert name in text
    assert 'sdtrt_requests_total{api="a1111",code="200"}' in text
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/health", "/metrics"):
        assert path in schema["paths"]


# -- the load test: 64 concurrent requests through a queue of 16 ----------------------------------------------------------
def test_64_concurrent_requests_through_max_queue_16_each_answered_or_refused(sd1_workdir_fp32, ref):
    gated = Gated(Pipeline.load(sd1_workdir_fp32, backend=BACKEND))
    s = LiveServer(create_app(gated, ServeSpec(max_batch=4, max_queue=16, batch_window_ms=20)))
    try:
        statuses: dict[int, requests.Response] = {}

        def post(seed: int) -> None:
            body = {"prompt": f"request {seed % 3}", "seed": seed, "steps": 4, "width": 64, "height": 64,
                    "sampler_name": "Euler a", "cfg_scale": 7.5}
            statuses[seed] = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, timeout=300)

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(post, seed) for seed in range(64)]
            # the worker holds its first pass (1-4 requests), the queue fills to 16, every other request is refused
            assert gated.entered.wait(60)
            held = gated.passes[0]
            deadline = time.monotonic() + 120
            while sum(r.status_code == 429 for r in list(statuses.values())) < 64 - 16 - held:
                assert time.monotonic() < deadline, f"only {len(statuses)} answers so far"
                time.sleep(0.02)
            gated.gate.set()
            for f in futures:
                f.result()
        codes = sorted(r.status_code for r in statuses.values())
        assert len(codes) == 64 and set(codes) <= {200, 429}
        ok = {seed: r for seed, r in statuses.items() if r.status_code == 200}
        refused = [r for r in statuses.values() if r.status_code == 429]
        assert len(ok) == 16 + held and len(refused) == 64 - 16 - held
        for r in refused:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"] == "QueueFull" and "the queue is full (16 of 16" in r.json()["detail"]
        for seed, r in ok.items():  # each served image is the one its request makes alone
            alone = ref(prompt=f"request {seed % 3}", seed=seed, num_inference_steps=4, height=64, width=64,
                        scheduler="euler_a")
            assert np.array_equal(b64_pixels(r.json()["images"][0]), pixels(alone.images[0])), seed
        assert max(gated.passes) <= 4 and sum(gated.passes) == len(ok)
        assert any(n > 1 for n in gated.passes)  # micro-batching happened
        metrics = requests.get(f"{s.url}/metrics", timeout=10).text
        assert f"sdtrt_rejected_total {float(len(refused))}" in metrics
        assert f'sdtrt_requests_total{{api="a1111",code="429"}} {float(len(refused))}' in metrics
        assert f'sdtrt_errors_total{{kind="QueueFull"}} {float(len(refused))}' in metrics
    finally:
        gated.gate.set()
        s.close()


# -- timeouts, auth, body limit -----------------------------------------------------------------------------------------
def test_timeout_answers_504_and_a_queued_request_that_timed_out_never_runs(sd1_workdir_fp32):
    gated = Gated(Pipeline.load(sd1_workdir_fp32, backend=BACKEND))
    s = LiveServer(create_app(gated, ServeSpec(max_batch=1, timeout_s=0.5, batch_window_ms=0)))
    try:
        body = {"prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(requests.post, f"{s.url}/sdapi/v1/txt2img", json=body, timeout=60)
            assert gated.entered.wait(30)
            second = pool.submit(requests.post, f"{s.url}/sdapi/v1/txt2img", json={**body, "seed": 2}, timeout=60)
            r1, r2 = first.result(), second.result()
        for r in (r1, r2):
            assert r.status_code == 504
            assert r.json()["detail"] == "the request did not finish within 0.5 s"
        gated.gate.set()
        ok = requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "seed": 3}, timeout=60)
        assert ok.status_code == 200
        assert gated.passes == [1, 1]  # the held request and the last one; the timed-out queued one was skipped
    finally:
        gated.gate.set()
        s.close()


def test_a_request_whose_client_disconnected_is_withdrawn(sd1_workdir_fp32):
    gated = Gated(Pipeline.load(sd1_workdir_fp32, backend=BACKEND))
    s = LiveServer(create_app(gated, ServeSpec(max_batch=1, batch_window_ms=0)))
    try:
        body = {"prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64}
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(requests.post, f"{s.url}/sdapi/v1/txt2img", json=body, timeout=60)
            assert gated.entered.wait(30)
            with pytest.raises(requests.Timeout):  # the client gives up while its request waits in the queue
                requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "seed": 2}, timeout=0.5)
            deadline = time.monotonic() + 30
            while 'kind="ClientGone"' not in requests.get(f"{s.url}/metrics", timeout=10).text:
                assert time.monotonic() < deadline, "the server did not notice the disconnect"
                time.sleep(0.05)
            gated.gate.set()
            assert held.result().status_code == 200
        assert requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "seed": 3}, timeout=60).status_code == 200
        assert gated.passes == [1, 1]  # the abandoned request never ran
    finally:
        gated.gate.set()
        s.close()


def test_api_key_bearer_and_basic_auth(sd1_workdir_fp32):
    s = LiveServer(create_app(Pipeline.load(sd1_workdir_fp32, backend=BACKEND), ServeSpec(api_key="s3cret")))
    try:
        body = {"prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64}
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, timeout=30)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["detail"] == "missing or wrong API key (send 'Authorization: Bearer KEY')"
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, auth=("user", "wrong"), timeout=30)
        assert r.status_code == 401
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", data=b"{not json", timeout=30)
        assert r.status_code == 401  # the key is checked before the body is read
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": "Basic \u00ff\u00fe"},
                          timeout=30)
        assert r.status_code == 401
        for path in ("/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/v1/models"):
            assert requests.get(f"{s.url}{path}", timeout=10).status_code == 401, path
            assert requests.get(f"{s.url}{path}", headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
        assert requests.get(f"{s.url}/openapi.json", timeout=10).status_code == 200
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200  # probes need no key
        api = webuiapi.WebUIApi(port=s.port, username="anyone", password="s3cret")  # A1111's --api-auth style
        assert len(api.txt2img(prompt="x", seed=1, steps=2, width=64, height=64).images) == 1
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).images.generate(prompt="x", size="64x64")
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert len(good.images.generate(prompt="x", size="64x64", extra_body={"steps": 2}).data) == 1
    finally:
        s.close()


def test_body_over_the_limit_is_413(sd1_workdir_fp32):
    s = LiveServer(create_app(Pipeline.load(sd1_workdir_fp32, backend=BACKEND), ServeSpec(max_body_mb=0.01)))
    try:
        big = {"prompt": "x" * 20000}
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json=big, timeout=30)
        assert r.status_code == 413 and "over the limit of 10485 bytes" in r.json()["detail"]
        chunks = (part for part in [json.dumps(big).encode()[i:i + 4096] for i in range(0, 20020, 4096)])
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", data=chunks, headers={"content-type": "application/json"},
                          timeout=30)  # chunked: no Content-Length, counted while read
        assert r.status_code == 413 and "over the limit" in r.json()["detail"]
        r = requests.post(f"{s.url}/v1/images/generations", json={"prompt": "x" * 20000}, timeout=30)
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    finally:
        s.close()


def test_generation_failure_is_a_500_with_the_reason(sd1_workdir_fp32):
    class Failing:
        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def generate_batch(self, reqs):
            from sdtrt.runtime.pipeline import NonFiniteError

            raise NonFiniteError("the VAE decoder produced NaN/inf pixels (fp16 overflow)")

    s = LiveServer(create_app(Failing(Pipeline.load(sd1_workdir_fp32, backend=BACKEND)), ServeSpec()))
    try:
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64},
                          timeout=30)
        assert r.status_code == 500
        assert r.json() == {"error": "NonFiniteError",
                            "detail": "generation failed: the VAE decoder produced NaN/inf pixels (fp16 overflow)"}
        assert 'sdtrt_errors_total{kind="NonFiniteError"} 1.0' in requests.get(f"{s.url}/metrics", timeout=10).text
        # the server goes on
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        s.close()


def test_generate_request_of_a_served_call_is_validated_like_the_cli(pipe):
    # the server and the CLI share GenerateRequest validation: the same message for the same bad value
    with pytest.raises(UsageError, match="height must be a multiple of 8 between 8 and 2048, got 60"):
        pipe.validate(GenerateRequest("x", height=60))


def test_server_limits_on_images_per_request_and_steps(server):
    body = {"prompt": "x", "batch_size": 5, "batch_seeds": "generator"}  # A1111 seeds split it into 5 requests
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert r.status_code == 422
    assert r.json()["detail"] == "a request of 5 images is over this server's limit of 4 per pass (--max-batch)"
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 151}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"] == "steps 151 is over this server's limit of 150 (--max-steps)"
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "n_iter": 17, "steps": 2}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"] == "this request needs 17 queue slots; the server has 16 (--max-queue)"
    r = requests.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "n": 5}, timeout=30)
    assert r.status_code == 400 and "over this server's limit of 4 per pass" in r.json()["error"]["message"]


def test_lenient_a1111_inputs(server, ref):
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    wrapped = base64.encodebytes(png.getvalue()).decode()  # MIME line breaks, as some clients send
    body = {"prompt": None, "negative_prompt": None, "init_images": [wrapped], "seed": 3, "steps": 4,
            "sampler_name": "DDIM", "width": 64, "height": 64}
    r = requests.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    bad = {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": True}}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=bad, timeout=30)
    assert r.status_code == 422 and "CLIP_stop_at_last_layers must be 1 or 2, got True" in r.json()["detail"]
    progress = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


def test_framework_errors_keep_the_error_shapes(server):
    r = requests.get(f"{server.url}/v1/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = requests.get(f"{server.url}/sdapi/v1/nope", timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "HTTPError", "detail": "Not Found"}
    r = requests.get(f"{server.url}/sdapi/v1/txt2img", timeout=10)
    assert r.status_code == 405 and r.json()["detail"] == "Method Not Allowed"
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", data=b"\xff\xfe", headers={"content-type": "application/json"},
                      timeout=10)
    assert 400 <= r.status_code < 500 and "detail" in r.json()


def test_engine_limits_cap_micro_batches_and_refuse_what_they_cannot_run(sd1_workdir_fp32):
    """An engine built for one image at 64x64 (2B <= 2): a request of 2 images or another size is a 422, and
    concurrent requests run one per pass instead of failing together."""
    from sdtrt.engines.profiles import AxisRange, ComponentProfile, check_shape

    pipe = Pipeline.load(sd1_workdir_fp32, backend=BACKEND)
    profile = ComponentProfile("unet", (AxisRange("2B", 1, 2, 2), AxisRange("H", 8, 8, 8), AxisRange("W", 8, 8, 8)), 8)
    pipe._unet.check = lambda dims: check_shape(profile, dims, "rebuild with `sdtrt build --dynamic`")
    gated = Gated(pipe)
    s = LiveServer(create_app(gated, ServeSpec(max_batch=4, max_queue=16, batch_window_ms=50)))
    try:
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM"}
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "batch_size": 2, "batch_seeds": "generator"},
                          timeout=30)
        assert r.status_code == 422 and "the unet engine cannot run this shape" in r.json()["detail"]
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "width": 72}, timeout=30)
        assert r.status_code == 422 and "rebuild with `sdtrt build --dynamic`" in r.json()["detail"]
        gated.gate.set()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda seed: requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "seed": seed},
                                                               timeout=60), range(4)))
        assert [r.status_code for r in results] == [200] * 4
        assert gated.passes == [1, 1, 1, 1]
        # A1111's seeds split a batch into single images: the engine runs them one per pass
        r = requests.post(f"{s.url}/sdapi/v1/txt2img", json={**body, "batch_size": 2, "seed": 5}, timeout=60)
        assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [5, 6]
        assert gated.passes == [1] * 6
    finally:
        gated.gate.set()
        s.close()
