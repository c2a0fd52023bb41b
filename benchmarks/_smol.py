"""The real SmolLM2-135M base and data for the SmolLM2 rows of bench_train and bench_eval.

The base: the GGUF in ``../shared/models`` imported once into ``_work/smol``
with ``python -m loramix base import`` (where that command exists), else an
already imported folder given by ``--smol DIR`` or ``$LORAMIX_SMOL``. Data: the
first records of a real domain in ``../shared/data``. Each returns the reason
to skip instead of a path when something is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "medicine.jsonl"


def smol_base(given: str | None = None) -> tuple[Path | None, str]:
    """``(folder, how)`` of an imported SmolLM2, or ``(None, reason to skip)``."""
    for cand in (given, os.environ.get("LORAMIX_SMOL")):
        if cand and (Path(cand) / "model.safetensors").exists():
            return Path(cand), f"given folder {cand}"
    out = HERE / "_work" / "smol"
    if (out / "model.safetensors").exists():
        return out, f"imported from {GGUF.name} into {out}"
    if not GGUF.exists():
        return None, f"skipped: no {GGUF} (and no --smol DIR / $LORAMIX_SMOL)"
    cmd = [sys.executable, "-m", "loramix", "base", "import", str(GGUF), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"skipped: `loramix base import` failed or is missing: {r.stderr.strip()[-300:]}"
    return out, f"imported from {GGUF.name} into {out}"


def smol_data(path: str | None = None) -> tuple[Path | None, str]:
    p = Path(path) if path else DATA
    return (p, str(p)) if p.exists() else (None, f"skipped: no real data at {p}")
