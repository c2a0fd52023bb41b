"""``loramix plan`` on synthetic banks with a known cluster structure, the
greedy grouping and method rule, and bad input (one line, exit 2)."""

from __future__ import annotations

import itertools
import json
import math
import shlex
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramix.cli import main
from loramix.grouping import SIZE_NOTE, greedy_groups, method_for, plan, scan_groups
from loramix.io.adapter_files import save_peft_adapter
from loramix.validation import validate, write_predictors

MODULES = [f"model.layers.{k}.self_attn.q_proj" for k in range(2)]
CLUSTERS, PER, DIM = 3, 3, 16


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """Nine adapters in three clusters: a cluster's deltas live in its own
    4-dimensional row and column subspaces (orthogonal to the other clusters')
    and share a core there, so cosines are high within a cluster, 0 across."""
    root = tmp_path_factory.mktemp("bank")
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)).Q
    paths, cluster = [], []  # cluster[k]: the cluster of adapter k
    for c in range(CLUSTERS):
        U = Q[:, 4 * c : 4 * c + 4]  # the cluster's rows and columns both live here
        core = {
            m: (
                torch.randn(4, 2, generator=gen, dtype=torch.float64),
                torch.randn(2, 4, generator=gen, dtype=torch.float64),
            )
            for m in MODULES
        }
        for k in range(PER):
            factors = {}
            for m, (Mb, Ma) in core.items():
                nb = 0.3 * torch.randn(4, 2, generator=gen, dtype=torch.float64)
                na = 0.3 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
                factors[m] = (U @ (Mb + nb), (Ma + na) @ U.T)
            paths.append(save_peft_adapter(root / f"c{c}_{k}", factors, dtype=torch.float32))
            cluster.append(c)
    return [str(p) for p in paths], cluster


def test_plan_without_a_fit_reads_paths_with_the_numpy_reader_to_the_same_plan(bank):
    """Without a fit, plan reads paths with the numpy reader (its cosines are
    numpy's either way): the plan is that of the torch-loaded adapters."""
    from loramix.io.adapter_files import load_adapter

    paths, _ = bank
    by_path = plan(paths, max_group=3).to_json_dict()
    assert json.dumps(by_path) == json.dumps(
        plan([load_adapter(p) for p in paths], max_group=3).to_json_dict()
    )


def _clusters_of(groups):
    idx = {f"c{c}_{k}": c for c in range(CLUSTERS) for k in range(PER)}
    return [sorted(idx[n] for n in g["members"]) for g in groups]


def test_cosine_cost_groups_one_adapter_per_cluster(bank):
    """Without a fit the cost is the RMS cosine: merge the orthogonal ones, so
    every proposed group takes at most one adapter from each cluster."""
    paths, cluster = bank
    p = plan(paths, max_group=3)
    assert p.budget == 0.1 and "RMS cosine" in p.cost_source
    assert [sorted(g) for g in _clusters_of(p.groups)] == [[0, 1, 2]] * 3
    for g in p.groups:
        assert g["cost"] == pytest.approx(0.0, abs=1e-6) and g["method"] == "tsv" and g["interval"] is None


@pytest.fixture(scope="module")
def similar_merge_well(tmp_path_factory):
    """A predictors file from a study where interference falls with cosine."""
    rng = np.random.default_rng(0)
    comps = list(itertools.combinations([f"d{k}" for k in range(6)], 2))
    x = rng.uniform(0, 1, len(comps))
    v = validate(comps, 5 - 30 * x + rng.normal(0, 0.5, len(comps)), pd.DataFrame({"rms_cosine": x}))
    assert v.best in ("ols:rms_cosine", "ridge")  # both read rms_cosine alone
    return write_predictors(tmp_path_factory.mktemp("fit") / "predictors.json", v), v.best


def test_fit_cost_recovers_the_clusters_through_the_cli(bank, similar_merge_well, capsys):
    paths, _ = bank
    fit, best = similar_merge_well
    assert main(["plan", *paths, "--fit", str(fit), "--max-group", "3", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"] == 0.0 and best in out["cost"]
    assert out["validated"]["predictor"] == best
    assert sorted(sorted(g["members"]) for g in out["groups"]) == [
        [f"c{c}_{k}" for k in range(PER)] for c in range(CLUSTERS)
    ]
    for g in out["groups"]:
        lo, hi = g["interval"]
        assert lo < g["cost"] < hi < 0 and g["method"] == "sum"
    # the table form says where the cost comes from and the rule
    assert main(["plan", *paths, "--fit", str(fit), "--max-group", "3"]) == 0
    text = capsys.readouterr().out
    assert f"predicted interference by {best}" in text and "sum for a group of at most 3 whose" in text
    # a smaller K splits the clusters; a budget below every group's cost merges nothing
    p = plan(paths, fit=fit, max_group=2)
    assert max(len(g["members"]) for g in p.groups) == 2
    p = plan(paths, fit=fit, budget=-1000)
    assert all(len(g["members"]) == 1 and g["method"] == "keep" for g in p.groups)


def test_plan_makes_the_checks_of_predict(bank, similar_merge_well, tmp_path, capsys):
    """``plan --fit`` refuses adapters of another kind than the predictors
    were fitted for, and says the predictors' caveats, as ``predict`` does
    (it proposed groups for D2-LoRA adapters from LoRA predictors)."""
    paths, _ = bank
    fit, _ = similar_merge_well
    d = json.loads(fit.read_text())
    other = tmp_path / "d2.json"
    other.write_text(json.dumps({**d, "adapter_kind": "d2lora"}))
    for cmd in ("plan", "predict"):
        _one_line_error(
            capsys, [cmd, *paths[:2], "--fit", str(other)], "fitted for d2lora adapters, given lora"
        )
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({**d, "adapter_kind": "lora", "beats_mean": False}))
    capsys.readouterr()
    assert main(["plan", *paths[:3], "--fit", str(weak), "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"loramix: warning: {weak}: no feature predicted this target better than the mean" in err
    assert json.loads(out)["warnings"] and plan(paths[:2]).warnings == []


def test_a_plan_shows_the_commands_table_and_its_warnings(bank, similar_merge_well, tmp_path, capsys):
    """A notebook cell ending with ``loramix.plan(...)`` shows the table ``loramix plan``
    prints, and the warnings and notes the command prints on stderr (the result held them
    in ``.warnings`` and ``.notes`` only; its repr was the dataclass's one line of fields)."""
    import loramix

    paths, _ = bank
    fit, _ = similar_merge_well
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({**json.loads(fit.read_text()), "beats_mean": False}))
    assert main(["plan", *paths[:3], "--fit", str(weak)]) == 0
    printed = capsys.readouterr().out.splitlines()
    p = loramix.plan(paths[:3], fit=str(weak))
    shown = repr(p).splitlines()
    assert shown[0] == f"Plan: 3 adapters in {len(p.groups)} groups"
    table = shown[1 : 1 + len(p.table())]
    assert table == printed[: len(table)] and table[-1].split()[-1] in "".join(paths[:3])
    assert p.warnings and shown[1 + len(table) :] == [f"warning: {w}" for w in p.warnings]
    assert "no feature predicted this target better than the mean" in repr(p)


def test_predict_with_predictors_says_when_it_extrapolates(bank, similar_merge_well, tmp_path, capsys):
    """A composition whose feature lies far from the study's (here: the study
    moved to a mean of 5, sd 0.01): a warning and ``extrapolation`` in the
    JSON (there was no note); within the study's spread, none."""
    paths, _ = bank
    fit, best = similar_merge_well
    d = json.loads(fit.read_text())
    assert main(["predict", *paths[:2], "--fit", str(fit), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["extrapolation"] is False and "extrapolates" not in err
    f = d["fits"][best]
    if f["kind"] == "ridge":
        f.update(mu=[5.0] * len(f["mu"]), sd=[0.01] * len(f["sd"]))
    else:
        f.update(x_mean=5.0, sxx=1e-4 * (f["n"] - 1))
    far = tmp_path / "far.json"
    far.write_text(json.dumps(d))
    assert main(["predict", *paths[:2], "--fit", str(far), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["extrapolation"] is True
    assert f"loramix: warning: {far}: the composition's rms_cosine" in err and "extrapolates the fit" in err


def test_greedy_groups_and_method_rule():
    # cost of a group = its size minus the number of even members: odd ones are costly
    def cost(m):
        return (sum(1 for i in m if i % 2) * 1.0, None, None)

    assert greedy_groups(6, cost, budget=0.5, max_group=3) == [[0, 2, 4], [1], [3], [5]]
    assert greedy_groups(6, cost, budget=0.5, max_group=2) == [[0, 2], [1], [3], [4], [5]]
    assert method_for(1, 0.0, None, 1.0) == "keep"
    assert method_for(3, 0.4, None, 1.0) == "sum"
    assert method_for(3, 0.4, 0.6, 1.0) == "ties"  # the interval's upper end decides
    assert method_for(3, 0.9, None, 1.0) == "ties"
    assert method_for(4, 0.0, None, 1.0) == "ties"  # four or more: never the sum (SUM_MAX_GROUP)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, math.inf, math.nan]), min_size=n * n, max_size=n * n),
    st.sampled_from([0.0, 1.0, 1.5, 2.5, 10.0]), st.integers(1, 5), st.sampled_from(["rms", "max", "sum"]))))  # fmt: skip
def test_greedy_groups_by_a_heap_are_the_scans(case):
    """The heap's groups are the scan's, to the order of equal costs: small whole-number pair
    costs (many ties), unusable pairs (inf, NaN), and several ways to cost a union."""
    n, flat, budget, max_group, how = case
    w = np.array(flat).reshape(n, n)

    def cost(m):
        vals = [w[i, j] for a, i in enumerate(m) for j in m[a + 1 :]]
        v = {"rms": lambda: float(np.sqrt(np.mean(np.square(vals)))), "max": lambda: max(vals),
             "sum": lambda: float(sum(vals))}[how]()  # fmt: skip
        return v, None, None

    scan = scan_groups(n, cost, budget, max_group)
    assert greedy_groups(n, cost, budget, max_group) == scan

    # the unions of one size costed at once (as plan does), and where that cannot (None) one by one
    def at_once(unions):
        return np.array([cost(list(u))[0] for u in unions.tolist()])

    assert greedy_groups(n, cost, budget, max_group, costs=at_once) == scan
    pairs_only = lambda unions: at_once(unions) if unions.shape[1] == 2 else None  # noqa: E731
    assert greedy_groups(n, cost, budget, max_group, costs=pairs_only) == scan


def test_plan_says_how_far_it_is_and_is_quiet_when_asked(bank, capsys, monkeypatch):
    """A plan of a thousand adapters spends minutes in the similarity and seconds (a few
    under a study's predictors) costing pairs: where stderr is not a terminal, plain
    progress lines say so (here one at every update); ``--no-progress`` and ``--quiet``
    say nothing, and the plan is the same."""
    paths, _ = bank
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    assert main(["plan", *paths, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    n = len(paths)
    assert f"plan: costing pairs: {n * (n - 1) // 2}/{n * (n - 1) // 2} pairs (100%)" in err
    merged = sum(
        len(g["members"]) - 1 for g in json.loads(out)["groups"]
    )  # one merge per member past the first
    assert merged > 0 and f"plan: merging: {merged}/? merges" in err
    assert f"loramix: loading: {n}/{n} adapters (100%)" in err  # the similarity's bar
    for flag in ("--no-progress", "--quiet"):
        assert main(["plan", *paths, "--format", "json", flag]) == 0
        quiet = capsys.readouterr()
        notes = "".join(f"loramix: note: {n}\n" for n in json.loads(out)["notes"])  # not progress: said still
        assert quiet.out == out and quiet.err == notes


def test_the_plan_table_keeps_its_columns_for_long_method_names():
    """A method named longer than the column's header (``core-dare-ties``, which a study's
    predictors per method can propose) pushed that row's cost and members out of line."""
    from loramix.grouping import Plan

    groups = [{"group": k, "kind": "lora", "method": m, "cost": 0.5, "interval": None, "members": ["a", "b"]}
              for k, m in enumerate(["tsv", "core-dare-ties", "keep"], start=1)]  # fmt: skip
    head, *rows = Plan(["a", "b"], groups, 1.0, 2, "x").table()[3:]
    for row in rows:
        assert row.index("0.5") + len("0.5") == head.index("cost") + len("cost")
        assert row.index("a, b") == head.index("members")


def _one_line_error(capsys, argv, needle):
    capsys.readouterr()  # drop what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("loramix: error:") and needle in err
    return err


def test_bad_input_is_one_line_and_exit_2(bank, tmp_path, capsys):
    paths, _ = bank
    _one_line_error(capsys, ["plan"], "needs at least two adapters")
    bad = tmp_path / "fit.json"
    bad.write_text("{oops")
    _one_line_error(capsys, ["plan", *paths[:2], "--fit", str(bad)], str(bad))
    _one_line_error(
        capsys, ["plan", *paths[:2], "--fit", str(tmp_path / "missing.json")], "no such predictors file"
    )
    _one_line_error(capsys, ["plan", *paths[:2], "--data", "synthetic:arith"], "--data: applies with --fit")
    _one_line_error(capsys, ["plan", *paths[:2], "--max-group", "0"], "--max-group")
    _one_line_error(capsys, ["plan", paths[0], str(tmp_path / "nope")], "nope")


def test_a_fit_file_where_a_predictors_file_is_read_is_named_so(bank, tmp_path, capsys):
    """``plan --fit`` given a study's fit.json (predict's cosine line) said
    "not a loramix predictors file (no format ...)"; it now says what the
    file is and what to give. A missing fit names what writes one, ``loramix
    fit`` too (it named a Python function, and for predict only a scenario
    run). Failed before the fix."""
    from pathlib import Path

    paths, _ = bank
    fit_json = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "fit.json"
    err = _one_line_error(
        capsys, ["plan", *paths[:2], "--fit", str(fit_json)], "not a loramix predictors file"
    )
    assert "it is a fit.json (the cosine line, which loramix predict reads): give a predictors.json" in err
    err = _one_line_error(capsys, ["plan", *paths[:2], "--fit", str(tmp_path / "no.json")], "no such")
    assert "loramix fit" in err, err
    err = _one_line_error(capsys, ["predict", *paths[:2], "--fit", str(tmp_path / "no.json")], "no such")
    assert "loramix fit" in err, err


def _tiny_llama_bank(tmp_path, n: int, targets=("q_proj",)):
    """A tiny Llama base folder and ``n`` rank-2 PEFT adapters on ``targets``."""
    from loramix.models import load_causal_lm

    from .factories import make_peft_adapter
    from .test_train import make_tiny_base

    base = make_tiny_base(tmp_path / "base", "llama")
    model, _ = load_causal_lm(base)
    ads = [
        str(make_peft_adapter(model, tmp_path / f"a{k}", seed=k, r=2, target_modules=list(targets)))
        for k in range(n)
    ]
    return base, ads


def _feature_validation(feature: str, high: float = 2.0):
    """A validation of ``y = 3 x + noise`` on five domains' pairs, ``x`` read as ``feature``."""
    rng = np.random.default_rng(1)
    comps = list(itertools.combinations([f"d{k}" for k in range(5)], 2))
    x = rng.uniform(0, high, len(comps))
    return validate(comps, 3 * x + rng.normal(0, 0.1, len(comps)), pd.DataFrame({feature: x}))


def test_a_data_aware_fit_needs_data_and_runs_with_it(tmp_path, capsys):
    from loramix.io.adapter_files import load_adapter

    base, ads = _tiny_llama_bank(tmp_path, 3)
    fit = write_predictors(tmp_path / "p.json", _feature_validation("functional_interference"))
    _one_line_error(
        capsys, ["plan", *ads, "--fit", str(fit)], "needs data-aware feature functional_interference"
    )
    data = ["synthetic:arith?n=20", "synthetic:units?n=20", "synthetic:dates?n=20"]
    p = plan(ads, fit=fit, data=data, base=base, tokens=40, budget=100.0)
    assert p.cost_source.startswith("predicted interference by ols:functional_interference")
    assert [len(g["members"]) for g in p.groups] == [3]  # every group fits a loose budget
    load_adapter(ads[0])  # the inputs are untouched


def test_one_calibration_source_given_alone_is_a_list_of_one(tmp_path):
    """``plan(..., data="one.jsonl")`` and ``predict(..., data="one.jsonl")``
    take one source alone as a list of one, as ``train_adapter`` and
    ``evaluate`` do (:func:`loramix.data.data_list`): a string was taken
    character by character ("data: 20 data files for 2 adapters" for a
    20-character spec), a ``Path`` raised ``TypeError: 'PosixPath' object is
    not iterable``, and ``predict(data=DataFrame)`` pandas' "truth value of a
    DataFrame is ambiguous". Each is now the one line that counts one file
    for two adapters, or that says what data takes. Failed on the old code."""
    import loramix

    from .factories import write_jsonl

    base, ads = _tiny_llama_bank(tmp_path, 2)
    fit = write_predictors(tmp_path / "p.json", _feature_validation("functional_interference"))
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "a"}] * 4)
    for data in ("synthetic:arith?n=20", str(one), one):
        for call in (loramix.plan, lambda a, **kw: loramix.predict(a, kw.pop("fit"), **kw)):
            with pytest.raises(loramix.LoramixError) as e:
                call(ads, fit=fit, data=data, base=base, progress=False)
            assert str(e.value) == "data: 1 data file for 2 adapters (give one per adapter, in order)", data
    table = pd.DataFrame({"question": ["q"], "answer": ["a"]})
    with pytest.raises(loramix.LoramixError, match="^data: takes a data file, a synthetic: spec or a list"):
        loramix.predict(ads, fit, data=table, base=base)
    # one per adapter, a list or a tuple, runs
    r = loramix.predict(ads, fit, data=(str(one), one), base=base, tokens=8, progress=False)
    assert r["predictor"] == "ols:functional_interference"


def test_a_calibration_file_shorter_than_the_recipe_is_warned_of(tmp_path):
    """A calibration file holding fewer tokens than asked was used without a
    word: its data-aware features then rest on fewer tokens than the fits'."""
    from loramix.errors import LoramixWarning

    base, ads = _tiny_llama_bank(tmp_path, 2)
    fit = write_predictors(tmp_path / "p.json", _feature_validation("functional_interference"))
    short, long = "synthetic:arith?n=2", "synthetic:units?n=40"
    with pytest.warns(
        LoramixWarning, match=r"fewer than the 200 tokens asked: synthetic:arith\?n=2 \(\d+\);"
    ):
        plan(ads, fit=fit, data=[short, long], base=base, tokens=200, budget=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoramixWarning)
        plan(ads, fit=fit, data=[long, long], base=base, tokens=200, budget=100.0)


def test_the_missing_data_names_the_predictor_that_reads_it(bank, tmp_path, capsys):
    """Where only a merge method's predictor (``by_method``) reads a data-aware
    feature, the line named the file's primary predictor, which reads none."""
    import json

    from loramix.validation import method_entry

    paths, _ = bank
    weight, aware = _feature_validation("rms_cosine"), _feature_validation("functional_interference")
    fit = write_predictors(tmp_path / "p.json", weight)
    d = json.loads(fit.read_text())
    d["by_method"] = {"sum": method_entry(weight.to_json_dict()), "ties": method_entry(aware.to_json_dict())}
    fit.write_text(json.dumps(d))
    _one_line_error(capsys, ["plan", *paths[:2], "--fit", str(fit)],
                    f"predictor {aware.best} needs data-aware feature functional_interference")  # fmt: skip


def test_data_aware_predict_and_plan_use_the_studys_calibration_recipe(tmp_path):
    """A study computes its data-aware features from ``[predictors] tokens`` and
    ``max_len`` (real-14-domains: 128 tokens of records cut at 64); predict and
    plan computed them from 256 of 128 whatever the fit was made on (predict
    had no --tokens at all), a different feature: on SmolLM2 the functional
    interference of a pair moved by up to 0.04 (the study's x spread is about
    0.12) and the weighted overlap shifts with the token count. The file now
    records the recipe and both use it unless told otherwise."""
    import json

    from loramix.features import compute_features
    from loramix.features._calibration import capture
    from loramix.interference import predict_validated
    from loramix.io.adapter_files import load_adapter

    base, ads = _tiny_llama_bank(tmp_path, 2, ("q_proj", "v_proj"))
    fit = write_predictors(tmp_path / "p.json", _feature_validation("weighted_subspace_overlap", high=1.0))
    d = json.loads(fit.read_text())
    d["calibration"] = {"tokens": 24, "max_len": 12}  # what a scenario run writes
    fit.write_text(json.dumps(d))
    data = ["synthetic:arith?n=30", "synthetic:units?n=30"]
    loaded = [load_adapter(a) for a in ads]

    def wso(**kw):
        fs = compute_features(loaded, calibration=capture(loaded, base, data, **kw))
        return fs.composition("weighted_subspace_overlap", [0, 1])

    study, default = wso(tokens=24, max_len=12), wso()
    assert abs(study - default) > 1e-3  # the recipe matters
    r = predict_validated(ads, fit, data=data, base=base)
    assert r["features"]["weighted_subspace_overlap"] == pytest.approx(study, rel=1e-12)
    told = predict_validated(ads, fit, data=data, base=base, tokens=256, max_len=128)
    assert told["features"]["weighted_subspace_overlap"] == pytest.approx(default, rel=1e-12)
    p = plan(ads, fit=fit, data=data, base=base, budget=100.0)
    assert [len(g["members"]) for g in p.groups] == [2]
    assert p.groups[0]["cost"] == pytest.approx(r["predicted"], rel=1e-12)


def test_plan_and_predict_show_the_calibration_progress_on_a_terminal(tmp_path):
    """The calibration pass (every domain through the base: minutes for many
    domains or a large base) ran without a word; now a bar counts its tokens
    on stderr where stderr is a terminal (a real pty here), and nothing where
    it is a pipe."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    base, ads = _tiny_llama_bank(tmp_path, 2)
    fit = write_predictors(tmp_path / "p.json", _feature_validation("functional_interference"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for cmd in ("plan", "predict"):
        args = [sys.executable, "-m", "loramix", cmd, *ads, "--fit", str(fit), "--base", str(base),
                "--data", "synthetic:arith?n=20", "--data", "synthetic:units?n=20", "--tokens", "40"]  # fmt: skip
        main_fd, tty = pty.openpty()
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: an empty bar
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=tty, env=env)
        os.close(tty)
        err = b""
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # the child closed the pty
                break
            if not chunk:
                break
            err += chunk
        out = proc.communicate()[0].decode()
        os.close(main_fd)
        assert proc.returncode == 0, err
        assert "calibration" in err.decode(errors="replace") and "/80 " in err.decode(errors="replace"), (
            err
        )  # 2 x 40 tokens
        assert "calibration" not in out
        piped = subprocess.run(args, capture_output=True, text=True, env=env)
        assert piped.returncode == 0 and "calibration" not in piped.stderr, piped.stderr


def test_data_is_not_run_through_the_base_for_a_weight_space_predictor(
    bank, similar_merge_well, tmp_path, capsys
):
    """``--base`` and ``--data`` with a predictor that reads only weight-space
    features (real-14-domains' best, ``type_rms_cosine:mlp.gate_proj``) ran the
    whole calibration pass for nothing: predict on three SmolLM2 adapters took
    48 s with ``--tokens 2000`` against 1.4 s without ``--data``, the same
    output. The base is now not even opened (here it is not a model at all)."""
    paths, _ = bank
    fit, _ = similar_merge_well
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    data = ["--data", "synthetic:arith?n=5", "--data", "synthetic:units?n=5"]
    args = [*paths[:2], "--fit", str(fit), "--base", str(not_a_model), *data]
    assert main(["predict", *args, "--format", "json"]) == 0, capsys.readouterr().err
    with_data = json.loads(capsys.readouterr().out)
    assert main(["predict", *paths[:2], "--fit", str(fit), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"] == with_data["predicted"]
    assert main(["plan", *args]) == 0, capsys.readouterr().err


def test_method_aware_cost_on_known_costs():
    """Two merge methods with known costs: ``sum`` costs ``10 f`` (f a pair matrix),
    ``ties`` a flat 1. Each group is costed by both and merged by the cheaper; the
    grouping follows the chosen method's cost, where the sum-only model differs."""
    from loramix.features import FeatureSet
    from loramix.grouping import RULE_BY_METHOD, CostModel, plan_with

    def line(a):  # cost a * f (a ridge on one unstandardised feature)
        return {"kind": "ridge", "features": ["f"], "lambda": 0.0, "mu": [0.0], "sd": [1.0], "coef": [a],
                "intercept": 0.0, "resid_low": None, "resid_high": None, "n": 10}  # fmt: skip

    flat = {"kind": "mean", "n": 2, "mean": 1.0, "sd": None}
    f = np.full((4, 4), 0.5)
    f[0, 1] = f[1, 0] = 0.0  # 0 and 1 sum for free; every other pair costs 5 by the sum
    fs = FeatureSet(names=list("abcd"), matrices={"f": f}, aggregate={"f": "rms"})
    model = CostModel(fs, line(10.0), 0.9, {"sum": line(10.0), "ties": flat})
    assert model.method_aware and model.rule == RULE_BY_METHOD
    assert model.method_costs([0, 1]) == {"sum": (0.0, None, None), "ties": (1.0, None, None)}
    assert model.choose([2, 3]) == ("ties", (1.0, None, None)) and model.method([0, 1], 2.0) == "sum"
    p = plan_with(model, source="known", max_group=2, budget=2.0)
    assert [(g["members"], g["method"], g["cost"]) for g in p.groups] == [
        (["a", "b"], "sum", 0.0), (["c", "d"], "ties", 1.0)]  # fmt: skip
    assert p.groups[1]["costs"] == {"sum": 5.0, "ties": 1.0}
    # one method only (an older predictors file): the sum's cost, the half-budget rule
    old = plan_with(CostModel(fs, line(10.0)), source="old", max_group=2, budget=2.0)
    assert [(g["members"], g["method"]) for g in old.groups] == [
        (["a", "b"], "sum"),
        (["c"], "keep"),
        (["d"], "keep"),
    ]
    # equal predicted costs: the first method (the file's primary)
    tie = CostModel(fs, flat, 0.9, {"sum": flat, "ties": {**flat}})
    assert tie.method([2, 3], 2.0) == "sum"


def test_a_scenario_label_names_the_kind_of_its_predictors(bank, similar_merge_well, tmp_path, capsys):
    """A study of ``lora@2`` (or ``lora:shared``) writes that label as ``adapter_kind``:
    its own LoRA adapters are accepted by ``plan`` and ``predict`` (they were refused
    as "fitted for lora@2 adapters, given lora"); another kind still is refused."""
    paths, _ = bank
    fit, _ = similar_merge_well
    d = json.loads(fit.read_text())
    for label in ("lora@2", "lora:shared", "lora@16:data"):
        f = tmp_path / f"{label.replace(':', '_')}.json"
        f.write_text(json.dumps({**d, "adapter_kind": label}))
        assert main(["plan", *paths[:3], "--fit", str(f), "--json"]) == 0
        assert main(["predict", *paths[:2], "--fit", str(f), "--format", "json"]) == 0
    other = tmp_path / "d2r.json"
    other.write_text(json.dumps({**d, "adapter_kind": "d2lora@4"}))
    _one_line_error(
        capsys, ["plan", *paths[:2], "--fit", str(other)], "fitted for d2lora@4 adapters, given lora"
    )


def test_adapters_of_two_kinds_are_refused_with_a_fit(bank, similar_merge_well, tmp_path, capsys):
    """A LoRA and a D2-LoRA adapter with ``--fit``: one line, exit 2 (the fits are
    per kind), saying that without ``--fit`` the kinds are grouped together;
    ``predict`` refuses them too (a composition is merged by one method)."""
    from loramix.adapter import ModuleDelta
    from loramix.io.formats.d2 import save_d2_adapter

    paths, _ = bank
    fit, _ = similar_merge_well
    gen = torch.Generator().manual_seed(7)
    mods = {m: ModuleDelta(name=m, B=torch.randn(DIM, 2, generator=gen), A=torch.randn(2, DIM, generator=gen),
                           scale=1.0, alpha=2.0, B_neg=torch.randn(DIM, 2, generator=gen),
                           A_neg=torch.randn(2, DIM, generator=gen), tau=0.5) for m in MODULES}  # fmt: skip
    d2 = str(save_d2_adapter(tmp_path / "d2", mods, r=2, lora_alpha=2.0, tau=0.5))
    err = _one_line_error(capsys, ["plan", *paths[:2], d2, "--fit", str(fit)], "mix kinds (d2lora, lora)")
    assert "the fits are per kind (without --fit, the kinds are grouped together)" in err
    _one_line_error(capsys, ["predict", paths[0], d2, "--fit", str(fit)], "mix kinds")


@pytest.fixture(scope="module")
def kinds_bank(tmp_path_factory):
    """A tiny Llama base, three PEFT LoRA adapters, two PEFT DoRA adapters whose
    magnitudes moved from their init (as training moves them: at PEFT's init a
    DoRA delta is its LoRA residual) and one D2-LoRA adapter, all on q_proj and
    v_proj: ``(base, {name: path})``."""
    from loramix.adapter import ModuleDelta
    from loramix.io.formats.d2 import save_d2_adapter

    from .factories import make_peft_adapter, save_base, tiny_llama
    from .test_formats import _train_magnitudes

    root = tmp_path_factory.mktemp("kinds")
    model = tiny_llama()
    base = save_base(model, root / "base")
    targets = ["q_proj", "v_proj"]
    paths = {f"lora{k}": make_peft_adapter(model, root / f"lora{k}", seed=k, r=2, target_modules=targets)
             for k in range(3)}  # fmt: skip
    for k in range(2):
        dora = make_peft_adapter(
            model, root / f"dora{k}", seed=10 + k, r=2, target_modules=targets, use_dora=True
        )
        paths[f"dora{k}"] = _train_magnitudes(dora, 20 + k)
    gen, mods = torch.Generator().manual_seed(7), {}
    for layer in range(2):
        for t in targets:
            name = f"model.layers.{layer}.self_attn.{t}"
            o = model.get_submodule(name).weight.shape[0]
            f = [0.3 * torch.randn(*s, generator=gen) for s in ((o, 2), (2, 32), (o, 2), (2, 32))]
            mods[name] = ModuleDelta(name=name, B=f[0], A=f[1], B_neg=f[2], A_neg=f[3], scale=2.0, alpha=4.0,
                                     tau=0.5)  # fmt: skip
    paths["d2"] = save_d2_adapter(root / "d2", mods, r=2, lora_alpha=4.0, tau=0.5)
    return base, {n: str(p) for n, p in paths.items()}


def test_adapters_of_several_kinds_are_grouped_together(kinds_bank, capsys):
    """LoRA, DoRA and D2-LoRA adapters without ``--fit`` (were refused: "the
    adapters mix kinds"): grouped together by the cosines ``similarity`` gives
    the same adapters, since the sum and TIES merge any mix into a base; each
    group says what it holds (JSON ``kind``, the table's column), one note says
    a mixed group merges into the base only, another that the DoRA and D2-LoRA
    adapters were compared on their residuals. And the sum takes such a group."""
    base, paths = kinds_bank
    kind = {n: "d2lora" if n == "d2" else n[:-1] for n in paths}  # lora0 -> lora
    args = ["plan", *paths.values(), "--budget", "1", "--max-group", "3"]
    capsys.readouterr()
    assert main(["similarity", *paths.values(), "--format", "json"]) == 0
    rms = np.array(json.loads(capsys.readouterr().out)["rms"])
    assert main([*args, "--format", "json"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    names, mixed = list(paths), None
    assert sorted(m for g in got["groups"] for m in g["members"]) == sorted(names)
    for g in got["groups"]:
        ix = [names.index(m) for m in g["members"]]
        assert g["kind"] == "+".join(sorted({kind[m] for m in g["members"]})) and len(ix) <= 3
        pairs = [rms[i, j] ** 2 for a, i in enumerate(ix) for j in ix[a + 1 :]]
        assert g["cost"] == pytest.approx(np.sqrt(np.mean(pairs)) if pairs else 0.0, rel=1e-12, abs=1e-15)
        mixed = mixed or (g if "+" in g["kind"] else None)
    assert mixed is not None, got["groups"]  # budget 1 admits every group: the kinds do mix
    notes = out.err.strip().splitlines()
    three = any(len(g["members"]) > 2 for g in got["groups"])
    assert notes == [f"loramix: note: {n}" for n in got["notes"]] and len(notes) == 2 + three, notes
    assert "the adapters are of 3 kinds (d2lora, dora, lora), grouped together" in notes[0]
    assert notes[1].startswith(
        "loramix: note: dora0, dora1, d2 (DoRA and D2-LoRA) compared on their residuals"
    )
    assert not three or notes[2] == f"loramix: note: {SIZE_NOTE}"
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[3].split() == ["group", "kind", "method", "cost", "interval", "members"]
    row = table[4 + got["groups"].index(mixed)].split()
    assert row[:3] == [str(mixed["group"]), mixed["kind"], mixed["method"]]
    assert mixed["paths"] == [str(paths[m]) for m in mixed["members"]]  # what merge takes, names did not
    out_dir = base.parent / "mixed-merged"
    assert main(["sum", *mixed["paths"], "--into", str(base), "--out", str(out_dir)]) == 0


def test_plan_with_a_base_costs_dora_and_d2_on_their_effective_deltas(kinds_bank, capsys):
    """``plan --base`` without ``--fit`` (was refused: "applies with --data") costs
    DoRA and D2-LoRA adapters by the cosines of their effective deltas, those of
    ``similarity --base``, and prints no residual note; without it, by their
    residuals' (``similarity``'s), with the note ``similarity`` prints."""
    base, paths = kinds_bank
    dora = [paths["dora0"], paths["dora1"]]
    for extra, delta in (["--base", str(base)], "effective"), ([], "residual"):
        capsys.readouterr()
        assert main(["similarity", *dora, "--format", "json", *extra]) == 0
        sim = capsys.readouterr()
        assert json.loads(sim.out)["delta"] == delta
        assert main(["plan", *dora, "--budget", "1", "--format", "json", *extra]) == 0
        out = capsys.readouterr()
        (g,) = json.loads(out.out)["groups"]
        assert g["cost"] == pytest.approx(abs(json.loads(sim.out)["rms"][0][1]), rel=1e-12)
        assert out.err == sim.err  # the one residual note, or nothing
    assert "compared on their residuals" in out.err
    with_base = plan(dora, base=base, budget=1).groups[0]["cost"]
    assert with_base != pytest.approx(g["cost"], rel=1e-3)  # the magnitudes moved: the numbers must


def test_predict_method_gives_the_number_plan_quotes(bank, similar_merge_well, tmp_path, capsys):
    """With ``by_method``, ``plan`` quotes a group's cost under the method it merges
    it by; ``predict --method M`` gives that number and interval (``--method`` was
    ignored with a predictors file: the primary's number came back), and a method
    the file lacks is refused in one line."""
    from loramix.validation import method_entry

    paths, _ = bank
    fit, _ = similar_merge_well
    down = json.loads(fit.read_text())
    rng = np.random.default_rng(2)
    comps = list(itertools.combinations([f"d{k}" for k in range(6)], 2))
    x = rng.uniform(0, 1, len(comps))
    up = validate(comps, 2 + 30 * x + rng.normal(0, 0.5, len(comps)), pd.DataFrame({"rms_cosine": x}))
    d = up.to_json_dict()
    d["by_method"] = {"sum": method_entry(d), "ties": method_entry(down)}
    f = tmp_path / "bm.json"
    f.write_text(json.dumps(d))
    g = plan(paths[:2], fit=f, max_group=2, budget=100.0).groups[0]
    assert g["method"] == "ties" and g["costs"]["sum"] > g["cost"]
    for method, cost, interval in (("ties", g["cost"], g["interval"]), ("sum", g["costs"]["sum"], None)):
        capsys.readouterr()
        assert main(["predict", *paths[:2], "--fit", str(f), "--method", method, "--format", "json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["predicted"] == pytest.approx(cost) and r["predictor"] == d["by_method"][method]["best"]
        if interval is not None:
            assert r["interval"] == pytest.approx(interval)
    assert main(["predict", *paths[:2], "--fit", str(f), "--format", "json"]) == 0  # default: the primary
    assert json.loads(capsys.readouterr().out)["predicted"] == pytest.approx(g["costs"]["sum"])
    _one_line_error(capsys, ["predict", *paths[:2], "--fit", str(f), "--method", "dare-ties"], "dare-ties")


def test_predict_without_a_feature_value_is_refused(bank, similar_merge_well, tmp_path, capsys):
    """Two adapters whose shared modules have a zero delta in one: no RMS cosine
    (0/0); ``predict`` with a predictors file printed ``predicted interference:
    +nan`` and exit 0. Two sharing no module have one, 0 (docs/predictors.md,
    missing values): predicted as plan costs them, with a note."""
    paths, _ = bank
    fit, _ = similar_merge_well
    gen = torch.Generator().manual_seed(3)
    zero = save_peft_adapter(tmp_path / "zero", {m: (torch.zeros(DIM, 2), torch.randn(2, DIM, generator=gen))
                                                 for m in MODULES})  # fmt: skip
    err = _one_line_error(capsys, ["predict", paths[0], str(zero), "--fit", str(fit)], "no prediction")
    assert "no value of rms_cosine (no pair of the adapters shares a module with a nonzero delta)" in err
    other = save_peft_adapter(tmp_path / "mlp", {f"model.layers.{k}.mlp.down_proj": (
        torch.randn(DIM, 2, generator=gen), torch.randn(2, DIM, generator=gen)) for k in range(2)})  # fmt: skip
    assert main(["predict", paths[0], str(other), "--fit", str(fit), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert r["features"] == {"rms_cosine": 0.0} and "adapt no module in common" in err
    g = plan([paths[0], str(other)], fit=fit, budget=1e9).groups
    assert len(g) == 1 and g[0]["cost"] == pytest.approx(r["predicted"], rel=1e-12)


def test_the_plan_does_not_depend_on_the_order_of_the_adapters():
    """Equal predicted costs (here every group costs the same, as under the ``mean``
    predictor of a study where no feature beats the mean): the groups were the first
    pairs in command-line order, so ``a b c d`` gave {a, b}, {c, d} and ``d c b a``
    gave {d, c}, {b, a}, but ``c a d b`` gave {c, a}, {d, b}."""
    from loramix.features import FeatureSet
    from loramix.grouping import CostModel, plan_with

    flat = {"kind": "mean", "n": 5, "mean": -2.0, "sd": 1.0}
    seen = set()
    for perm in itertools.permutations("abcd"):
        fs = FeatureSet(names=list(perm), matrices={}, aggregate={})
        p = plan_with(CostModel(fs, flat), source="flat", max_group=2, budget=0.0)
        seen.add(json.dumps([(g["members"], g["cost"], g["method"]) for g in p.groups]))
    assert seen == {json.dumps([(["a", "b"], -2.0, "ties"), (["c", "d"], -2.0, "ties")])}


def test_a_fit_on_a_module_type_the_adapters_lack_is_one_line(bank, tmp_path, capsys):
    """The shipped reports/real-14-domains/predictors.json reads
    type_rms_cosine:mlp.gate_proj; adapters on q_proj and v_proj only (the
    README's SmolLM2 recipe) made predict and plan end in a KeyError
    traceback, exit 1. Now one line naming the feature and the adapters' types."""
    paths, _ = bank  # q_proj only
    rng = np.random.default_rng(2)
    comps = list(itertools.combinations([f"d{k}" for k in range(6)], 2))
    x = rng.uniform(0, 1, len(comps))
    feat = "type_rms_cosine:mlp.gate_proj"
    fit = write_predictors(tmp_path / "p.json", validate(comps, 4 * x + rng.normal(0, 0.1, len(comps)),
                                                         pd.DataFrame({feat: x})))  # fmt: skip
    for cmd in ("predict", "plan"):
        err = _one_line_error(capsys, [cmd, *paths[:2], "--fit", str(fit)], f"reads {feat}")
        assert "adapt no mlp.gate_proj module (theirs: self_attn.q_proj)" in err, err


def test_options_that_would_be_ignored_are_refused(bank, similar_merge_well, capsys):
    """Settings that could not take effect were ignored without a word, so a
    user took them for settings that did: the calibration options without
    ``--data``, ``--level`` with a predictors file (its intervals are at the
    level its study validated), ``--data`` with a fit.json (the cosine line
    reads no data), ``plan --data`` without ``--fit`` (the RMS cosine reads
    none). Each is now one line naming the flag, exit 2 (as
    ``--label`` with a predictors file already was)."""
    from pathlib import Path

    paths, _ = bank
    fit, _ = similar_merge_well
    line = Path(__file__).parents[1] / "reports" / "quickstart" / "fit.json"
    data = ["--data", "synthetic:arith?n=5", "--data", "synthetic:units?n=5"]
    for argv, needle in [
        (["plan", *paths[:2], "--tokens", "40"], "--tokens: applies with --data"),
        (["plan", *paths[:2], *data, "--base", "somewhere"], "--data: applies with --fit"),
        (["plan", *paths[:2], "--fit", str(fit), "--max-len", "32"], "--max-len: applies with --data"),
        (["predict", *paths[:2], "--fit", str(fit), "--base", "somewhere"], "--base: applies with --data"),
        (["predict", *paths[:2], "--fit", str(fit), "--level", "0.8"], "--level: applies to a fit.json"),
        (
            ["predict", *paths[:2], "--fit", str(line), *data, "--base", "b"],
            "--data: applies to a predictors file",
        ),
    ]:
        _one_line_error(capsys, argv, needle)


def test_plan_refuses_from_python_the_calibration_options_the_command_refuses(bank, similar_merge_well):
    """``plan(..., fit=F, base=B)``, ``plan(..., tokens=T)`` and
    ``plan(..., max_len=L)`` without ``data`` were ignored from Python without
    a word, where ``loramix plan`` refused ``--base`` (with ``--fit``),
    ``--tokens`` and ``--max-len`` without ``--data``: the same line now,
    in keywords. ``base`` without ``fit`` is taken (the effective deltas).
    Failed on the old code (a plan came back)."""
    import loramix

    paths, _ = bank
    fit, _ = similar_merge_well
    for kw, needle in [
        ({"fit": fit, "base": "nowhere"}, "base: applies with data (the calibration files it sets the pass over)"),
        ({"tokens": 40}, "tokens: applies with data"),
        ({"fit": fit, "max_len": 32}, "max_len: applies with data"),
    ]:  # fmt: skip
        with pytest.raises(loramix.LoramixError) as e:
            loramix.plan(paths[:2], **kw)
        assert str(e.value).startswith(needle), (kw, str(e.value))
    assert len(loramix.plan(paths[:2], fit=fit).groups) >= 1


def test_plan_refuses_from_python_a_device_without_data_as_the_command_does(bank, similar_merge_well):
    """``plan(..., device="gpu")`` (or ``"cuda"``, or ``"auto"``) without
    ``data`` was taken from Python without a word, and the device never
    read, where ``loramix plan --device`` without ``--data`` is refused: the
    command's line now, in keywords. The default ``"cpu"`` (however
    written) still plans. Failed on the old code (a plan came back)."""
    import loramix

    paths, _ = bank
    fit, _ = similar_merge_well
    line = ("device: applies with data (where the calibration forward passes run); without it the costs are "
            "computed in numpy on the CPU")  # fmt: skip
    for kw in ({"device": "gpu"}, {"device": "cuda"}, {"device": "auto"}, {"fit": fit, "device": "gpu"},
               {"device": "gpu", "data": []}):  # fmt: skip
        with pytest.raises(loramix.LoramixError) as e:
            loramix.plan(paths[:2], **kw)
        assert str(e.value) == line, (kw, str(e.value))
    for device in ("cpu", "CPU", torch.device("cpu")):
        assert len(loramix.plan(paths[:2], device=device).groups) >= 1


def test_plan_device_is_checked_or_refused(bank, similar_merge_well, capsys):
    """``plan --device`` sets where the calibration pass runs, and was read
    only when one ran: without ``--data`` (or with a fit that reads no
    data-aware feature) ``--device gpu``, or ``cuda`` on a machine without
    one, passed without a word. Without ``--data`` it is now refused as the
    other calibration options are (any value: none would take effect); with
    ``--data`` the device is checked before anything loads."""
    paths, _ = bank
    fit, _ = similar_merge_well
    data = ["--data", "synthetic:arith?n=5", "--data", "synthetic:units?n=5"]
    for dev in ("gpu", "cuda", "cpu"):
        _one_line_error(capsys, ["plan", *paths[:2], "--device", dev], "--device: applies with --data")
        _one_line_error(
            capsys, ["plan", *paths[:2], "--fit", str(fit), "--device", dev], "--device: applies with --data"
        )
    # the fit reads no data-aware feature, so no pass runs: the device was never resolved
    _one_line_error(
        capsys,
        ["plan", *paths[:2], "--fit", str(fit), *data, "--base", "b", "--device", "gpu"],
        "--device: unknown device 'gpu'",
    )
    if not torch.cuda.is_available():
        _one_line_error(
            capsys,
            ["plan", *paths[:2], "--fit", str(fit), *data, "--base", "b", "--device", "cuda"],
            "--device: cuda requested",
        )
    # the default, and a device given with --data, still plan
    assert main(["plan", *paths[:2], "--format", "json"]) == 0
    assert (
        main(
            [
                "plan",
                *paths[:2],
                "--fit",
                str(fit),
                *data,
                "--base",
                "b",
                "--device",
                "cpu",
                "--format",
                "json",
            ]
        )
        == 0
    )


def test_adapters_that_share_no_module_are_grouped_at_cost_0(tmp_path, capsys):
    """Without a fit, two adapters with no module in common cost 0 (their
    deltas are orthogonal: no weight has both), the best case for a merge.
    Their RMS cosine over shared modules is NaN, which was left out: such a
    pair was never grouped (two groups of one), yet joined a group through a
    third adapter's cosine, at that cosine's cost."""
    gen = torch.Generator().manual_seed(0)

    def adapter(name, modules):
        factors = {
            m: (torch.randn(DIM, 2, generator=gen), torch.randn(2, DIM, generator=gen)) for m in modules
        }
        return str(save_peft_adapter(tmp_path / name, factors, dtype=torch.float32))

    first, second = adapter("first", MODULES[:1]), adapter("second", MODULES[1:])
    assert main(["plan", first, second, "--format", "json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["members"], g["cost"], g["method"]) for g in groups] == [(["first", "second"], 0.0, "tsv")]
    # with a third adapter that shares second's module: the composition's pairs are
    # (first, second) 0, (first, third) 0 and (second, third) its cosine
    third = adapter("third", MODULES[1:])
    assert main(["similarity", second, third, "--format", "json"]) == 0
    cos = json.loads(capsys.readouterr().out)["rms"][0][1]
    assert main(["plan", first, second, third, "--format", "json", "--budget", "1"]) == 0
    (g,) = json.loads(capsys.readouterr().out)["groups"]
    assert g["members"] == ["first", "second", "third"] and g["cost"] == pytest.approx(
        abs(cos) / 3**0.5, rel=1e-6
    )


def test_plan_prints_the_command_that_merges_each_group(bank, kinds_bank, capsys):
    """A plan names a method; the table ends with the command that merges each group of two or
    more: tsv for LoRA adapters, with no option to add; for DoRA adapters (which tsv does not
    take) sum while the cosine is low, else ties with the --density it needs, which `merge -m
    ties` refuses to go without. Each command runs as printed (BASE and OUT filled in)."""
    paths, _ = bank

    def planned(*args):
        assert main(["plan", *args, "--format", "json"]) == 0
        groups = json.loads(capsys.readouterr().out)["groups"]
        assert main(["plan", *args]) == 0
        return groups, capsys.readouterr().out

    groups, text = planned(*paths, "--max-group", "3", "--budget", "10")  # LoRA groups of three: tsv
    assert [g["method"] for g in groups] == ["tsv"] * 3
    assert "tsv for a group of LoRA adapters" in text
    for g in groups:
        assert (
            f"  group {g['group']}: loramix merge -m tsv {' '.join(g['paths'])} --into BASE --out OUT\n"
            in text
        )
    (_, _), text = planned(*paths[:2], "--max-group", "1")
    assert "loramix" not in text  # groups of one: nothing to merge
    base, kinds = kinds_bank
    dora = [kinds["dora0"], kinds["dora1"]]
    (g,), text = planned(*dora, "--budget", "10")  # DoRA, far under the budget: the sum
    assert g["method"] == "sum" and f"  group 1: loramix sum {' '.join(dora)} --into BASE --out OUT\n" in text
    (g,), text = planned(*dora, "--budget", str(1.5 * g["cost"]))  # over half the budget: ties
    assert g["method"] == "ties"
    line = f"  group 1: loramix merge -m ties --density 0.5 {' '.join(dora)} --into BASE --out OUT"
    assert line in text
    # four DoRA/D2-LoRA/LoRA adapters far under the budget: ties, since the sum of four or more lost
    # the most in every such group of reports/merge-groups-14-domains (grouping.SUM_MAX_GROUP)
    four = [kinds["dora0"], kinds["dora1"], kinds["d2"], kinds["lora0"]]
    (g,), text = planned(*four, "--budget", "10")
    assert len(g["members"]) == 4 and g["cost"] <= 5 and g["method"] == "ties"
    (g,), text = planned(*four[:3], "--budget", "10")
    assert g["method"] == "sum"  # three: the sum still
    (g,), text = planned(kinds["lora0"], kinds["lora1"], "--budget", "10")
    assert g["method"] == "tsv"
    cmd = next(t for t in text.splitlines() if t.startswith("  group 1: loramix "))
    out = base.parent / "planned-tsv"
    argv = shlex.split(cmd.split("loramix ", 1)[1].replace("BASE", str(base)).replace("OUT", str(out)))
    assert main(argv) == 0 and (out / "config.json").is_file()


def test_a_cosine_plan_with_groups_of_three_or_more_says_what_size_costs(bank, capsys):
    """The RMS cosine does not grow with a group's size; a plan without a fit
    whose groups hold three or more adapters says so in one note (what the
    real study's groups lost, --max-group 2 and --fit); a plan of pairs does
    not, and the note does not change the groups."""
    paths, _ = bank

    def notes(*args):
        assert main(["plan", *paths, *args, "--format", "json"]) == 0
        got = json.loads(capsys.readouterr().out)
        return [len(g["members"]) for g in got["groups"]], got["notes"]

    sizes, said = notes("--max-group", "3", "--budget", "10")
    assert max(sizes) == 3 and said.count(SIZE_NOTE) == 1
    sizes, said = notes("--max-group", "2", "--budget", "10")
    assert max(sizes) == 2 and SIZE_NOTE not in said
    assert "82 % of its gain in a pair" in SIZE_NOTE and "--max-group 2" in SIZE_NOTE


def test_loramix_plan_says_its_notes_in_keyword_terms(kinds_bank):
    """``loramix.plan``'s ``cost_source``, ``notes`` and ``warnings`` are the
    command's lines, which named its flags to a Python caller too ("no --fit
    given", "pass --base BASE"); they now name the keywords, as its errors do
    (the command's lines, and the groups, are unchanged)."""
    import loramix

    base, paths = kinds_bank
    dora = [paths["dora0"], paths["dora1"]]
    cli, py = plan(dora, budget=1, progress=False), loramix.plan(dora, budget=1, progress=False)
    assert cli.cost_source == "RMS cosine of the composition (no --fit given)"
    assert py.cost_source == "RMS cosine of the composition (no fit given)"
    assert [n.replace("--base BASE", "base=BASE") for n in cli.notes] == py.notes
    assert len(py.notes) == 1 and py.notes[0].endswith("depend on the base: pass base=BASE to compare those")
    assert py.groups == cli.groups and py.to_json_dict()["cost"] == py.cost_source


def test_data_a_fit_reads_no_feature_of_is_said_unread(bank, similar_merge_well, capsys):
    """With a predictors file whose predictors read no data-aware feature,
    ``--data`` (and ``--base``, ``--tokens``) change nothing: ``plan`` and
    ``predict`` took them without a word, read for a setting that took
    effect. Each now says so in a note; without ``--data``, no note."""
    paths, _ = bank
    fit, _ = similar_merge_well
    data = ["--data", "synthetic:arith?n=5", "--base", "b"]  # b: no folder, and never read
    for argv in (["plan", *paths[:3], "--fit", str(fit)], ["predict", *paths[:2], "--fit", str(fit)]):
        assert main([*argv, *data, "--format", "json"]) == 0
        err = capsys.readouterr().err
        assert f"loramix: note: --data unread: the predictors of {fit} read no data-aware feature" in err, err
        assert main([*argv, "--format", "json"]) == 0
        assert "--data unread" not in capsys.readouterr().err
    p = plan(paths[:3], fit=str(fit), data=["synthetic:arith?n=5"], base="b")
    assert any(n.startswith("--data unread") for n in p.notes) and "--data unread" in repr(p)


def test_the_merge_commands_name_what_each_method_needs():
    """A plan names a method, not its options: ties gets the shipped studies'
    --density 0.5, dare-ties a pointer to the --density it needs, and a method
    whose options all have defaults (tsv's --lambda) runs as written."""
    from loramix.cli.plan_cmd import _commands

    groups = [
        {"group": i + 1, "paths": ["a", "b c"], "method": m}
        for i, m in enumerate(["sum", "ties", "dare-ties", "tsv"])
    ]
    lines = _commands(groups, "base/")
    assert lines[1:] == [
        "  group 1: loramix sum a 'b c' --into base/ --out OUT",
        "  group 2: loramix merge -m ties --density 0.5 a 'b c' --into base/ --out OUT  # --density: the shipped studies'",
        "  group 3: loramix merge -m dare-ties a 'b c' --into base/ --out OUT  # and dare-ties's --density: merge --help",
        "  group 4: loramix merge -m tsv a 'b c' --into base/ --out OUT",
    ]
    assert _commands([{"group": 1, "paths": ["a"], "method": "keep"}], None) == []


def test_the_size_note_quotes_its_study():
    """SIZE_NOTE and SUM_MAX_GROUP rest on reports/merge-groups-14-domains: the
    note's kept gains are that report's `tsv` means by size, rounded, and the
    sum kept more than TIES in some group of SUM_MAX_GROUP but in none larger,
    there and in reports/merge-groups-rank16 (a study made again must bring
    the note and the rule with it)."""
    import re
    from pathlib import Path

    from loramix.grouping import SUM_MAX_GROUP

    rep = Path(__file__).resolve().parents[1] / "reports" / "merge-groups-14-domains" / "composability.csv"
    df = pd.read_csv(rep)
    tsv = df.groupby("k")["kept_worst_pct_tsv"].mean().round().astype(int).to_dict()
    said = re.findall(
        r"(\d+) % of its gain in a pair, (\d+) % in a group of three, (\d+) % in a group of four", SIZE_NOTE
    )
    assert [tuple(int(x) for x in said[0])] == [(tsv[2], tsv[3], tsv[4])]
    for study in ("merge-groups-14-domains", "merge-groups-rank16"):  # rank 8 and rank 16
        df = pd.read_csv(rep.parents[1] / study / "composability.csv")
        wins = (
            df.assign(w=df["kept_worst_pct_sum"] > df["kept_worst_pct_ties"])
            .groupby("k")["w"]
            .sum()
            .to_dict()
        )
        assert wins[SUM_MAX_GROUP] > 0 and all(n == 0 for k, n in wins.items() if k > SUM_MAX_GROUP), study


def _same_bits(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))


def test_union_costs_are_the_costs_to_the_bit():
    """``CostModel.union_costs`` (the unions of one size at once, as ``plan``
    costs them) gives ``cost(members)[0]`` to the bit for pairs, triples and
    fours: under the cosine (pairs that share no module cost 0), one line, a
    line scaled by size, the mean, and a choice among methods; with NaN, inf,
    -0.0 and large values among the features, and under ridges (one of them
    reading a ``max`` feature, whose equal zeros of either sign must come out
    as Python's ``max`` gives them, one overflowing). A plan costs the same
    groups with every union costed one by one."""
    from loramix.features import FeatureSet
    from loramix.grouping import CostModel, plan_with

    rng = np.random.default_rng(3)
    n = 12
    mats = {}
    for name in ("f", "g", "h", "rms_cosine"):
        m = rng.normal(size=(n, n))
        m = (m + m.T) / 2
        m[1, 2] = m[2, 1] = np.nan
        m[3, 4] = m[4, 3] = np.inf
        m[5, 6] = m[6, 5] = -0.0
        m[7, 8] = m[8, 7] = 1e150
        mats[name] = m
    for name in ("f", "rms_cosine"):  # rms: the square overflows, the pair has no value
        mats[name][7, 8] = mats[name][8, 7] = 1e200
    # max over (5, 6, 7) meets -0.0 first, then 0.0: Python's max keeps the first of equals
    mats["h"][5, 7] = mats["h"][7, 5] = 0.0
    mats["h"][6, 7] = mats["h"][7, 6] = -1.0
    mats["coverage"] = np.ones((n, n))
    mats["coverage"][0, 9] = mats["coverage"][9, 0] = 0.0
    mats["pairs_per_member"] = np.ones((n, n))
    agg = {"f": "rms", "g": "mean", "h": "max", "rms_cosine": "rms", "coverage": "mean",
           "pairs_per_member": "member_sum"}  # fmt: skip
    fs = FeatureSet(names=[f"a{i}" for i in range(n)], matrices=mats, aggregate=agg)

    def ols(feature, slope, pairsum=False):
        fit = {"kind": "ols", "feature": feature, "slope": slope, "intercept": 0.3, "n": 10, "x_mean": 0.1,
               "sxx": 2.0, "residual_se": 0.5, "pearson_r": 0.5, "r2": 0.25, "loo_rmse": 1.0, "loo_mae": 1.0}  # fmt: skip
        return {**fit, "kind": "ols_pairsum", "size": "pairs_per_member"} if pairsum else fit

    mean = {"kind": "mean", "n": 5, "mean": 0.7, "sd": 0.2}
    ridge = {"kind": "ridge", "features": ["f", "g"], "lambda": 0.1, "mu": [0.0, 0.1], "sd": [1.0, 2.0],
             "coef": [0.5, -0.25], "intercept": 0.2, "resid_low": None, "resid_high": None, "n": 10}  # fmt: skip
    # a max feature among a ridge's, one product overflowing
    ridge_max = {**ridge, "features": ["h", "g", "f"], "mu": [0.0, 0.1, -0.3], "sd": [1.0, 2.0, 0.7],
                 "coef": [1e300, -0.25, 0.125]}  # fmt: skip
    models = {
        "cosine": CostModel(fs),
        "line": CostModel(fs, ols("g", -3.0)),
        "pairsum": CostModel(fs, ols("f", 2.0, pairsum=True)),
        "mean": CostModel(fs, mean),
        "max": CostModel(fs, {**ols("h", 1.5), "intercept": -0.0}),  # keeps the sign of a zero max
        "by method": CostModel(
            fs, ols("f", 1.0), 0.9, {"sum": ols("f", 1.0), "ties": ols("g", 0.5, True), "tsv": mean}
        ),  # fmt: skip
        "ridge": CostModel(fs, ridge),
        "ridge of a max": CostModel(fs, ridge_max),
        "ridges by method": CostModel(fs, ridge, 0.9, {"sum": ridge, "ties": {**ridge, "coef": [-0.5, 0.3]}}),
    }
    for label, model in models.items():
        assert model.elementwise, label  # a plan tries union_costs only then
        for k in (2, 3, 4):
            unions = np.array(list(itertools.combinations(range(n), k)))
            got = model.union_costs(unions)
            for row, v in zip(unions.tolist(), got.tolist(), strict=True):
                assert _same_bits(v, model.cost(row)[0]), (label, row, v)
        # the plan reads them, and plans as it does one union at a time
        p = plan_with(model, source=label, max_group=4, budget=1.0)
        model.union_costs = lambda unions: None
        assert plan_with(model, source=label, max_group=4, budget=1.0).groups == p.groups, label
    assert CostModel(fs).union_costs(np.array([[0, 9]]))[0] == 0.0
