"""TIES (Yadav et al. 2023) on the true per-module deltas (DESIGN.md section 5).

For deltas ``dW_i`` (out, in) with weights ``w_i``::

    t_i    = dW_i * topmask(|dW_i|, density)        trim: keep the top int(density * numel) entries
    merged = lambda * elect_and_merge(t_i, w_i)      sign election + disjoint mean

see :func:`loramix.merge.base.elect_and_merge` for the election and the two
divisor conventions (``count``: PEFT, ``weight``: mergekit).
"""

from __future__ import annotations

import torch

from . import register
from .base import DENSITY, DIVIDE, LAMBDA, SIGN, MergeMethod, dense_deltas, elect_and_merge, magnitude_mask


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    mask = magnitude_mask(t, density)
    return t if mask is None else torch.where(mask, t, 0.0)


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "trim to the top-density entries, elect a sign per entry, average the agreeing ones"
    params = (DENSITY, SIGN, DIVIDE, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        ts = [trim(t, params["density"]) for t in dense_deltas(ctx, module_deltas, W0)]
        return elect_and_merge(ts, weights, params["sign"], params["divide"]) * params["lambda_"]
