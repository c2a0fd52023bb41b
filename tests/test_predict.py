"""The fit behind ``loramix predict`` (against direct numpy computations) and
``predict`` itself on real PEFT adapters."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from loramix.cli import main
from loramix.fit import composition_cosine, fit_line, t_cdf, t_quantile

from .factories import make_peft_adapter, tiny_gpt2

# ----------------------------------------------------------------------------- fit math


def _data(n=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 0.6, n)
    y = 40 * x - 3 + rng.normal(0, 2.5, n)
    return x, y


def test_fit_matches_numpy():
    x, y = _data()
    f = fit_line(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert f.slope == pytest.approx(slope, rel=1e-12)
    assert f.intercept == pytest.approx(intercept, rel=1e-12)
    r = np.corrcoef(x, y)[0, 1]
    assert f.pearson_r == pytest.approx(r, rel=1e-12)
    resid = y - (slope * x + intercept)
    r2 = 1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum()
    assert f.r2 == pytest.approx(r2, rel=1e-12)
    assert f.r2 == pytest.approx(r**2, rel=1e-10)  # a line with an intercept
    assert f.residual_se == pytest.approx(math.sqrt((resid**2).sum() / (len(x) - 2)), rel=1e-12)


def test_leave_one_out_matches_refits():
    x, y = _data(n=6, seed=3)
    f = fit_line(x, y)
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        s, c = np.polyfit(x[keep], y[keep], 1)
        assert f.loo_predictions[i] == pytest.approx(s * x[i] + c, rel=1e-10)
        errs.append(s * x[i] + c - y[i])
    errs = np.array(errs)
    assert f.loo_rmse == pytest.approx(np.sqrt((errs**2).mean()), rel=1e-10)
    assert f.loo_mae == pytest.approx(np.abs(errs).mean(), rel=1e-10)


def test_small_and_degenerate_fits():
    two = fit_line([0.1, 0.3], [1.0, 5.0])
    assert two.slope == pytest.approx(20.0) and two.intercept == pytest.approx(-1.0)
    assert two.loo_rmse is None and two.residual_se is None  # a line through 2 points: no LOO
    assert two.prediction_interval(0.2) is None
    one = fit_line([0.1], [1.0])
    assert not one.ok
    flat = fit_line([0.2, 0.2, 0.2], [1.0, 2.0, 3.0])  # x does not vary: no line
    assert not flat.ok
    nan = fit_line([0.1, float("nan"), 0.3, 0.5], [1.0, 2.0, 5.0, 9.0])
    assert nan.n == 3 and nan.labels == ["0", "2", "3"]


@pytest.mark.parametrize(
    "df, q",
    # Student t 97.5% quantiles from standard tables.
    [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (5, 2.570581836), (10, 2.228138852),
     (30, 2.042272456)],
)  # fmt: skip
def test_t_quantile_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-8)
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-10)
    assert t_quantile(0.025, df) == pytest.approx(-q, rel=1e-8)


def test_t_quantile_bisects_once_per_level_and_df(monkeypatch):
    """A study's validation asks for the same few quantiles thousands of times
    (one per held-out prediction interval): each ``(p, df)`` is bisected once,
    and later calls, either tail, give the same number without the CDF."""
    import loramix.fit as fit

    calls = []
    cdf = fit.t_cdf
    monkeypatch.setattr(fit, "t_cdf", lambda t, df: calls.append(t) or cdf(t, df))
    q = t_quantile(0.9375, 6.25)  # a level and df no other test asks for
    bisected = len(calls)
    assert bisected > 30 and t_cdf(q, 6.25) == pytest.approx(0.9375, abs=1e-10)
    assert [t_quantile(0.9375, 6.25), t_quantile(0.0625, 6.25)] == [q, -q]
    assert len(calls) == bisected


def test_t_cdf_against_numerical_integral():
    # The t density integrated with the trapezoid rule on a fine grid.
    for df in (1.0, 3.0, 7.5):
        grid = np.linspace(0, 2.5, 200001)
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        pdf = c * (1 + grid**2 / df) ** (-(df + 1) / 2)
        integral = float(((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid)).sum())
        assert t_cdf(2.5, df) == pytest.approx(0.5 + integral, abs=1e-9)


def test_prediction_interval_formula():
    x, y = _data(n=8, seed=5)
    f = fit_line(x, y)
    n = len(x)
    slope, intercept = np.polyfit(x, y, 1)
    s = math.sqrt(((y - slope * x - intercept) ** 2).sum() / (n - 2))
    x0 = 0.45
    se = s * math.sqrt(1 + 1 / n + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    t = t_quantile(0.975, n - 2)
    lo, hi = f.prediction_interval(x0)
    assert lo == pytest.approx(slope * x0 + intercept - t * se, rel=1e-10)
    assert hi == pytest.approx(slope * x0 + intercept + t * se, rel=1e-10)
    lo90, hi90 = f.prediction_interval(x0, level=0.9)
    assert lo < lo90 < hi90 < hi


def test_composition_cosine():
    rms = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.1], [0.4, 0.1, 1.0]])
    assert composition_cosine(rms, [0, 1]) == pytest.approx(0.2)
    assert composition_cosine(rms, [0, 1, 2]) == pytest.approx(math.sqrt((0.04 + 0.16 + 0.01) / 3))


def test_fit_roundtrip_dict():
    x, y = _data()
    f = fit_line(x, y, labels=[f"c{i}" for i in range(len(x))])
    g = type(f).from_dict(json.loads(json.dumps(f.to_dict())))
    assert g.predict(0.3) == pytest.approx(f.predict(0.3))
    assert g.prediction_interval(0.3) == pytest.approx(f.prediction_interval(0.3))


# ----------------------------------------------------------------------------- predict on adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    model = tiny_gpt2()
    return [make_peft_adapter(model, d / name, seed=i, r=4, lora_alpha=8) for i, name in enumerate("abc")]


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory):
    x, y = _data(n=5, seed=1)
    fits = [{"adapter_method": "lora", "merge_method": m, **fit_line(x, y + k).to_dict()}
            for k, m in enumerate(["sum", "ties"])]  # fmt: skip
    p = tmp_path_factory.mktemp("fit") / "fit.json"
    p.write_text(json.dumps({"scenario": "t", "prediction_level": 0.95, "fits": fits}))
    return p, fits


def test_predict_uses_the_runner_cosine(adapters, fit_file):
    from loramix.fit import LinearFit
    from loramix.interference import predict
    from loramix.overlap import similarity

    path, fits = fit_file
    sim = similarity(adapters, progress=False)
    rms = sim.rms.to_numpy()
    lf = LinearFit.from_dict(fits[0])
    r2 = predict(adapters[:2], path)
    assert r2["cosine"] == pytest.approx(rms[0, 1], rel=1e-12)
    assert r2["predicted_delta_ppl_pct"] == pytest.approx(lf.slope * rms[0, 1] + lf.intercept, rel=1e-12)
    assert r2["interval"] == pytest.approx(list(lf.prediction_interval(rms[0, 1])))
    assert r2["loo_rmse"] == pytest.approx(lf.loo_rmse)
    r3 = predict(adapters, path, method="ties")
    cos3 = math.sqrt((rms[0, 1] ** 2 + rms[0, 2] ** 2 + rms[1, 2] ** 2) / 3)
    assert r3["cosine"] == pytest.approx(cos3, rel=1e-12)
    lt = LinearFit.from_dict(fits[1])
    assert r3["predicted_delta_ppl_pct"] == pytest.approx(lt.slope * cos3 + lt.intercept, rel=1e-12)


def test_predict_flags_a_cosine_outside_the_fitted_range(adapters, tmp_path):
    """``extrapolation`` is true where the composition's cosine lies outside
    the fitted cosines, false inside them."""
    from loramix.interference import predict

    def run(x):
        y = 2.0 * np.asarray(x) + np.array([0.1, -0.2, 0.05, 0.0, 0.15])
        pairs = [f"d{i}+d{i + 1}" for i in range(5)]  # pairs: no extrapolation in size
        fit = {"adapter_method": "lora", "merge_method": "sum", **fit_line(x, y, pairs).to_dict()}
        p = tmp_path / f"fit{x[0]}.json"
        p.write_text(json.dumps({"scenario": "t", "prediction_level": 0.95, "fits": [fit]}))
        return predict(adapters[:2], p)

    inside = run([0.0, 0.25, 0.5, 0.75, 1.0])
    assert 0.0 <= inside["cosine"] <= 1.0 and inside["extrapolation"] is False
    lo = inside["cosine"] + 0.1
    outside = run([lo, lo + 0.1, lo + 0.2, lo + 0.3, lo + 0.4])
    assert outside["fitted_range"] == pytest.approx([lo, lo + 0.4]) and outside["extrapolation"] is True


def test_predict_cli(adapters, fit_file, capsys):
    path, _ = fit_file
    rc = main(["predict", str(adapters[0]), str(adapters[1]), "--fit", str(path), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["names"] == ["a", "b"] and out["interval"][0] < out["predicted_delta_ppl_pct"]
    rc = main(["predict", str(adapters[0]), str(adapters[1]), str(adapters[2]), "--fit", str(path)])
    text = capsys.readouterr().out
    assert rc == 0 and "predicted delta_ppl%" in text and "prediction interval" in text and "a+b" in text
    # what the figure means: a positive delta_ppl% is a loss (read as a share kept, it misleads)
    assert "  delta_ppl%: the merge's perplexity on the members' data, % above that of one adapter" in text


def test_predict_picks_the_study_of_the_adapters_initialisation(adapters, fit_file, tmp_path, capsys):
    """A fit.json with two studies of LoRA adapters (``lora``: shared initial
    factors, ``lora:data``: per-domain ones, as the quickstart writes): the
    one the adapters' training records match, or ``--label``'s; adapters
    that record nothing are refused naming the studies (the first study was
    taken silently)."""
    import shutil

    from loramix.fit import LinearFit
    from loramix.interference import predict

    _, fits = fit_file
    two = [{**fits[0], "adapter_method": "lora", "init": "shared"},
           {**fits[0], "adapter_method": "lora:data", "init": "data", "intercept": fits[0]["intercept"] + 7}]  # fmt: skip
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"scenario": "t", "fits": two}))
    pair = [shutil.copytree(a, tmp_path / a.name) for a in adapters[:2]]
    rc = main(["predict", *map(str, pair), "--fit", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds 2 studies of lora adapters merged by sum (lora, lora:data)" in err
    assert "--label" in err and err.count("\n") == 1
    # what a PEFT user needs to choose: that nothing is recorded, and each study's initialisation
    assert ("and the adapters record no initialisation (as those made outside loramix): choose one with "
            "--label (initialised: lora by shared, lora:data by data)") in err  # fmt: skip
    by_label = {f["adapter_method"]: LinearFit.from_dict(f) for f in two}
    for label, shared in (("lora", True), ("lora:data", False)):
        r = predict(pair, path, label=label)
        assert r["label"] == label
        assert r["predicted_delta_ppl_pct"] == pytest.approx(by_label[label].predict(r["cosine"]), rel=1e-12)
        for a in pair:  # what `loramix train` records
            (a / "loramix.json").write_text(
                json.dumps({"parameters": {"init": {"shared": shared, "seed": 0}}})
            )
        assert predict(pair, path)["label"] == label
    rc = main(["predict", *map(str, pair), "--fit", str(path), "--label", "d2lora"])
    err = capsys.readouterr().err
    assert rc == 2 and "--label" in err and "no study d2lora" in err and "(it has: lora, lora:data)" in err
    path.write_text(json.dumps({"scenario": "t", "fits": [{**two[0], "init": "random"}]}))
    rc = main(["predict", *map(str, pair), "--fit", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "fits[0].init" in err


def test_a_study_of_another_initialisation_chosen_by_label_is_warned_of(adapters, fit_file, tmp_path, capsys):
    """--label may choose the study whose adapters started otherwise than the
    given ones (per-domain against shared factors, whose cosines differ ten-fold
    in the quickstart): predict said nothing; it warns in one line. The
    study the adapters' own initialisation picks, or adapters that record
    none, get no such warning."""
    import shutil

    from loramix.interference import predict

    _, fits = fit_file
    two = [{**fits[0], "adapter_method": "lora", "init": "shared"},
           {**fits[0], "adapter_method": "lora:data", "init": "data"}]  # fmt: skip
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"scenario": "t", "fits": two}))
    pair = [shutil.copytree(a, tmp_path / a.name) for a in adapters[:2]]
    assert predict(pair, path, label="lora")["warnings"] == []  # nothing recorded: nothing to compare
    for a in pair:
        (a / "loramix.json").write_text(json.dumps({"parameters": {"init": {"shared": False, "seed": 0}}}))
    assert predict(pair, path)["warnings"] == []  # their own study, lora:data
    assert main(["predict", *map(str, pair), "--fit", str(path), "--label", "lora"]) == 0
    err = capsys.readouterr().err
    assert err == (f"loramix: warning: {path}: the adapters were initialised per domain (init data), the study "
                   "lora's from shared factors (init shared): their cosines differ in scale, so the prediction "
                   "may not hold\n")  # fmt: skip


def test_predict_bad_input(adapters, fit_file, tmp_path, capsys):
    path, _ = fit_file
    cases = [
        (["predict", str(adapters[0]), "--fit", str(path)], "at least 2 adapters"),
        (
            ["predict", str(adapters[0]), str(adapters[1]), "--fit", str(tmp_path / "nope.json")],
            "no such fit",
        ),
        (
            ["predict", str(adapters[0]), str(adapters[1]), "--fit", str(path), "--method", "svd"],
            "no fit for lora",
        ),
    ]
    # a valid fit file whose line, every number in it finite, overflows at the composition's cosine
    huge = json.loads(path.read_text())
    huge["fits"][0].update(slope=1.7e308, intercept=sys.float_info.max)  # overflows at any cosine > 1e-16
    (tmp_path / "huge.json").write_text(json.dumps(huge))
    cases.append(
        (["predict", str(adapters[0]), str(adapters[1]), "--fit", str(tmp_path / "huge.json")], "overflows")
    )
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


def test_predict_json_is_standard_json_where_a_pair_shares_no_module(adapters, fit_file, tmp_path, capsys):
    """A pair sharing no module has no cosine: --format json wrote a bare NaN
    (found on SmolLM2 adapters on attention and on mlp.down_proj), which
    strict JSON parsers reject; now null, as similarity --format json writes."""
    path, _ = fit_file
    model = tiny_gpt2()
    e = make_peft_adapter(model, tmp_path / "e", seed=7, r=2, target_modules=["c_fc"])
    f = make_peft_adapter(model, tmp_path / "f", seed=8, r=2, target_modules=["c_attn"])
    rc = main(["predict", str(adapters[0]), str(e), str(f), "--fit", str(path), "--format", "json"])

    def strict(c):
        raise ValueError(f"not JSON: {c}")

    out = json.loads(capsys.readouterr().out, parse_constant=strict)
    # e and f adapt no module in common: their cosine counts 0, as in plan (no longer null)
    assert rc == 0 and out["pairwise"]["e+f"] == 0.0
    assert out["pairwise"]["a+e"] > 0 and math.isfinite(out["predicted_delta_ppl_pct"])


def test_predict_reads_paths_with_the_numpy_reader_to_the_same_figures(adapters, fit_file):
    """Given paths, predict reads the factors with the numpy reader (no torch);
    the figures are those of the same adapters loaded by the torch reader."""
    from loramix.interference import predict
    from loramix.io.adapter_files import load_adapter

    path, _ = fit_file
    for method in ("sum", "ties"):
        by_path = predict(adapters, path, method=method)
        loaded = predict([load_adapter(a) for a in adapters], path, method=method)
        assert json.dumps(by_path) == json.dumps(loaded)


def test_a_predictors_file_reads_paths_with_the_numpy_reader_to_the_same_figures(adapters):
    """Without --data, predict and plan with a predictors file read the factors
    with the numpy reader: the features (subspace_overlap's SVD in numpy, the
    cosines already numpy's) and the prediction are those of the adapters
    loaded by torch's reader, to 1e-12, and torch's own SVD gives the same
    subspace overlap."""
    import torch

    from loramix.features import compute_features, registry
    from loramix.grouping import plan
    from loramix.interference import predict_validated
    from loramix.io.adapter_files import load_adapter
    from loramix.io.np_factors import load_np_adapter

    predictors = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json"
    if not predictors.is_file():
        pytest.skip("no committed quickstart predictors file")
    loaded = [load_adapter(a) for a in adapters]
    by_path, by_torch = predict_validated(adapters, predictors), predict_validated(loaded, predictors)
    assert by_path.pop("features") == pytest.approx(by_torch.pop("features"), rel=1e-12, abs=0)
    assert by_path.pop("predicted") == pytest.approx(by_torch.pop("predicted"), rel=1e-12, abs=0)
    assert by_path.pop("interval") == pytest.approx(by_torch.pop("interval"), rel=1e-12, abs=0)
    assert by_path == by_torch
    p, t = plan(adapters, fit=predictors), plan(loaded, fit=predictors)
    assert [g["members"] for g in p.groups] == [g["members"] for g in t.groups]
    only = sorted(n for n, f in registry().items() if not f.data_aware)
    fn = compute_features([load_np_adapter(a) for a in adapters], only=only)
    ft = compute_features(loaded, only=only)
    assert fn.matrices.keys() == ft.matrices.keys()
    for k, m in fn.matrices.items():
        np.testing.assert_allclose(m, ft.matrices[k], rtol=1e-12, atol=0, equal_nan=True, err_msg=k)

    def torch_overlap(Ai, Aj):  # the torch SVD the feature used before
        Qi, Qj = (torch.linalg.svd(A.T, full_matrices=False).U for A in (Ai, Aj))
        return float((Qi.T @ Qj).square().sum()) / min(Ai.shape[0], Aj.shape[0])

    for i, j in [(0, 1), (0, 2), (1, 2)]:
        ref = np.mean([torch_overlap(loaded[i].modules[m].factors()[1], loaded[j].modules[m].factors()[1])
                       for m in loaded[i].modules])  # fmt: skip
        assert fn.matrices["subspace_overlap"][i, j] == pytest.approx(ref, rel=1e-12, abs=0)


def test_predict_with_a_predictors_file_is_the_commands_for_every_method(adapters, fit_file, capsys):
    """``loramix.predict(..., predictors.json, merge_method=M)`` gives what
    ``loramix predict --fit predictors.json --method M`` prints, for each
    method of the file's ``by_method`` (it dropped ``merge_method``: every
    method got the primary predictor's figure), and refuses what the command
    refuses (``label`` and ``level`` were ignored; ``data`` with a fit.json)."""
    import loramix
    from loramix.cli.predict_cmd import _json

    predictors = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json"
    if not predictors.is_file():
        pytest.skip("no committed quickstart predictors file")
    methods = list(json.loads(predictors.read_text())["by_method"])
    figures = set()
    for m in methods:
        r = loramix.predict(adapters, predictors, method=m)
        capsys.readouterr()
        assert (
            main(
                ["predict", *map(str, adapters), "--fit", str(predictors), "--method", m, "--format", "json"]
            )
            == 0
        )
        assert json.loads(_json(r)) == json.loads(capsys.readouterr().out), m
        figures.add((r["predictor"], r["predicted"]))
    assert len(figures) > 1  # the methods' predictors differ: a dropped method would show
    # in Python's terms: the keyword, where the command names its flag (--label)
    for kw, needle in (({"label": "lora"}, "^label: "), ({"level": 0.5}, "^level: ")):
        with pytest.raises(loramix.LoramixError, match=needle):
            loramix.predict(adapters, predictors, **kw)
    with pytest.raises(loramix.LoramixError, match="^data: "):
        loramix.predict(adapters, fit_file[0], data=["x.jsonl", "y.jsonl", "z.jsonl"])


def _cosine_predictors(path: Path) -> Path:
    """A predictors file whose predictor reads the RMS cosine alone (no data-aware feature)."""
    import itertools

    import pandas as pd

    from loramix.validation import validate, write_predictors

    rng = np.random.default_rng(0)
    comps = list(itertools.combinations([f"d{k}" for k in range(6)], 2))
    x = rng.uniform(0, 1, len(comps))
    v = validate(comps, 5 - 30 * x + rng.normal(0, 0.5, len(comps)), pd.DataFrame({"rms_cosine": x}))
    return write_predictors(path, v)


def test_a_base_that_nothing_would_read_is_refused_from_python_as_by_the_command(
    adapters, fit_file, tmp_path, capsys
):
    """``predict(adapters, "fit.json", base=...)`` ignored the base without a
    word (and ``tokens`` and ``max_len``), where it refused ``data``: a
    fit.json's line is on the RMS cosine of the factors (residuals, base-free,
    as its study measured it), which reads no base. Refused now in one line
    naming the keyword and why; with a predictors file they are refused
    without ``data``, as ``loramix predict`` refused them; the command says
    the same lines with its flags. Failed on the old code (a prediction came
    back)."""
    import loramix

    line = fit_file[0]
    predictors = _cosine_predictors(tmp_path / "predictors.json")
    nowhere = str(tmp_path / "no-base")  # never read: refused before anything would read it
    for fit, kw, needle in [
        (line, {"base": nowhere}, "base: applies to a predictors file, with data (its calibration pass); a "
                                  "fit.json predicts from the RMS cosine of the factors, which reads no base"),
        (line, {"tokens": 64}, "tokens: applies to a predictors file"),
        (line, {"max_len": 32}, "max_len: applies to a predictors file"),
        (predictors, {"base": nowhere}, "base: applies with data (the calibration files"),
        (predictors, {"tokens": 64}, "tokens: applies with data"),
    ]:  # fmt: skip
        with pytest.raises(loramix.LoramixError) as e:
            loramix.predict(adapters[:2], fit, **kw)
        assert str(e.value).startswith(needle), (fit, kw, str(e.value))
        flag = "--" + next(iter(kw)).replace("_", "-")
        argv = ["predict", *map(str, adapters[:2]), "--fit", str(fit), flag, str(next(iter(kw.values())))]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag}: " in err, err
        said = needle.replace(next(iter(kw)), flag, 1).replace(" data", " --data")
        assert said in err, (said, err)
    # what they apply to still runs: the line without them, the predictors file without them
    assert "predicted_delta_ppl_pct" in loramix.predict(adapters[:2], line)
    assert "predicted" in loramix.predict(adapters[:2], predictors)


def test_predict_checks_a_fit_given_as_a_dict(adapters, fit_file):
    """``fit`` may be a loaded dict: it gets the file's checks, one-line
    LoramixErrors (an empty dict was a bare KeyError 'fits', a fit without
    its slope another KeyError), and a good one predicts as its file does."""
    import loramix

    path, fits = fit_file
    for bad, needle in (
        ({}, "no 'fits' list"),
        ({"fits": [{"adapter_method": "lora", "merge_method": "sum"}]}, "fits[0]"),
    ):
        with pytest.raises(loramix.LoramixError, match=needle.replace("[", r"\[")) as e:
            loramix.predict(adapters, bad)
        assert str(e.value).startswith("fit: ")
    as_dict = loramix.predict(adapters, json.loads(path.read_text()))
    assert as_dict["predicted_delta_ppl_pct"] == loramix.predict(adapters, path)["predicted_delta_ppl_pct"]


def test_data_for_predictors_that_read_none_neither_loads_torch_nor_changes_a_figure(adapters, tmp_path):
    """predict and plan with --data and --base for a predictors file none of
    whose predictors reads a data-aware feature (reports/real-14-domains'
    and quickstart's: the data are not used) read the factors with the numpy
    reader, as without --data: no torch (1.4 s of 2.2 s on SmolLM2 adapters,
    271 MB of memory against 77 MB), and the same output as without --data,
    but for a note that the data went unread."""
    import subprocess

    from loramix.grouping import reads_data
    from loramix.validation import load_predictors

    from .factories import save_base, write_jsonl

    predictors = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json"
    if not predictors.is_file():
        pytest.skip("no committed quickstart predictors file")
    assert not reads_data(load_predictors(predictors))
    base = save_base(tiny_gpt2(), tmp_path / "base")
    data = [write_jsonl(tmp_path / f"{n}.jsonl", [{"question": "q", "answer": "a"}]) for n in "ab"]
    with_data = ["--data", str(data[0]), "--data", str(data[1]), "--base", str(base)]
    for command in ("predict", "plan"):
        outputs = []
        for extra in (with_data, []):
            args = [
                command,
                str(adapters[0]),
                str(adapters[1]),
                "--fit",
                str(predictors),
                "--format",
                "json",
                *extra,
            ]
            code = (
                "import sys\n"
                "from loramix.cli import main\n"
                f"code = main({args!r})\n"
                "print('torch' in sys.modules, file=sys.stderr)\n"
                "sys.exit(code)\n"
            )
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert r.stderr.splitlines()[-1] == "False", (command, extra, r.stderr)
            outputs.append(json.loads(r.stdout))
        # the same figures; with --data a note that it went unread
        unread = [n for n in outputs[0].pop("notes") if n.startswith("--data unread")]
        assert len(unread) == 1 and outputs[1].pop("notes") == [], (command, unread)
        assert outputs[0] == outputs[1], command


def test_predict_counts_a_pair_with_no_module_in_common_as_plan_does(tmp_path, capsys):
    """Two real adapters on disjoint modules (c_fc, c_attn): their deltas are
    orthogonal over all parameters, and plan counts their cosine 0; predict
    refused them ("no cosine") with a fit.json and with a predictors file read
    by rms_cosine. Now both predict at cosine 0 with one note, plan with the
    same predictors file costs the pair the same, and a predictor reading a
    feature with no value (a per-type cosine) is still refused in one line."""
    from loramix.errors import UsageError
    from loramix.grouping import plan
    from loramix.interference import predict

    model = tiny_gpt2()
    e = make_peft_adapter(model, tmp_path / "e", seed=7, r=2, target_modules=["c_fc"])
    f = make_peft_adapter(model, tmp_path / "f", seed=8, r=2, target_modules=["c_attn"])
    x, y = _data(n=5, seed=1)
    lf = fit_line(x, y)
    line = tmp_path / "fit.json"
    line.write_text(json.dumps({"fits": [{"adapter_method": "lora", "merge_method": "sum", **lf.to_dict()}]}))
    r = predict([e, f], line)
    assert r["cosine"] == 0.0 and r["pairwise"] == {"e+f": 0.0}
    assert r["predicted_delta_ppl_pct"] == pytest.approx(lf.intercept, rel=1e-12)
    assert len(r["notes"]) == 1 and "e+f adapt no module in common" in r["notes"][0]
    assert main(["predict", str(e), str(f), "--fit", str(line)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loramix: note: e+f adapt no module in common")

    qs = json.loads(
        (Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json").read_text()
    )
    for best in ("ols:rms_cosine", "ols:mean_cosine"):
        p = tmp_path / f"{best}.json"
        p.write_text(json.dumps({**qs, "best": best, "by_method": None}))
        v = predict([e, f], p)
        fit = qs["fits"][best]
        assert v["features"] == {best[4:]: 0.0} and v["predicted"] == pytest.approx(
            fit["intercept"], rel=1e-12
        )
        assert len(v["notes"]) == 1 and "e+f" in v["notes"][0]
        g = plan([e, f], fit=p, budget=1e9).groups
        assert len(g) == 1 and g[0]["cost"] == pytest.approx(v["predicted"], rel=1e-12)
    p = tmp_path / "type.json"
    p.write_text(json.dumps({**qs, "best": "ols:type_rms_cosine:mlp.c_fc", "by_method": None}))
    with pytest.raises(
        UsageError, match="reads type_rms_cosine:mlp.c_fc, which these adapters have no value"
    ):
        predict([e, f], p)


def test_adapters_made_outside_loramix_are_said_to_be_unchecked_against_the_fits_base(
    adapters, fit_file, tmp_path, capsys
):
    """PEFT-trained adapters record no base identity: predict with a fit (or
    the committed predictors file) that records one said nothing, as if the
    base had been checked; it says the check was not made."""
    path, fits = fit_file
    ident = "ab" * 32
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({**json.loads(path.read_text()), "base_identity": ident}))
    committed = Path(__file__).resolve().parents[1] / "reports" / "real-14-domains" / "predictors.json"
    for f, who in ((fit, "this fit was"), (committed, "these predictors were")):
        assert main(["predict", str(adapters[0]), str(adapters[1]), "--fit", str(f)]) == 0
        err = capsys.readouterr().err
        assert (f"loramix: warning: {f}: the adapters record no base they were trained on (made outside "
                f"loramix): that it is the one {who} fitted for (") in err  # fmt: skip
    assert main(["predict", str(adapters[0]), str(adapters[1]), "--fit", str(path)]) == 0
    assert "record no base" not in capsys.readouterr().err  # a fit with no base identity: nothing to check


def _noise_predictors(tmp_path: Path):
    """A validation on pure-noise features (seeded) whose nested check says
    choosing the best does not beat the mean, and its predictors file."""
    import itertools

    import pandas as pd

    from loramix.validation import validate, write_predictors

    rng = np.random.default_rng(1)
    comps = list(itertools.combinations([f"d{k}" for k in range(7)], 2))
    X = pd.DataFrame(
        {"rms_cosine": rng.uniform(0, 1, len(comps)), "mean_cosine": rng.uniform(-1, 1, len(comps))}
    )
    v = validate(comps, rng.normal(size=len(comps)), X, nested=True)
    assert v.selection["mae"] >= v.selection["mean_mae"]  # noise: the precondition of the tests
    return v, write_predictors(tmp_path / "predictors.json", v)


def test_predict_says_when_choosing_the_best_does_not_beat_the_mean(adapters, tmp_path, capsys):
    """A predictors file whose nested validation of the choice
    (``selection``) is not below the mean's: ``loramix predict`` adds one
    note line saying that choosing the best this way does not beat the mean
    on held-out domains, and its JSON carries the figure; a file without it
    (from an earlier loramix) predicts as before, with no such line. New
    behaviour."""
    v, p = _noise_predictors(tmp_path)
    argv = ["predict", *map(str, adapters[:2]), "--fit", str(p)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    said = [x for x in out.splitlines() if "choosing the best predictor this way does not beat the mean" in x]
    assert len(said) == 1 and said[0].startswith("note: "), out
    assert f"held-out MAE {v.selection['mae']:.3g} against {v.selection['mean_mae']:.3g}" in said[0]
    assert main([*argv, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"] == json.loads(p.read_text())["selection"]
    old = json.loads(p.read_text())
    del old["selection"]
    p.write_text(json.dumps(old))
    assert main(argv) == 0
    assert "choosing the best" not in capsys.readouterr().out


def test_plan_warns_when_choosing_the_best_does_not_beat_the_mean(adapters, tmp_path, capsys):
    """``loramix plan --fit`` groups by the predictors file's best: where
    the file's nested validation of the choice is not below the mean's, one
    warning says so (predict's note, with what it means for the groups); a
    file without it plans as before, with no such warning."""
    v, p = _noise_predictors(tmp_path)
    argv = ["plan", *map(str, adapters), "--fit", str(p)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if "choosing the best predictor this way does not beat the mean" in x]
    assert len(said) == 1 and said[0].startswith("loramix: warning: "), err
    assert said[0].endswith("the groups rest on its predictions"), said[0]
    old = json.loads(p.read_text())
    del old["selection"]
    p.write_text(json.dumps(old))
    assert main(argv) == 0
    assert "choosing the best" not in capsys.readouterr().err
