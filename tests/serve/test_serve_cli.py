"""`sdtrt serve` as users run it: a subprocess, its startup errors, and a graceful SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sdtrt import cli

SDTRT = [sys.executable, "-m", "sdtrt"]


def start(workdir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*SDTRT, "serve", str(workdir), "--port", "0", "--backend", "onnxruntime", *flags],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+):", line)
    assert m, f"unexpected first line: {line!r}"
    return proc, m.group(1)


def test_sigterm_finishes_every_in_flight_request_then_exits(sd1_workdir_fp32):
    proc, url = start(sd1_workdir_fp32, "--max-batch", "1")
    try:
        body = {"prompt": "x", "steps": 30, "width": 64, "height": 64, "sampler_name": "DDIM"}
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(requests.post, f"{url}/sdapi/v1/txt2img", json={**body, "seed": s}, timeout=120)
                       for s in range(6)]
            deadline = time.monotonic() + 60
            while requests.get(f"{url}/health", timeout=10).json()["queue_depth"] < 5:  # 1 running, 5 waiting
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)  # with requests running and queued
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * 6
        assert all(len(r.json()["images"]) == 1 for r in results)
        # uvicorn re-raises the signal once it has drained, so the process ends as SIGTERM'd processes do
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_missing_workdir_is_one_line_exit_2(capsys, tmp_path):
    code, err = run_cli(capsys, "serve", str(tmp_path / "nope"), "--port", "0")
    assert code == 2
    assert err.strip().splitlines() == [f"sdtrt: error: {tmp_path / 'nope'}: no such workdir "
                                        f"(run `sdtrt export CHECKPOINT {tmp_path / 'nope'}` first)"]


def test_port_in_use_is_one_line_exit_2(capsys, sd1_workdir_fp32):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(capsys, "serve", str(sd1_workdir_fp32), "--port", str(port))
    assert code == 2
    assert err.strip() == f"sdtrt: error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-batch", "0"], "max batch must be between 1 and 64, got 0"),
    (["--max-queue", "0"], "max queue must be at least 1, got 0"),
    (["--timeout", "0"], "timeout must be a finite positive number, got 0.0"),
    (["--timeout", "nan"], "timeout must be a finite positive number, got nan"),
    (["--max-steps", "0"], "max steps must be between 1 and 1000, got 0"),
    (["--max-batch", "65"], "max batch must be between 1 and 64, got 65"),
    (["--api-key", " "], "the API key must not be empty"),
    (["--port", "70000"], "port must be between 0 and 65535, got 70000"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
])
def test_bad_flags_are_one_line_exit_2(capsys, sd1_workdir_fp32, flags, message):
    code, err = run_cli(capsys, "serve", str(sd1_workdir_fp32), *flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


def test_export_triton_cli_writes_a_repository_that_parses(capsys, sd1_workdir_fp32, tmp_path):
    from sdtrt.serve.triton import parse_config

    code = cli.main(["export-triton", str(sd1_workdir_fp32), str(tmp_path / "repo"), "--max-batch", "8",
                     "--gpus", "0,1", "--instances-per-gpu", "2"])
    assert code == 0
    assert f"wrote {tmp_path / 'repo' / 'sdtrt'}" in capsys.readouterr().out
    config = parse_config((tmp_path / "repo" / "sdtrt" / "config.pbtxt").read_text())
    assert config.max_batch_size == 8
    assert list(config.instance_group[0].gpus) == [0, 1] and config.instance_group[0].count == 2
    # again without --overwrite: refused, one line
    code, err = run_cli(capsys, "export-triton", str(sd1_workdir_fp32), str(tmp_path / "repo"))
    assert code == 2 and "already exists; pass --overwrite to replace it" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--gpus", "0,x"], "--gpus must be comma-separated integers, got '0,x'"),
    (["--gpus", "0", "--cpu"], "GPU ids and CPU instances exclude each other"),
    (["--max-batch", "0"], "max batch size must be an integer between 1 and 64, got 0"),
])
def test_export_triton_bad_flags(capsys, sd1_workdir_fp32, tmp_path, flags, message):
    code, err = run_cli(capsys, "export-triton", str(sd1_workdir_fp32), str(tmp_path / "repo"), *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "repo").exists()
