"""What ONNX Runtime's spin-waiting threads cost, in one run: sdtrt's onnxruntime loop with spinning on (ORT's
default) and off (sdtrt's default since issue 17), and the torch pipeline run interleaved with each.

    python benchmarks/ort_spinning.py WORKDIR [--steps 20] [--size 64] [--runs 5] [--threads 2] [--torch-threads 1]
        [--out FILE.json]

Each ORT variant is measured as ``sdtrt bench`` measures a pair of contenders (``run._measure``): the ORT loop
alone (back to back) and interleaved with ``sdtrt-torch``, twice in the order off, on, off, on so that drift hits
both. Threads: ORT's intra-op pool has ``threads - 1`` workers, so with ``--threads 1`` there is nothing to spin;
the default is every core. torch gets ``--torch-threads`` (1). Prints a JSON record (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdtrt.bench.contenders import SdtrtContender
from sdtrt.bench.env import capture_environment, load_average
from sdtrt.bench.memory import PeakProbe
from sdtrt.bench.run import _measure
from sdtrt.bench.spec import BenchSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch's intra-op threads (its OpenMP barriers spin too: 1 keeps them out of the comparison)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    spec = BenchSpec(contenders=("sdtrt-onnxruntime", "sdtrt-torch"), steps=a.steps, batch_sizes=(1,),
                     height=a.size, width=a.size, runs=a.runs, warmup=1, threads=a.threads)
    torch.set_num_threads(a.torch_threads)
    env = capture_environment()
    torch_c = SdtrtContender("sdtrt-torch", spec, False, a.workdir, "torch", False)
    ort = {spin: SdtrtContender("sdtrt-onnxruntime", spec, False, a.workdir, "onnxruntime", False,
                                allow_spinning=spin) for spin in (False, True)}
    for c in (torch_c, *ort.values()):
        c.load()
    probe = PeakProbe(False)
    rounds: list[dict] = []
    bar = tqdm(total=4 * 2 * (spec.warmup + 2 * spec.runs), disable=not sys.stderr.isatty())
    for spin in (False, True, False, True):
        figures, failed = _measure([ort[spin], torch_c], 1, spec, probe, bar)
        if failed:
            raise SystemExit(f"failed: {failed}")
        rounds.append({"spinning": spin, "load_average": load_average(), **{
            name: {"alone_p50_s": f["alone_end_to_end_s"]["p50"], "interleaved_p50_s": f["end_to_end_s"]["p50"],
                   "interleaved_over_alone": f["interference"]["interleaved_over_alone"],
                   "unet_ms_per_step": f["stages_ms"]["unet_ms_per_step"]["p50"],
                   "overhead_ms_per_step": f["stages_ms"]["overhead_ms_per_step"]["p50"]}
            for name, f in figures.items()}})
    bar.close()

    def mean_of(spin: bool, name: str, key: str) -> float:
        return float(np.mean([r[name][key] for r in rounds if r["spinning"] == spin]))

    summary = {}
    for name in ("sdtrt-onnxruntime", "sdtrt-torch"):
        for key in ("alone_p50_s", "interleaved_p50_s", "overhead_ms_per_step"):
            on, off = mean_of(True, name, key), mean_of(False, name, key)
            summary[f"{name} {key}"] = {"spinning_on": on, "spinning_off": off, "on_over_off": on / off}
    record = {"workdir": str(a.workdir.resolve()), "spec": {"steps": a.steps, "size": a.size, "runs": a.runs,
              "threads": a.threads, "torch_threads": a.torch_threads}, "environment": env, "load_average_end": load_average(), "rounds": rounds,
              "summary": summary}
    text = json.dumps(record, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    for k, v in summary.items():
        print(f"{k:<45} on {v['spinning_on']:.4g}  off {v['spinning_off']:.4g}  on/off {v['on_over_off']:.2f}")
    print(f"load average {env['load_average_start']} -> {record['load_average_end']}")


if __name__ == "__main__":
    main()
