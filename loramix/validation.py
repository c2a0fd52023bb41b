"""Fit interference from pairwise features, validated by leave-one-domain-out.

Inputs: compositions ``C_k`` (tuples of domain names, one adapter per domain),
their measured interference ``y_k`` (e.g. ``delta_ppl%``) and a feature table
``X`` (compositions x features) whose entries are the pair value for a pair
and, for ``k >= 3`` members, the RMS (or mean, for signed features) over the
member pairs (:func:`composition_table`, :func:`loramix.features.composition_value`).

Predictors
----------
* ``mean``: ``y_hat = mean(y_train)``; interval ``y_bar +- t_{n-1} s sqrt(1 + 1/n)``.
* ``ols:F`` for each feature ``F``: the line ``y = a x_F + b`` of
  :func:`loramix.fit.fit_line` with its OLS prediction interval.
* ``ols_pairsum:F`` for each feature ``F``, when the compositions differ in size
  (the ``pairs_per_member`` column of :mod:`loramix.features.size`, ``s = k - 1``,
  takes more than one value): the additive pair model. If each pair ``(i, j)``
  cost ``a x_ij + b`` and costs added up, a member would lose the sum over its
  ``k - 1`` partners and the composition (the mean over members) ``s (a x_F + b)``.
  So the line ``y / s = a x_F + b`` is fitted (:func:`loramix.fit.fit_line`) and
  ``y_hat = s (a x_F + b)``, its interval scaled by ``s``. On pairs alone it is
  ``ols:F``; it extrapolates to larger groups linearly in ``k - 1``, where
  ``ols:F`` assumes a group costs what its mean pair does.
* ``ridge``: the overall features (names without ``:``) standardised on the
  training part, ``z = (x - mu) / sd``, and
  ``beta = (Z^T Z + lambda I)^{-1} Z^T (y - y_bar)``, ``y_hat = y_bar + z beta``
  (its products added in the features' order, :func:`ridge_value`);
  ``lambda`` from :data:`LAMBDAS` by an inner leave-one-domain-out on the
  training part (smallest held-out MAE; 1.0 when the training part spans fewer
  than three domains). Its interval adds to ``y_hat`` the ``(1 -+ level) / 2``
  quantiles of the held-out residuals ``y_k - y_hat_(-d)(x_k)`` of that inner
  leave-one-domain-out at the chosen ``lambda`` (each composition once per
  member domain), not of the in-sample residuals ``y - y_hat``: a fit's own
  residuals are smaller than its errors on unseen domains, and their quantiles
  gave "90%" intervals that held 58% of the held-out values in a study of 20
  pairs. No interval where that inner validation cannot run (fewer than three
  domains) or gives fewer than three residuals.

Leave-one-domain-out
--------------------
For each domain ``d``: fit on the compositions that do not contain ``d`` and
predict those that do (:func:`lodo_splits`), so no fit ever sees its held-out
domain. A composition is predicted once per member domain that can be held
out: a domain in every composition leaves no training part and is never held
out (its compositions are predicted by their other members' folds only). The
metrics pool all these held-out predictions (a composition of ``k`` domains
counts up to ``k`` times): Pearson ``r``, ``R^2 = 1 - SS_res / SS_tot``
(about the held-out ``y``'s mean; negative when worse than that mean), ``MAE``,
and the coverage of the ``level`` (default 90%) prediction intervals (the
fraction of held-out ``y`` inside them, over the predictions that have an
interval; NaN when none has). The best predictor has the lowest held-out
MAE (MAEs equal to 1e-12 relative tie, and a tie goes to the least qualified
name, then the name order: :func:`ranked`); it *beats the mean* when its MAE
is below the ``mean`` predictor's. Features with a missing or infinite value
on any composition are left out. The final fits (on all compositions) are kept for ``loramix plan``.

Choosing the best, validated too (nested leave-one-domain-out)
--------------------------------------------------------------
The best predictor's held-out MAE is the minimum of many noisy MAEs, so it is
biased low: the choice itself was fitted to the held-out domains. ``validate(...,
nested=True)`` validates the whole procedure "choose the best validated
predictor, then fit it on everything" (:func:`nested_selection`). For each
outer domain ``d`` of :func:`lodo_splits` with training part ``T_d`` (the
compositions without ``d``):

* ``p_d = best(validate(T_d))``: the same leave-one-domain-out selection run
  on ``T_d`` alone (its folds hold out each domain ``e != d``; a feature that
  does not vary, or a size that is constant, on ``T_d`` is handled as
  :func:`validate` handles it);
* ``p_d`` fitted on all of ``T_d`` predicts each composition ``C_k`` with
  ``d in C_k``: ``y_hat_(k,d) = f_(p_d, T_d)(x_k)``.

These predictions are pooled as the plain ones are (a composition once per
held-out member) into ``MAE_nested``, ``r``, ``R^2`` and ``n``; the mean's
plain predictions on the same outer folds give ``MAE_mean``. A fold whose
training part leaves no domain to hold out (every composition of ``T_d``
shares a domain) cannot choose and is left out of both. ``MAE_nested`` is the
error of a user who chooses this way and predicts a new domain; choosing
helps only where it is below ``MAE_mean``. ``best`` and ``beats_mean`` stay
the plain figures.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsageError
from .features.size import SIZE
from .fit import (
    MISSING,
    LinearFit,
    check_int,
    check_level,
    check_linear_fit,
    check_number,
    check_recipe,
    check_str,
    field_error,
    fit_line,
    read_json_file,
    t_quantile,
)

if TYPE_CHECKING:  # imported where a table is made: reading a predictors file (predict, plan) needs no pandas
    import pandas as pd

LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0)
FORMAT = "loramix-predictors"
KINDS = ("mean", "ols", "ols_pairsum", "ridge")  # the fitted predictors (module docstring)
SUMMARY_COLUMNS = ["predictor", "n", "r", "r2", "mae", "coverage"]
PREDICTION_COLUMNS = ["predictor", "held_out", "composition", "y", "y_hat", "low", "high"]


def label(comp) -> str:
    return "+".join(comp)


def composition_table(features, compositions: list[tuple[str, ...]]) -> pd.DataFrame:
    """Compositions x predictor features (a :class:`loramix.features.FeatureSet`
    whose ``names`` are the domains)."""
    import pandas as pd

    idx = {n: k for k, n in enumerate(features.names)}
    rows = []
    for comp in compositions:
        unknown = [d for d in comp if d not in idx]
        if unknown:
            raise UsageError(
                "compositions", f"domain {unknown[0]!r} is not among {', '.join(features.names)}"
            )
        members = [idx[d] for d in comp]
        rows.append({f: features.composition(f, members) for f in features.predictors()})
    return pd.DataFrame(rows, index=pd.Index([label(c) for c in compositions], name="composition"))


def lodo_splits(compositions: list[tuple[str, ...]]) -> list[tuple[str, list[int], list[int]]]:
    """``(domain, train, test)`` per domain: ``train`` indexes the compositions
    without the domain, ``test`` those with it (folds with an empty side dropped)."""
    domains = sorted({d for c in compositions for d in c})
    out = []
    for d in domains:
        test = [k for k, c in enumerate(compositions) if d in c]
        train = [k for k, c in enumerate(compositions) if d not in c]
        if train and test:
            out.append((d, train, test))
    return out


# ----------------------------------------------------------------------------- fitting


def _fit_mean(y: np.ndarray) -> dict:
    n = len(y)
    sd = float(y.std(ddof=1)) if n >= 2 else None
    return {"kind": "mean", "n": n, "mean": float(y.mean()), "sd": sd}


def _ridge_normal(X: np.ndarray, y: np.ndarray) -> tuple:
    """What the ridge of ``(X, y)`` computes before ``lambda``: ``mu``, ``sd``,
    ``y_bar``, ``Z^T Z`` and ``Z^T (y - y_bar)`` (``Z = (X - mu) / sd``)."""
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)  # a constant column standardises to 0 and gets no weight
    Z = (X - mu) / sd
    ybar = float(y.mean())
    return mu, sd, ybar, Z.T @ Z, Z.T @ (y - ybar)


def _ridge_beta(parts: tuple, lam: float) -> np.ndarray:
    """``beta = (Z^T Z + lambda I)^{-1} Z^T (y - y_bar)`` from :func:`_ridge_normal`'s parts."""
    G, b = parts[3], parts[4]
    return np.linalg.solve(G + lam * np.eye(G.shape[0]), b)


def _fit_ridge(X: np.ndarray, y: np.ndarray, features: list[str], lam: float, level: float,
               held_out: np.ndarray | None = None) -> dict:  # fmt: skip
    """The ridge of the module docstring on ``(X, y)`` at ``lam``. Its interval:
    the ``(1 -+ level) / 2`` quantiles of ``held_out``, residuals ``y - y_hat``
    of fits that did not see the residual's domain (:func:`_choose_lambda`);
    none without three of them."""
    parts = _ridge_normal(X, y)
    mu, sd, ybar = parts[:3]
    beta = _ridge_beta(parts, lam)
    # held-out residuals, not y - (ybar + Z @ beta): the in-sample ones are what the
    # fit was made to shrink, and their quantiles make intervals that are too narrow
    q = (
        [float(v) for v in np.quantile(held_out, [(1 - level) / 2, (1 + level) / 2])]
        if held_out is not None and len(held_out) >= 3
        else [None, None]
    )
    return {"kind": "ridge", "features": features, "lambda": lam, "mu": mu.tolist(), "sd": sd.tolist(),
            "coef": beta.tolist(), "intercept": ybar, "resid_low": q[0],
            "resid_high": q[1], "n": len(y)}  # fmt: skip


def _fit_ols(x: np.ndarray, y: np.ndarray, feature: str, loo: bool = True) -> dict:
    f = fit_line(x, y, loo=loo)
    if not f.ok:  # the feature does not vary on the training part: no line
        return _fit_mean(y)
    keep = (
        "n",
        "slope",
        "intercept",
        "pearson_r",
        "r2",
        "x_mean",
        "sxx",
        "residual_se",
        "loo_rmse",
        "loo_mae",
    )
    return {"kind": "ols", "feature": feature, **{k: getattr(f, k) for k in keep}}


def _fit_pairsum(x: np.ndarray, size: np.ndarray, y: np.ndarray, feature: str, loo: bool = True) -> dict:
    """The line of ``y / size`` on ``x`` (``ols_pairsum``, module docstring)."""
    fit = _fit_ols(x, y / size, feature, loo)
    if fit["kind"] != "ols":  # no line: the plain mean of y
        return _fit_mean(y)
    return {**fit, "kind": "ols_pairsum", "size": SIZE}


def ridge_value(ybar: float, mu, sd, beta, x):
    """``y_bar + sum_j ((x_j - mu_j) / sd_j) beta_j``, the products added one
    after the other from 0, in the features' order: ``mu``, ``sd``, ``beta``
    sequences of floats, ``x`` one of floats (a composition) or of arrays
    (many unions at once, :func:`pair_predictor_of`), elementwise with the
    same operations, so the same bits. Not a BLAS dot product, whose order of
    summation (and fused multiply-adds) varies with the machine and the
    length, so that a ridge's predictions differed in their last bits between
    machines and a plan could not cost its unions at once."""
    total = 0.0
    for xj, m, s, b in zip(x, mu, sd, beta, strict=True):
        total = total + (xj - m) / s * b
    return ybar + total


def _ridge_value(ybar: float, mu: np.ndarray, sd: np.ndarray, beta: np.ndarray, x: np.ndarray) -> float:
    """:func:`ridge_value` of a row of floats."""
    return ridge_value(ybar, mu.tolist(), sd.tolist(), beta.tolist(), x.tolist())


def predict_from(fit: dict, x: dict, level: float = 0.9) -> tuple[float, float | None, float | None]:
    """``(y_hat, low, high)`` of a fitted predictor at feature values ``x``
    (feature name -> composition value); no interval where the fit has too few points."""
    return predictor_of(fit, level)(x)


def predictor_of(fit: dict, level: float = 0.9):
    """:func:`predict_from` of ``fit`` as a function of ``x``, the fit read once:
    a validation fold predicts many compositions from one fit, and reading the
    fit (a line's :class:`~loramix.fit.LinearFit`, a ridge's arrays) cost more
    than the prediction. The same arithmetic, so the same bits."""
    if fit["kind"] == "mean":
        n, m, sd = fit["n"], fit["mean"], fit["sd"]
        if n < 3 or sd is None:
            return lambda x: (m, None, None)
        half = t_quantile(0.5 + level / 2, n - 1) * sd * math.sqrt(1 + 1 / n)
        return lambda x: (m, m - half, m + half)
    if fit["kind"] in ("ols", "ols_pairsum"):
        f = LinearFit.from_dict(fit)
        feature, size = fit["feature"], fit["size"] if fit["kind"] == "ols_pairsum" else None

        def line(x: dict):
            x0 = float(x[feature])
            s = float(x[size]) if size is not None else 1.0
            iv = f.prediction_interval(x0, level)
            return s * f.predict(x0), *((s * iv[0], s * iv[1]) if iv is not None else (None, None))

        return line
    features, ybar, mu, sd, coef = _ridge_parts(fit)

    def ridge(x: dict):
        yh = ridge_value(ybar, mu, sd, coef, [float(x[k]) for k in features])
        if fit["resid_low"] is None:
            return yh, None, None
        return yh, yh + fit["resid_low"], yh + fit["resid_high"]

    return ridge


def _ridge_parts(fit: dict) -> tuple:
    """A ridge's ``(features, y_bar, mu, sd, coef)``, the numbers as floats."""
    return (
        fit["features"],
        float(fit["intercept"]),
        *([float(v) for v in fit[k]] for k in ("mu", "sd", "coef")),
    )


def pair_predictor_of(fit: dict):
    """The value of :func:`predictor_of` (not its interval) as a function of
    feature arrays, elementwise and with the same operations in the same
    order, so the same bits: for the mean, the lines and the ridge
    (:func:`ridge_value`). None for a line that :func:`predictor_of` refuses.
    A plan costs every pair of ``n`` adapters (``n^2 / 2``) before it merges
    any, then the unions each merge makes
    (:meth:`loramix.grouping.CostModel.union_costs`)."""
    if fit["kind"] == "mean":
        m = fit["mean"]
        return lambda x: m
    if fit["kind"] == "ridge":
        features, ybar, mu, sd, coef = _ridge_parts(fit)
        return lambda x: ridge_value(ybar, mu, sd, coef, [x[f] for f in features])
    if fit["kind"] not in ("ols", "ols_pairsum"):
        return None
    f = LinearFit.from_dict(fit)
    if not f.ok:  # predictor_of's line raises here: left to it
        return None
    feature, size = fit["feature"], fit["size"] if fit["kind"] == "ols_pairsum" else None

    def line(x: dict):
        y = f.predict(x[feature])  # elementwise on arrays as on floats
        return y if size is None else x[size] * y  # 1.0 * y is y

    return line


#: a feature value this many of the study's standard deviations from its mean is an extrapolation
FAR = 3.0


def extrapolation(fit: dict, x: dict) -> str | None:
    """Where a fitted predictor is asked far outside what it was fitted on:
    a feature value ``x[f]`` more than :data:`FAR` of the study's standard
    deviations of ``f`` from its mean (``ols``: from ``x_mean`` and ``sxx``;
    ``ridge``: ``mu`` and ``sd``), said in words; None otherwise (the mean
    reads no feature)."""
    if fit["kind"] in ("ols", "ols_pairsum"):
        n, sxx = fit.get("n") or 0, fit.get("sxx")
        stats = {fit["feature"]: (fit["x_mean"], math.sqrt(sxx / (n - 1)))} if n > 1 and sxx else {}
    elif fit["kind"] == "ridge":
        stats = dict(zip(fit["features"], zip(fit["mu"], fit["sd"])))
    else:
        return None
    for f, (m, sd) in stats.items():
        v = float(x[f])
        if sd > 0 and abs(v - m) > FAR * sd:
            return (f"the composition's {f} ({v:.4g}) lies {abs(v - m) / sd:.0f} standard deviations from the "
                    f"study's mean ({m:.4g}): the prediction extrapolates the fit")  # fmt: skip
    return None


def ridge_features(X: pd.DataFrame) -> list[str]:
    """The overall features (no per-type or per-band breakdown) that the ridge combines."""
    return [c for c in X.columns if ":" not in c]


def _choose_lambda(comps, X: np.ndarray, y: np.ndarray, lambdas=LAMBDAS) -> tuple[float, np.ndarray | None]:
    """The ``lambda`` with the lowest inner leave-one-domain-out MAE, and the
    held-out residuals ``y_k - y_hat_(-d)(x_k)`` at it (one per fold and member
    ``d`` of ``k``); ``(1.0, None)`` with fewer than three domains."""
    splits = lodo_splits(comps)
    if len({d for c in comps for d in c}) < 3 or not splits:
        return 1.0, None
    best, best_mae, best_res = 1.0, math.inf, None
    # a fold's standardisation and normal equations do not depend on lambda: made once, not once per lambda
    folds = [(te, _ridge_normal(X[tr], y[tr])) for _, tr, te in splits]
    for lam in lambdas:
        res = []
        for te, parts in folds:
            mu, sd, ybar = parts[:3]
            beta = _ridge_beta(parts, lam)
            res += [y[k] - _ridge_value(ybar, mu, sd, beta, X[k]) for k in te]
        res = np.asarray(res)
        mae = float(np.abs(res).mean())
        if mae < best_mae - 1e-12:
            best, best_mae, best_res = lam, mae, res
    return best, best_res


def sized(X: pd.DataFrame) -> bool:
    """Whether the compositions of ``X`` differ in size (then ``ols_pairsum`` predictors are fitted)."""
    return SIZE in X.columns and X[SIZE].nunique() > 1


def fit_all(comps, y: np.ndarray, X: pd.DataFrame, level: float = 0.9, lambdas=LAMBDAS,
            pairsum: bool = False, loo: bool = True) -> dict[str, dict]:  # fmt: skip
    """Every predictor fitted on ``(comps, X, y)``: ``{"mean", "ols:F"..., ["ols_pairsum:F"...], "ridge"}``.
    ``loo=False``: the lines without their leave-one-out figures (:func:`~loramix.fit.fit_line`),
    for a fold's fits, which only predict."""
    fits = {"mean": _fit_mean(y)}
    for f in X.columns:
        fits[f"ols:{f}"] = _fit_ols(X[f].to_numpy(), y, f, loo)
    if pairsum:
        size = X[SIZE].to_numpy(dtype=np.float64)
        for f in X.columns:
            if f != SIZE:
                fits[f"ols_pairsum:{f}"] = _fit_pairsum(X[f].to_numpy(), size, y, f, loo)
    rf = ridge_features(X)
    if rf:
        R = X[rf].to_numpy()
        lam, held_out = _choose_lambda(comps, R, y, lambdas)
        fits["ridge"] = _fit_ridge(R, y, rf, lam, level, held_out)
    return fits


# ----------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """Held-out predictions (long), per-predictor metrics and the final fits."""

    predictions: pd.DataFrame  # PREDICTION_COLUMNS
    summary: pd.DataFrame  # SUMMARY_COLUMNS, best first
    fits: dict[str, dict]
    compositions: list[tuple[str, ...]]
    y: list[float]
    aggregate: dict[str, str]
    level: float
    target: str
    dropped: list[str] = field(default_factory=list)  # features missing or infinite on some composition
    selection: dict | None = None  # the nested figures (nested_selection); None where not computed

    @property
    def best(self) -> str:
        return str(self.summary.iloc[0]["predictor"])

    def mae(self, predictor: str) -> float:
        return float(self.summary.set_index("predictor").loc[predictor, "mae"])

    @property
    def beats_mean(self) -> bool:
        return self.best != "mean" and self.mae(self.best) < self.mae("mean")

    def headline(self) -> str:
        """One sentence: the best predictor and whether it beats the mean."""
        b, m = self.mae(self.best), self.mae("mean")
        if not self.beats_mean:
            return (f"No feature predicts {self.target} better than the mean under leave-one-domain-out "
                    f"(mean: held-out MAE {m:.3g}).")  # fmt: skip
        return (f"Best predictor of {self.target}: {self.best}, held-out MAE {b:.3g} against {m:.3g} "
                "for the mean (leave-one-domain-out).")  # fmt: skip

    def to_json_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "format": FORMAT, "target": self.target, "level": self.level, "headline": self.headline(),
            "best": self.best, "beats_mean": self.beats_mean,
            "compositions": [list(c) for c in self.compositions], "y": list(self.y),
            "aggregate": dict(self.aggregate),
            "dropped_features": list(self.dropped),
            "summary": [{k: clean(v) for k, v in r.items()} for r in self.summary.to_dict(orient="records")],
            "fits": self.fits,
            # only where computed: a validation without it writes what it wrote before
            **({"selection": self.selection} if self.selection is not None else {}),
        }  # fmt: skip


def _metrics(pred: pd.DataFrame) -> dict:
    y, yh = pred["y"].to_numpy(float), pred["y_hat"].to_numpy(float)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r = float(np.corrcoef(yh, y)[0, 1]) if len(y) > 1 and yh.std() > 0 and y.std() > 0 else float("nan")
    # in numpy, not pandas' dropna and Series comparisons: the same count over the same
    # predictions, at a tenth of the cost, which a nested validation pays 1,500 times
    lo, hi = pred["low"].to_numpy(float), pred["high"].to_numpy(float)
    has = ~(np.isnan(lo) | np.isnan(hi))
    inside = (lo[has] <= y[has]) & (y[has] <= hi[has])
    cov = float(inside.mean()) if has.any() else float("nan")
    return {"n": len(y), "r": r, "r2": 1 - float(((y - yh) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "mae": float(np.abs(y - yh).mean()), "coverage": cov}  # fmt: skip


def ranked(summary: pd.DataFrame, rtol: float = 1e-12) -> pd.DataFrame:
    """``summary`` best first: by held-out MAE, MAEs within ``rtol`` of each
    other tied, and a tie going to the least qualified name (fewest ``:``
    parts: the general feature before a per-type or per-band one), then to
    the name order. Two names for one feature (``band_mean_cosine:top`` is
    ``mean_cosine`` where every adapted layer is in the top band) give MAEs
    that differ in their last bits only, by the order of a sum; ranked by
    those bits, which of the two is "best" turned on float noise and changed
    from one run to the next."""
    s = summary.sort_values(["mae", "predictor"], kind="stable")
    lead, tie = math.nan, []
    for m in s["mae"].to_numpy(dtype=np.float64):
        if not abs(m - lead) <= rtol * abs(lead):  # a NaN MAE, or the first, starts a group
            lead = m
        tie.append(lead)
    s = s.assign(_tie=tie, _parts=s["predictor"].str.count(":"))
    s = s.sort_values(["_tie", "_parts", "predictor"], kind="stable")
    return s.reset_index(drop=True)[SUMMARY_COLUMNS]


def validate(compositions, y, X: pd.DataFrame, *, level: float = 0.9, lambdas=LAMBDAS,
             aggregate: dict[str, str] | None = None, target: str = "interference", nested: bool = False,
             loo: bool = True) -> Validation:  # fmt: skip
    """Leave-one-domain-out validation of every predictor (module docstring).

    ``compositions``: tuples of domain names, aligned with ``y`` and the rows of
    ``X`` (compositions x features, e.g. from :func:`composition_table`).
    ``nested``: the choice of the best validated too (:func:`nested_selection`,
    about seven times the cost), kept as ``selection``. ``loo=False``: the final
    fits without the lines' leave-one-out figures (``fit_line(loo=False)``; a
    nested fold's, which only predict).
    """
    import pandas as pd

    comps = [tuple(c) for c in compositions]
    y = np.asarray(y, dtype=np.float64)
    if len(comps) != len(y) or len(y) != len(X):
        raise UsageError(
            "validation", f"{len(comps)} compositions, {len(y)} values and {len(X)} feature rows"
        )
    if not np.isfinite(y).all():
        raise UsageError("validation", "the measured interference has a missing or non-finite value")
    # an infinite value is as unusable as a missing one: a line through it predicts inf,
    # and it turns the ridge's standardisation (mean, sd) and so every ridge prediction into NaN
    complete = np.isfinite(X.to_numpy(dtype=np.float64)).all(axis=0)
    dropped = [str(c) for c in X.columns[~complete]]
    X = X.loc[:, complete]
    X = X.reset_index(drop=True)
    splits = lodo_splits(comps)
    if not splits:
        raise UsageError("validation", "leave-one-domain-out needs compositions with and without each domain")
    rows, pairsum = [], sized(X)
    if SIZE in X.columns and not pairsum:  # one size throughout: a constant, nothing to fit on
        X = X.drop(columns=[SIZE])
    # one dict per composition: a row's to_dict at each prediction cost more than the fits
    xs = X.to_dict(orient="records")
    for d, tr, te in splits:
        fits = fit_all([comps[k] for k in tr], y[tr], X.iloc[tr], level, lambdas, pairsum, loo=False)
        for name, fit in fits.items():
            at = predictor_of(fit, level)
            for k in te:
                yh, lo, hi = at(xs[k])
                rows.append((name, d, label(comps[k]), float(y[k]), yh, lo, hi))
    pred = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    summary = pd.DataFrame(
        [{"predictor": p, **_metrics(g)} for p, g in pred.groupby("predictor", sort=False)]
    )
    summary = ranked(summary)
    agg = {f: (aggregate or {}).get(f, "rms") for f in X.columns}
    fits = fit_all(comps, y, X, level, lambdas, pairsum, loo=loo)
    v = Validation(pred, summary, fits, comps, y.tolist(), agg, level, target, dropped)
    if nested:
        v.selection = nested_selection(comps, y, X, pred, splits, level=level, lambdas=lambdas)
    return v


def nested_selection(comps, y: np.ndarray, X: pd.DataFrame, pred: pd.DataFrame, splits, *, level: float = 0.9,
                     lambdas=LAMBDAS) -> dict:  # fmt: skip
    """The nested leave-one-domain-out of the choice of the best (module
    docstring): ``{"n", "r", "r2", "mae", "coverage"}`` of the pooled outer
    predictions, ``mean_mae`` (the mean's held-out MAE on the same outer folds,
    from ``pred``, the plain validation's predictions) and ``chosen``
    (``{outer domain: the predictor its training part chose}``; a fold that
    could not choose is absent). ``X`` and ``splits`` as :func:`validate` uses
    them (the complete features; :func:`lodo_splits`). Non-finite figures are None."""
    import pandas as pd

    xs = X.to_dict(orient="records")
    rows, chosen = [], {}
    for d, tr, te in splits:
        try:
            inner = validate(
                [comps[k] for k in tr], y[tr], X.iloc[tr], level=level, lambdas=lambdas, loo=False
            )
        except UsageError:  # no domain of the training part can be held out: nothing to choose by
            continue
        chosen[d] = inner.best
        at = predictor_of(inner.fits[inner.best], level)
        rows += [(float(y[k]), *at(xs[k])) for k in te]
    if not rows:
        return {"n": 0, "r": None, "r2": None, "mae": None, "coverage": None, "mean_mae": None, "chosen": {}}
    m = _metrics(pd.DataFrame(rows, columns=["y", "y_hat", "low", "high"]))
    mean = pred[(pred["predictor"] == "mean") & pred["held_out"].isin(list(chosen))]
    m["mean_mae"] = float(np.abs(mean["y"].to_numpy(float) - mean["y_hat"].to_numpy(float)).mean())
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
    return {**out, "chosen": chosen}


def selection_note(sel: dict | None) -> str | None:
    """Where a nested validation of the choice (``selection``,
    :func:`nested_selection`) has a held-out MAE not below the mean's, in
    words: choosing the best this way does not beat the mean on a new
    domain, whatever the chosen predictor's own figure. None otherwise, and
    for a file without it. ``loramix predict`` notes it, ``loramix plan``
    warns of it."""
    if not sel or sel.get("mae") is None or sel.get("mean_mae") is None or sel["mae"] < sel["mean_mae"]:
        return None
    return (f"choosing the best predictor this way does not beat the mean on held-out domains (nested "
            f"leave-one-domain-out, the choice made again without each held-out domain: held-out MAE "
            f"{sel['mae']:.3g} against {sel['mean_mae']:.3g} for the mean)")  # fmt: skip


def method_entry(v: dict) -> dict:
    """One merge method's part of a predictors file's ``by_method``: from a
    :meth:`Validation.to_json_dict`, its target, level, best predictor (the fit
    and its held-out record), the mean's held-out MAE and, where computed, the
    nested figures of the choice (``selection``, :func:`nested_selection`)."""
    rows = {r["predictor"]: r for r in v["summary"]}
    return {"target": v["target"], "level": v["level"], "best": v["best"], "beats_mean": v["beats_mean"],
            "fit": v["fits"][v["best"]], "validated": rows.get(v["best"]),
            "mean_mae": rows.get("mean", {}).get("mae"),
            **({"selection": v["selection"]} if v.get("selection") is not None else {})}  # fmt: skip


def write_predictors(path: str | os.PathLike, result: Validation) -> Path:
    """Write ``result.to_json_dict()`` atomically."""
    from .io.outputs import atomic_write

    with atomic_write(path) as f:
        json.dump(result.to_json_dict(), f, indent=1)
    return Path(path)


def _check_feature(path, name: str, value) -> None:
    from .features import registry

    check_str(path, name, value)
    if value.split(":")[0] not in registry():
        raise field_error(path, name, "a loramix feature", value)


def check_predictor_fit(path, name: str, fit) -> dict:
    """A fitted predictor of :func:`fit_all` (``name`` in the file ``path``), checked.

    Checked: ``kind`` one of :data:`KINDS`. ``mean``: ``n`` an integer >= 1,
    ``mean`` finite, ``sd`` finite and >= 0 or null (null for ``n < 2``).
    ``ols``/``ols_pairsum``: ``feature`` (and ``size``) a known feature and the
    fields of a line (:func:`loramix.fit.check_linear_fit`). ``ridge``:
    ``features`` a non-empty list of known features, ``mu``, ``sd`` (> 0) and
    ``coef`` one finite number per feature, ``lambda`` (where present) >= 0,
    ``intercept`` finite, ``n`` an integer >= 1, ``resid_low <= resid_high``
    finite or both null. Returns ``fit``.
    """
    if not isinstance(fit, dict):
        raise field_error(path, name, "an object (a fitted predictor)", fit)

    def get(key):
        return fit.get(key, MISSING)

    kind = get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise field_error(path, f"{name}.kind", f"one of {', '.join(KINDS)}", kind)
    if kind == "mean":
        n = check_int(path, f"{name}.n", get("n"), 1)
        check_number(path, f"{name}.mean", get("mean"))
        sd = check_number(path, f"{name}.sd", get("sd"), null=True, low=0)
        if sd is not None and n < 2:
            raise UsageError(path, f"{name}.sd is given but n is {n} (it needs n >= 2)")
    elif kind in ("ols", "ols_pairsum"):
        _check_feature(path, f"{name}.feature", get("feature"))
        if kind == "ols_pairsum":
            _check_feature(path, f"{name}.size", get("size"))
        check_linear_fit(path, name, fit, line=True)
    else:
        feats = get("features")
        if not isinstance(feats, list) or not feats:
            raise field_error(path, f"{name}.features", "a non-empty list of feature names", feats)
        for k, f in enumerate(feats):
            _check_feature(path, f"{name}.features[{k}]", f)
        # sd divides the features when they are standardised
        for key, low in (("mu", None), ("sd", 0), ("coef", None)):
            v = get(key)
            if not isinstance(v, list) or len(v) != len(feats):
                raise field_error(
                    path, f"{name}.{key}", f"a list of {len(feats)} numbers (one per feature)", v
                )
            for k, x in enumerate(v):
                check_number(path, f"{name}.{key}[{k}]", x, low=low, above=low is not None)
        if "lambda" in fit:
            check_number(path, f"{name}.lambda", fit["lambda"], low=0)
        check_number(path, f"{name}.intercept", get("intercept"))
        check_int(path, f"{name}.n", get("n"), 1)
        lo = check_number(path, f"{name}.resid_low", get("resid_low"), null=True)
        hi = check_number(path, f"{name}.resid_high", get("resid_high"), null=True)
        if (lo is None) != (hi is None):
            raise UsageError(
                path, f"{name}.resid_low and {name}.resid_high must be both numbers or both null"
            )
        if lo is not None and lo > hi:
            raise UsageError(path, f"{name}.resid_low ({lo:g}) is above {name}.resid_high ({hi:g})")
    return fit


def _check_record(path, name: str, row) -> dict:
    """A held-out record (a ``summary`` row): ``predictor`` a string, ``n`` an
    integer >= 1, ``r`` and ``r2`` finite or null, ``mae`` >= 0 or null,
    ``coverage`` in [0, 1] or null."""
    if not isinstance(row, dict):
        raise field_error(path, name, "an object (a held-out record)", row)
    check_str(path, f"{name}.predictor", row.get("predictor", MISSING))
    check_int(path, f"{name}.n", row.get("n", MISSING), 1)
    for key in ("r", "r2"):
        check_number(path, f"{name}.{key}", row.get(key), null=True)
    check_number(path, f"{name}.mae", row.get("mae"), null=True, low=0)
    cov = check_number(path, f"{name}.coverage", row.get("coverage"), null=True, low=0)
    if cov is not None and cov > 1:
        raise field_error(path, f"{name}.coverage", "a number in [0, 1] or null", cov)
    return row


def check_selection(path, name: str, sel) -> dict | None:
    """The nested figures of the choice (:func:`nested_selection`), checked:
    null or an object with ``n`` an integer >= 0, ``r`` and ``r2`` finite or
    null, ``mae``, ``mean_mae`` >= 0 or null, ``coverage`` in [0, 1] or null,
    and ``chosen`` an object {domain: predictor name}. A file written before
    loramix computed it has no ``selection``, and is read as before."""
    if sel is None:
        return None
    if not isinstance(sel, dict):
        raise field_error(path, name, "an object (the nested validation of the choice) or null", sel)
    check_int(path, f"{name}.n", sel.get("n", MISSING), 0)
    for key in ("r", "r2"):
        check_number(path, f"{name}.{key}", sel.get(key), null=True)
    for key in ("mae", "mean_mae"):
        check_number(path, f"{name}.{key}", sel.get(key), null=True, low=0)
    cov = check_number(path, f"{name}.coverage", sel.get("coverage"), null=True, low=0)
    if cov is not None and cov > 1:
        raise field_error(path, f"{name}.coverage", "a number in [0, 1] or null", cov)
    chosen = sel.get("chosen", MISSING)
    if not isinstance(chosen, dict) or not all(isinstance(v, str) for v in chosen.values()):
        raise field_error(path, f"{name}.chosen", "an object {domain: predictor name}", chosen)
    return sel


def _check_bool(path, name: str, d: dict, key: str) -> None:
    if key in d and not isinstance(d[key], bool):
        raise field_error(path, name, "true or false", d[key])


def load_predictors(path: str | os.PathLike) -> dict:
    """A predictors file written by :func:`write_predictors`, checked; one-line errors otherwise.

    Checked, as ``loramix predict`` and ``loramix plan`` read them: ``format``;
    ``fits`` an object; ``best`` a string naming one of ``fits``; ``level`` in
    (0, 1); ``target`` a string; ``calibration`` (the study's recipe of the
    data-aware features) null or integers ``tokens`` >= 1 and ``max_len`` >= 2;
    ``scenario``, ``adapter_kind`` and
    ``base_identity`` strings or null; ``adapters`` an object or null; ``beats_mean`` true or false; ``summary``
    a list of held-out records (:func:`_check_record`) with a finite ``mae`` for
    the best predictor and for ``mean``; the best fit
    (:func:`check_predictor_fit`); and each ``by_method`` entry: its ``fit``,
    ``best`` a string, ``validated`` a held-out record or null, ``level`` in
    (0, 1), ``target`` a string or null, ``mean_mae`` >= 0 or null; ``selection``
    and each entry's, where present (:func:`check_selection`). The other
    fits and fields, which neither command reads, are not checked.
    """
    p = Path(path)
    d = read_json_file(p, "predictors file", "give its predictors.json",
                       "a scenario run with [predictors], or loramix fit, writes one", "predictors file")  # fmt: skip
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("fits"), dict):
        # a study's fit.json (its fits a list, no format) given where a predictors file is read: say so
        was = (
            "; it is a fit.json (the cosine line, which loramix predict reads): give a predictors.json"
            if isinstance(d, dict) and "format" not in d and isinstance(d.get("fits"), list)
            else ""
        )
        raise UsageError(p, f"not a loramix predictors file (no format {FORMAT!r} with 'fits'){was}")
    best = d.get("best")
    if not isinstance(best, str) or best not in d["fits"]:
        raise UsageError(p, f"best predictor {best!r} has no fit")
    bm = d.get("by_method")
    if bm is not None and (not isinstance(bm, dict) or not all(isinstance(e, dict) and isinstance(e.get("fit"), dict)
                                                              for e in bm.values())):  # fmt: skip
        raise UsageError(
            p, "'by_method' is not {merge method: {'fit': ...}}; regenerate it with loramix scenario run"
        )
    check_level(p, "level", d.get("level", MISSING))
    check_str(p, "target", d.get("target", MISSING))
    cal = d.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict):
            raise field_error(p, "calibration", "an object {tokens, max_len} or null", cal)
        # max_len as --max-len: at least 2 (else the calibration pass refused it, naming --max-len)
        for key, low, want in (
            ("tokens", 1, "a positive integer"),
            ("max_len", 2, "an integer of at least 2"),
        ):
            v = cal.get(key, MISSING)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise field_error(p, f"calibration.{key}", want, v)
    for key in ("scenario", "adapter_kind", "base_identity"):
        check_str(p, key, d.get(key), null=True)
    check_recipe(p, d)
    _check_bool(p, "beats_mean", d, "beats_mean")
    summary = d.get("summary", MISSING)
    if not isinstance(summary, list):
        raise field_error(p, "summary", "a list of held-out records", summary)
    rows = {}
    for k, row in enumerate(summary):
        rows.setdefault(_check_record(p, f"summary[{k}]", row)["predictor"], row)
    for name in dict.fromkeys((best, "mean")):
        if rows.get(name, {}).get("mae") is None:
            raise UsageError(p, f"summary has no held-out MAE for predictor {name!r}")
    check_predictor_fit(p, f"fits[{json.dumps(best)}]", d["fits"][best])
    check_selection(p, "selection", d.get("selection"))
    for m, e in (bm or {}).items():
        name = f"by_method[{json.dumps(m)}]"
        check_predictor_fit(p, f"{name}.fit", e["fit"])
        check_str(p, f"{name}.best", e.get("best", MISSING))
        if e.get("validated") is not None:
            _check_record(p, f"{name}.validated", e["validated"])
        if "level" in e:
            check_level(p, f"{name}.level", e["level"])
        check_str(p, f"{name}.target", e.get("target"), null=True)
        check_number(p, f"{name}.mean_mae", e.get("mean_mae"), null=True, low=0)
        _check_bool(p, f"{name}.beats_mean", e, "beats_mean")
        check_selection(p, f"{name}.selection", e.get("selection"))
        if e.get("merge") is not None:
            _check_merge(p, f"{name}.merge", e["merge"])
    return d


def _check_merge(path, name: str, merge) -> None:
    """A ``by_method`` entry's ``merge``: ``{"method": a registered merge method,
    "params": its parameters}``, each value one ``loramix merge`` takes (what
    ``loramix plan`` writes into a group's command)."""
    from .methods import available_methods, params_of

    if not isinstance(merge, dict) or not isinstance(merge.get("params"), dict):
        raise field_error(path, name, 'an object {"method": ..., "params": {...}}', merge)
    if merge.get("method") not in available_methods():
        raise field_error(
            path, f"{name}.method", f"one of {', '.join(available_methods())}", merge.get("method")
        )
    params = params_of(merge["method"])
    for k, v in merge["params"].items():
        if k not in params:
            raise field_error(
                path, f"{name}.params", f"{merge['method']}'s parameters ({', '.join(params)})", k
            )
        try:  # as a study writes it: coerced already (0.5, not "0.5")
            ok = not isinstance(v, bool) and params[k].coerce(v) == v
        except UsageError:
            ok = False
        if not ok:
            raise field_error(
                path, f"{name}.params.{k}", f"a value of {merge['method']}'s {params[k].flag}", v
            )
    for k, q in params.items():
        if q.required and k not in merge["params"]:
            raise field_error(
                path, f"{name}.params.{k}", f"given ({merge['method']} requires {q.flag})", MISSING
            )
