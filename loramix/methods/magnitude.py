"""Magnitude pruning, then a weighted sum (docs/merging.md)::

    merged = lambda * sum_i w_i * dW_i * topmask(|dW_i|, density)

``topmask`` keeps the top ``int(density * numel)`` entries of each delta, as
PEFT's ``magnitude_prune`` does.
"""

from __future__ import annotations

from . import register
from .base import DENSITY, LAMBDA, MergeMethod, iter_dense_deltas, trim_


@register
class Magnitude(MergeMethod):
    name = "magnitude"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "keep the top-density entries of each delta by magnitude, then the weighted sum"
    params = (DENSITY, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = None
        for x in iter_dense_deltas(ctx, module_deltas, W0, weights, reuse=True):
            x = trim_(x, params["density"], ctx.scratch)
            out = x if out is None else out.add_(x)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out
