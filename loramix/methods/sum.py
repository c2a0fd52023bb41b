"""Naive summation, the baseline (docs/merging.md, "Sum"); ``loramix sum`` is its shortcut.

    into a base:    W = W0 + sum_i w_i dW_i       (effective deltas for D2-LoRA)
    as an adapter:  B = [w_1 s_1 B_1 ... w_N s_N B_N] (out, sum r_i),  A = [A_1; ...; A_N]

The adapter form is exact (no approximation, scale 1). :func:`sum_into_base`
and :func:`sum_adapters` are this method through :func:`loramix.methods.merge`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import merge, register
from .base import D2LORA, LowRank, MergeMethod

if TYPE_CHECKING:
    import torch


def _lora_factors(module_deltas, weights, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA terms as one factor pair: ``B = [w_i s_i B_i ...]`` (out, R),
    ``A = [A_i; ...]`` (R, in), so ``B @ A = sum_i w_i s_i B_i A_i``; None
    when there is no LoRA term."""
    import torch

    pairs = [
        (m.factors(dtype=dtype, device=device), w) for m, w in zip(module_deltas, weights) if m.kind != D2LORA
    ]
    if not pairs:
        return None
    return torch.cat([B * w for (B, _), w in pairs], dim=1), torch.cat([A for (_, A), _ in pairs], dim=0)


@register
class Sum(MergeMethod):
    name = "sum"
    summary = "the weighted sum of the deltas (exact; an adapter with ranks concatenated, or into a base)"
    params = ()
    low_rank = True
    attachable = True

    def delta(self, ctx, module_deltas, weights, W0, params):
        """LoRA terms as one matmul of the concatenated factors, in ``ctx.dtype``;
        D2-LoRA terms as ``w_i`` times the effective delta, formed in float64."""
        import torch

        pair = _lora_factors(module_deltas, weights, ctx.dtype, ctx.device)
        if pair is not None:
            out = pair[0] @ pair[1]
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

    def merged(self, ctx, module_deltas, weights, W0, params):
        # LoRA only: the factor pair, which the engine adds in one fused addmm
        # without forming the dense delta.
        if all(m.kind != D2LORA for m in module_deltas):
            return _lora_factors(module_deltas, weights, ctx.dtype, ctx.device), {}
        return self.delta(ctx, module_deltas, weights, W0, params), {}

    def factors(self, ctx, module_deltas, weights, params):
        for m in module_deltas:
            if m.kind == D2LORA:
                raise UsageError(
                    m.name, "the sum of D2-LoRA effective deltas depends on the base: pass --into BASE"
                )
        return LowRank(*_lora_factors(module_deltas, weights, ctx.dtype, ctx.device))


def _as_list(adapters_or_paths) -> list:
    from ..adapter import Adapter

    if isinstance(adapters_or_paths, (str, os.PathLike, Adapter)):
        return [adapters_or_paths]
    return list(adapters_or_paths)


def sum_into_base(
    adapters_or_paths,
    base,
    out,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    force: bool = False,
    progress: bool = True,
):
    """``W = W0 + sum_i w_i dW_i`` for every adapted weight, written as a model
    folder: ``merge(..., "sum", into=base)``. Returns what the engine wrote
    (a :class:`loramix.engine.StreamResult`)."""
    res = merge(_as_list(adapters_or_paths), "sum", weights=weights, into=base, out=out,
                device=device, dtype=dtype, force=force, progress=progress)  # fmt: skip
    return res.stream


def sum_adapters(
    adapters_or_paths,
    out,
    weights: Sequence[float] | None = None,
    force: bool = False,
    base=None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the exact sum ``sum_i w_i dW_i`` as one PEFT LoRA adapter folder:
    ``merge(..., "sum")`` without a base. Per module ``B = [w_1 s_1 B_1 ...]``
    (out, R), ``A = [A_1; ...]`` (R, in), scale 1. D2-LoRA adapters are
    refused (their effective delta depends on ``W0``). ``base`` (optional)
    checks that every module exists in it with a fitting shape."""
    ads = _as_list(adapters_or_paths)
    if base is not None:
        from ..adapter import Adapter
        from ..engine import resolve_targets
        from ..io.adapter_files import load_adapter
        from ..io.model_folder import BaseModelFolder

        ads = [a if isinstance(a, Adapter) else load_adapter(a) for a in ads]
        modules = list(dict.fromkeys(n for ad in ads for n in ad.modules))
        resolve_targets(base if isinstance(base, BaseModelFolder) else BaseModelFolder(base), modules, ads)
    return merge(ads, "sum", weights=weights, out=out, dtype=dtype, device="cpu", force=force).out
