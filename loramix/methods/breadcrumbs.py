"""Model Breadcrumbs (Davari & Belilovsky 2023), mergekit's ``breadcrumbs``
(``magnitude_outliers`` sparsification, no sign consensus, no rescaling;
docs/merging.md). For each delta ``dW_i`` with ``n`` entries::

    order  = the entries sorted by |dW_i|, ascending
    n_keep = int(density * n),  n_top = int(gamma * n),  n_bot = max(0, n - n_keep - n_top)
    keep_i = the entries at positions [n_bot, n_bot + n_keep) of that order
    merged = lambda * sum_i w_i * dW_i * keep_i

so the ``gamma`` fraction of largest magnitudes (outliers) and the smallest
are dropped, ``n_keep`` entries kept (fewer outliers dropped when ``density +
gamma > 1``).
"""

from __future__ import annotations

from . import register
from .base import DENSITY, LAMBDA, MergeMethod, Param, iter_dense_deltas, kth_largest
from .params import in_unit_interval

GAMMA = Param(
    "gamma",
    float,
    0.01,
    "fraction of each delta's largest-magnitude entries dropped, in [0, 1)",
    check=in_unit_interval,
)


def breadcrumbs_(x, density: float, gamma: float):
    """Keep ``int(density * n)`` entries of ``x`` after the ``int(gamma * n)``
    largest magnitudes, zero the rest, in place; returns ``x``.

    The kept entries are positions ``[n_bot, n_bot + n_keep)`` of the stable
    ascending order of ``|x|`` (ties in index order, as mergekit's sort), found
    without sorting: ``lo`` and ``hi``, the magnitudes at the two ends, come
    from :func:`kth_largest`; entries strictly between are kept, and of the
    entries equal to an end value ``v`` (``below_v`` entries lie under it) those
    whose rank among the ties, in index order, is in
    ``[n_bot - below_v, n_bot + n_keep - below_v)``.
    """
    if density >= 1.0:
        return x

    n = x.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    if n_keep == 0:
        return x.zero_()
    a = x.abs().reshape(-1).contiguous()
    lo = kth_largest(a, n - n_bot)
    hi = kth_largest(a, n - n_bot - n_keep + 1)
    keep = (a > lo) & (a < hi)
    for v in {float(lo), float(hi)}:
        tied = (a == v).nonzero().squeeze(1)  # the ties, in index order
        below = int((a < v).sum())
        keep[tied[max(0, n_bot - below) : max(0, n_bot + n_keep - below)]] = True
    return x.mul_(keep.reshape(x.shape).to(x.dtype))


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    uses_base = False  # reads W0 only for kinds that need it
    summary = "drop the largest (gamma) and the smallest magnitudes, keep density, weighted sum"
    params = (DENSITY, GAMMA, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = None
        for x in iter_dense_deltas(ctx, module_deltas, W0, weights, reuse=True):
            x = breadcrumbs_(x, params["density"], params["gamma"])
            out = x if out is None else out.add_(x)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out
