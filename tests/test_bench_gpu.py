"""benchmarks/bench_gpu.py, the GPU round a session runs in one command when
it is lent a device (minutes of budget, no second try): checked here on the
CPU at toy sizes (``--quick``), so a change to the benchmarks it calls
cannot break it unseen. The ``torch.compile`` step (a minute of compiling
on the CPU) and the CUDA tests are left out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _round(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(out),
        "--work",
        str(work),
        *args,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = out / "gpu-round.md"
    return r, report.read_text() if report.exists() else ""


def test_the_gpu_round_runs_its_steps_and_reports_each(tmp_path):
    steps = ("train", "eval-d2", "eval-lora", "bank")
    r, report = _round(tmp_path, "--budget", "400", "--only", *steps)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in steps:
        assert f"## {name}: ok (" in report, report[-3000:]
    # each step's own table came through: the figures a device session records
    assert "| d2lora |" in report and "overhead (vs)" in report  # train
    assert report.count("| on the fly (attach_adapters) |") == 2  # eval-d2, eval-lora
    assert "peak memory" in report and "pairs / s" in report  # bank
    assert report in r.stdout  # printed too, for a device whose files do not come back


def test_a_step_out_of_time_is_reported_and_fails_the_round(tmp_path):
    r, report = _round(tmp_path, "--budget", "1", "--only", "bank")
    assert r.returncode == 1
    assert "## bank: timed out after 1 s" in report
