"""``benchmarks/run_gpu.sh``'s CPU-side parts: syntax, its imports, and every sdtrt command line it would run
(parsed by sdtrt's own parser in ``DRY_RUN=1``), the cases' settings, the budget guard and its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "OUT": str(tmp_path / "out"),
            "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=300)


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_plans_sdxl_1024_30_steps_then_sd15(tmp_path):
    r = _run(tmp_path, "all")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x.removeprefix("DRY-RUN: sdtrt ") for x in r.stdout.splitlines() if x.startswith("DRY-RUN: sdtrt ")]
    work, out = tmp_path / "work", tmp_path / "out"
    assert lines == [
        f"init-random {work}/sdxl --arch sdxl --seed 0 --overwrite -q",
        f"export {work}/sdxl {work}/sdxl-fp16 --precision fp16 --no-validate -q",
        f"build {work}/sdxl-fp16 --tensorrt tensorrt --dynamic --max-batch 1 --height 1024 --width 1024 "
        "--min-side 1024 --max-side 1024 -q",
        f"bench {work}/sdxl-fp16 --contenders auto --steps 30 --batch-sizes 1 --height 1024 --width 1024 --runs 3 "
        f"--warmup 1 --out {out}/sdxl --skip-compile",
        f"init-random {work}/sd15 --arch sd15 --seed 0 --overwrite -q",
        f"export {work}/sd15 {work}/sd15-fp16 --precision fp16 --no-validate -q",
        f"build {work}/sd15-fp16 --tensorrt tensorrt --dynamic --max-batch 1 --height 512 --width 512 "
        "--min-side 512 --max-side 512 -q",
        f"bench {work}/sd15-fp16 --contenders auto --steps 50 --batch-sizes 1 --height 512 --width 512 --runs 3 "
        f"--warmup 1 --out {out}/sd15 --skip-compile",
    ]
    assert "torch " in r.stdout and " diffusers " in r.stdout  # the import line ran
    phases = [row.split("\t")[:2] for row in (out / "phases.tsv").read_text().splitlines()]
    assert phases == [[c, p] for c in ("sdxl", "sd15") for p in ("init-random", "export", "build", "bench")]


def test_budget_guard_skips_a_case_and_a_bad_flag_fails_in_one_line(tmp_path):
    r = _run(tmp_path, "bench", BUDGET_S="200", THREADS="abc", SDXL_STEPS="20")
    assert r.returncode == 1
    assert "sdxl: SKIPPED, only" in r.stdout and "(it needs ~300s)" in r.stdout
    both = r.stdout + r.stderr  # the bench's output goes through tee into $OUT/<case>/bench.log
    assert "DRY-RUN: bad command line: sdtrt bench" in both
    assert "argument --threads: invalid int value: 'abc'" in both and "Traceback" not in both
    assert "invalid int value" in (tmp_path / "out" / "sd15" / "bench.log").read_text()


def test_usage_errors(tmp_path):
    r = _run(tmp_path, "all", CASES="sdxl sd3")
    assert r.returncode == 2 and "unknown case 'sd3' in CASES; choose from" in r.stderr
    r = _run(tmp_path, "everything")
    assert r.returncode == 2 and "usage:" in r.stderr
    r = _run(tmp_path, "all", OUT="")
    assert r.returncode != 0 and "set OUT" in r.stderr
