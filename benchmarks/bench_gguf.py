"""Benchmark ``loramix base import FILE.gguf`` as a whole process.

The model is the real SmolLM2-135M-Instruct (Q4_1) from ``../shared/models/``
beside the checkout (or ``--gguf``). Whole processes, interleaved, each timed
by ``_common.run_measured`` (wall time, CPU time and that child's peak RSS):

- ``loramix float32`` / ``loramix bfloat16``: ``loramix base import FILE --out
  DIR [--dtype bfloat16]`` (read, de-quantise, un-permute, write
  ``model.safetensors``, config, tokenizer and provenance);
- ``transformers (anchor)``: ``AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...)`` and ``AutoTokenizer.from_pretrained`` likewise: the
  ecosystem's own GGUF loading into memory, which writes nothing (transformers
  5 refuses to ``save_pretrained`` such a model);
- ``load imported``: ``from_pretrained`` of the imported folder, what every
  later command pays instead of the import.

    python benchmarks/bench_gguf.py [--repeat 2] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import machine_line, markdown_table, run_measured  # noqa: E402

GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

ANCHOR = (
    "import sys, pathlib; from transformers import AutoModelForCausalLM, AutoTokenizer; "
    "p = pathlib.Path(sys.argv[1]); "
    "AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name); "
    "AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)"
)
LOAD = (
    "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
    "AutoModelForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])"
)


def commands(gguf: Path, work: Path) -> dict[str, list[str]]:
    py = sys.executable
    imp = [py, "-m", "loramix", "base", "import", str(gguf), "--force", "--out"]
    return {
        "loramix float32": [*imp, str(work / "f32")],
        "loramix bfloat16": [*imp, str(work / "bf16"), "--dtype", "bfloat16"],
        "transformers (anchor)": [py, "-c", ANCHOR, str(gguf)],
        "load imported": [py, "-c", LOAD, str(work / "f32")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=GGUF)
    args = ap.parse_args()
    if not args.gguf.is_file():
        print(f"skipped: no GGUF at {args.gguf} (see README: Real model)")
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        cmds = commands(args.gguf, work)
        runs: dict[str, list] = {k: [] for k in cmds}
        for _ in range(max(1, args.repeat)):  # interleaved: a load spike hits every row alike
            for name, cmd in cmds.items():
                runs[name].append(run_measured(cmd, env=env).check())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, ms in runs.items():
        rows.append([name, f"{min(m.wall_s for m in ms):.1f}", f"{statistics.median(m.cpu_s for m in ms):.1f}",
                     f"{max(m.peak_rss_mb for m in ms):.0f}"])  # fmt: skip
    print(f"GGUF import of {args.gguf.name} ({args.gguf.stat().st_size / 2**20:.0f} MiB); {machine_line()}")
    print(markdown_table(["process", "best wall s", "median CPU s", "peak RSS MiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
