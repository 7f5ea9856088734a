"""A1111's 75-token chunks: weighted fragments -> CLIP input ids and per-token weights, 77 per chunk.

Rules (A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``, written afresh here):

- Every fragment is tokenized on its own (no BOS/EOS), so ``a (b) c`` never merges across the brackets.
- Tokens fill chunks of 75; a chunk is ``[BOS] + tokens + [EOS]`` then padding to 77 (SD 1.x pads with EOS,
  SD 2.x with its pad token "!", A1111's ``id_pad``); BOS, EOS and padding weigh 1.
- Comma back-off: when a chunk is full and the next token is not a comma, the tokens after the chunk's last comma
  move to the next chunk if that comma is within the last 20 tokens (A1111's ``comma_padding_backtrack`` default).
- ``BREAK`` closes the current chunk (padded), even an empty one; an empty prompt is one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .parse import Fragment

CHUNK_TOKENS = 75  # tokens between BOS and EOS
CHUNK_LENGTH = CHUNK_TOKENS + 2  # the text encoder's 77
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    comma: int | None  # the id of "," as a word of its own (",</w>"); None: no back-off


@dataclass(frozen=True)
class Chunks:
    """k chunks of 77: ``ids`` and ``weights`` are k tuples of 77 each."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def weighted(self) -> bool:
        """Whether any token weighs other than 1 (plain prompts skip the emphasis arithmetic)."""
        return any(w != 1.0 for ws in self.weights for w in ws)


def make_chunks(fragments: Sequence[Fragment], tokenize: Callable[[list[str]], list[list[int]]],
                special: SpecialIds) -> Chunks:
    """Weighted fragments -> chunks; ``tokenize`` maps texts to their token ids without BOS/EOS."""
    texts = [f.text for f in fragments if not f.is_break]
    token_lists = iter(tokenize(texts) if texts else [])
    ids: list[tuple[int, ...]] = []
    weights: list[tuple[float, ...]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, mults, last_comma
        pad = CHUNK_TOKENS - len(tokens)
        ids.append((special.bos, *tokens, special.eos, *([special.pad] * pad)))
        weights.append((1.0, *mults, 1.0, *([1.0] * pad)))
        tokens, mults, last_comma = [], [], -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for token in next(token_lists):
            if special.comma is not None and token == special.comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                close()
                tokens, mults = moved, moved_mults
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            mults.append(fragment.weight)
    if tokens or not ids:
        close()
    return Chunks(tuple(ids), tuple(weights))
