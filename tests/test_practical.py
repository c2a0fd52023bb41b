"""Options a real model needs, on tiny bases: ``--threads``, per-data initialisation
seeds, evaluation at the model's context with a count of cut records, a live
``train_log.csv``, ``--targets`` errors that list the modules, and the base
recorded resolved."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import click
import pytest
import torch

from loramix.cli import main
from loramix.cli.threads import threads_option
from loramix.io.adapter_files import load_adapter
from loramix.io.outputs import owner_tag
from loramix.train import LiveLog, train_adapter

from .factories import one_line_error, write_jsonl
from .test_train import ARITH, FAST, UNITS, make_tiny_base

# lr so small that the trained A is its initial value to float32 precision
FROZEN = {**FAST, "steps": 1, "lr": 1e-12, "eval_size": 0}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("practical") / "llama", "llama")


def test_threads_option_applies_and_restores():
    seen = []

    @click.command()
    @threads_option
    def cmd():
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    cmd.main(["--threads", str(other)], standalone_mode=False)
    cmd.main([], standalone_mode=False)
    assert seen == [other, before] and torch.get_num_threads() == before


REQUIRED = {
    "train": ["--base", "b", "--data", "d", "--out", "o"],
    "eval": ["--base", "b", "--data", "d"],
    "sum": ["a", "--out", "o"],
    "merge": ["-m", "sum", "a", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_threads_on_every_computing_command(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--threads" in capsys.readouterr().out
    one_line_error(capsys, [command, "--threads", "0", *REQUIRED[command]], "--threads", "at least 1")


def _first_A(path):
    ad = load_adapter(path)
    return torch.cat([m.A.flatten() for _, m in sorted(ad.modules.items())])


def test_init_seed_per_data_by_default_shared_on_request(llama, tmp_path):
    runs = {}
    for data in (ARITH, UNITS):
        for shared in (False, True):
            out = tmp_path / f"{data[10:14]}-{shared}"
            train_adapter(llama, data, out=out, seed=3, shared_init=shared, **FROZEN)
            runs[data, shared] = (_first_A(out), json.loads((out / "loramix.json").read_text()))
    a_ar, a_un = runs[ARITH, False][0], runs[UNITS, False][0]
    cos = float(a_ar @ a_un / (a_ar.norm() * a_un.norm()))
    assert abs(cos) < 0.2, cos  # independent draws
    torch.testing.assert_close(runs[ARITH, True][0], runs[UNITS, True][0], rtol=1e-5, atol=1e-7)
    inits = {k: v[1]["parameters"]["init"] for k, v in runs.items()}
    assert inits[ARITH, True] == {"shared": True, "seed": 3} == inits[UNITS, True]
    assert not inits[ARITH, False]["shared"] and inits[ARITH, False]["seed"] != inits[UNITS, False]["seed"]
    # the same seed and data give the same initial factors
    train_adapter(llama, ARITH, out=tmp_path / "again", seed=3, **FROZEN)
    assert torch.equal(_first_A(tmp_path / "again"), a_ar)


def test_eval_uses_the_context_and_counts_cut_records(llama, tmp_path, capsys):
    from loramix import evaluate
    from loramix.archs import context_length

    long = write_jsonl(tmp_path / "long.jsonl", [{"question": "What is 1 plus 1? " * 30, "answer": "2"},
                                                 {"question": "Hi?", "answer": "Hello."}])  # fmt: skip
    df = evaluate(str(llama), data=[long], device="cpu")
    n_ctx = context_length(json.loads((llama / "config.json").read_text()))
    assert int(df["max_len"].iloc[-1]) == n_ctx
    cut = evaluate(str(llama), data=[long], max_len=16, device="cpu")
    assert list(cut["truncated"]) == [1, 1] and int(df["truncated"].iloc[-1]) == int(n_ctx < 200)
    assert (
        main(["eval", "--base", str(llama), "--data", str(long), "--max-len", "16", "--device", "cpu"]) == 0
    )
    assert "1 of 2 records cut at 16 tokens" in capsys.readouterr().out


def test_train_log_is_written_as_training_goes(llama, tmp_path):
    out = tmp_path / "ad"
    live_path = tmp_path / f"ad.train_log.{owner_tag()}.csv"
    live = LiveLog(out)
    live.row(1, 2.5, 1e-3, 10, 0.5)
    with open(live_path) as f:  # readable while training still runs
        assert list(csv.reader(f)) == [list(LiveLog.HEADER), ["1", "2.500000", "0.001", "10", "0.500"]]
    del live  # a run that never finished leaves nothing beside its output
    assert not list(tmp_path.glob("ad.train_log.*"))
    # a log left by a killed run (its process gone) is removed by the next run to that output
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f"ad.train_log.{int(dead.stdout)}.csv"
    stale.write_text("step\n")
    train_adapter(llama, ARITH, out=out, **FAST)
    with open(out / "train_log.csv") as f:
        assert len(list(csv.reader(f))) == FAST["steps"] + 1
    assert not list(tmp_path.glob("ad.train_log.*"))


def test_targets_error_lists_the_modules(llama, tmp_path, capsys):
    one_line_error(capsys, ["train", "--base", llama, "--data", ARITH, "--out", tmp_path / "o", "--targets", "c_attn",
                            "--quiet", "--device", "cpu"], "--targets", "c_attn", "q_proj", "down_proj")  # fmt: skip
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.train_log.*"))


def test_base_recorded_resolved(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(llama.parent)
    train_adapter(llama.name, ARITH, out=tmp_path / "ad", **FROZEN)
    rec = json.loads((tmp_path / "ad" / "loramix.json").read_text())["inputs"][0]
    assert rec["path"] == str(llama.resolve()) and rec["given"] == llama.name and len(rec["sha256"]) == 64
    assert os.path.isabs(rec["path"])
