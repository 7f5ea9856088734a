"""Benchmarks against the PyTorch baseline: sdtrt on each backend beside diffusers' ``StableDiffusionPipeline``,
in one process, same checkpoint, prompt, seed and settings.

    from sdtrt.bench import BenchSpec, run_bench, write_reports
    result = run_bench("workdir", BenchSpec(steps=50, batch_sizes=(1, 8)))
    paths = write_reports(result, "benchmarks/results")   # <device>-<date>.json / .md / .png
"""

from sdtrt.bench.report import write_reports
from sdtrt.bench.run import run_bench
from sdtrt.bench.spec import CONTENDERS, BenchSpec

__all__ = ["CONTENDERS", "BenchSpec", "run_bench", "write_reports"]
