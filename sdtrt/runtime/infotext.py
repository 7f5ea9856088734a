"""A1111's ``parameters`` text (the "infotext") as a pure function of a request and facts about the model.

Written as AUTOMATIC1111 1.9+ writes it (``modules/processing.py`` ``create_infotext``), so A1111's own reader
(``infotext_utils.parse_generation_parameters``, "PNG Info", "Send to txt2img") and the tools that copy it read the
settings back: the prompt, ``Negative prompt:`` on its own line, then one line of ``key: value`` pairs. ``Sampler``
and ``Schedule type`` are A1111's names (``sdtrt.runtime.schedulers.a1111``: ``Schedule type`` only when the
schedule is not the model's own, as A1111's ``get_sigmas`` adds it); ``Model`` is the checkpoint's file name without
its extension and ``Model hash`` its short hash, the first 10 hex digits of the file's sha256
(``sd_models.CheckpointInfo``: ``name_for_extra``, ``shorthash = sha256[0:10]``); ``Eta DDIM`` when DDIM runs
with eta (``sd_samplers_timesteps``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime import schedulers
from sdtrt.runtime.request import GenerateRequest
from sdtrt.runtime.schedulers.a1111 import eta_of

SHORT_HASH = 10  # hex digits of a checkpoint's sha256 in A1111's "Model hash"


@dataclass(frozen=True)
class ModelFacts:
    """What the infotext says about the model that made an image."""

    name: str  # A1111's "Model": the checkpoint's file name without extension (a diffusers folder: its name)
    short_hash: str | None = None  # A1111's "Model hash"; None for a folder (A1111 loads single files only)
    backend: str = ""  # written as "Backend: sdtrt <backend>"


def model_facts(manifest: Mapping[str, Any], backend: str = "") -> ModelFacts:
    """``ModelFacts`` from an export's manifest: its source path and the sha256 the export recorded for a file."""
    source = manifest["source"]
    path = Path(source["path"])
    sha256 = source.get("sha256")
    name = path.stem if sha256 else path.name  # a file: without extension; a folder keeps its whole name
    return ModelFacts(name=name, short_hash=sha256[:SHORT_HASH] if sha256 else None, backend=backend)


def _quote(value: str) -> str:
    """A value with a comma, colon or newline is written JSON-quoted, as A1111's ``quote`` does."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def build_infotext(request: GenerateRequest, model: ModelFacts, *, batch_pos: int = 0, batch_size: int | None = None,
                   seed: int | None = None, lora_hashes: str | None = None) -> str:
    """The ``parameters`` text of image ``batch_pos`` of a *validated* request.

    ``batch_size``: the batch this image belongs to as the user asked for it (default: the request's own);
    ``seed``: the image's own seed where it differs from the request's (A1111 batches: seed + position);
    ``lora_hashes``: A1111's ``"name: 12 hex, ..."`` text for the request's LoRAs, when it has any.
    """
    sampler, schedule_type = schedulers.a1111_names(request.scheduler)
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": f"{request.guidance:g}",
        "Seed": request.seed if seed is None else seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
        "Denoising strength": f"{request.strength:g}" if request.init_image is not None else None,
        "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
    }
    size = request.batch if batch_size is None else batch_size
    if size > 1:
        params["Batch size"], params["Batch pos"] = size, batch_pos
    eta = eta_of(request.scheduler)
    params["Eta DDIM"] = f"{eta:g}" if eta else None
    params["Lora hashes"] = json.dumps(lora_hashes) if lora_hashes else None
    params["Backend"] = f"sdtrt {model.backend}" if model.backend else None
    line = ", ".join(f"{k}: {v if k == 'Lora hashes' else _quote(str(v))}" for k, v in params.items() if v is not None)
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{line}"
