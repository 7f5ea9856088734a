"""sdtrt export on the tiny checkpoints: files, manifest, validation numbers, atomicity."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdtrt.checkpoint.loader import load_checkpoint
from sdtrt.errors import ExportError
from sdtrt.export import validate
from sdtrt.export.manifest import read_manifest
from sdtrt.export.pipeline import export_checkpoint
from sdtrt.export.spec import FAMILIES, ExportSpec
from sdtrt.fsutil import sha256_file

COMPONENTS = FAMILIES["sd1"].components  # the tiny SD workdirs (sd2 has the same)


def _values(manifest, component):
    return [(name, v) for per_shape in manifest["components"][component]["validation"] for name, v in per_shape.items()]


@pytest.mark.parametrize("workdir_fixture", ["sd1_workdir_fp32", "sd2_workdir_fp32"])
def test_fp32_export_matches_torch_tightly(request, workdir_fixture):
    wd = request.getfixturevalue(workdir_fixture)
    m = read_manifest(wd, verify_hashes=True)
    assert set(m["components"]) == set(COMPONENTS)
    for comp in COMPONENTS:
        values = _values(m, comp)
        assert len(values) >= 2 * len(m["components"][comp]["outputs"])  # two shapes each
        for name, v in values:
            assert v["passed"], (comp, name, v)
            if v["metric"] == "rel_to_peak":
                assert v["value"] < 1e-5, (comp, name, v)
                assert v["ref_max_abs"] > 0.1  # real outputs, not zeros
            elif v["metric"] == "max_levels":
                assert v["value"] <= 1
            else:
                assert v["value"] == 0


def test_fp16_export_is_fp16_and_close(sd1_workdir_fp16):
    m = read_manifest(sd1_workdir_fp16)
    for comp in COMPONENTS:
        entry = m["components"][comp]
        assert entry["precision"] == "fp16"
        for name, v in _values(m, comp):
            if v["metric"] == "rel_to_peak":
                assert 1e-5 < v["value"] < 1e-2, (comp, name, v)  # really fp16, and well inside tolerance
            elif v["metric"] == "max_levels":
                assert v["value"] <= 4
    sess = ort.InferenceSession(str(sd1_workdir_fp16 / "onnx" / "unet.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types == {"sample": "tensor(float16)", "timestep": "tensor(float)", "encoder_hidden_states": "tensor(float16)"}
    assert [o.type for o in sess.get_outputs()] == ["tensor(float16)"]
    model = onnx.load(str(sd1_workdir_fp16 / "onnx" / "unet.onnx"))
    size = {t: sum(np.prod(i.dims) for i in model.graph.initializer if i.data_type == t)
            for t in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    # fp32 weights remain only in the islands (norm scales/biases) and the timestep frequencies
    assert size[onnx.TensorProto.FLOAT16] > 100 * size[onnx.TensorProto.FLOAT]


def test_manifest_contents(sd1_workdir_fp32, tiny_sd1_dir):
    m = json.loads((sd1_workdir_fp32 / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["opset"] == 17
    assert m["source"] == {"path": str(tiny_sd1_dir.resolve()), "format": "diffusers", "arch": "tiny-sd1",
                           "family": "sd1", "prediction_type": "epsilon", "load_options": {}}
    assert {"torch", "onnx", "onnxruntime", "diffusers", "transformers", "sdtrt"} <= set(m["versions"])
    assert m["model"]["vae_scale_factor"] == 8 and m["model"]["default_size"] == 64
    unet = m["components"]["unet"]
    assert unet["inputs"][0] == {"name": "sample", "shape": ["2B", 4, "H", "W"], "dtype": "float32"}
    assert unet["dynamic_axes"]["sample"] == {"0": "2B", "2": "H", "3": "W"}
    dec = m["components"]["vae_decoder"]
    assert [o["name"] for o in dec["outputs"]] == ["image", "finite"]
    assert dec["outputs"][0] == {"name": "image", "shape": ["B", "8H", "8W", 3], "dtype": "uint8"}
    for comp in COMPONENTS:
        f = m["components"][comp]["files"][0]
        assert f["sha256"] == sha256_file(sd1_workdir_fp32 / f["path"])
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    text = "a photo of an astronaut riding a horse"
    assert load_tokenizer(sd1_workdir_fp32 / "tokenizer")(text)["input_ids"] == load_tokenizer(
        tiny_sd1_dir / "tokenizer")(text)["input_ids"]
    sched = json.loads((sd1_workdir_fp32 / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler"
    assert not [p for p in sd1_workdir_fp32.iterdir() if p.name.startswith(".")]  # no staging left


def test_graphs_take_other_shapes(sd1_workdir_fp32):
    """Dynamic axes: a 3-image batch at 80x40 px (latent 10x5, not a multiple of the UNet's upsample factor)."""
    sess = ort.InferenceSession(str(sd1_workdir_fp32 / "onnx" / "unet.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = sess.run(None, {"sample": rng.standard_normal((6, 4, 10, 5), dtype=np.float32),
                          "timestep": np.array([500.0], np.float32),
                          "encoder_hidden_states": rng.standard_normal((6, 77, 32), dtype=np.float32)})[0]
    assert out.shape == (6, 4, 10, 5) and np.isfinite(out).all()
    dec = ort.InferenceSession(str(sd1_workdir_fp32 / "onnx" / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    image, finite = dec.run(None, {"latent": rng.standard_normal((3, 4, 10, 5), dtype=np.float32)})
    assert image.shape == (3, 80, 40, 3) and image.dtype == np.uint8 and finite.tolist() == [True] * 3


@pytest.fixture(scope="module")
def tiny_sd1(tiny_sd1_dir):
    return load_checkpoint(tiny_sd1_dir)


def test_vae_precision_override(tiny_sd1, tmp_path):
    m = export_checkpoint(tiny_sd1, tmp_path / "wd", ExportSpec(precision="fp16", vae_precision="fp32",
                                                                components=("vae_decoder", "unet")), progress=False)
    assert m["components"]["vae_decoder"]["precision"] == "fp32"
    assert m["components"]["unet"]["precision"] == "fp16"
    assert m["components"]["vae_decoder"]["inputs"][0]["dtype"] == "float32"
    assert m["precision"] == {"default": "fp16", "vae": "fp32"}


def test_failed_validation_leaves_no_new_files(tiny_sd1, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    monkeypatch.setitem(validate.TOLERANCES, ("fp32", "float"), 1e-12)
    with pytest.raises(ExportError, match=r"text_encoder \(fp32\) failed validation against torch: output "
                                          r"last_hidden_state at shape \[2, 77, 32\] has relative error .* > tolerance 1e-12"):
        export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("text_encoder",)), progress=False)
    assert list(wd.iterdir()) == []


def test_partial_export_keeps_other_components_and_old_manifest_on_failure(tiny_sd1, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("text_encoder", "vae_decoder")),
                      progress=False)
    m = export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("vae_decoder",)), progress=False)
    assert set(m["components"]) == {"text_encoder", "vae_decoder"}
    before = (wd / "manifest.json").read_bytes()
    monkeypatch.setitem(validate.TOLERANCES, ("fp32", "uint8"), -1.0)
    with pytest.raises(ExportError, match="vae_decoder"):
        export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("vae_decoder",)), progress=False)
    assert (wd / "manifest.json").read_bytes() == before  # the complete earlier export is untouched
    read_manifest(wd, verify_hashes=True)


def test_interrupted_commit_leaves_no_manifest(tiny_sd1, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("text_encoder",)), progress=False)
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("tokenizer"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("text_encoder",)), progress=False)
    assert not (wd / "manifest.json").exists()
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(Exception, match="incomplete export"):
        read_manifest(wd)


def test_large_graph_path_with_external_data(tiny_sd1, tmp_path, monkeypatch):
    """Graphs over protobuf's 2 GiB keep their weights in <name>.onnx.data: exercised here by lowering the limit."""
    from sdtrt.export import graph

    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", 1 << 20)  # the tiny UNet's ~8 MiB of weights count as "large"
    wd = tmp_path / "wd"
    m = export_checkpoint(tiny_sd1, wd, ExportSpec(precision="fp32", components=("unet",)), progress=False)
    files = m["components"]["unet"]["files"]
    assert [f["path"] for f in files] == ["onnx/unet.onnx", "onnx/unet.onnx.data"]
    assert (wd / "onnx" / "unet.onnx").stat().st_size < 1 << 20 < (wd / "onnx" / "unet.onnx.data").stat().st_size
    assert all(v["passed"] for per_shape in m["components"]["unet"]["validation"] for v in per_shape.values())
    read_manifest(wd, verify_hashes=True)
