"""Real TensorRT builds on this CPU: ``sdtrt build --tensorrt rtx --target sm89`` turns every exported graph of the
tiny checkpoints (SD 1.x and 2.x, fp16 and fp32 graphs, static and dynamic profiles) into a TensorRT-RTX plan ahead
of time, with TensorRT-RTX's own ONNX parser and builder. Running the plans needs an RTX GPU; these tests check
what a build leaves behind: plans, sidecars naming the flavour and targets, the profiles, the builder's reported
phases, and a broken graph's parser error as one clear line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sdtrt.cli import main
from sdtrt.engines.compat import flavour
from sdtrt.engines.sidecar import engine_path, read_sidecar, sidecar_path
from sdtrt.export.manifest import read_manifest

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
RTX_VERSION = flavour("rtx").version()
PROFILES = {
    "static": ["--static"],
    # a small range keeps the build quick; the defaults (256..1024 px, batch 4) are built by test_dynamic_defaults
    "dynamic": ["--dynamic", "--max-batch", "2", "--min-side", "64", "--max-side", "128"],
}


def _build(capsys, wd: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["build", str(wd), "--tensorrt", "rtx", "--target", "sm89", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _copy(workdir: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("engines"))
    return wd


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("workdir", ["sd1_workdir_fp16", "sd1_workdir_fp32", "sd2_workdir_fp16", "sd2_workdir_fp32"])
def test_every_component_builds_ahead_of_time(request, capsys, tmp_path, workdir, profile):
    wd = _copy(request.getfixturevalue(workdir), tmp_path)
    manifest = read_manifest(wd)
    code, out, err = _build(capsys, wd, *PROFILES[profile])
    assert code == 0, err
    assert out.splitlines()[0] == f"building with TensorRT-RTX {RTX_VERSION}, ahead of time for sm89"
    assert [line for line in out.splitlines() if line.startswith("built ")] == [
        f"built {engine_path(wd, c)}" for c in COMPONENTS]
    for c in COMPONENTS:
        plan = engine_path(wd, c).read_bytes()
        side = read_sidecar(wd, c)
        assert side["tensorrt"] == {"flavour": "rtx", "version": RTX_VERSION, "targets": ["sm89"]}
        assert side["gpu"] is None  # built without one
        assert side["plan"]["sha256"] == hashlib.sha256(plan).hexdigest() and len(plan) > 10_000
        assert side["precision"] == manifest["components"][c]["precision"]
        assert side["onnx"] == [{"path": f["path"], "sha256": f["sha256"]} for f in manifest["components"][c]["files"]]
        assert {"STRONGLY_TYPED", "REQUIRE_USER_ALLOCATION"} <= set(side["flags"])
        assert side["build"]["profile"]["static"] is (profile == "static")
        # TensorRT's progress monitor reported its phases to us (the names are TensorRT's own)
        assert "Building engine" in side["build_phases"] and len(side["build_phases"]) >= 3
    # every attention Softmax of the UNet and the text encoder is matched to TensorRT's fused attention (MHA)
    # pattern, fp32 Softmax islands included: an export change that breaks the fusion fails here
    for c in ("text_encoder", "unet"):
        attention = read_sidecar(wd, c)["attention"]
        assert attention["softmax_layers"] > 0 and attention["mha_pattern"] == attention["softmax_layers"], (c, attention)
    axes = read_sidecar(wd, "unet")["profile"]["axes"]
    if profile == "static":
        assert axes == {"2B": [1, 2, 2], "H": [8, 8, 8], "W": [8, 8, 8], "77T": [77, 77, 231]}
    else:
        assert axes == {"2B": [1, 2, 4], "H": [8, 8, 16], "W": [8, 8, 16], "77T": [77, 77, 231]}
    assert read_sidecar(wd, "text_encoder")["profile"]["axes"]["B"] == ([1, 1, 1] if profile == "static" else [1, 1, 2])
    # a second build with the same settings has nothing to do
    code, out, _ = _build(capsys, wd, *PROFILES[profile])
    assert code == 0 and out.splitlines()[-1] == "engines are up to date"


def test_dynamic_defaults_and_a_build_too_big_for_memory(capsys, tmp_path, sd1_workdir_fp16):
    wd = _copy(sd1_workdir_fp16, tmp_path)
    code, _, err = _build(capsys, wd, "--dynamic", "--max-side", "256", "--components", "unet", "-q")
    assert code == 0, err
    # 64 px native: the range widens to include it (64..256 px), batch 1..4 (UNet rows 1..8)
    assert read_sidecar(wd, "unet")["profile"]["axes"] == {"2B": [1, 2, 8], "H": [8, 8, 32], "W": [8, 8, 32],
                                                           "77T": [77, 77, 231]}
    # up to 1024 px, the tiny UNet's attention over 128x128 latents at 8 rows asks TensorRT-RTX for ~64 GiB
    code, _, err = _build(capsys, wd, "--dynamic", "--components", "unet", "-q")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("sdtrt: error: out of memory building the unet engine; TensorRT asked for ")
    assert err.rstrip().endswith("GiB. Free memory, or build a smaller profile (--static, or lower --max-batch / "
                                 "--max-side)")


def test_several_targets_and_other_settings_rebuild(capsys, tmp_path, sd1_workdir_fp16):
    wd = _copy(sd1_workdir_fp16, tmp_path)
    assert _build(capsys, wd, "--components", "text_encoder", "-q")[0] == 0
    code = main(["build", str(wd), "--tensorrt", "rtx", "--target", "sm86,sm120", "--components", "text_encoder"])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[0].endswith("ahead of time for sm86, sm120")
    assert read_sidecar(wd, "text_encoder")["tensorrt"]["targets"] == ["sm86", "sm120"]
    assert f"built {engine_path(wd, 'text_encoder')}" in out  # other targets: rebuilt, not skipped


def test_a_graph_the_parser_refuses_is_one_clear_line(capsys, tmp_path, sd1_workdir_fp32):
    from onnx import TensorProto, helper, save

    wd = _copy(sd1_workdir_fp32, tmp_path)
    bad = wd / "onnx" / "text_encoder.onnx"
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["u8"], to=TensorProto.UINT8, name="/Cast_u8"),
         helper.make_node("Cast", ["u8"], ["last_hidden_state"], to=TensorProto.FLOAT, name="/Cast_back")],
        "broken", [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["B", 77])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", 77])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    manifest = json.loads((wd / "manifest.json").read_text())  # as if exported so: the sha256 agrees
    manifest["components"]["text_encoder"]["files"][0]["sha256"] = hashlib.sha256(bad.read_bytes()).hexdigest()
    (wd / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _build(capsys, wd, "--components", "text_encoder", "-q")
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"sdtrt: error: TensorRT-RTX's ONNX parser rejected {bad} (text_encoder): ")
    assert "UINT8" in err and err.rstrip().endswith("(node 0 '/Cast_u8', Cast)")
    assert not engine_path(wd, "text_encoder").exists() and not sidecar_path(wd, "text_encoder").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--target", "sm90"], "unknown --target sm90; TensorRT-RTX builds for sm75, sm80, sm86, sm89, sm120, sm121"),
    ([], "no GPU is visible: say which GPUs to build for with --target"),
    # TensorRT-RTX's refit path compiles with CUDA: refused before any work instead of a Myelin CUDA error
    (["--target", "sm89", "--refit"], "TensorRT-RTX builds refittable engines (--refit, for LoRA) only on a machine "
                                      "with an NVIDIA GPU"),
])
def test_target_errors(capsys, sd1_workdir_fp32, flags, message):
    import torch

    if torch.cuda.is_available() and "--target sm90" not in " ".join(flags):
        pytest.skip("a GPU is visible: these builds go ahead there")
    code = main(["build", str(sd1_workdir_fp32), "--tensorrt", "rtx", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"sdtrt: error: {message}") and err.count("\n") == 1
    assert not (sd1_workdir_fp32 / "engines").exists()


SDXL_COMPONENTS = {
    "sdxl_workdir_fp16": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
    "sdxl_workdir_fp32": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
    "sdxl_refiner_workdir_fp32": ("text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
}


@pytest.mark.parametrize("workdir", list(SDXL_COMPONENTS))
def test_every_sdxl_component_builds_ahead_of_time(request, capsys, tmp_path, workdir):
    """Both text encoders, the UNet with text_embeds/time_ids and its text axis, and the (fp32) VAE graphs of
    tiny-sdxl and its refiner, through TensorRT-RTX's own parser and builder."""
    wd = _copy(request.getfixturevalue(workdir), tmp_path)
    manifest = read_manifest(wd)
    components = SDXL_COMPONENTS[workdir]
    code, out, err = _build(capsys, wd)
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("built ")] == [
        f"built {engine_path(wd, c)}" for c in components]
    for c in components:
        side = read_sidecar(wd, c)
        assert side["precision"] == manifest["components"][c]["precision"]
        assert len(engine_path(wd, c).read_bytes()) > 10_000
        assert side["build"]["profile"]["max_chunks"] == 3
    unet = read_sidecar(wd, "unet")
    hidden, time_ids = manifest["model"]["text_hidden_size"], manifest["model"]["time_ids"]
    # one prompt chunk tuned, three at most, while the rest of the profile stays static
    assert unet["profile"]["axes"] == {"2B": [1, 2, 2], "H": [8, 8, 8], "W": [8, 8, 8], "77T": [77, 77, 231]}
    assert unet["input_shapes"]["encoder_hidden_states"] == [[1, 77, hidden], [2, 77, hidden], [2, 231, hidden]]
    assert unet["input_shapes"]["time_ids"] == [[1, time_ids], [2, time_ids], [2, time_ids]]
    assert unet["attention"]["softmax_layers"] > 0
    assert unet["attention"]["mha_pattern"] == unet["attention"]["softmax_layers"], unet["attention"]
    assert read_sidecar(wd, "text_encoder_2")["profile"]["axes"] == {"B": [1, 1, 1]}  # one prompt chunk at a time
    assert read_sidecar(wd, "vae_decoder")["precision"] == "fp32"  # SDXL's default VAE precision


def test_max_chunks_builds_the_unets_text_axis_and_is_validated(capsys, tmp_path, sdxl_workdir_fp16):
    wd = _copy(sdxl_workdir_fp16, tmp_path)
    code, _, err = _build(capsys, wd, "--components", "unet", "--max-chunks", "1", "-q")
    assert code == 0, err
    assert read_sidecar(wd, "unet")["profile"]["axes"]["77T"] == [77, 77, 77]
    code, out, _ = _build(capsys, wd, "--components", "unet", "--dynamic", "--max-batch", "1", "--min-side", "64",
                          "--max-side", "64", "--max-chunks", "2")
    assert code == 0 and f"built {engine_path(wd, 'unet')}" in out  # other settings: rebuilt
    side = read_sidecar(wd, "unet")
    assert side["profile"]["axes"]["77T"] == [77, 77, 154] and side["build"]["profile"]["max_chunks"] == 2
    code, _, err = _build(capsys, wd, "--components", "unet", "--max-chunks", "9")
    assert code == 2 and err == "sdtrt: error: --max-chunks must be an integer between 1 and 8, got 9\n"
