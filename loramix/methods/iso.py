"""Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959): the weighted sum with
its spectrum made flat, from the factors; an exact adapter (docs/merging.md,
"Iso-C and TSV").

For one module, with the sum's SVD from the stacked factors as
:mod:`loramix.methods.svd` computes it::

    S = sum_i w_i dW_i = U diag(sigma) V^T        k = the sum's numerical rank (<= R, at least 1)
    sigma_bar = (sigma_1 + ... + sigma_k) / k       the mean singular value
    merged delta = lambda sigma_bar U_k V_k^T       (out, in), rank k: B = lambda sigma_bar U_k, A = V_k^T

A sum is dominated by the few directions the adapters share (its top
singular values); flattening the spectrum gives every direction of the
sum the same weight, the paper's "isotropic" merge, so that no adapter's own
directions are drowned. ``U_k V_k^T`` is the polar factor of the sum, unique
whatever signs or rotations the SVD picks, so no sign needs fixing.

The paper's code takes the mean over all ``min(out, in)`` singular values of
a full fine-tuning's delta. A sum of LoRA deltas has rank ``k <= R``; the
rest are zero, and their vectors are LAPACK's arbitrary choice. Here the
mean and ``U V^T`` are over the ``k`` nonzero ones: the mean over
``min(out, in)`` would shrink ``sigma_bar`` by ``k / min(out, in)`` and add
``min(out, in) - k`` arbitrary directions at that weight. For a full-rank
sum the two agree.

The paper picks ``lambda`` on held-out data (``--lambda``, default 1). Note
that ``||merged||_F^2 = lambda^2 k sigma_bar^2 <= lambda^2 ||S||_F^2`` (the
mean is at most the root mean square): the module's facts report that ratio.
``--flat rms`` sets every singular value to their root mean square instead,
``sigma_rms = sqrt((sigma_1^2 + ... + sigma_k^2) / k)``, so that the merge
keeps the sum's Frobenius norm in every module (``||merged||_F = lambda
||S||_F``): the flat spectrum without the shrinking, no held-out data needed.
"""

from __future__ import annotations

from . import register
from .base import LAMBDA, Param, factor_pair_merged, rank_cap, ranks_text
from .svd import Svd, numerical_rank

FLAT = Param(
    "flat",
    str,
    "mean",
    "the one singular value every direction gets: mean (the paper's) or rms (the root mean square, which keeps "
    "the sum's Frobenius norm)",
    choices=("mean", "rms"),
)


def _flat_words(summary: dict) -> str:
    """How a summary's flat singular value was taken, in words."""
    return "root mean square" if summary.get("flat") == "rms" else "mean"


def flat_value(S, how: str):
    """The value a flattened spectrum ``S`` (a 1-D tensor, nonzero values) takes: its mean or its RMS."""
    return S.mean() if how == "mean" else (S * S).mean().sqrt()


@register
class IsoC(Svd):
    name = "iso-c"
    summary = "the weighted sum with its singular values set to their mean (Iso-C; an exact adapter)"
    params = (LAMBDA, FLAT)
    thread_independent = True  # float64 on one thread; into a base the factor pair, one fused product
    kinds_reason = (
        "Iso-C takes the SVD of the sum of LoRA factors, and DoRA and D2-LoRA effective deltas depend on "
        "the base"
    )

    no_truncation = (
        "its singular values are all equal, so a cut to fewer keeps an arbitrary subset of its directions "
        "(svd --rank K keeps the sum's top K)"
    )

    def check(self, params, adapters):
        pass

    def rank_cap(self, params, adapters):
        return rank_cap(adapters, True)

    def keep(self, S, params, size):
        return max(1, numerical_rank(S, size))

    def spectrum(self, S, params):
        return (params["lambda_"] * flat_value(S, params["flat"])).expand(S.shape)

    def facts(self, S, k, stacked, params):
        total = float((S.double() ** 2).sum())
        kept = params["lambda_"] ** 2 * k * float(flat_value(S[:k].double(), params["flat"])) ** 2
        return {"rank": k, "stacked_rank": stacked, "energy_sum": total, "energy_merged": kept,
                "flat": params["flat"]}  # fmt: skip

    def merged(self, ctx, module_deltas, weights, W0, params):
        return factor_pair_merged(self, ctx, module_deltas, weights, params)

    def summarize(self, facts):
        facts = {n: f for n, f in facts.items() if "energy_sum" in f}
        if not facts:
            return {}
        total = sum(f["energy_sum"] for f in facts.values())
        return {
            "ranks": sorted({f["rank"] for f in facts.values()}),
            "energy_ratio": sum(f["energy_merged"] for f in facts.values()) / total if total > 0 else 0.0,
            "flat": next(iter(facts.values())).get("flat", "mean"),
        }

    rank_words = "each module's sum's rank"  # what the summary's ranks are, in words (iso-cts has its own)

    def describe(self, summary):
        if "ranks" not in summary:
            return []
        return [
            f"rank {ranks_text(summary['ranks'])} ({self.rank_words}); singular values set to their "
            f"{_flat_words(summary)}: ||merged||^2 is {summary['energy_ratio']:.3g} of ||sum||^2"
        ]
