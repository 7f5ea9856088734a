"""Report writers: the JSON (every figure and its spread), a Markdown summary and a PNG plot, written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from sdtrt.bench.env import device_label
from sdtrt.bench.plot import render_plot
from sdtrt.fsutil import write_bytes_atomic

#: Published end-to-end figures to read a run against, keyed by (model family, side in px, steps): (text, source).
#: Another device and stack: the speed-up over diffusers measured in the same run is the result, not these.
ANCHORS: dict[tuple[str, int, int], tuple[str, str]] = {
    ("sdxl", 1024, 30): ("TensorRT ≈ 1.47 s end to end on an H100 (SDXL base, 1024², 30 steps, batch 1)",
                         "Stability AI / NVIDIA, stable-diffusion-xl-1.0-tensorrt model card"),
}


def anchor_line(result: dict[str, Any]) -> str | None:
    """The published figure for this run's model, size and steps, if one is known (square sizes only)."""
    spec = result["spec"]
    if spec["height"] != spec["width"]:
        return None
    hit = ANCHORS.get((result["checkpoint"].get("family"), spec["height"], spec["steps"]))
    if hit is None:
        return None
    return (f"Published anchor: {hit[0]} ({hit[1]}); another device and stack, so compare the speed-ups over "
            "diffusers from this run, not absolute times.")


def report_stem(result: dict[str, Any]) -> str:
    """``<device>-<date>``, e.g. ``cpu-2core-2026-11-23`` or ``h100-80gb-hbm3-2026-11-23``."""
    return f"{device_label(result['environment'])}-{result['environment']['date'][:10]}"


_SUFFIXES = (".json", ".md", ".png")


def free_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first whose reports are not in ``out_dir`` yet."""
    candidate, n = stem, 1
    while any((out_dir / f"{candidate}{ext}").exists() for ext in _SUFFIXES):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_reports(result: dict[str, Any], out_dir: str | Path, *, stem: str | None = None) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; returns their paths. A stem whose
    reports exist already gets a suffix (``-2``, ``-3``, ...): a report is never overwritten."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out_dir, stem or report_stem(result))
    paths = [out_dir / f"{stem}{ext}" for ext in _SUFFIXES]
    write_bytes_atomic(paths[0], (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    write_bytes_atomic(paths[1], markdown(result, png_name=paths[2].name, title=stem).encode())
    buf = io.BytesIO()
    render_plot(result).save(buf, format="PNG")
    write_bytes_atomic(paths[2], buf.getvalue())
    return paths


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Lines for a terminal: per contender and batch size, end-to-end p50/p90, speed-up, alone p50 and the
    interference flag; PSNR; UNet and overhead per step at the smallest batch."""
    spec = result["spec"]
    b0 = str(min(spec["batch_sizes"]))
    lines = [f"{spec['steps']} steps, {spec['width']}x{spec['height']}; p50/p90 interleaved, p50 alone, "
             f"speed-up vs {result['baseline'] or '-'}:"]
    for name, c in result["contenders"].items():
        q = c.get("quality") or {}
        psnr = "" if not q else "identical" if q["psnr_db"] is None else f"PSNR {q['psnr_db']:.1f} dB"
        st = c["batches"].get(b0, {}).get("stages_ms", {})
        unet, over = st.get("unet_ms_per_step"), st.get("overhead_ms_per_step")
        per_step = "" if unet is None else f"per step (batch {b0}): UNet {unet['p50']:.1f} ms, rest {over['p50']:.1f} ms"
        lines.append(f"  {name}  {'  '.join(x for x in (psnr, per_step) if x)}")
        for b in map(str, spec["batch_sizes"]):
            if b not in c["batches"]:
                continue
            f = c["batches"][b]
            sp = result["speedup_vs_baseline"].get(b, {}).get(name)
            alone, inter = f.get("alone_end_to_end_s"), f.get("interference")
            lines.append(f"    batch {b:>2}: p50 {f['end_to_end_s']['p50']:.3f} s  p90 {f['end_to_end_s']['p90']:.3f} s"
                         + (f"  {sp:.2f}x" if sp is not None else "")
                         + (f"  alone {alone['p50']:.3f} s" if alone else "")
                         + ("  DISTURBED (interleaved {:.0%} of alone)".format(inter["interleaved_over_alone"])
                            if inter and inter["flagged"] else ""))
    lines += [f"  not run: {name}: {why}" for name, why in result["skipped"].items()]
    lines += [f"  {name}: {why}" for name, why in result.get("failed", {}).items()]
    return lines


# -- Markdown ----------------------------------------------------------------------------------------------------
_EMPTY: dict[str, Any] = {  # a batch size a contender dropped out before
    "end_to_end_s": None, "images_per_s": None, "memory": {},
    "alone_end_to_end_s": None, "interference": None,
    "stages_ms": dict.fromkeys(("text_encoder_ms", "unet_eval_ms", "scheduler_step_ms", "step_ms", "host_step_ms",
                                "vae_decoder_ms", "unet_ms_per_step", "overhead_ms_per_step")),
}


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def _stat(s: dict | None, key: str = "p50", fmt: str = "{:.3g}") -> str:
    return "–" if s is None else fmt.format(s[key])


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _precision(p: dict | None) -> str:
    if not p:
        return "–"
    return p["default"] + (f" (VAE {p['vae']})" if p.get("vae") and p["vae"] != p["default"] else "")


def engine_label(c: dict[str, Any]) -> str:
    if c["kind"] == "diffusers":
        return f"diffusers {c['dtype']}" + (f" + torch.compile ({c['compile_mode']})" if c.get("compile") else "")
    prec = c["compute_dtype"] if c.get("compute_dtype") else _precision(c.get("precision"))
    return f"{c['backend']} {prec}" + (" + CUDA graph" if c.get("cuda_graph") else "")


def _environment_line(env: dict[str, Any]) -> str:
    v = env["versions"]
    dev = (f"{env['gpu']['name']} (driver {env['gpu']['driver']}, CUDA {env['cuda']})" if env.get("gpu")
           else f"CPU only: {env['cpu']}, {env['cpu_count']} cores")
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "diffusers", "onnxruntime", "onnxruntime-gpu", "tensorrt") if k in v)
    load = f"load average {env.get('load_average_start')} at start, {env.get('load_average_end')} at end"
    return f"{dev}; {libs}; torch threads {env['torch_threads']}; {load}."


def markdown(result: dict[str, Any], *, png_name: str | None = None, title: str | None = None) -> str:
    env, spec, ck = result["environment"], result["spec"], result["checkpoint"]
    cs = result["contenders"]
    b0 = str(min(spec["batch_sizes"]))
    base = result["baseline"]
    mem_kind = "GPU memory (PyTorch allocator)" if result["device"] == "cuda" else "resident set (process)"
    lines = [
        f"# sdtrt benchmark: {title or report_stem(result)}",
        "",
        _environment_line(env),
        "",
        f"Checkpoint: {ck.get('arch') or ck['path']} ({ck['family']}), weights {ck['weights']}, "
        f"export precision {_precision(ck.get('precision'))}. Request: {spec['width']}x{spec['height']}, {spec['steps']} steps of "
        f"{result['scheduler']}, guidance {spec['guidance']:g}, seed {spec['seed']}, prompt {spec['prompt']!r}. "
        f"{spec['runs']} runs per contender and batch size alone (back to back, after {spec['warmup']} warm-up(s)), "
        f"then {spec['runs']} interleaved. "
        f"sdtrt commit {env.get('sdtrt_commit')}.",
        "",
        *([anchor, ""] if (anchor := anchor_line(result)) else []),
        f"## End to end, batch {b0}",
        "",
        f"| contender | engine | p50 (s) | p90 (s) | std (s) | speed-up vs {base or '–'} | PSNR vs fp32 (dB) | "
        "max diff (levels) | load (s) | first image after load (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in cs.items():
        r = c["batches"].get(b0, _EMPTY)
        q = c.get("quality") or {}
        sp = result["speedup_vs_baseline"].get(b0, {}).get(name)
        psnr = "identical" if q and q.get("psnr_db") is None else _num(q.get("psnr_db"), "{:.1f}")
        lines.append(f"| {name} | {engine_label(c)} | {_stat(r['end_to_end_s'])} | {_stat(r['end_to_end_s'], 'p90')} | "
                     f"{_stat(r['end_to_end_s'], 'std', '{:.2g}')} | {_num(sp, '{:.2f}x')} | {psnr} | "
                     f"{_num(q.get('max_abs_diff'), '{}')} | {_num(c['load_s'])} | {_num(c['first_image_s'])} |")
    batches = [str(b) for b in spec["batch_sizes"]]
    limit = result.get("interference", {}).get("limit", 1.1)
    lines += [
        "",
        f"## Alone vs interleaved (end-to-end p50, s; flagged past {limit:.2f}x)",
        "",
        "| contender | batch | alone | interleaved | interleaved / alone | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, c in cs.items():
        for b in batches:
            r = c["batches"].get(b, _EMPTY)
            inter = r.get("interference")
            ratio = None if inter is None else inter["interleaved_over_alone"]
            flag = "**disturbed**" if inter and inter["flagged"] else ""
            lines.append(f"| {name} | {b} | {_stat(r.get('alone_end_to_end_s'))} | {_stat(r['end_to_end_s'])} | "
                         f"{_num(ratio, '{:.2f}x')} | {flag} |")
    lines += [
        "",
        f"## Per stage, batch {b0} (ms, p50 over runs)",
        "",
        "| contender | text encoder | UNet eval | scheduler step | step | host per step | VAE decode | UNet per step "
        "| rest per step (overhead) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in cs.items():
        st = c["batches"].get(b0, _EMPTY)["stages_ms"]
        lines.append(f"| {name} | " + " | ".join(_stat(st.get(k)) for k in (
            "text_encoder_ms", "unet_eval_ms", "scheduler_step_ms", "step_ms", "host_step_ms", "vae_decoder_ms",
            "unet_ms_per_step", "overhead_ms_per_step")) + " |")
    lines += [
        "",
        "## Throughput (images/s, p50; speed-up vs baseline in brackets)",
        "",
        "| contender | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name, c in cs.items():
        cells = []
        for b in batches:
            sp = result["speedup_vs_baseline"].get(b, {}).get(name)
            cells.append(_stat(c["batches"].get(b, _EMPTY)["images_per_s"]) + (f" ({sp:.2f}x)" if sp is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Memory ({mem_kind})",
        "",
        "| contender | added by loading | " + " | ".join(f"peak over pre-request, batch {b}" for b in batches) + " |",
        "|---|---:|" + "---:|" * len(batches),
    ]
    for name, c in cs.items():
        lines.append(f"| {name} | {_bytes(c.get('load_memory_bytes'))} | "
                     + " | ".join(_bytes(c["batches"].get(b, _EMPTY)["memory"].get("peak_delta_bytes")) for b in batches) + " |")
    if result["skipped"] or result.get("failed"):
        lines += ["", "## Not run, or dropped out", ""]
        lines += [f"- {k}: {v}" for k, v in {**result["skipped"], **result.get("failed", {})}.items()]
    lines += [
        "",
        "Definitions: *UNet eval* is one UNet call (both CFG halves); *scheduler step* is the time between two UNet "
        "calls (CFG combine, scheduler step, next input); *step* the start-to-start period of UNet calls (device time "
        "on CUDA, from CUDA events); *host per step* the same period on the host clock, i.e. the Python/launch "
        "overhead a CUDA graph removes (with a graph: the replay call's host time over the evaluations); *UNet per step* "
        "all UNet calls of a request over the steps; *rest per step* the request's wall time minus the text encoder, "
        "UNet and VAE calls, over the steps: what the runtime around the models costs. *Alone*: the contender's "
        "requests back to back; *interleaved*: one request per contender in turn (what speed-ups use). "
        "PSNR compares the first request's images with diffusers fp32"
        + (f" on {result['reference']['device']}" if result.get("reference") else " (not run)") + ".",
    ]
    if png_name:
        lines += ["", f"![latency and throughput]({png_name})"]
    return "\n".join(lines) + "\n"
