"""Full-size export record: time and peak memory of ``sdtrt export`` on a random-weight full-size checkpoint, then
of TensorRT-RTX's ahead-of-time build of each engine.

    .venv/bin/python benchmarks/fullsize_export.py                 # sd15, fp16, in /tmp; builds for sm89
    .venv/bin/python benchmarks/fullsize_export.py --arch sd21 --note after-fix --targets ""   # export only

The export runs in a child process (the library calls ``sdtrt export`` makes: ``load_checkpoint`` then
``export_checkpoint``); this process samples the child's resident memory from ``/proc`` every 50 ms and reads
the exporter's log records, which mark where each component starts (``tracing <name>.onnx``). The overall peak
is the kernel's (``ru_maxrss`` from ``wait4``), exact; per-component peaks are the largest samples inside each
component's window, so they can miss a spike shorter than the sampling period. Writes
``benchmarks/results/<device>-<date>-fullsize-<arch>[-note][-N].json`` and ``.md`` (never overwriting): one JSON
dict whose ``"export"`` section is this script's; other records of the same run (TensorRT builds) go in sections
beside it: ``"tensorrt_rtx_build"`` has, per component, the build's wall time and peak memory (``sdtrt build
--tensorrt rtx --target ...`` in its own process), the plan's size, the Softmax layers TensorRT matched to its fused
attention (MHA) pattern (from the sidecar), and the fused attention kernels embedded in the plan (their names, read
from the plan's bytes). An export change that breaks attention fusion shows up there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARK = "@@sdtrt "
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

# The child: load and export as `sdtrt export` does, with every sdtrt.export log record echoed as a timestamped
# marker line on stdout (the parent turns them into phases).
CHILD = r"""
import json, logging, sys, time
from pathlib import Path

class Mark(logging.Handler):
    def emit(self, record):
        print("@@sdtrt " + json.dumps({"t": time.time(), "msg": record.getMessage()}), flush=True)

log = logging.getLogger("sdtrt.export")
log.setLevel(logging.INFO)
log.addHandler(Mark())
from sdtrt.checkpoint.loader import load_checkpoint
from sdtrt.export.pipeline import export_checkpoint
from sdtrt.export.spec import ExportSpec

ckpt_dir, workdir, precision = sys.argv[1:4]
print("@@sdtrt " + json.dumps({"t": time.time(), "msg": "load checkpoint"}), flush=True)
ckpt = load_checkpoint(Path(ckpt_dir))
print("@@sdtrt " + json.dumps({"t": time.time(), "msg": "loaded"}), flush=True)
manifest = export_checkpoint(ckpt, Path(workdir), ExportSpec(precision=precision), progress=False, release=True)
del ckpt
import sdtrt
print("@@sdtrt " + json.dumps({"t": time.time(), "msg": "done", "manifest": manifest, "sdtrt": sdtrt.__file__}), flush=True)
"""


def _rss_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 once it is gone)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def _run_sampled(cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run ``cmd``, sampling its memory; returns wall time, exact peak, the (time, rss) samples and the markers."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    samples: list[tuple[float, int]] = []
    marks: list[dict] = []
    stderr: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            if line.startswith(MARK):
                marks.append(json.loads(line[len(MARK):]))

    def read_stderr() -> None:
        stderr.extend(proc.stderr)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in readers:
        t.start()
    while True:  # reaped with wait4 for the child's own exact peak (ru_maxrss, KiB on Linux)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        samples.append((time.time(), _rss_tree(proc.pid)))
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    return {"wall_s": time.time() - start, "rc": proc.returncode, "peak_bytes": usage.ru_maxrss * 1024,
            "samples": samples, "marks": marks, "stderr": "".join(stderr)[-4000:]}


def _phases(run: dict) -> list[dict]:
    """Split the run at the markers: 'load checkpoint', then one phase per component from its first log record
    ('tracing <name>.onnx') to the next component's, each with its steps (one per log record: tracing,
    converting, folding, checking, saving, validating)."""
    cuts: list[tuple[float, str, str]] = []  # (time, phase, step)
    for m in run["marks"]:
        msg = m["msg"]
        if msg == "load checkpoint":
            cuts.append((m["t"], "load_checkpoint", "load"))
        elif (hit := re.match(r"(\w+) (\w+?)(?:\.onnx)?\b", msg)) and hit.group(2) in COMPONENTS:
            cuts.append((m["t"], hit.group(2), hit.group(1)))
        elif msg == "done":
            cuts.append((m["t"], "exit", "exit"))
    end = run["samples"][-1][0] if run["samples"] else time.time()

    def peak(t0: float, t1: float) -> float:
        return round(max((rss for t, rss in run["samples"] if t0 <= t <= t1), default=0) / 1e9, 2)

    phases: list[dict] = []
    for i, (t0, name, step) in enumerate(cuts):
        if name == "exit":
            continue
        t1 = cuts[i + 1][0] if i + 1 < len(cuts) else end
        if not phases or phases[-1]["phase"] != name:
            phases.append({"phase": name, "t0": t0, "steps": []})
        phases[-1]["t1"] = t1
        phases[-1]["steps"].append({"step": step, "seconds": round(t1 - t0, 1), "peak_rss_gb_sampled": peak(t0, t1)})
    for p in phases:
        t0, t1 = p.pop("t0"), p.pop("t1")
        p["seconds"] = round(t1 - t0, 1)
        p["peak_rss_gb_sampled"] = peak(t0, t1)
    return phases


def _environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("sdtrt", "torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "diffusers", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "sdtrt/export", "sdtrt/checkpoint"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sdtrt_commit": commit + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "versions": versions,
        "load_average_start": list(os.getloadavg()),
    }


def _free_name(out: Path, stem: str) -> str:
    name, n = stem, 1
    while (out / f"{name}.json").exists() or (out / f"{name}.md").exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def _markdown(record: dict) -> str:
    e = record["export"]
    env = record["environment"]
    lines = [
        f"# Full-size export: {e['arch']} ({e['precision']}), random weights",
        "",
        f"{env['date']}, sdtrt {env['sdtrt_commit']}, {env['cpu_count']}-core {env['cpu']}, "
        f"{env['memory_bytes'] / 2**30:.0f} GiB RAM, no GPU. `sdtrt export` with validation (ONNX Runtime vs torch).",
        "",
        f"- **export wall time {e['wall_s']:.0f} s, peak resident memory {e['peak_rss_gb']:.2f} GB** "
        "(the kernel's high-water mark of the export process)",
        f"- ONNX written: {e['onnx_gb']:.2f} GB",
        "",
        "| phase | seconds | peak RSS in phase (GB, sampled) |",
        "| --- | ---: | ---: |",
    ]
    for p in e["phases"]:
        lines.append(f"| **{p['phase']}** | {p['seconds']:.1f} | {p['peak_rss_gb_sampled']:.2f} |")
        if len(p["steps"]) > 1:
            lines += [f"| &nbsp;&nbsp;{s['step']} | {s['seconds']:.1f} | {s['peak_rss_gb_sampled']:.2f} |" for s in p["steps"]]
    if e.get("validation"):
        lines += ["", "| component | output | worst error | tolerance |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {v['component']} | {v['output']} | {v['value']:.3g} ({v['metric']}) | {v['tolerance']:g} |"
                  for v in e["validation"]]
    text = "\n".join(lines) + "\n"
    if record.get("tensorrt_rtx_build"):
        text += _build_markdown(record["tensorrt_rtx_build"])
    if record.get("note"):
        text += "\n" + record["note"] + "\n"
    return text


# Fused attention kernels TensorRT(-RTX) embeds in a plan, by name (one per distinct kernel, not per layer)
MHA_KERNELS = re.compile(rb"_gemm_mha_v2_0x[0-9a-f]+|fused_multihead_(?:flash_)?attention_kernel\w*")


def _build(workdir: Path, targets: str, env: dict[str, str]) -> dict:
    """Build each exported component with TensorRT-RTX in its own process (time and peak memory each)."""
    sdtrt = str(Path(sys.executable).parent / "sdtrt")
    manifest = json.loads((workdir / "manifest.json").read_text())
    out: dict = {"targets": targets.split(","), "components": {}}
    for c in COMPONENTS:
        if c not in manifest["components"]:
            continue
        print(f"build {c} ({targets})", file=sys.stderr)
        run = _run_sampled([sdtrt, "build", str(workdir), "--tensorrt", "rtx", "--target", targets, "--components", c,
                            "-q"], env, workdir)
        if run["rc"] != 0:
            out["components"][c] = {"error": run["stderr"].strip().splitlines()[-1:], "wall_s": round(run["wall_s"], 1)}
            continue
        side = json.loads((workdir / "engines" / f"{c}.json").read_text())
        plan = (workdir / "engines" / f"{c}.plan").read_bytes()
        kernels = sorted({k.decode() for k in MHA_KERNELS.findall(plan)})
        out["tensorrt_rtx"] = side["tensorrt"]["version"]
        out["components"][c] = {
            "wall_s": round(run["wall_s"], 1),
            "builder_s": side["build_seconds"],
            "peak_rss_gb": round(run["peak_bytes"] / 1e9, 2),
            "plan_gb": round(len(plan) / 1e9, 3),
            "profile": side["profile"]["axes"],
            "attention": side.get("attention"),
            "mha_kernels_in_plan": kernels,
        }
        del plan
    return out


def _build_markdown(b: dict) -> str:
    lines = ["", f"## TensorRT-RTX {b.get('tensorrt_rtx', '?')} ahead-of-time build for {', '.join(b['targets'])} "
             "(no GPU)", "",
             "| component | build wall s | peak RSS GB | plan GB | Softmax layers | matched to fused MHA | MHA kernels in plan |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, r in b["components"].items():
        if "error" in r:
            lines.append(f"| {c} | failed: {' '.join(r['error'])} | | | | | |")
            continue
        a = r["attention"] or {}
        lines.append(f"| {c} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['plan_gb']:.3f} | "
                     f"{a.get('softmax_layers', '-')} | {a.get('mha_pattern', '-')} | {len(r['mha_kernels_in_plan'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sdtrt-fullsize"),
                    help="checkpoint and WORKDIR go here (the checkpoint is reused when present)")
    ap.add_argument("--note", default="", help="file-name suffix, e.g. 'before-fix'")
    ap.add_argument("--comment", default="", help="a sentence kept in the record")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the record goes (default benchmarks/results)")
    ap.add_argument("--keep", action="store_true", help="keep the WORKDIR afterwards")
    ap.add_argument("--targets", default="sm89", help="TensorRT-RTX build targets after the export ('' : no build)")
    args = ap.parse_args()

    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ckpt = args.scratch / f"{args.arch}-seed{args.seed}"
    workdir = args.scratch / f"{args.arch}-{args.precision}-wd"
    args.scratch.mkdir(parents=True, exist_ok=True)
    environment = _environment()
    if not (ckpt / "model_index.json").exists():
        print(f"init-random {args.arch} -> {ckpt}", file=sys.stderr)
        subprocess.run([str(Path(python).parent / "sdtrt"), "init-random", str(ckpt), "--arch", args.arch,
                        "--seed", str(args.seed), "--overwrite"], check=True)
    if workdir.exists():
        subprocess.run(["rm", "-rf", str(workdir)], check=True)

    print(f"export {ckpt} -> {workdir} ({args.precision})", file=sys.stderr)
    # Run outside the repository so that PYTHONPATH can point the child at another sdtrt tree (a baseline).
    run = _run_sampled([python, "-c", CHILD, str(ckpt), str(workdir), args.precision], env, args.scratch)
    if run["rc"] != 0:
        print(run["stderr"], file=sys.stderr)
        print(f"export failed (exit {run['rc']}) after {run['wall_s']:.0f} s, peak {run['peak_bytes'] / 1e9:.2f} GB",
              file=sys.stderr)
        return 1
    done = next((m for m in run["marks"] if m["msg"] == "done"), {})
    manifest = done.get("manifest", {})
    environment["sdtrt_path"] = done.get("sdtrt")
    validation = []
    for name, entry in manifest.get("components", {}).items():
        worst: dict[str, dict] = {}
        for per_shape in entry.get("validation") or []:
            for out, v in per_shape.items():
                if out not in worst or v["value"] > worst[out]["value"]:
                    worst[out] = v
        validation += [{"component": name, "output": o, "metric": v["metric"], "value": v["value"],
                        "tolerance": v["tolerance"]} for o, v in worst.items()]
    onnx_bytes = sum(f["bytes"] for e in manifest.get("components", {}).values() for f in e["files"])
    environment["load_average_end"] = list(os.getloadavg())
    record = {
        "format": "sdtrt-fullsize/1",
        "environment": environment,
        "note": args.comment,
        "export": {
            "arch": args.arch,
            "seed": args.seed,
            "precision": args.precision,
            "wall_s": round(run["wall_s"], 1),
            "peak_rss_gb": round(run["peak_bytes"] / 1e9, 2),
            "peak_rss_bytes": run["peak_bytes"],
            "onnx_gb": round(onnx_bytes / 1e9, 3),
            "phases": _phases(run),
            "validation": validation,
            "sampling": "VmRSS of the export process tree every 50 ms; peak_rss from wait4's ru_maxrss",
        },
    }
    if args.targets:
        record["tensorrt_rtx_build"] = _build(workdir, args.targets, env)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{os.cpu_count()}core-{dt.date.today().isoformat()}-fullsize-{args.arch}"
    stem = _free_name(args.out, stem + (f"-{args.note}" if args.note else ""))
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(record))
    print(_markdown(record))
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
