"""Benchmark: similarity of a bank of 1,000 adapters on the CPU, in bounded memory.

The bank (generated once into ``benchmarks/_work/bank/``, git-ignored, about
4.7 GB): GPT-2-small-shaped PEFT LoRA folders of rank 8 on the 48 projections
(``bench_similarity.write_adapters``: factors mixing three shared "topics"
with noise, so the similarities spread). One whole process,
``python -m loramix similarity BANK/* --format csv``: every adapter's
header and config are checked first, then one module at a time the factors
of all adapters are read, stacked and compared (numpy float64, the Gram
strips of ``loramix.overlap``), so memory holds one module's factors
(``N r (out + in)`` doubles: 245 MB for 1,000 adapters on ``mlp.c_fc``), never
the bank. The arithmetic is ``N^2 r^2 (out + in) / 2`` multiply-adds per
module, about 6e12 for the bank: minutes on 2 cores.

Checked in the same run: the matrix is symmetric with a unit diagonal, and
its first ``--n-check`` x ``--n-check`` block equals a separate run on those
adapters alone.

Target (issue 12, item 4): peak memory under 2 GiB; the time is reported.

    python benchmarks/bench_bank.py [--n 1000] [--n-check 10] [--device cuda]

On a GPU (``--device cuda``, torch's Gram products there) the target is under 10 s.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402

WORK = HERE / "_work" / "bank"


def child_generate(work: str, n: str) -> None:
    from bench_similarity import write_adapters

    write_adapters(Path(work), int(n), seed=0)


def bank(work: Path, n: int) -> list[Path]:
    """The ``n`` adapter folders, generated once (a marker records the count)."""
    done = work / f".done-{n}"
    if not done.exists():
        run_measured([sys.executable, __file__, "--child", str(work), str(n)]).check()
        done.touch()
    return [work / f"a{a:03d}" for a in range(n)]


def _matrix(csv: str):
    import pandas as pd

    return pd.read_csv(io.StringIO(csv), index_col=0).to_numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-check", type=int, default=10)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--device", default="cpu", help="where the Gram products run (cpu, cuda)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_generate(*args.child)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in bank(args.work, args.n)]
    size = sum(f.stat().st_size for p in paths for f in Path(p).iterdir()) / 2**30
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "loramix", "similarity", "--format", "csv", "--device", args.device]
    full = run_measured([*cmd, *paths], env=env, cwd=HERE.parent).check()
    small = run_measured([*cmd, *paths[: args.n_check]], env=env, cwd=HERE.parent).check()
    import numpy as np  # only now: a child's peak RSS starts from this parent's size

    M, S = _matrix(full.stdout), _matrix(small.stdout)
    k = args.n_check
    sym = float(np.abs(M - M.T).max())
    diag = float(np.abs(np.diag(M) - 1.0).max())
    block = float(np.abs(M[:k, :k] - S).max())
    pairs = args.n * (args.n - 1) // 2
    print(
        f"\n### similarity of a bank of {args.n} GPT-2-small rank-8 adapters ({size:.1f} GiB on disk), "
        f"{args.device}, one whole process\n"
    )
    print(
        markdown_table(
            ["process", "wall (s)", "CPU (s)", "peak RSS (MiB)", "pairs / s"],
            [
                [
                    f"`loramix similarity` x {args.n}",
                    f"{full.wall_s:.1f}",
                    f"{full.cpu_s:.1f}",
                    f"{full.peak_rss_mb:.0f}",
                    f"{pairs / full.wall_s:.0f}",
                ],
                [
                    f"`loramix similarity` x {k} (check)",
                    f"{small.wall_s:.2f}",
                    f"{small.cpu_s:.2f}",
                    f"{small.peak_rss_mb:.0f}",
                    f"{k * (k - 1) // 2 / small.wall_s:.0f}",
                ],
            ],
        )
    )
    ok = full.peak_rss_mb < 2048
    print(f"\n- peak memory {full.peak_rss_mb / 1024:.2f} GiB (target < 2 GiB: {'met' if ok else 'NOT met'})")
    print(
        f"- max |M - M^T| = {sym:.1e}, max |diag - 1| = {diag:.1e}, "
        f"first {k}x{k} block vs a run on those alone: {block:.1e}"
    )
    print(f"- {machine_line()}")


if __name__ == "__main__":
    main()
