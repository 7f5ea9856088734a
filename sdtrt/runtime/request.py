"""A generation request, validated once at the edge; the hot loop trusts it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from sdtrt.errors import UsageError
from sdtrt.runtime import prompts, schedulers
from sdtrt.runtime.schedulers.a1111 import SAMPLERS as A1111_SAMPLERS

MAX_SIDE = 2048
MAX_BATCH = 64
MAX_STEPS = 1000
RANDOM_SEED = -1  # draw a random seed (A1111's -1); the validated request carries the seed drawn
SEED_RANGE = 2**32  # random seeds are drawn below this, as A1111 draws them


@dataclass(frozen=True)
class GenerateRequest:
    """txt2img (``init_image`` None) or img2img. ``height``/``width`` None: the checkpoint's native size.
    ``scheduler`` None: the checkpoint's own; an sdtrt name or an A1111 sampler name ("DPM++ 2M", "Euler a"), with
    A1111's ``schedule_type`` (None: Automatic, which for an A1111 name means what A1111 1.9+ means: "DPM++ 2M" runs
    Karras). ``eta``: DDIM's (0 or None: deterministic). ``seed`` -1: a random one, drawn by ``validated``.
    ``clip_skip`` counts as A1111 does: 1 = last layer, 2 = penultimate."""

    prompt: str
    negative_prompt: str = ""
    prompt_syntax: str = "a1111"  # A1111's emphasis, BREAK and chunks; "plain": the text as diffusers reads it
    steps: int = 30
    guidance: float = 7.5
    scheduler: str | None = None
    seed: int = 0
    batch: int = 1
    height: int | None = None
    width: int | None = None
    clip_skip: int = 1
    init_image: Any = None  # PIL.Image or (H, W, 3) uint8 array
    strength: float = 0.75
    loras: tuple[tuple[str, float], ...] = ()  # (path, scale) per LoRA; checked by the pipeline (sdtrt.lora)
    schedule_type: str | None = None  # A1111's: Automatic, Uniform, Karras, Exponential (sdtrt.runtime.schedulers)
    eta: float | None = None  # DDIM's eta; folded into the validated scheduler name ("ddim:eta=0.5")

    def validated(self, *, default_size: int, default_scheduler: str, scheduler_names: tuple[str, ...]) -> GenerateRequest:
        """Fill defaults and check every field; raise ``UsageError`` naming the first bad one."""
        if not isinstance(self.prompt, str):
            raise UsageError("prompt must be a string")
        h = default_size if self.height is None else self.height
        w = default_size if self.width is None else self.width
        if self.init_image is not None and (self.height is None or self.width is None):
            iw, ih = _image_size(self.init_image)  # rounded down to multiples of 8, as diffusers does
            h = ih - ih % 8 if self.height is None else h
            w = iw - iw % 8 if self.width is None else w
        for name, v in (("height", h), ("width", w)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v > MAX_SIDE or v % 8:
                raise UsageError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {v!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"steps must be an integer between 1 and {MAX_STEPS}, got {self.steps!r}")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or not 1 <= self.batch <= MAX_BATCH:
            raise UsageError(f"batch must be an integer between 1 and {MAX_BATCH}, got {self.batch!r}")
        if not isinstance(self.guidance, (int, float)) or isinstance(self.guidance, bool) or not 0 <= self.guidance <= 100:
            raise UsageError(f"guidance must be a number between 0 and 100, got {self.guidance!r}")
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not RANDOM_SEED <= seed < 2**63:
            raise UsageError(f"seed must be -1 (random) or a non-negative integer below 2**63, got {seed!r}")
        if seed == RANDOM_SEED:
            seed = secrets.randbelow(SEED_RANGE)
        if self.clip_skip not in (1, 2):
            raise UsageError(f"clip-skip must be 1 (last layer) or 2 (penultimate layer), got {self.clip_skip!r}")
        if self.prompt_syntax not in prompts.SYNTAXES:
            raise UsageError(f"prompt syntax must be one of {', '.join(prompts.SYNTAXES)}, got {self.prompt_syntax!r}")
        if self.prompt_syntax == "a1111":
            for text in (self.prompt, self.negative_prompt):
                prompts.check_supported(text)
                prompts.parse_attention(text)  # a weight that is no number, refused here rather than mid-batch
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise UsageError(f"scheduler must be a name, got {self.scheduler!r}")
        try:
            sched = schedulers.resolve(self.scheduler, self.schedule_type, default=default_scheduler, eta=self.eta)
        except UsageError as e:
            if not str(e).startswith("unknown sampler"):
                raise
            sched = self.scheduler  # neither ours nor A1111's: refused below, listing ours
        if sched.split(":")[0] not in scheduler_names:
            raise UsageError(f"unknown scheduler {sched!r}; choose one of {', '.join(scheduler_names)} or an A1111 "
                             f"sampler: {', '.join(repr(s.name) for s in A1111_SAMPLERS)}")
        if self.init_image is not None:
            if not isinstance(self.strength, (int, float)) or not 0 < self.strength <= 1:
                raise UsageError(f"strength must be in (0, 1], got {self.strength!r}")
        return replace(self, height=h, width=w, scheduler=sched, guidance=float(self.guidance), seed=seed,
                       schedule_type=None, eta=None)


def _image_size(image: Any) -> tuple[int, int]:
    if hasattr(image, "size") and callable(getattr(image, "convert", None)):  # PIL
        return image.size
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise UsageError("init image must be a PIL image or an (H, W, 3) uint8 array")
    return int(shape[1]), int(shape[0])


@dataclass(frozen=True)
class BatchKey:
    """What requests batched together must share: everything but prompts, seeds and batch sizes."""

    height: int
    width: int
    scheduler: str
    steps: int
    guidance: float
    clip_skip: int
    img2img: bool
    strength: float
    loras: tuple = ()  # one LoRA set per pass: a pass runs one set of weights


def batch_key(req: GenerateRequest) -> BatchKey:
    """The batch key of a *validated* request (see ``Pipeline.validate``)."""
    img = req.init_image is not None
    return BatchKey(req.height, req.width, req.scheduler, req.steps, req.guidance, req.clip_skip, img,
                    req.strength if img else 0.0, tuple(req.loras))
