"""Shared benchmark helpers: time and peak memory of whole processes.

Benchmarks compare methods *as whole processes* (start-up, imports, file
reads and all), measured from outside: wall time with ``perf_counter`` and
the peak resident set size of that one child from ``os.wait4`` (its own
``ru_maxrss``; ``getrusage(RUSAGE_CHILDREN)`` would give the maximum over all
children so far, not this one).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    cmd: list[str]
    wall_s: float
    peak_rss_mb: float  # MiB
    cpu_s: float  # the child's user + system time: the steadier figure on a shared machine
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Measured:
        if self.returncode != 0:
            raise RuntimeError(
                f"benchmark command failed ({self.returncode}): {' '.join(self.cmd)}\n{self.stderr[-4000:]}"
            )
        return self


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None) -> Measured:
    """Run ``cmd`` to completion; return its wall time, peak RSS and output.

    Output goes through temporary files (no pipe can fill up and stall the
    child, and reading it does not count against the child's time).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
        out.seek(0)
        err.seek(0)
        # ru_maxrss is KiB on Linux, bytes on macOS
        kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
        cpu = usage.ru_utime + usage.ru_stime
        return Measured(cmd, wall, kib / 1024, cpu, p.returncode, out.read(), err.read())


def best_of(cmd: list[str], repeat: int, **kw) -> Measured:
    """``repeat`` runs; the fastest wall time and the largest peak RSS."""
    runs = [run_measured(cmd, **kw).check() for _ in range(max(1, repeat))]
    best = min(runs, key=lambda m: m.wall_s)
    best.peak_rss_mb = max(m.peak_rss_mb for m in runs)
    return best


def machine_line() -> str:
    """One line describing where the numbers were taken."""
    try:
        import torch

        tv = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:  # pragma: no cover
        tv = "torch not importable"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {tv}, load average {load:.2f} at start"
    )


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def child_check(ours: str, ref: str) -> None:
    """Print the largest per-tensor relative difference between two model
    folders (``||a - b|| / ||b||``); a benchmark's ``--child check`` (it
    imports loramix and torch, which the timing parent does not)."""
    from loramix.io.model_folder import BaseModelFolder

    a_f, b_f = BaseModelFolder(ours), BaseModelFolder(ref)
    worst = 0.0
    for k in a_f.keys():
        if k in b_f.tensors:
            a, b = a_f.read_tensor(k).double(), b_f.read_tensor(k).double()
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    print(f"{worst:.2e}")


def eval_positions(
    tok, files, limit: int | None, max_len: int, batch: int, cap: int | None = None
) -> tuple[int, int]:
    """``(positions computed, input tokens)`` of ``loramix eval``'s sorted,
    padded batches of the first ``limit`` records of each of ``files``: each
    data set's batches capped as eval caps them (``cap`` None: its default
    budget, :func:`loramix.data.position_budget`; 0: no cap; else that many
    positions)."""
    from loramix.data import batch_indices, encode_records, load_records, position_budget

    computed = real = 0
    for f in files:
        ex = encode_records(tok, load_records(f, limit=limit), max_len=max_len)
        m = position_budget(ex, batch) if cap is None else cap or None
        for idx in batch_indices(ex, batch_size=batch, sort_by_length=True, max_tokens=m):
            n = [len(ex[i]["input_ids"]) for i in idx]
            computed, real = computed + len(n) * max(n), real + sum(n)
    return computed, real
