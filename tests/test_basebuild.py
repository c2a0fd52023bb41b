"""loramix.basebuild and ``loramix base build``: a loadable folder whose held-out perplexity beats its init."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from loramix.basebuild import BaseSize, build_base, lr_at
from loramix.cli import main
from loramix.errors import OutputError

from .factories import SHARED_DATA, write_jsonl

DATA = ["synthetic:arith?n=300", "synthetic:dates?n=300"]
# A very small GPT-2 for speed (the shipped sizes are checked by the CLI test and the benchmark).
MINI = BaseSize(n_layer=1, n_embd=32, n_head=2, ctx=64, vocab=400, steps=40, batch=8, lr=1e-2)
FAST = dict(size=MINI, progress=False, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bb") / "base"
    return out, build_base(DATA, out=out, **FAST)


def test_lr_schedule():
    lrs = [lr_at(s, steps=20, warmup=4, lr=1.0) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, steps=20, warmup=4, lr=1.0) == pytest.approx(0.1)


def test_folder_loads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, res = built
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loramix.json",
            "train_log.csv"} <= names  # fmt: skip
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folder left
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert tok.is_fast and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(tok) == res["vocab_size"]
    cfg = MINI
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (
        cfg.n_layer,
        cfg.n_embd,
        cfg.ctx,
    )
    text = "Question: How many days pass between May 1, 2001 and May 9, 2001?\nAnswer:"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_heldout_perplexity_beats_untrained_and_is_recorded(built):
    out, res = built
    assert res["heldout_ppl"] < 0.2 * res["untrained_ppl"]
    prov = json.loads((out / "loramix.json").read_text())
    assert prov["method"] == "base_build" and prov["parameters"]["steps"] == 40
    assert prov["results"]["heldout_ppl"] == pytest.approx(res["heldout_ppl"])
    assert [i["path"] for i in prov["inputs"]] == DATA
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert float(rows[-1]["running_loss"]) < float(rows[0]["loss"])
    # loramix's evaluation of the folder agrees with what the build reported
    from loramix.data import encode_records, make_batches, split_records
    from loramix.models import load_causal_lm
    from loramix.perplexity import perplexity

    model, tok = load_causal_lm(out)
    from loramix.data import load_records

    recs = [r for d in DATA for r in load_records(d)]
    _, held = split_records(recs, eval_size=res["heldout_records"], seed=0)
    b = make_batches(encode_records(tok, held, max_len=MINI.ctx, on="all"), batch_size=32, pad_id=tok.pad_token_id,
                     sort_by_length=True)  # fmt: skip
    assert perplexity(model, b)["ppl"] == pytest.approx(res["heldout_ppl"], rel=1e-5)


def test_refuses_existing_output(built):
    out, _ = built
    with pytest.raises(OutputError, match="already exists"):
        build_base(DATA, out=out, **FAST)


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    kw = dict(size=MINI, steps=5, progress=False)
    build_base(DATA, out=tmp_path / "a", seed=1, **kw)
    build_base(DATA, out=tmp_path / "b", seed=1, **kw)
    build_base(DATA, out=tmp_path / "c", seed=2, **kw)
    w = [(tmp_path / x / "model.safetensors").read_bytes() for x in "abc"]
    assert w[0] == w[1] != w[2]
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_cli_build_and_bad_data(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["base", "build", "--data", "synthetic:sort?n=120", "synthetic:units?n=120", "--out", str(out),
                 "--steps", "3", "--quiet"]) == 0  # fmt: skip
    assert "held-out perplexity" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()
    assert (
        main(
            ["base", "build", "--data", "synthetic:sort?n=120", "--out", str(out), "--steps", "3", "--quiet"]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert main(["base", "build", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"loramix: error: {tmp_path / 'bad.jsonl'}: line 1: missing field 'answer' (its fields: question)"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_build_on_real_data(tmp_path):
    from loramix.data import load_records

    recs = [
        r
        for n in ("math", "medicine", "finance")
        for r in load_records(SHARED_DATA / f"{n}.jsonl", limit=150)
    ]
    res = build_base(recs, out=tmp_path / "real", size=MINI, steps=60, progress=False)
    assert res["heldout_ppl"] < 0.5 * res["untrained_ppl"]


def test_same_data_named_relatively_gives_the_same_bytes(tmp_path, monkeypatch):
    """README: input paths are recorded absolute (loramix.json's inputs held
    the data path as typed), and the weights are the same bytes either way."""
    import json

    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    kw = dict(size=MINI, steps=2, progress=False)
    build_base("d.jsonl", out=tmp_path / "rel", **kw)
    build_base(str(data), out=tmp_path / "abs", **kw)
    rec = [json.loads((tmp_path / d / "loramix.json").read_text()) for d in ("rel", "abs")]
    assert [[i["path"] for i in r["inputs"]] for r in rec] == [[str(data)], [str(data)]]
    files = [tmp_path / d / "model.safetensors" for d in ("rel", "abs")]
    assert files[0].read_bytes() == files[1].read_bytes()
