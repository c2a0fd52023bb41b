"""Ratio of the adapters' total delta norms.

``T_i = sqrt(sum_m ||dW_i,m||_F^2)`` over all modules of adapter ``i``, exactly
from the factors (``||B A||_F^2 = sum((B^T B) * (A A^T))``)::

    norm_ratio[i, j] = max(T_i, T_j) / min(T_i, T_j)        (>= 1)

A large ratio means one adapter dominates a sum. NaN where either is zero.
"""

from __future__ import annotations

import numpy as np

from . import Feature, register


def total_norms(ctx) -> np.ndarray:
    """``T_i`` (N,): the root of the summed squared module norms."""
    norms = ctx.similarity.norms.to_numpy()
    return np.sqrt(np.nansum(norms**2, axis=1))


def _ratio(ctx):
    t = total_norms(ctx)
    hi, lo = np.maximum.outer(t, t), np.minimum.outer(t, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"norm_ratio": np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.nan)}


register(Feature("norm_ratio", _ratio, aggregate="rms", doc="max/min of the total delta norms"))
