"""The real CLIP BPE tokenizer, offline: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` as installed packages ship it.

SD 1.x (CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14) and SDXL's two encoders all use this one vocabulary:
ids ``0..255`` the byte-to-unicode symbols, ``256..511`` the same with ``</w>``, then the first 48,894 merges in
order, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 ids). SD 1.x pads with ``<|endoftext|>``; SD 2.x
and SDXL's second encoder pad with ``!`` (id 0).

The file comes from an installed package (``open-clip-torch``, or OpenAI's ``clip``), found through package
metadata without importing the package (that would import torchvision), and is checked by its sha256: nothing
is downloaded, and a different file is never taken for CLIP's. ``check_clip_tokenizer`` tells a 49,408-token
tokenizer that tokenizes known prompts differently from CLIP's (such as the synthetic one of older
``init-random`` checkpoints).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from sdtrt.checkpoint.model import TOKENIZER_DIRS
from sdtrt.checkpoint.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, SD2_PAD_TOKEN, _bytes_to_unicode
from sdtrt.errors import CheckpointError

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# (distribution, path inside it); the first one installed is used.
VOCAB_SOURCES = (("open-clip-torch", f"open_clip/{VOCAB_FILE}"), ("clip-anytorch", f"clip/{VOCAB_FILE}"),
                 ("clip", f"clip/{VOCAB_FILE}"))
PAD_TOKENS = {"sd1": EOS_TOKEN, "sd2": SD2_PAD_TOKEN}  # the text_encoder's tokenizer, per family

# CLIP's ids for a few prompts (without bos/eos), from OpenAI's tokenizer; a tokenizer that disagrees is not CLIP's.
KNOWN_IDS: dict[str, list[int]] = {
    "a photo of an astronaut riding a horse": [320, 1125, 539, 550, 18376, 6765, 320, 4558],
    "masterpiece, best quality, (cat:1.2)": [12066, 267, 949, 3027, 267, 263, 2368, 281, 272, 269, 273, 264],
}


def vocab_file() -> Path:
    """The installed ``bpe_simple_vocab_16e6.txt.gz``, checked by sha256; a ``CheckpointError`` if none is."""
    import importlib.metadata  # here, not at the top: it costs every CLI start ~30 ms

    seen = []
    for dist, rel in VOCAB_SOURCES:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if str(f) == rel:
                path = Path(f.locate())
                if path.is_file() and _sha256(path) == VOCAB_SHA256:
                    return path
                seen.append(str(path))
    where = f" ({', '.join(seen)} differ from CLIP's)" if seen else ""
    raise CheckpointError(
        f"CLIP's BPE vocabulary is not installed{where}: `pip install --no-deps open-clip-torch` ships it "
        "(nothing is downloaded at run time), or pass --tokenizer DIR with a CLIP tokenizer folder"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """``(vocab, merges)`` of CLIP's tokenizer, as OpenAI's ``SimpleTokenizer`` builds them from the file."""
    import gzip

    lines = gzip.decompress(vocab_file().read_bytes()).decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 512 - 2
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + n_merges])  # line 0 is the "#version" header
    base = list(_bytes_to_unicode().values())
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def pad_token(family: str, component: str = "text_encoder") -> str:
    """What the tokenizer of ``component`` pads with: ``<|endoftext|>`` for CLIP ViT-L (SD 1.x and SDXL's
    ``text_encoder``), ``!`` (id 0) for OpenCLIP's (SD 2.x, SDXL's ``text_encoder_2``)."""
    if component == "text_encoder_2":
        return SD2_PAD_TOKEN
    return PAD_TOKENS.get(family, EOS_TOKEN)


def clip_tokenizer(family: str, component: str = "text_encoder"):
    """A transformers ``CLIPTokenizer`` with CLIP's vocabulary, padding as ``family``'s ``component`` does."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    pad = pad_token(family, component)
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS_TOKEN,
                        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=pad, model_max_length=MODEL_MAX_LENGTH)
    return tok


def clip_disagreement(tok: Any) -> str | None:
    """None if ``tok`` gives CLIP's ids on the known prompts; else the first difference, described."""
    for text, want in KNOWN_IDS.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if list(ids) != want:
            return f"{text!r} -> {list(ids)[:8]}, CLIP's: {want[:8]}"
    return None


def check_clip_tokenizer(tok: Any, where: Path | str) -> None:
    """Refuse a CLIP-sized tokenizer (49,408 tokens) that tokenizes known prompts differently from CLIP's."""
    if len(tok) != CLIP_VOCAB_SIZE:
        return
    diff = clip_disagreement(tok)
    if diff is not None:
        raise CheckpointError(
            f"{where}: this tokenizer is not CLIP's ({diff}); prompts would be misread. Leave it out to use CLIP's "
            "own, or pass it with --tokenizer DIR to use it anyway"
        )


def resolve_tokenizer(source: Path, found: Path, explicit: Path | None, te_config: dict[str, Any], family: str,
                      component: str = "text_encoder"):
    """The tokenizer for a checkpoint at ``source``: ``explicit`` (``--tokenizer``, taken as given); else the
    folder ``found`` beside or inside it, refused if it is CLIP-sized but not CLIP's; else, for a text encoder
    with CLIP's 49,408 tokens, CLIP's own; else a ``CheckpointError``."""
    from sdtrt.checkpoint.tokenizer import load_tokenizer_for

    if explicit is not None:
        return load_tokenizer_for(explicit, te_config)
    if found.is_dir():
        tok = load_tokenizer_for(found, te_config)
        check_clip_tokenizer(tok, found)
        return tok
    if te_config.get("vocab_size") == CLIP_VOCAB_SIZE:
        return clip_tokenizer(family, component)
    where = "in" if found.parent == source else "beside"
    raise CheckpointError(
        f"{source}: no tokenizer found {where} the checkpoint (looked for {found}) and its text encoder's "
        f"{te_config.get('vocab_size')} "
        "tokens are not CLIP's vocabulary; pass --tokenizer DIR with a CLIP tokenizer folder"
    )




def resolve_tokenizers(source: Path, search: Path, explicit: Path | None, configs: dict[str, Any], family: str):
    """``{text encoder: tokenizer}`` for each text encoder in ``configs``, by ``resolve_tokenizer``: found as
    ``search/tokenizer`` and ``search/tokenizer_2``. ``explicit`` (``--tokenizer DIR``) is the tokenizer folder
    itself for SD 1.x/2.x. For SDXL families it is a folder holding ``tokenizer/`` and/or ``tokenizer_2/`` (a
    diffusers SDXL folder, an export's workdir), or one of those subfolders (its siblings are taken too); a
    tokenizer it lacks is looked for as without it."""
    encoders = [c for c in TOKENIZER_DIRS if c in configs]
    root = None
    if explicit is not None and family.startswith("sdxl"):
        explicit = Path(explicit)
        subs = set(TOKENIZER_DIRS.values())
        root = explicit if any((explicit / s).is_dir() for s in subs) else (
            explicit.parent if explicit.name in subs and any((explicit.parent / s).is_dir() for s in subs) else None)
        if root is None:
            wanted = " and/or ".join(f"{TOKENIZER_DIRS[c]}/" for c in encoders)
            raise CheckpointError(f"{explicit}: an SDXL model needs a --tokenizer folder holding {wanted}")
    out = {}
    for comp in encoders:
        sub = TOKENIZER_DIRS[comp]
        given = explicit if root is None else (root / sub if (root / sub).is_dir() else None)
        out[comp] = resolve_tokenizer(source, search / sub, given, configs[comp], family, comp)
    return out
