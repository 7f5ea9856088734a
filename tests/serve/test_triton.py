"""``sdtrt export-triton``: the config Triton would parse, the repository on disk, and the exported model.py driven
on CPU with the real ``triton_python_backend_utils`` and stand-ins for the stub's C++ classes (triton_fake.py), image
for image against the pipeline run alone. A real tritonserver runs it in test_triton_server.py."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import triton_fake

from sdtrt import cli
from sdtrt.errors import CheckpointError, UsageError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest
from sdtrt.serve import triton, triton_model
from sdtrt.serve.triton import TritonSpec, export_triton, parse_config, render_config

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="parsing Triton configs needs tritonclient[grpc]")

# the model's interface: name -> (data type, dims, optional)
EXPECTED_INPUTS = {
    "PROMPT": ("TYPE_STRING", [1], False),
    "NEGATIVE_PROMPT": ("TYPE_STRING", [1], True),
    "SEED": ("TYPE_INT64", [1], True),
    "STEPS": ("TYPE_INT32", [1], True),
    "GUIDANCE": ("TYPE_FP32", [1], True),
    "HEIGHT": ("TYPE_INT32", [1], True),
    "WIDTH": ("TYPE_INT32", [1], True),
    "SCHEDULER": ("TYPE_STRING", [1], True),
}


def _enum(message, field: str) -> str:
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(message, field)].name


def _params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


# -- config ------------------------------------------------------------------------------------------------------
def test_render_parse_round_trip(tmp_path):
    spec = TritonSpec(model_name="sd-1.5", max_batch_size=8, max_queue_delay_us=2500, instances_per_gpu=2,
                      gpus=(0, 3), backend="tensorrt")
    config = parse_config(render_config(spec, tmp_path / "wd" / ".." / "wd"))

    assert config.name == "sd-1.5"
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    [group] = config.instance_group
    assert (_enum(group, "kind"), group.count, list(group.gpus)) == ("KIND_GPU", 2, [0, 3])
    assert {i.name: (_enum(i, "data_type"), list(i.dims), i.optional) for i in config.input} == EXPECTED_INPUTS
    assert [i.name for i in config.input][0] == "PROMPT"
    [out] = config.output
    assert (out.name, _enum(out, "data_type"), list(out.dims)) == ("IMAGE", "TYPE_UINT8", [-1, -1, 3])
    # absolute and normalised: Triton runs elsewhere
    assert _params(config) == {"WORKDIR": str((tmp_path / "wd").resolve()), "BACKEND": "tensorrt"}


def test_defaults_use_every_gpu(tmp_path):
    config = parse_config(render_config(TritonSpec(), tmp_path))
    [group] = config.instance_group
    assert (_enum(group, "kind"), group.count, list(group.gpus)) == ("KIND_GPU", 1, [])
    assert (config.name, config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds) == ("sdtrt", 4, 10000)
    assert _params(config)["BACKEND"] == "auto"


def test_cpu_instances_and_execution_env(tmp_path):
    spec = TritonSpec(cpu=True, instances_per_gpu=3, execution_env="$$TRITON_MODEL_DIRECTORY/sdtrt-env.tar.gz")
    config = parse_config(render_config(spec, tmp_path))
    [group] = config.instance_group
    assert (_enum(group, "kind"), group.count, list(group.gpus)) == ("KIND_CPU", 3, [])
    assert _params(config)["EXECUTION_ENV_PATH"] == "$$TRITON_MODEL_DIRECTORY/sdtrt-env.tar.gz"  # verbatim
    assert "EXECUTION_ENV_PATH" not in _params(parse_config(render_config(TritonSpec(), tmp_path)))


def test_python_path_round_trips_through_model_py(tmp_path):
    """model.py reads the PYTHON_PATH parameter with the standard library only: whatever render_config writes,
    odd characters included, comes back entry for entry."""
    entries = (str(tmp_path / "venv" / "site-packages"), str(tmp_path / 'my "src"\\é\tdir'), "/opt/x")
    text = render_config(TritonSpec(python_path=entries), tmp_path)
    assert _params(parse_config(text))["PYTHON_PATH"] == os.pathsep.join(entries)
    assert triton_model.python_path(text) == list(entries)
    assert triton_model.python_path(render_config(TritonSpec(), tmp_path)) == []
    assert "PYTHON_PATH" not in _params(parse_config(render_config(TritonSpec(), tmp_path)))  # default: nothing


def test_python_path_is_prepended_once(tmp_path, monkeypatch):
    config = tmp_path / "config.pbtxt"
    config.write_text(render_config(TritonSpec(python_path=("/a", "/b")), tmp_path))
    monkeypatch.setattr(sys, "path", ["/stdlib", "/a"])
    assert triton_model.prepend_python_path(config) == ["/a", "/b"]
    assert triton_model.prepend_python_path(config) == ["/a", "/b"]
    assert sys.path == ["/a", "/b", "/stdlib", "/a"]
    assert triton_model.prepend_python_path(tmp_path / "missing.pbtxt") == []
    assert sys.path == ["/a", "/b", "/stdlib", "/a"]


def _run_model_py_without_site_packages(model_dir: Path) -> subprocess.CompletedProcess:
    """Import model.py the way Triton's stub does: an interpreter whose sys.path has no site-packages."""
    code = f"import runpy, sys; runpy.run_path({str(model_dir / '1' / 'model.py')!r}); print(sys.path[:2])"
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)


def test_model_py_imports_sdtrt_through_the_python_path(sd1_workdir_fp32, tmp_path):
    site_packages = sysconfig.get_paths()["purelib"]  # this venv's
    project = str(Path(triton.__file__).parents[2])  # sdtrt itself (an editable install's .pth is not read)
    spec = TritonSpec(backend="onnxruntime", cpu=True, python_path=(site_packages, project))
    ok = _run_model_py_without_site_packages(export_triton(sd1_workdir_fp32, tmp_path / "with", spec))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str([site_packages, project])

    bare = _run_model_py_without_site_packages(export_triton(sd1_workdir_fp32, tmp_path / "without", TritonSpec()))
    assert bare.returncode != 0
    assert "ImportError: sdtrt is not importable in Triton's Python environment" in bare.stderr
    assert "--python-path" in bare.stderr


def test_odd_workdir_paths_round_trip(tmp_path):
    workdir = tmp_path / 'my "models"\\sd é\tv1'
    assert _params(parse_config(render_config(TritonSpec(), workdir)))["WORKDIR"] == str(workdir.resolve())


def test_malformed_config_is_refused():
    with pytest.raises(UsageError, match="invalid Triton model config"):
        parse_config('name: "sdtrt"\nmax_batch_size: four\n')
    with pytest.raises(UsageError, match="invalid Triton model config"):
        parse_config('name: "sdtrt"\nno_such_field: 1\n')


def test_parse_config_without_tritonclient(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # makes the import fail
    with pytest.raises(UsageError, match=r"needs tritonclient .*pip install 'tritonclient\[grpc\]'"):
        parse_config('name: "sdtrt"\n')


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model_name": "../x"}, "model name must be letters, digits"),
    ({"model_name": ""}, "model name must be letters, digits"),
    ({"max_batch_size": 0}, "max batch size must be an integer between 1 and 64, got 0"),
    ({"max_batch_size": 65}, "max batch size must be an integer between 1 and 64, got 65"),
    ({"max_queue_delay_us": -1}, r"max queue delay \(microseconds\) must be an integer >= 0, got -1"),
    ({"instances_per_gpu": 0}, "instances per GPU must be an integer >= 1, got 0"),
    ({"gpus": (0, 0)}, "GPU ids must be distinct non-negative integers"),
    ({"gpus": ()}, "GPU ids must be distinct non-negative integers"),
    ({"gpus": (0,), "cpu": True}, "GPU ids and CPU instances exclude each other"),
    ({"backend": "cuda"}, "unknown backend 'cuda'; choose one of auto, tensorrt, onnxruntime, torch"),
    ({"execution_env": ""}, "the execution environment must be a path"),
    ({"python_path": ("venv/lib",)}, "python path entries must be absolute directories, got 'venv/lib'"),
    ({"python_path": ("",)}, "python path entries must be absolute directories, got ''"),
    ({"python_path": (f"/a{os.pathsep}/b",)}, "python path entries must be absolute directories"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(UsageError, match=message):
        TritonSpec(**kwargs)


def test_gpu_list_becomes_a_tuple():
    assert TritonSpec(gpus=[1, 0]).gpus == (1, 0)


# -- the repository ----------------------------------------------------------------------------------------------
def test_export_writes_the_repository(sd1_workdir_fp32, tmp_path):
    repo = tmp_path / "repo"
    model_dir = export_triton(sd1_workdir_fp32, repo, TritonSpec(backend="onnxruntime"))

    assert model_dir == repo / "sdtrt"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "sdtrt", "sdtrt/1", "sdtrt/1/model.py", "sdtrt/config.pbtxt"]  # no temporary leftovers
    source = Path(triton.__file__).with_name("triton_model.py").read_text()
    assert (model_dir / "1" / "model.py").read_text() == source
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert _params(config) == {"WORKDIR": str(sd1_workdir_fp32.resolve()), "BACKEND": "onnxruntime"}


def test_export_refuses_an_existing_model_dir(sd1_workdir_fp32, tmp_path):
    repo = tmp_path / "repo"
    export_triton(sd1_workdir_fp32, repo)
    (repo / "sdtrt" / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match=r"^.*repo/sdtrt already exists; pass --overwrite to replace it$"):
        export_triton(sd1_workdir_fp32, repo, TritonSpec(max_batch_size=2))
    assert parse_config((repo / "sdtrt" / "config.pbtxt").read_text()).max_batch_size == 4  # untouched

    export_triton(sd1_workdir_fp32, repo, TritonSpec(max_batch_size=2), overwrite=True)
    assert parse_config((repo / "sdtrt" / "config.pbtxt").read_text()).max_batch_size == 2
    assert not (repo / "sdtrt" / "stale.txt").exists()  # replaced whole, not merged
    assert sorted(p.name for p in repo.iterdir()) == ["sdtrt"]


def test_export_needs_a_workdir(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such workdir \(run `sdtrt export CHECKPOINT .*` first\)"):
        export_triton(tmp_path / "missing", tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an sdtrt workdir or an incomplete export"):
        export_triton(tmp_path / "empty", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("paths", "message"), [
    ("relative/site-packages", "python path entries must be absolute directories, got 'relative/site-packages'"),
    ("{tmp}/missing", "python path entry {tmp}/missing is not a directory"),
    ("{tmp}" + os.pathsep + "lib", "python path entries must be absolute directories, got 'lib'"),
])
def test_export_triton_cli_refuses_bad_python_paths(capsys, sd1_workdir_fp32, tmp_path, paths, message):
    code = cli.main(["export-triton", str(sd1_workdir_fp32), str(tmp_path / "repo"), "--cpu",
                     "--python-path", paths.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"sdtrt: error: {message.format(tmp=tmp_path)}"]
    assert not (tmp_path / "repo").exists()


def test_export_triton_cli_records_the_python_path(capsys, sd1_workdir_fp32, tmp_path):
    paths = [str(tmp_path), str(Path(np.__file__).parent)]
    code = cli.main(["export-triton", str(sd1_workdir_fp32), str(tmp_path / "repo"), "--cpu",
                     "--python-path", os.pathsep.join(paths)])
    assert code == 0, capsys.readouterr().err
    config = parse_config((tmp_path / "repo" / "sdtrt" / "config.pbtxt").read_text())
    assert _params(config)["PYTHON_PATH"] == os.pathsep.join(paths)


def test_export_checks_the_config_before_writing(sd1_workdir_fp32, tmp_path, monkeypatch):
    monkeypatch.setattr(triton, "render_config", lambda spec, workdir: "name: [broken\n")
    with pytest.raises(UsageError, match="invalid Triton model config"):
        export_triton(sd1_workdir_fp32, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# -- the model, as Triton's Python backend runs it ---------------------------------------------------------------
TRITON_DIR = triton_fake.triton_dir()
needs_pb_utils = pytest.mark.skipif(TRITON_DIR is None, reason="needs nvidia-pytriton (the real triton_python_backend_utils)")


def _column(values, dtype) -> np.ndarray:
    """One input of a request, shape (rows, 1); strings as Triton hands them over: an object array of bytes."""
    if dtype is object:
        return np.array([[v.encode()] for v in values], dtype=object)
    return np.array([[v] for v in values], dtype=dtype)


def _request(**fields) -> triton_fake.InferenceRequest:
    types_ = {"PROMPT": object, "NEGATIVE_PROMPT": object, "SCHEDULER": object, "SEED": np.int64,
              "STEPS": np.int32, "GUIDANCE": np.float32, "HEIGHT": np.int32, "WIDTH": np.int32}
    return triton_fake.InferenceRequest(**{k: _column(v, types_[k]) for k, v in fields.items()})


@pytest.fixture(scope="module")
def reference(sd1_workdir_fp32):
    pipe = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")
    return lambda **kw: np.asarray(pipe.generate(GenerateRequest(**kw)).images[0])


@pytest.fixture(scope="module")
def model(sd1_workdir_fp32, tmp_path_factory):
    """The exported model.py, imported and initialised as Triton does (config JSON from config.pbtxt)."""
    from google.protobuf import json_format

    model_dir = export_triton(sd1_workdir_fp32, tmp_path_factory.mktemp("repo"),
                              TritonSpec(max_batch_size=2, backend="onnxruntime", cpu=True))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", triton_fake.pb_utils(TRITON_DIR))
        # imported as Triton's stub imports it: the model directory on sys.path, then `import 1.model`
        mp.syspath_prepend(str(model_dir))
        module = importlib.import_module("1.model")
        assert module.__file__ == str(model_dir / "1" / "model.py")
        config = parse_config((model_dir / "config.pbtxt").read_text())
        instance = module.TritonPythonModel()
        instance.initialize({
            "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_instance_kind": "CPU", "model_instance_device_id": "0", "model_instance_name": "sdtrt_0_0",
            "model_repository": str(model_dir), "model_version": "1", "model_name": "sdtrt",
        })
        yield instance
        instance.finalize()
        for name in ("1.model", "1"):  # not a real package: leave no trace for other tests
            sys.modules.pop(name, None)


@needs_pb_utils
def test_model_micro_batches_like_the_pipeline_alone(model, reference, monkeypatch):
    calls: list[int] = []
    generate_batch = model.pipeline.generate_batch
    monkeypatch.setattr(model.pipeline, "generate_batch", lambda reqs: calls.append(len(reqs)) or generate_batch(reqs))
    requests = [
        _request(PROMPT=["a cat"], NEGATIVE_PROMPT=["blurry"], SEED=[1], STEPS=[4], GUIDANCE=[5.5], HEIGHT=[64],
                 WIDTH=[64], SCHEDULER=["euler"]),
        _request(PROMPT=["a dog"], SEED=[2], STEPS=[4], GUIDANCE=[5.5], SCHEDULER=["euler"]),  # same key once filled
        _request(PROMPT=["a bird"], STEPS=[3], SCHEDULER=[""]),  # another step count: its own batch
        _request(PROMPT=["a fish"], STEPS=[4], SCHEDULER=["nope"]),
        _request(PROMPT=["a cow", "a pig"], SEED=[3, 4], STEPS=[4, 4], GUIDANCE=[5.5, 5.5], SCHEDULER=["euler", "euler"]),
    ]
    responses = model.execute(requests)

    assert len(responses) == len(requests)
    assert calls == [2, 2, 1]  # the steps-4 group of four rows in chunks of max_batch_size 2, then steps 3
    expected = [
        [dict(prompt="a cat", negative_prompt="blurry", seed=1, steps=4, guidance=5.5, height=64, width=64,
              scheduler="euler")],
        [dict(prompt="a dog", seed=2, steps=4, guidance=5.5, scheduler="euler")],
        [dict(prompt="a bird", steps=3)],  # "" scheduler: the checkpoint's own
        None,
        [dict(prompt="a cow", seed=3, steps=4, guidance=5.5, scheduler="euler"),
         dict(prompt="a pig", seed=4, steps=4, guidance=5.5, scheduler="euler")],
    ]
    for i, (response, rows) in enumerate(zip(responses, expected, strict=True)):
        if rows is None:
            assert response.output_tensors() == []
            assert response.error().message().startswith("unknown scheduler 'nope'; choose one of ddim, ")
            continue
        assert not response.has_error(), response.error().message()
        [image] = response.output_tensors()
        assert image.name() == "IMAGE"
        pixels = image.as_numpy()
        assert (pixels.dtype, pixels.shape) == (np.uint8, (len(rows), 64, 64, 3))
        for row, kw in zip(pixels, rows, strict=True):
            np.testing.assert_array_equal(row, reference(**kw), err_msg=f"request {i}: {kw}")


@needs_pb_utils
@pytest.mark.parametrize(("fields", "message"), [
    ({"STEPS": [4]}, "input PROMPT is required"),
    ({"PROMPT": ["a", "b"], "SEED": [1]}, "input SEED has 1 rows but PROMPT has 2"),
    ({"PROMPT": ["a", "b"], "HEIGHT": [64, 72]}, "the rows of one request must share HEIGHT and WIDTH"),
    ({"PROMPT": ["a"], "STEPS": [0]}, "steps must be an integer between 1 and 1000, got 0"),
    ({"PROMPT": ["a"], "WIDTH": [60]}, "width must be a multiple of 8 between 8 and 2048, got 60"),
])
def test_model_answers_bad_requests_with_errors(model, fields, message):
    good = _request(PROMPT=["fine"], STEPS=[2])
    bad, ok = model.execute([_request(**fields), good])
    assert bad.output_tensors() == [] and bad.error().message() == message
    assert not ok.has_error() and ok.output_tensors()[0].as_numpy().shape == (1, 64, 64, 3)


@needs_pb_utils
def test_model_answers_a_failed_batch_with_errors(model, monkeypatch):
    def boom(reqs):
        raise RuntimeError("out of memory\nmore detail")

    monkeypatch.setattr(model.pipeline, "generate_batch", boom)
    responses = model.execute([_request(PROMPT=["a"], STEPS=[2]), _request(PROMPT=["b"], STEPS=[2])])
    assert [r.error().message() for r in responses] == ["internal error: RuntimeError: out of memory"] * 2


@needs_pb_utils
def test_model_config_without_workdir(model):
    with pytest.raises(UsageError, match="no WORKDIR parameter"):
        type(model)().initialize({"model_config": json.dumps({"max_batch_size": 2, "parameters": {}}),
                                  "model_instance_kind": "CPU", "model_instance_device_id": "0"})
