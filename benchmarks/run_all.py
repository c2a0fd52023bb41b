"""Run every benchmark, one after another, and write ``reports/benchmarks.md``.

Each benchmark is its own script (see its docstring for what it compares and
its targets); this runner only runs them serially on a quiet machine, so no
two compete for the cores, and collects their markdown output under a
heading with the date and the machine. The GPU figures, measured on a lent
machine, live in ``reports/benchmarks-gpu.md`` and are linked, not rerun.
A rerun (``--only``) keeps the other benchmarks' latest sections and the
hand-written notes under ``## Notes on the runs`` (which machine ran which
sections, what changed between reruns: add a bullet there after a rerun).

    python benchmarks/run_all.py [--only sum merge ...] [--out reports/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, arguments, issue)
BENCHMARKS = {
    "similarity": ("bench_similarity.py", [], 2),
    "sum": ("bench_sum.py", ["--repeat", "5"], 3),
    "merge": ("bench_merge.py", [], 6),
    "train": ("bench_train.py", [], 4),
    "eval": ("bench_eval.py", [], 4),
    "basebuild": ("bench_basebuild.py", [], 4),
    "startup": ("bench_startup.py", [], 12),
    "scenario": ("bench_scenario.py", [], 12),
    "bank": ("bench_bank.py", [], 12),
    "plan": ("bench_plan.py", [], 12),
    "scale": ("bench_scale.py", ["--repeat", "2"], 12),
    "ties-parts": ("bench_ties_parts.py", [], 12),
    "gguf": ("bench_gguf.py", ["--repeat", "1"], 14),
    "train-smol": (
        "bench_train.py",
        ["--smol", "--batch", "8", "--seq", "128", "--steps", "2", "--warmup", "1"],
        14,
    ),
    "calibration": ("bench_calibration.py", [], 12),
    "tuners": ("bench_tuners.py", [], 13),
    "batching": ("bench_batching.py", [], 12),
    "eval-smol": (
        "bench_eval.py",
        ["--smol", "--records", "48", "--batch", "16", "--max-len", "256", "--repeat", "1"],
        14,
    ),
}


#: the heading of the hand-written notes on the runs (which machine ran which sections, what
#: changed between reruns), kept as they are by every run and added to by hand
NOTES = "## Notes on the runs"


def _old_notes(path: Path) -> str:
    """The notes section of an earlier report (from :data:`NOTES` to the first
    benchmark's section), or ''."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(f"\n{NOTES}\n")
    if at < 0:
        return ""
    notes = re.split(r"\n(?=## [\w-]+ \(issue \d+\))", text[at + 1 :])[0]
    return notes.rstrip() + "\n\n"


def _old_sections(path: Path) -> dict[str, str]:
    """The sections of an earlier report, by benchmark name, so that a run of
    ``--only`` some benchmarks keeps the others' latest figures (each section
    carries its own date and load)."""
    if not path.exists():
        return {}
    text = path.read_text()
    # a section starts at "## NAME (issue N)"; a benchmark's own "## ..." lines stay inside it
    parts = re.split(r"\n(?=## [\w-]+ \(issue \d+\))", text)[1:]
    return {p[3:].split(" ", 1)[0]: p.rstrip() + "\n" for p in parts}


def cpu_detail() -> str:
    """What tells CPUs with the same model name apart (an "AMD EPYC" is a Zen 3 or a Zen 5):
    ``family F model M``, and whether it has AVX-512 and bf16 arithmetic, which set both
    the speed and the float rounding of torch's kernels."""
    facts, flags = {}, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in facts:
                facts[key] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return "CPU details unknown"
    has = [name for name, flag in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16"))
           if flag in flags]  # fmt: skip
    return f"family {facts.get('cpu family', '?')} model {facts.get('model', '?')}, " + (
        ", ".join(has) if has else "no AVX-512"
    )


def machine() -> str:
    from loramix.environment import cpu_name

    cpu = f"{cpu_name()} ({cpu_detail()})"
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
    out = Path(args.out)
    sections, notes = _old_sections(out), _old_notes(out)
    for name in names:
        script, extra, issue = BENCHMARKS[name]
        print(f"== {name}: {script} {' '.join(extra)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        when = dt.datetime.now(dt.timezone.utc)
        load = os.getloadavg()[0]
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *extra], cwd=ROOT, capture_output=True, text=True
        )
        took = time.perf_counter() - t0
        body = proc.stdout.strip() or "(no output)"
        if proc.returncode != 0:
            body += f"\n\n**failed with exit code {proc.returncode}**:\n\n```\n{proc.stderr[-3000:]}\n```"
        cmd = " ".join([f"benchmarks/{script}", *extra])
        sections[name] = (
            f"## {name} (issue {issue}): `python {cmd}`\n\n"
            f"Ran {when:%Y-%m-%d %H:%M} UTC for {took:.0f} s on {cpu_detail()}, load average {load:.1f} "
            f"at start.\n\n{body}\n"
        )
        print(body, file=sys.stderr)
    header = (
        "# loramix benchmarks\n\n"
        f"Written {started:%Y-%m-%d %H:%M} UTC by `python benchmarks/run_all.py` (serially; "
        f"`--only NAME...` reruns some and keeps the others' latest sections) on {machine()}. "
        "Each section gives its date and the load average when it started: on a busy machine the "
        "absolute times grow, the ratios (both sides measured in the same run) much less.\n\n"
        "Each benchmark compares loramix with the obvious alternative in the same run and prints the "
        "ratio; the targets are the issues'. GPU figures: [benchmarks-gpu.md](benchmarks-gpu.md)."
        + (" The notes below say which machine ran which sections and what changed between reruns.\n\n" + notes
           if notes else "\n\n")
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    order = [n for n in BENCHMARKS if n in sections] + [n for n in sections if n not in BENCHMARKS]
    tmp.write_text(header + "\n".join(sections[n] for n in order))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
