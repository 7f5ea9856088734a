"""What a model family is to the pipeline: the UNet inputs it conditions on, and how a request fills them.

A family turns a request into the UNet's *static conditioning inputs* -- one row each for the prompt and for the
negative prompt -- before the denoising loop; the loop then runs the same code for every family. Adding a family
adds a module here and a line in ``FAMILIES``; it never adds a branch to the loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Protocol

import torch

from sdtrt.runtime.request import GenerateRequest


class Family(Protocol):
    name: str
    text_encoders: tuple[str, ...]  # the text encoder components it runs
    cond_inputs: tuple[str, ...]  # the UNet inputs it fills, besides ``sample`` and ``timestep``

    def check(self, request: GenerateRequest) -> None:
        """``UsageError`` for settings this family cannot honour (validated request; no device work)."""

    def chunk_counts(self, request: GenerateRequest) -> tuple[int, int]:
        """Prompt chunks of (negative prompt, prompt): the UNet's text lengths are 77 times these."""

    def condition(self, request: GenerateRequest, negative: bool, weights_key: Hashable = ()) -> Mapping[str, torch.Tensor]:
        """One row of each of ``cond_inputs``, shaped (1, ...), for the prompt or (``negative``) the negative prompt."""
