"""SDXL export (tiny-sdxl and its refiner): graphs and their IO, ONNX Runtime against diffusers' own modules for
each component (text_embeds and time_ids included), the fp16 islands, the manifest's model keys, and the UNet's
text axis at 1, 2 and 3 prompt chunks (SD's too)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.export.fp16 import convert_to_fp16
from sdtrt.export.manifest import read_manifest
from sdtrt.export.pipeline import export_checkpoint
from sdtrt.export.spec import ExportSpec
from sdtrt.export.trt_rules import find_violations

F32, F16 = "tensor(float)", "tensor(float16)"


@pytest.fixture(scope="module")
def xl32(sdxl_workdir_fp32):
    return sdxl_workdir_fp32


@pytest.fixture(scope="module")
def xl16(sdxl_workdir_fp16):
    return sdxl_workdir_fp16


@pytest.fixture(scope="module")
def refiner32(sdxl_refiner_workdir_fp32):
    return sdxl_refiner_workdir_fp32


@pytest.fixture(scope="module")
def xl_ckpt(tiny_sdxl_dir):
    """The checkpoint the exports were made from, for references."""
    from sdtrt.checkpoint.loader import load_checkpoint

    return load_checkpoint(tiny_sdxl_dir)


def _io(entry, which):
    return [(s["name"], s["shape"], s["dtype"]) for s in entry[which]]


def _session(graph):
    """An ONNX Runtime CPU session of a graph file or serialised graph."""
    return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), providers=["CPUExecutionProvider"])


def test_manifest_model_keys_for_every_family(xl32, refiner32, sd1_workdir_fp32):
    assert read_manifest(xl32, verify_hashes=True)["model"] == {
        "family": "sdxl", "prediction_type": "epsilon", "vae_scale_factor": 8, "vae_scaling_factor": 0.13025,
        "latent_channels": 4, "text_encoders": ["text_encoder", "text_encoder_2"], "text_hidden_size": 64,
        "max_length": 77, "default_size": 64, "pooled_dim": 48, "time_ids": 6,
        "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False,
    }
    assert read_manifest(refiner32, verify_hashes=True)["model"] == {
        "family": "sdxl-refiner", "prediction_type": "epsilon", "vae_scale_factor": 8, "vae_scaling_factor": 0.13025,
        "latent_channels": 4, "text_encoders": ["text_encoder_2"], "text_hidden_size": 32, "max_length": 77,
        "default_size": 64, "pooled_dim": 48, "time_ids": 5,
        "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True,
    }
    sd = read_manifest(sd1_workdir_fp32)["model"]
    assert {k: sd[k] for k in ("family", "text_encoders", "text_hidden_size")} == {
        "family": "sd1", "text_encoders": ["text_encoder"], "text_hidden_size": 32}
    assert not {"pooled_dim", "time_ids"} & set(sd)


def test_graph_io(xl32, refiner32):
    m = read_manifest(xl32)
    assert list(m["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    c = m["components"]
    assert _io(c["text_encoder"], "inputs") == [("input_ids", ["B", 77], "int32")]
    assert _io(c["text_encoder"], "outputs") == [("penultimate_unnormed", ["B", 77, 32], "float32")]
    assert _io(c["text_encoder_2"], "outputs") == [("penultimate_unnormed", ["B", 77, 32], "float32"),
                                                    ("text_embeds", ["B", 48], "float32")]
    assert _io(c["unet"], "inputs") == [
        ("sample", ["2B", 4, "H", "W"], "float32"), ("timestep", [1], "float32"),
        ("encoder_hidden_states", ["2B", "77T", 64], "float32"), ("text_embeds", ["2B", 48], "float32"),
        ("time_ids", ["2B", 6], "float32")]
    assert c["unet"]["dynamic_axes"]["encoder_hidden_states"] == {"0": "2B", "1": "77T"}
    r = read_manifest(refiner32)["components"]
    assert list(r) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert _io(r["unet"], "inputs")[2:] == [("encoder_hidden_states", ["2B", "77T", 32], "float32"),
                                            ("text_embeds", ["2B", 48], "float32"), ("time_ids", ["2B", 5], "float32")]
    # tokenizers: the refiner has only tokenizer_2; SDXL's second tokenizer pads with "!"
    assert (xl32 / "tokenizer").is_dir() and (xl32 / "tokenizer_2").is_dir()
    assert not (refiner32 / "tokenizer").exists() and (refiner32 / "tokenizer_2").is_dir()
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    assert load_tokenizer(xl32 / "tokenizer_2").pad_token == "!"
    assert load_tokenizer(xl32 / "tokenizer").pad_token == "<|endoftext|>"


@pytest.mark.parametrize("wd", ["xl32", "refiner32"])
def test_fp32_validation_is_tight_at_two_shapes(request, wd):
    m = read_manifest(request.getfixturevalue(wd))
    for comp, entry in m["components"].items():
        assert len(entry["validation"]) == 2, comp
        for per_shape in entry["validation"]:
            assert set(per_shape) == {o["name"] for o in entry["outputs"]}
            for name, v in per_shape.items():
                assert v["passed"], (comp, name, v)
                if v["metric"] == "rel_to_peak":
                    assert v["value"] < 1e-5 and v["ref_max_abs"] > 0.05, (comp, name, v)


def test_text_encoders_are_what_diffusers_sdxl_feeds_the_unet(xl32, xl_ckpt):
    """diffusers' StableDiffusionXLPipeline.encode_prompt: hidden_states[-2] of each encoder (no final LayerNorm),
    and text_encoder_2's output [0] (text_embeds) as the pooled embedding; on real tokenized prompts."""
    from sdtrt.checkpoint.tokenizer import load_tokenizer

    prompts = ["a photo of an astronaut riding a horse", ""]
    for name, tok_dir in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tok = load_tokenizer(xl32 / tok_dir)
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = getattr(xl_ckpt, name)(ids, output_hidden_states=True)
        got = _session(xl32 / "onnx" / f"{name}.onnx").run(None, {"input_ids": ids.numpy().astype(np.int32)})
        want = [out.hidden_states[-2]] + ([out[0]] if name == "text_encoder_2" else [])
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), atol=2e-5 * float(w.abs().max()))
        # not the LayerNorm'd state: SD's penultimate_hidden_state would differ by far
        from sdtrt.export.clip import _text_model

        normed = _text_model(getattr(xl_ckpt, name)).final_layer_norm(out.hidden_states[-2]).detach().numpy()
        assert np.abs(got[0] - normed).max() > 0.1


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_unet_text_axis_against_diffusers(xl32, xl_ckpt, chunks):
    """The SDXL UNet graph at T = 1, 2, 3 prompt chunks against diffusers' UNet with added_cond_kwargs."""
    gen = torch.Generator().manual_seed(chunks)
    sample = torch.randn(2, 4, 8, 6, generator=gen)
    t = torch.tensor([640.0])
    hidden = torch.randn(2, 77 * chunks, 64, generator=gen)
    text_embeds = torch.randn(2, 48, generator=gen)
    time_ids = torch.tensor([[64.0, 48, 0, 0, 64, 48], [1024, 1024, 16, 8, 1024, 1024]])
    with torch.no_grad():
        want = xl_ckpt.unet(sample, t, hidden, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                            return_dict=False)[0].numpy()
    got = _session(xl32 / "onnx" / "unet.onnx").run(None, {
        "sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": hidden.numpy(),
        "text_embeds": text_embeds.numpy(), "time_ids": time_ids.numpy()})[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    # time_ids matter (they are not folded away), and so does every chunk of the text
    other = time_ids.clone()
    other[:, 4:] = 512
    moved = _session(xl32 / "onnx" / "unet.onnx").run(None, {
        "sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": hidden.numpy(),
        "text_embeds": text_embeds.numpy(), "time_ids": other.numpy()})[0]
    assert np.abs(moved - got).max() > 1e-3


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_sd_unet_takes_1_to_3_prompt_chunks(sd1_workdir_fp32, tiny_sd1_dir, chunks):
    from sdtrt.checkpoint.loader import load_checkpoint

    unet = load_checkpoint(tiny_sd1_dir).unet
    gen = torch.Generator().manual_seed(chunks)
    sample, hidden = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77 * chunks, 32, generator=gen)
    t = torch.tensor([10.0])
    with torch.no_grad():
        want = unet(sample, t, hidden, return_dict=False)[0].numpy()
    got = _session(sd1_workdir_fp32 / "onnx" / "unet.onnx").run(
        None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": hidden.numpy()})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert read_manifest(sd1_workdir_fp32)["components"]["unet"]["inputs"][2]["shape"] == ["2B", "77T", 32]


def test_fp16_graphs_keep_timestep_and_time_ids_fp32_and_the_vae_fp32(xl16):
    m = read_manifest(xl16)
    assert m["precision"] == {"default": "fp16", "vae": "fp32"}  # SDXL's VAE overflows in fp16
    assert {c: e["precision"] for c, e in m["components"].items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    unet = _session(xl16 / "onnx" / "unet.onnx")
    assert {i.name: i.type for i in unet.get_inputs()} == {
        "sample": F16, "timestep": F32, "encoder_hidden_states": F16, "text_embeds": F16, "time_ids": F32}
    assert [o.type for o in _session(xl16 / "onnx" / "text_encoder_2.onnx").get_outputs()] == [F16, F16]
    for comp, entry in m["components"].items():
        for per_shape in entry["validation"]:
            for name, v in per_shape.items():
                if v["metric"] == "rel_to_peak" and entry["precision"] == "fp16":
                    assert 1e-5 < v["value"] < 1e-2, (comp, name, v)  # really fp16, well inside tolerance
    # every sinusoid (timestep's and the time ids') is computed in fp32
    model = onnx.load(str(xl16 / "onnx" / "unet.onnx"))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.value_info, *model.graph.input)}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) >= 4 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    for name in ("unet", "text_encoder", "text_encoder_2"):  # TensorRT's rules hold in every exported graph
        assert find_violations(onnx.load(str(xl16 / "onnx" / f"{name}.onnx"))) == []


def test_time_ids_in_fp16_would_lose_the_size_conditioning(xl32):
    """Why time_ids is an fp32 input: the same UNet graph converted with time_ids in fp16 is far off for sizes
    past 2048 px (fp16 rounds odd ones to even: a radian off in the unit-frequency sinusoid, and sin(f * size)
    keeps few digits at any frequency), converted as exported it is not."""
    fp32 = onnx.load(str(xl32 / "onnx" / "unet.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)), "timestep": np.array([500.0]),
             "encoder_hidden_states": rng.standard_normal((2, 77, 64)), "text_embeds": rng.standard_normal((2, 48)),
             "time_ids": np.array([[2049.0, 3001, 0, 0, 1024, 1024], [4095, 2313, 17, 5, 1152, 896]])}
    want = _session(fp32.SerializeToString()).run(None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]

    def error(fp32_inputs):
        g = convert_to_fp16(fp32, fp32_inputs=fp32_inputs)
        s = _session(g.SerializeToString())
        fed = {i.name: feeds[i.name].astype(np.float16 if i.type == F16 else np.float32) for i in s.get_inputs()}
        return float(np.abs(s.run(None, fed)[0].astype(np.float64) - want).max() / np.abs(want).max())

    kept, lost = error(("timestep", "time_ids")), error(("timestep",))
    assert kept < 5e-3 and lost > 3 * kept, (kept, lost)


def test_vae_precision_flag_overrides_the_family_default(tmp_path, xl_ckpt):
    m = export_checkpoint(xl_ckpt, tmp_path / "wd", ExportSpec(precision="fp16", vae_precision="fp16",
                                                               components=("vae_decoder",)), progress=False)
    assert m["precision"] == {"default": "fp16", "vae": "fp16"}
    assert m["components"]["vae_decoder"]["inputs"][0]["dtype"] == "float16"


def test_components_a_family_lacks_are_refused_before_any_file(tmp_path, xl_ckpt, tiny_sd1_dir):
    from sdtrt.checkpoint.loader import load_checkpoint

    with pytest.raises(UsageError) as e:
        export_checkpoint(load_checkpoint(tiny_sd1_dir), tmp_path / "wd", ExportSpec(components=("text_encoder_2",)),
                          progress=False)
    assert str(e.value) == ("a sd1 checkpoint has no text_encoder_2; its components are text_encoder, unet, "
                            "vae_decoder, vae_encoder")
    assert not (tmp_path / "wd").exists()
    with pytest.raises(UsageError, match="unknown component"):
        ExportSpec(components=("text_encoder_3",))


def test_torch_backend_runs_the_exporters_wrappers(sd1_workdir_fp32, tiny_sd1_dir):
    from sdtrt.checkpoint.loader import load_checkpoint
    from sdtrt.export.modules import graph_modules
    from sdtrt.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(sd1_workdir_fp32, read_manifest(sd1_workdir_fp32), torch.device("cpu"))
    exported = graph_modules(load_checkpoint(tiny_sd1_dir))
    assert {n: type(m) for n, m in backend._modules.items()} == {n: type(m) for n, m in exported.items()}
