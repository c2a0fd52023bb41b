"""benchmarks/run_all.py keeps what a rerun must not lose: the other benchmarks'
latest sections and the hand-written notes on the runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("run_all", None)
    import run_all

    yield run_all
    sys.modules.pop("run_all", None)


def test_a_rerun_keeps_the_notes_and_the_other_sections(run_all, tmp_path, monkeypatch):
    script = tmp_path / "bench_tiny.py"
    script.write_text("print('| row | 1.0 s |')\n")
    monkeypatch.setattr(run_all, "BENCHMARKS", {"tiny": (str(script), [], 7), "other": ("unused.py", [], 8)})
    out = tmp_path / "benchmarks.md"
    notes = f"{run_all.NOTES}\n\n- **a rerun**: what changed, and why the figures moved.\n- a second note.\n"
    other = "## other (issue 8): `python benchmarks/unused.py`\n\nRan earlier.\n\n| other | 2.0 s |\n"
    out.write_text(f"# loramix benchmarks\n\nWritten long ago.\n\n{notes}\n{other}")
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "tiny", "--out", str(out)])
    assert run_all.main() == 0
    text = out.read_text()
    assert "Written long ago" not in text  # the header is made anew
    assert text.count(run_all.NOTES) == 1 and notes in text
    assert text.index(notes) < text.index("## tiny (issue 7)") < text.index(other)
    assert "| row | 1.0 s |" in text and text.endswith(other)
    # and a second rerun gives the same notes, once
    assert run_all.main() == 0
    assert out.read_text().count("- a second note.") == 1


def test_a_report_without_notes_gets_none(run_all, tmp_path, monkeypatch):
    script = tmp_path / "bench_tiny.py"
    script.write_text("print('| row | 1.0 s |')\n")
    monkeypatch.setattr(run_all, "BENCHMARKS", {"tiny": (str(script), [], 7)})
    out = tmp_path / "benchmarks.md"
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(out)])
    assert run_all.main() == 0
    text = out.read_text()
    assert run_all.NOTES not in text and "notes below" not in text and "| row | 1.0 s |" in text
