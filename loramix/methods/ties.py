"""TIES (Yadav et al. 2023) on the true per-module deltas (docs/merging.md).

For deltas ``dW_i`` (out, in) with weights ``w_i``::

    t_i    = dW_i * topmask(|dW_i|, density)        trim: keep the top k = int(density * numel) entries
                                                     (and any tied with the k-th: trim_)
    merged = lambda * elect_and_merge(t_i, w_i)      sign election + disjoint mean

see :func:`loramix.methods.base.elect_and_merge` for the election and the two
divisor conventions (``count``: PEFT, ``weight``: mergekit), and
:func:`~loramix.methods.base.trim_and_elect` for how both run in a streaming merge
(:func:`~loramix.methods.base.ties_from_factors` for LoRA-like deltas there: from
their factors, block by block, never whole).
"""

from __future__ import annotations

import dataclasses
import functools

from . import register
from .base import (
    DENSITY,
    DIVIDE,
    LAMBDA,
    SIGN,
    MergeMethod,
    OnePassTies,
    dense_deltas,
    ties_from_factors,
    trim_and_elect,
)


@register
class Ties(MergeMethod):
    name = "ties"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "trim to the top-density entries, elect a sign per entry, average the agreeing ones"
    params = (DENSITY, SIGN, DIVIDE, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        how = (params["density"], params["sign"], params["divide"])
        later = None
        if ctx.deferred and params["lambda_"] == 1.0:
            # the one pass may run as the engine adds: each tile of the election added to W0 in the cache
            formed = dataclasses.replace(ctx, deferred=False)
            later = functools.partial(self.delta, formed, module_deltas, weights, W0, params)
        out = ties_from_factors(ctx, module_deltas, weights, *how, deferred=later)  # None: the dense way
        if isinstance(out, OnePassTies):
            return out
        if out is None:
            out = trim_and_elect(dense_deltas(ctx, module_deltas, W0, weights), weights, *how, ctx.scratch)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out
