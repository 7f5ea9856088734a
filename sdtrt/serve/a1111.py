"""AUTOMATIC1111's web UI API (``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img``): request bodies and answers.

Fields follow A1111's API so existing clients (``webuiapi``, scripts, front ends) work unchanged. Fields that only
tune features sdtrt does not have (hires fix, face restoration, tiling, subseeds, scripts, inpainting masks) are
accepted at their neutral values and refused otherwise, so a client never gets silently different images.
Samplers and schedule types are A1111 1.9+'s (``sdtrt.runtime.schedulers.a1111``): "DPM++ 2M" under the
Automatic schedule type runs Karras, as in A1111. ``eta`` is DDIM's (A1111's ``eta`` field, "Eta DDIM" in the
infotext); for the other samplers it is ignored, like ``s_churn`` and the other knobs.

Seeds, as A1111 has them: ``-1`` picks a random seed; image j of the request (``batch_size`` x ``n_iter`` images,
in order) gets seed S + j and is the image that seed makes alone (``sdtrt generate --seed S+j``): the request is
split into single-image requests with those seeds, which the micro-batcher runs together in as few passes as the
server's ``--max-batch`` allows. ``"batch_seeds": "generator"`` (an sdtrt field) asks instead for diffusers'
semantics, which the CLI and the Python API keep: one generator seeded S draws the whole batch of an iteration, the
images ``sdtrt generate --seed S --batch N`` makes; iteration k uses seed S + k.

Prompts follow A1111's rules (emphasis, BREAK, 75-token chunks: ``sdtrt.runtime.prompts``); ``"prompt_syntax":
"plain"`` (an sdtrt field) sends the text as diffusers reads it instead. ``<lora:NAME:SCALE>`` tags are taken out of
the prompt under either syntax, as A1111 takes out extra networks before it parses the prompt.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdtrt import __version__
from sdtrt.errors import UsageError
from sdtrt.runtime import schedulers
from sdtrt.runtime.request import MAX_BATCH, MAX_STEPS, SEED_RANGE, GenerateRequest
from sdtrt.runtime.schedulers.a1111 import samplers_api, schedulers_api
from sdtrt.serve.images import decode_image, encode_png
from sdtrt.serve.loras import NO_LORA_FOLDER, LoraFolder

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag, e.g. <lora:NAME:SCALE>
A1111_SEEDS, GENERATOR_SEEDS = "a1111", "generator"


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 clients send many fields; unknown ones change nothing here

    prompt: str | None = Field("", max_length=20000)  # null: "" (A1111 accepts it)
    negative_prompt: str | None = Field("", max_length=20000)
    seed: int = Field(-1, ge=-1, lt=2**63)
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated alias of sampler_name
    scheduler: str | None = None  # A1111 >= 1.9 "schedule type": Automatic, Uniform, Karras, Exponential
    eta: float | None = None  # DDIM's eta (other samplers: ignored)
    batch_seeds: Literal["a1111", "generator"] = A1111_SEEDS  # sdtrt: image j gets seed S + j, or one generator
    prompt_syntax: Literal["a1111", "plain"] = "a1111"  # sdtrt: A1111's emphasis and chunks, or the text as it is
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_BATCH)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=2048)  # None: the checkpoint's native size
    height: int | None = Field(None, ge=8, le=2048)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # accepted at their neutral values only
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgRequest(_Common):
    enable_hr: bool = False


class Img2ImgRequest(_Common):
    init_images: list[str] = Field(..., min_length=1, description="base64 images (raw or data: URLs)")
    denoising_strength: float = Field(0.75, gt=0, le=1)
    resize_mode: int = 0
    mask: str | None = None


class A1111Response(BaseModel):
    images: list[str]  # base64 PNGs with a "parameters" text chunk
    parameters: dict[str, Any]
    info: str  # JSON text, as A1111 sends it


def sampler_names() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's sampler names, their aliases (A1111's and sdtrt's) and options."""
    return samplers_api(schedulers.SCHEDULERS)


def schedule_types() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: the schedule types, in A1111's shape."""
    return schedulers_api()


def _eta(name: str | None, eta: float | None) -> float | None:
    """``eta`` for DDIM; None for every other sampler (A1111 clients such as webuiapi send eta=1 by default)."""
    if not eta or not name:
        return None
    try:
        is_ddim = schedulers.resolve(name, None, default="ddim").startswith("ddim")
    except UsageError:
        return None  # an unknown name: the request's validation names it
    return eta if is_ddim else None


def _clip_skip(overrides: dict[str, Any], model_name: str) -> int:
    clip_skip = 1
    for key, value in overrides.items():
        if key == "CLIP_stop_at_last_layers":
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"override_settings: CLIP_stop_at_last_layers must be 1 or 2, got {value!r}")
            clip_skip = value
        elif key == "sd_model_checkpoint":
            if value not in (model_name, None, ""):
                raise UsageError(f"this server serves {model_name!r}, not {value!r}")
        else:
            raise UsageError(f"override_settings: {key!r} is not supported "
                             "(supported: CLIP_stop_at_last_layers, sd_model_checkpoint)")
    return clip_skip


def _check_neutral(body: _Common) -> None:
    refused = {
        "enable_hr": "hires fix is not supported",
        "restore_faces": "face restoration is not supported",
        "tiling": "tiling is not supported",
        "script_name": "scripts are not supported",
        "alwayson_scripts": "scripts are not supported",
        "mask": "inpainting masks are not supported",
        "styles": "styles are not supported",
    }
    for name, why in refused.items():
        if getattr(body, name, None):
            raise UsageError(f"{name}: {why}")
    if body.subseed_strength:
        raise UsageError("subseed_strength: variation seeds are not supported")
    if isinstance(body, Img2ImgRequest):
        if body.resize_mode != 0:
            raise UsageError("resize_mode: only 0 (just resize) is supported")
        if len(body.init_images) != 1:
            raise UsageError(f"init_images: exactly one image is supported, got {len(body.init_images)}")


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:NAME>`` / ``<lora:NAME:SCALE>`` tags removed from the prompt text (replaced by nothing, as
    A1111 does) -> (text, [(name, scale), ...]) in the order written. Other extra networks are refused."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind != "lora":
            raise UsageError(f"prompt: {m.group(0)}: only <lora:NAME:SCALE> extra networks are supported")
        if len(args) > 2 or "=" in m.group(2):
            raise UsageError(f"prompt: {m.group(0)}: write <lora:NAME:SCALE> (one scale for the text encoder and "
                             "the UNet)")
        try:
            scale = float(args[1]) if len(args) > 1 else 1.0
        except ValueError:
            raise UsageError(f"prompt: {m.group(0)}: the scale {args[1]!r} is not a number") from None
        found.append((args[0], scale))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def to_requests(body: _Common, model_name: str, loras: LoraFolder = NO_LORA_FOLDER) -> list[GenerateRequest]:
    """The ``GenerateRequest``s of an A1111 request, in image order: one single-image request per image with seed
    S + j (A1111's seeds), or one per iteration (``n_iter``) with seed S + k (``batch_seeds="generator"``). The
    edge checks, the pipeline validates the rest. ``loras``: the server's LoRA folder, which turns the prompt's
    ``<lora:NAME:SCALE>`` tags into files."""
    _check_neutral(body)
    prompt, named = extract_loras(body.prompt or "")
    if _EXTRA_NETWORK.search(body.negative_prompt or ""):
        raise UsageError("negative_prompt: extra networks such as <lora:NAME:SCALE> are read in the prompt only")
    lora_set = loras.resolve(named)
    if body.batch_size * body.n_iter > MAX_BATCH:
        raise UsageError(f"batch_size x n_iter is {body.batch_size * body.n_iter}, over the limit of {MAX_BATCH}")
    seed = secrets.randbelow(SEED_RANGE) if body.seed == -1 else body.seed
    sampler = body.sampler_name or body.sampler_index
    clip_skip = _clip_skip(body.override_settings, model_name)
    init = None
    strength = 0.75
    if isinstance(body, Img2ImgRequest):
        init = decode_image(body.init_images[0], "init_images[0]")
        strength = body.denoising_strength
    base = GenerateRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or "", prompt_syntax=body.prompt_syntax, steps=body.steps,
        guidance=body.cfg_scale, scheduler=sampler, schedule_type=body.scheduler, eta=_eta(sampler, body.eta),
        seed=seed, batch=body.batch_size, height=body.height, width=body.width, clip_skip=clip_skip, init_image=init, strength=strength, loras=lora_set,
    )
    if body.batch_seeds == GENERATOR_SEEDS:
        return [replace(base, seed=seed + k) for k in range(body.n_iter)]
    return [replace(base, seed=seed + j, batch=1) for j in range(body.n_iter * body.batch_size)]


Infotext = Callable[[GenerateRequest, int, int, int], str]  # (request, batch_pos, batch_size, seed) -> text


def to_response(body: _Common, results: list, model_name: str, infotext: Infotext | None = None) -> A1111Response:
    """Answer as A1111 does: base64 PNGs, the request echoed as ``parameters``, and ``info`` as JSON text.
    ``infotext``: builds each image's ``parameters`` text (``sdtrt.runtime.infotext``); None: the pipeline's own."""
    first = results[0].request
    prompt = body.prompt or ""  # as sent: with its <lora:...> tags, which A1111's infotext keeps
    images, infotexts, seeds = [], [], []
    for res in results:
        for pos, (image, text) in enumerate(zip(res.images, res.infotexts, strict=True)):
            seed = res.request.seed
            if infotext is not None:
                n = len(images)
                batch_pos = pos if body.batch_seeds == GENERATOR_SEEDS else n % body.batch_size
                text = infotext(replace(res.request, prompt=prompt), batch_pos, body.batch_size, seed)
            elif res.request.prompt != prompt and text.startswith(res.request.prompt):
                text = prompt + text[len(res.request.prompt):]
            images.append(encode_png(image, text))
            infotexts.append(text)
            seeds.append(seed)
    n = len(images)
    sampler, schedule_type = schedulers.a1111_names(first.scheduler)
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * n,
        "seed": first.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": sampler,
        "scheduler": schedule_type or "Automatic",
        "cfg_scale": first.guidance,
        "steps": first.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": model_name,
        "denoising_strength": first.strength if first.init_image is not None else None,
        "clip_skip": first.clip_skip,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": False,
        "version": f"sdtrt {__version__}",
        "backend": results[0].backend,
    }
    params = body.model_dump(exclude={"init_images", "mask"})
    return A1111Response(images=images, parameters=params, info=json.dumps(info))
