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

from .factories import make_peft_adapter, one_line_error, write_jsonl
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


@pytest.fixture(scope="module")
def merged_data(bank):
    """A stand-in merged-data adapter (a real PEFT adapter; fit reads only its evaluation) for
    each of the first three pairs, evaluated on the pair's domains."""
    from transformers import AutoModelForCausalLM

    root, model = bank["root"], AutoModelForCausalLM.from_pretrained(bank["base"])
    out = {}
    for k, (a, b) in enumerate(PAIRS[:3]):
        ad = make_peft_adapter(model, root / f"md-{a}+{b}", seed=10 + k, r=4, lora_alpha=8)
        out[a, b] = _eval(bank["base"], root / "evals" / f"md-{a}+{b}.json", [DOMAINS[a], DOMAINS[b]], ad)
    return out


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
    # the choice of the best validated too, as a study's is (loramix.validation.nested_selection)
    sel = d["selection"]
    assert sel == d["by_method"]["sum"]["selection"] and sel["n"] > 0 and sel["chosen"], sel
    assert f"the choice validated too (nested leave-one-domain-out): MAE {sel['mae']:.3g}" in text
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


def test_fit_of_the_worst_member_is_read_by_predict_and_plan(bank, tmp_path):
    """``--target worst``: each point is the largest of the members' losses that
    the retention target averages, and predict names that target and says what
    it measures."""
    out = tmp_path / "fit"
    text = _cli(["fit", *_files(bank), "--out", out, "--target", "worst"])
    assert "| composition | method | RMS cosine | worst member % |" in text
    d = json.loads((out / "predictors.json").read_text())
    assert d["target"] == "worst_pct (sum)" and d["fitted_from"]["y"].startswith("worst_pct = max over")
    ppl = {dom: json.loads(f.read_text())["results"][0]["ppl"] for dom, f in bank["single"].items()}
    for p in d["fitted_from"]["points"]:
        rows = {r["data"]: r["ppl"] for r in json.loads(open(p["file"]).read())["results"]}
        losses = [100 * (rows[x] - ppl[x]) / ppl[x] for x in p["composition"]]
        assert p["y"] == max(losses) and losses[0] != losses[1]
    pair = [bank["ads"]["dates"], bank["ads"]["sort"]]
    said = _cli(["predict", *pair, "--fit", out])
    assert "predicted worst_pct (sum):" in said and "the largest over the members" in said
    assert "groups of at most" in _cli(["plan", *bank["ads"].values(), "--fit", out])


def test_fit_takes_only_the_targets_it_knows(bank, tmp_path, capsys):
    """The Python call refuses another target before reading anything; the CLI
    in one line (delta_ppl is fit.json's, with --merged-data)."""
    import loramix
    from loramix.errors import UsageError

    with pytest.raises(UsageError, match="must be one of retention, worst, got 'delta_ppl'"):
        loramix.fit_evaluations(_files(bank), out=tmp_path / "fit", target="delta_ppl")
    assert not (tmp_path / "fit").exists()
    one_line_error(
        capsys, ["fit", *_files(bank), "--out", tmp_path / "fit", "--target", "delta_ppl"], "--target"
    )
    assert not (tmp_path / "fit").exists()


def test_fit_reads_the_factors_without_torch(bank, tmp_path):
    """As predict: the features from the factors in numpy, the perplexities from the files."""
    from .test_startup import HEAVY, imported_modules

    rc, mods, err = imported_modules("fit", *_files(bank), "--out", str(tmp_path / "fit"))
    assert rc == 0, err
    assert not {m.split(".")[0] for m in mods} & (set(HEAVY) - {"pandas"})


def test_the_points_are_those_a_study_of_the_same_adapters_measures(tmp_path):
    """Adapters trained by PEFT, given to a scenario study, and evaluated by the CLI on that
    study's eval records, then fitted: each composition's retention % and RMS cosine are the
    study's (results.csv's), the same definitions from the same numbers."""
    import loramix
    from loramix.basebuild import build_base
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import prepare_data

    from .test_scenario_given import _train_peft

    doms = ("arith", "units", "dates")
    base = tmp_path / "base"
    build_base(["synthetic:arith?n=64"], out=base, steps=2, device="cpu", progress=False)
    ads = {d: _train_peft(base, tmp_path / f"peft-{d}", d, k) for k, d in enumerate(doms)}
    text = f'name = "cross"\n[base]\npath = "{base}"\n'
    text += "".join(
        f'\n[domains.{d}]\ndata = "synthetic:{d}"\neval = 8\nadapter = "{ads[d]}"\n' for d in doms
    )
    scen = tmp_path / "cross.toml"
    scen.write_text(text + '\n[merge]\nmethods = ["sum"]\n\n[eval]\nbatch = 8\nmax_len = 48\n')
    rep = loramix.run_scenario(scen, out=tmp_path / "report", cache_dir=tmp_path / "cache", device="cpu",
                               progress=False)  # fmt: skip
    (tmp_path / "data").mkdir(), (tmp_path / "ev").mkdir()
    splits = prepare_data(load_scenario(scen))
    data = {d: write_jsonl(tmp_path / "data" / f"{d}.jsonl", [{"question": r.question, "answer": r.answer}
                                                               for r in splits[d].eval]) for d in doms}  # fmt: skip
    assert not any(r.context for d in doms for r in splits[d].eval)
    opts = ("--max-len", "48", "--merged")
    files = [_eval(base, tmp_path / "ev" / f"{d}.json", [data[d]], ads[d], extra=opts) for d in doms]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        pair = (doms[a], doms[b])
        merged = tmp_path / f"merged{a}{b}"  # merged as the study merges: sum --into
        _cli(["sum", *(ads[x] for x in pair), "--into", base, "--out", merged, "--no-progress"])
        files.append(_eval(merged, tmp_path / "ev" / f"{a}{b}.json", [data[x] for x in pair], extra=opts[:2]))
    study = {frozenset(r["composition"].split("+")): r for r in rep["results"] if r["merge_method"] == "sum"}
    points = loramix.fit_evaluations(files)["points"]
    assert len(points) == len(study) == 3
    for p in points:
        want = study[frozenset(p["composition"])]
        assert math.isclose(p["rms_cosine"], want["rms_cosine"], rel_tol=1e-12), (p, want)
        # the perplexities are float32 forwards batched otherwise by the study than by eval: they
        # agree to 3e-8 relative here, so retention % (100 times a ratio less 1) to about 1e-5 points
        assert math.isclose(p["y"], want["retention_pct"], rel_tol=0, abs_tol=1e-4), (p, want)


def _pooled(path, comp) -> float:
    """ppl_C of the study: exp(sum_d NLL_d / sum_d N_d) from an eval JSON's rows."""
    rows = {r["data"]: r for r in json.loads(open(path).read())["results"]}
    return math.exp(
        sum(rows[d]["nll"] * rows[d]["tokens"] for d in comp) / sum(rows[d]["tokens"] for d in comp)
    )


def test_merged_data_evaluations_give_delta_ppl_and_the_studys_line(bank, merged_data, tmp_path):
    """With --merged-data the compositions that have one get the study's delta_ppl%, and fit.json
    its line on the RMS cosine, which predict reads as a study's (--level: the line)."""
    from loramix.fit import fit_line, load_fit_file

    out = tmp_path / "fit"
    refs = [x for f in merged_data.values() for x in ("--merged-data", f)]
    text = _cli(["fit", *_files(bank), *refs, "--out", out])
    assert "sum: delta_ppl% = " in text and (out / "fit.json").is_file()
    points = json.loads((out / "predictors.json").read_text())["fitted_from"]["points"]
    with_ref = [p for p in points if p["delta_ppl_pct"] is not None]
    assert [tuple(p["composition"]) for p in with_ref] == [tuple(sorted(p)) for p in PAIRS[:3]]
    for p in with_ref:
        merge, ref = _pooled(p["file"], p["composition"]), _pooled(p["merged_data"], p["composition"])
        assert math.isclose(p["delta_ppl_pct"], 100 * (merge - ref) / ref, rel_tol=1e-12)
    (line,) = load_fit_file(out / "fit.json")["fits"]
    want = fit_line([p["rms_cosine"] for p in with_ref], [p["delta_ppl_pct"] for p in with_ref])
    assert line["merge_method"] == "sum" and line["adapter_method"] == "lora" and line["n"] == 3
    assert math.isclose(line["slope"], want.slope, rel_tol=1e-12)
    pair = [bank["ads"]["dates"], bank["ads"]["sort"]]
    r = json.loads(_cli(["predict", *pair, "--fit", out, "--level", "0.9", "--format", "json"]))
    assert math.isclose(r["predicted_delta_ppl_pct"], want.predict(r["cosine"]), rel_tol=1e-12)


def test_a_merged_data_evaluation_that_does_not_fit_is_refused(bank, merged_data, tmp_path, capsys):
    (a, b), (c, d) = PAIRS[0], ("dates", "sort")
    ad = bank["root"] / f"md-{a}+{b}"
    short = _eval(bank["base"], tmp_path / "s.json", [DOMAINS[a], DOMAINS[b]], ad, extra=("--limit", "10"))
    nomerge = _eval(bank["base"], tmp_path / "n.json", [DOMAINS[c], DOMAINS[d]], ad)
    two = [x for f in list(merged_data.values())[:2] for x in ("--merged-data", f)]
    _bad(capsys, tmp_path, [*_files(bank), "--merged-data", short], short, f"its {a} row has 10 records",
         "not the same data")  # fmt: skip
    _bad(capsys, tmp_path, [*_files(bank), "--merged-data", nomerge], nomerge, "no merge of dates+sort")
    _bad(capsys, tmp_path, [*_files(bank), *two], "2 sum merge(s) with a merged-data evaluation")


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


def test_a_member_is_matched_by_content_not_by_path(bank, tmp_path):
    """eval --format json records each adapter's sha256 (the merge label's too): a member
    evaluated alone from a copy elsewhere is matched (by path it was "no evaluation"), and
    the points are those of the original's evaluation; an eval JSON without digests (an older
    one) is matched by the resolved path, as before."""
    import shutil

    import loramix
    from loramix.io.filehash import adapter_sha256

    want = loramix.fit_evaluations(_files(bank))["points"]
    units = bank["ads"]["units"]
    for f in [*bank["single"].values(), *bank["merges"].values()]:
        d = json.loads(f.read_text())
        got = d["merge"]["sha256"] if "merge" in d else d["adapter_sha256"]
        assert got == [adapter_sha256(a) for a in (d["merge"]["adapters"] if "merge" in d else d["adapters"])]
    copy = shutil.copytree(units, tmp_path / "elsewhere" / "copy")
    single = {
        **bank["single"],
        "units": _eval(bank["base"], tmp_path / "units.json", [DOMAINS["units"]], copy),
    }
    files = [*single.values(), *bank["merges"].values()]
    got = loramix.fit_evaluations(files)["points"]
    assert [(p["composition"], p["y"]) for p in got] == [(p["composition"], p["y"]) for p in want]
    for p, q in zip(got, want):  # the same factors (read from the copy), summed as BLAS does
        assert math.isclose(p["rms_cosine"], q["rms_cosine"], rel_tol=1e-12), (p, q)
    # older JSONs: no digests; matched by path (the copy is then no member of any merge)
    old = tmp_path / "old"
    old.mkdir()
    for f in _files(bank):
        d = json.loads(f.read_text())
        d.pop("adapter_sha256", None), d.pop("adapter_identity", None)
        if "merge" in d:
            d["merge"].pop("sha256"), d["merge"].pop("identity")
        (old / f.name).write_text(json.dumps(d))
    got = loramix.fit_evaluations([old / f.name for f in _files(bank)])["points"]
    assert [(p["composition"], p["y"]) for p in got] == [(p["composition"], p["y"]) for p in want]


def test_an_adapter_rewritten_at_its_path_is_not_matched(bank, tmp_path):
    """A merge evaluated with the adapter at P, which is then rewritten (another adapter, the same
    path) and evaluated alone: the merge is refused naming it (it was paired with the new
    adapter's evaluation, a wrong point); so is reading features from an adapter changed after
    its single evaluation."""
    from transformers import AutoModelForCausalLM

    from loramix.errors import UsageError
    from loramix.evalfit import collect_points, read_evaluation

    model = AutoModelForCausalLM.from_pretrained(bank["base"])
    p = make_peft_adapter(model, tmp_path / "p", seed=20, r=4, lora_alpha=8)
    units = bank["ads"]["units"]
    merge = _eval(bank["base"], tmp_path / "m.json", [DOMAINS["arith"], DOMAINS["units"]], p, units)
    make_peft_adapter(model, p, seed=21, r=4, lora_alpha=8)  # rewritten in place
    single = {**bank["single"], "arith": _eval(bank["base"], tmp_path / "p.json", [DOMAINS["arith"]], p)}
    evals = [read_evaluation(f) for f in [*single.values(), merge]]
    with pytest.raises(UsageError) as e:
        collect_points(evals)
    assert e.value.where == str(merge) and "rewritten between the evaluations" in e.value.problem
    # the single evaluation of the new adapter, then the file changed again: its features are refused
    files = [*single.values(), *(bank["merges"][k] for k in PAIRS if "arith" not in k)]
    make_peft_adapter(model, p, seed=22, r=4, lora_alpha=8)
    with pytest.raises(UsageError) as e:
        from loramix.evalfit import _features

        own, _ = collect_points([read_evaluation(f) for f in files])
        _features({**own, str(p.resolve()): ("arith", read_evaluation(single["arith"]))}, "x")
    assert e.value.where == str(single["arith"]) and "has changed since it was evaluated" in e.value.problem


def test_the_same_weights_under_another_config_are_another_adapter(bank, tmp_path, capsys):
    """The identity eval records (and fit matches by) is of the config and the weights together:
    the arith adapter's weights with lora_alpha 16 (another delta) summed with units are not the
    arith adapter's merge (by the weights' digest alone fit paired them, a wrong point); a copy
    whose config differs in key order and whitespace only is the same adapter; an eval JSON of
    an older loramix (the weights' sha256 alone) is still matched by it. The identity is one
    helper: a study's given-adapter key and a loaded adapter's (and so a merge's provenance)."""
    import shutil

    import loramix
    from loramix.io.filehash import adapter_identity
    from loramix.scenario.given import given_key

    a, u = bank["ads"]["arith"], bank["ads"]["units"]
    cfg = json.loads((a / "adapter_config.json").read_text())
    other = shutil.copytree(a, tmp_path / "alpha16")
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    same = shutil.copytree(a, tmp_path / "reformatted")
    (same / "adapter_config.json").write_text(json.dumps(dict(reversed(cfg.items())), indent=4))
    assert adapter_identity(same) == adapter_identity(a) != adapter_identity(other)
    assert given_key(a) == adapter_identity(a) == loramix.load_adapter(a).identity
    merge = _eval(bank["base"], tmp_path / "m.json", [DOMAINS["arith"], DOMAINS["units"]], other, u)
    files = [*bank["single"].values(), merge, *(bank["merges"][p] for p in PAIRS[1:])]
    _bad(capsys, tmp_path, files, merge, f"member {other} has no evaluation among the files given")
    want = loramix.fit_evaluations(_files(bank))["points"]
    single = {**bank["single"], "arith": _eval(bank["base"], tmp_path / "a.json", [DOMAINS["arith"]], same)}
    got = loramix.fit_evaluations([*single.values(), *bank["merges"].values()])["points"]
    assert [(p["composition"], p["y"]) for p in got] == [(p["composition"], p["y"]) for p in want]
    merged = json.loads(bank["merges"][PAIRS[-1]].read_text())["merge"]  # sum --into's record
    assert merged["identity"] == [adapter_identity(x) for x in merged["adapters"]]
    old = tmp_path / "old"  # as an older loramix wrote them: the weights' sha256 alone
    old.mkdir()
    for f in _files(bank):
        d = json.loads(f.read_text())
        d.pop("adapter_identity", None)
        d.get("merge", {}).pop("identity", None)
        (old / f.name).write_text(json.dumps(d))
    got = loramix.fit_evaluations([old / f.name for f in _files(bank)])["points"]
    assert [(p["composition"], p["y"]) for p in got] == [(p["composition"], p["y"]) for p in want]


def test_one_method_at_two_settings_is_fitted_as_two(bank, tmp_path, capsys):
    """TIES merges at two densities are two sets of predictors, labelled by
    the parameter that differs (``ties --density 0.2``), each with the merge
    behind it in ``by_method``, so `plan --fit` writes that command. A merge
    whose JSON records no parameters beside them cannot be told apart and is
    refused. Before, the second density's merge of a pair was refused as "a
    second ties merge". New behaviour."""
    base, ads = bank["base"], bank["ads"]
    files = list(bank["single"].values())
    for density in (0.2, 0.5):
        for a, b in PAIRS[:3]:
            folder = tmp_path / f"ties{density}-{a}+{b}"
            _cli(["merge", "-m", "ties", "--density", density, ads[a], ads[b], "--into", base, "--out", folder,
                  "--no-progress"])  # fmt: skip
            files.append(_eval(folder, tmp_path / f"{folder.name}.json", [DOMAINS[a], DOMAINS[b]]))
    merge = json.loads(files[-1].read_text())["merge"]
    assert (
        merge["method"] == "ties" and merge["params"]["density"] == 0.5 and merge["params"]["sign"] == "mass"
    )
    out = tmp_path / "fit"
    _cli(["fit", *files, *(bank["merges"][p] for p in PAIRS), "--out", out])
    d = json.loads((out / "predictors.json").read_text())
    assert list(d["by_method"]) == ["sum", "ties --density 0.2", "ties --density 0.5"]
    assert [e["merge"] for e in d["by_method"].values()] == [
        {"method": "sum", "params": {}}, {"method": "ties", "params": {"density": 0.2}},
        {"method": "ties", "params": {"density": 0.5}}]  # fmt: skip
    plan = json.loads(_cli(["plan", *ads.values(), "--fit", out, "--max-group", "2", "--budget", "1000",
                            "--format", "json"]))  # fmt: skip
    lines = _cli(["plan", *ads.values(), "--fit", out, "--max-group", "2", "--budget", "1000"]).splitlines()
    merged = [g for g in plan["groups"] if len(g["members"]) > 1]
    assert merged
    for g in merged:
        assert g["merge"] == d["by_method"][g["method"]]["merge"]
        line = next(x for x in lines if x.startswith(f"  group {g['group']}: "))
        verb = {"sum": "sum", "ties --density 0.2": "merge -m ties --density 0.2",
                "ties --density 0.5": "merge -m ties --density 0.5"}[g["method"]]  # fmt: skip
        assert line.startswith(f"  group {g['group']}: loramix {verb} ") and "#" not in line, line
    # the 0.5 merges' JSONs as an older loramix wrote them: no parameters to tell them from the 0.2 ones
    for f in files[-3:]:
        e = json.loads(f.read_text())
        del e["merge"]["params"]
        f.write_text(json.dumps(e))
    capsys.readouterr()  # plan's warnings: no base recorded, a prediction that is the mean
    one_line_error(capsys, ["fit", *files, *(bank["merges"][p] for p in PAIRS), "--out", tmp_path / "fit2"],
                   f"{files[-3]}: its ties merge records no parameters, and the other ties merges were made "
                   "with different ones")  # fmt: skip
