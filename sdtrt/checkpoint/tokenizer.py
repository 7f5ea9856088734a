"""CLIP tokenizers: a generated one for random-weight checkpoints, and offline loading of any tokenizer folder.

The generated tokenizer has the layout of OpenAI's CLIP BPE vocabulary (the one SD 1.x and 2.x ship):
ids ``0..255`` are the byte-to-unicode symbols, ``256..511`` the same symbols with ``</w>`` (end of word),
then one token per merge (``vocab[512 + i] == "".join(merges[i])``), then ``<|startoftext|>`` and
``<|endoftext|>`` as the last two ids. The merges are learned by plain BPE over a small English word list that
ships in this module; past what that list supports (full-size vocabularies), filler merges of letter tokens are
drawn from a seeded RNG, so a 49408-entry vocabulary embeds with the same shapes as the real one.
Nothing is downloaded.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sdtrt.errors import CheckpointError, UsageError
from sdtrt.fsutil import atomic_dir

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"  # SD 2.x's tokenizer pads with "!" (id 0); SD 1.x's pads with <|endoftext|>
MODEL_MAX_LENGTH = 77
_N_BASE = 512  # 256 byte symbols + their </w> variants
_MAX_FILLER_LEN = 10  # letters in a filler token; real CLIP merges are mostly this short

# Roughly in frequency order (rank sets the BPE training weight): common English, then prompt vocabulary.
_CORPUS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk
example ease paper group always music those both mark often letter until mile river car feet care second book
carry took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color
face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct pose leave song measure door product black short numeral class wind question happen complete
ship area half rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow center love person
money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind behind
clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface
deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand
ago ran check game shape equate miss brought heat snow tire bring yes distant fill east paint language among
photo portrait landscape painting detailed realistic photograph cat dog woman man girl boy castle forest city
street sunset sunrise beach mountain lake river flower flowers garden sky clouds night stars galaxy space
astronaut robot dragon knight wizard warrior princess queen king fantasy science fiction cyberpunk steampunk
concept art illustration digital oil canvas watercolor sketch drawing pencil charcoal anime manga cartoon
render octane unreal engine trending artstation highly intricate elegant sharp focus smooth cinematic lighting
lights soft volumetric dramatic golden hour studio bokeh depth field lens wide angle close shot camera
resolution quality masterpiece beautiful cute happy sad old young small big tall tiny giant ancient futuristic
modern vintage retro colorful vibrant dark bright neon glowing shiny wooden metal glass stone marble crystal
snowy rainy foggy misty sunny cloudy autumn winter summer spring morning evening afternoon reflection shadow
shadows texture pattern background foreground center symmetrical wearing holding sitting standing running
flying walking looking smiling eyes hair face hands dress suit armor helmet hat crown sword shield book table
chair window door house building tower bridge road car train ship boat airplane bird horse lion tiger wolf
bear fox rabbit owl fish whale butterfly tree trees grass leaves fire water ice smoke rain storm lightning
ocean waves desert jungle village ruins temple palace room interior kitchen bedroom library cafe market
, . ! ? ( ) : ; - ' " & 1 2 3 4 5 6 7 8 9 0 8k 4k hd 3d
"""

# CLIP's pre-tokenizer regex, with \p{L} / \p{N} spelled for the stdlib ``re`` (enough for this ASCII corpus).
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level mapping; dict order is the vocabulary order of the first 256 ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _corpus_words() -> dict[tuple[str, ...], int]:
    """Pre-tokenized corpus: symbol tuple (last symbol carries ``</w>``) -> Zipf weight of its first rank."""
    byte_map = _bytes_to_unicode()
    weights: Counter[tuple[str, ...]] = Counter()
    for rank, piece in enumerate(_PRETOKENIZE.findall(_CORPUS.lower())):
        symbols = [byte_map[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        weights[tuple(symbols)] += 1 + 2000 // (rank + 1)
    return dict(weights)


def _learn_corpus_merges(n_merges: int, taken: set[str]) -> list[tuple[str, str]]:
    """Plain BPE over the embedded corpus, most frequent pair first, ties broken by the pair's text.

    A pair whose concatenation is already a token is never merged, so every merge adds exactly one token.
    """
    corpus = _corpus_words()
    words = [list(w) for w in corpus]
    freqs = list(corpus.values())
    pair_count: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}

    def account(i: int, sign: int) -> None:
        w = words[i]
        for pair in zip(w, w[1:], strict=False):
            pair_count[pair] += sign * freqs[i]
            if sign > 0:
                pair_words.setdefault(pair, set()).add(i)

    for i in range(len(words)):
        account(i, +1)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale heap entry
        new = pair[0] + pair[1]
        if new in taken:
            del pair_count[pair]
            continue
        merges.append(pair)
        taken.add(new)
        touched: set[tuple[str, str]] = set()
        for i in sorted(pair_words.pop(pair, ())):
            account(i, -1)
            w, out, j = words[i], [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            account(i, +1)
            touched.update(zip(out, out[1:], strict=False))
        pair_count.pop(pair, None)
        for p in touched:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


def _filler_merges(n: int, merges: list[tuple[str, str]], taken: set[str], seed: int) -> list[tuple[str, str]]:
    """``n`` more merges ``prefix + piece`` of letter tokens, drawn with ``random.Random(seed)``.

    Only tokens of at most ``_MAX_FILLER_LEN // 2`` letters join the pools, so no draw is too long to use.
    """
    rng = random.Random(seed)
    prefixes: list[str] = []  # may start a merge: letters only, no </w>
    pieces: list[str] = []  # may end one: letters, with or without </w>

    def pool(tok: str) -> None:
        letters = tok.removesuffix("</w>")
        if letters.isascii() and letters.isalpha() and len(letters) <= _MAX_FILLER_LEN // 2:
            pieces.append(tok)
            if tok == letters:
                prefixes.append(tok)

    for c in "abcdefghijklmnopqrstuvwxyz":
        pool(c)
        pool(c + "</w>")
    for a, b in merges:
        pool(a + b)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        a, b = rng.choice(prefixes), rng.choice(pieces)
        if a + b in taken:
            continue
        out.append((a, b))
        taken.add(a + b)
        pool(a + b)
    return out


def generate_vocab(vocab_size: int, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` of a CLIP-layout BPE vocabulary with exactly ``vocab_size`` entries."""
    if vocab_size < _N_BASE + 2:
        raise UsageError(
            f"tokenizer vocab_size must be at least {_N_BASE + 2} (256 bytes x 2 + 2 specials), got {vocab_size}"
        )
    base = list(_bytes_to_unicode().values())
    base += [s + "</w>" for s in base]
    n_merges = vocab_size - _N_BASE - 2
    taken = set(base) | {BOS_TOKEN, EOS_TOKEN}
    merges = _learn_corpus_merges(n_merges, taken)
    n_learned = len(merges)
    merges += _filler_merges(n_merges - n_learned, merges, taken, seed)
    logger.debug("tokenizer: %d merges learned from the corpus, %d filler merges", n_learned, n_merges - n_learned)
    tokens = base + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == vocab_size  # every merge adds a new token: see _learn_corpus_merges
    return vocab, merges


def write_generated_tokenizer(
    out_dir: Path, vocab_size: int, seed: int = 0, *, pad_token: str = EOS_TOKEN, overwrite: bool = False
) -> None:
    """Write a CLIP tokenizer folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) with ``vocab_size`` entries; bos = ``vocab_size - 2``, eos = ``vocab_size - 1``.

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x, or ``"!"`` (id 0) as in SD 2.x. The folder is written
    atomically; an existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    _check_writable_target(out_dir, overwrite)
    vocab, merges = generate_vocab(vocab_size, seed)
    if pad_token not in vocab:
        raise UsageError(f"pad token {pad_token!r} is not in the generated vocabulary")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config: dict[str, Any] = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        **specials,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        # The header line matters: CLIP's merges readers skip the first line.
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


def _check_writable_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir}: folder exists and is not empty (pass --overwrite to replace it)"
        )


def load_tokenizer(dir: Path):
    """Load a CLIP tokenizer folder offline; any problem is a one-line ``CheckpointError`` naming the folder."""
    from transformers import CLIPTokenizer

    d = Path(dir)
    if not d.exists():
        raise CheckpointError(f"{d}: tokenizer folder not found")
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a tokenizer folder (it is a file)")
    has_bpe_files = (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    if not has_bpe_files and not (d / "tokenizer.json").is_file():
        # Checked here: transformers would invent merges from a lone vocab.json.
        raise CheckpointError(f"{d}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, or tokenizer.json)")
    try:
        tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers/tokenizers raise many types for bad files
        raise CheckpointError(f"{d}: cannot load CLIP tokenizer: {_one_line(e)}") from e
    for name in ("bos_token", "eos_token"):
        token = getattr(tok, name, None)
        if token is None or tok.convert_tokens_to_ids(token) is None:
            raise CheckpointError(f"{d}: tokenizer has no {name}")
    return tok


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_tokenizer_for(tokenizer_dir: Path, te_config: dict[str, Any]):
    """``load_tokenizer`` plus the checks against the text encoder it will feed: no token id beyond the
    embedding table, and prompts cut at the encoder's position count."""
    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    vocab_size = te_config.get("vocab_size")
    if isinstance(vocab_size, int) and len(tok) > vocab_size:
        raise CheckpointError(
            f"{tokenizer_dir}: tokenizer has {len(tok)} tokens but the text encoder embeds only {vocab_size}: wrong tokenizer"
        )
    max_pos = te_config.get("max_position_embeddings", 77)
    if tok.model_max_length > max_pos:
        # A tokenizer_config.json without model_max_length gives a huge sentinel; prompts must fit the encoder.
        logger.warning("%s: model_max_length %s > text encoder's %d; using %d",
                       tokenizer_dir, tok.model_max_length, max_pos, max_pos)
        tok.model_max_length = max_pos
    return tok

