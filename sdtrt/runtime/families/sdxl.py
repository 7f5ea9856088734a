"""Stable Diffusion XL (base and refiner): two text encoders, a pooled text embedding and size conditioning.

As diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` compute them:

- ``encoder_hidden_states``: each text encoder's penultimate hidden state (no final LayerNorm), concatenated along
  channels in the manifest's ``text_encoders`` order (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048; the refiner
  has bigG only);
- ``text_embeds``: the last text encoder's (bigG's) projected pooled output, (1, 1280);
- ``time_ids``: original size, crop top-left and target size, (h, w, 0, 0, h, w); the refiner replaces the
  target size by an aesthetic score, (h, w, 0, 0, 6.0), and 2.5 for the negative prompt;
- ``force_zeros_for_empty_prompt`` (model_index.json): an empty negative prompt is zeros, not ``""`` encoded.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from sdtrt.errors import UsageError
from sdtrt.runtime.families.text import TextEncoder
from sdtrt.runtime.prompts import CHUNK_LENGTH
from sdtrt.runtime.request import GenerateRequest

HIDDEN_OUTPUT = "penultimate_unnormed"
POOLED_OUTPUT = "text_embeds"
AESTHETIC_SCORE = 6.0  # diffusers' defaults for the refiner's size conditioning
NEGATIVE_AESTHETIC_SCORE = 2.5


class SDXLFamily:
    cond_inputs = ("encoder_hidden_states", "text_embeds", "time_ids")

    def __init__(self, name: str, model: Mapping, encoders: Mapping[str, TextEncoder]) -> None:
        self.name = name
        self.text_encoders = tuple(model["text_encoders"])
        self.encoders = [encoders[n] for n in self.text_encoders]
        self.hidden_size = int(model["text_hidden_size"])
        self.pooled_dim = int(model["pooled_dim"])
        self.force_zeros = bool(model.get("force_zeros_for_empty_prompt", False))
        self.aesthetics = bool(model.get("requires_aesthetics_score", False))

    def check(self, request: GenerateRequest) -> None:
        if request.clip_skip != 1:
            raise UsageError(f"clip skip {request.clip_skip} is not available for {self.name}: its text encoders "
                             "already use their penultimate layer; leave clip skip at 1")
        for text in (request.prompt, request.negative_prompt):
            counts = {len(e.chunks(text, request.prompt_syntax)) for e in self.encoders}
            if len(counts) > 1:  # two tokenizers that split one prompt differently cannot be laid side by side
                raise UsageError(f"the {self.name} tokenizers split the prompt into different numbers of 75-token "
                                 f"chunks ({sorted(counts)}); shorten it to one chunk")

    def _zeroed(self, request: GenerateRequest, negative: bool) -> bool:
        return negative and self.force_zeros and request.negative_prompt == ""

    def chunk_counts(self, request: GenerateRequest) -> tuple[int, int]:
        first = self.encoders[0]
        neg = 1 if self._zeroed(request, True) else len(first.chunks(request.negative_prompt, request.prompt_syntax))
        return neg, len(first.chunks(request.prompt, request.prompt_syntax))

    def time_ids(self, request: GenerateRequest, negative: bool) -> torch.Tensor:
        """(1, 6) or, for the refiner, (1, 5) float32."""
        h, w = request.height, request.width
        last = ((NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE),) if self.aesthetics else (h, w)
        return torch.tensor([[h, w, 0, 0, *last]], dtype=torch.float32)

    def condition(self, request: GenerateRequest, negative: bool, weights_key: Hashable = ()) -> Mapping[str, torch.Tensor]:
        time_ids = self.time_ids(request, negative)
        if self._zeroed(request, negative):
            return {"encoder_hidden_states": torch.zeros(1, CHUNK_LENGTH, self.hidden_size),
                    "text_embeds": torch.zeros(1, self.pooled_dim), "time_ids": time_ids}
        text = request.negative_prompt if negative else request.prompt
        *firsts, last = self.encoders
        hidden = [e.encode(text, request.prompt_syntax, HIDDEN_OUTPUT, weights_key=weights_key).hidden for e in firsts]
        enc = last.encode(text, request.prompt_syntax, HIDDEN_OUTPUT, POOLED_OUTPUT, weights_key=weights_key)
        return {"encoder_hidden_states": torch.cat([*hidden, enc.hidden], dim=-1),  # (1, 77k, 2048)
                "text_embeds": enc.pooled, "time_ids": time_ids}
