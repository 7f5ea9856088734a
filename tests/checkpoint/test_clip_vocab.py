"""CLIP's real BPE tokenizer, built offline from the installed vocabulary, against an independent implementation
(instant-clip-tokenizer: Rust, with its own embedded copy of OpenAI's vocabulary)."""

from __future__ import annotations

import pytest

from sdtrt.checkpoint import clip_vocab
from sdtrt.checkpoint.clip_vocab import (
    CLIP_VOCAB_SIZE,
    KNOWN_IDS,
    check_clip_tokenizer,
    clip_disagreement,
    clip_tokenizer,
)
from sdtrt.errors import CheckpointError

CROSS_CHECK = [
    "a photo of an astronaut riding a horse",
    "masterpiece, best quality, (cat:1.2)",
    "A portrait of a woman, oil on canvas, by Rembrandt",
    "cyberpunk city at night, neon lights, 8k, trending on artstation",
    "don't stop, it's 1990's rock'n'roll",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "Ünïcödé café — 東京 タワー",
    "émoji 🐱👍🏽 and ❤️",
    "ALLCAPS MiXeD cAsE",
    "  leading and   trailing   spaces  ",
    "tabs\tand\nnewlines",
    "&amp; html &lt;escapes&gt;",
    "numbers 1234567890 3.14159 1e-5",
    "punctuation: ;,.?/\\|[]{}()<>~`@#$%^&*_-+=",
    "(((masterpiece))), [[bad hands]], {best:1.4}",
    "snake_case and kebab-case and CamelCase",
    "http://example.com/path?query=1",
    "naïve coöperation façade jalapeño",
    "Привет мир",
    "مرحبا بالعالم",
    "γειά σου κόσμε",
    "a" * 60,
    "zzzzqqqqxxxx",
    "8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    "the quick brown fox jumps over the lazy dog",
    "hyperrealistic, intricate details, volumetric lighting, octane render",
    "woman's hat, children's toys, 'quoted'",
    "a red cube on top of a blue sphere",
    "",
    "x",
    "🤖",
]


@pytest.fixture(scope="module")
def reference():
    ict = pytest.importorskip("instant_clip_tokenizer", reason="the independent CLIP tokenizer (dev extra)")
    return ict.Tokenizer()


@pytest.fixture(scope="module")
def sd1_tok():
    return clip_tokenizer("sd1")


@pytest.mark.parametrize("text", CROSS_CHECK)
def test_ids_match_an_independent_clip_tokenizer(sd1_tok, reference, text):
    assert sd1_tok(text, add_special_tokens=False)["input_ids"] == list(reference.encode(text))


def test_known_ids_are_clips(reference):
    for text, ids in KNOWN_IDS.items():
        assert list(reference.encode(text)) == ids


def test_layout_and_padding(sd1_tok, reference):
    sd2 = clip_tokenizer("sd2")
    assert len(sd1_tok) == len(sd2) == CLIP_VOCAB_SIZE
    assert (sd1_tok.bos_token_id, sd1_tok.eos_token_id) == (49406, 49407)
    assert (sd1_tok.pad_token, sd1_tok.pad_token_id) == ("<|endoftext|>", 49407)
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    assert sd1_tok.model_max_length == sd2.model_max_length == 77
    ids = sd2("a cat", padding="max_length", max_length=77)["input_ids"]
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73
    for text in CROSS_CHECK:  # the SD 2.x tokenizer is CLIP's too, where "!" (its pad token) is not in the text
        if "!" not in text:
            assert sd2(text, add_special_tokens=False)["input_ids"] == list(reference.encode(text))


def test_clip_tokenizer_passes_its_own_check(sd1_tok):
    assert clip_disagreement(sd1_tok) is None
    check_clip_tokenizer(sd1_tok, "x")


def test_a_synthetic_clip_sized_tokenizer_is_refused(tmp_path):
    from sdtrt.checkpoint.tokenizer import load_tokenizer, write_generated_tokenizer

    write_generated_tokenizer(tmp_path / "tok", CLIP_VOCAB_SIZE)
    tok = load_tokenizer(tmp_path / "tok")
    with pytest.raises(CheckpointError) as e:
        check_clip_tokenizer(tok, tmp_path / "tok")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'tok'}: this tokenizer is not CLIP's ('a photo of an astronaut riding a horse' -> [")
    assert msg.endswith("Leave it out to use CLIP's own, or pass it with --tokenizer DIR to use it anyway")


def test_small_tokenizers_are_not_checked(tmp_path):
    from sdtrt.checkpoint.tokenizer import load_tokenizer, write_generated_tokenizer

    write_generated_tokenizer(tmp_path / "tok", 1000)
    check_clip_tokenizer(load_tokenizer(tmp_path / "tok"), tmp_path / "tok")  # tiny models: no CLIP to compare


def test_missing_vocabulary_says_what_to_install(monkeypatch):
    monkeypatch.setattr(clip_vocab, "VOCAB_SOURCES", (("no-such-distribution-sdtrt", "x/" + clip_vocab.VOCAB_FILE),))
    with pytest.raises(CheckpointError) as e:
        clip_vocab.vocab_file()
    assert str(e.value) == (
        "CLIP's BPE vocabulary is not installed: `pip install --no-deps open-clip-torch` ships it (nothing is "
        "downloaded at run time), or pass --tokenizer DIR with a CLIP tokenizer folder"
    )


def test_a_different_vocabulary_file_is_not_taken_for_clips(monkeypatch):
    monkeypatch.setattr(clip_vocab, "VOCAB_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match=r"differ from CLIP's\): `pip install"):
        clip_vocab.vocab_file()


@pytest.mark.parametrize(("arch", "pad"), [("sd15", "<|endoftext|>"), ("sd21", "!")])
def test_init_random_full_size_writes_clips_tokenizer(tmp_path, monkeypatch, arch, pad):
    from sdtrt.checkpoint import random_init
    from sdtrt.checkpoint.archs import CONFIG_ROOT, build_models, read_component_configs
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    # The weights stay tiny (full-size ones are 4 GB); the tokenizer is what the full-size arch gets.
    tiny = read_component_configs(CONFIG_ROOT / "tiny-sd1")
    monkeypatch.setattr(random_init, "build_models", lambda configs: build_models(tiny))
    d = random_init.init_random(tmp_path / arch, arch)
    tok = load_tokenizer(d / "tokenizer")
    assert len(tok) == CLIP_VOCAB_SIZE and tok.pad_token == pad
    assert clip_disagreement(tok) is None
