"""``sdtrt generate --lora PATH[:SCALE]``: the image of ``pipe(..., loras=...)``; a bad LoRA is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtrt.cli import main
from sdtrt.runtime.pipeline import Pipeline


def kohya_from_manifest(workdir, path, seed=0):
    """A random kohya LoRA over every UNet attention projection the export mapped (from the manifest alone)."""
    targets = json.loads((workdir / "manifest.json").read_text())["components"]["unet"]["lora"]["targets"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in targets.items():
        if name.endswith(("to_q", "to_v", "ff.net.2")):
            out, inp = t["shape"]
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) / inp ** 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.05
    save_file(tensors, str(path))
    return str(path)


def test_generate_with_lora_matches_the_api(sd1_workdir_fp32, tmp_path, capsys):
    lora = kohya_from_manifest(sd1_workdir_fp32, tmp_path / "style.safetensors")
    out = tmp_path / "out.png"
    code = main(["generate", str(sd1_workdir_fp32), "a cat", "--steps", "3", "--backend", "onnxruntime",
                 "--lora", f"{lora}:0.8", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    pipe = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")
    want = pipe("a cat", num_inference_steps=3, loras=[(lora, 0.8)])
    base = pipe("a cat", num_inference_steps=3)
    got = np.asarray(Image.open(out))
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert not np.array_equal(got, np.asarray(base.images[0]))
    assert 'Lora hashes: "style: ' in Image.open(out).text["parameters"]


def test_generate_with_a_missing_lora_is_one_line(sd1_workdir_fp32, tmp_path, capsys):
    code = main(["generate", str(sd1_workdir_fp32), "a cat", "--steps", "1", "--backend", "onnxruntime",
                 "--lora", str(tmp_path / "nope.safetensors:0.5"), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"sdtrt: error: {tmp_path / 'nope.safetensors'}: no such LoRA file"
