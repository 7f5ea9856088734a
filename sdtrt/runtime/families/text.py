"""One text encoder graph with its tokenizer: a prompt -> A1111 chunks -> hidden states, cached.

A1111 encodes a long prompt 75 tokens at a time (``sdtrt.runtime.prompts``): each chunk of 77 ids is one call of the
text encoder, its hidden states are weighted and rescaled alone, and the chunks are laid side by side along the
sequence axis, (1, 77 * k, C). The pooled output (SDXL's ``text_embeds``) is the first chunk's, as A1111 takes it.
``prompt_syntax="plain"`` is the text as diffusers tokenizes it: one chunk, cut at 77 tokens.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from sdtrt.runtime import prompts
from sdtrt.runtime.backends import Runner

log = logging.getLogger(__name__)

CACHE_SIZE = 64  # prompts kept per encoder and output


@dataclass(frozen=True)
class Encoded:
    """``hidden`` (1, 77 * k, C) and, when asked for, ``pooled`` (1, P) of one prompt."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.hidden.shape[1] // prompts.CHUNK_LENGTH


class TextEncoder:
    """``runner`` (a text encoder graph: ``input_ids`` (1, 77) int32 in) and the ``tokenizer`` it was trained with."""

    def __init__(self, name: str, runner: Runner, tokenizer: Any, max_length: int = prompts.CHUNK_LENGTH) -> None:
        self.name = name
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._chunks: OrderedDict[tuple[str, str], prompts.Chunks] = OrderedDict()
        self._hidden: OrderedDict[tuple, Encoded] = OrderedDict()

    def clear(self) -> None:
        """Forget every cached embedding (benchmarks time the text encoder on each request)."""
        self._hidden.clear()

    def chunks(self, prompt: str, syntax: str) -> prompts.Chunks:
        """Token ids and weights of ``prompt`` (cheap after the first call: servers ask at validation time)."""
        key = (prompt, syntax)
        hit = _lru_get(self._chunks, key)
        if hit is None:
            hit = self._plain(prompt) if syntax == "plain" else prompts.chunk_prompt(prompt, self.tokenizer)
            _lru_put(self._chunks, key, hit)
        return hit

    def _plain(self, prompt: str) -> prompts.Chunks:
        """bos + tokens + eos, cut and padded to 77 as the tokenizer's max_length truncation does."""
        ids = self.tokenizer(prompt, truncation=False)["input_ids"]  # [bos, ..., eos]
        if len(ids) > self.max_length:
            log.warning("prompt is %d tokens; truncated to %d (plain prompt syntax: as diffusers does)",
                        len(ids), self.max_length)
            ids = ids[: self.max_length - 1] + ids[-1:]
        ids = tuple(ids) + (self.tokenizer.pad_token_id,) * (self.max_length - len(ids))
        return prompts.Chunks((ids,), ((1.0,) * len(ids),))

    def encode(self, prompt: str, syntax: str, output: str, pooled: str | None = None,
               weights_key: Hashable = ()) -> Encoded:
        """``prompt``'s hidden states from graph output ``output`` (and ``pooled``'s first-chunk value), cached by
        token ids, weights, outputs and ``weights_key`` (the LoRA set the encoder's weights hold)."""
        chunks = self.chunks(prompt, syntax)
        key = (chunks, output, pooled, weights_key)
        hit = _lru_get(self._hidden, key)
        if hit is not None:
            return hit
        self.runner.activate({"B": 1})
        hidden, first_pooled = [], None
        for chunk in chunks.ids:  # one chunk per call: A1111 encodes (and rescales) each chunk alone
            self.runner.inputs["input_ids"].copy_(torch.tensor([chunk], dtype=torch.int32))
            self.runner.run()
            hidden.append(self.runner.outputs[output].clone())
            if pooled is not None and first_pooled is None:
                first_pooled = self.runner.outputs[pooled].clone()
        out = torch.cat(hidden)  # (k, 77, C)
        if chunks.weighted:
            out = prompts.apply_weights(out, torch.tensor(chunks.weights)).to(hidden[0].dtype)
        hit = Encoded(out.reshape(1, -1, out.shape[-1]), first_pooled)
        _lru_put(self._hidden, key, hit)
        return hit


def _lru_get(cache: OrderedDict, key: Hashable) -> Any:
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def _lru_put(cache: OrderedDict, key: Hashable, value: Any) -> None:
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
