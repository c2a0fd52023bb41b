"""Overlap of the subspaces the adapters act on, weighted by the activations.

:mod:`.subspace` compares the row spaces of ``A_i`` and ``A_j`` as if every input
direction mattered alike. Here the pair's pooled calibration inputs
``X = [X_i; X_j]`` (Gram ``G = G_i + G_j``) weigh them: adapter ``k`` reads the
``r_k``-dimensional subspace ``U_k = col(X Af_k^T)`` of token space (the
directions ``A_k X^T``), and the mean squared cosine of the principal angles
between ``U_i`` and ``U_j`` is::

    K_ab = Af_a G Af_b^T                        (from S_i + S_j, r_a x r_b)
    W_k  = V_k diag(e_k)^(-1/2)                 (K_kk = V_k diag(e_k) V_k^T, e_k > 0)
    C    = W_i^T K_ij W_j                       (cosines: its singular values)
    weighted_subspace_overlap_m(i, j) = ||C||_F^2 / min(rank K_ii, rank K_jj)

(``X Af_k^T W_k`` is an orthonormal basis of ``U_k``, so ``C`` holds the
cosines). Eigenvalues below ``1e-12`` of the largest count as zero. The pair
value is the mean over the modules both adapt, leaving out one the pair's
calibration tokens never reached (``K`` zero: no subspace to compare).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import Feature, register
from .subspace import mean_over_modules

if TYPE_CHECKING:
    import torch


def whitener(K: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """``W`` with ``W^T K W = I`` on the range of the PSD ``K`` (r x rank)."""
    import torch  # here, not at import: the registry is read by commands that compute no subspace

    e, V = torch.linalg.eigh(K)
    keep = e > rtol * max(float(e.max()), 0.0) if e.numel() else e > 0
    return V[:, keep] / e[keep].sqrt()


def pair_overlap(cal, m: str, i: int, j: int) -> float:
    """``weighted_subspace_overlap_m(i, j)`` on the pooled ``G = G_i + G_j``."""

    def K(x, y):
        return cal.block(i, m, x, y) + cal.block(j, m, x, y)

    Wi, Wj = whitener(K(i, i)), whitener(K(j, j))
    k = min(Wi.shape[1], Wj.shape[1])
    return float((Wi.T @ K(i, j) @ Wj).square().sum()) / k if k else float("nan")


def _weighted(ctx):
    cal = ctx.calibration

    def one(m, owners):
        n = len(owners)
        out = np.ones((n, n))
        for a in range(n):
            for b in range(a + 1, n):
                out[a, b] = out[b, a] = pair_overlap(cal, m, owners[a], owners[b])
        return out

    return {"weighted_subspace_overlap": mean_over_modules(ctx, one)}


register(Feature(
    "weighted_subspace_overlap", _weighted, data_aware=True, aggregate="rms",
    doc="principal-angle overlap of col(X A_i^T) and col(X A_j^T) on the pair's pooled activations",
))  # fmt: skip
