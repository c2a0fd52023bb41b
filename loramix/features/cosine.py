"""RMS and signed mean cosine of the deltas over all shared modules.

For adapters ``i, j`` and the modules ``m`` both adapt (with non-zero deltas),
``cos_m = <dW_i,m, dW_j,m>_F / (||dW_i,m|| ||dW_j,m||)`` exactly from the factors
(:func:`loramix.overlap.similarity`, no ``out x in`` matrix)::

    rms_cosine[i, j]  = sqrt(mean_m cos_m^2)        (the paper's predictor)
    mean_cosine[i, j] = mean_m cos_m                 (signed: cancellation shows)
"""

from __future__ import annotations

from . import Feature, register


def _rms(ctx):
    return {"rms_cosine": ctx.similarity.rms.to_numpy()}


def _mean(ctx):
    return {"mean_cosine": ctx.similarity.mean.to_numpy()}


register(Feature("rms_cosine", _rms, aggregate="rms", doc="RMS over shared modules of the delta cosines"))
register(
    Feature(
        "mean_cosine", _mean, aggregate="mean", doc="signed mean over shared modules of the delta cosines"
    )
)
