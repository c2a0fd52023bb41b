"""RMS and signed mean cosine of the deltas over all shared modules.

For adapters ``i, j`` and the modules ``m`` both adapt (with non-zero deltas),
``cos_m = <dW_i,m, dW_j,m>_F / (||dW_i,m|| ||dW_j,m||)`` exactly from the factors
(:func:`loramix.overlap.similarity`, no ``out x in`` matrix)::

    rms_cosine[i, j]  = sqrt(mean_m cos_m^2)        (the paper's predictor)
    mean_cosine[i, j] = mean_m cos_m                 (signed: cancellation shows)

A pair that adapts no module in common (``coverage[i, j] = 0``) has no ``m``,
and gets 0 in both, not NaN: its deltas touch disjoint weights, so their inner
product over all parameters is exactly 0 (orthogonal), as ``loramix plan``
counts it without a fit (:func:`disjoint`).
"""

from __future__ import annotations

import numpy as np

from . import Feature, register


def disjoint(ctx) -> np.ndarray:
    """(N, N) bool: the pairs that adapt no module in common."""
    return ctx.similarity.coverage.to_numpy() == 0


def _rms(ctx):
    return {"rms_cosine": np.where(disjoint(ctx), 0.0, ctx.similarity.rms.to_numpy())}


def _mean(ctx):
    return {"mean_cosine": np.where(disjoint(ctx), 0.0, ctx.similarity.mean.to_numpy())}


#: the features that count a pair with no module in common as 0 (:func:`disjoint`; max_cosine reads rms_cosine's)
ZERO_WHEN_DISJOINT = ("rms_cosine", "mean_cosine", "max_cosine")

register(Feature("rms_cosine", _rms, aggregate="rms", doc="RMS over shared modules of the delta cosines"))
register(
    Feature(
        "mean_cosine", _mean, aggregate="mean", doc="signed mean over shared modules of the delta cosines"
    )
)
