"""`sdtrt export FILE.safetensors` with nothing beside the file: a CLIP-sized text encoder gets CLIP's own tokenizer.

The model is tiny-sd1 with CLIP's 49,408-token embedding (described with --config, since no known tiny arch has
it), so the test stays small while the tokenizer path is the one a real SD 1.5 file takes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrt.checkpoint.archs import CONFIG_ROOT, build_models, read_component_configs
from sdtrt.checkpoint.clip_vocab import KNOWN_IDS
from sdtrt.checkpoint.ldm_layout import models_to_original
from sdtrt.checkpoint.tokenizer import load_tokenizer, write_generated_tokenizer
from sdtrt.cli import main

ASTRONAUT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> tuple[Path, Path]:
    """(a single file alone in its folder, the config folder describing it)."""
    root = tmp_path_factory.mktemp("bare")
    cfg = root / "config"
    shutil.copytree(CONFIG_ROOT / "tiny-sd1", cfg)
    te_file = cfg / "text_encoder" / "config.json"
    te = json.loads(te_file.read_text())
    te_file.write_text(json.dumps({**te, "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407}))
    torch.manual_seed(0)
    models = build_models(read_component_configs(cfg))
    f = root / "alone" / "model.safetensors"
    f.parent.mkdir()
    save_file({k: v.contiguous() for k, v in models_to_original(models, "sd1").items()}, str(f))
    return f, cfg


def test_export_of_a_bare_file_uses_clips_tokenizer(bare, tmp_path, capsys):
    f, cfg = bare
    assert sorted(p.name for p in f.parent.iterdir()) == ["model.safetensors"]
    wd = tmp_path / "wd"
    assert main(["export", str(f), str(wd), "--config", str(cfg), "--components", "text_encoder", "--no-validate",
                 "-q"]) == 0
    tok = load_tokenizer(wd / "tokenizer")
    assert tok(ASTRONAUT, add_special_tokens=False)["input_ids"] == KNOWN_IDS[ASTRONAUT]
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 49408
    assert (wd / "onnx" / "text_encoder.onnx").is_file()


def test_a_synthetic_tokenizer_beside_it_is_refused_unless_given(bare, tmp_path, capsys):
    f, cfg = bare
    d = tmp_path / "beside"
    d.mkdir()
    g = Path(shutil.copy(f, d / "model.safetensors"))
    write_generated_tokenizer(d / "tokenizer", 49408)
    assert main(["export", str(g), str(tmp_path / "wd"), "--config", str(cfg), "--components", "text_encoder",
                 "--no-validate", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdtrt: error: {d / 'tokenizer'}: this tokenizer is not CLIP's ('{ASTRONAUT}' -> [")
    assert err.count("\n") == 1
    # Given explicitly, it is the user's choice.
    assert main(["export", str(g), str(tmp_path / "wd2"), "--config", str(cfg), "--components", "text_encoder",
                 "--no-validate", "-q", "--tokenizer", str(d / "tokenizer")]) == 0
    tok = load_tokenizer(tmp_path / "wd2" / "tokenizer")
    assert tok(ASTRONAUT, add_special_tokens=False)["input_ids"] != KNOWN_IDS[ASTRONAUT]
