"""Ctrl-C latency: seconds from SIGINT to the process's exit, on long commands.

Each command is started as ``python -m loramix ...`` (``PYTHONPATH`` one tree
of loramix), sent SIGINT ``--at`` seconds after it starts (in its work, past
the imports), and timed from the signal to its exit (wall time: a latency,
which CPU time does not measure). With ``--old TREE`` each round runs the
command on this tree and on ``TREE`` in turn (A B A B ...), so that the
machine's load hits both alike. Every run must exit 130 with the one line
``loramix: interrupted`` and leave nothing beside its ``--out``; the runs
that do not are counted, and what they printed shown.

- ``merge``: ``merge -m ties --density 0.5`` of two adapters ``--into`` a
  GPT-2 of 24 layers x 1024 (about 1.2 GB of float32 streamed, merged and
  written: about 11 s on 2 loaded cores);
- ``train``: ``train`` on a tiny ``loramix base build`` base, 100000 steps
  of LoRA on ``synthetic:arith`` (the training loop).

    python benchmarks/bench_interrupt.py [--old /tmp/old-tree] [--rounds 5] [--at 5]

Not part of ``run_all.py``: a check of the signal path, not of speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "interrupt"


def _bases() -> dict[str, Path]:
    """The merge's base and adapter, and the training base, made once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from factories import make_peft_adapter, save_base, tiny_gpt2

    out = {"gpt2": WORK / "gpt2", "adapter": WORK / "adapter", "tiny": WORK / "tiny"}
    if not out["adapter"].exists():
        model = tiny_gpt2(seed=0, n_layer=24, n_embd=1024, n_head=8, vocab_size=2048)
        save_base(model, out["gpt2"])
        make_peft_adapter(model, out["adapter"], r=8)
    if not out["tiny"].exists():
        subprocess.run([sys.executable, "-m", "loramix", "base", "build", "--data", "synthetic:arith", "--out",
                        str(out["tiny"]), "--steps", "20", "--quiet", "--device", "cpu"], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    return out


def _commands(b: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "merge": ["merge", "-m", "ties", "--density", "0.5", "--no-progress", str(b["adapter"]), str(b["adapter"]),
                  "--into", str(b["gpt2"]), "--device", "cpu"],
        "train": ["train", "--base", str(b["tiny"]), "--data", "synthetic:arith", "--steps", "100000", "--quiet",
                  "--device", "cpu", "--eval-size", "0"],
    }  # fmt: skip


def interrupt_once(tree: Path, args: list[str], at: float) -> tuple[float, str | None]:
    """Seconds from SIGINT, sent ``at`` seconds after the start, to the exit;
    and what went wrong (None: exit 130, the one line, nothing left)."""
    out = WORK / "out"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # run from WORK: `python -m` puts the current folder first on sys.path, before PYTHONPATH
    p = subprocess.Popen([sys.executable, "-m", "loramix", *args, "--out", str(out)], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, env=env, cwd=WORK)  # fmt: skip
    time.sleep(at)
    if p.poll() is not None:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"{args[0]} ended before {at} s ({p.returncode}): {p.stderr.read()}; lower --at")
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    p.wait()
    dt = time.perf_counter() - t0
    err = p.stderr.read()
    left = [q.name for q in WORK.iterdir() if q.name == "out" or q.name.startswith((".lmx-", "out."))]
    for name in left:
        shutil.rmtree(WORK / name, ignore_errors=True)
        (WORK / name).unlink(missing_ok=True)
    if p.returncode != 130 or err.splitlines() != ["loramix: interrupted"] or left:
        return dt, f"exit {p.returncode}, left {left}: {err.strip().splitlines()[:2]}"
    return dt, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, default=None, help="Another loramix tree, run in turn with this one.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--at", type=float, default=5.0, help="Seconds after the start the SIGINT is sent.")
    ap.add_argument("--only", nargs="*", default=None, help="Commands: merge, train.")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    commands = _commands(_bases())
    trees = {"new": ROOT, **({"old": a.old} if a.old else {})}
    times: dict = {(c, t): [] for c in commands for t in trees}
    bad: dict = {(c, t): [] for c in commands for t in trees}
    for r in range(a.rounds):
        for c, args in commands.items():
            if a.only and c not in a.only:
                continue
            for t, tree in list(trees.items())[:: -1 if r % 2 else 1]:  # A B, then B A: neither always first
                dt, wrong = interrupt_once(tree, args, a.at)
                times[c, t].append(dt)
                if wrong:
                    bad[c, t].append(wrong)
    print(f"load average {os.getloadavg()[0]:.2f} at the end; SIGINT sent {a.at} s after each start\n")
    print("| command | tree | SIGINT to exit, median s | min | max | runs | not 130 + one line |")
    print("|---|---|---|---|---|---|---|")
    for (c, t), xs in times.items():
        if xs:
            print(f"| {c} | {t} | {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} | {len(xs)} "
                  f"| {len(bad[c, t])} |")  # fmt: skip
    for (c, t), wrong in bad.items():
        for w in wrong:
            print(f"{c} {t}: {w}")


if __name__ == "__main__":
    main()
