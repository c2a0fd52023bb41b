"""Pairwise features of a bank of adapters: one module per feature, found by discovery.

A *feature* turns ``N`` loaded adapters (and, for data-aware features, the
calibration activations of each adapter's domain, :mod:`._calibration`) into
one or more named ``N x N`` float64 matrices ``F`` with ``F[i, j]`` the value
for the pair ``(i, j)`` (the diagonal is not used). Every non-underscore module
of this package is imported by :func:`registry` and calls :func:`register`
once per feature; a second feature with a name already taken is refused, so a
new metric is one new file (and its test), nothing else.

Each feature states how a composition ``C`` of ``k >= 2`` adapters is summarised
from its pairs (:func:`composition_value`):

* ``"rms"``: ``sqrt(mean_{i<j in C} F[i, j]^2)`` (as
  :func:`loramix.fit.composition_cosine`), for magnitudes;
* ``"mean"``: ``mean_{i<j in C} F[i, j]``, for signed values;
* ``"member_sum"``: ``(k - 1) mean_{i<j in C} F[i, j] = mean_{i in C} sum_{j in C, j != i} F[i, j]``,
  each member's sum over its ``k - 1`` partners, averaged over the members: the
  size-aware aggregation (:mod:`.size`, whose all-ones matrix gives ``k - 1``);
* ``"max"``: ``max_{i<j in C} F[i, j]``, the worst pair, which members
  unrelated to it do not dilute (:mod:`.max_cosine`).

A *directional* matrix (``F[i, j] != F[j, i]``, e.g. the interference of
adapter ``j`` on domain ``i``) is kept for reports but not used as a predictor.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Feature:
    """One registered feature.

    ``compute(ctx)`` returns ``{matrix name: (N, N) ndarray}``; the names must
    start with ``name`` (``name`` itself or ``name:suffix``) so that no two
    features can produce the same column. ``data_aware``: needs ``ctx.calibration``.
    ``per_module``: reads the similarity's per-module table (``ctx.per_module``),
    which is then made with the similarity, once; without a feature that reads
    it, the similarity skips it.
    """

    name: str
    compute: Callable
    data_aware: bool = False
    aggregate: str = "rms"  # or "mean", "member_sum", "max"
    directional: frozenset[str] = frozenset()  # matrix names not symmetric
    doc: str = ""
    per_module: bool = False


AGGREGATES = ("rms", "mean", "member_sum", "max")
_REGISTRY: dict[str, Feature] = {}
_DISCOVERED = False


def register(feature: Feature) -> Feature:
    """Add ``feature``; a name already registered (or an unknown aggregate) is refused."""
    if feature.name in _REGISTRY:
        raise ValueError(f"feature {feature.name!r} is registered twice")
    if feature.aggregate not in AGGREGATES:
        raise ValueError(f"feature {feature.name!r}: aggregate must be one of {', '.join(AGGREGATES)}")
    _REGISTRY[feature.name] = feature
    return feature


def registry() -> dict[str, Feature]:
    """All features, importing this package's feature modules on first use."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _DISCOVERED = True
    return dict(_REGISTRY)


@dataclass
class FeatureSet:
    """Named ``N x N`` matrices for adapters ``names`` and how each aggregates."""

    names: list[str]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    aggregate: dict[str, str] = field(default_factory=dict)
    directional: set[str] = field(default_factory=set)

    def predictors(self) -> list[str]:
        """Matrix names usable as pair predictors (symmetric ones)."""
        return [k for k in self.matrices if k not in self.directional]

    def composition(self, feature: str, members: list[int]) -> float:
        return composition_value(self.matrices[feature], members, self.aggregate[feature])

    def to_json_dict(self) -> dict:
        def mat(x):
            return [[float(v) if math.isfinite(v) else None for v in row] for row in x]

        return {
            "names": list(self.names),
            "features": {k: {"aggregate": self.aggregate[k], "directional": k in self.directional,
                             "matrix": mat(v)} for k, v in self.matrices.items()},
        }  # fmt: skip


def composition_value(matrix: np.ndarray, members: list[int], aggregate: str = "rms") -> float:
    """The composition's value from its pairs (module docstring); NaN pairs are
    left out, NaN when none is left."""
    if len(members) == 2:  # a plan costs n^2 / 2 pairs: the general form's arithmetic on one value
        v = float(matrix[members[0], members[1]])
        if not math.isfinite(v):
            return float("nan")
        if aggregate == "rms":
            return math.sqrt(v * v)  # sqrt((0 + v^2) / 1)
        return v if aggregate == "max" else v + 0.0  # mean, member_sum: (0 + v) / 1 and 1 (0 + v) / 1
    vals = [float(matrix[i, j]) for a, i in enumerate(members) for j in members[a + 1 :]]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return float("nan")
    if aggregate == "max":
        return max(vals)
    # summed one after the other from 0, not by sum(): Python 3.12's sum() compensates its
    # rounding, so a study's values would differ in the last bits between Python versions,
    # and a plan's costs formed at once (loramix.grouping._union_values) from these
    total = 0.0
    for v in vals:
        total += v * v if aggregate == "rms" else v
    if aggregate == "rms":
        return math.sqrt(total / len(vals))
    if aggregate == "member_sum":
        return (len(members) - 1) * total / len(vals)
    return total / len(vals)


def compute_features(
    adapters, *, calibration=None, only: list[str] | None = None, base=None, progress: bool = False
) -> FeatureSet:
    """Compute the registered features for loaded ``adapters``.

    Data-aware features are computed only when ``calibration`` (from
    :func:`loramix.features._calibration.capture` or ``from_grams``) is given.
    ``only``: feature names to compute (unknown names are a :class:`UsageError`).
    ``base``: a base model folder; the weight-space features then read the
    effective deltas ``W_hat - W0`` of the kinds that need the base (DoRA,
    D2-LoRA; torch-loaded adapters), as :func:`loramix.overlap.similarity`
    with ``base``. None (a study's features): their residuals. ``progress``:
    the similarity's bars, as ``loramix similarity`` draws them (a plan of a
    thousand adapters spends minutes there).
    """
    from ._context import FeatureContext

    feats = registry()
    if only is not None:
        unknown = sorted(set(only) - set(feats))
        if unknown:
            raise UsageError(
                "features", f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(feats)}"
            )
        feats = {k: feats[k] for k in only}
    feats = {k: f for k, f in feats.items() if calibration is not None or not f.data_aware}
    ctx = FeatureContext(list(adapters), calibration=calibration, base=base,
                         with_per_module=any(f.per_module for f in feats.values()), progress=progress)  # fmt: skip
    out = FeatureSet(names=ctx.names)
    for f in feats.values():
        for key, m in f.compute(ctx).items():
            if key != f.name and not key.startswith(f.name + ":"):
                raise ValueError(f"feature {f.name!r} produced a matrix named {key!r}")
            if key in out.matrices:
                raise ValueError(f"matrix {key!r} produced twice")
            out.matrices[key] = np.asarray(m, dtype=np.float64)
            out.aggregate[key] = f.aggregate
            if key in f.directional:
                out.directional.add(key)
    return out
