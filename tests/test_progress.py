"""Where stderr is not a terminal (a run in the background, CI), long commands
say how far they are in a plain line every ``$LORAMIX_PROGRESS_EVERY``
seconds (loramix/progress.py); on a terminal the bar, with progress off
nothing, and never anything in stdout."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from loramix.cli import main
from loramix.progress import Lines, duration, line_every

from .factories import make_peft_adapter, save_base, tiny_gpt2

ARITH = "synthetic:arith?n=40"
#: one progress line: what, count, percent, the bar's fields, elapsed, time left
LINE = re.compile(r"^loramix: (?P<what>[^:]+): (?P<count>\S+(?: \S+)?/\S+(?: \S+)?)(?: \((?P<pct>\d+)%\))?"
                  r"(?P<fields>(?:, [^,]+)*?), (?P<elapsed>\w+) elapsed(?:, ~(?P<left>\w+) left)?$")  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from .test_train import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("progress") / "gpt2", "gpt2")


def _lines(text: str, what: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m and m["what"] == what]


def _run(argv: list[str], every: str | None) -> subprocess.CompletedProcess:
    """``python -m loramix ARGV``, stdout and stderr each to a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "LORAMIX_PROGRESS_EVERY"}
    if every is not None:
        env["LORAMIX_PROGRESS_EVERY"] = every
    p = subprocess.run([sys.executable, "-m", "loramix", *argv], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p


def test_train_in_the_background_says_its_steps_and_loss(base, tmp_path):
    """``loramix train ... 2> log`` printed nothing until it ended (10 minutes
    on math.jsonl): a line per update here (the interval 0), with the step,
    loss and times, and of the held-out evaluations, in stderr only; none with --no-progress or --quiet, and
    none in a run shorter than the default minute."""
    argv = ["train", "--base", str(base), "--data", ARITH, "--steps", "4", "--batch", "8", "--max-len", "32",
            "--eval-size", "8", "--rank", "2"]  # fmt: skip
    p = _run([*argv, "--out", str(tmp_path / "a")], "0")
    lines = _lines(p.stderr, "train lora")
    assert [m["count"] for m in lines] == ["1/4 steps", "2/4 steps", "3/4 steps", "4/4 steps"], p.stderr
    assert [m["pct"] for m in lines] == ["25", "50", "75", "100"]
    assert all(re.match(r", loss \d+\.\d{3}, lr \d\.\de-\d\d$", m["fields"]) for m in lines), p.stderr
    assert all(m["left"] for m in lines[:-1]) and lines[-1]["left"] is None
    for which in ("base", "adapted"):  # the held-out evaluations before and after the loop
        assert f"loramix: train lora: held-out perplexity of the {which}: 8/8 records (100%), " in p.stderr
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    assert "loramix: train" not in p.stdout and "held-out" in p.stdout
    for i, flag in enumerate(("--no-progress", "--quiet")):
        p = _run([*argv, "--out", str(tmp_path / f"q{i}"), flag], "0")
        assert "loramix: train" not in p.stderr + p.stdout, p.stderr
    p = _run([*argv, "--out", str(tmp_path / "b")], None)
    assert "loramix: train" not in p.stderr, p.stderr


def test_on_a_terminal_the_bar_and_no_lines(base, tmp_path, monkeypatch):
    """Nothing changes on a terminal: the bar, not a plain line, even at the
    interval 0."""
    from .test_eval import _on_a_terminal

    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    err = _on_a_terminal(["train", "--base", str(base), "--data", ARITH, "--steps", "3", "--batch", "8",
                          "--max-len", "32", "--eval-size", "8", "--rank", "2", "--out", str(tmp_path / "a")])  # fmt: skip
    assert "3/3 [" in err and "loss=" in err and "loramix: train" not in err, err


def test_eval_says_the_file_and_records_scored(base, monkeypatch, capfd):
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    # batches of 16 records alone (no cap on their positions): one line per batch
    assert main(["eval", "--base", str(base), "--data", ARITH, "synthetic:units?n=24", "--batch", "16",
                 "--batch-tokens", "0"]) == 0  # fmt: skip
    out, err = capfd.readouterr()
    counts = [(m["what"], m["count"]) for m in map(LINE.match, err.splitlines()) if m]
    assert counts == [("eval arith", "16/64 records"), ("eval arith", "32/64 records"),
                      ("eval arith", "40/64 records"), ("eval units", "56/64 records"),
                      ("eval units", "64/64 records")], err  # fmt: skip
    assert "loramix:" not in out and "| union | 64 |" in out
    assert main(["eval", "--base", str(base), "--data", ARITH, "--no-progress"]) == 0
    assert capfd.readouterr().err == ""


def test_base_import_says_the_bytes_de_quantised(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    from .test_realmodel import llama_gguf

    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    assert main(["base", "import", str(path), "--out", str(tmp_path / "a")]) == 0
    out, err = capfd.readouterr()
    lines = _lines(err, "de-quantising")
    assert lines and lines[-1]["count"] == "49.54 kB/49.54 kB" and lines[-1]["pct"] == "100", err
    assert "loramix: de-quantising" not in out


def test_sum_into_a_base_says_the_bytes_written(tmp_path, monkeypatch, capfd):
    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    ads = [str(make_peft_adapter(model, tmp_path / f"a{i}", seed=i)) for i in range(2)]
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    assert main(["sum", *ads, "--into", str(base), "--out", str(tmp_path / "m")]) == 0
    out, err = capfd.readouterr()
    lines = _lines(err, "writing m")
    assert lines and lines[-1]["pct"] == "100" and "B/" in lines[-1]["count"], err
    assert "loramix: writing" not in out
    assert main(["sum", *ads, "--into", str(base), "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert "loramix: writing" not in capfd.readouterr().err


def test_a_line_at_most_once_an_interval(monkeypatch, capsys):
    """The count is kept at every update; a line only once the interval has
    passed since the last one (or since the start)."""
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "3600")
    bar = Lines(total=400, desc="train lora", unit="step")
    for _ in range(120):
        bar.update(1)
    assert bar.n == 120 and capsys.readouterr().err == ""
    bar.set_postfix(loss="2.310", lr="1.0e-04")
    bar.t0 -= 250  # as if 250 s had passed
    bar.last -= 3600
    bar.update(0)
    err = capsys.readouterr().err
    assert (
        err
        == "loramix: train lora: 120/400 steps (30%), loss 2.310, lr 1.0e-04, 4m10s elapsed, ~9m43s left\n"
    )
    bar.update(1)
    assert capsys.readouterr().err == ""


def test_an_iterated_bar_and_one_of_unknown_length(monkeypatch, capsys):
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    assert list(Lines(range(3), desc="similarity", unit="module")) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert [LINE.match(x)["count"] for x in err] == ["1/3 modules", "2/3 modules", "3/3 modules"], err
    bar = Lines(iter("ab"), desc="x")
    list(bar)
    assert capsys.readouterr().err.splitlines()[-1].startswith("loramix: x: 2/? its, ")


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (59.6, "1m00s"), (250, "4m10s"), (7500, "2h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("raw", ["-1", "soon", "nan", "inf"])
def test_a_bad_interval_is_one_line_naming_the_variable(raw, monkeypatch, capsys):
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", raw)
    assert main(["similarity", "nothing-here"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loramix: error: LORAMIX_PROGRESS_EVERY: must be a number of seconds >= 0")
    assert len(err.splitlines()) == 1, err


def test_the_interval_defaults_to_a_minute(monkeypatch):
    monkeypatch.delenv("LORAMIX_PROGRESS_EVERY", raising=False)
    assert line_every() == 60.0
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", " ")
    assert line_every() == 60.0
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0.5")
    assert line_every() == 0.5
