"""The repository ``sdtrt export-triton`` writes, served by a real Triton Inference Server on CPU.

The server is PyTriton's wheel (``nvidia-pytriton``): ``tritonserver``, the Python backend, and a backend stub per
Python version. It runs from a per-test backend folder of symlinks, on loopback only, on free-picked ports, metrics
off, and is stopped by its PID. Requests go through tritonclient over HTTP and gRPC; images are compared with the
pipeline run alone (what ``sdtrt generate`` runs), and dynamic batching is read from Triton's own statistics.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import triton_fake

import sdtrt
from sdtrt import cli
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
TRITON_DIR = triton_fake.triton_dir()
if TRITON_DIR is None:
    pytest.skip("needs nvidia-pytriton (tritonserver and its Python backend)", allow_module_level=True)
STUB = TRITON_DIR / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
if not STUB.is_file():
    pytest.skip(f"nvidia-pytriton has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}",
                allow_module_level=True)


def _missing_libraries(binary: Path) -> list[str]:
    """Shared libraries ``binary`` needs that the loader cannot find (the stub embeds the system's libpython)."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # no ldd: let the server say it
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


if missing := _missing_libraries(STUB):
    pytest.skip(f"the Python backend stub needs {', '.join(missing)} (e.g. apt-get install "
                f"libpython{sys.version_info[0]}.{sys.version_info[1]})", allow_module_level=True)

log = logging.getLogger(__name__)
MODEL, PROBE = "sdtrt", "pb_utils_probe"
MAX_BATCH = 4
# Long enough that a wave of requests sent together is batched together whatever the load; every wave below is
# whole batches of MAX_BATCH rows, which Triton dispatches as soon as they are full, so nothing waits this long.
QUEUE_DELAY_US = 3_000_000
READY_WITHIN_S = 120
SHM_PREFIX = "triton_python_backend_shm_region"
TYPES = {"PROMPT": ("BYTES", object), "NEGATIVE_PROMPT": ("BYTES", object), "SCHEDULER": ("BYTES", object),
         "SEED": ("INT64", np.int64), "STEPS": ("INT32", np.int32), "GUIDANCE": ("FP32", np.float32),
         "HEIGHT": ("INT32", np.int32), "WIDTH": ("INT32", np.int32)}
FIELDS = {"PROMPT": "prompt", "NEGATIVE_PROMPT": "negative_prompt", "SCHEDULER": "scheduler", "SEED": "seed",
          "STEPS": "steps", "GUIDANCE": "guidance", "HEIGHT": "height", "WIDTH": "width"}

# the probe: a test-owned Python model that reports, from inside the stub, what the real pb_utils provides
PROBE_CONFIG = f"""name: "{PROBE}"
backend: "python"
max_batch_size: 0
input [ {{ name: "NAMES" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "REPORT" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
PROBE_MODEL = '''import sys
sys.path[:0] = {path!r}  # numpy, for triton_python_backend_utils
import inspect, json
import numpy as np
import triton_python_backend_utils as pb_utils


def describe(obj):
    if isinstance(obj, type):
        return {{"members": {{m: getattr(obj, m).__doc__ for m in dir(obj) if m == "__init__" or not m.startswith("_")}}}}
    return {{"signature": str(inspect.signature(obj))}}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            names = json.loads(pb_utils.get_input_tensor_by_name(request, "NAMES").as_numpy()[0])
            report = {{n: describe(getattr(pb_utils, n)) if hasattr(pb_utils, n) else None for n in names}}
            out = pb_utils.Tensor("REPORT", np.array([json.dumps(report).encode()], dtype=object))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``, as 'PID COMMAND'."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(rest[3]) == sid and rest[0] != "Z":
            found.append(f"{stat.parent.name} {comm}")
    return found


def _shm_regions() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith(SHM_PREFIX)} if shm.is_dir() else set()


@dataclass
class Server:
    process: subprocess.Popen
    http: str
    grpc: str
    log_file: Path
    version: str = ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> list[str]:
        """SIGTERM to the server's PID, SIGKILL to its process group if it has not exited within a bound; return
        what is still running in its session (nothing, when it went well)."""
        pid = self.process.pid
        if self.process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        left = _session_processes(pid)
        if left:  # a stub outliving its server: ours (session == the server's PID), so end it
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://{self.http}/v2/models/{MODEL}/stats", timeout=30) as r:
            [model] = json.load(r)["model_stats"]
        return model


def _backend_dir(root: Path) -> Path:
    """Triton's --backend-directory: the wheel's Python backend plus the stub for the running Python, as links
    (the wheel's own folder stays untouched)."""
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    wheel = TRITON_DIR / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(wheel / name)
    (python / "triton_python_backend_stub").symlink_to(STUB)
    return root / "backends"


def _server_env() -> dict[str, str]:
    """The environment for tritonserver: without the directories on PATH whose ``python3`` is this (virtualenv's)
    interpreter. The stub's embedded Python takes its standard library from the ``python3`` it finds on PATH, and
    another CPython build's fails to load (``_ssl ... undefined symbol``); the venv's packages come through
    --python-path instead."""
    ours = Path(sys.executable).resolve()
    names = ("python3", f"python{sys.version_info[0]}.{sys.version_info[1]}")

    def leads_here(directory: str) -> bool:
        return any((Path(directory) / n).exists() and (Path(directory) / n).resolve() == ours for n in names)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not leads_here(d))
    return env


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"tritonserver exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 400 while the models load
            pass
        time.sleep(0.25)
    pytest.fail(f"tritonserver not ready within {READY_WITHIN_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return _shm_regions()


@pytest.fixture(scope="module")
def server(sd1_workdir_fp32, tmp_path_factory, request, shm_before):
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    site_packages = sysconfig.get_paths()["purelib"]  # this venv's
    project = str(Path(sdtrt.__file__).resolve().parents[1])  # an editable install's .pth is not read by Triton
    code = cli.main(["export-triton", str(sd1_workdir_fp32), str(repo), "--cpu", "--backend", "onnxruntime",
                     "--max-batch", str(MAX_BATCH), "--queue-delay-us", str(QUEUE_DELAY_US), "--quiet",
                     "--python-path", os.pathsep.join([site_packages, project])])
    assert code == 0
    (repo / PROBE / "1").mkdir(parents=True)
    (repo / PROBE / "config.pbtxt").write_text(PROBE_CONFIG)
    (repo / PROBE / "1" / "model.py").write_text(PROBE_MODEL.format(path=[site_packages]))

    http_port, grpc_port = _free_port(), _free_port()
    log_file = root / "tritonserver.log"
    command = [str(TRITON_DIR / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(_backend_dir(root)),
               "--http-address", "127.0.0.1", "--http-port", str(http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
               "--allow-metrics", "false", "--exit-timeout-secs", "10", "--log-verbose", "0"]
    with open(log_file, "wb") as out:
        # its own session: the stubs it starts can be found (and, if need be, ended) by the server's PID
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=_server_env(), start_new_session=True)
    server = Server(process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_file)
    try:
        _wait_ready(server)
        with urllib.request.urlopen(f"http://{server.http}/v2", timeout=30) as r:
            server.version = json.load(r)["version"]
        line = f"tritonserver {server.version} (nvidia-pytriton), CPU, pid {process.pid}, log {log_file}"
        log.info(line)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:  # in the test output, whatever the capture mode
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\n{line}")
        yield server
    finally:
        left = server.stop()
        assert not left, f"still running after tritonserver stopped: {left}"


@pytest.fixture(scope="module")
def reference(sd1_workdir_fp32):
    """The image ``sdtrt generate`` makes for one row (the same Pipeline call), at batch 1."""
    pipe = Pipeline.load(sd1_workdir_fp32, backend="onnxruntime")

    def generate(row: dict) -> np.ndarray:
        kw = {FIELDS[k]: v for k, v in row.items()}
        kw["scheduler"] = kw.get("scheduler") or None  # "": the checkpoint's own
        return np.asarray(pipe.generate(GenerateRequest(**kw)).images[0])

    return generate


def _inputs(client_module, rows: list[dict]) -> list:
    """One request of ``rows`` (same keys): an (rows, 1) tensor per input."""
    tensors = []
    for name in rows[0]:
        kind, dtype = TYPES[name]
        values = [r[name].encode() if dtype is object else r[name] for r in rows]
        array = np.array(values, dtype=dtype).reshape(len(rows), 1)
        tensor = client_module.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _send_together(server: Server, http_requests: list[list[dict]], grpc_requests: list[list[dict]]) -> tuple:
    """Send every request at once (gRPC callbacks, HTTP async) and wait; each answer is an (rows, H, W, 3) array or
    the server's error message."""
    answers: queue.Queue = queue.Queue()

    def done(i: int, result=None, error=None) -> None:
        answers.put((i, error.message() if error is not None else result.as_numpy("IMAGE")))

    grpc = grpcclient.InferenceServerClient(server.grpc)
    http = httpclient.InferenceServerClient(server.http, concurrency=len(http_requests), network_timeout=120)
    try:
        for i, rows in enumerate(grpc_requests):
            grpc.async_infer(MODEL, _inputs(grpcclient, rows), callback=functools.partial(done, i), client_timeout=120)
        pending = [http.async_infer(MODEL, _inputs(httpclient, rows)) for rows in http_requests]
        http_answers = []
        for p in pending:  # HTTP requests go out here, when the client's event loop first runs
            try:
                http_answers.append(p.get_result().as_numpy("IMAGE"))
            except httpclient.InferenceServerException as e:
                http_answers.append(e.message())
        grpc_answers = dict(answers.get(timeout=120) for _ in grpc_requests)
    finally:
        http.close()
        grpc.close()
    return http_answers, [grpc_answers[i] for i in range(len(grpc_requests))]


def _delta(server: Server, before: dict, rows: int) -> tuple[int, int]:
    """(inferences, executions) since ``before``, once Triton has counted ``rows`` inferences (it counts as it
    releases requests, which may come just after the responses), or as they stand after a bound."""
    deadline = time.monotonic() + 10
    while True:
        after = server.stats()
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        if inferences >= rows or time.monotonic() > deadline:
            return inferences, int(after["execution_count"]) - int(before["execution_count"])
        time.sleep(0.1)


def test_concurrent_http_and_grpc_requests_get_the_generated_images(server, reference):
    row = dict(STEPS=2, GUIDANCE=5.5, HEIGHT=64, WIDTH=64)
    http_requests = [
        [dict(row, PROMPT="a cat", NEGATIVE_PROMPT="blurry", SEED=1, SCHEDULER="euler")],
        [dict(row, PROMPT="a dog", NEGATIVE_PROMPT="", SEED=2, SCHEDULER="ddim")],
        [dict(row, PROMPT="a cow", NEGATIVE_PROMPT="", SEED=3, SCHEDULER="euler"),  # two rows in one request
         dict(row, PROMPT="a pig", NEGATIVE_PROMPT="dark", SEED=4, SCHEDULER="euler")],
    ]
    grpc_requests = [
        [dict(row, PROMPT="a bird", NEGATIVE_PROMPT="", SEED=5, SCHEDULER="euler")],
        [dict(row, PROMPT="a fish", NEGATIVE_PROMPT="", SEED=6, SCHEDULER="")],  # the checkpoint's own
        [dict(row, PROMPT="a cat", NEGATIVE_PROMPT="blurry", SEED=1, SCHEDULER="euler")],  # = the first, over gRPC
        [dict(row, PROMPT="a frog", NEGATIVE_PROMPT="", SEED=8, SCHEDULER="ddim", GUIDANCE=3.0)],
    ]
    rows = sum(len(r) for r in http_requests + grpc_requests)
    assert rows % MAX_BATCH == 0  # whole batches: none waits for the queue delay
    before = server.stats()
    http_answers, grpc_answers = _send_together(server, http_requests, grpc_requests)
    inferences, executions = _delta(server, before, rows)

    for request, answer in zip(http_requests + grpc_requests, http_answers + grpc_answers, strict=True):
        assert not isinstance(answer, str), f"{request}: {answer}"
        assert (answer.dtype, answer.shape) == (np.uint8, (len(request), 64, 64, 3))
        for r, image in zip(request, answer, strict=True):
            np.testing.assert_array_equal(image, reference(r), err_msg=str(r))  # 0 levels apart
    # Triton's dynamic batcher put rows of several requests into one execution of the model
    assert inferences == rows
    assert executions < len(http_requests) + len(grpc_requests), (inferences, executions)
    log.info("%d rows in %d requests ran in %d executions", rows, len(http_requests) + len(grpc_requests), executions)


def test_bad_rows_get_their_own_errors_and_the_rest_of_the_batch_runs(server, reference):
    # the same inputs in every request: Triton batches only requests that send the same set of inputs
    row = dict(STEPS=2, WIDTH=64, SCHEDULER="euler")
    good = [dict(row, PROMPT="a boat", SEED=11), dict(row, PROMPT="a tree", SEED=12)]
    before = server.stats()
    http_answers, grpc_answers = _send_together(
        server,
        http_requests=[[good[0]], [dict(row, PROMPT="a hat", SEED=13, WIDTH=60)]],
        grpc_requests=[[dict(row, PROMPT="a cup", SEED=14, SCHEDULER="nope")], [good[1]]],
    )
    inferences, executions = _delta(server, before, MAX_BATCH)

    assert (inferences, executions) == (MAX_BATCH, 1)  # the four were one batch
    ok_http, bad_size = http_answers
    bad_scheduler, ok_grpc = grpc_answers
    assert bad_size == "width must be a multiple of 8 between 8 and 2048, got 60"
    assert bad_scheduler.startswith("unknown scheduler 'nope'; choose one of ddim, ")
    for row, answer in ((good[0], ok_http), (good[1], ok_grpc)):
        assert not isinstance(answer, str), answer
        np.testing.assert_array_equal(answer[0], reference(row))


def _overloads(doc: str, member: str) -> list[list[tuple[str, bool]]]:
    """Parameters (name, has a default) of each pybind11 overload of ``member`` in its docstring, ``self`` left
    out."""
    overloads = []
    for line in doc.splitlines():
        m = re.match(rf"(?:\d+\. )?{re.escape(member)}\((.*)\) -> ", line.strip())
        if m is None:
            continue
        params, depth, part = [], 0, ""
        for ch in m.group(1) + ",":
            if ch == "," and depth == 0:
                params.append(part.strip())
                part = ""
                continue
            depth += (ch in "[(<") - (ch in "])>")
            part += ch
        parsed = [(p.split(":")[0].strip(), " = " in p) for p in params if p]
        overloads.append([p for p in parsed if p[0] != "self"])
    return overloads


def _fits(fake: list[tuple[str, bool]], real: list[tuple[str, bool]]) -> bool:
    """Every call the fake takes, the real one takes: the same parameters in order (pybind11's unnamed ``argN``
    match any name), nothing optional in the fake that the real one requires, the rest of the real one optional."""
    if len(fake) > len(real) or not all(has_default for _, has_default in real[len(fake) :]):
        return False
    return all((fn == rn or re.fullmatch(r"arg\d+", rn)) and (rd or not fd)
               for (fn, fd), (rn, rd) in zip(fake, real, strict=False))


def test_the_fake_pb_utils_matches_the_real_one(server):
    """triton_fake's stand-ins against the classes of the stub's real pb_utils (names and signatures), and every
    pb_utils name the model uses against the real module."""
    from sdtrt.serve import triton_model

    used = sorted(set(re.findall(r"pb_utils\.(\w+)", Path(triton_model.__file__).read_text())))
    names = sorted({cls.__name__ for cls in triton_fake.CHECKED} | set(used))
    tensor = httpclient.InferInput("NAMES", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(names).encode()], dtype=object))
    client = httpclient.InferenceServerClient(server.http)
    try:
        report = json.loads(client.infer(PROBE, [tensor]).as_numpy("REPORT")[0])
    finally:
        client.close()

    assert used == ["InferenceResponse", "Tensor", "TritonError", "get_input_tensor_by_name"]
    assert [n for n in names if report[n] is None] == []  # every one exists for real
    for cls, members in triton_fake.CHECKED.items():
        public = {m for m, v in vars(cls).items() if callable(v) and (m == "__init__" or not m.startswith("_"))}
        assert public <= set(members) | {"__init__"}, f"{cls.__name__}: unchecked members {public - set(members)}"
        for member in members:
            real_doc = report[cls.__name__]["members"].get(member)
            assert real_doc, f"the real {cls.__name__} has no {member}"
            fake = [(p.name, p.default is not p.empty) for p in
                    list(inspect.signature(getattr(cls, member)).parameters.values())[1:]]  # without self
            real = _overloads(real_doc, member)
            assert any(_fits(fake, r) for r in real), f"{cls.__name__}.{member}{fake} vs the real {real_doc.strip()}"
    # the fake module's functions are the wheel's own file: the same as the stub's
    module = triton_fake.pb_utils(TRITON_DIR)
    assert str(inspect.signature(module.get_input_tensor_by_name)) == report["get_input_tensor_by_name"]["signature"]


def test_the_server_stops_by_pid_and_leaves_nothing_running(server, shm_before):  # keep last: it stops the server
    assert server.version
    assert server.stop() == []
    assert server.process.returncode == 0, server.log_tail()
    assert _shm_regions() <= shm_before  # the stubs' shared memory is released too
