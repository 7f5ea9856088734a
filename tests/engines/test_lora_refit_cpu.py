"""TensorRT LoRA refit logic on the CPU: a recording fake refitter, the manifest's real initializer names and the
graph's real base weights. Switching base -> A -> B -> base sends only the changed weights, restores base values
from the ONNX graph (never by subtracting), and a non-refittable engine names `sdtrt build --refit`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sdtrt.engines.refit import EngineRefit
from sdtrt.errors import EngineError
from sdtrt.lora.deltas import LoraLibrary
from tests.lora.test_lora_cli import kohya_from_manifest


class FakeWeights:
    def __init__(self, arr):
        self.arr = arr


class FakeRefitter:
    def __init__(self, engine, logger):
        self.engine = engine
        self.sent: dict[str, np.ndarray] = {}

    def get_all_weights(self):
        return list(self.engine.weights)

    def set_named_weights(self, name, w):
        assert w.arr.dtype == self.engine.weights[name].dtype and w.arr.shape == self.engine.weights[name].shape
        self.sent[name] = w.arr.copy()
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self):
        self.engine.weights.update(self.sent)
        self.engine.refits.append(dict(self.sent))
        return True


class FakeTrt:
    Refitter = FakeRefitter
    Weights = FakeWeights


class FakeLogger:
    def capture(self):
        import contextlib

        return contextlib.nullcontext([])


class FakeEngine:
    def __init__(self, weights, refittable=True):
        self.weights = dict(weights)  # name -> array, what the engine holds now
        self.refittable = refittable
        self.refits: list[dict] = []


@pytest.fixture(scope="module")
def unet(sd1_workdir_fp16):
    wd = sd1_workdir_fp16
    manifest = json.loads((wd / "manifest.json").read_text())
    model = onnx.load(str(wd / "onnx/unet.onnx"))
    base = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return wd, manifest, base


def test_refit_switches_and_returns_to_base(unet, tmp_path):
    wd, manifest, base = unet
    targets = manifest["components"]["unet"]["lora"]["targets"]
    lib = LoraLibrary(manifest)
    a = lib.check([(kohya_from_manifest(wd, tmp_path / "a.safetensors", seed=1), 1.0)])
    b = lib.check([(kohya_from_manifest(wd, tmp_path / "b.safetensors", seed=2), 0.5)])
    engine = FakeEngine(base)
    refit = EngineRefit(FakeTrt, FakeLogger(), engine, "unet", wd / "onnx/unet.onnx", targets, wd)

    da = lib.deltas(a).by_component["unet"]
    assert refit.apply(da)
    names_a = {targets[m]["initializer"] for m in da}
    assert set(engine.refits[-1]) == names_a  # only the LoRA's weights, by the manifest's names
    name, module = next((targets[m]["initializer"], m) for m in da if targets[m]["layout"] == "transposed")
    want = (base[name].astype(np.float32) + da[module].numpy().T).astype(np.float16)
    assert np.array_equal(engine.weights[name], want)

    # a second LoRA changing fewer modules: its weights merged, A's others back to base
    db = {m: d for m, d in lib.deltas(b).by_component["unet"].items() if m.endswith("to_q")}
    refit.apply(db)
    names_b = {targets[m]["initializer"] for m in db}
    assert set(engine.refits[-1]) == names_a | names_b
    for n in names_a - names_b:
        assert np.array_equal(engine.weights[n], base[n])

    refit.apply({})  # base
    assert set(engine.refits[-1]) == names_b
    assert all(np.array_equal(engine.weights[n], base[n]) for n in base if n in engine.weights)
    assert not refit.apply({})


def test_non_refittable_engine_names_the_build_flag(unet, tmp_path):
    wd, manifest, base = unet
    targets = manifest["components"]["unet"]["lora"]["targets"]
    lib = LoraLibrary(manifest)
    a = lib.check([(kohya_from_manifest(wd, tmp_path / "a.safetensors"), 1.0)])
    refit = EngineRefit(FakeTrt, FakeLogger(), FakeEngine(base, refittable=False), "unet", wd / "onnx/unet.onnx",
                        targets, wd)
    refit.apply({})  # the base model needs no refit
    with pytest.raises(EngineError, match=r"the unet engine is not refittable.*`sdtrt build .* --refit`"):
        refit.apply(lib.deltas(a).by_component["unet"])


def test_engine_from_another_export_is_refused(unet, tmp_path):
    wd, manifest, base = unet
    targets = manifest["components"]["unet"]["lora"]["targets"]
    lib = LoraLibrary(manifest)
    a = lib.check([(kohya_from_manifest(wd, tmp_path / "a.safetensors"), 1.0)])
    other = FakeEngine({k: v for k, v in base.items() if not k.startswith("onnx::MatMul")})
    refit = EngineRefit(FakeTrt, FakeLogger(), other, "unet", wd / "onnx/unet.onnx", targets, wd)
    with pytest.raises(EngineError, match="has no refittable weight named onnx::MatMul_"):
        refit.apply(lib.deltas(a).by_component["unet"])
    assert other.refits == []  # nothing refitted
