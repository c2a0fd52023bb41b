"""Naive summation (DESIGN.md section 3), the baseline; ``loramix sum`` is its shortcut.

    into a base:    W = W0 + sum_i w_i dW_i       (effective deltas for D2-LoRA)
    as an adapter:  B = [w_1 s_1 B_1 ... w_N s_N B_N] (out, sum r_i),  A = [A_1; ...; A_N]

The adapter form is exact (no approximation, scale 1). File outputs go
through :mod:`loramix.summation`, so ``merge --method sum`` and ``loramix sum``
write the same thing.
"""

from __future__ import annotations

import torch

from ..adapter import D2LORA
from ..errors import UsageError
from . import register
from .base import LowRank, MergeMethod, dense_deltas


@register
class Sum(MergeMethod):
    name = "sum"
    summary = "the weighted sum of the deltas (exact; an adapter with ranks concatenated, or into a base)"
    params = ()
    low_rank = True

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = None
        for t, w in zip(dense_deltas(ctx, module_deltas, W0), weights):
            out = t * w if out is None else out.add_(t, alpha=w)
        return out

    def factors(self, ctx, module_deltas, weights, params):
        Bs, As = [], []
        for m, w in zip(module_deltas, weights):
            if m.kind == D2LORA:
                raise UsageError(
                    m.name, "the sum of D2-LoRA effective deltas depends on the base: pass --into BASE"
                )
            B, A = m.factors(dtype=ctx.dtype, device=ctx.device)
            Bs.append(B * w)
            As.append(A)
        return LowRank(torch.cat(Bs, dim=1), torch.cat(As, dim=0))
