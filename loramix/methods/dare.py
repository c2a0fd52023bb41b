"""DARE (Yu et al. 2023): drop and rescale, then linear or TIES (docs/merging.md).

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

from typing import TYPE_CHECKING

from . import register
from .base import (
    DENSITY,
    DIVIDE,
    LAMBDA,
    SEED,
    SIGN,
    MergeMethod,
    _by_rows,
    _rows,
    dare_mask,
    dense_deltas,
    elect_and_merge,
    module_seed,
)

if TYPE_CHECKING:
    import torch


def drop_and_rescale_(x: torch.Tensor, density: float, seed: int, scratch=None) -> torch.Tensor:
    """``x * m / density`` in place, ``m = dare_mask(x.shape, density, seed)``;
    with ``scratch`` (a streaming merge) the mask is drawn into a reused
    tensor and a large matrix is scaled by blocks of rows."""
    if density >= 1.0:
        return x
    import torch

    buf = (
        None
        if scratch is None
        else scratch.get("dare_mask", tuple(x.shape), torch.float32, torch.device("cpu"))
    )
    m = dare_mask(tuple(x.shape), density, seed, out=buf).to(
        device=x.device, dtype=x.dtype, non_blocking=True
    )
    if _by_rows(x, scratch):
        _rows(x, lambda r0, r1, j: x[r0:r1].mul_(m[r0:r1]).div_(density))
        return x
    return x.mul_(m).div_(density)


def _dropped(ctx, module_deltas, weights, W0, params):
    """``[w_i dW_i m_i / density]``: weighted, dropped and rescaled deltas."""
    xs = dense_deltas(ctx, module_deltas, W0, weights)
    return [
        drop_and_rescale_(x, params["density"], module_seed(params["seed"], ctx.name, i), ctx.scratch)
        for x, i in zip(xs, ctx.indices)
    ]


@register
class DareLinear(MergeMethod):
    name = "dare-linear"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "drop entries at random with probability 1-density, rescale by 1/density, weighted sum"
    params = (DENSITY, SEED, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = None
        for x in _dropped(ctx, module_deltas, weights, W0, params):
            out = x if out is None else out.add_(x)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out


@register
class DareTies(MergeMethod):
    name = "dare-ties"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "drop and rescale as dare-linear, then TIES sign election and disjoint mean"
    params = (DENSITY, SEED, SIGN, DIVIDE, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        xs = _dropped(ctx, module_deltas, weights, W0, params)
        out = elect_and_merge(xs, weights, params["sign"], params["divide"], ctx.scratch)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out
