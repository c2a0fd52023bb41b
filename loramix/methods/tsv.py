"""TSV-Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081): each adapter's
top singular directions, decorrelated across adapters, from the factors; an
exact adapter (docs/merging.md, "Iso-C and TSV").

For one module with ``N`` adapters, ``dW_i = w_i s_i B_i A_i``::

    dW_i = U_i diag(sigma_i) V_i^T                  from the factors (QR + a small SVD each)
    k_i  = min(rank of dW_i, floor(min(out, in) / N))   the paper keeps 1/N of each task's spectrum
    U = [U_1[:, :k_i] ... U_N]   (out, K)    V = [V_1[:, :k_i] ... V_N]   (in, K)    K = sum_i k_i
    U' = polar(U), V' = polar(V)             the nearest matrices with orthonormal columns
    merged delta = lambda U' diag(sigma_1[:k_1] ... sigma_N[:k_N]) V'^T       rank K <= R

Each adapter keeps its own singular values; only the directions move, so
that no two adapters' directions overlap (interference is the overlap of
their singular vectors). A LoRA delta has rank ``r_i``, so ``k_i = r_i``
unless ``R`` exceeds ``min(out, in)``: for adapters of ordinary rank TSV
keeps every delta whole and only decorrelates.

``polar(X) = X (X^T X)^(-1/2)``, from ``X = Q R`` and ``R = P S Z^T``:
``Q P Z^T``. The polar factor does not depend on the signs or rotations the
SVDs pick, so no sign needs fixing. Where the stacked vectors are linearly
dependent (an adapter given twice), ``X^T X`` is singular and the paper's
``P Z^T`` adds LAPACK's arbitrary directions for the zero singular values;
here ``polar`` is the partial isometry, over the numerically nonzero ones,
so an adapter given twice merges to itself. Float64 on one torch thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register
from .base import LAMBDA, LORA, LowRank, MergeMethod, factor_pair_merged, ranks_text
from .svd import LowRankSVD, numerical_rank, one_torch_thread

if TYPE_CHECKING:
    import torch


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of a tall ``X`` (m, K), ``m >= K``: ``Q P_k
    Z_k^T`` from ``X = Q R`` and the SVD ``R = P S Z^T``, cut at ``R``'s
    numerical rank ``k`` (a partial isometry where ``X`` is rank-deficient)."""
    import torch

    Q, R = torch.linalg.qr(X)
    P, S, Zt = torch.linalg.svd(R)
    k = numerical_rank(S, max(X.shape))
    return Q @ (P[:, :k] @ Zt[:k])


@register
class Tsv(MergeMethod):
    name = "tsv"
    summary = "each adapter's singular directions decorrelated, its singular values kept (TSV-Merge; an exact adapter)"
    params = (LAMBDA,)
    low_rank = True
    uses_base = False
    thread_independent = True
    kinds = (LORA,)
    kinds_reason = (
        "TSV takes the SVD of each adapter's LoRA factors, and DoRA and D2-LoRA effective deltas depend on "
        "the base"
    )

    def factors(self, ctx, module_deltas, weights, params):
        import torch

        out, inn = module_deltas[0].shape
        cut = max(1, min(out, inn) // len(module_deltas))
        Us, sigmas, Vts, total, dropped = [], [], [], 0.0, 0.0
        with one_torch_thread(ctx.device):
            for m, w in zip(module_deltas, weights):
                B, A = m.factors(dtype=torch.float64, device=ctx.device)
                svd = LowRankSVD(B * float(w), A)
                S = svd.S.cpu()
                k = min(cut, numerical_rank(S, max(out, inn)))
                total += float((S**2).sum())
                dropped += float((S[k:] ** 2).sum())
                if k:
                    U, Vt = svd.factors(k)
                    Us.append(U)
                    Vts.append(Vt)
                    sigmas.append(svd.S[:k])
            if not Us:  # every delta zero (adapters saved untrained): a zero rank-1 adapter, as PEFT needs
                zero = torch.zeros(out, 1, dtype=ctx.dtype, device=ctx.device)
                return LowRank(zero, zero.new_zeros(1, inn), self._facts(1, module_deltas, 0.0, 0.0))
            sigma = torch.cat(sigmas) * params["lambda_"]
            B = polar(torch.cat(Us, dim=1)) * sigma
            A = polar(torch.cat(Vts, dim=0).T).T
        return LowRank(
            B.to(ctx.dtype), A.to(ctx.dtype), self._facts(B.shape[1], module_deltas, total, dropped)
        )

    @staticmethod
    def _facts(k, module_deltas, total, dropped) -> dict:
        return {
            "rank": int(k),
            "stacked_rank": sum(m.rank for m in module_deltas),
            "energy_total": total,
            "energy_discarded": dropped,
            "energy_discarded_fraction": dropped / total if total > 0 else 0.0,
        }

    def merged(self, ctx, module_deltas, weights, W0, params):
        return factor_pair_merged(self, ctx, module_deltas, weights, params)

    def summarize(self, facts):
        facts = {n: f for n, f in facts.items() if "energy_total" in f}
        if not facts:
            return {}
        total = sum(f["energy_total"] for f in facts.values())
        return {
            "ranks": sorted({f["rank"] for f in facts.values()}),
            "energy_discarded_fraction": sum(f["energy_discarded"] for f in facts.values()) / total
            if total > 0
            else 0.0,
        }

    def describe(self, summary):
        if "ranks" not in summary:
            return []
        line = f"rank {ranks_text(summary['ranks'])}; each adapter's directions decorrelated"
        if summary["energy_discarded_fraction"] > 0:
            line += (
                f"; keeping min(out, in) / N directions of each discarded "
                f"{100 * summary['energy_discarded_fraction']:.3g}% of sum_i ||w_i dW_i||^2"
            )
        return [line]
