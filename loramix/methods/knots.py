"""KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): a dense method applied to
the deltas written in the left singular basis of all of them side by side,
which gives an exact adapter (docs/merging.md, "Core space and KnOTS").

For one module with the adapters' factors ``Bf_i = s_i B_i`` (out, r_i) and
``A_i`` (r_i, in), ``R = sum_i r_i``::

    C = [dW_1 ... dW_N] = U S [V_1^T ... V_N^T]       (out, N in): the deltas side by side
    U (out, k): C's left singular vectors, k its numerical rank (<= R; at least 1)
    M_i = U^T dW_i = S V_i^T                          (k, in): delta i's block, scaled
    D   = method(M_1 ... M_N; w, params)              (k, in)
    merged delta = U D                                an adapter of rank k

``U`` from the factors, never forming ``C``: with ``[Bf_1 ... Bf_N] = Q_B R_B``
and ``A_i^T = Q_i R_i`` (reduced QRs), ``C = Q_B K blockdiag(Q_1^T ... Q_N^T)``
with ``K = R_B blockdiag(R_1^T ... R_N^T)`` (p, sum_i min(in, r_i)); the last
factor has orthonormal rows, so ``U = Q_B U_K`` and ``S = S_K`` for the SVD
of the small ``K``. ``U U^T dW_i = dW_i``: a sum is the same in either form.
(:class:`~loramix.methods.svd.LowRankSVD` of ``[Bf_1 ... Bf_N]`` and
``blockdiag(A_1 ... A_N)`` is the same SVD, but its QR of the whole
``(N in, R)`` block-diagonal costs ``N in R^2`` against the blocks' ``sum_i
in r_i^2``: ``N^2`` times as much for equal ranks.)
Signs fixed as :mod:`loramix.methods.core` fixes them, float64 on one torch
thread.

``knots-ties`` and ``knots-dare-ties`` are :meth:`Knots.of
<loramix.methods.core.CoreSpace.of>` ``ties`` and ``dare-ties``, with their
parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core import CoreSpace, signed_columns
from .dare import DareTies
from .svd import numerical_rank, one_torch_thread
from .ties import Ties

if TYPE_CHECKING:
    import torch


def knots_basis(factors) -> torch.Tensor:
    """``U`` (out, k) for the factor pairs ``[(Bf_i, A_i)]`` of one module: the
    left singular vectors of ``[Bf_1 A_1 ... Bf_N A_N]`` above its numerical
    rank, float64, signs as :func:`~loramix.methods.core.signed_columns` fixes them.
    At least one: deltas that are all zero (adapters saved untrained, ``B = 0``)
    give a zero block on one vector, so the adapter written has rank 1, as
    PEFT needs, not 0."""
    import torch

    Bs = torch.cat([B for B, _ in factors], dim=1)
    n_in = sum(A.shape[1] for _, A in factors)
    with one_torch_thread(Bs.device):
        QB, RB = torch.linalg.qr(Bs)  # (out, p), (p, R)
        K = RB @ torch.block_diag(*[torch.linalg.qr(A.T)[1].T for _, A in factors])
        UK, S, _ = torch.linalg.svd(K, full_matrices=False)
        k = max(1, numerical_rank(S, max(Bs.shape[0], n_in)))
        return signed_columns(QB @ UK[:, :k])


class Knots(CoreSpace):
    """A dense method (``inner``) on the blocks ``U^T dW_i``; see the module docstring."""

    prefix = "knots"
    paper = "KnOTS"

    def bases(self, pairs):
        return knots_basis(pairs), None


KnotsTies = Knots.of(Ties)
KnotsDareTies = Knots.of(DareTies)
