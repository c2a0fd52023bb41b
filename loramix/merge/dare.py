"""DARE (Yu et al. 2023): drop and rescale, then linear or TIES (DESIGN.md section 5).

For deltas ``dW_i`` (out, in)::

    m_i    ~ Bernoulli(density)  entrywise, from a generator seeded by
             module_seed(seed, module, i): reproducible, independent of the
             order modules are visited and of the device (drawn on the CPU)
    t_i    = dW_i * m_i / density
    dare-linear: merged = lambda * sum_i w_i t_i
    dare-ties:   merged = lambda * elect_and_merge(t_i, w_i)   (sign election, disjoint mean)

``density = 1`` keeps everything (no draw), as PEFT does.
"""

from __future__ import annotations

import torch

from . import register
from .base import (
    DENSITY,
    DIVIDE,
    LAMBDA,
    SEED,
    SIGN,
    MergeMethod,
    dare_mask,
    dense_deltas,
    elect_and_merge,
    module_seed,
)


def drop_and_rescale(t: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """``t * m / density`` with ``m = dare_mask(t.shape, density, seed)``."""
    if density >= 1.0:
        return t
    m = dare_mask(tuple(t.shape), density, seed).to(t.device, non_blocking=True)
    return torch.where(m, t, 0.0).div_(density)


def _dropped(ctx, module_deltas, W0, params):
    ts = dense_deltas(ctx, module_deltas, W0)
    return [
        drop_and_rescale(t, params["density"], module_seed(params["seed"], ctx.name, i))
        for t, i in zip(ts, ctx.indices)
    ]


@register
class DareLinear(MergeMethod):
    name = "dare-linear"
    summary = "drop entries at random with probability 1-density, rescale by 1/density, weighted sum"
    params = (DENSITY, SEED, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = None
        for t, w in zip(_dropped(ctx, module_deltas, W0, params), weights):
            out = t * w if out is None else out.add_(t, alpha=w)
        return out * params["lambda_"] if params["lambda_"] != 1.0 else out


@register
class DareTies(MergeMethod):
    name = "dare-ties"
    summary = "drop and rescale as dare-linear, then TIES sign election and disjoint mean"
    params = (DENSITY, SEED, SIGN, DIVIDE, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        ts = _dropped(ctx, module_deltas, W0, params)
        return elect_and_merge(ts, weights, params["sign"], params["divide"]) * params["lambda_"]
