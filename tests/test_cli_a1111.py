"""The generate command as A1111 users drive it: img2img with the checkpoint's own scheduler, its flags' rules."""

from __future__ import annotations

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
