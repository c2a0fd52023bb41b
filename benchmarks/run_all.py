"""Run every benchmark, one after another, and write ``reports/benchmarks.md``.

Each benchmark is its own script (see its docstring for what it compares and
its targets); this runner only runs them serially on a quiet machine, so no
two compete for the cores, and collects their markdown output under a
heading with the date and the machine. The GPU figures, measured on a lent
machine, live in ``reports/benchmarks-gpu.md`` and are linked, not rerun.

    python benchmarks/run_all.py [--only sum merge ...] [--out reports/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, arguments, issue)
BENCHMARKS = {
    "similarity": ("bench_similarity.py", [], 2),
    "sum": ("bench_sum.py", [], 3),
    "merge": ("bench_merge.py", [], 6),
    "train": ("bench_train.py", [], 4),
    "eval": ("bench_eval.py", [], 4),
    "basebuild": ("bench_basebuild.py", [], 4),
    "startup": ("bench_startup.py", [], 12),
    "bank": ("bench_bank.py", [], 12),
}


def machine() -> str:
    from loramix.environment import cpu_name

    cpu = cpu_name()
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        mem = "?"
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem} RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks.md"))
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    started = dt.datetime.now(dt.timezone.utc)
    sections = []
    for name in names:
        script, extra, issue = BENCHMARKS[name]
        print(f"== {name}: {script} {' '.join(extra)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *extra], cwd=ROOT, capture_output=True, text=True
        )
        took = time.perf_counter() - t0
        body = proc.stdout.strip() or "(no output)"
        if proc.returncode != 0:
            body += f"\n\n**failed with exit code {proc.returncode}**:\n\n```\n{proc.stderr[-3000:]}\n```"
        sections.append(
            f"## {name} (issue {issue}): `python benchmarks/{script}`\n\nRan {took:.0f} s.\n\n{body}\n"
        )
        print(body, file=sys.stderr)
    header = (
        "# loramix benchmarks\n\n"
        f"Run {started:%Y-%m-%d %H:%M} UTC by `python benchmarks/run_all.py`, serially, on a quiet "
        f"machine: {machine()}.\n\n"
        "Each benchmark compares loramix with the obvious alternative in the same run and prints the "
        "ratio; the targets are the issues'. GPU figures: [benchmarks-gpu.md](benchmarks-gpu.md).\n\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(header + "\n".join(sections))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
