"""The README's CPU table from `run_cpu.sh`'s reports: one row per model size and contender.

    python benchmarks/sizes_table.py benchmarks/results/cpu-2core-2026-12-01-{tiny-sd1,small-sd1,sd15}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    spec, env = r["spec"], r["environment"]
    b = str(min(spec["batch_sizes"]))
    size = f"{r['checkpoint'].get('arch')}, {spec['width']}x{spec['height']}, {spec['steps']} steps"
    out = []
    for name, c in r["contenders"].items():
        f = c["batches"][b]
        st = f["stages_ms"]
        sp = r["speedup_vs_baseline"].get(b, {}).get(name)
        p50 = lambda s: "–" if s is None else f"{s['p50']:.3g}" if s["p50"] < 1000 else f"{s['p50']:,.0f}"  # noqa: E731
        out.append(f"| {size} | {name} | {f['end_to_end_s']['p50']:.3g} s | "
                   + ("–" if sp is None else f"{sp:.2f}×") + f" | {p50(st['unet_ms_per_step'])} | "
                   f"{p50(st['overhead_ms_per_step'])} | " + " / ".join(
                       f"{x['interference']['interleaved_over_alone']:.2f}" + (" ⚑" if x["interference"]["flagged"] else "")
                       for x in c["batches"].values()) + f" | {env['load_average_start'][0]:.1f}–"
                   f"{env['load_average_end'][0]:.1f} |")
        size = ""
    return out


def main() -> None:
    print("| model, request (batch 1) | contender | p50 end to end | vs diffusers | UNet ms/step | rest ms/step "
          "(overhead) | interleaved / alone, each batch size (⚑ > 1.10) | load (1 min) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in sys.argv[1:]:
        print("\n".join(rows(Path(p))))


if __name__ == "__main__":
    main()
