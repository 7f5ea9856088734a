"""A1111's chunking and emphasis on a stand-in tokenizer (one id per word, "," its own word): the rules alone."""

from __future__ import annotations

import pytest
import torch

from sdtrt.runtime.prompts import CHUNK_TOKENS, SpecialIds, apply_weights, make_chunks, parse_attention

BOS, EOS, PAD, COMMA = 1000, 1001, 0, 7
SD1 = SpecialIds(bos=BOS, eos=EOS, pad=EOS, comma=COMMA)  # SD 1.x pads with EOS
SD2 = SpecialIds(bos=BOS, eos=EOS, pad=PAD, comma=COMMA)  # SD 2.x with "!" (id 0)


def tokenize(texts: list[str]) -> list[list[int]]:
    """"w<n>" -> n, "," -> COMMA; separate calls per fragment, as A1111 tokenizes each fragment alone."""
    return [[COMMA if w == "," else int(w[1:]) for w in t.replace(",", " , ").split()] for t in texts]


def chunks(prompt: str, special: SpecialIds = SD1):
    return make_chunks(parse_attention(prompt), tokenize, special)


def words(n: int, first: int = 10) -> str:
    return " ".join(f"w{i}" for i in range(first, first + n))


def test_one_chunk_is_bos_tokens_eos_then_padding():
    c = chunks("w10 (w11) [w12]")
    assert len(c) == 1 and len(c.ids[0]) == 77
    assert c.ids[0][:5] == (BOS, 10, 11, 12, EOS) and set(c.ids[0][5:]) == {EOS}
    assert c.weights[0][:5] == pytest.approx((1.0, 1.0, 1.1, 1 / 1.1, 1.0)) and set(c.weights[0][5:]) == {1.0}
    sd2 = chunks("w10 (w11) [w12]", SD2)
    assert sd2.ids[0][:5] == (BOS, 10, 11, 12, EOS) and set(sd2.ids[0][5:]) == {PAD}


def test_empty_prompt_is_one_chunk():
    c = chunks("")
    assert c.ids == ((BOS, EOS, *[EOS] * 75),) and not c.weighted


def test_75_tokens_fit_76_make_two_chunks():
    assert len(chunks(words(75))) == 1
    c = chunks(words(76))
    assert len(c) == 2
    assert c.ids[0] == (BOS, *range(10, 85), EOS) and c.ids[1][:3] == (BOS, 85, EOS)


def test_comma_back_off_moves_the_tail_after_the_last_comma():
    # 70 words, a comma (token 71), 10 more words: the chunk fills at 75 with the comma 5 tokens back (<= 20),
    # so the 4 words after the comma move to the next chunk with the rest
    c = chunks(words(70) + ", " + words(10, first=100))
    assert c.ids[0][1:73] == (*range(10, 80), COMMA, EOS)[:72]
    assert c.ids[0][72] == EOS and set(c.ids[0][72:]) == {EOS}  # padded after the comma
    assert c.ids[1][:12] == (BOS, *range(100, 110), EOS)


def test_comma_too_far_back_is_not_backed_off():
    c = chunks(words(50) + ", " + words(30, first=100))  # comma at 50: 25 tokens back at the chunk end (> 20)
    assert c.ids[0][1:77] == (*range(10, 60), COMMA, *range(100, 124), EOS)
    assert c.ids[1][:8] == (BOS, *range(124, 130), EOS)


def test_break_closes_the_chunk():
    c = chunks("w10 w11 BREAK w12")
    assert len(c) == 2 and c.ids[0][:4] == (BOS, 10, 11, EOS) and c.ids[1][:3] == (BOS, 12, EOS)
    assert len(chunks("BREAK w12")) == 2  # an empty chunk first, as A1111 makes it


def test_fragments_keep_their_weights_across_chunks():
    c = chunks(f"({words(80)}:1.3)")
    assert len(c) == 2 and c.weights[0][1:76] == (1.3,) * CHUNK_TOKENS and c.weights[1][1:6] == (1.3,) * 5


def test_weight_one_is_plain():
    assert chunks("(w10:1.0) w11") == chunks("w10 w11") and not chunks("w10 w11").weighted


def test_apply_weights_restores_the_chunk_mean():
    torch.manual_seed(0)
    z = torch.randn(2, 77, 8) + 0.3
    w = torch.ones(2, 77)
    w[0, 3] = 1.5
    w[1, 5:9] = 0.5
    out = apply_weights(z, w)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))
    scale = z[0].mean() / (z[0] * w[0, :, None]).mean()
    torch.testing.assert_close(out[0, 3], z[0, 3] * 1.5 * scale)
    torch.testing.assert_close(out[0, 4], z[0, 4] * scale)
    assert torch.equal(apply_weights(z, torch.ones(2, 77)), z)  # all ones: exactly unchanged
