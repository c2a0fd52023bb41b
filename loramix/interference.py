"""Predict the interference of a composition from its similarity alone.

A scenario run fits, per adapter kind and merge method, the line

    delta_ppl% = slope * cos_C + intercept

over its compositions (``fit.json``; :mod:`loramix.fit`). For new
adapters ``A, B, ...`` (no training, no evaluation) loramix computes their
pairwise RMS cosines (exact, from the factors; D2-LoRA on the signed residual,
as the runner does; 0 for a pair that adapts no module in common, as ``loramix
plan`` counts it, with a note) and the composition's cosine exactly as the
runner does, :func:`loramix.fit.composition_cosine`::

    cos_C = sqrt( mean_{i<j} rms_ij^2 )       (= rms_AB for two adapters)

then ``y_hat = slope * cos_C + intercept`` with

* the OLS prediction interval at ``level`` (default 95 %)
  ``y_hat +- t_{(1+level)/2, n-2} * s * sqrt(1 + 1/n + (cos_C - x_bar)^2 / Sxx)``
  (needs ``n >= 3`` fitted compositions), and
* the fit's leave-one-out RMSE: how far a held-out composition's delta_ppl%
  fell from the line fitted without it.

A cosine outside the fitted range is flagged: the line is then extrapolated.
docs/interference.md defines the study, the fit and its validated error.

With a predictors file (``predictors.json``, :mod:`loramix.validation`, written
by a scenario run with a ``[predictors]`` table) the prediction uses its best
predictor under leave-one-domain-out instead (:func:`predict_validated`): the
composition's features (:mod:`loramix.features`; the data-aware ones need
``base`` and one calibration file per adapter), that predictor's value and
interval, and its held-out error against the mean's. A predictors file made
for another adapter kind is refused; one made for another base (its
``base_identity`` against the base identity in the adapters' training
provenance) is used with a warning, as is one whose best predictor is no
better than the mean. A ``fit.json`` records the same ``base_identity`` and
is warned of alike; one written before it did (null or absent) is used
without the check, as is a predictors file whose identity is null. Adapters
that record no base (made outside loramix) get a warning that the check was
not made. Adapters trained otherwise than the study's ``[adapters]`` (rank,
steps, learning rate, ...: :func:`loramix.grouping.other_recipe`) are warned
of too. ``--fit`` may name a study's report folder (:func:`fit_in`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .api import renamed
from .blas import one_openblas_thread
from .errors import UsageError, raise_machine_fault


def load_fit(path: str | os.PathLike) -> dict:
    """A scenario run's ``fit.json``, every field checked (:func:`loramix.fit.load_fit_file`)."""
    from .fit import load_fit_file

    return load_fit_file(path)


def predict_validated(
    adapters_or_paths,
    path,
    *,
    data=None,
    base=None,
    tokens: int | None = None,
    device="cpu",
    max_len: int | None = None,
    merge_method: str | None = None,
    progress: bool = False,
) -> dict:
    """Predicted interference from a predictors file (module docstring).

    Returns ``names``, ``adapter_method``, ``target``, ``predictor`` (the best
    validated one), ``predicted``, ``interval`` (low, high or None),
    ``level``, ``validated`` (the predictor's held-out n, r, R^2, MAE and
    coverage), ``mean_mae`` (the mean's held-out MAE), ``beats_mean``,
    ``selection`` (the nested validation of choosing the best,
    :func:`loramix.validation.nested_selection`; None in a file without it),
    ``features`` (the composition's values of the features it reads),
    ``warnings`` and ``notes`` (where it reads ``rms_cosine`` or
    ``mean_cosine``: the pairs that adapt no module in common, whose cosine
    counts 0). A composition with no value of a feature the predictor reads
    (docs/predictors.md, missing values) is refused in one line. ``merge_method``: the prediction for that merge method, from
    the file's ``by_method`` (what ``loramix plan`` quotes for a group it merges
    by that method); None: the file's primary predictor. ``tokens``,
    ``max_len``: the calibration recipe of the data-aware features; None: the
    study's (the file's ``calibration``), else 256 tokens of records cut at 128.
    ``progress``: a bar of the calibration pass (on a terminal).
    """
    from .grouping import adapter_checks, cost_model, fit_features, reads_data, unread_data_note
    from .validation import extrapolation, load_predictors

    fitfile = load_predictors(path)
    if merge_method is not None:
        fitfile = _for_method(fitfile, merge_method, str(path))
    load = None
    if not data or not reads_data(fitfile, by_method=False):
        # without --data no feature needs the base (the data-aware ones are refused below), nor with
        # it when the predictor reads none (the data are then ignored), and the others read the
        # factors in numpy: the numpy reader's (the same values) spares torch (1.5 s of 2.2 here)
        from .io.np_factors import load_np_adapter as load
    adapters = _composition(adapters_or_paths, load)
    warnings = adapter_checks(adapters, fitfile, str(path))
    model, _, validated = cost_model(
        adapters,
        path,
        data,
        base,
        tokens,
        device,
        by_method=False,
        fitfile=fitfile,
        max_len=max_len,
        progress=progress,
    )
    members = list(range(len(adapters)))
    y, lo, hi = model.cost(members)
    fit = fitfile["fits"][fitfile["best"]]
    features = {f: model.features.composition(f, members) for f in fit_features(fit)}
    if not math.isfinite(y):
        bad = [f for f, v in features.items() if not math.isfinite(v)] or list(features)
        raise UsageError("predict", f"the composition has no value of {bad[0]} ({no_value_reason(bad[0])}): "
                         "no prediction (docs/predictors.md, missing values)")  # fmt: skip
    from .features.cosine import ZERO_WHEN_DISJOINT

    notes = unread_data_note(path, fitfile, data, by_method=False)
    if any(f in ZERO_WHEN_DISJOINT for f in features):
        notes += disjoint_notes(model.features.names, model.features.matrices["coverage"])
    far = extrapolation(fit, features)
    if far is not None:
        warnings.append(far)
    if note := size_note(len(adapters), fitted_sizes(fitfile.get("compositions") or [])):
        far = far or "size"
        warnings.append(note)
    rows = {r["predictor"]: r for r in fitfile["summary"]}
    return {
        "names": list(model.features.names), "adapter_method": adapters[0].method, "target": fitfile["target"],
        "predictor": fitfile["best"], "predicted": y, "interval": None if lo is None else [lo, hi],
        "level": fitfile["level"], "validated": validated, "mean_mae": rows.get("mean", {}).get("mae"),
        "beats_mean": bool(fitfile.get("beats_mean")), "selection": fitfile.get("selection"),
        "file": str(path), "scenario": fitfile.get("scenario"),
        "features": features, "extrapolation": far is not None,
        "domains": fitted_domains(fitfile.get("compositions") or []),
        "warnings": warnings, "notes": notes,
    }  # fmt: skip


def disjoint_notes(names: list[str], coverage) -> list[str]:
    """One line, or none, naming the pairs of ``names`` that adapt no module in
    common (``coverage`` (N, N) is 0) and why their cosine counts 0."""
    import numpy as np

    cov = np.asarray(coverage, dtype=float)
    pairs = [f"{names[i]}+{names[j]}" for i in range(len(names)) for j in range(i + 1, len(names))
             if cov[i, j] == 0]  # fmt: skip
    if not pairs:
        return []
    return [f"{', '.join(pairs)} adapt no module in common: their cosine counts 0, as in loramix plan "
            "(their deltas touch disjoint weights, so they are orthogonal over all parameters)"]  # fmt: skip


def no_value_reason(feature: str) -> str:
    """Why a composition can have no value of ``feature`` (a matrix name): what
    its pairs lack (docs/predictors.md, missing values)."""
    family, _, part = feature.partition(":")
    if family.startswith("type_"):
        return f"no pair of the adapters adapts a {part} module in common"
    if family.startswith("band_"):
        return f"no pair of the adapters adapts a module in the {part} band of layers in common"
    if family == "norm_ratio":
        return "an adapter's delta is zero"
    return "no pair of the adapters shares a module with a nonzero delta"


def _composition(adapters_or_paths, load=None) -> list:
    """The composition to predict: at least two adapters, all of one kind;
    paths are checked, then read by ``load`` (torch's reader by default)."""
    from .grouping import one_kind
    from .io.peft_layout import adapter_list, check_adapter_paths

    items = adapter_list(adapters_or_paths)  # one adapter is one, not its characters or modules
    if len(items) < 2:
        raise UsageError("predict", f"a composition needs at least 2 adapters, got {len(items)}")
    check_adapter_paths(items)  # before torch loads: a mistyped path fails fast
    if load is None:
        from .io.adapter_files import load_adapter as load
    adapters = [load(a) if isinstance(a, (str, os.PathLike)) else a for a in items]
    one_kind(adapters, "predict")
    return adapters


def _for_method(fitfile: dict, method: str, where: str) -> dict:
    """``fitfile`` as if ``method``'s entry of its ``by_method`` were its primary predictor."""
    bm = fitfile.get("by_method") or {}
    if method not in bm:
        have = ", ".join(bm) or "only its primary predictor"
        raise UsageError("--method", f"{where} has no predictor for merge method {method} (it has: {have})")
    e = bm[method]
    rows = [
        {**(e.get("validated") or {}), "predictor": e["best"]},
        {"predictor": "mean", "mae": e.get("mean_mae")},
    ]
    return {**fitfile, "best": e["best"], "fits": {e["best"]: e["fit"]}, "summary": rows, "by_method": None,
            "target": e.get("target") or fitfile["target"], "selection": e.get("selection"),
            "beats_mean": bool(e.get("beats_mean", fitfile.get("beats_mean")))}  # fmt: skip


def fitted_sizes(compositions) -> list[int]:
    """The composition sizes a fit saw, from its labels (``a+b``) or member lists."""
    return sorted({c.count("+") + 1 if isinstance(c, str) else len(c) for c in compositions})


def fitted_domains(compositions) -> int | None:
    """How many domains the compositions a fit saw draw on (labels ``a+b`` or
    member lists): what a leave-one-domain-out error was averaged over; None
    where the file lists none."""
    names = {d for c in compositions for d in (c.split("+") if isinstance(c, str) else c)}
    return len(names) or None


def size_note(k: int, sizes: list[int]) -> str | None:
    """Why a composition of ``k`` adapters is an extrapolation of a fit on
    compositions of ``sizes`` adapters; None where it is not (``k`` within
    them, or no sizes known)."""
    if not sizes or k <= max(sizes):
        return None
    return (
        f"the fit saw compositions of {', '.join(map(str, sizes))} adapters only; a composition of {k} "
        "extrapolates it in size (docs/predictors.md: ols:F says a group costs what its mean pair costs)"
    )


#: what a scenario report folder given to ``--fit`` is read for, in the order ``predict`` prefers them
REPORT_FITS = ("predictors.json", "fit.json")


def fit_in(path, *, line: bool = False) -> tuple:
    """The fit file that ``path`` names, and a note, or None, saying what was chosen.

    A path that is no folder is itself (a missing file is refused where it is
    read). A scenario report folder (``reports/NAME/``) gives its
    ``predictors.json``, the study's best predictor under leave-one-domain-out,
    else its ``fit.json``, the cosine line (a study without a ``[predictors]``
    table writes only that); ``line`` (``--label`` or ``--level`` given, which
    only a ``fit.json`` takes) prefers the ``fit.json``. A folder that holds
    neither is refused in one line."""
    from .userpaths import non_path

    if (said := non_path(path)) is not None:
        raise UsageError("--fit", f"takes a fit file (fit.json, predictors.json) or a study's report folder, "
                                  f"not {said}")  # fmt: skip
    p = Path(path)
    if not p.is_dir():
        return path, None
    have = [name for name in REPORT_FITS if (p / name).is_file()]
    if not have:
        raise UsageError(p, "a folder with neither predictors.json nor fit.json in it (give a scenario report "
                         "folder, reports/NAME, a folder loramix fit wrote, or one of those files)")  # fmt: skip
    chosen = "fit.json" if line and "fit.json" in have else have[0]
    why = {"predictors.json": "best predictor, validated leave-one-domain-out",
           "fit.json": "line of delta_ppl% on the RMS cosine"}  # fmt: skip
    other = [n for n in have if n != chosen]
    also = f"; --fit {p / other[0]} for its {why[other[0]]}" if other else ""
    return p / chosen, f"--fit {p}: predicting from its {chosen} (the study's {why[chosen]}{also})"


def study_recipe(fit: dict, path, label: str) -> dict | None:
    """The ``[adapters]`` recipe of the study of ``fit`` (a fit.json's or a
    predictors file's dict, read from ``path``), at the rank of its adapter
    ``label`` (``lora@16``): the file's ``adapters``, else, for a file written
    before it recorded them, ``adapters`` of the scenario in the ``report.json``
    beside it where that is the same study's. None where neither says, or for
    a study of given adapters (no recipe: they were trained elsewhere)."""
    from .scenario.traits import rank_of

    rec = fit.get("adapters")
    if rec is None and path is not None:
        try:  # an aid to a warning: a report.json that does not read is no error of the fit's
            report = json.loads((Path(path).parent / "report.json").read_text())
            if report["scenario"]["name"] == fit.get("scenario"):
                rec = report["scenario"]["adapters"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise_machine_fault(e, Path(path).parent / "report.json")  # a failing disk is said, not skipped
            return None
    if not isinstance(rec, dict) or "given" in rec:
        return None
    try:
        return {**rec, "rank": rank_of(label, rec.get("rank"))}
    except ValueError:  # a label whose @rank is no number: no rank to compare
        return {k: v for k, v in rec.items() if k != "rank"}


def is_predictors_file(path) -> bool:
    """Whether ``path`` holds a predictors file (rather than a ``fit.json``).
    A read the machine fails (EIO) raises its OSError."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise_machine_fault(e, path)
        return False
    from .validation import FORMAT

    return isinstance(d, dict) and d.get("format") == FORMAT


def _recorded_init(adapter) -> str | None:
    """How ``adapter`` was initialised (``"shared"`` or ``"data"``), as its
    training record (``loramix.json`` of ``loramix train``) says; else None."""
    from .io.provenance import recorded_parameters

    init = recorded_parameters(getattr(adapter, "path", None)).get("init")
    if not isinstance(init, dict) or not isinstance(init.get("shared"), bool):
        return None
    return "shared" if init["shared"] else "data"


#: how a study's ``init`` is said (docs/scenarios.md, ``adapters.init``)
_INIT_WORDS = {"data": "per domain (init data)", "shared": "from shared factors (init shared)"}


def _init_warning(entry: dict, adapters) -> str | None:
    """The warning that ``adapters`` record another initialisation than the
    study of the fit ``entry`` (one chosen by ``--label``), or None: the
    same, or either unrecorded. Independent initial factors give cosines an
    order of magnitude smaller than shared ones (the quickstart's 0.006-0.024
    against 0.06-0.41), so one study's line does not carry to the other's."""
    want = entry.get("init")
    seen = sorted({_recorded_init(a) for a in adapters} - {None})
    if want not in _INIT_WORDS or not seen or seen == [want]:
        return None
    return (f"the adapters were initialised {' and '.join(_INIT_WORDS[i] for i in seen)}, the study "
            f"{entry['adapter_method']}'s {_INIT_WORDS[want]}: their cosines differ in scale, so the prediction "
            "may not hold")  # fmt: skip


def _study(fits: list, kind: str, merge_method: str, label: str | None, adapters, where: str) -> dict:
    """The fit of ``fits`` (a fit.json's) for ``kind`` adapters merged by
    ``merge_method``: of the study ``label``; else the only one; else the
    one whose ``init`` the adapters all record. One line otherwise."""
    from .scenario.traits import kind_of

    mine = [f for f in fits if kind_of(f["adapter_method"]) == kind and f["merge_method"] == merge_method]
    labels = ", ".join(f["adapter_method"] for f in mine)
    if label is not None:
        chosen = [f for f in mine if f["adapter_method"] == label]
        if not chosen:
            raise UsageError("--label", f"{where} has no study {label} of {kind} adapters merged by "
                             f"{merge_method} (it has: {labels or 'none'})")  # fmt: skip
        return chosen[0]
    if not mine:
        have = ", ".join(f"{f['adapter_method']}/{f['merge_method']}" for f in fits) or "none"
        raise UsageError(where, f"no fit for {kind} adapters merged by {merge_method} (it has: {have})")
    if len(mine) == 1:
        return mine[0]
    inits = {_recorded_init(a) for a in adapters}
    init = next(iter(inits)) if len(inits) == 1 else None
    matching = [f for f in mine if init is not None and f.get("init") == init]
    if len(matching) == 1:
        return matching[0]
    # PEFT-trained adapters record no initialisation: each study's says which fits them
    said = (f"the adapters, initialised by {init}, match none of them" if init else
            "the adapters record no initialisation (as those made outside loramix)" if inits == {None} else
            "the adapters record different initialisations")  # fmt: skip
    inits_of = ", ".join(f"{f['adapter_method']} by {f.get('init') or 'an unrecorded one'}" for f in mine)
    raise UsageError(where, f"holds {len(mine)} studies of {kind} adapters merged by {merge_method} ({labels}) and "
                     f"{said}: choose one with --label (initialised: {inits_of})")  # fmt: skip


@one_openblas_thread
@renamed({"adapters_or_paths": "adapters", "merge_method": "method"})
def predict(
    adapters,
    fit,
    *,
    method: str | None = None,
    level: float | None = None,
    label: str | None = None,
    base=None,
    data=None,
    tokens: int | None = None,
    max_len: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Predicted delta_ppl% of merging ``adapters`` by ``method`` (module docstring).

    ``fit``: a ``fit.json`` path or its loaded dict, or a scenario report
    folder (:func:`fit_in`: its ``predictors.json``, else its ``fit.json``;
    ``notes`` then starts with the one it read); a predictors file's path
    gives :func:`predict_validated`'s result instead, for ``method``
    (None: the file's primary predictor) with the calibration ``data`` (one
    file or ``synthetic:`` spec per adapter, in order; one alone is a list of
    one, as :func:`loramix.train.train_adapter` takes it),
    ``base``, ``tokens``, ``max_len`` and ``progress`` (what ``loramix
    predict --fit predictors.json`` passes);
    ``base``, ``tokens`` and ``max_len`` set that pass, so without ``data``
    they are refused, and ``label`` and ``level`` are refused there. With a
    ``fit.json`` ``data``, ``base``, ``tokens`` and ``max_len`` are refused:
    its line is on the RMS cosine of the factors (of D2-LoRA and DoRA
    adapters their residuals, base-free, as the study measured it), which
    reads no data and no base. The fit is the one of
    the adapters' kind and ``method`` (None: ``sum``); where the file holds several
    studies of that kind (labels such as ``lora`` and ``lora:data``), the
    one named by ``label``, else the one whose initialisation the adapters
    record (:func:`_study`). ``device``: ``"cpu"`` by default, where the
    functions that run a model default to ``"auto"``, on purpose: the cosines
    and features are computed from the factors in numpy float64 on the CPU
    without importing torch (:func:`loramix.overlap.similarity`), also on a
    machine with a GPU; another device runs them in torch there, and the
    data-aware features' calibration passes (a CPU runs those in torch).
    ``progress``: a bar of the calibration pass (on a terminal). Returns a dict with
    ``cosine`` (the composition's), ``pairwise`` (pair -> RMS cosine),
    ``predicted_delta_ppl_pct``, ``interval`` (low, high or None),
    ``level``, ``loo_rmse``, ``residual_se``, ``extrapolation``, the
    study's ``label``, the fit used, ``warnings`` (adapters trained on another
    base than the fit's ``base_identity``, initialised otherwise than the study
    ``label`` chose, or trained otherwise than its ``[adapters]``:
    :func:`study_recipe`) and ``notes`` (the pairs that adapt no
    module in common: their cosine counts 0, as in ``loramix plan``).
    """
    from .data import data_list
    from .options import check_numbers, whole_numbers

    check_numbers({"--level": level, "--tokens": tokens, "--max-len": max_len})  # level="0.9" was parsed
    tokens, max_len = whole_numbers({"--tokens": tokens, "--max-len": max_len})
    # one source alone is a list of one, as train_adapter and evaluate take it: a string was taken
    # character by character, a Path raised TypeError, a DataFrame pandas' "truth value ... ambiguous"
    data = None if data is None else data_list(data)
    chose = None
    if not isinstance(fit, dict):
        fit, chose = fit_in(fit, line=label is not None or level is not None)
    r = _predict(adapters, fit, method, level, label, base, data, tokens, max_len, device, progress)
    if chose:
        r["notes"].insert(0, chose)
    return r


def _predict(adapters, fit, method, level, label, base, data, tokens, max_len, device, progress) -> dict:
    """:func:`predict` from a fit file's path (no folder) or a fit.json's dict."""
    if not isinstance(fit, dict) and is_predictors_file(fit):
        # every argument reaches it or is refused: method dropped here gave the primary
        # predictor's figure for any method asked, and a level or label was silently ignored
        if label is not None:
            raise UsageError("--label", "applies to a fit.json; a predictors file holds one study")
        if level is not None:  # its intervals' coverage was validated at its own level
            raise UsageError("--level", "applies to a fit.json; a predictors file's intervals are at the "
                             "level its study validated them at")  # fmt: skip
        from .grouping import check_calibration_args

        check_calibration_args(data, base, tokens, max_len)
        return predict_validated(adapters, fit, data=data, base=base, tokens=tokens, device=device,
                                 max_len=max_len, merge_method=method, progress=progress)  # fmt: skip
    if data:  # the cosine line reads no data-aware feature
        raise UsageError(
            "--data", "applies to a predictors file; a fit.json predicts from the RMS cosine alone"
        )
    # they set a predictors file's calibration pass; the line's cosine is the study's, of the factors
    # alone (residuals, base-free): a base given here was ignored without a word
    for flag, v in (("--base", base), ("--tokens", tokens), ("--max-len", max_len)):
        if v is not None:
            raise UsageError(flag, "applies to a predictors file, with --data (its calibration pass); a "
                             "fit.json predicts from the RMS cosine of the factors, which reads no base "
                             "and no data")  # fmt: skip
    return _predict_line(adapters, fit, method or "sum", level, device, label)


def _predict_line(adapters_or_paths, fit, merge_method: str, level, device, label) -> dict:
    """:func:`predict` from a ``fit.json`` (path or dict): the RMS-cosine line of
    the adapters' study, at the composition's cosine."""
    import numpy as np

    from .devices import is_cpu
    from .fit import LinearFit, composition_cosine

    fit_path = None
    if not isinstance(fit, dict):
        fit_path = str(fit)
        fit = load_fit(fit)
    else:
        from .fit import check_fit

        check_fit(fit, "fit")
    where = fit_path or "--fit"
    if isinstance(device, str) and is_cpu(device):
        # the cosines run in numpy on the CPU (overlap.similarity) whichever reader loaded the
        # factors, so the numpy reader's (the same checks and values) spares the process torch
        from .io.np_factors import load_np_adapter as load
    else:
        load = None
    adapters = _composition(adapters_or_paths, load)
    kind = adapters[0].method
    entry = _study(fit["fits"], kind, merge_method, label, adapters, where)
    init_differs = _init_warning(entry, adapters)
    lf = LinearFit.from_dict(entry)
    if not lf.ok:
        raise UsageError(where, f"the {kind}/{merge_method} fit has {lf.n} point(s): too few to predict")
    from .features._context import FEATURES_READ_ALL
    from .io.peft_layout import warn_null_targets
    from .overlap import similarity  # pandas: after the fit, the adapters and the study are checked

    warn_null_targets(adapters, FEATURES_READ_ALL)  # before similarity's, which would say "give the base"
    sim = similarity(adapters, progress=False, device=device)
    names = list(sim.names)
    coverage = sim.coverage.loc[names, names].to_numpy(dtype=float)
    # a pair with no module in common counts 0, as in plan and the rms_cosine feature (features/cosine.py)
    rms = np.where(coverage == 0, 0.0, sim.rms.loc[names, names].to_numpy(dtype=float))
    cos = composition_cosine(rms, list(range(len(names))))
    if cos != cos:  # NaN: the modules the adapters share have a zero delta in one of them
        raise UsageError("predict", "the adapters share no module with a nonzero delta: no cosine")
    level = float(level if level is not None else fit.get("prediction_level", 0.95))
    if not 0 < level < 1:
        raise UsageError("--level", f"must lie in (0, 1), got {level}")
    y = lf.predict(cos)
    interval = lf.prediction_interval(cos, level)
    if not all(math.isfinite(v) for v in (y, *(interval or ()))):
        raise UsageError(
            where,
            f"the {kind}/{merge_method} fit's line (slope {lf.slope:.6g}, intercept {lf.intercept:.6g}) "
            f"overflows at cosine {cos:.6g}: its prediction is beyond a float's range",
        )
    lo, hi = (min(lf.x), max(lf.x)) if lf.x else (cos, cos)
    from .grouping import other_base, other_recipe

    other = other_base(adapters, fit.get("base_identity"), "this fit was")
    recipe = other_recipe(adapters, study_recipe(fit, fit_path, entry["adapter_method"]), "this fit was")
    sizes = fitted_sizes(entry.get("labels") or [])
    size_far = size_note(len(adapters), sizes) is not None
    return {
        "adapters": [str(a.path or a.name) for a in adapters],
        "names": names,
        "adapter_method": kind,
        "label": entry["adapter_method"],
        "merge_method": merge_method,
        "pairwise": {
            f"{names[i]}+{names[j]}": float(rms[i, j])
            for i in range(len(names))
            for j in range(i + 1, len(names))
        },  # fmt: skip
        "cosine": cos,
        "predicted_delta_ppl_pct": y,
        "interval": None if interval is None else list(interval),
        "level": level,
        "loo_rmse": lf.loo_rmse,
        "residual_se": lf.residual_se,
        "extrapolation": not (lo <= cos <= hi) or size_far,
        "fitted_range": [lo, hi],
        "fitted_sizes": sizes,
        "notes": disjoint_notes(names, coverage),
        "warnings": [w for w in (other, init_differs, recipe) if w],
        "fit": {
            "file": fit_path,
            "scenario": fit.get("scenario"),
            "n": lf.n,
            "domains": fitted_domains(entry.get("labels") or []),
            "slope": lf.slope,
            "intercept": lf.intercept,
            "pearson_r": lf.pearson_r,
            "r2": lf.r2,
        },  # fmt: skip
    }
