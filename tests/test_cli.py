"""The command line: every bad input is one line on stderr and exit code 2; --debug shows the traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from sdtrt.cli import main
from sdtrt.runtime.png import read_parameters


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sdtrt: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no command given"),
        (["export"], "the following arguments are required: CHECKPOINT, WORKDIR"),
        (["export", "a", "b", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["export", "a", "b", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["init-random", "x", "--arch", "sd3"], "argument --arch: invalid choice: 'sd3'"),
        (["generate", "wd", "p", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["generate", "wd", "p", "--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
        (["generate", "wd", "p", "--prompt-syntax", "markdown"],
         "argument --prompt-syntax: invalid choice: 'markdown' (choose from 'a1111', 'plain')"),
    ],
)
def test_usage_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in one_error_line(err)


def test_export_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "wd"))
    assert code == 2
    assert one_error_line(err) == f"sdtrt: error: {tmp_path / 'nope'}: no such file or directory"
    assert not (tmp_path / "wd").exists()


def test_export_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(capsys, "export", str(tmp_path / "notes.txt"), str(tmp_path / "wd"))
    assert code == 2
    assert "notes.txt" in one_error_line(err)


def test_export_truncated_weights(capsys, tmp_path, tiny_sd1_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_sd1_dir, ckpt)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "export", str(ckpt), str(tmp_path / "wd"))
    assert code == 2
    line = one_error_line(err)
    assert str(weights) in line
    assert not (tmp_path / "wd" / "manifest.json").exists()


def test_export_unknown_component(capsys, tmp_path, tiny_sd1_dir):
    code, _, err = run(capsys, "export", str(tiny_sd1_dir), str(tmp_path / "wd"), "--components", "unet,refiner")
    assert code == 2
    assert "unknown component(s) refiner" in one_error_line(err)


def test_init_random_refuses_non_empty_dir(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "init-random", str(tmp_path / "x"), "--arch", "tiny-sd1")
    assert code == 2
    assert "folder exists and is not empty" in one_error_line(err)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_generate_missing_workdir(capsys, tmp_path):
    code, _, err = run(capsys, "generate", str(tmp_path / "nope"), "a cat")
    assert code == 2
    assert "no such workdir" in one_error_line(err)


def test_generate_incomplete_workdir(capsys, tmp_path):
    (tmp_path / "wd" / "onnx").mkdir(parents=True)
    code, _, err = run(capsys, "generate", str(tmp_path / "wd"), "a cat")
    assert code == 2
    assert "incomplete export (no manifest.json)" in one_error_line(err)


def test_generate_corrupt_manifest(capsys, tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "manifest.json").write_text("{not json")
    code, _, err = run(capsys, "generate", str(tmp_path / "wd"), "a cat")
    assert code == 2
    assert "corrupt manifest" in one_error_line(err)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "60"], "height must be a multiple of 8"),
        (["--scheduler", "dpm2"], "unknown scheduler 'dpm2'"),
        (["-o", "out.jpg"], "output must be a .png path"),
        (["--clip-skip", "5"], "clip-skip must be 1"),
        (["--backend", "tensorrt"], "tensorrt backend needs an NVIDIA GPU"),
    ],
)
def test_generate_bad_options(capsys, sd1_workdir_fp32, tmp_path, extra, message):
    if "--backend" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--steps", "1",
                       "-o", str(tmp_path / "out.png"), *extra)
    assert code == 2
    assert message in one_error_line(err)
    assert not list(tmp_path.iterdir())


def test_generate_writes_pngs_with_parameters(capsys, sd1_workdir_fp32, tmp_path):
    code, out, err = run(capsys, "generate", str(sd1_workdir_fp32), "a red apple", "--steps", "2", "--batch", "2",
                         "--seed", "42", "--scheduler", "euler_a", "-o", str(tmp_path / "apple.png"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apple-0.png", "apple-1.png"]
    params = read_parameters(tmp_path / "apple-1.png")
    assert params.startswith("a red apple\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64")
    assert "Batch size: 2, Batch pos: 1" in params
    assert "wrote" in out and "denoise" in out


def test_export_summary_and_quiet(capsys, tiny_sd1_dir, tmp_path):
    code, out, _ = run(capsys, "export", str(tiny_sd1_dir), str(tmp_path / "wd"), "--precision", "fp32",
                       "--components", "text_encoder")
    assert code == 0
    assert "text_encoder  fp32  onnx/text_encoder.onnx  max error" in out
    code, out, err = run(capsys, "export", str(tiny_sd1_dir), str(tmp_path / "wd"), "--precision", "fp32",
                         "--components", "text_encoder", "--quiet")
    assert code == 0 and out == "" and err == ""


def test_debug_shows_the_traceback(tmp_path):
    from sdtrt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such file or directory"):
        main(["export", str(tmp_path / "nope"), str(tmp_path / "wd"), "--debug"])


def test_console_entry_point_exit_code(tmp_path):
    """Through a real process: exit status 2, one stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "export", str(tmp_path / "nope"), str(tmp_path / "wd")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).endswith("no such file or directory")


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """tiny-sd1 and tiny-sd2 as original-layout single files, made through the CLI, tokenizer/ beside them."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for arch in ("tiny-sd1", "tiny-sd2"):
        d = root / arch
        d.mkdir()
        assert main(["init-random", str(d / "diffusers"), "--arch", arch, "--seed", "1", "--quiet",
                     "--single-file", str(d / "model.safetensors")]) == 0
        shutil.copytree(d / "diffusers" / "tokenizer", d / "tokenizer")
        out[arch] = d / "model.safetensors"
    return out


@pytest.mark.parametrize("arch, precision", [("tiny-sd1", "fp32"), ("tiny-sd2", "fp16")])
def test_export_single_file(capsys, single_files, tmp_path, arch, precision):
    import json

    code, out, err = run(capsys, "export", str(single_files[arch]), str(tmp_path / "wd"), "--precision", precision)
    assert code == 0, err
    m = json.loads((tmp_path / "wd" / "manifest.json").read_text())
    assert m["source"]["format"] == "single-file" and m["source"]["arch"] == arch
    assert len(m["source"]["sha256"]) == 64
    assert m["source"]["prediction_type"] == ("v_prediction" if arch == "tiny-sd2" else "epsilon")
    for entry in m["components"].values():
        assert entry["precision"] == precision
        for per_shape in entry["validation"]:
            assert all(v["passed"] for v in per_shape.values())


def test_single_file_without_tokenizer(capsys, single_files, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(single_files["tiny-sd1"], lone)
    code, _, err = run(capsys, "export", str(lone), str(tmp_path / "wd"))
    assert code == 2
    assert "no tokenizer found beside the checkpoint" in one_error_line(err)
    assert "--tokenizer DIR" in err
    code, _, err = run(capsys, "export", str(lone), str(tmp_path / "wd"), "--components", "text_encoder",
                       "--tokenizer", str(single_files["tiny-sd1"].parent / "tokenizer"), "--quiet")
    assert code == 0, err


def test_pickle_refused_then_allowed(capsys, single_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(single_files["tiny-sd1"])}, ckpt)
    shutil.copytree(single_files["tiny-sd1"].parent / "tokenizer", tmp_path / "tokenizer")
    code, _, err = run(capsys, "export", str(ckpt), str(tmp_path / "wd"))
    assert code == 2
    line = one_error_line(err)
    assert "refusing to load a pickle checkpoint" in line and "--allow-pickle" in line
    code, _, err = run(capsys, "export", str(ckpt), str(tmp_path / "wd"), "--allow-pickle",
                       "--components", "vae_decoder", "--quiet")
    assert code == 0, err


def test_unknown_architecture_single_file(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(7, 4, 3, 3)}, f)
    code, _, err = run(capsys, "export", str(f), str(tmp_path / "wd"))
    assert code == 2
    assert "unknown architecture" in one_error_line(err) and "--config DIR" in err


def test_prediction_type_override(capsys, single_files, tmp_path):
    import json

    code, _, err = run(capsys, "export", str(single_files["tiny-sd2"]), str(tmp_path / "wd"), "--components",
                       "text_encoder", "--prediction-type", "epsilon", "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "wd" / "manifest.json").read_text())
    assert m["model"]["prediction_type"] == "epsilon"
    sched = json.loads((tmp_path / "wd" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "WD", "--static", "--dynamic"], "argument --dynamic: not allowed with argument --static"),
        (["build", "WD", "--opt-level", "9"], "--opt-level must be an integer between 0 and 5, got 9"),
        (["build", "WD", "--tensorrt", "trt"], "argument --tensorrt: invalid choice: 'trt'"),
        (["build", "WD", "--tensorrt", "tensorrt", "--target", "sm89"], "--target is for TensorRT-RTX"),
        # the dev extra installs TensorRT-RTX (auto picks it without TensorRT); this machine has no GPU
        (["build", "WD"], "no GPU is visible: say which GPUs to build for with --target"),
        (["check", "WD"], "no TensorRT engines; build them"),
    ],
)
def test_build_and_check_errors(capsys, sd1_workdir_fp32, argv, message):
    import torch

    if torch.cuda.is_available() and argv in (["build", "WD"], ["check", "WD"]):
        pytest.skip("a GPU is visible: these build and check for real")
    code, _, err = run(capsys, *[str(sd1_workdir_fp32) if a == "WD" else a for a in argv])
    assert code == 2
    assert message in one_error_line(err)


def test_bench_short_writes_reports(capsys, sd1_workdir_fp32, tmp_path):
    import json

    code, out, err = run(capsys, "bench", str(sd1_workdir_fp32), "--short", "--contenders",
                         "diffusers,sdtrt-onnxruntime", "--threads", "1", "--stem", "smoke", "--out", str(tmp_path),
                         "--quiet")
    assert code == 0, err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["smoke.json", "smoke.md", "smoke.png"]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    # expectations follow the device: on a GPU, ONNX Runtime runs only with its CUDA execution provider
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    ort_runs = not cuda or "CUDAExecutionProvider" in ort.get_available_providers()
    assert result["device"] == ("cuda" if cuda else "cpu")
    assert set(result["contenders"]) == {"diffusers"} | ({"sdtrt-onnxruntime"} if ort_runs else set())
    assert set(result["skipped"]) == (set() if ort_runs else {"sdtrt-onnxruntime"})
    assert result["contenders"]["diffusers"]["dtype"] == ("float16" if cuda else "float32")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--contenders", "diffusers,tensorflow"], "unknown contender(s) tensorflow"),
        (["--batch-sizes", "1,x"], "batch sizes must be comma-separated integers"),
        (["--steps", "0"], "steps must be an integer >= 1"),
    ],
)
def test_bench_bad_options(capsys, sd1_workdir_fp32, tmp_path, extra, message):
    code, _, err = run(capsys, "bench", str(sd1_workdir_fp32), "--out", str(tmp_path), *extra)
    assert code == 2
    assert message in one_error_line(err)
    assert not list(tmp_path.iterdir())


def test_generate_img2img(capsys, sd1_workdir_fp32, tmp_path):
    from PIL import Image

    Image.new("RGB", (70, 66), (200, 30, 30)).save(tmp_path / "in.png")
    code, out, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--init-image", str(tmp_path / "in.png"),
                         "--strength", "0.5", "--steps", "4", "--scheduler", "ddim", "-o", str(tmp_path / "out.png"))
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (64, 64)  # the init image's size, rounded down to multiples of 8
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "out.png")


def test_generate_unreadable_init_image(capsys, sd1_workdir_fp32, tmp_path):
    (tmp_path / "in.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--init-image", str(tmp_path / "in.png"),
                       "-o", str(tmp_path / "out.png"))
    assert code == 2
    assert "cannot read the init image" in one_error_line(err)


def test_torch_backend_loads_a_single_file_source_like_the_export(capsys, single_files, tmp_path):
    """The torch backend reloads the source: a lone single file exported with --tokenizer must still load."""
    lone = tmp_path / "lone.safetensors"
    shutil.copy(single_files["tiny-sd1"], lone)
    code, _, err = run(capsys, "export", str(lone), str(tmp_path / "wd"), "--precision", "fp32", "--quiet",
                       "--tokenizer", str(single_files["tiny-sd1"].parent / "tokenizer"))
    assert code == 0, err
    code, _, err = run(capsys, "generate", str(tmp_path / "wd"), "a cat", "--backend", "torch", "--steps", "1",
                       "-q", "-o", str(tmp_path / "out.png"))
    assert code == 0, err
    assert (tmp_path / "out.png").is_file()


# -- exit codes: 0 ok, 2 an SdtrtError (the user's to fix), 1 a bug, 130 Ctrl-C -------------------------------------
def test_an_internal_error_is_exit_1_not_a_usage_error(capsys, monkeypatch, tmp_path):
    from sdtrt import cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(cli.COMMANDS, "check", broken)
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["sdtrt: internal error: RuntimeError: boom (run again with --debug for the traceback)"]
    assert out == ""
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the traceback, not a line
        main(["check", str(tmp_path), "--debug"])


def _fake_check(monkeypatch, passed: bool) -> None:
    from types import SimpleNamespace

    import sdtrt.engines.check as check

    failures = [] if passed else [("unet", SimpleNamespace(name="latent"))]
    report = SimpleNamespace(passed=passed, failures=failures, components=())
    monkeypatch.setattr(check, "check_engines", lambda workdir, **kw: report)
    monkeypatch.setattr(check, "format_report", lambda r: "REPORT")


def test_a_failing_check_exits_non_zero(capsys, monkeypatch, tmp_path):
    _fake_check(monkeypatch, passed=False)
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 2  # an EngineError: the engines are wrong, not the program
    assert out.strip() == "REPORT"
    assert "1 output(s) exceed their tolerance" in one_error_line(err)


def test_a_passing_check_exits_0(capsys, monkeypatch, tmp_path):
    _fake_check(monkeypatch, passed=True)
    code, out, err = run(capsys, "check", str(tmp_path))
    assert (code, out.strip(), err) == (0, "REPORT", "")


def test_ctrl_c_exits_130(tmp_path):
    """A real SIGINT to a real process, while a command runs: exit status 130, one line, no traceback."""
    import signal

    script = (
        "import sys, time\n"
        "from sdtrt import cli\n"
        "def waits(args):\n"
        "    print('running', flush=True)\n"
        "    time.sleep(120)\n"
        "cli.COMMANDS['check'] = waits\n"
        f"sys.exit(cli.main(['check', {str(tmp_path)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["sdtrt: interrupted"]
