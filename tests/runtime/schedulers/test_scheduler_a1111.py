"""A1111 1.9+ sampler names and schedule types -> sdtrt schedulers, and back for the infotext.

The reference is AUTOMATIC1111's own code (stable-diffusion-webui 1.9+):
- ``modules/sd_samplers_kdiffusion.py``: ``samplers_k_diffusion`` gives each sampler its Automatic schedule as the
  ``'scheduler'`` option: ``('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {'scheduler': 'karras'})``,
  ``('DPM++ 2M SDE', ..., {'scheduler': 'exponential', ...})``, none for Euler a, Euler, LMS, Heun.
  ``KDiffusionSampler.get_sigmas``: Automatic -> that option; no option -> ``model_wrap.get_sigmas`` (the model's
  own); ``p.extra_generation_params["Schedule type"] = scheduler.label`` whenever a schedule function was used.
- ``modules/sd_schedulers.py``: the schedule types' names, labels, ``default_rho`` (7.0 for Karras) and
  ``need_inner_model`` (Uniform), which ``GET /sdapi/v1/schedulers`` returns.
- ``modules/sd_samplers.py`` ``get_sampler_and_scheduler``: a sampler name ending in a schedule type's label
  ("DPM++ 2M Karras") is that sampler with that schedule type.
- ``modules/sd_samplers_timesteps.py``: DDIM, PLMS and UniPC ignore the schedule type.
"""

from __future__ import annotations

import pytest

from sdtrt.errors import UsageError
from sdtrt.runtime.schedulers import SCHEDULERS, a1111_names, resolve
from sdtrt.runtime.schedulers.a1111 import SAMPLERS, samplers_api, schedulers_api


@pytest.mark.parametrize(
    ("name", "schedule_type", "ours"),
    [
        # Automatic = the sampler's own option in samplers_k_diffusion
        ("DPM++ 2M", None, "dpmpp_2m_karras"),
        ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),
        ("DPM++ 2M SDE", "Automatic", "dpmpp_2m_sde_exponential"),
        ("Euler", "Automatic", "euler"),
        ("Euler a", None, "euler_a"),
        ("LMS", None, "lms"),
        ("Heun", None, "heun"),
        # explicit schedule types, by label or name, any case
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "uniform", "dpmpp_2m"),
        ("DPM++ 2M", "Exponential", "dpmpp_2m_exponential"),
        ("DPM++ 2M SDE", "Karras", "dpmpp_2m_sde_karras"),
        ("DPM++ 2M SDE", "Uniform", "dpmpp_2m_sde"),
        ("Euler", "Karras", "euler_karras"),
        ("LMS", "karras", "lms_karras"),
        ("Heun", "Karras", "heun_karras"),
        # pre-1.9 names: the suffix is the schedule type, whatever the field says (get_sampler_and_scheduler)
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", "Exponential", "dpmpp_2m_karras"),
        ("DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras"),
        ("LMS Karras", "Automatic", "lms_karras"),
        ("dpm++ 2m", None, "dpmpp_2m_karras"),
        ("k_dpmpp_2m", None, "dpmpp_2m_karras"),  # A1111's alias
        # timesteps samplers ignore the schedule type (sd_samplers_timesteps)
        ("DDIM", "Karras", "ddim"),
        ("PLMS", "Exponential", "pndm"),
        ("UniPC", None, "unipc"),
        # sdtrt's own names keep their exact meaning under Automatic and take a schedule type otherwise
        ("dpmpp_2m", None, "dpmpp_2m"),
        ("dpmpp_2m", "Karras", "dpmpp_2m_karras"),
        ("dpmpp_2m_karras", "Automatic", "dpmpp_2m_karras"),
        ("euler", "Karras", "euler_karras"),
        ("heun_karras", "Uniform", "heun"),
        # no name: the checkpoint's own scheduler
        (None, None, "pndm"),
    ],
)
def test_resolve(name, schedule_type, ours):
    assert resolve(name, schedule_type, default="pndm") == ours


def test_schedule_type_applies_to_the_checkpoints_own_scheduler():
    assert resolve(None, "Karras", default="dpmpp_2m") == "dpmpp_2m_karras"
    assert resolve(None, "Karras", default="ddim") == "ddim"  # a timesteps sampler: ignored, as A1111 does
    with pytest.raises(UsageError, match=r"^schedule type 'Karras' is not available with 'LCM' here; choose "
                                         r"Automatic or one of: Uniform$"):
        resolve(None, "Karras", default="lcm")


@pytest.mark.parametrize(
    ("name", "schedule_type", "message"),
    [
        ("DPM2", None, r"^unknown sampler 'DPM2'; choose one of: 'DPM\+\+ 2M', .*'LCM' \(or sdtrt's names: ddim, "),
        ("DPM++ SDE", None, r"^unknown sampler 'DPM\+\+ SDE'"),  # needs torchsde's Brownian tree: not here
        ("Euler", "Exponential", r"^schedule type 'Exponential' is not available with 'Euler' here; choose "
                                 r"Automatic or one of: Uniform, Karras$"),
        ("Euler a", "Karras", r"^schedule type 'Karras' is not available with 'Euler a' here"),
        ("Euler", "Align Your Steps", r"^unknown schedule type 'Align Your Steps'; choose one of: Automatic, "
                                      r"Uniform, Karras, Exponential$"),
    ],
)
def test_resolve_refuses(name, schedule_type, message):
    with pytest.raises(UsageError, match=message):
        resolve(name, schedule_type, default="pndm")


def test_eta_is_folded_into_ddims_name():
    assert resolve("DDIM", None, default="pndm", eta=0.5) == "ddim:eta=0.5"
    assert resolve("ddim", None, default="pndm", eta=0) == "ddim"
    assert resolve("Euler a", None, default="pndm", eta=None) == "euler_a"
    assert resolve("ddim:eta=0.25", None, default="pndm") == "ddim:eta=0.25"
    with pytest.raises(UsageError, match=r"^eta applies to DDIM only \(diffusers' DDIMScheduler\), not to 'euler_a'$"):
        resolve("Euler a", None, default="pndm", eta=0.5)
    with pytest.raises(UsageError, match=r"^eta must be a number between 0 and 1, got 1.5$"):
        resolve("DDIM", None, default="pndm", eta=1.5)


@pytest.mark.parametrize(
    ("ours", "sampler", "schedule_type"),
    [
        ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),  # A1111 writes the label of the Automatic schedule too
        ("dpmpp_2m", "DPM++ 2M", "Uniform"),
        ("dpmpp_2m_sde_exponential", "DPM++ 2M SDE", "Exponential"),
        ("euler", "Euler", None),  # the model's own sigmas: no Schedule type
        ("euler_karras", "Euler", "Karras"),
        ("heun", "Heun", None),
        ("ddim", "DDIM", None),
        ("ddim:eta=0.5", "DDIM", None),
        ("pndm", "PLMS", None),
    ],
)
def test_a1111_names_for_the_infotext(ours, sampler, schedule_type):
    assert a1111_names(ours) == (sampler, schedule_type)
    # and they read back to the same scheduler
    assert resolve(sampler, schedule_type, default="pndm") == ours.split(":")[0]


def test_every_registered_scheduler_has_an_a1111_name():
    variants = {v for s in SAMPLERS for v in s.variants.values()}
    assert variants == set(SCHEDULERS)


def test_schedulers_api_has_a1111s_shape():
    listing = schedulers_api()
    assert [s["label"] for s in listing] == ["Automatic", "Uniform", "Karras", "Exponential"]
    assert listing[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                          "need_inner_model": False}
    assert listing[1]["need_inner_model"] is True


def test_samplers_api_has_a1111s_shape():
    by_name = {s["name"]: s for s in samplers_api(SCHEDULERS)}
    assert by_name["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m", "dpmpp_2m", "dpmpp_2m_karras",
                                                                   "dpmpp_2m_exponential"],
                                   "options": {"scheduler": "karras"}}
    assert by_name["Euler"]["options"] == {}
