"""OpenAI's images API (``POST /v1/images/generations``): request body and answer.

``size`` is ``WxH`` (any multiple of 8 the checkpoint runs; ``auto``: its native size), ``n`` is the batch,
images come back as ``b64_json`` PNGs (this server does not host files, so ``response_format=url`` is refused).
``model``, ``quality``, ``style``, ``user`` are accepted and do not change anything. sdtrt's own knobs ride in the
same body (``extra_body`` in the official client): ``negative_prompt``, ``steps``, ``guidance_scale``, ``seed``,
``sampler``, ``prompt_syntax`` (``a1111``, the default: A1111's emphasis, BREAK and 75-token chunks; ``plain``: the
text as diffusers reads it), and ``loras`` (``[{"name": ..., "scale": ...}]``, names from the server's ``--lora-dir``).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sdtrt.errors import UsageError
from sdtrt.runtime.request import MAX_BATCH, MAX_STEPS, GenerateRequest
from sdtrt.serve.images import encode_png
from sdtrt.serve.loras import NO_LORA_FOLDER, LoraFolder

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "scale" must not silently mean 1.0

    name: str = Field(..., min_length=1, max_length=1000)
    scale: float = 1.0  # its range is checked with the file (sdtrt.lora)


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, max_length=32000)
    n: int = Field(1, ge=1, le=MAX_BATCH)
    size: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # sdtrt's own (extra_body)
    negative_prompt: str = Field("", max_length=32000)
    steps: int = Field(30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.5, ge=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: str | None = None
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    loras: list[LoraRef] = Field(default_factory=list, max_length=16)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int  # sdtrt: the seed used, to reproduce the images


def to_request(body: ImageGenerationRequest, loras: LoraFolder = NO_LORA_FOLDER) -> GenerateRequest:
    if body.response_format != "b64_json":
        raise UsageError(f"response_format {body.response_format!r} is not supported; use 'b64_json' "
                         "(this server does not host image files)")
    if body.output_format != "png":
        raise UsageError(f"output_format {body.output_format!r} is not supported; use 'png'")
    height = width = None
    if body.size != "auto":
        m = _SIZE.match(body.size)
        if m is None:
            raise UsageError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {body.size!r}")
        width, height = int(m.group(1)), int(m.group(2))
    return GenerateRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, prompt_syntax=body.prompt_syntax, steps=body.steps,
        guidance=body.guidance_scale, scheduler=body.sampler,
        seed=secrets.randbelow(2**32) if body.seed is None else body.seed, batch=body.n, height=height, width=width, loras=loras.resolve([(ref.name, ref.scale) for ref in body.loras]),
    )


def to_response(result) -> ImagesResponse:
    data = [ImageData(b64_json=encode_png(im, text)) for im, text in zip(result.images, result.infotexts, strict=True)]
    return ImagesResponse(created=int(time.time()), data=data, seed=result.request.seed)
