"""AUTOMATIC1111's prompt rules as pure functions: parsing (``parse``), 75-token chunks (``chunks``) and
weights on the text encoder's output (``emphasis``). ``prompt_syntax="plain"`` bypasses all of it.

    fragments = parse_attention(prompt)          # after check_supported(prompt)
    chunks = make_chunks(fragments, tokenize, special_ids(tokenizer))
    hidden = apply_weights(text_encoder(chunks.ids), chunks.weights)   # (k, 77, C)
    cond = hidden.reshape(1, 77 * k, C)          # chunks side by side along the sequence axis
"""

from __future__ import annotations

from typing import Any

from .chunks import CHUNK_LENGTH, CHUNK_TOKENS, Chunks, SpecialIds, make_chunks
from .emphasis import apply_weights
from .parse import Fragment, check_supported, parse_attention

SYNTAXES = ("a1111", "plain")

__all__ = [
    "CHUNK_LENGTH",
    "CHUNK_TOKENS",
    "SYNTAXES",
    "Chunks",
    "Fragment",
    "SpecialIds",
    "apply_weights",
    "check_supported",
    "chunk_prompt",
    "make_chunks",
    "parse_attention",
    "special_ids",
]


def special_ids(tokenizer: Any) -> SpecialIds:
    """BOS, EOS, pad and comma ids of a Hugging Face CLIP tokenizer."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                      comma=comma if comma != tokenizer.unk_token_id else None)


def chunk_prompt(prompt: str, tokenizer: Any) -> Chunks:
    """``prompt`` under A1111's rules -> chunks of ids and weights (``UsageError`` for refused syntax)."""
    check_supported(prompt)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    return make_chunks(parse_attention(prompt), tokenize, special_ids(tokenizer))
