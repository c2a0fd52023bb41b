"""Naive summation (DESIGN.md section 3), the baseline; ``loramix sum`` is its shortcut.

    into a base:    W = W0 + sum_i w_i dW_i       (effective deltas for D2-LoRA)
    as an adapter:  B = [w_1 s_1 B_1 ... w_N s_N B_N] (out, sum r_i),  A = [A_1; ...; A_N]

The adapter form is exact (no approximation, scale 1). The arithmetic is that of
:mod:`loramix.summation` (``loramix sum``), so both write the same tensors.
"""

from __future__ import annotations

import torch

from ..adapter import D2LORA
from ..errors import UsageError
from . import register
from .base import LowRank, MergeMethod


@register
class Sum(MergeMethod):
    name = "sum"
    summary = "the weighted sum of the deltas (exact; an adapter with ranks concatenated, or into a base)"
    params = ()
    low_rank = True

    def delta(self, ctx, module_deltas, weights, W0, params):
        """LoRA terms as one matmul of the concatenated factors, in ``ctx.dtype``;
        D2-LoRA terms as ``w_i`` times the effective delta, formed in float64.
        The same operations as :func:`loramix.summation.sum_into_base`, so
        ``merge --method sum`` writes the same tensors as ``loramix sum``."""
        lora = [(m, w) for m, w in zip(module_deltas, weights) if m.kind != D2LORA]
        if lora:
            pairs = [m.factors(dtype=ctx.dtype, device=ctx.device) for m, _ in lora]
            B = torch.cat([b * w for (b, _), (_, w) in zip(pairs, lora)], dim=1)
            out = B @ torch.cat([a for _, a in pairs], dim=0)
        else:
            out = torch.zeros(module_deltas[0].shape, dtype=ctx.dtype, device=ctx.device)
        for m, w in zip(module_deltas, weights):
            if m.kind == D2LORA:
                if W0 is None:
                    raise UsageError(
                        m.name, "D2-LoRA effective deltas depend on the base weight: pass --into BASE"
                    )
                out += (w * m.delta(W0, dtype=torch.float64, device=ctx.device)).to(out.dtype)
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
