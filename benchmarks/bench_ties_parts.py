"""Where a TIES merge spends its time, part by part, on one 7B-sized module.

``merge -m ties`` on the 7B-shaped base (``bench_scale.py``) costs several
times a ``sum``. This times its three parts in-process, on one Llama-2-7B MLP
module (``out x in`` = 11008 x 4096, 45M entries) with ``--adapters`` rank-16
LoRA deltas, under the streaming run's threads (``engine.cpu_threads``), as
the engine runs them:

- ``products``: the dense deltas ``w_i B_i A_i`` (``methods.base.dense_deltas``);
- ``thresholds``: each delta's exact ``k``-th largest magnitude, ``k =
  int(density * numel)`` (``_abs_kth_largest_by_rows``: a sampled bracket,
  one blocked pass counting and collecting);
- ``election``: trim (``hardshrink``), sign election and disjoint mean, by
  blocks of rows (``trim_and_elect`` after the thresholds).

That is the dense way (what a D2-LoRA delta takes). LoRA deltas take it
from their factors (``ties_from_factors``): no delta formed whole, each block
of rows formed twice (once to count for the thresholds, once to trim and
elect) while it is in the cache; its two passes are timed the same way, and
its result is checked to be the dense way's bits.

Each is given in ms and in ns of CPU per entry of the module (wall x
threads / entries): the figure to set against the ~0.3 ns that one
elementwise pass over a float32 block costs here, to count passes. The
median of ``--repeat`` runs after one warm-up.

    python benchmarks/bench_ties_parts.py [--adapters 3] [--density 0.2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line  # noqa: E402


def main(argv=None) -> None:
    from loramix import engine
    from loramix.adapter import ModuleDelta
    from loramix.methods import base as mb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    out_f, in_f, n = 11008, 4096, args.adapters
    g = torch.Generator().manual_seed(0)
    mods = [
        ModuleDelta(name="mlp", B=torch.randn(out_f, args.rank, generator=g) * 0.01,
                    A=torch.randn(args.rank, in_f, generator=g) / in_f**0.5, scale=2.0, alpha=2.0 * args.rank)
        for _ in range(n)
    ]  # fmt: skip
    weights = [1.0] * n
    scratch = engine.Buffers()
    ctx = mb.ModuleContext("mlp", tuple(range(n)), scratch=scratch)

    class Run:  # what engine.cpu_threads needs of an executor
        device, helpers = "cpu", None

    parts: dict[str, list[float]] = {k: [] for k in ROWS}
    with engine.cpu_threads(Run()):
        threads = engine.run_threads()
        for i in range(args.repeat + 1):
            t = [time.perf_counter()]
            xs = mb.dense_deltas(ctx, mods, None, weights)
            t.append(time.perf_counter())
            k = int(args.density * xs[0].numel())
            if any(mb._abs_kth_largest_by_rows(x, k, scratch) is None for x in xs):
                raise SystemExit("a sampled bracket missed its threshold: rerun")
            t.append(time.perf_counter())
            # trim_and_elect finds the thresholds again: the election is its time less theirs
            xs = mb.dense_deltas(ctx, mods, None, weights)
            t.append(time.perf_counter())
            dense = mb.trim_and_elect(xs, weights, args.density, "mass", "count", scratch).clone()
            t.append(time.perf_counter())
            srcs = [mb._FactorRows(*m.factors(torch.float32), scratch, f"r{j}") for j, m in enumerate(mods)]
            if any(mb._abs_kth_largest_by_rows(s, k, scratch) is None for s in srcs):
                raise SystemExit("a sampled bracket missed its threshold: rerun")
            t.append(time.perf_counter())
            fact = mb.ties_from_factors(ctx, mods, weights, args.density, "mass", "count")
            t.append(time.perf_counter())
            if not torch.equal(fact, dense):
                raise SystemExit("the two ways differ")
            if i:
                d = [b - a for a, b in zip(t, t[1:])]
                parts["dense: products"].append(d[0])
                parts["dense: thresholds"].append(d[1])
                parts["dense: election"].append(d[3] - d[1])
                parts["dense: all"].append(d[0] + d[3])
                parts["from the factors: thresholds"].append(d[4])
                parts["from the factors: election"].append(d[5] - d[4])
                parts["from the factors: all"].append(d[5])
    entries = out_f * in_f
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(f"### TIES, one {out_f} x {in_f} module, {n} rank-{args.rank} deltas, density {args.density}, "
          f"{threads} threads, median of {args.repeat}\n")  # fmt: skip
    print("| way: part | ms | ns CPU per entry |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.0f} | {v * threads / entries * 1e9:.1f} |")
    ratio = med["dense: all"] / med["from the factors: all"]
    print(f"\n- from the factors: {ratio:.2f}x the dense way's speed, the same bits (checked every run)")
    print(f"- {machine_line()}")


ROWS = ("dense: products", "dense: thresholds", "dense: election", "dense: all",
        "from the factors: thresholds", "from the factors: election", "from the factors: all")  # fmt: skip


if __name__ == "__main__":
    main()
