"""Exports that own their checkpoint free each torch module once its graph is traced and its references computed
(how ``sdtrt export`` brings a full-size export's peak memory down), with the same graphs and validation; and graphs
are written piece by piece, never as one serialised buffer."""

from __future__ import annotations

import io
import json

import onnx

from sdtrt.checkpoint.loader import load_checkpoint
from sdtrt.export.graph import write_in_pieces
from sdtrt.export.pipeline import export_checkpoint
from sdtrt.export.spec import ExportSpec


def test_release_frees_every_module_and_changes_nothing_else(tiny_sd1_dir, sd1_workdir_fp32, tmp_path):
    ckpt = load_checkpoint(tiny_sd1_dir)  # a private copy: release hands it over
    manifest = export_checkpoint(ckpt, tmp_path / "wd", ExportSpec(precision="fp32"), progress=False, release=True)
    for module in (ckpt.text_encoder, ckpt.unet, ckpt.vae):
        assert {p.device.type for p in module.parameters()} == {"meta"}  # weights freed
    kept = json.loads((sd1_workdir_fp32 / "manifest.json").read_text())  # the same export without release
    assert manifest["model"] == kept["model"]
    for name, entry in manifest["components"].items():
        assert entry["validation"] == kept["components"][name]["validation"], name
        assert [f["sha256"] for f in entry["files"]] == [f["sha256"] for f in kept["components"][name]["files"]], name


def test_without_release_the_checkpoint_stays_usable(tiny_sd1_dir, tmp_path):
    ckpt = load_checkpoint(tiny_sd1_dir)
    export_checkpoint(ckpt, tmp_path / "wd", ExportSpec(precision="fp32", components=("text_encoder",)), progress=False)
    assert {p.device.type for p in ckpt.text_encoder.parameters()} == {"cpu"}


def test_a_graph_written_in_pieces_reads_back_as_itself(sd1_workdir_fp16):
    model = onnx.load(str(sd1_workdir_fp16 / "onnx" / "unet.onnx"))
    buf = io.BytesIO()
    write_in_pieces(model, buf)
    back = onnx.load_from_string(buf.getvalue())
    assert {t.name: t.SerializeToString() for t in back.graph.initializer} == \
        {t.name: t.SerializeToString() for t in model.graph.initializer}
    for m in (back, model):
        m.graph.ClearField("initializer")
    assert back.SerializeToString() == model.SerializeToString()
