"""Benchmark: the main job (the built-in quickstart study) from an empty cache.

What a user runs right after installing, as whole processes, each from a new
empty study cache, so every base, adapter, merge and evaluation is made:

* ``loramix scenario run scenarios/quickstart.toml --jobs 1`` (serial: the
  anchor, the default before workers per core);
* ``loramix scenario run scenarios/quickstart.toml`` (the default: on the CPU
  one worker process per usable core, at most 4, one torch thread each).

Both write the same numbers (``results.csv`` and ``evaluations.csv`` are
compared byte for byte); the ratio is the default's speed-up on this machine.
With ``--repeat N`` the runs alternate, so a busy machine slows both alike.

    python benchmarks/bench_scenario.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    root = HERE.parent
    env = {k: v for k, v in os.environ.items() if k != "LORAMIX_JOBS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    modes = {"--jobs 1 (serial)": ["--jobs", "1"], "default": []}
    runs: dict[str, list] = {k: [] for k in modes}
    outputs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="lmx-bench-scenario-") as tmp:
        for i in range(max(1, args.repeat)):
            for label, extra in modes.items():
                work = Path(tmp) / f"{i}-{len(runs[label])}-{label.split()[0].strip('-')}"
                cmd = [sys.executable, "-m", "loramix", "scenario", "run", "scenarios/quickstart.toml",
                       "--out", str(work / "report"), "--quiet", *extra]  # fmt: skip
                m = run_measured(cmd, env={**env, "LORAMIX_CACHE": str(work / "cache")}, cwd=root).check()
                runs[label].append(m)
                outputs[label] = work / "report"
        same = all(
            (outputs["default"] / f).read_bytes() == (outputs["--jobs 1 (serial)"] / f).read_bytes()
            for f in ("results.csv", "evaluations.csv")
        )
        executor = next(
            (ln for ln in (outputs["default"] / "report.md").read_text().splitlines() if "Executor:" in ln),
            "",
        )
    med = {k: statistics.median(m.wall_s for m in v) for k, v in runs.items()}
    cpu = {k: statistics.median(m.cpu_s for m in v) for k, v in runs.items()}
    rss = {k: max(m.peak_rss_mb for m in v) for k, v in runs.items()}
    anchor = med["--jobs 1 (serial)"]
    print(f"\n### the quickstart study from an empty cache: whole processes, median of {args.repeat}\n")
    print(f"{machine_line()}\n")
    print(
        markdown_table(
            [
                "run",
                "wall (s)",
                "CPU (s), all processes",
                "largest process RSS (MiB)",
                "speed-up over --jobs 1",
            ],
            [
                [k, f"{med[k]:.1f}", f"{cpu[k]:.1f}", f"{rss[k]:.0f}", f"{anchor / med[k]:.2f}x"]
                for k in modes
            ],
        )
    )
    print(f"\n- default run: {executor.strip('- ').strip() or 'executor not reported'}")
    print(f"- results.csv and evaluations.csv byte-identical to the serial run's: {'yes' if same else 'NO'}")
    print("- CPU: the run's and its reaped workers' user + system time; RSS: the largest single process")


if __name__ == "__main__":
    main()
