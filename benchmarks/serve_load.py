"""Serving throughput: the HTTP server under concurrent clients, with and without micro-batching, against the
pipeline called directly one request at a time (same process, same run).

    .venv/bin/python benchmarks/serve_load.py WORKDIR [--requests 48] [--concurrency 16] [--max-batch 1,4]
        [--steps 20] [--size 64] [--backend auto] [--out benchmarks/results] [--stem NAME]

Every request is an A1111 txt2img with the same settings and its own seed (so all of them may share a pass).
Reports images/s and request latency p50/p90 per configuration, and the ratio to the direct sequential loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sdtrt.bench.env import capture_environment
from sdtrt.bench.timing import summarize
from sdtrt.fsutil import write_bytes_atomic, write_json_atomic
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import GenerateRequest
from sdtrt.serve.app import ServeSpec, create_app
from sdtrt.serve.server import ThreadedServer


def direct(pipe: Pipeline, n: int, steps: int, size: int, warmup: int) -> dict:
    for seed in range(warmup):
        pipe.generate(GenerateRequest("load test", seed=seed, steps=steps, height=size, width=size))
    latencies = []
    t0 = time.perf_counter()
    for seed in range(n):
        t = time.perf_counter()
        pipe.generate(GenerateRequest("load test", seed=seed, steps=steps, height=size, width=size))
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat = summarize(latencies)
    return {"mode": "direct, sequential", "max_batch": 1, "images_per_s": n / wall, "wall_s": wall,
            "p50_s": lat["p50"], "p90_s": lat["p90"], "refused": 0}


def served(pipe: Pipeline, n: int, concurrency: int, max_batch: int, steps: int, size: int, warmup: int) -> dict:
    spec = ServeSpec(max_batch=max_batch, max_queue=max(64, n))
    app = create_app(pipe, spec)

    def passes() -> tuple[float, float]:  # (images, passes) so far
        samples = {s.name: s.value for m in app.state.metrics.batch_images.collect() for s in m.samples}
        return samples["sdtrt_batch_images_sum"], samples["sdtrt_batch_images_count"]

    with ThreadedServer(app) as server:
        url = f"{server.url}/sdapi/v1/txt2img"

        def post(seed: int) -> tuple[float, int]:
            body = {"prompt": "load test", "seed": seed, "steps": steps, "width": size, "height": size,
                    "cfg_scale": 7.5}
            t = time.perf_counter()
            r = requests.post(url, json=body, timeout=600)
            return time.perf_counter() - t, r.status_code

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(post, range(warmup * max_batch)))  # every batch shape seen once
            images0, passes0 = passes()
            t0 = time.perf_counter()
            results = list(pool.map(post, range(n)))
            wall = time.perf_counter() - t0
            images1, passes1 = passes()
    ok = [lat for lat, code in results if code == 200]
    lat = summarize(ok)
    return {"mode": f"served, {concurrency} clients", "max_batch": max_batch, "images_per_s": len(ok) / wall,
            "wall_s": wall, "p50_s": lat["p50"], "p90_s": lat["p90"],
            "refused": len(results) - len(ok),
            "mean_pass_images": (images1 - images0) / max(1.0, passes1 - passes0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", default="1,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)

    pipe = Pipeline.load(args.workdir, backend=args.backend)
    rows = [direct(pipe, args.requests, args.steps, args.size, args.warmup)]
    for mb in (int(x) for x in args.max_batch.split(",")):
        rows.append(served(pipe, args.requests, args.concurrency, mb, args.steps, args.size, args.warmup))
    base = rows[0]["images_per_s"]
    for row in rows:
        row["vs_direct"] = row["images_per_s"] / base
    result = {"workdir": str(args.workdir), "backend": pipe.backend.name, "device": str(pipe.device),
              "requests": args.requests, "concurrency": args.concurrency, "steps": args.steps, "size": args.size,
              "scheduler": pipe.default_scheduler, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "environment": capture_environment()}
    lines = [f"# Serving load: {args.requests} requests, {args.size}x{args.size}, {args.steps} steps of "
             f"{pipe.default_scheduler}, backend {pipe.backend.name} ({pipe.device})", "",
             "| mode | max batch | images/s | vs direct | p50 latency | p90 latency | images per pass | refused |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['max_batch']} | {r['images_per_s']:.2f} | {r['vs_direct']:.2f}x | "
                     f"{r['p50_s'] * 1000:.0f} ms | {r['p90_s'] * 1000:.0f} ms | {r.get('mean_pass_images', 1):.2f} | "
                     f"{r['refused']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.stem or f"serve-{pipe.device.type}-{result['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{stem}.json", result)
    write_bytes_atomic(args.out / f"{stem}.md", text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
