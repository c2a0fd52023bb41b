"""loramix.train and ``loramix train``: outputs, PEFT compatibility, reproducibility, learning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from loramix.cli import main
from loramix.io.adapter_files import load_adapter
from loramix.io.safetensors_io import file_sha256
from loramix.layers import attach_adapters, merge_into_model
from loramix.models import TOKENIZER_FILES
from loramix.train import lr_at, train_adapter

from .factories import SHARED_DATA, save_base, tiny_gpt2, tiny_llama, write_jsonl

ARITH = "synthetic:arith?n=240"
UNITS = "synthetic:units?n=240"
FAST = dict(steps=6, batch=8, max_len=48, rank=4, alpha=8, progress=False, eval_size=16)


def make_tiny_base(folder: Path, arch: str) -> Path:
    """A random tiny GPT-2 or Llama with a small BPE tokenizer trained on synthetic text."""
    from loramix.basebuild import train_tokenizer
    from loramix.data import load_records, record_text

    texts = [record_text(r) for spec in (ARITH, UNITS) for r in load_records(spec)]
    tok = train_tokenizer(texts, 300, 64)
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(vocab_size=len(tok))
    save_base(model, folder)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {a: make_tiny_base(root / a, a) for a in ("gpt2", "llama")}


def _logits_ids(tok_folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_folder))
    return tok(["Question: What is 12 plus 7?\nAnswer: 19", "Question: Convert 3 km\nAnswer:"],
               return_tensors="pt", padding=True)["input_ids"]  # fmt: skip


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_lr_schedule():
    lrs = [lr_at(s, lr=1.0, warmup=4, total=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adapter_loads_in_peft_with_same_logits(bases, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = bases[arch]
    out = tmp_path / "a"
    train_adapter(base, ARITH, out=out, lr=2e-2, **FAST)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")

    ids = _logits_ids(base)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()
    ours = attach_adapters(AutoModelForCausalLM.from_pretrained(str(base)).eval(), [load_adapter(out)])
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        y_peft, y_ours, y_base = pm(ids).logits, ours(ids).logits, plain(ids).logits
        assert _rel(y_ours, y_peft) < 1e-5
        assert _rel(y_ours, y_base) > 1e-3  # the adapter does something
        merged = AutoModelForCausalLM.from_pretrained(str(base)).eval()
        merge_into_model(merged, [load_adapter(out)])
        assert _rel(merged(ids).logits, pm.merge_and_unload()(ids).logits) < 1e-5


def test_outputs_and_provenance(bases, tmp_path):
    out = tmp_path / "a"
    res = train_adapter(bases["gpt2"], [ARITH, UNITS], out=out, **FAST)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loramix.json",
        "train_log.csv",
    ]
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert list(rows[0]) == ["step", "loss", "lr", "tokens", "seconds"]
    assert int(rows[-1]["tokens"]) == res["tokens"] > 0
    prov = json.loads((out / "loramix.json").read_text())
    assert prov["method"] == "train" and prov["parameters"]["rank"] == 4
    base_in, *data_in = prov["inputs"]
    assert base_in["kind"] == "base_model" and len(base_in["sha256"]) == 64
    # the tokenizer the data was read through, which the weights' hash leaves out
    base_folder = Path(bases["gpt2"])
    assert base_in["tokenizer"] and base_in["tokenizer"] == {
        f.name: file_sha256(f) for f in sorted(base_folder.iterdir()) if f.name in TOKENIZER_FILES
    }
    assert prov["software"]["torch"] == torch.__version__
    assert [d["name"] for d in data_in] == ["arith", "units"]
    assert all(len(d["records_sha256"]) == 64 and d["n_eval"] == 16 for d in data_in)
    assert prov["metrics"]["ppl_base"] == pytest.approx(res["ppl_base"])
    assert res["n_train"] == 2 * (240 - 16) and res["n_eval"] == 32
    # No existing output is replaced without force.
    from loramix.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        train_adapter(bases["gpt2"], ARITH, out=out, **FAST)


@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_same_seed_same_bytes(bases, tmp_path, method):
    runs = [train_adapter(bases["llama"], ARITH, out=tmp_path / f"r{i}", kind=method, seed=s, **FAST)
            for i, s in enumerate((3, 3, 4))]  # fmt: skip
    b = [(Path(r["out"]) / "adapter_model.safetensors").read_bytes() for r in runs]
    assert b[0] == b[1]
    assert b[0] != b[2]
    logs = [(Path(r["out"]) / "train_log.csv").read_text().splitlines() for r in runs[:2]]
    assert [row.rsplit(",", 1)[0] for row in logs[0]] == [row.rsplit(",", 1)[0] for row in logs[1]]


@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_training_lowers_heldout_perplexity(bases, tmp_path, method):
    res = train_adapter(
        bases["gpt2"], ARITH, out=tmp_path / "a", kind=method, steps=25, batch=8, max_len=48,
        rank=4, alpha=8, lr=1e-2, eval_size=24, progress=False,
    )  # fmt: skip
    assert res["ppl_adapter"] < 0.8 * res["ppl_base"]


def test_cli_train_and_bad_input(bases, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--base", str(bases["gpt2"]), "--data", ARITH, UNITS, "--out", str(out),
            "--kind", "d2lora", "--rank", "2", "--alpha", "4", "--tau", "0.25", "--steps", "3",
            "--batch", "4", "--max-len", "32", "--eval-size", "8", "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "held-out  perplexity" in text and "d2lora, rank 2" in text
    # how much of the data 3 steps of 4 saw: 464 training records, 116 steps an epoch
    assert "trained   3 steps of 4 records (0.026 epochs of the 464 training records) on " in text
    ad = load_adapter(out)
    assert ad.kind == "d2lora" and ad.config["tau"] == 0.25 and ad.config["r"] == 2
    assert json.loads((out / "loramix.json").read_text())["metrics"]["n_eval"] == 16

    def fails(argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err

    fails(args, "already exists")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    fails(["train", "--base", str(bases["gpt2"]), "--data", str(bad), "--out", str(tmp_path / "x")],
          "missing field 'answer'")  # fmt: skip
    (tmp_path / "notamodel").mkdir()
    fails(["train", "--base", str(tmp_path / "notamodel"), "--data", ARITH, "--out", str(tmp_path / "y")],
          "config.json")  # fmt: skip
    fails(["train", "--base", str(bases["gpt2"]), "--data", ARITH, "--out", str(tmp_path / "z"),
           "--targets", "q_proj"], "--targets")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_cli_train_says_the_batch_it_ran(bases, tmp_path, capsys):
    """A batch holds at most the training records there are: 3 records with
    the default --batch 16 ran steps of 3, and the summary said "2 steps of
    16 records (2 epochs of the 3 training records)"."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))  # fmt: skip
    args = ["train", "--base", str(bases["gpt2"]), "--data", str(data), "--eval-size", "0", "--max-len", "16",
            "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained   2 steps of 3 records (2 epochs of the 3 training records) on " in out, out
    assert main([*args, "--out", str(tmp_path / "b"), "--steps", "1", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained   1 step of 1 record (0.33 epochs of the 3 training records) on " in out, out


@pytest.mark.parametrize("kind", ["lora", "d2lora"])
def test_training_that_diverges_is_refused_naming_lr(bases, tmp_path, capsys, kind):
    """A learning rate so large that the loss or the factors stop being
    finite: one line naming --lr and the step, exit 2, nothing written (it
    named a lora_A tensor of the output before)."""
    out = tmp_path / "t"
    argv = ["train", "--base", str(bases["gpt2"]), "--data", ARITH, "--out", str(out), "--kind", kind,
            "--steps", "3", "--batch", "4", "--max-len", "32", "--eval-size", "8", "--quiet", "--lr", "1e30"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "diverged at step" in err and len(err.strip().splitlines()) == 1, err
    assert "lora_A" not in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_training_removes_the_folders_made_for_its_out(bases, tmp_path):
    """``train_adapter(out="new/sub/t")`` whose training fails (it diverges,
    or a notebook's Ctrl-C) left the empty folders ``new/sub``, made for the
    live train_log beside the output: now removed with that log, as every
    other output's (README, Conventions), and the error is the same."""
    import loramix
    from loramix.errors import LoramixError

    out = tmp_path / "new" / "sub" / "t"
    with pytest.raises(LoramixError, match=r"^lr: training diverged at step"):
        loramix.train_adapter(str(bases["gpt2"]), ARITH, out=out, steps=3, batch=4, max_len=32, eval_size=8,
                              lr=1e30, device="cpu", progress=False)  # fmt: skip
    import gc

    gc.collect()  # the log goes when its run is collected (the traceback may hold it until then)
    assert list(tmp_path.iterdir()) == []


def test_eval_size_beyond_the_records_names_the_option(bases, tmp_path, capsys):
    """All records held out: the one line names --eval-size (it said eval_size)."""
    data = write_jsonl(tmp_path / "two.jsonl", [{"question": "q", "answer": "a"}] * 2)
    out = tmp_path / "t"
    assert main(["train", "--base", str(bases["gpt2"]), "--data", str(data), "--out", str(out), "--eval-size", "2",
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert (
        err.startswith("loramix: error: --eval-size: 2 eval records leave no training records")
        and err.count("\n") == 1
    )
    assert not out.exists()


def test_trained_adapter_names_its_base_by_absolute_path(bases, tmp_path, monkeypatch):
    """``--base`` given relative to the working folder: the adapter's config
    names the base by its absolute path, so PEFT's AutoPeftModel finds it
    from another folder (it took the relative name for a Hub id)."""
    from peft import AutoPeftModelForCausalLM

    base, out = bases["llama"], tmp_path / "ad"
    monkeypatch.chdir(base.parent)
    assert main(["train", "--base", base.name, "--data", ARITH, "--out", str(out), "--steps", "1", "--batch", "4",
                 "--max-len", "32", "--eval-size", "8", "--quiet"]) == 0  # fmt: skip
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model.base_model.model.config.model_type == "llama"


def test_adapter_for_another_base_is_refused(bases, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loramix.errors import AdapterError

    out = tmp_path / "a"
    train_adapter(bases["gpt2"], ARITH, out=out, **FAST)
    other = AutoModelForCausalLM.from_pretrained(str(bases["llama"]))
    with pytest.raises(AdapterError, match="not in the base model") as e:
        attach_adapters(other, [load_adapter(out)])
    assert e.value.exit_code == 2
    capsys.readouterr()
    rc = main(["eval", "--base", str(bases["llama"]), "--adapter", str(out), "--data", ARITH, "--limit", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "made for another base" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- real data

DOMAINS = ["math", "medicine", "finance"]


@pytest.fixture(scope="module")
def real_base(tmp_path_factory) -> Path:
    """A tiny GPT-2 pre-trained briefly on all three domains (a minute or two)."""
    from loramix.basebuild import build_base
    from loramix.data import load_records

    # The last 300 records of each domain: disjoint from the first 600 the adapters use.
    recs = [r for d in DOMAINS for r in load_records(SHARED_DATA / f"{d}.jsonl")[-300:]]
    out = tmp_path_factory.mktemp("real") / "base"
    build_base(recs, out=out, size="tiny", steps=150, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("domain", DOMAINS)
def test_training_on_real_domain_lowers_its_perplexity(real_base, tmp_path, domain):
    res = train_adapter(
        real_base, SHARED_DATA / f"{domain}.jsonl", out=tmp_path / domain, limit=600, eval_size=80,
        steps=60, batch=16, max_len=128, lr=3e-3, progress=False,
    )  # fmt: skip
    assert res["ppl_adapter"] < res["ppl_base"], res


def _factors(folder: Path) -> dict:
    return {n: (m.A, m.B) for n, m in load_adapter(folder).modules.items()}


def _assert_same_factors(a: Path, b: Path, tol: float) -> None:
    fa, fb = _factors(a), _factors(b)
    assert sorted(fa) == sorted(fb)
    for n in fa:
        for x, y in zip(fa[n], fb[n]):
            torch.testing.assert_close(y, x, rtol=0, atol=tol)


def test_top_layers_train_from_the_cached_prefix_as_from_the_full_model(bases, tmp_path, monkeypatch):
    """--top-layers 1: adapters on the last block only, trained from cached states; the same
    factors and perplexities as the full forward with the same targets. The second run
    reads the prefix back: block 0 runs no forward there (the test compared the two
    runs' prefix_seconds, 3 ms against 55 ms or more here: a machine that paused the
    second run that long would fail it; speed is measured, not asserted)."""
    from loramix.prefix import clear_memory

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))  # not a prefix another test cached
    clear_memory()
    calls, handle = _block0_forwards()
    try:
        top = train_adapter(bases["llama"], ARITH, out=tmp_path / "top", top_layers=1, **FAST)
    finally:
        handle.remove()
    assert calls  # the first run computed its prefix
    names = sorted(load_adapter(tmp_path / "top").modules)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    full = train_adapter(bases["llama"], ARITH, out=tmp_path / "full", targets=names, **FAST)
    _assert_same_factors(tmp_path / "full", tmp_path / "top", 1e-5)
    assert top["ppl_base"] == pytest.approx(full["ppl_base"], rel=1e-5)
    assert top["ppl_adapter"] == pytest.approx(full["ppl_adapter"], rel=1e-5)
    assert top["settings"]["top_layers"] == 1 and top["input_tokens"] > top["tokens"] > 0
    assert top["input_tokens_per_second"] > top["tokens_per_second"] > 0
    calls, handle = _block0_forwards()
    try:
        train_adapter(bases["llama"], ARITH, out=tmp_path / "again", top_layers=1, **FAST)
    finally:
        handle.remove()
    assert calls == []  # the prefix came from the cache
    _assert_same_factors(tmp_path / "top", tmp_path / "again", 0)


def test_top_layers_short_run_computes_the_prefix_of_the_drawn_records_only(bases, tmp_path, monkeypatch):
    """One step of 2 records out of 18: the prefix ran over all 18 (on SmolLM2,
    176 records for 48 drawn took 70 s against 3.3 s of training). Now only
    over the drawn records (2 states on disk, besides the 2 eval records'):
    the same adapter bytes read back from the cache and computed without it,
    and the full forward's factors to rounding."""
    from safetensors.torch import load_file

    from loramix.prefix import clear_memory

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory()
    kw = {**FAST, "steps": 1, "batch": 2, "eval_size": 2}
    data = "synthetic:arith?n=20"
    top = train_adapter(bases["llama"], data, out=tmp_path / "top", top_layers=1, **kw)
    assert top["n_train"] == 18
    held = sorted(len(load_file(f)["lengths"]) for f in (tmp_path / "cache" / "prefix").glob("*.safetensors"))
    assert held == [2, 2], held  # the eval records' and the drawn records'
    clear_memory()
    train_adapter(
        bases["llama"], data, out=tmp_path / "again", top_layers=1, **kw
    )  # the drawn records' entry, from disk
    train_adapter(bases["llama"], data, out=tmp_path / "none", top_layers=1, prefix_cache=None, **kw)
    adapter = "adapter_model.safetensors"
    for other in ("again", "none"):
        assert (tmp_path / other / adapter).read_bytes() == (tmp_path / "top" / adapter).read_bytes()
    names = sorted(load_adapter(tmp_path / "top").modules)
    train_adapter(bases["llama"], data, out=tmp_path / "full", targets=names, **kw)
    _assert_same_factors(tmp_path / "full", tmp_path / "top", 1e-5)


def test_held_out_evaluation_runs_the_blocks_below_the_adapters_once(bases, tmp_path, monkeypatch):
    """Targets in block 1 alone, no --top-layers: the adapted model's held-out
    evaluation starts from the states entering block 1 that the base's
    evaluation computed, so block 0 runs once per training step and once per
    held-out batch (it ran twice per held-out batch: on SmolLM2 with the
    README's targets, 28 of the 30 blocks of the second pass). The same
    perplexities, exactly, and the same adapter bytes as the full forward."""
    import loramix.train as train_mod

    calls = []

    def count(module, args):
        if type(module).__name__ == "LlamaDecoderLayer" and module.self_attn.layer_idx == 0:
            calls.append(1)

    targets = ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        once = train_adapter(bases["llama"], ARITH, out=tmp_path / "once", targets=targets, **FAST)
    finally:
        handle.remove()
    held_out_batches = -(-FAST["eval_size"] // FAST["batch"])
    assert len(calls) == FAST["steps"] + held_out_batches
    monkeypatch.setattr(train_mod, "_held_out_prefix", lambda run: None)  # the full forward, twice
    twice = train_adapter(bases["llama"], ARITH, out=tmp_path / "twice", targets=targets, **FAST)
    assert (once["ppl_base"], once["ppl_adapter"]) == (twice["ppl_base"], twice["ppl_adapter"])
    assert once["ppl_adapter"] < once["ppl_base"]
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "once" / adapter).read_bytes() == (tmp_path / "twice" / adapter).read_bytes()


def test_top_layers_adapter_loads_in_peft_on_its_modules_only(bases, tmp_path):
    """--top-layers: target_modules lists the trained modules by full name,
    so PEFT wraps just those and finds every key (the last names alone made
    it wrap every layer and warn of missing keys); on every layer, the last
    names."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_adapter(bases["llama"], ARITH, out=tmp_path / "top", top_layers=1, **FAST)
    train_adapter(bases["llama"], ARITH, out=tmp_path / "all", **FAST)
    top = json.loads((tmp_path / "top" / "adapter_config.json").read_text())["target_modules"]
    assert top == sorted(load_adapter(tmp_path / "top").modules) and all(".layers.1." in n for n in top)
    every = json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    assert every and all("." not in n for n in every)
    for folder in ("top", "all"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(bases["llama"]), str(tmp_path / folder)
            )
        assert not [w for w in seen if "missing adapter keys" in str(w.message)], folder


def test_gradient_accumulation_gives_the_same_adapter(bases, tmp_path):
    train_adapter(bases["llama"], ARITH, out=tmp_path / "one", **FAST)
    train_adapter(bases["llama"], ARITH, out=tmp_path / "three", grad_accum=3, **FAST)
    _assert_same_factors(tmp_path / "one", tmp_path / "three", 1e-5)
    train_adapter(bases["llama"], ARITH, out=tmp_path / "ckpt", grad_checkpointing=True, **FAST)
    _assert_same_factors(tmp_path / "one", tmp_path / "ckpt", 1e-5)


def test_bfloat16_autocast_trains_close_to_float32(bases, tmp_path):
    a = train_adapter(bases["llama"], ARITH, out=tmp_path / "f32", **FAST)
    b = train_adapter(bases["llama"], ARITH, out=tmp_path / "bf16", dtype="bfloat16", **FAST)
    assert b["settings"]["dtype"] == "bfloat16"
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=0.02)
    assert b["ppl_adapter"] == pytest.approx(a["ppl_adapter"], rel=0.02)


def test_cli_speed_options_and_bad_values(bases, tmp_path, capsys):
    base = str(bases["llama"])
    args = ["train", "--base", base, "--data", ARITH, "--steps", "2", "--batch", "8", "--max-len", "48",
            "--rank", "4", "--eval-size", "8", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a"), "--top-layers", "1", "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    assert "input tokens/s" in out and "top 1 layers" in out
    scored = int(out.split(" scored tokens (those the loss counts)")[0].rsplit(" ", 1)[1].replace(",", ""))
    run = int(
        out.split(" input tokens (every token run, padding excluded; ")[0].rsplit(" ", 1)[1].replace(",", "")
    )
    assert 0 < scored < run, out  # a loss on the answers, a forward over prompts and answers
    for flag, value, msg in [("--top-layers", "3", "between 1 and"), ("--grad-accum", "9", "between 1 and"),
                             ("--dtype", "float16", "float16")]:  # fmt: skip
        assert main([*args, "--out", str(tmp_path / "b"), flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and msg in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--base", str(bases["gpt2"]), "--out", str(tmp_path / "c"), "--top-layers", "1"]) == 2
    assert "does not allow" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["t" * 255, "t" * 230 + "é" * 12])
def test_long_legal_out_name_works(bases, tmp_path, capsys, name):
    """Any name the file system allows: the live log beside the output
    (``<out>.train_log.<pid>.csv``) shortens a long one instead of failing
    with 'File name too long' on a file the user never named."""
    out = tmp_path / name
    args = ["train", "--base", str(bases["llama"]), "--data", ARITH, "--steps", "1", "--batch", "4",
            "--max-len", "32", "--eval-size", "0", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "train_log.csv").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_max_len_above_the_context_is_capped_and_said(bases, tmp_path, capsys):
    """--max-len above the model's positions (64 here) is capped there, as eval
    does; the record says so, and now the printed summary too."""
    args = ["train", "--base", str(bases["llama"]), "--data", ARITH, "--steps", "1", "--batch", "4",
            "--eval-size", "0", "--quiet"]  # fmt: skip
    assert main([*args, "--max-len", "100000", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "--max-len 100000 is above the model's context: 64 tokens used" in out, out
    assert json.loads((tmp_path / "a" / "loramix.json").read_text())["parameters"]["max_len"] == 64
    assert main([*args, "--max-len", "48", "--out", str(tmp_path / "b")]) == 0
    assert "above the model's context" not in capsys.readouterr().out


def test_records_cut_at_max_len_are_counted_and_said(bases, tmp_path, capsys):
    """Train says how many training and held-out records --max-len cut (eval
    did; train's held-out perplexity is at --max-len, so a reader needs it).
    Records of 3 + (i mod 12) words: at 16 tokens those above are cut, at the
    model's 64 none is; the counts agree with the tokenizer's lengths."""
    from transformers import AutoTokenizer

    from loramix.data import PROMPT_TEMPLATE

    rows = [{"question": "one " + "two " * (i % 12), "answer": "four"} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(str(bases["llama"]))
    # BOS (the tiny tokenizer adds none), prompt, answer, EOS; the split is seeded, so count all
    lengths = [len(tok(PROMPT_TEMPLATE.format(question=r["question"]), add_special_tokens=False)["input_ids"])
               + len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # fmt: skip
    assert tok.bos_token_id is None or not tok("x")["input_ids"][0] == tok.bos_token_id
    assert 0 < sum(n > 16 for n in lengths) < 40 and max(lengths) <= 64, lengths
    args = ["train", "--base", str(bases["llama"]), "--data", str(data), "--steps", "1", "--batch", "4",
            "--eval-size", "8", "--quiet"]  # fmt: skip
    assert main([*args, "--max-len", "16", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "a" / "loramix.json").read_text())["metrics"]
    assert (m["n_train"], m["n_eval"]) == (32, 8)
    assert m["n_train_truncated"] + m["n_eval_truncated"] == sum(n > 16 for n in lengths)
    said = (f"cut       {m['n_train_truncated']} of 32 training and {m['n_eval_truncated']} of 8 held-out "
            f"records at 16 tokens (--max-len)")  # fmt: skip
    assert said in out, out
    assert main([*args, "--max-len", "64", "--out", str(tmp_path / "b")]) == 0
    assert "cut " not in capsys.readouterr().out
    m = json.loads((tmp_path / "b" / "loramix.json").read_text())["metrics"]
    assert (m["n_train_truncated"], m["n_eval_truncated"]) == (0, 0)


@pytest.mark.parametrize("epochs", ["inf", "-inf", "nan", "0"])
def test_epochs_not_a_positive_finite_number_is_one_line(bases, tmp_path, capsys, epochs):
    """--epochs inf: one line naming --epochs, exit 2, nothing written (it
    loaded the base, then raised OverflowError from round(inf))."""
    out = tmp_path / "t"
    argv = ["train", "--base", str(bases["gpt2"]), "--data", ARITH, "--out", str(out), "--epochs", epochs,
            "--batch", "4", "--max-len", "32", "--eval-size", "8", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loramix: error: --epochs:") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["lora", "d2lora"])
def test_same_inputs_named_relatively_give_the_same_bytes(bases, tmp_path, monkeypatch, kind):
    """README: input paths are recorded absolute, so the same inputs named
    relatively or absolutely give byte-identical weight files. The data
    file's path was recorded as typed and the base's as ``given``, both in
    the safetensors metadata."""
    import shutil

    from safetensors import safe_open

    shutil.copytree(bases["gpt2"], tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)}
                                              for i in range(12)])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    opts = dict(kind=kind, steps=2, batch=4, max_len=32, rank=2, alpha=4, eval_size=0, progress=False)
    train_adapter("base", "d.jsonl", out=tmp_path / "rel", **opts)
    train_adapter(str(tmp_path / "base"), str(data), out=tmp_path / "abs", **opts)
    files = [(tmp_path / d / "adapter_model.safetensors") for d in ("rel", "abs")]
    with safe_open(str(files[0]), "pt") as f:
        inputs = json.loads(f.metadata()["loramix"])["inputs"]
    assert [i["path"] for i in inputs] == [str(tmp_path / "base"), str(data)]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_training_a_tied_head_says_merging_differs(bases, tmp_path, capsys):
    """GPT-2's lm_head is tied to wte: an adapter on it is trained on the head
    alone (as PEFT applies it), but merging changes the shared weight, so a
    merged model differs; train says so in one warning line. No warning
    without the head (--top-layers refuses the head: tests/test_prefix.py)."""
    from loramix.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)}
                                              for i in range(12)])  # fmt: skip
    common = ["--base", str(bases["gpt2"]), "--data", str(data), "--steps", "1", "--batch", "4", "--max-len", "32",
              "--eval-size", "0", "--quiet"]  # fmt: skip
    assert main(["train", *common, "--targets", "c_attn,lm_head", "--out", str(tmp_path / "a")]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warned == [
        "loramix: warning: target lm_head is tied to the input embedding: the adapter is trained on the head "
        "alone (as PEFT applies it on the fly), but merging it changes the shared weight, so merged (evaluate "
        "merged=True, eval --merged) it is another model, and a sum into the base (sum_into_base, sum --into) "
        "refuses it"
    ], warned
    assert main(["train", *common, "--targets", "c_attn", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--tau", "0.3"], ["--norm-dim", "0"]])
def test_d2_options_for_a_lora_are_refused(bases, tmp_path, capsys, flag):
    """--tau and --norm-dim shape D2-LoRA only: given for a LoRA they were
    ignored without a word; now one line naming the flag, exit 2, nothing
    written."""
    from loramix.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 4)
    rc = main(
        ["train", "--base", str(bases["gpt2"]), "--data", str(data), "--out", str(tmp_path / "o"), *flag]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err == f"loramix: error: {flag[0]}: applies to --kind d2lora only (a LoRA has no such " \
                              "option)\n", err  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_misspelt_target_among_good_ones_is_refused(bases, tmp_path, capsys):
    """--targets q_proj,v_prj: the misspelt entry matched nothing and was
    dropped without a word (an adapter on q_proj alone was written); a
    scenario's adapters.targets already refused it. Now one line naming the
    entry, exit 2, nothing written."""
    from loramix.cli import main

    out = tmp_path / "o"
    rc = main(["train", "--base", str(bases["llama"]), "--data", ARITH, "--out", str(out),
               "--targets", "q_proj,v_prj", "--steps", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("loramix: error: --targets: 'v_prj' matches no module of the model"), err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, line",
    [(["--alpha", "0"], "--alpha: must be above 0, got 0.0"),
     (["--alpha", "-2"], "--alpha: must be above 0, got -2.0"),
     # alpha / r below float32's range: the adapter was written, then refused by every reader
     (["--alpha", "1e-40"], "--alpha: --alpha / --rank = 1.25e-41 is below float32's range"),
     (["--rank", "99999"], "--rank: 99999 is above "),
     (["--targets", ""], "--targets: names no module"),  # an unset $T: the defaults, silently
     (["--targets", " , "], "--targets: names no module"),
     # the negative branch's weight: below 0 a second positive branch (a scenario's tau is refused so)
     (["--kind", "d2lora", "--tau", "-1"], "--tau: must be 0 or more and within float32's range, got -1.0")],
)  # fmt: skip
def test_settings_that_train_nothing_useful_are_refused(bases, tmp_path, capsys, args, line):
    """``--alpha 0`` trained an adapter that does nothing (a negative one, its
    mirror) and ``--rank`` above a targeted weight's smaller dimension only
    added parameters; a scenario's ``adapters.alpha`` and ``adapters.rank``
    refuse both. An empty ``--targets`` (an unset shell variable) trained on
    the architecture's defaults. ``--alpha 1e-40`` wrote an adapter that
    ``inspect``, ``sum``, ``eval``... refuse (its scale below float32's range).
    Each is now one line, exit 2, nothing written."""
    from loramix.cli import main

    out = tmp_path / "o"
    rc = main(["train", "--base", str(bases["llama"]), "--data", ARITH, "--out", str(out), "--steps", "1",
               "--quiet", *args])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"loramix: error: {line}"), err
    assert not out.exists()


def test_train_into_a_read_only_folder_names_the_output(bases, read_only_folder, capsys):
    """``train --out RO/a`` (RO read-only): one line naming the output, as
    ``sum --out`` says it. It named the live training log beside it
    (``RO/a.train_log.<pid>.csv: Read-only file system``), a file the user
    never asked for."""
    out = read_only_folder / "a"
    rc = main(["train", "--base", str(bases["llama"]), "--data", ARITH, "--out", str(out), "--steps", "1",
               "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"loramix: error: {out}: cannot write beside it: Read-only file system"), err
    assert list(read_only_folder.iterdir()) == []


def test_top_layers_prefix_shows_a_bar_on_a_terminal(bases, tmp_path):
    """train --top-layers runs the frozen layers over every record first: on
    SmolLM2 (200 records, --max-len 96) 76-104 s with nothing on the terminal
    before the training bar. Now a bar of the records run, as eval has; not
    with --quiet."""
    from .test_eval import _on_a_terminal

    common = ["train", "--base", str(bases["llama"]), "--top-layers", "1", "--steps", "1", "--batch", "8",
              "--max-len", "32", "--eval-size", "8"]  # fmt: skip
    err = _on_a_terminal([*common, "--data", "synthetic:arith?n=60&seed=11", "--out", str(tmp_path / "a")])
    assert "prefix (layers 0-0, once)" in err and "record" in err, err
    err = _on_a_terminal([*common, "--data", "synthetic:arith?n=60&seed=12", "--out", str(tmp_path / "b"),
                          "--quiet"])  # fmt: skip
    assert "prefix" not in err, err


def test_the_bars_loss_is_the_summarys_final_loss(bases, tmp_path):
    """The bar's loss was an average seeded with the first step's loss: at the
    end of 12 steps on SmolLM2 it read 3.387 where the summary's final loss
    (the mean of the last 10 steps) was 2.575. Now the bar shows that mean."""
    import csv
    import re

    from .test_eval import _on_a_terminal

    out = tmp_path / "a"
    err = _on_a_terminal(["train", "--base", str(bases["llama"]), "--data", "synthetic:arith?n=80&seed=3", "--out",
                          str(out), "--steps", "12", "--batch", "4", "--max-len", "32", "--eval-size", "0",
                          "--lr", "0.01"])  # fmt: skip
    losses = [float(r["loss"]) for r in csv.DictReader((out / "train_log.csv").open())]
    shown = re.findall(r"12/12 \[[^]]*loss=([0-9.]+)", err)
    assert shown and float(shown[-1]) == pytest.approx(sum(losses[-10:]) / 10, abs=6e-4), (shown, losses)
    assert json.loads((out / "loramix.json").read_text())["metrics"]["final_loss"] == pytest.approx(
        sum(losses[-10:]) / 10, abs=1e-6
    )


def test_gradient_accumulation_on_a_last_batch_smaller_than_the_micro_batches(bases, tmp_path):
    """The epoch's last batch may hold fewer records than --grad-accum: 109
    training records in batches of 8 leave 5 for the last, cut into 8
    micro-batches (three of them empty: a RuntimeError from max() before);
    the same adapter as without accumulation."""
    kw = {**FAST, "steps": 14, "eval_size": 16}
    data = "synthetic:arith?n=125"  # 109 training records: 13 batches of 8 and one of 5
    one = train_adapter(bases["llama"], data, out=tmp_path / "one", **kw)
    eight = train_adapter(bases["llama"], data, out=tmp_path / "eight", grad_accum=8, **kw)
    assert one["n_train"] == 109 and eight["steps"] == 14
    _assert_same_factors(tmp_path / "one", tmp_path / "eight", 1e-5)


@pytest.mark.parametrize("kind", ["lora", "d2lora"])
def test_the_function_and_the_command_write_the_same_bytes(bases, tmp_path, kind):
    """``train_adapter`` with its defaults and ``loramix train`` with the same
    options write byte-identical weight files. The record held the Python
    arguments as given, ``"alpha": 16`` and ``"epochs": 1``, where the command
    wrote ``16.0`` and ``1.0``: the same tensors in files that differed."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i} plus 2?", "answer": str(i + 2)}
                                              for i in range(12)])  # fmt: skip
    train_adapter(
        bases["gpt2"], data, out=tmp_path / "py", kind=kind, batch=4, max_len=32, eval_size=0, progress=False
    )
    assert main(["train", "--base", str(bases["gpt2"]), "--data", str(data), "--out", str(tmp_path / "cli"),
                 "--kind", kind, "--batch", "4", "--max-len", "32", "--eval-size", "0", "--quiet"]) == 0  # fmt: skip
    py, cli = ((tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("py", "cli"))
    assert py == cli


def test_a_loaded_copy_of_the_base_trains_the_same_bytes(bases, tmp_path):
    """``loaded`` (a study's copy of the base it holds) gives the adapter and log
    that loading the base folder gives, byte for byte."""
    import copy

    from loramix.models import load_causal_lm

    held = load_causal_lm(bases["gpt2"])
    runs = [train_adapter(bases["gpt2"], [ARITH, UNITS], out=tmp_path / f"r{i}", loaded=loaded, **FAST)
            for i, loaded in enumerate((None, (copy.deepcopy(held[0]), held[1])))]  # fmt: skip
    files = [(Path(r["out"]) / "adapter_model.safetensors").read_bytes() for r in runs]
    assert files[0] == files[1]
    assert runs[0]["ppl_adapter"] == runs[1]["ppl_adapter"] and runs[0]["ppl_base"] == runs[1]["ppl_base"]
    held_names = {n for n, _ in held[0].named_modules()}
    assert not any("lora" in n for n in held_names)  # the copy was trained, not the held model


def test_the_loops_fast_paths_give_the_bytes_of_the_plain_ones(bases, tmp_path, monkeypatch):
    """The loop's AdamW updates all factors per op (``foreach``) and a batch
    without micro-batches is passed as views: the bytes the single-tensor
    AdamW (torch's CPU default) and the copied batch give."""
    import loramix.train as tr

    kw = {**FAST, "steps": 12, "eval_size": 0}
    fast = train_adapter(bases["gpt2"], ARITH, out=tmp_path / "fast", **kw)
    plain_adamw = torch.optim.AdamW

    def single_tensor(*a, **k):
        return plain_adamw(*a, **{**k, "foreach": False})

    monkeypatch.setattr(torch.optim, "AdamW", single_tensor)
    views = tr._micro_batches
    monkeypatch.setattr(tr, "_micro_batches", lambda b, micro: [{k: v.clone() for k, v in p.items()}
                                                                 for p in views(b, micro)])  # fmt: skip
    plain = train_adapter(bases["gpt2"], ARITH, out=tmp_path / "plain", **kw)
    a, b = ((Path(r["out"]) / "adapter_model.safetensors").read_bytes() for r in (fast, plain))
    assert a == b


STUDY_TOP = """
name = "top"
[base]
path = "{base}"
[domains.arith]
data = "synthetic:arith"
train = 8
eval = 4
[domains.units]
data = "synthetic:units"
train = 8
eval = 4
[adapters]
rank = 2
alpha = 4
steps = 2
batch = 4
max_len = 48
top_layers = 1
init = ["data", "shared"]
[merge]
methods = ["sum"]
"""


def test_study_trainings_share_the_base_prefix_and_hash_it_once(bases, tmp_path, monkeypatch):
    """A study's trainings (``scenario run``, one process) train copies of
    the held base that share its embedding and blocks below the top layers
    (``StepContext.base_copy``): the prefix's weights are hashed once in the
    run, not once more per adapter (4 here), and each adapter is the bytes of
    a training that loads the base itself."""
    from loramix import prefix
    from loramix.models import load_causal_lm
    from loramix.scenario.steps import StepContext

    base = bases["llama"]
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cd"))
    prefix.clear_memory()
    hashed = []
    real = prefix._hash_tensor
    monkeypatch.setattr(prefix, "_hash_tensor", lambda h, t: (hashed.append(1), real(h, t)))
    scen = tmp_path / "s.toml"
    scen.write_text(STUDY_TOP.format(base=base))
    args = ["scenario", "run", str(scen), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    assert main([*args, "--jobs", "1", "--quiet"]) == 0
    model, _ = load_causal_lm(base)
    assert len(hashed) == len(
        prefix._prefix_tensors(model, 1)
    )  # one digest of blocks 0 .. 0 and the embedding
    ctx = StepContext(None, {}, None, "cpu")
    held, _ = ctx.base_model(str(base))
    copy_, _ = ctx.base_copy(str(base), top_layers=1)
    shared = {id(t) for t in held.parameters()}
    assert copy_.model.embed_tokens.weight is held.model.embed_tokens.weight
    assert all(id(p) in shared for p in copy_.model.layers[0].parameters())
    assert not any(id(p) in shared for p in copy_.model.layers[1].parameters())
    # trained twice on copies sharing the prefix (the first leaves it as it was), and on its own load
    kw = dict(top_layers=1, rank=2, alpha=4, steps=2, batch=4, max_len=48, eval_size=4, progress=False)
    for out in ("copy1", "copy2"):
        train_adapter(base, ARITH, out=tmp_path / out, loaded=ctx.base_copy(str(base), 1), **kw)
    train_adapter(base, ARITH, out=tmp_path / "alone", **kw)
    blob = [(tmp_path / o / "adapter_model.safetensors").read_bytes() for o in ("copy1", "copy2", "alone")]
    assert blob[0] == blob[1] == blob[2]
    prefix.clear_memory()


def test_study_features_run_the_held_base_not_a_second_load(bases, tmp_path, monkeypatch):
    """The features step's calibration (``[predictors]``) runs the base the
    process already holds: one load of the base in the whole run (was one
    more per features step, 1-2 s each on SmolLM2)."""
    from loramix import models

    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    scen = tmp_path / "s.toml"
    scen.write_text(STUDY_TOP.format(base=bases["llama"]) + "[predictors]\ntokens = 32\n")
    args = ["scenario", "run", str(scen), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    assert main([*args, "--jobs", "1", "--quiet"]) == 0
    assert (tmp_path / "c" / "features").is_dir() and len(loads) == 1, loads


def _prefix_of(base, data, *, steps, prefix_cache=None, eval_size=4):
    """The prepared run of a ``top_layers=1`` training on ``data``: its
    training examples and the states entering block 1 its steps use."""
    from loramix.data import data_list
    from loramix.train import _prepare

    fields = dict(question_field="question", answer_field="answer", context_field="context")
    return _prepare(str(base), data_list(data), targets=None, fields=fields, eval_size=eval_size, seed=0,
                    limit=None, max_len=48, batch=8, on="answer", device="cpu", top_layers=1,
                    prefix_cache=prefix_cache, steps=steps)  # fmt: skip


def _block0_forwards():
    """A list that gets one entry per forward of block 0 (the prefix of ``top_layers=1``
    on the tiny Llama), and the hook's handle."""
    calls = []

    def count(module, args):
        if type(module).__name__ == "LlamaDecoderLayer" and module.self_attn.layer_idx == 0:
            calls.append(1)

    return calls, torch.nn.modules.module.register_module_forward_pre_hook(count)


def _two_sources(folder: Path) -> tuple[str, str]:
    """Two data files of 44 records each, of lengths from a few tokens to ``max_len``: the
    union's batches, sorted by length across both, pad other rows than each file's alone."""
    import random

    words = "the a one two three of and is to in cents pretzels kilograms grams water liters".split()
    g = random.Random(0)

    def rows(n_words):
        return [{"question": " ".join(g.choices(words, k=g.randint(*n_words))), "answer": " ".join(g.choices(words, k=g.randint(1, 4)))}
                for _ in range(44)]  # fmt: skip

    return (str(write_jsonl(folder / "short.jsonl", rows((1, 5)))),
            str(write_jsonl(folder / "long.jsonl", rows((2, 14)))))  # fmt: skip


def test_a_union_trains_on_its_sources_own_prefix_states(bases, tmp_path, monkeypatch):
    """A run on two sources (a study's merged-data adapter, ``train --data a
    --data b``) computed the prefix of the union as one list, sorted by length
    and batched across both, so its states were not the bits each source's
    own run had cached, and it ran the prefix again (21 of 43 s per union on
    SmolLM2, --top-layers 2). Now each source is a part of its own: the
    states the union's steps use are each source's alone, bit for bit (a
    source its 5 steps would pass over whole on its own is taken whole, as
    its own run takes it), and a union over sources already cached runs no
    prefix at all, its held-out records' too; the adapter is the bytes of
    the same union computed without the cache."""
    from loramix import prefix

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    prefix.clear_memory()
    a, b = _two_sources(tmp_path)  # 40 training records each: 5 batches of 8
    alone = [_prefix_of(bases["llama"], d, steps=5) for d in (a, b)]
    own = alone[0].train_states + alone[1].train_states
    assert [len(r.train_ex) for r in alone] == [40, 40] and all(s is not None for s in own)
    for steps in (10, 5):  # an epoch of the union; 5 of its 10 batches, which draw half its records
        union = _prefix_of(bases["llama"], [a, b], steps=steps)
        assert union.train_ex == alone[0].train_ex + alone[1].train_ex
        assert all(torch.equal(u, o) for u, o in zip(union.train_states, own, strict=True)), steps
    # one source: the states of its whole list, batched as one (as before)
    want = prefix.compute_states(alone[0].model, 1, alone[0].train_ex, batch_size=8, pad_id=alone[0].pad)
    assert all(torch.equal(s, w) for s, w in zip(alone[0].train_states, want, strict=True))

    kw = {**FAST, "steps": 5, "eval_size": 4}
    calls, handle = _block0_forwards()
    try:
        for d, out in ((a, "a"), (b, "b")):
            train_adapter(bases["llama"], d, out=tmp_path / out, top_layers=1, **kw)
        assert calls  # the sources' own runs computed their prefix
        calls.clear()
        prefix.clear_memory()  # from the disk cache
        train_adapter(bases["llama"], [a, b], out=tmp_path / "union", top_layers=1, **kw)
        assert calls == []
    finally:
        handle.remove()
    train_adapter(bases["llama"], [a, b], out=tmp_path / "none", top_layers=1, prefix_cache=None, **kw)
    blob = [(tmp_path / o / "adapter_model.safetensors").read_bytes() for o in ("union", "none")]
    assert blob[0] == blob[1]
    prefix.clear_memory()


def test_a_short_union_computes_the_drawn_records_of_a_large_source_only(bases, tmp_path):
    """Where a source is more than the run's steps pass over on their own (2
    steps of 8 against 40 records), the union computes the records it draws
    from it, each source's batched on their own, not the whole file: a union
    of large files trained for a few steps costs what it did."""
    from loramix import prefix

    a, b = _two_sources(tmp_path)
    union = _prefix_of(bases["llama"], [a, b], steps=2)
    got = [i for i, s in enumerate(union.train_states) if s is not None]
    assert 0 < len(got) <= 16
    for lo, hi in ((0, 40), (40, 80)):
        idx = [i for i in got if lo <= i < hi]
        want = prefix.compute_states(union.model, 1, [union.train_ex[i] for i in idx], batch_size=8,
                                     pad_id=union.pad)  # fmt: skip
        assert all(torch.equal(union.train_states[i], w) for i, w in zip(idx, want, strict=True))


def test_a_studys_merged_data_adapter_reuses_its_domains_prefix(bases, tmp_path, monkeypatch):
    """A study with ``top_layers``: its domain adapters (2 steps of 4 over
    their 8 records) cache each domain's prefix states; the merged-data
    adapters (2 steps over the union's 16) take them, adding no entry of
    their own to the prefix cache (one more before: the union's drawn
    records, batched across both domains)."""
    from safetensors.torch import load_file

    from loramix import prefix

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cd"))
    prefix.clear_memory()
    scen = tmp_path / "s.toml"
    scen.write_text(STUDY_TOP.format(base=bases["llama"]))
    args = ["scenario", "run", str(scen), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    assert main([*args, "--jobs", "1", "--quiet"]) == 0
    assert len(list((tmp_path / "c" / "adapter").glob("*/merged-data_*"))) == 2  # lora and lora:shared
    entries = sorted(len(load_file(f)["lengths"]) for f in (tmp_path / "cd" / "prefix").glob("*.safetensors"))
    assert entries == [4, 4, 8, 8], entries  # each domain's eval split and training records
    prefix.clear_memory()
