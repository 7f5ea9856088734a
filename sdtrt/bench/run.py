"""``run_bench``: every contender in one process, same checkpoint, prompt, seed and settings, interleaved.

Order of work: (1) the diffusers fp32 reference image, unless a contender is that reference; (2) each contender
loads and makes its first image (load time and first-image latency, sequentially); (3) per batch size, each
contender alone: its warm-ups then ``runs`` requests back to back (A A A, B B B, ...); then ``runs`` rounds of one
request per contender in a fixed order (A B C A B C ...), so drifts in clock speed or background load hit all
contenders alike; (4) summaries, speed-ups over the baseline (interleaved p50s) and PSNR against the reference.

Alone vs interleaved is the check that contenders do not disturb each other (a library whose threads spin after
a call steals the cores of whatever runs next): a contender whose interleaved p50 is more than
``INTERFERENCE_LIMIT`` above its alone p50 is flagged in the result and the reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sdtrt.bench.contenders import (
    Contender,
    DiffusersContender,
    Sample,
    default_contenders,
    make_contender,
    strict_fp32,
    unavailable_reason,
)
from sdtrt.bench.env import capture_environment, load_average
from sdtrt.bench.memory import PeakProbe, in_use_bytes
from sdtrt.bench.spec import BASELINE, BenchSpec
from sdtrt.bench.timing import summarize
from sdtrt.errors import SdtrtError, UsageError
from sdtrt.export.manifest import read_manifest

log = logging.getLogger(__name__)

FORMAT = "sdtrt-bench/1"
STAGES = ("text_encoder_ms", "unet_eval_ms", "scheduler_step_ms", "step_ms", "host_step_ms", "vae_decoder_ms",
          "unet_ms_per_step", "overhead_ms_per_step")
#: interleaved p50 over alone p50 above which a contender is flagged as disturbed by (or disturbing) its neighbours
INTERFERENCE_LIMIT = 1.10


def psnr(images: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """PSNR in dB over all pixels of a batch (None when identical) and the largest difference in levels."""
    if images.shape != reference.shape:
        raise ValueError(f"image shapes differ: {images.shape} vs {reference.shape}")
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    return {"psnr_db": None if mse == 0 else 10 * math.log10(255.0**2 / mse), "max_abs_diff": int(np.abs(diff).max())}


def _source_info(manifest: dict[str, Any]) -> dict[str, Any]:
    source = Path(manifest["source"]["path"])
    info = {**manifest["source"], "precision": manifest.get("precision"), "weights": "unknown"}
    arch_file = source / "sdtrt_arch.json"
    if arch_file.is_file():
        meta = json.loads(arch_file.read_text())
        if "init_random" in str(meta.get("made_by", "")):
            info["weights"] = f"random (sdtrt init-random, seed {meta.get('seed')})"
        info["arch"] = info.get("arch") or meta.get("arch")  # e.g. benchmarks/init_small.py's, which detect omits
    return info


def _scheduler_name(workdir: Path, spec: BenchSpec) -> str:
    from sdtrt.runtime import schedulers

    config = json.loads((workdir / "scheduler" / "scheduler_config.json").read_text())
    name = spec.scheduler or schedulers.name_for_config(config)
    schedulers.get_scheduler(name)  # UsageError listing the valid names
    return name


def _reference_device(spec: BenchSpec, cuda: bool) -> str | None:
    if spec.reference_device == "none":
        return None
    if spec.reference_device == "cuda" and not cuda:
        raise UsageError("the reference cannot run on CUDA: no NVIDIA GPU is visible (use --reference-device cpu)")
    if spec.reference_device == "auto":
        return "cuda" if cuda else "cpu"
    return spec.reference_device


def _reference_images(spec: BenchSpec, source: Path, scheduler: str, device: str) -> np.ndarray:
    """diffusers in fp32 (TF32 off) on ``device``, at the smallest batch size."""
    ref = DiffusersContender("reference", spec, device == "cuda", source, scheduler, dtype=torch.float32)
    try:
        with strict_fp32():
            ref.load()
            return ref.generate(spec.smallest_batch).images
    finally:
        ref.close()
        del ref
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def interference(alone_p50: float, interleaved_p50: float) -> dict[str, Any]:
    """Interleaved over alone p50, and whether it is past ``INTERFERENCE_LIMIT``."""
    ratio = interleaved_p50 / alone_p50
    return {"interleaved_over_alone": ratio, "flagged": ratio > INTERFERENCE_LIMIT}


def _aggregate(batch: int, samples: list[Sample], alone: list[Sample], memory: list[dict]) -> dict[str, Any]:
    e2e = [s.e2e_s for s in samples]
    peaks = {k: max((m[k] for m in memory if m.get(k) is not None), default=None) for k in memory[0]}
    e2e_summary, alone_summary = summarize(e2e), summarize(s.e2e_s for s in alone)
    return {
        "runs": len(samples),
        "end_to_end_s": e2e_summary,  # interleaved: what speed-ups are computed from
        "alone_end_to_end_s": alone_summary,
        "interference": interference(alone_summary["p50"], e2e_summary["p50"]),
        "images_per_s": summarize(batch / t for t in e2e),
        "stages_ms": {k: summarize(s.stages.get(k) for s in samples) for k in STAGES},
        "memory": peaks,
    }


def _jsonable_spec(spec: BenchSpec) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _load(c: Contender, spec: BenchSpec, cuda: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Load ``c`` and make its first image: the load/first-image figures, and the images for PSNR."""
    before = in_use_bytes(cuda)
    t0 = time.perf_counter()
    c.load()
    load_s = time.perf_counter() - t0
    first = c.generate(spec.smallest_batch)
    after = in_use_bytes(cuda)
    record = {**c.info, "load_s": load_s, "first_image_s": first.e2e_s, "first_image_total_s": load_s + first.e2e_s,
              "load_memory_bytes": None if before is None or after is None else after - before, "batches": {}}
    return record, first.images


def _measure(loaded: list[Contender], batch: int, spec: BenchSpec, probe: PeakProbe, bar
             ) -> tuple[dict[str, dict], dict[str, str]]:
    """Per contender its warm-ups and ``spec.runs`` requests alone, then ``spec.runs`` interleaved rounds, at one
    batch size. A contender that fails (an engine without this shape, out of memory) drops out with its reason;
    the others go on."""
    failed: dict[str, str] = {}

    def attempt(c: Contender) -> Sample | None:
        try:
            return c.generate(batch)
        except (SdtrtError, RuntimeError) as e:
            failed[c.name] = f"failed at batch {batch}: {type(e).__name__}: {e}"
            log.warning("%s %s", c.name, failed[c.name])
            return None

    alone: dict[str, list[Sample]] = {c.name: [] for c in loaded}
    for c in loaded:
        # the warm-ups also let whatever ran before (the previous contender) settle before the alone runs
        bar.set_description(f"warm-up b{batch} {c.name}")
        for _ in range(spec.warmup):
            if c.name not in failed:
                attempt(c)
            bar.update(1)
        bar.set_description(f"alone b{batch} {c.name}")
        for _ in range(spec.runs):
            if c.name not in failed and (s := attempt(c)) is not None:
                s.images = s.images[:0]
                alone[c.name].append(s)
            bar.update(1)
    samples: dict[str, list[Sample]] = {c.name: [] for c in loaded}
    memory: dict[str, list[dict]] = {c.name: [] for c in loaded}
    for r in range(spec.runs):
        bar.set_description(f"bench b{batch} round {r + 1}/{spec.runs}")
        for c in loaded:
            if c.name not in failed:
                probe.start()
                s = attempt(c)
                if s is not None:
                    memory[c.name].append(probe.stop())
                    s.images = s.images[:0]  # keep the figures, not the pixels
                    samples[c.name].append(s)
            bar.update(1)
    figures = {c.name: _aggregate(batch, samples[c.name], alone[c.name], memory[c.name])
               for c in loaded if c.name not in failed}
    return figures, failed


def _speedups(results: dict[str, dict], batch_sizes: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Baseline p50 over each contender's p50, per batch size both were measured at."""
    out: dict[str, dict[str, float]] = {}
    for b in map(str, batch_sizes):
        base = results.get(BASELINE, {}).get("batches", {}).get(b)
        if base is not None:
            out[b] = {n: base["end_to_end_s"]["p50"] / r["batches"][b]["end_to_end_s"]["p50"]
                      for n, r in results.items() if b in r["batches"]}
    return out


def _flagged(results: dict[str, dict]) -> dict[str, list[int]]:
    """Contender -> the batch sizes at which its interleaved p50 was past the limit."""
    out = {name: [int(b) for b, f in r["batches"].items() if f["interference"]["flagged"]]
           for name, r in results.items()}
    return {name: bs for name, bs in out.items() if bs}


def run_bench(workdir: str | Path, spec: BenchSpec, *, progress: bool = True) -> dict[str, Any]:
    """Benchmark the contenders of ``spec`` on the export in ``workdir`` (its manifest's source checkpoint runs
    under diffusers); returns the result as a JSON-able dict (see ``benchmarks/README.md`` for its fields)."""
    workdir = Path(workdir)
    manifest = read_manifest(workdir)
    spec = spec.at_native_size(manifest["model"]["default_size"])  # SD 1.5: 512, SD 2.x 768-v: 768, SDXL: 1024
    source = Path(manifest["source"]["path"])
    cuda = torch.cuda.is_available()
    scheduler = _scheduler_name(workdir, spec)
    ref_device = _reference_device(spec, cuda)
    names = spec.contenders or default_contenders(spec, cuda)
    # On CPU the diffusers contender is the fp32 reference itself.
    reuse = "diffusers" if (ref_device == "cpu" and not cuda and "diffusers" in names) else None
    saved_threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    env = capture_environment()
    skipped: dict[str, str] = {}  # never measured: unavailable here, or failed to load
    failed: dict[str, str] = {}  # dropped out at a batch size; its figures for earlier batch sizes stand
    loaded: list[Contender] = []
    results: dict[str, dict[str, Any]] = {}
    first_images: dict[str, np.ndarray] = {}
    reference = None
    bar = tqdm(total=len(names) + (ref_device is not None and reuse is None), unit="step", disable=not progress)
    try:
        # 1. the fp32 reference
        if ref_device is not None and reuse is None:
            bar.set_description(f"reference (diffusers fp32, {ref_device})")
            reference = _reference_images(spec, source, scheduler, ref_device)
            bar.update(1)

        # 2. load and first image, one contender at a time
        for name in names:
            bar.set_description(f"load {name}")
            reason = unavailable_reason(name, workdir, source, cuda)
            c = None if reason is not None else make_contender(name, spec, cuda, workdir, source, scheduler)
            if c is not None:
                try:
                    results[name], first_images[name] = _load(c, spec, cuda)
                    loaded.append(c)
                except (SdtrtError, RuntimeError, ImportError, OSError) as e:
                    reason = f"failed to load or run: {type(e).__name__}: {e}"
                    c.close()
            if reason is not None:
                skipped[name] = reason
                log.warning("not running %s: %s", name, reason)
            bar.update(1)
        if not loaded:
            raise UsageError("no contender can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        if reuse is not None and reuse in first_images:
            reference = first_images[reuse]

        # 3. warm-ups, then interleaved rounds, per batch size
        bar.total += len(spec.batch_sizes) * len(loaded) * (spec.warmup + 2 * spec.runs)
        bar.unit = "req"
        probe = PeakProbe(cuda)
        for batch in spec.batch_sizes:
            figures, failures = _measure(loaded, batch, spec, probe, bar)
            for name, f in figures.items():
                results[name]["batches"][str(batch)] = f
            failed.update(failures)
            for c in [c for c in loaded if c.name in failures]:
                c.close()
                loaded.remove(c)
            if failures and cuda:
                torch.cuda.empty_cache()
    finally:
        bar.close()
        for c in loaded:
            c.close()
        torch.set_num_threads(saved_threads)

    # 4. quality and speed-ups
    for name, images in first_images.items():
        results[name]["quality"] = None if reference is None else psnr(images, reference)
    env["load_average_end"] = load_average()
    return {
        "format": FORMAT,
        "environment": env,
        "device": "cuda" if cuda else "cpu",
        "spec": _jsonable_spec(spec),
        "scheduler": scheduler,
        "workdir": str(workdir.resolve()),
        "checkpoint": _source_info(manifest),
        "baseline": BASELINE if BASELINE in results else None,
        "reference": None if ref_device is None else {"engine": "diffusers", "dtype": "float32", "device": ref_device,
                                                      "batch": spec.smallest_batch, "reused_contender": reuse},
        "contenders": results,
        "skipped": skipped,
        "failed": failed,
        "speedup_vs_baseline": _speedups(results, spec.batch_sizes),
        "interference": {"limit": INTERFERENCE_LIMIT, "flagged": _flagged(results)},
    }
