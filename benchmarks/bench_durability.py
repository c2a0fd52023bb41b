"""What the fsync of outputs and cache entries costs: this tree against an older one.

Each measurement is run by both trees in turn (A B B A A B ...), so that the
machine's load, and what a run leaves the next, hit both alike:

- ``sum``: ``loramix sum`` of 3 rank-8 adapters ``--into`` the GPT-2-small
  base of ``bench_sum.py`` (124M, float32: a 498 MB weight file, written with
  ``O_DIRECT``, and the small files beside it), a whole process, warm caches;
  wall time and the process's CPU time (user + sys, ``os.wait4``);
- ``import`` (with ``--gguf FILE``): ``loramix base import FILE --out DIR``,
  a whole process (SmolLM2-135M: a 540 MB float32 ``model.safetensors``
  written through the page cache by safetensors); what a GGUF given as a
  base (imported into ``$LORAMIX_CACHE_DIR/bases/``) writes too;
- ``cache``: every entry of a scenario cache (``--cache``, one a finished
  study left: the quickstart's 174 artifacts, say) made again through
  :meth:`loramix.scenario.cache.Cache.get_or_make` into an empty cache, its
  ``make`` a copy of the entry's files; the loop alone, in a child process
  (wall, and its CPU time from ``getrusage``): the cache's own writes and
  renames, which are what the fsync adds to.

    python benchmarks/bench_durability.py --old /tmp/old-tree [--rounds 5] [--cache DIR] [--gguf FILE]

Not part of ``run_all.py``: an A/B of one change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import run_measured  # noqa: E402

WORK = HERE / "_work" / "durability"

REPLAY = r"""
import json, os, resource, shutil, sys, time
from pathlib import Path
from loramix.scenario.cache import MARKER, Cache

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
entries = sorted(e for k in src.iterdir() if k.is_dir() for e in k.iterdir()
                 if not e.name.startswith(".") and (e / MARKER).is_file())
cache = Cache(dst)

def copier(entry):
    def make(tmp):
        for f in entry.iterdir():
            if f.name != MARKER:
                (shutil.copytree if f.is_dir() else shutil.copyfile)(f, tmp / f.name)
    return make

r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for e in entries:
    cache.get_or_make(e.parent.name, {"replay": e.name}, copier(e))
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
print(json.dumps({"wall": t1 - t0, "cpu": cpu, "entries": len(entries), "bytes": size}))
"""


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "LORAMIX_CACHE_DIR": str(WORK / "user-cache")}


def sum_once(tree: Path, base: Path, ads: list[Path]) -> tuple[float, float]:
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "loramix", "sum", *map(str, ads), "--into", str(base), "--out", str(out),
           "--no-progress", "--device", "cpu"]  # fmt: skip
    # run from WORK: `python -m` puts the current folder first on sys.path, before PYTHONPATH
    m = run_measured(cmd, env=_env(tree), cwd=WORK).check()
    shutil.rmtree(out, ignore_errors=True)
    return m.wall_s, m.cpu_s


def import_once(tree: Path, gguf: Path) -> tuple[float, float]:
    out = WORK / "imported"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "loramix", "base", "import", str(gguf), "--out", str(out), "--no-progress"]
    m = run_measured(cmd, env=_env(tree), cwd=WORK).check()
    shutil.rmtree(out, ignore_errors=True)
    return m.wall_s, m.cpu_s


def cache_once(tree: Path, source: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        p = subprocess.run([sys.executable, "-c", REPLAY, str(source), str(Path(tmp) / "cache")], env=_env(tree),
                           cwd=WORK, capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(p.stdout.strip().splitlines()[-1])


def _order(trees: dict, i: int) -> list:
    """Round ``i``'s order: A B, then B A (a run after another pays for what
    that one left, a page cache to refill or a disk still writing)."""
    return list(trees.items())[:: 1 if i % 2 == 0 else -1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the tree to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", type=Path, help="a scenario cache to make again (skipped without)")
    ap.add_argument("--gguf", type=Path, help="a GGUF file to import (skipped without)")
    ap.add_argument("--only", choices=["sum", "cache", "import"])
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    import bench_sum

    trees = {"new": ROOT, "old": args.old.resolve()}
    rows: dict[str, dict[str, list]] = {}
    if args.only in (None, "sum"):
        base, ads = bench_sum.setup(HERE / "_work" / "sum")
        sum_once(trees["new"], base, ads)  # warm the page cache and the sha256 cache
        for i in range(args.rounds):
            for name, tree in _order(trees, i):
                rows.setdefault(f"sum {name}", {"wall": [], "cpu": []})
                w, c = sum_once(tree, base, ads)
                rows[f"sum {name}"]["wall"].append(w)
                rows[f"sum {name}"]["cpu"].append(c)
    if args.gguf and args.only in (None, "import"):
        import_once(trees["new"], args.gguf)  # warm the page cache with the file
        for i in range(args.rounds):
            for name, tree in _order(trees, i):
                d = rows.setdefault(f"import {name}", {"wall": [], "cpu": []})
                w, c = import_once(tree, args.gguf)
                d["wall"].append(w)
                d["cpu"].append(c)
    if args.cache and args.only in (None, "cache"):
        cache_once(trees["new"], args.cache)  # warm the page cache with the source entries
        for i in range(args.rounds):
            for name, tree in _order(trees, i):
                r = cache_once(tree, args.cache)
                d = rows.setdefault(f"cache {name}", {"wall": [], "cpu": []})
                d["wall"].append(r["wall"])
                d["cpu"].append(r["cpu"])
                d["what"] = f"{r['entries']} entries, {r['bytes'] / 1e6:.0f} MB"
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} load {load:.2f}; median (min-max) of {args.rounds} rounds, A/B "
          "interleaved (A B B A ...)")  # fmt: skip
    for k, d in rows.items():
        w, c = d["wall"], d["cpu"]
        print(f"{k:10s} wall {statistics.median(w):7.3f} s ({min(w):.3f}-{max(w):.3f})   "
              f"CPU {statistics.median(c):7.3f} s ({min(c):.3f}-{max(c):.3f})  {d.get('what', '')}")  # fmt: skip


if __name__ == "__main__":
    main()
