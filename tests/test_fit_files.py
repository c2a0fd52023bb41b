"""Malformed fit files: ``loramix predict --fit`` and ``loramix plan --fit`` on a
``fit.json`` or ``predictors.json`` written by the code and then damaged one
field at a time refuse it with one line naming the file and the field (exit 2,
no traceback); the undamaged files predict exactly what the fits say."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loramix.cli import main
from loramix.fit import LinearFit, fit_line
from loramix.validation import method_entry, predict_from, validate, write_predictors

from .factories import make_peft_adapter, tiny_gpt2


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    model = tiny_gpt2()
    return [str(make_peft_adapter(model, d / name, seed=i, r=4, lora_alpha=8)) for i, name in enumerate("ab")]


@pytest.fixture(scope="module")
def cosine(adapters):
    from loramix.overlap import similarity

    return float(similarity(adapters, progress=False).rms.to_numpy()[0, 1])


@pytest.fixture(scope="module")
def fit_json(tmp_path_factory):
    """A fit.json as a scenario run writes it (loramix.scenario.report): one
    :func:`fit_line` per merge method, with its adapter and merge method."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0.05, 0.6, 5)
    y = 40 * x - 3 + rng.normal(0, 2.5, 5)
    fits = [
        {"adapter_method": "lora", "merge_method": m, **fit_line(x, y + k, labels=list("abcde")).to_dict()}
        for k, m in enumerate(["sum", "ties"])
    ]
    d = {"scenario": "t", "loramix_version": "0", "prediction_level": 0.95, "fits": fits}
    return json.loads(json.dumps(d))


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """A predictors.json written by :func:`write_predictors`, with the fields a
    scenario run adds (loramix.scenario.answer): ``adapter_kind`` and a
    ``by_method`` of two methods; and the in-memory fits it was written from."""
    rng = np.random.default_rng(0)
    comps = list(itertools.combinations([f"d{k}" for k in range(6)], 2))
    x = rng.uniform(0, 1, len(comps))
    v = validate(comps, 5 - 30 * x + rng.normal(0, 0.5, len(comps)), pd.DataFrame({"rms_cosine": x}))
    p = write_predictors(tmp_path_factory.mktemp("pred") / "predictors.json", v)
    d = json.loads(p.read_text())
    d.update(scenario="t", base_identity=None, adapter_kind="lora")
    assert d["best"] == "ridge"
    d["by_method"] = {"sum": method_entry(d), "ties": method_entry({**d, "best": "ols:rms_cosine"})}
    return json.loads(json.dumps(d)), v  # as read back from disk: no object shared between fields


def _write(path, d):
    path.write_text(json.dumps(d, indent=1))  # NaN and Infinity as Python writes them
    return path


def _one_line(capsys, argv, path, needle):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"loramix: error: {path}: "), err
    assert needle in lines[0] and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- fit.json


def _set(key, value, entry=0):
    def damage(d):
        d["fits"][entry][key] = value

    return damage


def _drop(key):
    def damage(d):
        del d["fits"][0][key]

    return damage


def _top(key, value):
    def damage(d):
        d[key] = value

    return damage


def _entry(value):
    def damage(d):
        d["fits"][0] = value

    return damage


FIT_DAMAGE = {
    "entry-int": (_entry(7), "fits[0] must be an object"),
    "entry-list": (_entry([1]), "fits[0] must be an object"),
    "level-str": (_top("prediction_level", "x"), "prediction_level must be a number in (0, 1)"),
    "level-5": (_top("prediction_level", 5), "prediction_level must be a number in (0, 1)"),
    "level-nan": (_top("prediction_level", math.nan), "prediction_level"),
    "scenario-int": (_top("scenario", 3), "scenario must be a string"),
    "adapters-list": (
        _top("adapters", [8]),
        "adapters must be an object (the study's [adapters]) or null, got",
    ),
    "adapter-method-int": (_set("adapter_method", 3), "fits[0].adapter_method must be a string"),
    "merge-method-missing": (lambda d: d["fits"][0].pop("merge_method"), "fits[0].merge_method is missing"),
    "n-str": (_set("n", "5"), "fits[0].n must be an integer"),
    "n-float": (_set("n", 5.0), "fits[0].n must be an integer"),
    "n-neg": (_set("n", -3), "fits[0].n must be an integer >= 0"),
    "n-bool": (_set("n", True), "fits[0].n must be an integer"),
    "n-1-with-line": (_set("n", 1), "fits[0].n"),
    "slope-missing": (_drop("slope"), "fits[0].slope is missing"),
    "slope-str": (_set("slope", "x"), 'fits[0].slope must be a finite number or null, got "x"'),
    "slope-nan": (_set("slope", math.nan), "fits[0].slope must be a finite number or null, got NaN"),
    "slope-inf": (_set("slope", math.inf), "fits[0].slope"),
    "slope-huge-int": (_set("slope", 10**400), "fits[0].slope must be a finite number"),
    "n-huge": (_set("n", 10**400), "fits[0].n must be an integer from 0 to 2^53"),
    "x-huge": (_set("x", [1e308] * 5), "fits[0].x_mean"),
    "slope-null-intercept-set": (_set("slope", None), "fits[0].intercept"),
    "intercept-str": (_set("intercept", "x"), "fits[0].intercept must be a finite number"),
    "intercept-null": (_set("intercept", None), "fits[0].intercept must be a finite number"),
    "pearson-str": (_set("pearson_r", "x"), "fits[0].pearson_r"),
    "sxx-zero": (_set("sxx", 0), "fits[0].sxx must be a finite number > 0, got 0"),
    "sxx-neg": (_set("sxx", -1.0), "fits[0].sxx must be a finite number > 0"),
    "sxx-str": (_set("sxx", "x"), "fits[0].sxx"),
    "x-mean-null": (_set("x_mean", None), "fits[0].x_mean must be a finite number"),
    "x-mean-off": (_set("x_mean", 7.0), "fits[0].x_mean"),
    "residual-se-neg": (_set("residual_se", -1.0), "fits[0].residual_se must be a finite number >= 0"),
    "residual-se-str": (_set("residual_se", "a"), "fits[0].residual_se"),
    "loo-rmse-inf": (_set("loo_rmse", math.inf), "fits[0].loo_rmse"),
    "loo-mae-neg": (_set("loo_mae", -0.1), "fits[0].loo_mae"),
    "x-str": (_set("x", "x"), "fits[0].x must be a list"),
    "x-short": (_set("x", [0.1, 0.2]), "fits[0].x has 2 values, but n is 5"),
    "x-null-item": (lambda d: d["fits"][0]["x"].__setitem__(2, None), "fits[0].x[2] must be a finite number"),
    "x-const": (_set("x", [0.1] * 5), "fits[0].x_mean"),
    "y-nulls": (_set("y", [None] * 5), "fits[0].y[0] must be a finite number, got null"),
    "labels-int": (_set("labels", [1, 2, 3, 4, 5]), "fits[0].labels[0] must be a string"),
    "loo-predictions-str": (_set("loo_predictions", ["a"] * 5), "fits[0].loo_predictions[0]"),
    "other-entry-slope-str": (_set("slope", "x", entry=1), "fits[1].slope"),
    "n-2-with-residual-se": (
        lambda d: d["fits"][0].update(
            n=2,
            x=d["fits"][0]["x"][:2],
            y=d["fits"][0]["y"][:2],
            loo_predictions=[None] * 2,
            labels=["a", "b"],
        ),
        "fits[0].residual_se is given but n is 2",
    ),
}


@pytest.mark.parametrize("case", FIT_DAMAGE, ids=list(FIT_DAMAGE))
def test_damaged_fit_json_is_one_line(adapters, fit_json, tmp_path, capsys, case):
    damage, needle = FIT_DAMAGE[case]
    d = copy.deepcopy(fit_json)
    damage(d)
    path = _write(tmp_path / "fit.json", d)
    _one_line(capsys, ["predict", *adapters, "--fit", path], path, needle)


def test_fit_json_as_written_predicts_the_line(adapters, fit_json, cosine, tmp_path, capsys):
    path = _write(tmp_path / "fit.json", fit_json)
    for k, method in enumerate(["sum", "ties"]):
        capsys.readouterr()
        assert main(["predict", *adapters, "--fit", str(path), "--method", method, "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        lf = LinearFit.from_dict(fit_json["fits"][k])
        assert out["cosine"] == cosine
        assert out["predicted_delta_ppl_pct"] == lf.slope * cosine + lf.intercept
        assert out["interval"] == list(lf.prediction_interval(cosine, 0.95))
        assert out["loo_rmse"] == lf.loo_rmse
    # a fit with too few points for a line still loads, and predict says why it cannot use it
    d = copy.deepcopy(fit_json)
    d["fits"][0] = {"adapter_method": "lora", "merge_method": "sum", **fit_line([0.1], [1.0]).to_dict()}
    path = _write(tmp_path / "few.json", d)
    _one_line(capsys, ["predict", *adapters, "--fit", path], path, "1 point(s): too few to predict")


def test_a_folder_is_not_a_fit_file(adapters, tmp_path, capsys):
    _one_line(capsys, ["predict", *adapters, "--fit", tmp_path], tmp_path,
              "a folder with neither predictors.json nor fit.json in it")  # fmt: skip
    _one_line(
        capsys, ["plan", *adapters, "--fit", tmp_path], tmp_path, "a folder without predictors.json in it"
    )
    missing = tmp_path / "nope.json"
    _one_line(capsys, ["predict", *adapters, "--fit", missing], missing, "no such fit file")


# ----------------------------------------------------------------------------- predictors.json


def _best(name):
    """Point ``best`` at another of the file's fitted predictors (still a valid file)."""

    def use(d):
        d["best"] = name

    return use


def _fit(key, value):
    def damage(d):
        d["fits"][d["best"]][key] = value

    return damage


def _pred_top(key, value):
    def damage(d):
        d[key] = value

    return damage


OLS, RIDGE, MEAN = _best("ols:rms_cosine"), _best("ridge"), _best("mean")
BEST = 'fits["ols:rms_cosine"]'

PRED_DAMAGE = {
    "base-identity-int": (None, _pred_top("base_identity", 3), "base_identity must be a string or null"),
    "adapter-kind-int": (None, _pred_top("adapter_kind", 3), "adapter_kind must be a string or null"),
    "scenario-list": (None, _pred_top("scenario", ["x"]), "scenario"),
    "adapters-int": (
        None,
        _pred_top("adapters", 3),
        "adapters must be an object (the study's [adapters]) or null",
    ),
    "level-3": (None, _pred_top("level", 3), "level must be a number in (0, 1), got 3"),
    "calibration-list": (None, _pred_top("calibration", [128, 64]), "calibration must be an object"),
    "calibration-tokens-0": (
        None,
        _pred_top("calibration", {"tokens": 0, "max_len": 64}),
        "calibration.tokens must be a positive integer, got 0",
    ),
    "calibration-max-len-1": (
        None,
        _pred_top("calibration", {"tokens": 128, "max_len": 1}),
        "calibration.max_len must be an integer of at least 2, got 1",
    ),
    "calibration-no-max-len": (
        None,
        _pred_top("calibration", {"tokens": 128}),
        "calibration.max_len is missing",
    ),
    "format-other": (None, _pred_top("format", "loramix-predictors-v9"), "loramix-predictors"),
    "level-str": (None, _pred_top("level", "x"), "level must be a number in (0, 1)"),
    "level-missing": (None, lambda d: d.pop("level"), "level is missing"),
    "target-int": (None, _pred_top("target", 7), "target must be a string"),
    "beats-mean-str": (None, _pred_top("beats_mean", "yes"), "beats_mean must be true or false"),
    "best-int": (None, _pred_top("best", 5), "best predictor 5 has no fit"),
    "best-list": (None, _pred_top("best", ["mean"]), "has no fit"),
    "summary-str": (None, _pred_top("summary", "x"), 'summary must be a list of held-out records, got "x"'),
    "summary-row-int": (None, lambda d: d["summary"].__setitem__(0, 3), "summary[0] must be an object"),
    "summary-mae-str": (None, lambda d: d["summary"][0].update(mae="x"), "summary[0].mae"),
    "summary-n-zero": (None, lambda d: d["summary"][0].update(n=0), "summary[0].n"),
    "summary-coverage-2": (None, lambda d: d["summary"][0].update(coverage=2), "summary[0].coverage"),
    "summary-no-mean": (
        None,
        lambda d: d.update(summary=[r for r in d["summary"] if r["predictor"] != "mean"]),
        "summary has no held-out MAE for predictor 'mean'",
    ),
    "kind-zzz": (OLS, _fit("kind", "zzz"), f"{BEST}.kind must be one of mean, ols, ols_pairsum, ridge"),
    "kind-missing": (OLS, lambda d: d["fits"][d["best"]].pop("kind"), f"{BEST}.kind is missing"),
    "fit-str": (OLS, lambda d: d["fits"].update({d["best"]: "x"}), f"{BEST} must be an object"),
    "feature-unknown": (OLS, _fit("feature", "nope_feature"), f"{BEST}.feature must be a loramix feature"),
    "feature-int": (OLS, _fit("feature", 3), f"{BEST}.feature must be a string"),
    "n-zero": (OLS, _fit("n", 0), f"{BEST}.n"),
    "n-str": (OLS, _fit("n", "30"), f"{BEST}.n must be an integer"),
    "se-str": (OLS, _fit("residual_se", "a"), f"{BEST}.residual_se must be a finite number >= 0"),
    "se-neg": (OLS, _fit("residual_se", -1), f"{BEST}.residual_se"),
    "slope-str": (OLS, _fit("slope", "x"), f'{BEST}.slope must be a finite number, got "x"'),
    "slope-null": (OLS, _fit("slope", None), f"{BEST}.slope must be a finite number, got null"),
    "slope-nan": (OLS, _fit("slope", math.nan), f"{BEST}.slope"),
    "sxx-neg": (OLS, _fit("sxx", -1), f"{BEST}.sxx must be a finite number > 0"),
    "sxx-zero": (OLS, _fit("sxx", 0), f"{BEST}.sxx"),
    "ridge-sd-zero": (RIDGE, lambda d: d["fits"]["ridge"]["sd"].__setitem__(0, 0), 'fits["ridge"].sd[0]'),
    "ridge-coef-str": (RIDGE, _fit("coef", "x"), 'fits["ridge"].coef must be a list of 1 numbers'),
    "ridge-mu-long": (RIDGE, _fit("mu", [0.1, 0.2]), 'fits["ridge"].mu'),
    "ridge-features-empty": (RIDGE, _fit("features", []), 'fits["ridge"].features'),
    "ridge-lambda-neg": (RIDGE, _fit("lambda", -1), 'fits["ridge"].lambda'),
    "ridge-resid-swapped": (
        RIDGE,
        lambda d: d["fits"]["ridge"].update(resid_low=1.0, resid_high=-1.0),
        'fits["ridge"].resid_low (1) is above',
    ),
    "ridge-resid-half": (RIDGE, _fit("resid_high", None), 'fits["ridge"].resid_low and'),
    "mean-sd-neg": (MEAN, _fit("sd", -1.0), 'fits["mean"].sd must be a finite number >= 0'),
    "mean-n-zero": (MEAN, _fit("n", 0), 'fits["mean"].n must be an integer >= 1'),
    "mean-mean-str": (MEAN, _fit("mean", "x"), 'fits["mean"].mean'),
    "by-method-slope-str": (
        None,
        lambda d: d["by_method"]["ties"]["fit"].update(slope="x"),
        'by_method["ties"].fit.slope must be a finite number',
    ),
    "by-method-ridge-sd": (
        None,
        lambda d: d["by_method"]["sum"]["fit"].update(sd=[-1.0]),
        'by_method["sum"].fit.sd[0]',
    ),
    "by-method-kind": (
        None,
        lambda d: d["by_method"]["ties"]["fit"].update(kind="zzz"),
        'by_method["ties"].fit.kind',
    ),
    "by-method-level": (None, lambda d: d["by_method"]["sum"].update(level=7), 'by_method["sum"].level'),
    "by-method-best-int": (None, lambda d: d["by_method"]["sum"].update(best=1), 'by_method["sum"].best'),
    "by-method-validated-mae": (
        None,
        lambda d: d["by_method"]["sum"]["validated"].update(mae="x"),
        'by_method["sum"].validated.mae',
    ),
    "by-method-mean-mae": (
        None,
        lambda d: d["by_method"]["sum"].update(mean_mae="x"),
        'by_method["sum"].mean_mae',
    ),
}


@pytest.mark.parametrize("command", ["predict", "plan"])
@pytest.mark.parametrize("case", PRED_DAMAGE, ids=list(PRED_DAMAGE))
def test_damaged_predictors_json_is_one_line(adapters, predictors, tmp_path, capsys, case, command):
    use, damage, needle = PRED_DAMAGE[case]
    d = copy.deepcopy(predictors[0])
    if use is not None:
        use(d)
    damage(d)
    path = _write(tmp_path / "predictors.json", d)
    _one_line(capsys, [command, *adapters, "--fit", path], path, needle)


@pytest.mark.parametrize("best", ["as written", "ols:rms_cosine", "ridge", "mean"])
def test_predictors_json_as_written_predicts_its_fit(adapters, predictors, cosine, tmp_path, capsys, best):
    """The file as written, and with ``best`` pointed at each kind of predictor
    it holds: the prediction is the in-memory fit's at the adapters' cosine."""
    d, v = predictors
    d = copy.deepcopy(d)
    if best != "as written":
        d["best"] = best
    path = _write(tmp_path / "predictors.json", d)
    capsys.readouterr()
    assert main(["predict", *adapters, "--fit", str(path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    y, lo, hi = predict_from(v.fits[d["best"]], {"rms_cosine": cosine}, v.level)
    assert out["predictor"] == d["best"] and out["predicted"] == y
    assert out["interval"] == (None if lo is None else [lo, hi])
    assert main(["plan", *adapters, "--fit", str(path), "--json", "--budget", "1e9"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [g["members"] for g in plan["groups"]] == [["a", "b"]]


def test_a_report_folder_predicts_from_its_predictors_file_else_its_fit_json(adapters, tmp_path, capsys):
    """``--fit reports/NAME`` (the folder a study writes) was refused as "a
    folder, not a fit file": it now reads the folder's predictors.json, else
    its fit.json (--label or --level, which only a fit.json takes, choose
    that), says which on stderr in one note, and predicts exactly what that
    file predicts; the committed real-14-domains files, copied."""
    import shutil

    from loramix.interference import predict

    real = Path(__file__).resolve().parents[1] / "reports" / "real-14-domains"
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("predictors.json", "fit.json"):
        shutil.copy(real / name, folder / name)

    def run(*extra):
        capsys.readouterr()
        assert main(["predict", *adapters, "--fit", str(folder), *extra, "--format", "json"]) == 0
        out, err = capsys.readouterr()
        return json.loads(out), [line for line in err.splitlines() if line.startswith("loramix: note: --fit")]

    got, said = run()
    want = predict(adapters, folder / "predictors.json", progress=False)
    assert got["predictor"] == want["predictor"] and got["predicted"] == want["predicted"]
    assert got["file"] == str(folder / "predictors.json")
    assert got["domains"] == 14  # what its leave-one-domain-out error was averaged over, said in the text
    assert said == [f"loramix: note: --fit {folder}: predicting from its predictors.json (the study's best "
                    f"predictor, validated leave-one-domain-out; --fit {folder / 'fit.json'} for its line of "
                    "delta_ppl% on the RMS cosine)"]  # fmt: skip
    got, said = run("--label", "lora")
    line = predict(adapters, folder / "fit.json", label="lora")
    assert got["predicted_delta_ppl_pct"] == line["predicted_delta_ppl_pct"] and got["label"] == "lora"
    assert got["fit"]["n"] == 20 and got["fit"]["domains"] == 13  # its merged-data pairs draw on 13 of the 14
    assert len(said) == 1 and "predicting from its fit.json" in said[0]
    (folder / "predictors.json").unlink()  # a study without [predictors] writes only fit.json
    for a in adapters:  # what `loramix train` records: the study of that initialisation is chosen
        (Path(a) / "loramix.json").write_text(
            json.dumps({"parameters": {"init": {"shared": False, "seed": 0}}})
        )
    try:
        got, said = run()
        # from Python alike: the note says which file it read
        r = predict(adapters, folder)
    finally:
        for a in adapters:
            (Path(a) / "loramix.json").unlink()
    assert got["predicted_delta_ppl_pct"] == line["predicted_delta_ppl_pct"] and got["label"] == "lora"
    assert got["fit"]["file"] == str(folder / "fit.json") and "--fit" not in said[0].split("(")[1]
    assert r["notes"][0].startswith(f"--fit {folder}: predicting from its fit.json")


def test_adapters_trained_otherwise_than_the_study_are_warned_of(adapters, tmp_path, capsys):
    """The committed real-14-domains fits were made for adapters trained as its
    study's [adapters] (rank 8, 16 steps at lr 3e-3, 64 tokens, the top 2
    blocks); adapters of the README's recipe (12 steps at 2e-3, 96 tokens)
    got them without a word. A fit file from before it recorded the recipe
    takes it from the report.json beside it (that study's): one warning line
    names each setting that differs; adapters trained as the study's get
    none, and an adapter that records no training is checked only for its
    layers."""
    import shutil

    real = Path(__file__).resolve().parents[1] / "reports" / "real-14-domains"
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("predictors.json", "fit.json", "report.json"):
        shutil.copy(real / name, folder / name)
    # as written before they recorded the recipe (the committed ones were re-rendered since)
    for name in ("predictors.json", "fit.json"):
        doc = json.loads((folder / name).read_text())
        doc.pop("adapters", None)
        (folder / name).write_text(json.dumps(doc))
    pair = [shutil.copytree(a, tmp_path / Path(a).name) for a in adapters]
    study = {"rank": 8, "alpha": 16.0, "steps": 16, "epochs": None, "lr": 0.003, "batch": 4, "max_len": 64}
    readme = {**study, "steps": 12, "lr": 0.002, "max_len": 96}

    def warned(params, fit="fit.json", *extra):
        for a in pair:
            if params is None:
                (a / "loramix.json").unlink(missing_ok=True)
            else:  # the adapters' init is the lora study's, which then needs no --label
                init = {"shared": False, "seed": 0}
                (a / "loramix.json").write_text(json.dumps({"parameters": {**params, "init": init}}))
        capsys.readouterr()
        assert main(["predict", *map(str, pair), "--fit", str(folder / fit), *extra]) == 0
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if "trained otherwise" in line]

    # the fixture's adapters adapt every layer of a 2-layer GPT-2: as many as the study's top 2
    assert warned(study) == [] and warned(study, "predictors.json") == []
    said = ("the adapters were trained otherwise than the study {} fitted on (steps 12, not 16; lr 0.002, "
            "not 0.003; max_len 96, not 64): the prediction may not hold")  # fmt: skip
    assert warned(readme) == [f"loramix: warning: {folder / 'fit.json'}: " + said.format("this fit was")]
    assert warned(readme, "predictors.json") == [
        f"loramix: warning: {folder / 'predictors.json'}: " + said.format("these predictors were")
    ]
    assert warned(None, "fit.json", "--label", "lora") == []
    # plan reads the same predictors file, from the folder too, and warns alike
    capsys.readouterr()
    assert main(["plan", *map(str, pair), "--fit", str(folder)]) == 0
    warns = [line for line in capsys.readouterr().err.splitlines() if "trained otherwise" in line]
    assert warns == []  # the last adapters recorded no training: nothing to compare but their 2 layers
    warned(readme, "predictors.json")
    assert main(["plan", *map(str, pair), "--fit", str(folder)]) == 0
    warns = [line for line in capsys.readouterr().err.splitlines() if "trained otherwise" in line]
    assert warns == [f"loramix: warning: {folder}: " + said.format("these predictors were")]
    # what train records against a study's recipe it matches: the steps a study by epochs came to, and a
    # max_len capped at the model's context (a smaller one is not flagged)
    report = json.loads((folder / "report.json").read_text())
    report["scenario"]["adapters"].update(steps=None, epochs=2.0, max_len=4096)
    (folder / "report.json").write_text(json.dumps(report))
    assert warned({**study, "steps": 32, "epochs": 2.0, "max_len": 2048}) == []
    assert warned({**study, "steps": 32, "epochs": None}) == [
        f"loramix: warning: {folder / 'fit.json'}: the adapters were trained otherwise than the study this fit "
        "was fitted on (epochs none, not 2): the prediction may not hold"
    ]
    # the recipe the fit file records itself is the one compared (rank from the label: lora@4)
    fit = json.loads((folder / "fit.json").read_text())
    fit["adapters"] = {**readme, "top_layers": 1, "rank": 8}
    fit["fits"] = [{**f, "adapter_method": "lora@4"} for f in fit["fits"] if f["adapter_method"] == "lora"]
    (folder / "fit.json").write_text(json.dumps(fit))
    assert warned(readme) == [f"loramix: warning: {folder / 'fit.json'}: the adapters were trained otherwise than "
                              "the study this fit was fitted on (rank 8, not 4; 2 layers adapted, not the top 1): "
                              "the prediction may not hold"]  # fmt: skip
