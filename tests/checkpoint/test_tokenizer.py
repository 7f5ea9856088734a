"""The generated CLIP tokenizer: layout, determinism, round trip through transformers, and load errors."""

from __future__ import annotations

import json

import pytest

from sdtrt.checkpoint.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SD2_PAD_TOKEN,
    generate_vocab,
    load_tokenizer,
    write_generated_tokenizer,
)
from sdtrt.errors import CheckpointError, UsageError
from sdtrt.fsutil import sha256_file

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """(vocab_size, pad) -> tokenizer folder."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for size, pad in ((1000, EOS_TOKEN), (1000, SD2_PAD_TOKEN), (49408, EOS_TOKEN)):
        d = root / f"{size}-{'eos' if pad == EOS_TOKEN else 'bang'}"
        write_generated_tokenizer(d, size, pad_token=pad)
        out[size, pad] = d
    return out


@pytest.mark.parametrize("size", [1000, 49408])
def test_vocab_has_clip_layout(size):
    vocab, merges = generate_vocab(size)
    assert len(vocab) == size
    assert len(merges) == size - 514
    ids = {i: t for t, i in vocab.items()}
    assert sorted(ids) == list(range(size))
    assert ids[0] == "!" and ids[93] == "~"  # byte-to-unicode order, as in OpenAI's vocabulary
    assert ids[256] == "!</w>" and all(ids[256 + i] == ids[i] + "</w>" for i in range(256))
    assert all(ids[512 + i] == a + b for i, (a, b) in enumerate(merges))
    assert (vocab[BOS_TOKEN], vocab[EOS_TOKEN]) == (size - 2, size - 1)
    # Each merge only uses tokens that exist before it: a valid BPE merge order.
    assert all(vocab[a] < vocab[a + b] and vocab[b] < vocab[a + b] for a, b in merges)


def test_learned_merges_come_first():
    _, merges = generate_vocab(1000)
    assert merges[:2] == [("t", "h"), ("th", "e</w>")]


def test_same_seed_same_files_other_seed_differs_only_past_the_corpus(tmp_path):
    for name, size, seed in (("a", 49408, 0), ("b", 49408, 0), ("c", 49408, 1), ("d", 1000, 0), ("e", 1000, 1)):
        write_generated_tokenizer(tmp_path / name, size, seed)

    def digest(name):
        return {f: sha256_file(tmp_path / name / f) for f in FILES}

    assert digest("a") == digest("b")
    assert digest("a")["merges.txt"] != digest("c")["merges.txt"]
    assert digest("d") == digest("e")  # 1000 entries fit in what the corpus teaches: the seed is unused


@pytest.mark.parametrize(
    ("size", "pad", "pad_id"), [(1000, EOS_TOKEN, 999), (1000, SD2_PAD_TOKEN, 0), (49408, EOS_TOKEN, 49407)]
)
def test_round_trip(tok_dirs, size, pad, pad_id):
    tok = load_tokenizer(tok_dirs[size, pad])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (size - 2, size - 1, pad_id)
    assert tok.model_max_length == 77 and len(tok) == size
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids) == 77
    assert ids[0] == size - 2 and size - 1 in ids
    assert max(ids) < size and min(ids) >= 0
    n = ids.index(size - 1) + 1
    assert ids[n:] == [pad_id] * (77 - n)
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_full_size_vocab_holds_common_prompt_words(tok_dirs):
    tok = load_tokenizer(tok_dirs[49408, EOS_TOKEN])
    ids = tok("A photo of a CAT")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [BOS_TOKEN, "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", EOS_TOKEN]


def test_long_prompt_is_truncated_to_77_ending_in_eos(tok_dirs):
    tok = load_tokenizer(tok_dirs[1000, EOS_TOKEN])
    ids = tok("an astronaut riding a horse " * 40, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids) == 77 and ids[0] == 998 and ids[-1] == 999


def test_unknown_bytes_fall_back_to_byte_tokens(tok_dirs):
    tok = load_tokenizer(tok_dirs[1000, EOS_TOKEN])
    ids = tok("ñandú 日本 🐱")["input_ids"]
    assert max(ids) < 1000
    assert tok.decode(ids, skip_special_tokens=True) == "ñandú 日本 🐱"


def test_written_config_files(tok_dirs):
    d = tok_dirs[1000, SD2_PAD_TOKEN]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "CLIPTokenizer" and cfg["model_max_length"] == 77 and cfg["pad_token"] == "!"
    assert json.loads((d / "special_tokens_map.json").read_text())["bos_token"] == BOS_TOKEN
    assert (d / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(UsageError, match="at least 514"):
        write_generated_tokenizer(tmp_path / "t", 300)
    assert not (tmp_path / "t").exists()


def test_existing_folder_needs_overwrite(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="folder exists and is not empty"):
        write_generated_tokenizer(d, 1000)
    assert (d / "keep.txt").exists()
    write_generated_tokenizer(d, 1000, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)


def _break(d, name, content):
    (d / name).write_text(content) if content is not None else (d / name).unlink()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "tokenizer folder not found"),
        ("file", "not a tokenizer folder (it is a file)"),
        ("empty", "not a CLIP tokenizer folder (needs vocab.json and merges.txt, or tokenizer.json)"),
        ("no-merges", "not a CLIP tokenizer folder"),
        ("bad-vocab", "cannot load CLIP tokenizer: "),
        ("bad-merges", "out of vocabulary"),
    ],
)
def test_load_errors_name_the_folder(tmp_path, setup, message):
    d = tmp_path / "tok"
    if setup == "file":
        d.write_text("hello")
    elif setup == "empty":
        d.mkdir()
    elif setup != "missing":
        write_generated_tokenizer(d, 1000)
        if setup == "no-merges":
            _break(d, "merges.txt", None)
        elif setup == "bad-vocab":
            _break(d, "vocab.json", "{not json")
        elif setup == "bad-merges":
            _break(d, "merges.txt", "#version: 0.2\nzz qq\n")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{d}: ")
    assert "\n" not in str(e.value)
