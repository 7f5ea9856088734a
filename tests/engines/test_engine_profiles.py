"""Optimization profiles from the manifest's symbolic shapes: static and dynamic, per component, with numbers."""

from __future__ import annotations

import pytest
from engine_manifests import sd15_manifest, sdxl_manifest

from sdtrt.engines.profiles import (
    AxisRange,
    BuildSpec,
    ComponentProfile,
    ProfileSpec,
    check_shape,
    component_profile,
    dynamic_sides,
    parse_axis,
)
from sdtrt.errors import ShapeError, UsageError

M = sd15_manifest()


def _shapes(component: str, spec: ProfileSpec, manifest=M):
    entry = manifest["components"][component]
    prof = component_profile(component, entry, spec.resolved(512), 8)
    return prof, prof.input_shapes(entry)


def test_static_default_is_native_size_batch_1():
    prof, s = _shapes("unet", ProfileSpec())
    # CFG rows: B rows with guidance <= 1 (min), 2B rows with CFG (opt = max)
    assert s["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64))
    assert s["timestep"] == ((1,), (1,), (1,))
    assert s["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (2, 77, 768))
    assert prof.dims("opt") == {"2B": 2, "H": 64, "W": 64}
    assert prof.dims("min") == {"2B": 1, "H": 64, "W": 64}

    _, s = _shapes("text_encoder", ProfileSpec())
    assert s["input_ids"] == ((1, 77),) * 3
    prof, s = _shapes("vae_decoder", ProfileSpec())
    assert s["latent"] == ((1, 4, 64, 64),) * 3
    assert prof.dims("opt") == {"B": 1, "H": 64, "W": 64, "8H": 512, "8W": 512}
    _, s = _shapes("vae_encoder", ProfileSpec())
    assert s["image"] == ((1, 512, 512, 3),) * 3


def test_static_batch_and_non_square_size():
    spec = ProfileSpec(batch=2, height=768, width=512)
    _, s = _shapes("unet", spec)
    assert s["sample"] == ((2, 4, 96, 64), (4, 4, 96, 64), (4, 4, 96, 64))
    _, s = _shapes("text_encoder", spec)  # one prompt at a time, whatever the image batch
    assert s["input_ids"] == ((1, 77),) * 3
    _, s = _shapes("vae_decoder", spec)
    assert s["latent"] == ((2, 4, 96, 64),) * 3
    _, s = _shapes("vae_encoder", spec)
    assert s["image"] == ((2, 768, 512, 3),) * 3


def test_dynamic_defaults_batch_1_to_4_and_256_to_1024_px():
    spec = ProfileSpec(static=False)
    assert spec.resolved(512) == ProfileSpec(static=False, batch=1, height=512, width=512, max_batch=4, min_side=256,
                                             max_side=1024)
    _, s = _shapes("unet", spec)
    assert s["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert s["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))
    _, s = _shapes("text_encoder", spec)
    assert s["input_ids"] == ((1, 77), (1, 77), (4, 77))
    _, s = _shapes("vae_decoder", spec)
    assert s["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    _, s = _shapes("vae_encoder", spec)
    assert s["image"] == ((1, 256, 256, 3), (1, 512, 512, 3), (4, 1024, 1024, 3))


def test_dynamic_explicit_range_and_opt():
    spec = ProfileSpec(static=False, batch=2, height=640, width=384, max_batch=3, min_side=384, max_side=768)
    prof, s = _shapes("unet", spec)
    assert s["sample"] == ((1, 4, 48, 48), (4, 4, 80, 48), (6, 4, 96, 96))
    assert prof.axes == (AxisRange("2B", 1, 4, 6), AxisRange("H", 48, 80, 96), AxisRange("W", 48, 48, 96))


def test_dynamic_default_range_widens_to_include_the_opt_size():
    # tiny models are 64 px natively: the default 256..1024 widens down to it instead of failing
    assert ProfileSpec(static=False).resolved(64).min_side == 64
    assert ProfileSpec(static=False, height=1536, width=512).resolved(512).max_side == 1536
    assert ProfileSpec(static=False, batch=6).resolved(512).max_batch == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 4}, "--max-batch only apply to --dynamic engines"),
        ({"min_side": 256, "max_side": 512}, "--min-side, --max-side only apply to --dynamic engines"),
        ({"height": 500}, "--height must be a multiple of 8 between 8 and 2048, got 500"),
        ({"width": 4096}, "--width must be a multiple of 8 between 8 and 2048, got 4096"),
        ({"batch": 0}, "--batch must be an integer between 1 and 64, got 0"),
        ({"static": False, "batch": 4, "max_batch": 2}, "--max-batch 2 is below --batch 4"),
        ({"static": False, "min_side": 768, "max_side": 512}, "--min-side 768 is above --max-side 512"),
        ({"static": False, "height": 1024, "max_side": 768}, "--height 1024 is outside --min-side..--max-side (-..768 px)"),
    ],
)
def test_profile_spec_validation(kwargs, message):
    with pytest.raises(UsageError) as e:
        ProfileSpec(**kwargs)
    assert str(e.value) == message


def test_build_spec_validation():
    with pytest.raises(UsageError, match="--opt-level must be an integer between 0 and 5, got 6"):
        BuildSpec(opt_level=6)
    with pytest.raises(UsageError, match="--workspace must be an integer between 1"):
        BuildSpec(workspace_mib=0)


def test_sides_must_be_multiples_of_the_vae_scale():
    entry = M["components"]["unet"]
    with pytest.raises(UsageError, match="multiples of the VAE scale factor 16 px, got 520"):
        component_profile("unet", entry, ProfileSpec(height=520, width=512).resolved(512), 16)


def test_check_shape_names_the_built_range():
    prof, _ = _shapes("unet", ProfileSpec())
    check_shape(prof, {"2B": 2, "H": 64, "W": 64})
    check_shape(prof, {"2B": 1, "H": 64, "W": 64})  # guidance <= 1
    with pytest.raises(ShapeError) as e:
        check_shape(prof, {"2B": 2, "H": 96, "W": 64}, "rebuild")
    assert str(e.value) == (
        "the unet engine cannot run this shape: H = 96 (768 px) is outside H 64 (512 px) "
        "(built for 2B 1..2 (rows: CFG runs 2B, guidance <= 1 runs B), H 64 (512 px), W 64 (512 px)); rebuild"
    )
    with pytest.raises(ShapeError, match=r"2B = 4 is outside 2B 1\.\.2 .*; W = 32 \(256 px\) is outside W 64"):
        check_shape(prof, {"2B": 4, "H": 64, "W": 32})
    with pytest.raises(ShapeError, match="unet: no size given for axis 'W'"):
        check_shape(prof, {"2B": 2, "H": 64})


def test_check_shape_dynamic_pixels():
    prof, _ = _shapes("vae_encoder", ProfileSpec(static=False))
    check_shape(prof, {"B": 4, "H": 128, "W": 32, "8H": 1024, "8W": 256})
    with pytest.raises(ShapeError, match=r"8H = 2048 is outside 8H 256\.\.1024 px"):
        check_shape(prof, {"B": 1, "H": 256, "W": 64, "8H": 2048, "8W": 512})


def test_cli_args_reconstruct_the_spec():
    assert ProfileSpec().resolved(512).cli_args() == ["--static", "--batch", "1", "--height", "512", "--width", "512"]
    dyn = ProfileSpec(static=False, batch=2).resolved(768)
    assert dyn.cli_args() == ["--dynamic", "--batch", "2", "--height", "768", "--width", "768", "--max-batch", "4",
                              "--min-side", "256", "--max-side", "1024"]
    spec = BuildSpec(profile=ProfileSpec().resolved(512), opt_level=5, workspace_mib=4096, refit=True, tf32=False)
    assert spec.cli_args()[-6:] == ["--opt-level", "5", "--workspace", "4096", "--refit", "--no-tf32"]
    assert BuildSpec.from_settings(spec.settings()) == spec


def test_component_profile_json_round_trip():
    prof, _ = _shapes("vae_decoder", ProfileSpec(static=False))
    obj = prof.to_json()
    assert obj["axes"]["8H"] == [256, 512, 1024]
    assert ComponentProfile.from_json(obj) == prof


def test_parse_axis():
    assert parse_axis("2B") == (2, "B")
    assert parse_axis("H") == (1, "H")
    assert parse_axis("8W") == (8, "W")
    assert parse_axis("77T") == (77, "T")
    with pytest.raises(ShapeError, match=r"unknown axis 'Q' in the manifest \(expected B, 2B, H, W, 8H, 8W, 77T\)"):
        parse_axis("Q")


def test_profiles_from_a_real_export(sd1_workdir_fp32):
    """The exporter's own manifest (tiny-sd1, 64 px) gives the profiles the hand-written one does."""
    from sdtrt.export.manifest import read_manifest

    m = read_manifest(sd1_workdir_fp32)
    assert m["model"]["vae_scale_factor"] == 8
    spec = ProfileSpec().resolved(m["model"]["default_size"])
    shapes = {c: component_profile(c, e, spec, 8).input_shapes(e) for c, e in m["components"].items()}
    hidden = m["model"]["text_hidden_size"]
    assert shapes["unet"]["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))
    # every family's UNet has the text axis: 1 prompt chunk tuned, --max-chunks (3) at most
    assert shapes["unet"]["encoder_hidden_states"] == ((1, 77, hidden), (2, 77, hidden), (2, 231, hidden))
    assert shapes["vae_encoder"]["image"] == ((1, 64, 64, 3),) * 3
    assert shapes["text_encoder"]["input_ids"] == ((1, 77),) * 3


XL = sdxl_manifest()


def _xl(component: str, spec: ProfileSpec, manifest=XL):
    entry = manifest["components"][component]
    prof = component_profile(component, entry, spec.resolved(1024, dynamic_sides(manifest["model"])), 8)
    return prof, prof.input_shapes(entry)


def test_unet_text_axis_spans_1_to_max_chunks_prompt_chunks():
    prof, s = _xl("unet", ProfileSpec())
    assert s["encoder_hidden_states"] == ((1, 77, 2048), (2, 77, 2048), (2, 231, 2048))  # 1 chunk tuned, 3 at most
    assert s["text_embeds"] == ((1, 1280), (2, 1280), (2, 1280))
    assert s["time_ids"] == ((1, 6), (2, 6), (2, 6))
    assert s["sample"] == ((1, 4, 128, 128), (2, 4, 128, 128), (2, 4, 128, 128))
    assert prof.dims("max") == {"2B": 2, "H": 128, "W": 128, "77T": 231}
    _, s = _xl("unet", ProfileSpec(max_chunks=1))
    assert s["encoder_hidden_states"] == ((1, 77, 2048), (2, 77, 2048), (2, 77, 2048))  # fully static
    _, s = _xl("unet", ProfileSpec(static=False, max_chunks=8))
    assert s["encoder_hidden_states"] == ((1, 77, 2048), (2, 77, 2048), (8, 616, 2048))
    # an export from before the text axis (a fixed 77) builds as it did
    _, s = _shapes("unet", ProfileSpec(max_chunks=8))
    assert s["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (2, 77, 768))


def test_both_sdxl_text_encoders_run_one_prompt_chunk_at_a_time():
    for c in ("text_encoder", "text_encoder_2"):
        assert _xl(c, ProfileSpec(batch=4))[1]["input_ids"] == ((1, 77),) * 3
        assert _xl(c, ProfileSpec(static=False))[1]["input_ids"] == ((1, 77), (1, 77), (4, 77))
    assert _xl("text_encoder_2", ProfileSpec())[0].dims("max") == {"B": 1}


def test_dynamic_side_range_comes_from_the_family():
    assert dynamic_sides(XL["model"]) == (512, 1536) == dynamic_sides(sdxl_manifest(family="sdxl-refiner")["model"])
    assert dynamic_sides(M["model"]) == (256, 1024)  # an SD manifest (older ones name no family at all)
    assert dynamic_sides({"family": "sd2"}) == (256, 1024)
    _, s = _xl("unet", ProfileSpec(static=False))
    assert s["sample"] == ((1, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192))
    _, s = _xl("vae_decoder", ProfileSpec(static=False))
    assert s["latent"] == ((1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 192, 192))
    # widened to include a smaller native size (tiny-sdxl: 64 px) or an explicit opt size
    assert ProfileSpec(static=False).resolved(64, (512, 1536)).min_side == 64
    assert ProfileSpec(static=False, min_side=256).resolved(1024, (512, 1536)).min_side == 256


@pytest.mark.parametrize("value", [0, 9, -1, "3"])
def test_max_chunks_validation(value):
    with pytest.raises(UsageError) as e:
        ProfileSpec(max_chunks=value)
    assert str(e.value) == f"--max-chunks must be an integer between 1 and 8, got {value!r}"


def test_max_chunks_is_recorded_and_reconstructed():
    spec = BuildSpec(profile=ProfileSpec(max_chunks=5).resolved(1024))
    assert spec.settings()["profile"]["max_chunks"] == 5  # what the sidecar records
    assert spec.cli_args()[-2:] == ["--max-chunks", "5"]
    assert BuildSpec.from_settings(spec.settings()) == spec
    # sidecars from before --max-chunks read as the default
    old = spec.settings()
    del old["profile"]["max_chunks"]
    assert BuildSpec.from_settings(old).profile.max_chunks == 3


def test_a_prompt_longer_than_the_engine_takes_is_refused_with_its_range():
    prof, _ = _xl("unet", ProfileSpec())
    for chunks in (1, 2, 3):
        check_shape(prof, {"2B": 2, "H": 128, "W": 128, "77T": 77 * chunks})
    with pytest.raises(ShapeError) as e:
        check_shape(prof, {"2B": 2, "H": 128, "W": 128, "77T": 308}, "rebuild")
    assert str(e.value) == (
        "the unet engine cannot run this shape: 77T = 308 (4 prompt chunks) is outside 77T 77..231 (1..3 prompt "
        "chunks of 75 tokens: built with --max-chunks 3) (built for 2B 1..2 (rows: CFG runs 2B, guidance <= 1 runs "
        "B), H 128 (1024 px), W 128 (1024 px), 77T 77..231 (1..3 prompt chunks of 75 tokens: built with "
        "--max-chunks 3)); rebuild")
    with pytest.raises(ShapeError, match="unet: no size given for axis '77T'"):
        check_shape(prof, {"2B": 2, "H": 128, "W": 128})
    # an engine of an export from before the text axis ignores the size the pipeline passes for it
    old, _ = _shapes("unet", ProfileSpec())
    check_shape(old, {"2B": 2, "H": 64, "W": 64, "77T": 154})
