"""Benchmark evaluation's default cap on a batch's positions against batches of ``--batch`` records alone.

``loramix eval`` sorts the records by length and pads each batch to its
longest, so a batch holding a few long records among short ones is mostly
padding. By default it now also caps each batch at ``--batch`` records of the
data set's mean length (``loramix.data.position_budget``; ``--batch-tokens``
sets another cap, 0 none): the anchor is ``--batch-tokens 0``, the batches it
made before.

The real SmolLM2-135M (imported once from the GGUF, ``_smol.py``) on the
first ``--records`` records of real long-tailed domains of ``../shared/data``
(medicine, math_geometry and math_algebra by default), ``--batch 16``, no
``--max-len`` (the model's context): each way as whole ``loramix eval``
processes, interleaved, each with an empty ``LORAMIX_CACHE_DIR`` (a first
run). Rows: the positions each way computes and the share that is padding
(from the batches it builds), CPU seconds (user + system, the steadier
figure here), wall seconds and the ratio to the anchor; then each data set's
perplexity both ways and their largest relative difference (float rounding
only: a record's row is the same whatever the batch holds).

    python benchmarks/bench_batching.py [--records 48] [--batch 16] [--repeat 1] [--domains medicine ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import eval_positions, machine_line, run_measured  # noqa: E402
from _smol import SHARED, smol_base  # noqa: E402


def positions(base: Path, files: list[Path], records: int, batch: int, cap: int | None) -> tuple[int, int]:
    """``(positions computed, input tokens)`` of eval's batches of ``files``
    (``cap``: ``None`` the default budget, 0 none; ``_common.eval_positions``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return eval_positions(tok, files, records, tok.model_max_length, batch, cap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=48, help="the first N records of each domain")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each way (the best is shown)")
    ap.add_argument("--domains", nargs="*", default=["medicine", "math_geometry", "math_algebra"])
    ap.add_argument("--smol", default=None, metavar="DIR", help="an imported SmolLM2 folder")
    args = ap.parse_args()
    base, how = smol_base(args.smol)
    files = [SHARED / "data" / f"{d}.jsonl" for d in args.domains]
    missing = [str(f) for f in files if not f.exists()]
    if base is None or missing:
        print(how if base is None else f"skipped: no {', '.join(missing)}")
        return
    ways = {
        "default cap (batch x mean length)": [],
        "no cap (--batch-tokens 0), as before": ["--batch-tokens", "0"],
    }
    runs: dict[str, list] = {w: [] for w in ways}
    for _ in range(max(1, args.repeat)):
        for way, extra in ways.items():
            with tempfile.TemporaryDirectory() as cache:
                cmd = [sys.executable, "-m", "loramix", "eval", "--base", str(base), "--data", *map(str, files),
                       "--limit", str(args.records), "--batch", str(args.batch), "--format", "json",
                       "--threads", str(os.cpu_count() or 1), *extra]  # fmt: skip
                runs[way].append(run_measured(cmd, env={**os.environ, "LORAMIX_CACHE_DIR": cache}).check())
    best = {w: min(r, key=lambda m: m.cpu_s) for w, r in runs.items()}
    anchor = best["no cap (--batch-tokens 0), as before"]
    print(f"## Evaluation batching: SmolLM2-135M, {', '.join(args.domains)} ({args.records} records each), "
          f"batch {args.batch}, no --max-len\n\n{how}; {machine_line()}; `loramix eval` as whole processes, "
          f"each with an empty cache, interleaved, best CPU of {max(1, args.repeat)}\n")  # fmt: skip
    print(
        "| way | positions computed | padding | CPU s | wall s | peak RSS MiB | CPU vs no cap | wall vs no cap |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (way, extra), m in zip(ways.items(), best.values()):
        done, real = positions(base, files, args.records, args.batch, 0 if extra else None)
        print(f"| {way} | {done:,} | {1 - real / done:.1%} | {m.cpu_s:.1f} | {m.wall_s:.1f} | {m.peak_rss_mb:.0f} "
              f"| {anchor.cpu_s / m.cpu_s:.2f}x | {anchor.wall_s / m.wall_s:.2f}x |")  # fmt: skip
    res = {w: {r["data"]: r["ppl"] for r in json.loads(m.stdout)["results"]} for w, m in best.items()}
    new, old = res.values()
    print("\n| data | ppl, default cap | ppl, no cap | relative difference |\n| --- | ---: | ---: | ---: |")
    for d in new:
        print(f"| {d} | {new[d]:.6f} | {old[d]:.6f} | {abs(new[d] - old[d]) / old[d]:.1e} |")


if __name__ == "__main__":
    main()
