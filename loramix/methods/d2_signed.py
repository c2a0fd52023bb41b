"""Signed merging of D2-LoRA adapters (docs/merging.md; way (b) of docs/d2lora.md).

For D2-LoRA adapters with signed residuals ``dW_i = s_i (B+_i A+_i - tau B-_i A-_i)``::

    R     = sum_i w_i dW_i                              (out, in), from the factors
    W*    = d2_project(W0, R) = (W0 + R) * ||W0||_n / max(||W0 + R||_n, eps)
    W     = W* + R           delta = W - W0             (project once, add the residual)

Way (a), adding the effective deltas ``sum_i w_i (W_hat_i - W0)``, is
``sum`` on the same adapters (``--into BASE``). Each module's relative
Frobenius difference between the two, ``||b - a|| / ||a||``, goes into the
report so the two ways can be compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from . import register
from .base import D2LORA, MergeMethod

if TYPE_CHECKING:
    import torch


@register
class D2Signed(MergeMethod):
    name = "d2-signed"
    summary = "D2-LoRA: sum the signed residuals, project once onto the base norms, add the summed residual"
    params = ()
    kinds = (D2LORA,)

    def check(self, params, adapters):
        # one projection for the sum: its axis and its norm's floor must be every adapter's
        dims = {m.norm_dim for ad in adapters for m in ad.modules.values()}
        if len(dims) > 1:
            raise UsageError(
                "d2-signed", f"the adapters project along different axes (norm_dim {sorted(dims)})"
            )
        eps = {m.eps for ad in adapters for m in ad.modules.values()}
        if len(eps) > 1:
            raise UsageError("d2-signed", f"the adapters' projections use different eps ({sorted(eps)})")

    def delta(self, ctx, module_deltas, weights, W0, params):
        if W0 is None:
            raise UsageError(ctx.name, "d2-signed needs the base weight: pass --into BASE")
        from ..d2lora import d2_merged_weight
        from ..kinds import stack_factors

        W0 = W0.to(device=ctx.device, dtype=ctx.dtype)
        m0 = module_deltas[0]
        st = stack_factors(module_deltas, weights, dtype=ctx.dtype, device=ctx.device)
        R = st.B @ st.A  # sum_i w_i dW_i, the signed residuals
        return d2_merged_weight(W0, R, norm_dim=m0.norm_dim, eps=m0.eps) - W0

    def merged(self, ctx, module_deltas, weights, W0, params):
        d = self.delta(ctx, module_deltas, weights, W0, params)
        return d, {"rel_diff_vs_effective_sum": self.compare_effective(ctx, module_deltas, weights, W0, d)}

    def compare_effective(self, ctx, module_deltas, weights, W0, merged: torch.Tensor) -> float:
        """``||merged - a|| / ||a||`` with ``a = sum_i w_i (W_hat_i - W0)`` (way (a))."""
        import torch

        W0 = W0.to(device=ctx.device, dtype=ctx.dtype)
        a = None
        for m, w in zip(module_deltas, weights):
            d = m.delta(W0, dtype=ctx.dtype, device=ctx.device)
            a = d * w if a is None else a.add_(d, alpha=w)
        na = float(torch.linalg.vector_norm(a))
        diff = float(torch.linalg.vector_norm(merged - a))
        return diff / na if na > 0 else diff

    def summarize(self, facts):
        diffs = [f["rel_diff_vs_effective_sum"] for f in facts.values()]
        if not diffs:
            return {}
        return {
            "rel_diff_vs_effective_sum_mean": sum(diffs) / len(diffs),
            "rel_diff_vs_effective_sum_max": max(diffs),
        }

    def describe(self, summary):
        if "rel_diff_vs_effective_sum_mean" not in summary:
            return []
        return [
            "relative difference to adding effective deltas (sum --into): "
            f"mean {summary['rel_diff_vs_effective_sum_mean']:.4g}, max {summary['rel_diff_vs_effective_sum_max']:.4g}"
        ]
