"""The generate command as A1111 users drive it: img2img with the checkpoint's own scheduler, A1111's sampler and
schedule type names, --seed -1, A1111's prompt syntax (and --prompt-syntax plain), and the flags' rules."""

from __future__ import annotations

import pytest

from sdtrt.runtime.png import read_parameters
from tests.test_cli import one_error_line, run


def test_img2img_with_the_checkpoints_own_scheduler(capsys, sd1_workdir_fp32, tmp_path):
    """tiny-sd1 (like every SD 1.x model) ships PNDMScheduler: img2img refused it before the warm-up restart."""
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 120, 200)).save(tmp_path / "in.png")
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--init-image", str(tmp_path / "in.png"),
                       "--steps", "4", "-o", str(tmp_path / "out.png"))
    assert code == 0, err
    text = read_parameters(tmp_path / "out.png")
    assert "Sampler: PLMS" in text and "Denoising strength: 0.75" in text


def test_strength_without_init_image_is_a_usage_error(capsys, sd1_workdir_fp32, tmp_path):
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--strength", "0.5",
                       "-o", str(tmp_path / "out.png"))
    assert code == 2
    assert one_error_line(err) == "sdtrt: error: --strength is img2img's denoising strength: give --init-image too"
    assert not (tmp_path / "out.png").exists()


def _pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a1111_sampler_and_schedule_type_names(capsys, sd1_workdir_fp32, tmp_path):
    """`--scheduler "DPM++ 2M"` is A1111 1.9's DPM++ 2M: Automatic means Karras (sd_samplers_kdiffusion's
    {'scheduler': 'karras'}), the same image as sdtrt's dpmpp_2m_karras, and the PNG says so as A1111 writes it."""
    import numpy as np

    common = ("a cat", "--steps", "3", "--seed", "5", "--width", "64", "--height", "64")
    outs = {}
    for key, args in {"ours": ("--scheduler", "dpmpp_2m_karras"), "auto": ("--scheduler", "DPM++ 2M"),
                      "karras": ("--scheduler", "DPM++ 2M", "--schedule-type", "Karras"),
                      "uniform": ("--scheduler", "DPM++ 2M", "--schedule-type", "uniform")}.items():
        out = str(tmp_path / f"{key}.png")
        code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), *common, *args, "-q", "-o", out)
        assert code == 0, err
        outs[key] = _pixels(tmp_path / f"{key}.png")
    assert np.array_equal(outs["ours"], outs["auto"]) and np.array_equal(outs["ours"], outs["karras"])
    assert not np.array_equal(outs["ours"], outs["uniform"])


def test_png_says_sampler_schedule_type_and_eta_as_a1111_writes_them(capsys, sd1_workdir_fp32, tmp_path):
    from tests.a1111_infotext import parse_generation_parameters

    common = ("a cat", "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "-q")
    for key, args, expected in (
        ("auto", ("--scheduler", "DPM++ 2M"), {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}),
        ("uniform", ("--scheduler", "DPM++ 2M", "--schedule-type", "Uniform"), {"Schedule type": "Uniform"}),
        ("eta", ("--scheduler", "DDIM", "--eta", "0.5"), {"Sampler": "DDIM", "Eta DDIM": "0.5"}),
    ):
        code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), *common, *args, "-o", str(tmp_path / f"{key}.png"))
        assert code == 0, err
        params = parse_generation_parameters(read_parameters(tmp_path / f"{key}.png"))
        assert {k: params.get(k) for k in expected} == expected, key


def test_random_seed_is_printed_and_reproduces(capsys, sd1_workdir_fp32, tmp_path):
    import numpy as np

    from tests.a1111_infotext import parse_generation_parameters

    args = ("a cat", "--steps", "2", "--width", "64", "--height", "64", "--scheduler", "DDIM", "--eta", "0.5")
    code, out, err = run(capsys, "generate", str(sd1_workdir_fp32), *args, "--seed", "-1", "-q",
                         "-o", str(tmp_path / "random.png"))
    assert code == 0, err
    assert out.startswith("seed ") and len(out.splitlines()) == 1  # printed even with -q
    seed = int(out.split()[1])
    params = parse_generation_parameters(read_parameters(tmp_path / "random.png"))
    assert params["Seed"] == str(seed)
    code, out, _ = run(capsys, "generate", str(sd1_workdir_fp32), *args, "--seed", str(seed), "-q",
                       "-o", str(tmp_path / "again.png"))
    assert code == 0 and out == ""
    assert np.array_equal(_pixels(tmp_path / "random.png"), _pixels(tmp_path / "again.png"))


@pytest.mark.parametrize(("args", "message"), [
    (("--scheduler", "Euler a", "--schedule-type", "Karras"),
     "sdtrt: error: schedule type 'Karras' is not available with 'Euler a' here; choose Automatic or one of: Uniform"),
    (("--schedule-type", "Align Your Steps"),
     "sdtrt: error: unknown schedule type 'Align Your Steps'; choose one of: Automatic, Uniform, Karras, Exponential"),
    (("--scheduler", "euler", "--eta", "0.5"),
     "sdtrt: error: eta applies to DDIM only (diffusers' DDIMScheduler), not to 'euler'"),
    (("--seed", "-2"), "sdtrt: error: seed must be -1 (random) or a non-negative integer below 2**63, got -2"),
])
def test_bad_a1111_flags_are_one_line(capsys, sd1_workdir_fp32, tmp_path, args, message):
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a cat", "--steps", "2", *args,
                       "-o", str(tmp_path / "out.png"))
    assert code == 2
    assert one_error_line(err) == message
    assert not (tmp_path / "out.png").exists()


def test_prompt_syntax_choices_are_the_runtimes():
    """The CLI spells the choices itself (building the parser imports no torch); they must be the runtime's."""
    from sdtrt import cli
    from sdtrt.runtime import prompts

    assert cli.PROMPT_SYNTAXES == prompts.SYNTAXES


def test_prompt_syntax_plain_sends_the_literal_text(capsys, sd1_workdir_fp32, tmp_path):
    """`(cat:1.5)` under --prompt-syntax plain is the text with its brackets and colon, which A1111's syntax spells
    with escapes (`\\(cat:1.5\\)`: one fragment of weight 1, the same tokens); under a1111 (the default) it is `cat`
    weighted 1.5, another image."""
    import numpy as np

    common = ("--steps", "2", "--seed", "3", "--width", "64", "--height", "64", "--scheduler", "euler", "-q")
    outs = {}
    for key, prompt, args in (("plain", "a photo of a (cat:1.5)", ("--prompt-syntax", "plain")),
                              ("escaped", r"a photo of a \(cat:1.5\)", ()),
                              ("a1111", "a photo of a (cat:1.5)", ("--prompt-syntax", "a1111")),
                              ("default", "a photo of a (cat:1.5)", ())):
        code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), prompt, *common, *args,
                           "-o", str(tmp_path / f"{key}.png"))
        assert code == 0, err
        outs[key] = _pixels(tmp_path / f"{key}.png")
    assert np.array_equal(outs["plain"], outs["escaped"])
    assert np.array_equal(outs["a1111"], outs["default"])
    assert not np.array_equal(outs["plain"], outs["a1111"])


def test_plain_syntax_passes_what_a1111_syntax_refuses(capsys, sd1_workdir_fp32, tmp_path):
    """Prompt editing is refused under a1111 (it would change the prompt mid-sampling) but is only text when plain."""
    args = ("--steps", "1", "--width", "64", "--height", "64", "-q")
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a [cat:dog:0.5]", *args,
                       "-o", str(tmp_path / "edit.png"))
    assert code == 2
    assert one_error_line(err).startswith("sdtrt: error: prompt: prompt editing [cat:dog:0.5] (a prompt that changes "
                                          "during sampling) is not supported; use --prompt-syntax plain")
    assert not (tmp_path / "edit.png").exists()
    code, _, err = run(capsys, "generate", str(sd1_workdir_fp32), "a [cat:dog:0.5]", *args, "--prompt-syntax", "plain",
                       "-o", str(tmp_path / "edit.png"))
    assert code == 0, err
    assert (tmp_path / "edit.png").exists()
