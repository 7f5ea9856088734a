"""Mutation testing of the core modules with mutmut (``make mutation``; not part of CI or ``make test``).

Each group mutates one set of modules and runs only the tests written for them, in a scratch copy of the tree
(mutmut writes a ``mutants/`` folder and reads its settings from ``setup.cfg``; neither belongs in the repository).
The score is killed / (killed + survived + timeouts + suspicious): mutants no test reaches count against it too,
as "no tests". Results go to ``benchmarks/results/mutation-<date>.md``, with each group's survivors listed so
they can be read, judged equivalent or not, and killed by a test.

    python benchmarks/mutation.py                       # the default groups
    python benchmarks/mutation.py img2img batcher       # some groups
    python benchmarks/mutation.py --list
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]  # files mutated, relative to the repository root
    tests: tuple[str, ...]  # pytest arguments that select this group's tests
    default: bool = True  # run without naming it (the slow groups are opt-in)


GROUPS = (
    Group("img2img", ("sdtrt/runtime/img2img.py",), ("tests/runtime/test_pipeline_img2img.py",)),
    Group("batcher", ("sdtrt/serve/batcher.py",), ("tests/serve/test_batcher.py",)),
    Group("request", ("sdtrt/runtime/request.py",), ("tests/runtime/test_pipeline_request.py", "tests/serve/test_batcher.py")),
    # one scheduler's parity cases, and the registry's tests (configs refused, with their messages)
    Group("dpmpp_2m", ("sdtrt/runtime/schedulers/dpmpp_2m.py",),
          ("tests/runtime/schedulers", "-k", "dpmpp_2m or test_scheduler_registry")),
    Group("ddim", ("sdtrt/runtime/schedulers/ddim.py",),
          ("tests/runtime/schedulers", "-k", "ddim or test_scheduler_registry")),
    # every scheduler module against every parity case: hours on 2 cores
    Group("schedulers", ("sdtrt/runtime/schedulers/*.py",), ("tests/runtime/schedulers",), default=False),
)


def _setup_cfg(group: Group) -> str:
    def lines(values) -> str:
        return "".join(f"\n    {v}" for v in values)

    return (
        "[mutmut]\n"
        "source_paths = sdtrt/\n"
        f"only_mutate ={lines(group.modules)}\n"
        f"pytest_add_cli_args_test_selection ={lines(group.tests)}\n"
        f"pytest_add_cli_args ={lines(('-p', 'no:cacheprovider', '-q'))}\n"
        "use_git_change_detection = false\n"
    )


def run_group(group: Group, scratch: Path, max_children: int) -> dict:
    """Copy the tree to ``scratch/<group>``, run mutmut there, return its counts and survivors."""
    work = scratch / group.name
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")
    for part in ("sdtrt", "tests"):
        shutil.copytree(ROOT / part, work / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "setup.cfg").write_text(_setup_cfg(group))
    mutmut = [str(Path(sys.executable).with_name("mutmut"))]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    run = subprocess.run([*mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (work / "mutmut-run.log").write_text(run.stdout + run.stderr)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, capture_output=True, text=True, check=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run([*mutmut, "results"], cwd=work, env=env, capture_output=True, text=True).stdout
    survivors = [line.strip().split(":")[0] for line in results.splitlines() if line.strip().endswith(": survived")]
    not_killed = sum(stats.get(k, 0) for k in ("survived", "timeout", "suspicious", "no_tests"))
    score = stats["killed"] / (stats["killed"] + not_killed) if stats["killed"] + not_killed else None
    return {"group": group.name, "modules": list(group.modules), "tests": " ".join(group.tests), "stats": stats,
            "score": score, "survivors": survivors, "seconds": round(seconds), "exit_code": run.returncode}


def write_report(results: list[dict], path: Path) -> None:
    lines = [
        f"# Mutation testing, {dt.date.today().isoformat()}",
        "",
        f"mutmut {_mutmut_version()}, `make mutation` (benchmarks/mutation.py); {os.cpu_count()} CPU cores. Score: "
        "killed / (killed + survived + timeout + suspicious + no tests). Survivors are listed for review: each is "
        "a missing test or an equivalent mutant.",
        "",
        "| group | modules | tests | mutants | killed | survived | timeout | no tests | score | time (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["stats"]
        score = "–" if r["score"] is None else f"{100 * r['score']:.1f}%"
        lines.append(f"| {r['group']} | {', '.join(r['modules'])} | `{r['tests']}` | {s.get('total', 0)} | "
                     f"{s.get('killed', 0)} | {s.get('survived', 0)} | {s.get('timeout', 0)} | {s.get('no_tests', 0)} | "
                     f"{score} | {r['seconds']} |")
    killed = sum(r["stats"].get("killed", 0) for r in results)
    counted = sum(r["stats"].get(k, 0) for r in results for k in ("killed", "survived", "timeout", "suspicious", "no_tests"))
    if counted:
        lines += ["", f"Overall: {killed} of {counted} mutants killed ({100 * killed / counted:.1f}%)."]
    for r in results:
        if r["survivors"]:
            lines += ["", f"## Survivors: {r['group']}", "", *[f"- `{name}`" for name in r["survivors"]]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help="groups to run (default: every default group)")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sdtrt-mutation")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / f"mutation-{dt.date.today().isoformat()}.md")
    args = parser.parse_args(argv)
    by_name = {g.name: g for g in GROUPS}
    if args.list:
        for g in GROUPS:
            print(f"{g.name:12} {'default' if g.default else 'opt-in ':8} {' '.join(g.modules)}  <-  {' '.join(g.tests)}")
        return 0
    unknown = [n for n in args.groups if n not in by_name]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; see --list")
    groups = [by_name[n] for n in args.groups] if args.groups else [g for g in GROUPS if g.default]
    results = []
    for g in groups:
        print(f"mutation: {g.name} ...", flush=True)
        r = run_group(g, args.scratch, args.max_children)
        score = "–" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"mutation: {g.name}: {r['stats'].get('killed', 0)}/{r['stats'].get('total', 0)} killed, score {score}, "
              f"{r['seconds']} s", flush=True)
        results.append(r)
    write_report(results, args.out)
    print(f"mutation: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
