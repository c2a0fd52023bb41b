"""Where a TIES merge spends its time, way by way, on one 7B-sized module.

``merge -m ties`` on the 7B-shaped base (``bench_scale.py``) costs several
times a ``sum``. This times the ways it can run on one Llama-2-7B MLP module
(``out x in`` = 11008 x 4096, 45M entries) with ``--adapters`` rank-16 LoRA
deltas, under the streaming run's threads (``engine.cpu_threads``), as the
engine runs them (``methods.base``):

- ``eager, two passes``: ``LORAMIX_NATIVE=0`` (no C kernels): one pass over
  blocks of rows ``B[r0:r1] @ A`` finds each delta's exact threshold (a
  sampled bracket, a count), a second forms the blocks again and trims and
  elects them, each step a torch/numpy operation;
- ``kernels, two passes``: the same with the fused C kernels
  (``loramix/native/ties.c``);
- ``kernels, one pass``: what a merge runs: each block formed and read once
  (counted, elected at the estimated threshold, positions near it
  recorded), then the few recorded entries that the exact trims cut another
  way elected again; the blocks formed by the kernels themselves, a few rows
  at a time (where that gives ``torch.mm``'s bits here: ``Ties.forms_like_mm``);
- ``kernels, one pass, blocks by torch.mm``: the same with each block formed
  whole by ``torch.mm`` first (what it did before, and still does where the
  check fails);
- ``dense deltas``: the deltas formed whole first (what a D2-LoRA delta
  takes), then the one pass on them;
- on a CPU with AVX-512, ``one pass`` again with the kernels' AVX2 form
  (what a CPU without AVX-512 runs, e.g. a Zen 3) and with their portable
  loops (what the AVX2 form replaced there), so one machine shows what each
  form is worth.

Every way's result is checked to be the eager way's bits. Each is given in
ms and in ns of CPU per entry of the module (wall x threads / entries), the
median of ``--repeat`` runs after one warm-up.

    python benchmarks/bench_ties_parts.py [--adapters 3] [--density 0.2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_line  # noqa: E402


def main(argv=None) -> None:
    from loramix import engine, native
    from loramix.adapter import ModuleDelta
    from loramix.methods import base as mb
    from loramix.native import ties

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

    lib = native.library("ties")
    forms = {}  # row -> the kernels' form it forces
    if lib is not None and ties.has_avx2(lib) and lib.loramix_has_avx512():
        forms = {"kernels, AVX2 form, one pass": "avx2", "kernels, portable loops, one pass": "generic"}
    # one object per form, as ties.kernels() keeps one: each remembers where its form gives torch.mm's bits
    made = {way: ties.Ties(lib, form=f) for way, f in forms.items()}
    rows = (*ROWS, *forms)
    parts: dict[str, list[float]] = {k: [] for k in rows}
    how = (args.density, "mass", "count")
    share = mb.ONE_PASS_MAX_SHARE
    if mb._fused(torch.empty(1)) is None:
        raise SystemExit("the native kernels are not built here (no C compiler?): nothing to compare")

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32)

    dispatched, formable = ties.kernels, mb._formable
    with engine.cpu_threads(Run()):
        threads = engine.run_threads()
        for i in range(args.repeat + 1):
            times, results = {}, {}
            for way in rows:
                os.environ["LORAMIX_NATIVE"] = "0" if way.startswith("eager") else "1"
                mb.ONE_PASS_MAX_SHARE = -1.0 if "two passes" in way else share
                ties.kernels = (lambda f=made[way]: f) if way in forms else dispatched
                mb._formable = (lambda srcs: (None, None)) if "torch.mm" in way else formable
                t = time.perf_counter()
                if way.startswith("dense"):
                    out = mb.trim_and_elect(mb.dense_deltas(ctx, mods, None, weights), weights, *how, scratch)
                else:
                    out = mb.ties_from_factors(ctx, mods, weights, *how)
                times[way], results[way] = time.perf_counter() - t, bits(out).clone()
            os.environ.pop("LORAMIX_NATIVE", None)
            mb.ONE_PASS_MAX_SHARE, ties.kernels, mb._formable = share, dispatched, formable
            if any(not torch.equal(r, results[ROWS[0]]) for r in results.values()):
                raise SystemExit("the ways differ")
            if i:
                for way, dt in times.items():
                    parts[way].append(dt)
    entries = out_f * in_f
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(f"### TIES, one {out_f} x {in_f} module, {n} rank-{args.rank} deltas, density {args.density}, "
          f"{threads} threads, median of {args.repeat}\n")  # fmt: skip
    print("| way | ms | ns CPU per entry | speed-up over eager |\n|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.0f} | {v * threads / entries * 1e9:.1f} | {med[ROWS[0]] / v:.2f}x |")
    print("\n- every way gives the eager way's bits (checked every run)")
    print(f"- {machine_line()}")


ROWS = ("eager (LORAMIX_NATIVE=0), two passes", "kernels, two passes", "kernels, one pass",
        "kernels, one pass, blocks by torch.mm", "kernels, dense deltas, one pass")  # fmt: skip


if __name__ == "__main__":
    main()
