"""Linear fit of interference against similarity, with leave-one-out error.

The paper (arXiv 2508.11985) observes that ``delta_ppl%`` of a naive sum grows
roughly linearly with the RMS cosine of the summed deltas. With points
``(x_i, y_i)``, ``i = 1..n`` (``x`` = RMS cosine of a composition, ``y`` = its
``delta_ppl%``), ordinary least squares gives::

    x_bar, y_bar = mean(x), mean(y)
    Sxx = sum (x_i - x_bar)^2          Sxy = sum (x_i - x_bar)(y_i - y_bar)
    slope = Sxy / Sxx                  intercept = y_bar - slope * x_bar
    r     = Sxy / sqrt(Sxx * Syy)      (Pearson)
    R^2   = 1 - SS_res / SS_tot        (= r^2 for a line with an intercept)

Leave-one-out: for each ``i`` fit on the other ``n - 1`` points and predict
``y_i``; the LOO errors ``e_i = y_hat_(-i)(x_i) - y_i`` are summarised by their
RMSE and mean absolute error. They need ``n >= 3`` (a line through two points).

Prediction interval at a new ``x0`` (needs ``n >= 3``)::

    s      = sqrt(SS_res / (n - 2))                       residual standard error
    se(x0) = s * sqrt(1 + 1/n + (x0 - x_bar)^2 / Sxx)
    y_hat(x0) +- t_{1 - a/2, n - 2} * se(x0)

The Student-t quantile is computed here (no SciPy dependency) by bisection on
its CDF, written with the regularised incomplete beta function. The study
that produces the points, and how to read the error: docs/interference.md.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .io.config_schema import is_number, load_json_file, show


@dataclass
class LinearFit:
    """OLS fit ``y = slope * x + intercept`` and its diagnostics."""

    n: int
    slope: float | None
    intercept: float | None
    pearson_r: float | None
    r2: float | None
    x_mean: float | None
    sxx: float | None
    residual_se: float | None  # s = sqrt(SS_res / (n - 2)); None for n < 3
    loo_rmse: float | None
    loo_mae: float | None
    loo_predictions: list[float | None] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LinearFit:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})

    @property
    def ok(self) -> bool:
        return self.slope is not None

    def predict(self, x0: float) -> float:
        if not self.ok:
            raise ValueError("the fit has fewer than two distinct points")
        return self.slope * x0 + self.intercept

    def prediction_interval(self, x0: float, level: float = 0.95) -> tuple[float, float] | None:
        """``(low, high)`` of the OLS prediction interval at ``x0``; None for n < 3."""
        if self.residual_se is None or not self.ok:
            return None
        se = self.residual_se * math.sqrt(1 + 1 / self.n + (x0 - self.x_mean) ** 2 / self.sxx)
        t = t_quantile(0.5 + level / 2, self.n - 2)
        y0 = self.predict(x0)
        return y0 - t * se, y0 + t * se


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """``(slope, intercept)``, or None when the x values do not vary."""
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    # x that does not vary (up to rounding) gives no line.
    if len(x) < 2 or sxx <= 1e-20 * float((x**2).sum()) or sxx == 0:
        return None
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    return slope, float(ym - slope * xm)


def fit_line(x, y, labels=None, *, loo: bool = True) -> LinearFit:
    """Fit ``y ~ x`` (see the module docstring); non-finite points are dropped.
    ``loo=False`` leaves the leave-one-out figures out (None): ``n`` refits
    that a caller which only predicts from the line does not read."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(x))]
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    labels = [lab for lab, k in zip(labels, keep) if k]
    n = len(x)
    base = dict(n=n, x=x.tolist(), y=y.tolist(), labels=labels)
    line = _ols(x, y) if n >= 2 else None
    if line is None:
        return LinearFit(
            slope=None, intercept=None, pearson_r=None, r2=None, x_mean=None, sxx=None,
            residual_se=None, loo_rmse=None, loo_mae=None, loo_predictions=[None] * n, **base,
        )  # fmt: skip
    slope, intercept = line
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    syy = float(((y - ym) ** 2).sum())
    sxy = float(((x - xm) * (y - ym)).sum())
    resid = y - (slope * x + intercept)
    ss_res = float((resid**2).sum())
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else None
    r2 = 1 - ss_res / syy if syy > 0 else None
    s = math.sqrt(ss_res / (n - 2)) if n >= 3 else None

    preds: list[float | None] = []
    for i in range(n if loo else 0):
        rest = np.arange(n) != i
        li = _ols(x[rest], y[rest]) if n >= 3 else None
        preds.append(None if li is None else li[0] * x[i] + li[1])
    errs = np.array([p - yi for p, yi in zip(preds, y) if p is not None])
    loo_rmse = float(np.sqrt((errs**2).mean())) if len(errs) else None
    loo_mae = float(np.abs(errs).mean()) if len(errs) else None
    return LinearFit(
        slope=slope, intercept=intercept, pearson_r=r, r2=r2, x_mean=float(xm), sxx=sxx,
        residual_se=s, loo_rmse=loo_rmse, loo_mae=loo_mae, loo_predictions=preds if loo else [None] * n, **base,
    )  # fmt: skip


# --- checking fit files -------------------------------------------------------
#
# A fit file (fit.json, or a fit inside predictors.json) is refused at load time
# with one line naming the file and the field, so that no later arithmetic can
# fail on it or print a number made of nonsense.

MISSING = object()


def field_error(path, name: str, what: str, value) -> UsageError:
    """``<path>: <name> must be <what>, got <value>`` (``is missing`` when absent)."""
    if value is MISSING:
        return UsageError(path, f"{name} is missing (it must be {what})")
    return UsageError(path, f"{name} must be {what}, got {show(value)}")


def check_number(path, name: str, value, *, null: bool = False, low: float | None = None,
                 above: bool = False):  # fmt: skip
    """``value`` if it is a finite number (``>= low``, or ``> low`` with ``above``);
    ``None`` where ``null`` allows it; :class:`UsageError` naming ``name`` otherwise."""
    if value is None and null:
        return None
    if is_number(value) and (low is None or (value > low if above else value >= low)):
        return value
    what = "a finite number"
    if low is not None:
        what += f" {'>' if above else '>='} {low:g}"
    raise field_error(path, name, what + (" or null" if null else ""), value)


def check_int(path, name: str, value, low: int = 0) -> int:
    """``value`` if it is an integer ``>= low``; :class:`UsageError` naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        # a count past 2^53 is no count a study made, and overflows the float arithmetic
        if value <= 2**53:
            return value
        raise field_error(path, name, f"an integer from {low} to 2^53", value)
    raise field_error(path, name, f"an integer >= {low}", value)


def check_level(path, name: str, value) -> float:
    """``value`` if it is a number strictly between 0 and 1 (a prediction-interval level)."""
    if is_number(value) and 0 < value < 1:
        return value
    raise field_error(path, name, "a number in (0, 1)", value)


def check_str(path, name: str, value, *, null: bool = False) -> str | None:
    """``value`` if it is a string (``None`` where ``null`` allows it)."""
    if isinstance(value, str) or (value is None and null):
        return value
    raise field_error(path, name, "a string" + (" or null" if null else ""), value)


def _check_list(path, name: str, value, n: int, item) -> None:
    if not isinstance(value, list):
        raise field_error(path, name, f"a list of {n} values", value)
    if len(value) != n:
        raise UsageError(path, f"{name} has {len(value)} values, but n is {n}")
    for k, v in enumerate(value):
        item(f"{name}[{k}]", v)


def check_linear_fit(path, name: str, d, *, line: bool = False) -> LinearFit:
    """The :class:`LinearFit` of the dict ``d`` (``name`` in the file ``path``), checked.

    Checked: ``n`` an integer >= 0 (>= 2 for a line); ``slope`` and
    ``intercept`` finite, or both null (no line, refused where ``line``);
    ``pearson_r`` and ``r2`` finite or null; for a line ``x_mean`` finite and
    ``sxx`` finite and > 0; ``residual_se``, ``loo_rmse`` and ``loo_mae``
    finite, >= 0 or null, ``residual_se`` only with ``n >= 3``; where present,
    ``x`` and ``y`` ``n`` finite numbers, ``loo_predictions`` ``n`` finite
    numbers or nulls, ``labels`` ``n`` strings, and ``x`` agreeing with
    ``x_mean`` and ``sxx``. Other keys are ignored.
    """
    if not isinstance(d, dict):
        raise field_error(path, name, "an object (a fitted line)", d)

    def get(key):
        return d.get(key, MISSING)

    def num(key, **kw):
        return check_number(path, f"{name}.{key}", get(key), **kw)

    n = check_int(path, f"{name}.n", get("n"))
    slope = num("slope", null=not line)
    intercept = num("intercept", null=slope is None)
    if slope is None and intercept is not None:
        raise UsageError(path, f"{name}.intercept is given but {name}.slope is null")
    if slope is not None and n < 2:
        raise field_error(path, f"{name}.n", "at least 2 for a line", n)
    num("pearson_r", null=True)
    num("r2", null=True)
    x_mean = num("x_mean", null=slope is None)
    # sxx divides in the prediction interval: zero or negative means no spread in x
    sxx = num("sxx", null=slope is None, low=0, above=True)
    se = num("residual_se", null=True, low=0)
    if se is not None and n < 3:
        raise UsageError(path, f"{name}.residual_se is given but n is {n} (it needs n >= 3)")
    num("loo_rmse", null=True, low=0)
    num("loo_mae", null=True, low=0)

    def finite(k, v):
        check_number(path, k, v)

    def finite_or_null(k, v):
        check_number(path, k, v, null=True)

    def text(k, v):
        check_str(path, k, v)

    for key, item in (("x", finite), ("y", finite), ("loo_predictions", finite_or_null), ("labels", text)):
        if key in d:
            _check_list(path, f"{name}.{key}", d[key], n, item)
    if slope is not None and "x" in d:
        # x_mean and sxx are computed from x when the fit is made; a file in
        # which they disagree has been edited, and its interval would be wrong
        x = np.asarray(d["x"], dtype=np.float64)
        with np.errstate(all="ignore"):  # x near the float limit: a mismatch, not a warning
            xm = float(x.mean())
            s = float(((x - xm) ** 2).sum())
        if not math.isclose(xm, x_mean, rel_tol=1e-9, abs_tol=1e-12):
            raise UsageError(path, f"{name}.x_mean is {x_mean:g}, but the mean of {name}.x is {xm:g}")
        if not math.isclose(s, sxx, rel_tol=1e-6, abs_tol=1e-15):
            raise UsageError(path, f"{name}.sxx is {sxx:g}, but {name}.x gives {s:g}")
    return LinearFit.from_dict(d)


def read_json_file(p: Path, kind: str, folder_hint: str, missing_hint: str, what: str):
    """The JSON in the file ``p`` (a ``kind`` of file), or one line saying it
    is a folder (``folder_hint``), missing (``missing_hint``) or not JSON."""
    if p.is_dir():
        raise UsageError(p, f"a folder, not a {kind} ({folder_hint})")
    if not p.is_file():
        raise UsageError(p, f"no such {kind} ({missing_hint})")
    return load_json_file(p, UsageError, constants=True, what=what)


def check_recipe(path, d: dict) -> None:
    """A fit file's ``adapters`` (its study's training recipe, which predict
    compares with the adapters'), where present: an object or null."""
    if not isinstance(d.get("adapters"), (dict, type(None))):
        raise field_error(path, "adapters", "an object (the study's [adapters]) or null", d["adapters"])


#: how a study's adapters were initialised (``adapters.init``; ``train --shared-init``)
INITS = ("data", "shared")


def load_fit_file(path: str | os.PathLike) -> dict:
    """A ``fit.json`` written by a scenario run, checked in full; one-line errors otherwise.

    Checked: a JSON object with a ``fits`` list; ``prediction_level``, where
    present, in (0, 1); ``scenario`` and ``base_identity`` (the base's
    :meth:`~loramix.io.model_folder.BaseModelFolder.identity`, absent in a
    file from before it was recorded) a string or null; ``adapters`` (the
    study's recipe, absent before it was recorded) an object or null; each entry an object
    with string ``adapter_method`` and ``merge_method`` and the fields of a
    :class:`LinearFit` (:func:`check_linear_fit`), and where present ``init``
    one of :data:`INITS`. Returns the dict as read.
    """
    p = Path(path)
    fit = read_json_file(p, "fit file", "give its fit.json or predictors.json",
                         "a scenario run writes reports/NAME/fit.json; so does loramix fit --merged-data, in its --out",
                         "fit.json")  # fmt: skip
    return check_fit(fit, p)


def check_fit(fit, p: str | os.PathLike) -> dict:
    """:func:`load_fit_file`'s checks of a ``fit.json`` already read (``fit``),
    errors naming ``p``: a dict given to :func:`loramix.predict` is checked as
    the file would be (it raised a bare KeyError). Returns ``fit``."""
    if isinstance(fit, dict) and isinstance(fit.get("fits"), dict) and "format" in fit:
        # a predictors file (its fits by name) whose format is not the one this loramix writes
        raise field_error(p, "format", '"loramix-predictors" (a predictors file) or absent (a fit.json)',
                          fit["format"])  # fmt: skip
    if not isinstance(fit, dict) or not isinstance(fit.get("fits"), list):
        raise UsageError(p, "not a loramix fit.json (no 'fits' list)")
    if "prediction_level" in fit:
        check_level(p, "prediction_level", fit["prediction_level"])
    check_str(p, "scenario", fit.get("scenario"), null=True)
    check_str(p, "base_identity", fit.get("base_identity"), null=True)  # absent before it was written
    check_recipe(p, fit)
    for k, entry in enumerate(fit["fits"]):
        name = f"fits[{k}]"
        if not isinstance(entry, dict):
            raise field_error(p, name, "an object (a fitted line)", entry)
        check_str(p, f"{name}.adapter_method", entry.get("adapter_method", MISSING))
        check_str(p, f"{name}.merge_method", entry.get("merge_method", MISSING))
        if "init" in entry and entry["init"] not in INITS:
            raise field_error(p, f"{name}.init", " or ".join(f'"{i}"' for i in INITS), entry["init"])
        check_linear_fit(p, name, entry)
    return fit


# --- Student t quantile without SciPy ---------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t: ``1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` for ``t >= 0``."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` by bisection (to about 1e-12).

    Remembered per ``(p, df)``: a study's validation asks for a few of them
    thousands of times (one per held-out prediction interval; the quickstart,
    6,400 calls for a handful of pairs), and each bisection evaluates the CDF
    ~45 times. Unremembered, that was two thirds of the validation, which runs
    in the main process after the last step."""
    if not 0 < p < 1:
        raise ValueError("p must lie in (0, 1)")
    if p < 0.5:
        return -_t_quantile_upper(1 - p, df)
    return _t_quantile_upper(p, df)


@functools.lru_cache(maxsize=1024)
def _t_quantile_upper(p: float, df: float) -> float:
    """:func:`t_quantile` for ``0.5 <= p < 1``, by bisection on ``[0, hi]``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def composition_cosine(rms: np.ndarray, members: list[int]) -> float:
    """The RMS cosine of a composition from the pairwise RMS-cosine matrix.

    For a pair ``(i, j)`` it is ``rms[i, j]``. For ``k >= 3`` adapters it is
    the quadratic mean over the ``k (k - 1) / 2`` pairs::

        cos_C = sqrt( mean_{i<j in C} rms[i, j]^2 )

    which is the RMS over all pooled per-module pairwise cosines when every
    pair shares the same modules (then ``rms_ij^2`` is a mean of ``cos_m^2``).
    The runner and ``loramix predict`` both use this function.
    """
    vals = [float(rms[i, j]) ** 2 for a, i in enumerate(members) for j in members[a + 1 :]]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.sqrt(sum(vals) / len(vals))
