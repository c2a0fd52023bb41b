"""Benchmark: ``loramix plan`` over many adapters (one per customer, say).

(a) In process, the grouping alone (:func:`loramix.grouping.greedy_groups`)
    on the RMS-cosine cost of ``n`` adapters, against the scan it replaced
    (every pair of groups scanned at each step, the first of lowest cost
    merged: :func:`loramix.grouping.scan_groups`, the code of loramix before
    it), on the same
    cost model, for growing ``n``. The two must give the same groups (checked).
    The cosines come from a model of three "topics" with noise, so that the
    costs spread and a plan merges across topics, as ``tests/test_grouping.py``'s
    banks do. The scan costs ``O(n^3)`` look-ups, the heap ``O(n^2 log n)``.

    A second table times the same heap on studies' predictors files with a
    predictor per merge method, on synthetic matrices of the features their
    predictors read: what ``plan --fit`` adds per union.
    ``reports/merge-methods-14-domains``: six methods' lines, each union
    costed under each; ``reports/merge-groups-rank16``: three methods'
    ridges on nine features and a line. The heap costs the unions of one size at once
    (:meth:`loramix.grouping.CostModel.union_costs`, as ``plan`` does); the
    next column costs them one by one (the same groups, checked).

(b) Whole processes over ``--n`` small PEFT LoRA adapters (GPT-2-shaped, one
    layer at 1/12 width, rank 8, on disk): ``loramix plan`` against
    ``loramix similarity`` of the same adapters, the cosines the plan's cost
    reads, so the ratio is what grouping adds to them. With ``--old TREE``
    (a checkout of loramix before the heap) also the old plan, where it
    finishes within ``--old-timeout`` seconds.

    python benchmarks/bench_plan.py [--sizes 50 100 200 400] [--n 1000] [--old TREE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import machine_line, markdown_table, run_measured  # noqa: E402

WORK = HERE / "_work" / "plan"


def topic_cosines(n: int, seed: int = 0):
    """An ``n x n`` RMS-cosine matrix of adapters that each mix one of three
    topic directions (0.6-1.0 of it) with noise in 64 dimensions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((3, 64))
    mix = 0.6 + 0.4 * rng.random(n)
    v = mix[:, None] * topics[np.arange(n) % 3] + (1 - mix[:, None]) * rng.standard_normal((n, 64)) * 2
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    c = np.abs(v @ v.T)
    np.fill_diagonal(c, 1.0)
    return c


FITTED = {  # label -> a study's predictors file with a predictor per merge method
    "lines": HERE.parent / "reports" / "merge-methods-14-domains" / "predictors.json",
    "ridges": HERE.parent / "reports" / "merge-groups-rank16" / "predictors.json",
}


def fitted_model(n: int, path: Path):
    """A :class:`CostModel` of the predictors in ``path`` (one per merge method)
    over synthetic matrices of the features they read, for ``n`` adapters;
    and the methods' predictors in words (``4 methods: 3 ridges, 1 line``)."""
    import json
    from collections import Counter

    from loramix.features import FeatureSet
    from loramix.grouping import CostModel, fit_features

    d = json.loads(path.read_text())
    methods = {m: e["fit"] for m, e in d["by_method"].items()}
    need = sorted({f for fi in [d["fits"][d["best"]], *methods.values()] for f in fit_features(fi)})
    fs = FeatureSet(names=[f"a{i:04d}" for i in range(n)])
    for k, f in enumerate(need):
        fs.matrices[f], fs.aggregate[f] = 0.1 * topic_cosines(n, seed=k + 1), "rms"
    kinds = Counter("line" if f["kind"].startswith("ols") else f["kind"] for f in methods.values())
    said = ", ".join(f"{c} {k}{'s' if c > 1 else ''}" for k, c in kinds.items())
    return CostModel(fs, d["fits"][d["best"]], d["level"], methods), f"{len(methods)} methods: {said}"


def bench_grouping(sizes: list[int], max_group: int, budget: float, scan_limit: float) -> list[list[str]]:
    from loramix.features import FeatureSet
    from loramix.grouping import CostModel, greedy_groups, scan_groups

    rows, fit_rows, skip_scan = [], [], False
    for n in sizes:
        c = topic_cosines(n)
        fs = FeatureSet(names=[f"a{i:04d}" for i in range(n)], matrices={"rms_cosine": c})
        fs.aggregate["rms_cosine"] = "rms"
        model = CostModel(fs)
        t = time.perf_counter()
        heap = greedy_groups(n, model.cost, budget, max_group, costs=model.union_costs)  # as plan runs it
        t_heap = time.perf_counter() - t
        merged = sum(len(g) for g in heap if len(g) > 1)
        for label, path in FITTED.items():
            fitted, methods = fitted_model(n, path)
            t = time.perf_counter()
            # a budget of 15 points of retention: most unions
            fit_groups = greedy_groups(n, fitted.cost, 15.0, max_group, costs=fitted.union_costs)
            t_fit = time.perf_counter() - t
            t = time.perf_counter()
            one_by_one = greedy_groups(n, fitted.cost, 15.0, max_group)  # the unions costed one by one
            t_one = time.perf_counter() - t
            assert one_by_one == fit_groups, f"n={n}, {label}: the unions costed at once changed the plan"
            fit_rows.append([str(n), f"{methods} ({path.parent.name})", f"{t_fit:.2f}",
                             f"{t_one:.2f}", f"{t_one / t_fit:.1f}x", f"{len(fit_groups)} groups; same groups"])  # fmt: skip
        if skip_scan:
            rows.append([str(n), f"{t_heap:.3f}", "(not run)", "", f"{len(heap)} groups, {merged} merged"])
            continue
        t = time.perf_counter()
        scan = scan_groups(n, model.cost, budget, max_group)
        t_scan = time.perf_counter() - t
        assert scan == heap, f"n={n}: the heap's groups are not the scan's"
        skip_scan = t_scan > scan_limit  # the next size would take 8x as long
        rows.append([str(n), f"{t_heap:.3f}", f"{t_scan:.2f}", f"{t_scan / t_heap:.0f}x",
                     f"{len(heap)} groups, {merged} merged; same groups"])  # fmt: skip
    return rows, fit_rows


def child_generate(work: str, n: str) -> None:
    from bench_similarity import write_adapters

    write_adapters(Path(work), int(n), layers=1, width_scale=1 / 12, seed=0)


def bench_processes(
    n: int, work: Path, max_group: int, old: str | None, old_timeout: float
) -> list[list[str]]:
    done = work / f".done-{n}"
    if not done.exists():
        run_measured([sys.executable, __file__, "--child", str(work), str(n)]).check()
        done.touch()
    paths = [str(work / f"a{a:03d}") for a in range(n)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    lm = [sys.executable, "-m", "loramix"]
    sim = run_measured([*lm, "similarity", *paths, "--format", "csv"], env=env, cwd=HERE.parent).check()
    plan_cmd = [*lm, "plan", *paths, "--max-group", str(max_group), "--format", "json"]
    new = run_measured(plan_cmd, env=env, cwd=HERE.parent).check()
    rows = [
        [f"`loramix similarity` x {n}", f"{sim.wall_s:.2f}", f"{sim.cpu_s:.2f}", f"{sim.peak_rss_mb:.0f}", "1.0x"],
        [f"`loramix plan` x {n} (heap)", f"{new.wall_s:.2f}", f"{new.cpu_s:.2f}", f"{new.peak_rss_mb:.0f}",
         f"{new.wall_s / sim.wall_s:.2f}x of similarity"],
    ]  # fmt: skip
    if old:
        t = time.perf_counter()
        try:
            out = subprocess.run(plan_cmd, env=dict(env, PYTHONPATH=old), cwd="/", capture_output=True, text=True,
                                 timeout=old_timeout, check=True)  # fmt: skip
            wall = time.perf_counter() - t
            same = out.stdout == new.stdout
            rows.append([f"`loramix plan` x {n} (the scan, {old})", f"{wall:.2f}", "", "",
                         f"{wall / new.wall_s:.1f}x of the heap's; same plan: {same}"])  # fmt: skip
        except subprocess.TimeoutExpired:
            rows.append([f"`loramix plan` x {n} (the scan, {old})", f"> {old_timeout:.0f}", "", "",
                         f"> {old_timeout / new.wall_s:.0f}x of the heap's (stopped)"])  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 1000])
    ap.add_argument("--scan-limit", type=float, default=60.0,
                    help="(a) no scan for the next size once one took this many seconds")  # fmt: skip
    ap.add_argument("--n", type=int, default=1000, help="(b) adapters")
    ap.add_argument("--max-group", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--old", help="(b) a checkout of loramix before the heap (PYTHONPATH)")
    ap.add_argument("--old-timeout", type=float, default=600.0)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_generate(*args.child)
        return
    print("# plan benchmark\n")
    print(f"(a) the grouping alone, in process: RMS-cosine cost, budget {args.budget}, groups of at most "
          f"{args.max_group}; seconds\n")  # fmt: skip
    rows, fit_rows = bench_grouping(args.sizes, args.max_group, args.budget, args.scan_limit)
    print(markdown_table(["adapters", "heap (s)", "scan (s)", "scan / heap", "plan (cosine)"], rows))
    print(f"\nThe same heap under studies' predictors files (`plan --fit`), budget 15, groups of at most "
          f"{args.max_group}; seconds\n")  # fmt: skip
    print(markdown_table(["adapters", "predictors", "unions at once (s)", "one by one (s)",
                          "one by one / at once", "plan"], fit_rows))  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"\n(b) whole processes over {args.n} PEFT LoRA adapters (one GPT-2 layer at 1/12 width, rank 8)\n")
    rows = bench_processes(args.n, args.work, args.max_group, args.old, args.old_timeout)
    print(markdown_table(["process", "wall (s)", "CPU (s)", "peak RSS (MiB)", "ratio"], rows))
    print(f"\n- {machine_line()}")


if __name__ == "__main__":
    main()
