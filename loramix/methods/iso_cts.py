"""Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959): Iso-C whose least
directions of the sum are replaced by each adapter's own, from the factors;
an exact adapter (docs/merging.md, "Iso-CTS").

For one module with ``T`` adapters, ``S = sum_i w_i dW_i`` of numerical rank
``K`` (from the stacked factors, as :mod:`loramix.methods.iso` takes it)::

    s   = round((K - floor(beta K)) / T), at most floor(K / T)   each adapter's own directions
    k_c = K - T s                                                 the common subspace
    S   = U diag(sigma) V^T,  U_c = U[:, :k_c], V_c likewise      its top k_c directions
    w_i dW_i - U_c U_c^T w_i dW_i = P_i diag(rho_i) Q_i^T          each adapter's part outside U_c
    U* = [U_c  P_1[:, :s] ... P_T[:, :s]]   (out, K)   V* = [V_c  Q_1[:, :s] ...]   (in, K)
    sigma_bar = mean(sigma_1..sigma_k_c, rho_1[:s], ..., rho_T[:s])     (their RMS with --flat rms)
    merged delta = lambda sigma_bar polar(U*) polar(V*)^T                           rank <= K

``beta`` is ``--common`` (the paper's common-space fraction, default 0.8).
Iso-C gives every direction of the sum the same weight, so an adapter whose
directions the sum holds weakly (its bottom singular values) keeps them only
as the sum does; Iso-CTS keeps the sum's top ``k_c`` (what the adapters
share) and gives each adapter ``s`` slots of its own, its strongest
directions outside that common part. ``--common 1`` is Iso-C.

The paper's fractions are of ``min(out, in)``, the rank of a full
fine-tuning's delta. A sum of LoRA deltas has rank ``K <= R``; over
``min(out, in)`` the common part would hold all ``K`` directions and
LAPACK's arbitrary ones for the zero singular values (as for Iso-C), and
each adapter's part nothing but such directions. Here the fractions are of
``K``: the same merge where the sum has full rank, and of the sum's rank
otherwise. Each adapter's part is the SVD of ``(B_i - U_c (U_c^T B_i)) A_i``
(QR and a small SVD), whose rank is counted against the sum's largest
singular value: an adapter inside the common part adds nothing, where
counting against its own rounding would add arbitrary directions.
``polar`` is :func:`loramix.methods.tsv.polar`'s partial isometry.
Float64 on one torch thread.
"""

from __future__ import annotations

from . import register
from .base import LAMBDA, LORA, LowRank, MergeMethod, Param, factor_pair_merged, rank_cap
from .iso import FLAT, IsoC, flat_value
from .svd import LowRankSVD, numerical_rank, one_torch_thread
from .tsv import polar


def _fraction_check(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"{v} is outside [0, 1]: it is a fraction of the sum's rank"


COMMON = Param(
    "common",
    float,
    0.8,
    "fraction of the sum's rank kept as its top singular directions (the common subspace); the rest is "
    "shared equally among the adapters' own directions (1: iso-c)",
    check=_fraction_check,
)


def split(K: int, T: int, beta: float) -> tuple[int, int]:
    """``(k_c, s)``: the common subspace's size and each of ``T`` adapters'
    share of a sum of rank ``K`` (module docstring), ``k_c + T s = K``.
    Python's ``round`` (half to even), as the paper's code rounds."""
    s = min(round((K - int(K * beta)) / T), K // T)
    return K - T * s, s


@register
class IsoCts(MergeMethod):
    name = "iso-cts"
    summary = (
        "iso-c with the sum's least directions replaced by each adapter's own (Iso-CTS; an exact adapter)"
    )
    params = (COMMON, LAMBDA, FLAT)
    low_rank = True
    uses_base = False
    thread_independent = True  # float64 on one thread; into a base the factor pair, one fused product
    kinds = (LORA,)
    kinds_reason = (
        "Iso-CTS takes the SVDs of the sum's and each adapter's LoRA factors, and DoRA and D2-LoRA effective "
        "deltas depend on the base"
    )
    no_truncation = IsoC.no_truncation
    summarize = IsoC.summarize

    def rank_cap(self, params, adapters):
        return rank_cap(adapters, True)

    def factors(self, ctx, module_deltas, weights, params):
        import torch

        from ..kinds import stack_factors

        out, inn = module_deltas[0].shape
        size = max(out, inn)
        with one_torch_thread(ctx.device):
            st = stack_factors(module_deltas, weights, dtype=torch.float64, device=ctx.device)
            svd = LowRankSVD(st.B, st.A)
            S = svd.S.cpu()
            K = numerical_rank(S, size)
            if K == 0:  # every delta zero (adapters saved untrained): a zero rank-1 adapter, as PEFT needs
                zero = torch.zeros(out, 1, dtype=ctx.dtype, device=ctx.device)
                return LowRank(zero, zero.new_zeros(1, inn), _facts(1, 0, 0, st.B.shape[1], S, 0.0, params))
            k_c, s = split(K, len(module_deltas), params["common"])
            Uc, Vct = svd.factors(k_c)  # (out, k_c), (k_c, in); empty where k_c = 0
            Us, Vts, sigmas = [Uc], [Vct], [svd.S[:k_c]]
            if s:
                o = st.offsets
                for i in range(len(module_deltas)):  # w_i dW_i = B[:, o_i:o_i+1] A[o_i:o_i+1], as stacked
                    B, A = st.B[:, o[i] : o[i + 1]], st.A[o[i] : o[i + 1]]
                    part = LowRankSVD(B - Uc @ (Uc.T @ B), A)
                    k = min(s, numerical_rank(part.S.cpu(), size, top=float(S[0])))  # the sum's rounding
                    if k:
                        P, Qt = part.factors(k)
                        Us.append(P)
                        Vts.append(Qt)
                        sigmas.append(part.S[:k])
            sigma = torch.cat(sigmas)
            B = polar(torch.cat(Us, dim=1)) * (params["lambda_"] * flat_value(sigma, params["flat"]))
            A = polar(torch.cat(Vts, dim=0).T).T
            # ||B A||_F^2 = trace(B^T B A A^T): the partial isometries need not have rank K
            energy = float(torch.trace((B.T @ B) @ (A @ A.T)))
        return LowRank(
            B.to(ctx.dtype),
            A.to(ctx.dtype),
            _facts(B.shape[1], k_c, len(sigma) - k_c, st.B.shape[1], S, energy, params),
        )

    def merged(self, ctx, module_deltas, weights, W0, params):
        return factor_pair_merged(self, ctx, module_deltas, weights, params)

    rank_words = "each module's sum's rank: its top directions and each adapter's own"
    describe = IsoC.describe


def _facts(k: int, k_c: int, own: int, stacked: int, S, energy: float, params: dict) -> dict:
    return {"rank": int(k), "common_rank": int(k_c), "own_rank": int(own), "stacked_rank": int(stacked),
            "energy_sum": float((S.double() ** 2).sum()), "energy_merged": energy, "flat": params["flat"]}  # fmt: skip
