"""Stable Diffusion 1.x and 2.x: one CLIP text encoder; the UNet is conditioned on its hidden states alone."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from sdtrt.runtime.families.text import TextEncoder
from sdtrt.runtime.request import GenerateRequest

# clip_skip (A1111's count) -> the text encoder graph's output; both are through the final LayerNorm
HIDDEN_OUTPUT = {1: "last_hidden_state", 2: "penultimate_hidden_state"}


class SDFamily:
    text_encoders = ("text_encoder",)
    cond_inputs = ("encoder_hidden_states",)

    def __init__(self, name: str, model: Mapping, encoders: Mapping[str, TextEncoder]) -> None:
        self.name = name
        self.encoder = encoders["text_encoder"]

    def check(self, request: GenerateRequest) -> None:
        pass  # clip_skip 1 and 2 both exist as graph outputs

    def chunk_counts(self, request: GenerateRequest) -> tuple[int, int]:
        return (len(self.encoder.chunks(request.negative_prompt, request.prompt_syntax)),
                len(self.encoder.chunks(request.prompt, request.prompt_syntax)))

    def condition(self, request: GenerateRequest, negative: bool, weights_key: Hashable = ()) -> Mapping[str, torch.Tensor]:
        text = request.negative_prompt if negative else request.prompt
        hidden = self.encoder.encode(text, request.prompt_syntax, HIDDEN_OUTPUT[request.clip_skip],
                                     weights_key=weights_key).hidden
        return {"encoder_hidden_states": hidden}  # (1, 77k, C)
