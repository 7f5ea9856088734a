"""Pipeline.generate_batch (micro-batching), shape limits, per-request failures and the bounded loop cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdtrt.engines.profiles import AxisRange, ComponentProfile, check_shape
from sdtrt.errors import ShapeError, UsageError
from sdtrt.runtime import pipeline as pipeline_module
from sdtrt.runtime.pipeline import NonFiniteError, Pipeline
from sdtrt.runtime.request import GenerateRequest as G


@pytest.fixture
def pipe(sd1_workdir_fp32: Path) -> Pipeline:
    return Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_a_micro_batch_gives_each_request_its_images_alone(pipe, scheduler):
    reqs = [G("a cat", seed=1, steps=4, scheduler=scheduler),
            G("a dog on a hill", negative_prompt="blurry", seed=7, steps=4, scheduler=scheduler, batch=2),
            G("x", seed=3, steps=4, scheduler=scheduler)]
    batched = pipe.generate_batch(reqs)
    assert [r.batch_rows for r in batched] == [4, 4, 4]
    for req, res in zip(reqs, batched, strict=True):
        alone = pipe.generate(req)
        assert alone.batch_rows == req.batch
        # onnxruntime's CPU kernels compute each row alike whatever the batch: bitwise equal
        assert all(np.array_equal(a, b) for a, b in zip(pixels(alone), pixels(res), strict=True))
        assert res.infotexts == alone.infotexts


def test_img2img_micro_batch(pipe):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    reqs = [G("a", seed=s, steps=4, scheduler="euler", init_image=im, strength=0.5) for s, im in zip((1, 2), imgs, strict=True)]
    for req, res in zip(reqs, pipe.generate_batch(reqs), strict=True):
        assert np.array_equal(pixels(pipe.generate(req))[0], pixels(res)[0])


def test_requests_of_one_batch_must_share_their_settings(pipe):
    with pytest.raises(UsageError, match="requests batched together must share size, scheduler, steps, guidance"):
        pipe.generate_batch([G("a", steps=4), G("b", steps=5)])
    with pytest.raises(UsageError, match="a batch of 65 images is over the limit of 64"):
        pipe.generate_batch([G("a", steps=1, batch=64), G("b", steps=1)])
    assert pipe.generate_batch([]) == []


def test_one_requests_overflow_does_not_fail_the_others(pipe):
    run = pipe._decoder.run

    def overflow_row_1():  # as if the second image's decode had overflowed fp16
        run()
        pipe._decoder.outputs["finite"][1] = False

    pipe._decoder.run = overflow_row_1
    a, b, c = pipe.generate_batch([G("a", seed=1, steps=2), G("b", seed=2, steps=2), G("c", seed=3, steps=2)])
    assert isinstance(b, NonFiniteError) and "VAE decoder produced NaN/inf pixels" in str(b)
    assert len(a.images) == 1 and len(c.images) == 1
    with pytest.raises(NonFiniteError, match="re-export with --vae-precision fp32"):
        pipe.generate(G("b", batch=2, seed=2, steps=2))  # generate raises its request's error


def test_check_rows_and_max_rows_follow_the_engine_profile(pipe):
    # like a static engine built for 2 images (2B <= 4 with CFG) at 64x64
    profile = ComponentProfile("unet", (AxisRange("2B", 1, 4, 4), AxisRange("H", 8, 8, 8), AxisRange("W", 8, 8, 8)), 8)
    pipe._unet.check = lambda dims: check_shape(profile, dims)
    req = pipe.validate(G("a", steps=2))
    assert pipe.max_rows(req, 8) == 2
    assert pipe.max_rows(pipe.validate(G("a", steps=2, guidance=1.0)), 8) == 4  # no CFG: B rows, not 2B
    assert pipe.max_rows(req, 1) == 1
    # the limit itself, when the engine runs it (the search starts at the limit, not one below)
    assert pipe.max_rows(req, 2) == 2
    assert pipe.max_rows(pipe.validate(G("a", steps=2, guidance=1.0)), 4) == 4
    assert pipe.max_rows(pipe.validate(G("a", steps=2, guidance=1.0)), 3) == 3
    with pytest.raises(ShapeError, match=r"the unet engine cannot run this shape: .*2B = 6"):
        pipe.validate(G("a", steps=2, batch=3))
    with pytest.raises(ShapeError, match="the unet engine cannot run this shape"):
        pipe.validate(G("a", steps=2, height=72))


def test_the_loop_cache_is_bounded_and_frees_buffers(pipe, monkeypatch):
    monkeypatch.setattr(pipeline_module, "LOOP_CACHE_SIZE", 2)
    first = pixels(pipe.generate(G("a", seed=5, steps=3, height=64, width=64)))
    for size in (48, 56, 72):
        pipe.generate(G("a", seed=5, steps=3, height=size, width=size))
    assert len(pipe._loops) == 2
    assert [k.height for k in pipe._loops] == [56, 72]
    assert len(pipe._unet._by_shape) == 2 and len(pipe._decoder._by_shape) == 2  # 64 and 48 freed
    again = pixels(pipe.generate(G("a", seed=5, steps=3, height=64, width=64)))  # rebuilt, same image
    assert np.array_equal(first[0], again[0])
    assert [k.height for k in pipe._loops] == [72, 64]


def test_max_rows_without_an_engine_limit(pipe):
    req = pipe.validate(G("a", steps=2, batch=3))
    assert pipe.max_rows(req, 5) == 5
    assert pipe.max_rows(req, 3) == 3
    assert pipe.max_rows(req, 1000) == 64  # MAX_BATCH
