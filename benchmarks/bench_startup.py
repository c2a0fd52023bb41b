"""Benchmark: start-up of the ``loramix`` command against ``import torch``.

A user starts every command from a cold interpreter, so ``loramix --help``,
``loramix CMD --help`` and argument errors must not pay for torch,
transformers or pandas (issue 12, item 2). Measured as whole processes,
interleaved in one run (so a busy machine slows all of them alike), each
``--repeat`` times, median wall time:

* ``python -c "import torch"`` (the anchor);
* ``python -m loramix --help``;
* ``python -m loramix merge --help`` and ``python -m loramix similarity --help``;
* ``python -m loramix sum A --out O --weights 1,2`` (an argument error, exit 2);
* ``python -c "pass"`` (the interpreter alone, for reference).

Target: ``loramix --help`` (and every ``CMD --help``) <= 1/5 of ``import torch``.

    python benchmarks/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    py = sys.executable
    cmds = {
        'python -c "import torch"': [py, "-c", "import torch"],
        "loramix --help": [py, "-m", "loramix", "--help"],
        "loramix merge --help": [py, "-m", "loramix", "merge", "--help"],
        "loramix similarity --help": [py, "-m", "loramix", "similarity", "--help"],
        "loramix sum: bad --weights (exit 2)": [
            py,
            "-m",
            "loramix",
            "sum",
            "a",
            "--out",
            "o",
            "--weights",
            "1,2",
        ],
        'python -c "pass"': [py, "-c", "pass"],
    }
    expect_rc = {"loramix sum: bad --weights (exit 2)": 2}
    runs: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, float] = {}
    for _ in range(max(1, args.repeat)):
        for label, cmd in cmds.items():
            m = run_measured(cmd, cwd=HERE.parent)
            if m.returncode != expect_rc.get(label, 0):
                raise RuntimeError(f"{label}: exit {m.returncode}\n{m.stderr[-2000:]}")
            runs[label].append(m.wall_s)
            rss[label] = max(rss.get(label, 0.0), m.peak_rss_mb)
    med = {k: statistics.median(v) for k, v in runs.items()}
    torch_s = med['python -c "import torch"']
    print(f"\n### start-up: whole processes, median of {args.repeat} interleaved runs\n")
    print(
        markdown_table(
            ["process", "wall (s)", "min (s)", "peak RSS (MiB)", "/ import torch"],
            [
                [k, f"{med[k]:.3f}", f"{min(runs[k]):.3f}", f"{rss[k]:.0f}", f"{med[k] / torch_s:.3f}"]
                for k in cmds
            ],
        )
    )
    worst = max(med[k] for k in cmds if k.startswith("loramix"))
    print(
        f"\n- loramix --help: {torch_s / med['loramix --help']:.1f}x faster than import torch; slowest "
        f"loramix row {worst / torch_s:.3f} of it (target <= 0.2: {'met' if worst <= 0.2 * torch_s else 'NOT met'})"
    )
    print(f"- {machine_line()}")


if __name__ == "__main__":
    main()
