"""Optimization profiles from the manifest's symbolic shapes: static and dynamic, per component, with numbers."""

from __future__ import annotations

import pytest
from engine_manifests import sd15_manifest

from sdtrt.engines.profiles import (
    AxisRange,
    BuildSpec,
    ComponentProfile,
    ProfileSpec,
    check_shape,
    component_profile,
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
    with pytest.raises(ShapeError, match="unknown axis 'T'"):
        parse_axis("T")


def test_profiles_from_a_real_export(sd1_workdir_fp32):
    """The exporter's own manifest (tiny-sd1, 64 px) gives the profiles the hand-written one does."""
    from sdtrt.export.manifest import read_manifest

    m = read_manifest(sd1_workdir_fp32)
    assert m["model"]["vae_scale_factor"] == 8
    spec = ProfileSpec().resolved(m["model"]["default_size"])
    shapes = {c: component_profile(c, e, spec, 8).input_shapes(e) for c, e in m["components"].items()}
    hidden = m["model"]["text_hidden_size"]
    assert shapes["unet"]["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))
    assert shapes["unet"]["encoder_hidden_states"] == ((1, 77, hidden), (2, 77, hidden), (2, 77, hidden))
    assert shapes["vae_encoder"]["image"] == ((1, 64, 64, 3),) * 3
    assert shapes["text_encoder"]["input_ids"] == ((1, 77),) * 3
