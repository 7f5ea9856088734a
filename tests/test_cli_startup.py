"""CLI start-up and the small CLI fixes: no heavy imports before a command needs them, -q in either position,
messages in CLI terms, file modes as the umask gives, --vae/--ema recorded and said."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdtrt import cli

HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "safetensors", "tensorrt", "tensorrt_rtx")


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_parser_and_help_import_nothing_heavy():
    assert _modules_after("import sdtrt.cli as c; c.build_parser()") == []
    assert _modules_after(
        "import contextlib, io, sdtrt.cli as c\n"
        "for argv in (['--help'], ['generate', '--help'], ['export', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): c.main(argv)"
    ) == []


def test_usage_errors_import_nothing_heavy():
    assert _modules_after("import sdtrt.cli as c; assert c.main(['generate']) == 2") == []


def test_backend_choices_are_the_runtimes():
    from sdtrt.runtime.backends import BACKENDS

    assert cli.BACKENDS == BACKENDS


@pytest.mark.parametrize("argv", [["-q", "generate", "wd", "p"], ["generate", "wd", "p", "-q"],
                                  ["--quiet", "build", "wd"], ["build", "wd", "--quiet"]])
def test_quiet_in_either_position(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.quiet is True and args.debug is False


def test_not_quiet_by_default():
    args = cli.build_parser().parse_args(["generate", "wd", "p"])
    assert args.quiet is False and args.debug is False


def test_global_quiet_silences_init_random(tmp_path, capsys):
    assert cli.main(["-q", "init-random", str(tmp_path / "ck"), "--arch", "tiny-sd1"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_overwrite_message_speaks_cli(tmp_path, capsys):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "x").write_text("x")
    assert cli.main(["init-random", str(d), "--arch", "tiny-sd1"]) == 2
    assert capsys.readouterr().err == (
        f"sdtrt: error: {d}: folder exists and is not empty (pass --overwrite to replace it)\n"
    )


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_single_file_mode_follows_the_umask(tiny_sd1_dir, tmp_path, umask, mode):
    from sdtrt.checkpoint import load_checkpoint
    from sdtrt.checkpoint.ldm_layout import save_single_file

    old = os.umask(umask)
    try:
        save_single_file(load_checkpoint(tiny_sd1_dir), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == mode


def test_export_records_vae_and_ema_and_says_them(tiny_sd1_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sdtrt.checkpoint import load_checkpoint
    from sdtrt.checkpoint.ldm_layout import save_single_file

    f = tmp_path / "m.safetensors"
    save_single_file(load_checkpoint(tiny_sd1_dir), f)
    shutil.copytree(tiny_sd1_dir / "tokenizer", tmp_path / "tokenizer")
    state = load_file(str(f))
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + k.removeprefix("model.").replace(".", "")] = state[k].clone()
    save_file(state, str(f))
    vae = tiny_sd1_dir / "vae"
    wd = tmp_path / "wd"
    assert cli.main(["export", str(f), str(wd), "--vae", str(vae), "--components", "text_encoder",
                     "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "  EMA weights present: using the regular ones (--ema for the EMA ones)\n" in out
    assert f"  VAE from {vae}\n" in out
    opts = json.loads((wd / "manifest.json").read_text())["source"]["load_options"]
    assert opts["vae"] == str(vae.resolve()) and opts["ema"] is False
    assert cli.main(["export", str(f), str(tmp_path / "wd2"), "--ema", "--components", "text_encoder",
                     "--no-validate"]) == 0
    assert "  EMA weights: using them for the UNet (" in capsys.readouterr().out
    opts = json.loads((tmp_path / "wd2" / "manifest.json").read_text())["source"]["load_options"]
    assert opts["vae"] is None and opts["ema"] is True


def test_bad_vae_is_one_line(tiny_sd1_dir, tmp_path, capsys):
    assert cli.main(["export", str(tiny_sd1_dir), str(tmp_path / "wd"), "--vae", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"sdtrt: error: {tmp_path / 'nope'}: no such VAE file or folder\n"
    assert not Path(tmp_path / "wd" / "manifest.json").exists()
