"""Benchmark ``loramix base build`` (issue 4): wall time and held-out perplexity.

Runs the whole CLI command as a separate process (imports, tokenizer training,
pre-training, held-out evaluation, atomic write), measuring wall time and
peak RSS from outside (``_common.run_measured``), then reads the held-out
perplexity from the folder's ``loramix.json``. Default data: the four
built-in synthetic domains, 2000 records each (what the quickstart scenario
uses); ``--data`` takes files instead (e.g. the real QA data).
Requirement: ``--size tiny`` in at most 180 s on the 2-core machine.

    python benchmarks/bench_basebuild.py [--size tiny|small] [--steps N] [--data F ...]
        [--repeat 1] [--device cpu|cuda] [--threads N]

Prints a markdown table. On a shared machine the figures are preliminary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "basebuild"
sys.path.insert(0, str(HERE))

from _common import run_measured  # noqa: E402

SYNTH = [f"synthetic:{d}?n=2000" for d in ("arith", "units", "dates", "sort")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--data", nargs="*", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the child process")
    args = ap.parse_args()

    data = args.data or SYNTH
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    rows = []
    for i in range(args.repeat):
        out = WORK / f"{args.size}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "loramix", "base", "build", "--data", *data, "--out", str(out),
               "--size", args.size, "--device", args.device, "--quiet"]  # fmt: skip
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        m = run_measured(cmd, env=env).check()
        res = json.loads((out / "loramix.json").read_text())["results"]
        rows.append((m, res))

    print(f"## loramix base build --size {args.size} ({len(data)} data sources, device {args.device}, "
          f"{args.threads or os.cpu_count()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)\n")  # fmt: skip
    print(
        "| run | params | vocab | steps | train tokens/s | build s (in process) | wall s (process) | peak RSS MiB "
        "| held-out ppl | untrained ppl | held-out tokens |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (m, r) in enumerate(rows):
        log = (WORK / f"{args.size}-{i}" / "train_log.csv").read_text().splitlines()
        last = dict(zip(log[0].split(","), log[-1].split(",")))
        tps = float(last["tokens"]) / float(last["seconds"])  # seconds include tokenizer training
        print(f"| {i + 1} | {r['params'] / 1e6:.2f}M | {r['vocab_size']} | {r['steps']} | {tps:,.0f} | "
              f"{r['seconds']:.1f} | {m.wall_s:.1f} | {m.peak_rss_mb:.0f} | {r['heldout_ppl']:.3f} | "
              f"{r['untrained_ppl']:.1f} | {r['heldout_tokens']} |")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
