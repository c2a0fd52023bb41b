"""Bad input through the real CLI: exit code 2, one line on stderr naming the
file and the problem, no traceback (a traceback only with ``--debug``).

Most cases call ``loramix.cli.main(argv)`` in-process (what the console script
runs); two run ``python -m loramix`` as a real process.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix.cli import main
from loramix.errors import LoramixError

from .factories import make_peft_adapter, one_line_error, save_base, tiny_gpt2

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real PEFT LoRA on a tiny GPT-2 (Conv1D), rank 2."""
    d = tmp_path_factory.mktemp("good")
    return make_peft_adapter(tiny_gpt2(), d / "good", r=2, lora_alpha=4)


@pytest.fixture
def bad(good, tmp_path) -> Path:
    """A fresh copy of ``good`` for a test to break."""
    return Path(shutil.copytree(good, tmp_path / "bad"))


def run_error(capsys, argv, *must_contain):
    """Run the CLI, expect exit 2 and one clean line; return that line."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loramix: error: ")
    assert "Traceback" not in err and "Traceback" not in out
    for s in must_contain:
        assert str(s) in lines[0], (s, lines[0])
    return lines[0]


def assert_debug_traceback(argv):
    """With --debug the same error propagates (the console script prints its
    traceback)."""
    with pytest.raises(LoramixError):
        main(["--debug", *argv])


def edit_tensors(folder: Path, fn) -> None:
    t = load_file(str(folder / WEIGHTS))
    fn(t)
    save_file(t, str(folder / WEIGHTS))


def first_key(t: dict, part: str) -> str:
    return sorted(k for k in t if part in k)[0]


@pytest.mark.parametrize("cmd", ["inspect", "similarity"])
def test_missing_path(capsys, good, tmp_path, cmd):
    missing = tmp_path / "nope"
    argv = [cmd, str(missing)] + ([str(good)] if cmd == "similarity" else [])
    run_error(capsys, argv, missing, "no such file or folder")
    assert_debug_traceback(argv)


def test_folder_that_is_not_an_adapter(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_error(capsys, ["inspect", str(empty)], empty, "not an adapter folder", CONFIG)
    model_dir = save_base(tiny_gpt2(n_layer=1), tmp_path / "model")
    run_error(capsys, ["inspect", str(model_dir)], model_dir, "not an adapter folder")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    run_error(capsys, ["inspect", str(txt)], txt, "expected a folder or a .safetensors file")


def test_a_named_peft_adapter_is_pointed_to_in_its_subfolder(capsys, tmp_path):
    """PEFT's ``save_pretrained`` writes an adapter named other than
    ``default`` into ``folder/NAME/``; the parent folder was refused as 'no
    adapter_config.json' with no word of where the adapter is."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(n_layer=1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(copy.deepcopy(model), cfg, adapter_name="law").save_pretrained(str(tmp_path / "ad"))
    parent, sub = tmp_path / "ad", tmp_path / "ad" / "law"
    assert (sub / CONFIG).is_file() and not (parent / CONFIG).exists()  # PEFT's layout, as saved
    for argv in (
        ["inspect", parent],
        ["similarity", parent, sub],
        ["sum", sub, parent, "--out", tmp_path / "o"],
    ):
        run_error(
            capsys,
            [str(a) for a in argv],
            f"{parent}: not an adapter folder: no {CONFIG}",
            f"subfolder: pass {sub}",
        )
    assert not (tmp_path / "o").exists()
    assert main(["inspect", str(sub)]) == 0 and "transformer.h.0.attn.c_attn" in capsys.readouterr().out


def test_a_trainers_output_dir_points_to_its_last_checkpoint(capsys, tmp_path):
    """A transformers Trainer's ``output_dir`` holds ``checkpoint-N``
    subfolders, each an adapter: it was called 'a named adapter' PEFT saved
    and listed in string order (``checkpoint-10`` before ``checkpoint-5``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = get_peft_model(tiny_gpt2(n_layer=1), cfg)
    run = tmp_path / "run"
    for step in (5, 10):
        pm.save_pretrained(str(run / f"checkpoint-{step}"))
    for argv in (["inspect", run], ["sum", run, run / "checkpoint-5", "--out", tmp_path / "o"]):
        run_error(
            capsys,
            [str(a) for a in argv],
            f"{run}: not an adapter folder: no {CONFIG}",
            f"it holds 2 training checkpoint(s) (a Trainer's output_dir): pass one, e.g. the last, "
            f"{run / 'checkpoint-10'}",
        )
    assert not (tmp_path / "o").exists()


def test_config_without_weights(capsys, bad):
    (bad / WEIGHTS).unlink()
    run_error(capsys, ["inspect", str(bad)], bad, f"no {WEIGHTS}")


def test_invalid_config_json(capsys, bad):
    (bad / CONFIG).write_text("{not json")
    run_error(capsys, ["inspect", str(bad)], bad / CONFIG, "not valid JSON")


def test_corrupt_safetensors(capsys, bad):
    (bad / WEIGHTS).write_bytes(b"\x00\x01garbage, not safetensors" * 10)
    argv = ["inspect", str(bad)]
    run_error(capsys, argv, bad / WEIGHTS, "corrupt or truncated")
    assert_debug_traceback(argv)


def test_truncated_safetensors(capsys, bad, good):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    run_error(capsys, ["similarity", str(good), str(bad)], bad / WEIGHTS, "corrupt or truncated")
    # cut inside the JSON header too
    (bad / WEIGHTS).write_bytes(data[:20])
    run_error(capsys, ["inspect", str(bad)], bad / WEIGHTS, "corrupt or truncated")


def test_rank_disagrees_with_config(capsys, bad):
    cfg = json.loads((bad / CONFIG).read_text())
    cfg["r"] = 3
    (bad / CONFIG).write_text(json.dumps(cfg))
    run_error(capsys, ["inspect", str(bad)], bad / WEIGHTS, "config and tensors disagree", "rank 2", "says 3")


def test_rank_pattern_disagrees_with_tensors(capsys, bad):
    cfg = json.loads((bad / CONFIG).read_text())
    cfg["rank_pattern"] = {"h.1.mlp.c_fc": 4}
    (bad / CONFIG).write_text(json.dumps(cfg))
    run_error(capsys, ["inspect", str(bad)], bad / WEIGHTS, "transformer.h.1.mlp.c_fc", "says 4")


def test_lora_a_without_lora_b(capsys, bad):
    def drop(t):
        del t[first_key(t, "lora_B")]

    edit_tensors(bad, drop)
    run_error(
        capsys,
        ["inspect", str(bad)],
        bad / WEIGHTS,
        "has lora_A but no lora_B",
        "transformer.h.0.attn.c_attn",
    )


def test_factor_ranks_disagree(capsys, bad):
    def widen(t):
        k = first_key(t, "lora_B")
        t[k] = torch.randn(t[k].shape[0], 3)

    edit_tensors(bad, widen)
    run_error(capsys, ["inspect", str(bad)], bad / WEIGHTS, "lora_A has rank 2 but lora_B has rank 3")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values(capsys, bad, good, value):
    def poison(t):
        k = first_key(t, "mlp.c_fc.lora_A")
        t[k][0, 1] = value

    edit_tensors(bad, poison)
    run_error(capsys, ["similarity", str(good), str(bad)], bad / WEIGHTS, "non-finite", "mlp.c_fc.lora_A")


def test_adapters_for_different_bases(capsys, good, tmp_path):
    other = make_peft_adapter(tiny_gpt2(n_embd=48), tmp_path / "wide", r=2)
    argv = ["similarity", str(good), str(other)]
    line = run_error(capsys, argv, other, good, "different base models", "transformer.h.0.attn.c_attn")
    assert "144x48" in line and "96x32" in line
    assert_debug_traceback(argv)


def test_unsupported_feature_named(capsys, tmp_path):
    # DoRA is read now (tests/test_formats.py); LoRA biases are still refused
    biased = make_peft_adapter(tiny_gpt2(), tmp_path / "biased", r=2, lora_bias=True)
    run_error(
        capsys, ["inspect", str(biased)], biased, "not supported: LoRA biases", "transformer.h.0.attn.c_attn"
    )


def test_similarity_usage_errors(capsys, good, tmp_path):
    run_error(capsys, ["similarity", str(good)], "needs at least two adapters")
    plot = tmp_path / "sim.png"
    plot.write_bytes(b"old")
    run_error(capsys, ["similarity", str(good), str(good), "--plot", str(plot)], plot, "--force")
    assert plot.read_bytes() == b"old"
    run_error(capsys, ["similarity", str(good), str(good), "--device", "tpu"], "--device", "tpu")


def _python_m(*args):
    return subprocess.run(
        [sys.executable, "-m", "loramix", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_real_process_exit_code_and_traceback(bad):
    (bad / WEIGHTS).write_bytes(b"garbage")
    p = _python_m("inspect", str(bad))
    assert p.returncode == 2
    assert (
        p.stderr.strip().splitlines() == [p.stderr.strip()]
        and f"loramix: error: {bad / WEIGHTS}: not a valid safetensors file" in p.stderr
    )
    assert "Traceback" not in p.stderr
    p = _python_m("--debug", "inspect", str(bad))
    assert p.returncode != 0 and "Traceback" in p.stderr and "AdapterError" in p.stderr


def test_missing_base_folder(capsys, good, tmp_path):
    missing = tmp_path / "no-base"
    run_error(capsys, ["similarity", str(good), str(good), "--base", str(missing)], missing, "no such folder")


@pytest.mark.parametrize("cmd", ["plan", "predict"])
def test_calibration_tokens_below_one(capsys, good, tmp_path, cmd):
    """plan's --tokens was a bare int: 0 or -5 passed whenever no calibration
    pass ran (no data-aware predictor), where predict's is refused by its range."""
    other = make_peft_adapter(tiny_gpt2(), tmp_path / "other", r=2, lora_alpha=4, seed=1)
    fit = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json"
    argv = [cmd, str(good), str(other), "--fit", str(fit), "--tokens", "0"]
    run_error(capsys, argv, "--tokens", "0 is not in the range x>=1")


@pytest.mark.parametrize(
    ("args", "flag", "words"),
    [(["train", "--epochs", "1e300"], "--epochs", "1e+300 epochs is more than the 1,000,000,000 optimizer steps"),
     (["train", "--steps", "10000000000"], "--steps", "1e+10 steps is more than"),
     (["train", "--warmup", "10000000000"], "--warmup", "1e+10 steps is more than"),
     (["train", "--lr", "1e300"], "--lr", "within float32's range"),
     (["train", "--threads", "100000"], "--threads", "must be at most"),
     (["train", "--threads", "99999999999999999999"], "--threads", "must be at most"),
     (["eval", "--threads", "100000"], "--threads", "must be at most"),
     (["sum", "--threads", "100000"], "--threads", "must be at most"),
     (["base", "build", "--steps", "10000000000"], "--steps", "1e+10 steps is more than"),
     (["scenario", "check", "--jobs", "100000"], "--jobs", "must be at most"),
     (["scenario", "check", "--threads", "100000"], "--threads", "must be at most")],
)  # fmt: skip
def test_absurd_numbers_are_refused_before_any_work(capsys, good, tmp_path, args, flag, words):
    """A number no run can mean, refused in one line naming its flag before
    anything is read or written. The old code took --epochs 1e300 (and
    --steps 1e10: a run no loop ends), failed at the first optimizer step of
    --lr 1e300 with torch's traceback, and set torch to --threads 100000 (the
    process died of a segmentation fault; a number past 64 bits was a
    traceback). A negative weight, a budget or a large batch stays meaningful
    and is not among these."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "v"\n[base.build]\nsteps = 5\n[domains.a]\ndata = "synthetic:arith"\ntrain = 10\n'
                        'eval = 5\n[domains.b]\ndata = "synthetic:units"\ntrain = 10\neval = 5\n')  # fmt: skip
    out = tmp_path / "out"
    rest = {
        "train": ["--base", tmp_path / "base", "--data", "synthetic:arith?n=20", "--out", out],
        "eval": ["--base", tmp_path / "base", "--data", "synthetic:arith?n=20"],
        "sum": [good, good, "--out", out],
        "base": ["--data", "synthetic:arith?n=20", "--out", out],
        "scenario": [scenario],
    }[args[0]]
    line = one_line_error(capsys, [*args, *rest], flag, words)
    assert line.startswith(f"loramix: error: {flag}:"), line
    assert not out.exists()
