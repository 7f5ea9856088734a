"""GenerateRequest.validated and batch_key alone (no pipeline): every field's limits, defaults and messages."""

from __future__ import annotations

import numpy as np
import pytest

from sdtrt.errors import UsageError
from sdtrt.runtime.request import MAX_BATCH, MAX_SIDE, MAX_STEPS, BatchKey, GenerateRequest, batch_key

NAMES = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")


def v(**kw) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "p", **kw}).validated(default_size=64, default_scheduler="ddim",
                                                              scheduler_names=NAMES)


def test_defaults_are_filled():
    r = v()
    assert (r.height, r.width, r.scheduler, r.guidance) == (64, 64, "ddim", 7.5)
    assert isinstance(v(guidance=7).guidance, float)
    assert (v(height=72).height, v(height=72).width) == (72, 64)


def test_img2img_size_defaults_to_the_image_rounded_down_to_8():
    image = np.zeros((90, 99, 3), np.uint8)  # (H, W, 3); neither side rounds to the default 64
    r = v(init_image=image)
    assert (r.height, r.width) == (88, 96)
    r = v(init_image=image, width=48)  # the other side still from the image
    assert (r.height, r.width) == (88, 48)
    r = v(init_image=image, height=48)
    assert (r.height, r.width) == (48, 96)
    r = v(init_image=image, height=48, width=56)
    assert (r.height, r.width) == (48, 56)
    from PIL import Image

    r = v(init_image=Image.new("RGB", (99, 90)))  # PIL's size is (W, H)
    assert (r.height, r.width) == (88, 96)
    with pytest.raises(UsageError, match=r"init image must be a PIL image or an \(H, W, 3\) uint8 array"):
        v(init_image=np.zeros((70, 99), np.uint8))


@pytest.mark.parametrize("kw", [
    {"height": 8}, {"width": MAX_SIDE}, {"steps": 1}, {"steps": MAX_STEPS}, {"batch": 1}, {"batch": MAX_BATCH},
    {"guidance": 0}, {"guidance": 100}, {"seed": 0}, {"seed": 2**63 - 1}, {"clip_skip": 2}, {"scheduler": "euler"},
    {"init_image": np.zeros((8, 8, 3), np.uint8), "strength": 1.0},
    {"init_image": np.zeros((8, 8, 3), np.uint8), "strength": 0.01},
])
def test_limits_are_inclusive(kw):
    v(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"prompt": None}, "prompt must be a string"),
    ({"height": 0}, "height must be a multiple of 8 between 8 and 2048, got 0"),
    ({"height": 60}, "height must be a multiple of 8"),
    ({"width": MAX_SIDE + 8}, "width must be a multiple of 8 between 8 and 2048, got 2056"),
    ({"width": 64.0}, "width must be a multiple of 8"),
    ({"height": True}, "height must be a multiple of 8"),
    ({"steps": 0}, "steps must be an integer between 1 and 1000, got 0"),
    ({"steps": MAX_STEPS + 1}, "steps must be an integer between 1 and 1000"),
    ({"steps": True}, "steps must be an integer"),
    ({"steps": 2.0}, "steps must be an integer"),
    ({"batch": 0}, "batch must be an integer between 1 and 64, got 0"),
    ({"batch": MAX_BATCH + 1}, "batch must be an integer between 1 and 64"),
    ({"batch": True}, "batch must be an integer"),
    ({"guidance": -0.5}, "guidance must be a number between 0 and 100, got -0.5"),
    ({"guidance": 100.5}, "guidance must be a number between 0 and 100"),
    ({"guidance": True}, "guidance must be a number"),
    ({"guidance": "7"}, "guidance must be a number"),
    ({"seed": -2}, "seed must be -1 \\(random\\) or a non-negative integer below 2\\*\\*63, got -2"),
    ({"seed": 2**63}, "seed must be -1 \\(random\\) or a non-negative integer below 2\\*\\*63"),
    ({"seed": True}, "seed must be -1"),
    ({"seed": 1.0}, "seed must be -1"),
    ({"clip_skip": 0}, "clip-skip must be 1 \\(last layer\\) or 2 \\(penultimate layer\\), got 0"),
    ({"clip_skip": 3}, "clip-skip must be 1"),
    ({"scheduler": "lms"}, "unknown scheduler 'lms'; choose one of ddim, euler, dpmpp_2m, dpmpp_2m_karras or an "
                           "A1111 sampler: 'DPM\\+\\+ 2M', 'DPM\\+\\+ 2M SDE', 'Euler a', .*, 'LCM'$"),
    ({"scheduler": "nope"}, "unknown scheduler 'nope'; choose one of ddim"),
    ({"scheduler": 3}, "scheduler must be a name, got 3"),
    ({"scheduler": "Euler", "schedule_type": "Exponential"}, "schedule type 'Exponential' is not available with "
                                                             "'Euler' here"),
    ({"scheduler": "Euler", "schedule_type": "Beta"}, "unknown schedule type 'Beta'"),
    ({"scheduler": "euler", "eta": 0.5}, "eta applies to DDIM only"),
    ({"scheduler": "ddim", "eta": 2}, "eta must be a number between 0 and 1, got 2"),
    ({"init_image": np.zeros((8, 8, 3), np.uint8), "strength": 0}, "strength must be in \\(0, 1\\], got 0"),
    ({"init_image": np.zeros((8, 8, 3), np.uint8), "strength": 1.01}, "strength must be in \\(0, 1\\]"),
    ({"init_image": np.zeros((8, 8, 3), np.uint8), "strength": "0.5"}, "strength must be in"),
])
def test_each_bad_field_is_named(kw, message):
    with pytest.raises(UsageError, match=f"^{message}"):  # the whole message, from its start
        v(**kw)


def test_strength_is_not_checked_without_an_image():
    assert v(strength=5).strength == 5  # txt2img ignores it ...
    assert batch_key(v(strength=5)) == batch_key(v(strength=0.3))  # ... and so does the batch key


def test_batch_key_is_every_shared_setting():
    image = np.zeros((64, 64, 3), np.uint8)
    key = batch_key(v(seed=1, batch=2, prompt="a", negative_prompt="b"))
    assert key == BatchKey(64, 64, "ddim", 30, 7.5, 1, False, 0.0)
    assert key == batch_key(v(seed=2, batch=1, prompt="c"))  # prompts, seeds and sizes of batch are free
    for kw in ({"height": 72}, {"width": 72}, {"scheduler": "euler"}, {"steps": 31}, {"guidance": 7.0},
               {"clip_skip": 2}, {"init_image": image}):
        assert batch_key(v(**kw)) != key, kw
    assert batch_key(v(init_image=image, strength=0.5)) != batch_key(v(init_image=image, strength=0.75))
    assert batch_key(v(init_image=image, strength=0.5)) == batch_key(v(init_image=image + 1, strength=0.5))


def test_seed_minus_one_draws_a_seed_the_validated_request_carries():
    seeds = {v(seed=-1).seed for _ in range(8)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1  # A1111 draws below 2**32
    r = v(seed=-1)
    assert r.validated(default_size=64, default_scheduler="ddim", scheduler_names=NAMES).seed == r.seed  # idempotent


@pytest.mark.parametrize(("kw", "scheduler"), [
    ({"scheduler": "DPM++ 2M"}, "dpmpp_2m_karras"),  # A1111 1.9's Automatic for DPM++ 2M is Karras
    ({"scheduler": "DPM++ 2M", "schedule_type": "Uniform"}, "dpmpp_2m"),
    ({"scheduler": "dpmpp_2m"}, "dpmpp_2m"),  # sdtrt's own name keeps its meaning
    ({"scheduler": "dpmpp_2m", "schedule_type": "Karras"}, "dpmpp_2m_karras"),
    ({"scheduler": "DDIM", "eta": 0.5}, "ddim:eta=0.5"),
    ({"eta": 0.25}, "ddim:eta=0.25"),  # the default scheduler, ddim here
    ({"scheduler": "Euler"}, "euler"),
])
def test_a1111_names_resolve_to_sdtrt_schedulers(kw, scheduler):
    r = v(**kw)
    assert (r.scheduler, r.schedule_type, r.eta) == (scheduler, None, None)
    assert batch_key(r).scheduler == scheduler  # so batches and captured loops key by schedule type and eta


def test_eta_and_schedule_type_split_batches():
    assert batch_key(v(scheduler="ddim", eta=0.5)) != batch_key(v(scheduler="ddim"))
    assert batch_key(v(scheduler="ddim", eta=0.5)) != batch_key(v(scheduler="ddim", eta=0.25))
    assert batch_key(v(scheduler="DPM++ 2M")) != batch_key(v(scheduler="DPM++ 2M", schedule_type="Uniform"))
