"""LoRAs through the server (``sdtrt serve --lora-dir DIR``), driven by real clients on a loopback uvicorn.

A1111's ``<lora:NAME:SCALE>`` prompt tags and OpenAI's ``extra_body={"loras": [...]}`` must give exactly the image of
``pipe(..., loras=[(path, scale)])`` run alone (bitwise on onnxruntime's CPU backend), a burst mixing LoRA sets must
never share a pass, and every bad LoRA input is one 4xx JSON error.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import torch
import webuiapi
from safetensors.torch import save_file

from sdtrt import cli
from sdtrt.errors import UsageError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.serve.a1111 import extract_loras
from sdtrt.serve.app import ServeSpec, create_app
from sdtrt.serve.server import ThreadedServer
from tests.a1111_infotext import parse_generation_parameters
from tests.serve.test_serve_app import b64_pixels, pixels

BACKEND = "onnxruntime"
GEN = dict(seed=7, steps=4, width=64, height=64, cfg_scale=7.0, sampler_name="DDIM")  # A1111 fields


def write_lora(workdir: Path, path: Path, seed: int, metadata: dict[str, str] | None = None) -> Path:
    """A random kohya LoRA over the UNet's attention projections and the text encoder's q/v (from the manifest)."""
    comps = json.loads((workdir / "manifest.json").read_text())["components"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp, prefix, ends in (("unet", "lora_unet_", ("to_q", "to_v", "ff.net.2")),
                               ("text_encoder", "lora_te_", ("q_proj", "v_proj"))):
        for name, t in comps[comp]["lora"]["targets"].items():
            if name.endswith(ends):
                out, inp = t["shape"]
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) / inp ** 0.5
                tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_dir(sd1_workdir_fp32, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loras")
    write_lora(sd1_workdir_fp32, d / "style.safetensors", seed=1)
    (d / "sub").mkdir()  # A1111 walks subfolders; the alias is the training run's output name
    write_lora(sd1_workdir_fp32, d / "sub" / "detail.safetensors", seed=2,
               metadata={"ss_output_name": "detail-v2", "ss_tag_frequency": '{"set": {"cat": 3}}'})
    return d


@pytest.fixture(scope="module")
def pipe(sd1_workdir_fp32) -> Pipeline:
    return Pipeline.load(sd1_workdir_fp32, backend=BACKEND)


@pytest.fixture(scope="module")
def ref(sd1_workdir_fp32) -> Pipeline:
    """Reference images come from a second pipeline, so it never races a server's worker."""
    return Pipeline.load(sd1_workdir_fp32, backend=BACKEND)


def alone(ref: Pipeline, prompt: str, loras=(), seed: int = GEN["seed"]) -> np.ndarray:
    r = ref(prompt, seed=seed, num_inference_steps=GEN["steps"], height=64, width=64, guidance_scale=7.0,
            scheduler="ddim", loras=loras)
    return pixels(r.images[0])


class Recording:
    """The pipeline, with each pass's LoRA sets recorded; passes wait for ``gate`` once it is cleared."""

    def __init__(self, pipe: Pipeline) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.passes: list[list[tuple]] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_batch(self, reqs):
        self.passes.append([r.loras for r in reqs])
        self.entered.set()
        self.gate.wait(120)
        return self._pipe.generate_batch(reqs)


@pytest.fixture(scope="module")
def recording(pipe) -> Recording:
    return Recording(pipe)


@pytest.fixture(scope="module")
def server(recording, lora_dir):
    s = ThreadedServer(create_app(recording, ServeSpec(max_batch=4, max_queue=16, lora_dir=str(lora_dir))))
    yield s
    s.close()


def txt2img(server, prompt: str, **kw) -> requests.Response:
    return requests.post(f"{server.url}/sdapi/v1/txt2img", json={**GEN, "prompt": prompt, **kw}, timeout=120)


# -- A1111 ------------------------------------------------------------------------------------------------------------
def test_webuiapi_lora_tag_gives_the_image_of_generate_lora(server, ref, lora_dir, sd1_workdir_fp32, tmp_path):
    path = lora_dir / "style.safetensors"
    # eta=0: webuiapi sends eta=1.0 by default, which A1111 (and sdtrt) give to DDIM
    r = webuiapi.WebUIApi(port=server.port).txt2img(prompt="a red fox <lora:style:0.8>", eta=0, **GEN)
    got = pixels(r.images[0])
    out = tmp_path / "cli.png"
    assert cli.main(["generate", str(sd1_workdir_fp32), "a red fox", "--lora", f"{path}:0.8", "--seed", "7",
                     "--steps", "4", "--width", "64", "--height", "64", "--guidance", "7", "--scheduler", "ddim",
                     "--backend", BACKEND, "-q", "-o", str(out)]) == 0
    from PIL import Image

    assert np.array_equal(got, pixels(Image.open(out)))
    assert np.array_equal(got, alone(ref, "a red fox", [(str(path), 0.8)]))
    assert not np.array_equal(got, alone(ref, "a red fox"))  # the LoRA did something
    assert not np.array_equal(got, alone(ref, "a red fox", [(str(path), 1.0)]))  # at its scale
    # infotext as A1111 writes it: the prompt as sent (tags kept, so pasting it back reproduces the image), and
    # Lora hashes as the pipeline writes them
    params = parse_generation_parameters(r.images[0].info["parameters"])
    assert params["Prompt"] == "a red fox <lora:style:0.8>"
    from sdtrt.lora.files import read_lora

    assert params["Lora hashes"] == f"style: {read_lora(path).short_hash}"
    assert r.info["prompt"] == "a red fox <lora:style:0.8>"
    assert r.info["infotexts"][0] == r.images[0].info["parameters"]


def test_a_burst_mixing_lora_sets_gets_each_its_own_image(server, recording, ref, lora_dir):
    """Queued together, requests with different LoRA sets (and none) are never batched together: each gets the image
    its request makes alone."""
    style, detail = str(lora_dir / "style.safetensors"), str(lora_dir / "sub" / "detail.safetensors")
    asks = [("a cat", (), 11), ("a cat <lora:style:0.8>", ((style, 0.8),), 12),
            ("a cat <lora:detail-v2:0.5>", ((detail, 0.5),), 13), ("a dog", (), 14),
            ("a dog <lora:style:0.8>", ((style, 0.8),), 15), ("a dog <lora:detail:0.5>", ((detail, 0.5),), 16),
            ("a cow <lora:style:0.8> <lora:detail:-0.5>", ((style, 0.8), (detail, -0.5)), 17)]
    recording.passes.clear()
    recording.entered.clear()
    recording.gate.clear()  # the worker holds the first request while the others queue
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            first = pool.submit(txt2img, server, asks[0][0], seed=asks[0][2])
            assert recording.entered.wait(60)
            rest = [pool.submit(txt2img, server, p, seed=s) for p, _, s in asks[1:]]
            deadline = time.monotonic() + 60
            while server_depth(server) < len(asks) - 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            recording.gate.set()
            answers = [f.result() for f in [first, *rest]]
    finally:
        recording.gate.set()
    assert [a.status_code for a in answers] == [200] * len(asks), [a.text for a in answers]
    for (prompt, loras, seed), a in zip(asks, answers, strict=True):
        text = prompt.split(" <")[0]
        assert np.array_equal(b64_pixels(a.json()["images"][0]), alone(ref, text, loras, seed)), prompt
    sets = [{tuple((Path(p).name, s) for p, s in loras) for loras in one} for one in recording.passes]
    assert all(len(s) == 1 for s in sets), sets  # one LoRA set per pass
    assert max(len(p) for p in recording.passes) == 2  # and requests sharing a set were still batched


def server_depth(server) -> int:
    return requests.get(f"{server.url}/health", timeout=10).json()["queue_depth"]


@pytest.mark.parametrize(("prompt", "status", "detail"), [
    ("a cat <lora:nope:0.5>", 422, "unknown LoRA 'nope'; this server has: detail, style (a file added to "),
    ("a cat <lora:style:9>", 422, "LoRA style: scale must be a number in [-4, 4], got 9.0"),
    ("a cat <lora:style:strong>", 422, "prompt: <lora:style:strong>: the scale 'strong' is not a number"),
    ("a cat <lora:style:0.5:1>", 422, "prompt: <lora:style:0.5:1>: write <lora:NAME:SCALE>"),
    ("a cat <hypernet:style:1>", 422, "prompt: <hypernet:style:1>: only <lora:NAME:SCALE> extra networks"),
])
def test_bad_lora_tags_are_one_4xx_json_error(server, prompt, status, detail):
    r = txt2img(server, prompt)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] in ("UsageError", "LoraError")
    assert body["detail"].startswith(detail), body["detail"]


def test_lora_tags_without_a_lora_dir_and_in_the_negative_prompt_are_refused(pipe, server):
    r = txt2img(server, "a cat", negative_prompt="<lora:style:1>")
    assert (r.status_code, r.json()["detail"]) == (
        422, "negative_prompt: extra networks such as <lora:NAME:SCALE> are read in the prompt only")
    with ThreadedServer(create_app(pipe, ServeSpec())) as bare:
        r = txt2img(bare, "a cat <lora:style:1>")
        assert (r.status_code, r.json()["detail"]) == (
            422, "LoRA 'style': this server has no LoRA folder (start it with --lora-dir DIR)")
        assert requests.get(f"{bare.url}/sdapi/v1/loras", timeout=10).json() == []


def test_lora_list_and_refresh(pipe, ref, sd1_workdir_fp32, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    write_lora(sd1_workdir_fp32, d / "first.safetensors", seed=3)
    with ThreadedServer(create_app(pipe, ServeSpec(lora_dir=str(d)))) as s:
        api = webuiapi.WebUIApi(port=s.port)
        assert api.get_loras() == [{"name": "first", "alias": "first", "path": str((d / "first.safetensors").resolve()),
                                    "metadata": {}}]
        late = write_lora(sd1_workdir_fp32, d / "late.safetensors", seed=4,
                          metadata={"ss_output_name": "late-v1", "ss_network_dim": "4", "ss_tag_frequency": '{"a": 1}'})
        assert txt2img(s, "a cat <lora:late:0.7>").status_code == 422  # not scanned yet
        r = requests.post(f"{s.url}/sdapi/v1/refresh-loras", timeout=10)
        assert (r.status_code, r.json()) == (200, None)  # A1111 answers null
        assert {e["name"]: e for e in api.get_loras()}["late"] == {
            "name": "late", "alias": "late-v1", "path": str(late.resolve()),
            "metadata": {"ss_output_name": "late-v1", "ss_network_dim": "4", "ss_tag_frequency": {"a": 1}}}
        r = txt2img(s, "a cat <lora:late-v1:0.7>")  # by its alias
        assert r.status_code == 200, r.text
        assert np.array_equal(b64_pixels(r.json()["images"][0]), alone(ref, "a cat", [(str(late), 0.7)]))
        late.unlink()
        requests.post(f"{s.url}/sdapi/v1/refresh-loras", timeout=10)
        assert [e["name"] for e in api.get_loras()] == ["first"]


# -- OpenAI -----------------------------------------------------------------------------------------------------------
def test_openai_extra_body_loras(server, ref, lora_dir):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    style = str(lora_dir / "style.safetensors")
    extra = {"seed": 7, "steps": 4, "guidance_scale": 7.0, "sampler": "ddim"}
    r = client.images.generate(prompt="a red fox", size="64x64",
                               extra_body={**extra, "loras": [{"name": "style", "scale": 0.8}]})
    assert np.array_equal(b64_pixels(r.data[0].b64_json), alone(ref, "a red fox", [(style, 0.8)]))
    r = client.images.generate(prompt="a red fox", size="64x64", extra_body={**extra, "loras": [{"name": "style"}]})
    assert np.array_equal(b64_pixels(r.data[0].b64_json), alone(ref, "a red fox", [(style, 1.0)]))
    for loras, message in (([{"name": "nope", "scale": 0.8}], "unknown LoRA 'nope'"),
                           ([{"name": "style", "scale": -5}], "LoRA style: scale must be a number in [-4, 4]"),
                           ([{"name": "style", "weight": 0.5}], "loras.0.weight: Extra inputs are not permitted")):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="a red fox", size="64x64", extra_body={**extra, "loras": loras})
        err = e.value.body
        assert err["type"] == "invalid_request_error"
        assert err["message"].startswith(message), err["message"]


# -- the prompt tags alone, the CLI and the Ray builder ----------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "text", "loras"), [
    ("a cat", "a cat", []),
    ("a cat <lora:style>", "a cat ", [("style", 1.0)]),
    ("<lora:a:0.5>a (cat:1.2), <lora:b-c.v2:-1> BREAK x", "a (cat:1.2),  BREAK x", [("a", 0.5), ("b-c.v2", -1.0)]),
])
def test_extract_loras(prompt, text, loras):
    assert extract_loras(prompt) == (text, loras)


def test_cli_refuses_a_missing_lora_dir_before_loading(sd1_workdir_fp32, tmp_path, capsys, monkeypatch):
    from sdtrt.runtime import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "load", lambda *a, **k: pytest.fail("loaded the model"))
    code = cli.main(["serve", str(sd1_workdir_fp32), "--port", "0", "--lora-dir", str(tmp_path / "none")])
    assert (code, capsys.readouterr().err.strip()) == (2, f"sdtrt: error: --lora-dir {tmp_path / 'none'}: "
                                                          "no such directory")


def test_ray_builder_takes_lora_dir(sd1_workdir_fp32, lora_dir, tmp_path):
    pytest.importorskip("ray.serve")
    from sdtrt.serve.ray_app import build

    assert build({"workdir": str(sd1_workdir_fp32), "lora_dir": str(lora_dir)}) is not None
    with pytest.raises(UsageError, match="no such directory"):
        build({"workdir": str(sd1_workdir_fp32), "lora_dir": str(tmp_path / "none")})
