"""CLI start-up time: wall time of `sdtrt` commands that do (almost) no work, median of N fresh processes.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--workdir WD]

`--help` of each command is the pure start-up cost (imports, parser); with --workdir (a tiny exported model)
a 1-step 64x64 `generate` on ONNX Runtime shows start-up plus a little real work. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ["init-random", "export", "build", "check", "bench", "generate", "serve", "export-triton"]


def _time(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None, help="a tiny exported WORKDIR for the generate row")
    args = ap.parse_args()
    py = sys.executable
    rows = [("python -c pass (interpreter alone)", _time([py, "-c", "pass"], args.runs)),
            ("python -c 'import sdtrt.cli'", _time([py, "-c", "import sdtrt.cli"], args.runs)),
            ("sdtrt --help", _time([py, "-m", "sdtrt", "--help"], args.runs))]
    rows += [(f"sdtrt {c} --help", _time([py, "-m", "sdtrt", c, "--help"], args.runs)) for c in COMMANDS]
    if args.workdir is not None:
        with tempfile.TemporaryDirectory() as d:
            rows.append(("sdtrt generate (tiny, 1 step, 64x64, onnxruntime)",
                         _time([py, "-m", "sdtrt", "-q", "generate", str(args.workdir), "a cat", "--steps", "1",
                                "--backend", "onnxruntime", "-o", f"{d}/x.png"], args.runs)))
    print(f"| command | median wall time of {args.runs} runs |\n| --- | ---: |")
    for name, t in rows:
        print(f"| `{name}` | {t:.2f} s |")


if __name__ == "__main__":
    main()
