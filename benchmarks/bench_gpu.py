"""The GPU round of issue 12 in one command, sized for a lent device's short budget.

A lent GPU machine comes with minutes, not hours, so its checks run as one
prepared command. Each step is a whole process with its own time limit (out
of ``--budget`` seconds in all, in order of importance), its output goes to
``--out`` as soon as it ends, and a step that runs out of time or fails is
reported as such while the next one still runs:

1. ``cuda-tests``: ``pytest tests/test_cuda.py`` (skipped, saying so, where
   pytest is not installed);
2. ``train``: the D2-LoRA training-step overhead over LoRA on a model of
   SmolLM2-135M's shapes (random weights, which do not change the time) with
   a batch that fills the GPU (``bench_train.py``: ``d2lora`` as `train` runs
   it on the GPU, the dense forward, and the factored one; target <= +19%);
3. ``eval-d2``, ``eval-lora``: merged against on-the-fly evaluation of the
   sum of 3 adapters on the same model (``bench_eval.py --arch smol --only
   b``; target >= 1.9x);
4. ``bank``: similarity of 1,000 GPT-2-small rank-8 adapters on the GPU
   (``bench_bank.py --device cuda``, the bank generated first; target < 10 s);
5. ``train-compiled``: the training step with the model under
   ``torch.compile`` (``lora-compiled``, ``d2lora-compiled``).

``--device cpu --quick`` runs the same steps at toy sizes, to check the
command itself on a machine without a GPU.

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out "$OUT" [--budget 480]

Writes ``OUT/gpu-round.md`` (every step's command, status, seconds and
output, in order) and prints it; the steps' own files (the adapter bank,
4 GB) go to ``--work``, not under ``--out``, whose files are copied back.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def steps(device: str, quick: bool, work: Path) -> list[tuple[str, list[str], float]]:
    """``(name, argv, share of the budget)`` in the order they run."""
    py = sys.executable
    if quick:
        model, batch, seq, n_steps = ["gpt2-tiny"], "2", "32", ["--steps", "1", "--warmup", "1"]
        ev = ["--arch", "tiny", "--records", "4", "--batch", "4", "--max-len", "64", "--repeat", "1"]
        n_bank = ["--n", "4", "--n-check", "2"]
    else:
        model, batch, seq, n_steps = ["smollm2-135m"], "32", "512", ["--steps", "10", "--warmup", "3"]
        ev = ["--arch", "smol", "--records", "256", "--batch", "16", "--max-len", "256", "--repeat", "3"]
        n_bank = ["--n", "1000"]
    train = [py, str(HERE / "bench_train.py"), "--device", device, "--models", *model, "--batch", batch,
             "--seq", seq, *n_steps, "--out", str(work / "bench_train.json")]  # fmt: skip
    evals = [py, str(HERE / "bench_eval.py"), "--device", device, "--only", "b", "--work", str(work / "eval"),
             *ev]  # fmt: skip
    tests = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")]
    return [
        ("cuda-tests", tests, 0.15),
        ("train", [*train, "--methods", "lora", "d2lora", "d2lora-factored"], 0.2),
        ("eval-d2", [*evals, "--kind", "d2lora"], 0.1),
        ("eval-lora", [*evals, "--kind", "lora"], 0.1),
        (
            "bank",
            [py, str(HERE / "bench_bank.py"), "--device", device, "--work", str(work / "bank"), *n_bank],
            0.2,
        ),
        ("train-compiled", [*train, "--methods", "lora-compiled", "d2lora-compiled"], 0.25),
    ]


def run_step(name: str, argv: list[str], limit: float, env: dict) -> tuple[str, float, str]:
    """``(status, seconds, output)`` of one step run for at most ``limit`` seconds."""
    if name == "cuda-tests":
        probe = subprocess.run([argv[0], "-c", "import pytest"], capture_output=True, env=env)
        if probe.returncode != 0:
            return "skipped: pytest is not installed here", 0.0, ""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"timed out after {limit:.0f} s", time.perf_counter() - t0, out
    status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
    out = r.stdout if r.returncode == 0 else r.stdout + "\n" + r.stderr[-3000:]
    return status, time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "_work" / "gpu", help="where gpu-round.md goes")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "gpu-work",
                    help="the steps' own files (the 4 GB adapter bank): not under --out")  # fmt: skip
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all the steps together")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the command, measures nothing")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("LORAMIX_CACHE_DIR", str(work / "cache"))
    report = args.out / "gpu-round.md"
    lines = [f"# GPU round ({'quick, ' if args.quick else ''}device {args.device}), "
             f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]  # fmt: skip
    todo = [s for s in steps(args.device, args.quick, work) if args.only is None or s[0] in args.only]
    share_left = sum(s[2] for s in todo)
    deadline = time.monotonic() + args.budget
    failed = False
    for name, cmd, share in todo:
        left = deadline - time.monotonic()
        # a step may use its share and whatever the steps before it left unused
        limit = max(1.0, left * share / share_left)
        share_left -= share
        status, secs, out = run_step(name, cmd, limit, env)
        failed |= status.startswith(("failed", "timed out"))
        shown = " ".join(shlex.quote(c) for c in cmd).replace(str(ROOT) + "/", "")
        lines += [f"## {name}: {status} ({secs:.0f} s)", "", f"`{shown}`", "", out.strip(), ""]
        report.write_text("\n".join(lines) + "\n")  # after every step: a timeout keeps what ran
        print(f"[{name}] {status} ({secs:.0f} s)", file=sys.stderr, flush=True)
    print(report.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
