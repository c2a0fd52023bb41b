"""Overlap of the input subspaces the adapters read, from ``A`` alone.

Module ``m``: adapter ``i``'s delta ``dW = Bf_i Af_i`` only sees the part of an
input in the row space of ``Af_i`` (r_i x in). With ``Q_i`` (in x k_i) an
orthonormal basis of that row space (the left singular vectors of ``Af_i^T``
whose singular values exceed ``1e-12`` of the largest, so ``k_i = rank Af_i``:
``r_i`` for a trained or randomly initialised ``A`` with ``r <= in``, fewer for
one with dependent rows, such as the exact sum of two adapters that share an
``A``), the cosines of the principal angles between the two subspaces are the
singular values ``sigma_k`` of ``Q_i^T Q_j`` (k_i x k_j), so their mean square is::

    overlap_m(i, j) = sum_k sigma_k^2 / min(k_i, k_j) = ||Q_i^T Q_j||_F^2 / min(k_i, k_j)

in ``[0, 1]`` (1: one subspace contains the other). ``subspace_overlap[i, j]``
is its mean over the modules both adapt. Adapters that share their initial
``A`` start at 1, whatever ``B`` learns.

Computed in numpy float64 (LAPACK's SVD, the routine torch calls on the CPU):
from the numpy reader's factors (:mod:`loramix.io.np_factors`) a predictor
that reads it needs no torch; torch tensors (a loaded ``Adapter``) are viewed
as numpy.
"""

from __future__ import annotations

import numpy as np

from . import Feature, register


def _np64(A) -> np.ndarray:
    # a loaded Adapter's factors are torch tensors (on the CPU: its reader's)
    return np.asarray(A if isinstance(A, np.ndarray) else A.detach().cpu().numpy(), dtype=np.float64)


def module_overlap(As: list) -> np.ndarray:
    """``overlap_m`` (n x n) for the ``Af`` (r_k x in, float64; numpy arrays or
    torch tensors) of one module."""
    Qs = [row_space(_np64(A)) for A in As]
    n = len(Qs)
    out = np.ones((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            k = min(Qs[a].shape[1], Qs[b].shape[1])
            out[a, b] = out[b, a] = float(np.square(Qs[a].T @ Qs[b]).sum()) / k if k else float("nan")
    return out


def row_space(A: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """An orthonormal basis (in x rank) of the row space of ``A`` (r x in): a
    reduced QR of ``A^T`` would add arbitrary directions for dependent rows."""
    U, s, _ = np.linalg.svd(A.T, full_matrices=False)
    keep = s > rtol * float(s.max()) if s.size and float(s.max()) > 0 else s > 0
    return U[:, keep]


def mean_over_modules(ctx, per_module) -> np.ndarray:
    """``N x N`` mean over shared modules of ``per_module(name, owners)`` (an
    ``len(owners)``-square array) where it is defined; NaN for pairs that share
    no module with a value. A module without one (no input reached it in the
    calibration data, so no subspace to compare) is left out, as
    :mod:`.functional` leaves it out, rather than making the pair's mean NaN."""
    total = np.zeros((ctx.n, ctx.n))
    count = np.zeros((ctx.n, ctx.n))
    for name, owners in ctx.modules().items():
        ix = np.ix_(owners, owners)
        v = per_module(name, owners)
        ok = np.isfinite(v)
        total[ix] += np.where(ok, v, 0.0)
        count[ix] += ok
    with np.errstate(divide="ignore", invalid="ignore"):
        return total / count


def _overlap(ctx):
    def one(name, owners):
        return module_overlap([ctx.adapters[k].modules[name].factors()[1] for k in owners])

    return {"subspace_overlap": mean_over_modules(ctx, one)}


register(
    Feature(
        "subspace_overlap",
        _overlap,
        aggregate="rms",
        doc="mean squared cosine of principal angles of A's row spaces",
    )
)
