"""TensorRT's parser rules, checked at export: hand-made graphs that break them, the real exports that keep them,
and TensorRT-RTX's own ONNX parser agreeing with both."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdtrt.checkpoint.loader import load_checkpoint
from sdtrt.errors import ExportError
from sdtrt.export import vae
from sdtrt.export.pipeline import export_checkpoint
from sdtrt.export.spec import FAMILIES, ExportSpec
from sdtrt.export.trt_rules import check_trt_rules, find_violations

COMPONENTS = FAMILIES["sd1"].components  # the tiny SD workdirs

FLOAT16, UINT8 = TensorProto.FLOAT16, TensorProto.UINT8


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def decoder_tail(cast_last: bool) -> onnx.ModelProto:
    """x (1, 3, 4, 5) fp16 -> image (1, 4, 5, 3) uint8: the old decoder's tail (Cast -> Transpose) or the fixed one."""
    x = helper.make_tensor_value_info("x", FLOAT16, [1, 3, 4, 5])
    image = helper.make_tensor_value_info("image", UINT8, [1, 4, 5, 3])
    if cast_last:
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1], name="/Transpose"),
                 helper.make_node("Cast", ["t"], ["image"], to=UINT8, name="/Cast_2")]
    else:
        nodes = [helper.make_node("Cast", ["x"], ["pixels"], to=UINT8, name="/Cast_2"),
                 helper.make_node("Transpose", ["pixels"], ["image"], perm=[0, 2, 3, 1], name="/Transpose")]
    return _model(nodes, [x], [image])


def encoder_head(cast_first: bool) -> onnx.ModelProto:
    """image (1, 4, 5, 3) uint8 -> x (1, 3, 4, 5) fp16: the old encoder's head (Transpose -> Cast) or the fixed one."""
    image = helper.make_tensor_value_info("image", UINT8, [1, 4, 5, 3])
    x = helper.make_tensor_value_info("x", FLOAT16, [1, 3, 4, 5])
    if cast_first:
        nodes = [helper.make_node("Cast", ["image"], ["f"], to=FLOAT16, name="/Cast"),
                 helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2], name="/Transpose")]
    else:
        nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="/Transpose"),
                 helper.make_node("Cast", ["t"], ["x"], to=FLOAT16, name="/Cast")]
    return _model(nodes, [image], [x])


def uint16_intermediate() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", FLOAT16, [2])
    y = helper.make_tensor_value_info("y", FLOAT16, [2])
    return _model([helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT16, name="/to_u16"),
                   helper.make_node("Cast", ["u"], ["y"], to=FLOAT16, name="/back")], [x], [y])


BAD = {"decoder_tail": lambda: decoder_tail(False), "encoder_head": lambda: encoder_head(False),
       "uint16_intermediate": uint16_intermediate}
# What TensorRT-RTX 1.7's parser says about each (first error).
PARSER_SAYS = {"decoder_tail": "does not support UINT8 types for intermediate tensors",
               "encoder_head": "name: /Transpose and operator: Transpose", "uint16_intermediate": "convertDtype"}
GOOD = {"decoder_tail": lambda: decoder_tail(True), "encoder_head": lambda: encoder_head(True)}


def test_uint8_intermediate_is_refused_naming_node_tensor_and_rule():
    with pytest.raises(ExportError) as e:
        check_trt_rules(decoder_tail(cast_last=False), "vae_decoder")
    assert str(e.value) == (
        "vae_decoder: graph TensorRT would refuse: node '/Cast_2' (Cast), tensor 'pixels': writes a UINT8 tensor that "
        "is not a graph output; TensorRT allows UINT8 only on network inputs and outputs [rule uint8-io-only] "
        "(and 2 more)")
    assert [(v.node, v.tensor) for v in find_violations(decoder_tail(False))] == [
        ("/Cast_2", "pixels"), ("/Transpose", "pixels"), ("/Transpose", "image")]


def test_uint8_input_read_by_a_layer_is_refused():
    with pytest.raises(ExportError, match=r"^vae_encoder: graph TensorRT would refuse: node '/Transpose' "
                                          r"\(Transpose\), tensor 'image': reads a UINT8 tensor; .* \[rule uint8-io-only\]"):
        check_trt_rules(encoder_head(cast_first=False), "vae_encoder")


def test_dtype_tensorrt_cannot_represent_is_refused():
    with pytest.raises(ExportError, match=r"node '/to_u16' \(Cast\), tensor 'u': writes type UINT16, which TensorRT "
                                          r"cannot represent \[rule tensorrt-dtype\]"):
        check_trt_rules(uint16_intermediate(), "g")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_cast_at_the_graph_edge_passes(name):
    assert find_violations(GOOD[name]()) == []


@pytest.mark.parametrize("workdir_fixture", ["sd1_workdir_fp16", "sd1_workdir_fp32", "sd2_workdir_fp32"])
def test_exported_graphs_keep_the_rules(request, workdir_fixture):
    wd = request.getfixturevalue(workdir_fixture)
    for comp in COMPONENTS:
        assert find_violations(onnx.load(str(wd / "onnx" / f"{comp}.onnx"), load_external_data=False)) == [], comp


def test_vae_pixels_are_cast_at_the_graph_edge(sd1_workdir_fp16):
    dec = onnx.load(str(sd1_workdir_fp16 / "onnx" / "vae_decoder.onnx"))
    enc = onnx.load(str(sd1_workdir_fp16 / "onnx" / "vae_encoder.onnx"))
    writer = next(n for n in dec.graph.node if "image" in n.output)
    reader = [n for n in enc.graph.node if "image" in n.input]
    assert writer.op_type == "Cast" and [n.op_type for n in reader] == ["Cast"]


def test_export_refuses_a_uint8_intermediate_before_writing(tiny_sd1_dir, tmp_path, monkeypatch):
    """The old decoder (uint8 cast before the NHWC transpose) stops the export, and the WORKDIR stays empty."""

    def old_forward(self, latent):
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        finite = torch.isfinite(image).flatten(1).all(1)
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round()
        return image.to(torch.uint8).permute(0, 2, 3, 1), finite

    monkeypatch.setattr(vae.VaeDecoderGraph, "forward", old_forward)
    wd = tmp_path / "wd"
    with pytest.raises(ExportError, match=r"^vae_decoder: graph TensorRT would refuse: node '/Cast_\d+' \(Cast\), "
                                          r"tensor '.*': writes a UINT8 tensor that is not a graph output"):
        export_checkpoint(load_checkpoint(tiny_sd1_dir), wd, ExportSpec(components=("vae_decoder",), validate=False),
                          progress=False)
    assert list(wd.iterdir()) == []


# TensorRT-RTX's real ONNX parser (runs without a GPU): it accepts what the rules accept and refuses what they refuse.
rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx is not installed")


def _rtx_parse(model: onnx.ModelProto | str) -> list[str]:
    """Parse with TensorRT-RTX into a strongly typed network; returns the parser's errors (empty: accepted)."""
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(model) if isinstance(model, str) else parser.parse(model.SerializeToString())
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return [] if ok and not errors else errors or ["parse returned False"]


@pytest.mark.tensorrt
@rtx
@pytest.mark.parametrize("component", COMPONENTS)
def test_rtx_parser_accepts_every_exported_graph(sd1_workdir_fp16, component):
    assert _rtx_parse(str(sd1_workdir_fp16 / "onnx" / f"{component}.onnx")) == []


@pytest.mark.tensorrt
@rtx
@pytest.mark.parametrize("name", sorted(BAD))
def test_rtx_parser_refuses_what_the_rules_refuse(name):
    model = BAD[name]()
    assert find_violations(model)
    errors = _rtx_parse(model)
    assert errors and PARSER_SAYS[name] in errors[0], errors


@pytest.mark.tensorrt
@rtx
@pytest.mark.parametrize("name", sorted(GOOD))
def test_rtx_parser_accepts_what_the_rules_accept(name):
    assert _rtx_parse(GOOD[name]()) == []
