"""``loramix fit``: a validated predictor from a user's own ``loramix eval`` results.

Real everything: a tiny GPT-2 base with its own tokenizer, real PEFT adapters,
the evaluations made by the CLI (on the fly, ``--merged`` and of a folder that
``sum --into`` wrote), then ``fit``, then ``predict --fit`` and ``plan --fit``
reading its folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from loramix.cli import main

from .factories import make_peft_adapter, one_line_error
from .test_eval import _make_base

DOMAINS = {d: f"synthetic:{d}?n=24&seed=5" for d in ("arith", "units", "dates", "sort")}
PAIRS = [("arith", "units"), ("arith", "dates"), ("arith", "sort"), ("units", "dates"), ("units", "sort")]


def _cli(args) -> str:
    """Run the CLI; its stdout (exit 0 asserted)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([str(a) for a in args])
    assert code == 0, (args, buf.getvalue())
    return buf.getvalue()


def _eval(base, out, data, *adapters, extra=()):
    args = ["eval", "--base", base, *(x for a in adapters for x in ("--adapter", a)), "--data", *data]
    out.write_text(_cli([*args, "--batch", "8", "--no-progress", "--format", "json", *extra]))
    return out


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """Four adapters (one per domain), each evaluated alone on its domain, and
    five pairs: four summed on the fly or --merged, one a `sum --into` folder."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("evalfit")
    base = _make_base(root / "base", "gpt2")
    model = AutoModelForCausalLM.from_pretrained(base)
    ads = {d: make_peft_adapter(model, root / d, seed=k, r=4, lora_alpha=8) for k, d in enumerate(DOMAINS)}
    ev = root / "evals"
    ev.mkdir()
    single = {d: _eval(base, ev / f"{d}.json", [DOMAINS[d]], ads[d]) for d in DOMAINS}
    merges = {}
    for k, (a, b) in enumerate(PAIRS[:-1]):
        extra = ("--merged",) if k % 2 else ()
        merges[a, b] = _eval(
            base, ev / f"{a}+{b}.json", [DOMAINS[a], DOMAINS[b]], ads[a], ads[b], extra=extra
        )
    a, b = PAIRS[-1]
    _cli(["sum", ads[a], ads[b], "--into", base, "--out", root / "merged", "--no-progress"])
    merges[a, b] = _eval(root / "merged", ev / f"{a}+{b}.json", [DOMAINS[a], DOMAINS[b]])
    return {"root": root, "base": base, "ads": ads, "single": single, "merges": merges}


def _files(bank, pairs=PAIRS):
    return [*bank["single"].values(), *(bank["merges"][p] for p in pairs)]


def test_fit_from_evaluations_is_read_by_predict_and_plan(bank, tmp_path):
    """Each point is the study's retention (from the files' perplexities) at the
    composition's RMS cosine (loramix.similarity's); predict and plan read the folder."""
    import loramix

    out = tmp_path / "fit"
    text = _cli(["fit", *_files(bank), "--out", out])
    assert "wrote" in text and "| arith+units | sum |" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "points.csv", "predictions.csv", "predictors.json", "validation.csv",
    ]  # fmt: skip
    d = json.loads((out / "predictors.json").read_text())
    assert d["target"] == "retention_pct (sum)" and d["adapter_kind"] == "lora" and d["base_identity"]
    assert set(d["by_method"]) == {"sum"} and len(d["fitted_from"]["points"]) == len(PAIRS)
    ppl = {dom: json.loads(f.read_text())["results"][0]["ppl"] for dom, f in bank["single"].items()}
    sim = loramix.similarity([bank["ads"][k] for k in DOMAINS], progress=False)
    names = list(sim.names)
    for p in d["fitted_from"]["points"]:
        a, b = p["composition"]
        rows = {r["data"]: r["ppl"] for r in json.loads(open(p["file"]).read())["results"]}
        want = np.mean([100 * (rows[x] - ppl[x]) / ppl[x] for x in (a, b)])
        assert math.isclose(p["y"], want, rel_tol=1e-12)
        ia, ib = (names.index(bank["ads"][x].name) for x in (a, b))
        assert math.isclose(p["rms_cosine"], float(sim.rms.iloc[ia, ib]), rel_tol=1e-9)
    pair = [bank["ads"]["dates"], bank["ads"]["sort"]]  # a pair no merge was evaluated of
    r = json.loads(_cli(["predict", *pair, "--fit", out, "--format", "json"]))
    assert r["target"] == "retention_pct (sum)" and math.isfinite(r["predicted"])
    assert "groups of at most" in _cli(["plan", *bank["ads"].values(), "--fit", out])
    again = loramix.fit_evaluations(_files(bank))  # the Python call, nothing written
    assert again["out"] is None and again["points"] == d["fitted_from"]["points"]


def test_fit_reads_the_factors_without_torch(bank, tmp_path):
    """As predict: the features from the factors in numpy, the perplexities from the files."""
    from .test_startup import HEAVY, imported_modules

    rc, mods, err = imported_modules("fit", *_files(bank), "--out", str(tmp_path / "fit"))
    assert rc == 0, err
    assert not {m.split(".")[0] for m in mods} & (set(HEAVY) - {"pandas"})


def _bad(capsys, tmp_path, files, where, *needles):
    out = tmp_path / "out"
    one_line_error(capsys, ["fit", *files, "--out", out], where, *needles)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".lmx-")]


def test_a_file_that_is_no_evaluation_is_refused(bank, tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"fits": []}))
    _bad(capsys, tmp_path, [*_files(bank), junk], junk, "not a loramix eval --format json output")
    base_alone = _eval(bank["base"], tmp_path / "base.json", [DOMAINS["arith"]])
    _bad(capsys, tmp_path, [*_files(bank), base_alone], base_alone, "evaluates the base alone")


def test_a_merge_evaluated_on_other_data_than_its_members_is_refused(bank, tmp_path, capsys):
    a, b = PAIRS[0]
    short = _eval(bank["base"], tmp_path / "short.json", [DOMAINS[a], DOMAINS[b]], bank["ads"][a],
                  bank["ads"][b], extra=("--limit", "10"))  # fmt: skip
    files = [*bank["single"].values(), short, *(bank["merges"][p] for p in PAIRS[1:])]
    _bad(capsys, tmp_path, files, short, f"member {bank['ads'][a]} was evaluated on {a}", "not the same data")


def test_a_weighted_merge_or_one_on_another_base_is_refused(bank, tmp_path, capsys):
    a, b = PAIRS[0]
    pair = (bank["ads"][a], bank["ads"][b])
    weighted = _eval(
        bank["base"], tmp_path / "w.json", [DOMAINS[a], DOMAINS[b]], *pair, extra=("--weights", "1,0.5")
    )
    files = [*bank["single"].values(), weighted, *(bank["merges"][p] for p in PAIRS[1:])]
    _bad(capsys, tmp_path, files, weighted, "weights [1.0, 0.5]", "weight 1 each")
    other = _make_base(tmp_path / "other", "gpt2", seed=1)
    elsewhere = _eval(other, tmp_path / "o.json", [DOMAINS[a], DOMAINS[b]], *pair)
    capsys.readouterr()  # eval's warning that the adapters were trained on the other base
    files = [*bank["single"].values(), elsewhere, *(bank["merges"][p] for p in PAIRS[1:])]
    _bad(capsys, tmp_path, files, elsewhere, "not the same base")


def test_merges_on_two_bases_are_refused(bank, tmp_path, capsys):
    """Each merge on its members' base, but not all on one: one fit is of one base."""
    other = _make_base(tmp_path / "other", "gpt2", seed=1)
    ads = bank["ads"]
    there = [_eval(other, tmp_path / f"{d}.json", [DOMAINS[d]], ads[d]) for d in ("dates", "sort")]
    pair = _eval(other, tmp_path / "ds.json", [DOMAINS["dates"], DOMAINS["sort"]], ads["dates"], ads["sort"])
    capsys.readouterr()  # eval's warnings that the adapters were trained on the other base
    files = [bank["single"]["arith"], bank["single"]["units"], bank["merges"]["arith", "units"], *there, pair]
    _bad(capsys, tmp_path, files, pair, f"evaluated on {other}", "a fit is of one base and one scoring")


def test_too_few_compositions_or_a_missing_member_are_refused(bank, tmp_path, capsys):
    first = bank["merges"][PAIRS[0]]
    _bad(capsys, tmp_path, _files(bank, PAIRS[:2]), first, "2 sum merge(s)", "needs 3 compositions")
    files = [f for d, f in bank["single"].items() if d != "sort"] + [bank["merges"][p] for p in PAIRS]
    _bad(capsys, tmp_path, files, bank["merges"][PAIRS[2]], "has no evaluation among the files given")
