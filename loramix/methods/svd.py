"""The weighted sum recompressed to low rank, from the factors only (docs/merging.md).

For one module with stacked factors (R = sum of the adapters' ranks)::

    B_cat = [w_1 s_1 B_1 ... w_N s_N B_N]  (out, R)      A_cat = [A_1; ...; A_N]  (R, in)
    sum_i w_i dW_i = B_cat @ A_cat

    Q_B, R_B = qr(B_cat)           (out, R'), (R', R)     reduced QR
    Q_A, R_A = qr(A_cat^T)         (in, R''), (R'', R)
    U, S, V^T = svd(R_B @ R_A^T)   a small R' x R'' core
    B' = Q_B U[:, :k] diag(S[:k])  (out, k)      A' = V[:, :k]^T Q_A^T  (k, in)

``Q_B``, ``Q_A`` stay Householder reflectors, applied to ``U[:, :k]``, ``V[:, :k]`` only
(:class:`LowRankSVD`).

``S`` are exactly the singular values of the dense sum (``Q_B``, ``Q_A`` have
orthonormal columns), at ``O((out + in) R^2 + R^3)`` cost instead of an SVD of
an ``out x in`` matrix. ``k`` is ``--rank`` (at most the module's stacked rank)
or the smallest rank whose ``sum_{j<k} S_j^2`` (``S`` indexed from 0, as in
``S[:k]``) reaches ``--energy`` of ``sum_j S_j^2``; never more than the
sum's numerical rank (:func:`numerical_rank`: the ``S_j`` above ``S_0
max(out, in) eps``), so that no direction of rounding is written. The discarded energy
``sum_{j>=k} S_j^2`` is reported per
module (absolute, and relative to ``||sum||_F^2 = sum_j S_j^2``).

Computed in float64 on the device; written in the adapters' dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from . import register
from .base import (
    LORA,
    LowRank,
    MergeMethod,
    ModuleContext,
    Param,
    describe_energy,
    energy_info,
    rank_cap,
    summarize_energy,
)

if TYPE_CHECKING:
    import torch


class LowRankSVD:
    """The SVD of ``B @ A`` from the factors ``B`` (out, R), ``A`` (R, in),
    with leading batch dimensions allowed (``(G, out, R)``, ``(G, R, in)``)::

        B = Q_B R_B,  A^T = Q_A R_A                 Householder QR (geqrf)
        R_B R_A^T = U diag(S) V^T                    the small core's SVD
        B @ A = (Q_B U) diag(S) (Q_A V)^T

    ``S`` (``(..., n)``, ``n = min(out, in, R)``, descending) on construction;
    :meth:`factors` forms only the leading ``k`` columns of ``Q_B U`` and rows
    of ``V^T Q_A^T``, by applying the reflectors to ``U[:, :k]`` (``ormqr``)
    rather than forming ``Q_B`` and multiplying: a merge keeps ``k`` of ``R``
    directions, and on the CPU the explicit ``Q`` (``orgqr``) and its product
    cost more than the QR itself (docs/merging.md).

    On the CPU it runs on one torch thread: LAPACK's QR and SVD and the
    products round by how their threads split the work (an ``svd`` merge of
    two rank-16 SmolLM2 adapters gave 13 of 420 tensors other bits, up to
    9e-10, with ``--threads 2`` than with 1), so the factors, and every
    output and study cache entry made from them, would depend on
    ``--threads``, which no cache key holds. These factorisations are of
    ``out x R`` and ``R x R`` matrices, small beside the merge's reading and
    writing."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor):
        import torch

        self.device = B.device
        self.nB, self.nA = min(B.shape[-2], B.shape[-1]), min(A.shape[-1], A.shape[-2])
        with one_torch_thread(self.device):
            self._hB = torch.geqrf(B)  # (..., out, R) reflectors below R_B, tau (..., nB)
            self._hA = torch.geqrf(A.mT)
            RB = self._hB[0][..., : self.nB, :].triu()  # (..., nB, R)
            RA = self._hA[0][..., : self.nA, :].triu()  # (..., nA, R)
            self._U, self.S, self._Vh = torch.linalg.svd(RB @ RA.mT, full_matrices=False)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, Qt)``: ``P = Q_B U[:, :k]`` (..., out, k) and ``Qt = V[:, :k]^T
        Q_A^T`` (..., k, in), orthonormal columns and rows."""
        with one_torch_thread(self.device):
            return _apply_q(self._hB, self.nB, self._U[..., :k]), _apply_q(
                self._hA, self.nA, self._Vh[..., :k, :].mT
            ).mT


def _apply_q(h, n: int, C: torch.Tensor) -> torch.Tensor:
    """``Q[:, :n] @ C`` for the Householder QR ``h = geqrf(X)`` of an
    ``(m, R)`` ``X`` and ``C`` (..., n, k): ``Q (C; 0)``, ``m x k``."""
    import torch

    a, tau = h
    full = C.new_zeros(*C.shape[:-2], a.shape[-2], C.shape[-1])
    full[..., :n, :] = C
    return torch.ormqr(a[..., :n], tau, full)


def dense_svd(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, S, Qt)`` with ``D = P diag(S) Qt`` for a dense ``D`` (out, in) in
    float64: ``P`` (out, n), ``S`` (n,) descending, ``Qt`` (n, in),
    ``n = min(out, in)``. The truncation of a dense method's merged delta to an
    adapter (``merge -m ties --out-rank K`` / ``--energy F``,
    :func:`loramix.methods.runner.truncate`).

    On the CPU it runs on one torch thread, as :class:`LowRankSVD` does, for
    the same reason: LAPACK's SVD of ``D`` rounds by its threads' split (a
    ``ties --out-rank 8`` merge of two rank-16 adapters on a 576-wide Llama
    wrote other bytes with ``--threads 2`` than with 1), and the adapter, with
    everything evaluated from it, would depend on the thread count. Cost,
    measured on the 2-core development machine shared with other jobs (load
    5-7): one SmolLM2 module's SVD took 0.09 s (576 x 576), 0.29 s
    (1536 x 576) and 0.45-0.62 s (576 x 1536) on one thread against 0.65-1.6,
    1.0 and 1.1 s on two, and ``merge -m ties --density 0.5 --out-rank 16``
    of two rank-16 adapters on SmolLM2's 210 modules 105 s with ``--threads
    2`` against 463 s before (41-59 s with ``--threads 1``). A quiet machine
    with many cores may have run the threaded SVD faster; not measured."""
    import torch

    with one_torch_thread(D.device):
        return torch.linalg.svd(D.double(), full_matrices=False)


def one_torch_thread(device: torch.device):
    """torch on one thread in this block where ``device`` is the CPU, the
    caller's thread count given back after it (nothing changed on a GPU)."""
    import torch

    from ..devices import torch_threads

    return torch_threads(1 if torch.device(device).type == "cpu" else None)


def numerical_rank(S: torch.Tensor, size: int, top: float | None = None) -> int:
    """How many of the descending singular values ``S`` exceed
    ``S_0 * size * eps`` (float64's ``eps``; ``size = max(out, in)`` of the
    matrix): LAPACK's and ``numpy.linalg.matrix_rank``'s tolerance, below
    which a singular value is the SVD's rounding, not the matrix's. An
    adapter merged with itself has rank ``r`` of its ``2r`` stacked: the
    other ``r`` come out about ``1e-16 S_0``, with arbitrary directions.
    ``top``: the value to count against instead of ``S_0``, where ``S`` is
    of a part of a larger matrix whose rounding it carries (``iso-cts``'
    parts outside the common subspace: the sum's largest singular value)."""
    import torch

    if S.numel() == 0:
        return 0
    ref = S[0] if top is None else top  # S[0] a tensor: the tolerance in S's own dtype
    if float(ref) == 0.0:
        return 0
    return int((S > ref * size * torch.finfo(torch.float64).eps).sum())


def choose_rank(S: torch.Tensor, rank: int | None, energy: float | None, size: int | None = None) -> int:
    """``min(rank, len(S))``, or the smallest ``k`` with
    ``sum_{j<k} S_j^2 >= (energy - 1e-12) * sum_j S_j^2``; with ``size``
    (``max(out, in)``) at most :func:`numerical_rank` (at least 1)."""
    import torch

    n = int(S.numel()) if size is None else max(1, numerical_rank(S, size))
    if rank is not None:
        return max(1, min(rank, n))
    e = S.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # A relative slack of 1e-12 so that energy=1 keeps the numerically full rank,
    # not a spurious last component lost to rounding of the cumulative sum.
    k = int((cum < energy - 1e-12).sum()) + 1
    return max(1, min(k, n))


def _rank_check(v: int) -> str | None:
    return None if v >= 1 else f"{v} is below 1"


def _energy_check(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else f"{v} is outside (0, 1]: it is the fraction of the sum's energy kept"


@register
class Svd(MergeMethod):
    name = "svd"
    uses_base = False  # reads W0 only for kinds that need it
    summary = (
        "the weighted sum recompressed to rank k (or an energy fraction) from the factors: QR + small SVD"
    )
    params = (
        Param(
            "rank",
            int,
            None,
            "rank k of the result (at most the stacked rank; the sum's numerical rank where that is lower)",
            check=_rank_check,
        ),
        Param(
            "energy",
            float,
            None,
            "keep the smallest rank holding this fraction of ||sum||_F^2",
            check=_energy_check,
        ),
    )
    low_rank = True
    kinds = (LORA,)
    # DoRA was told to use d2-signed, which refuses it in turn
    kinds_reason = (
        "svd recompresses LoRA factors, and DoRA and D2-LoRA effective deltas depend on the base "
        "(merge them into it: sum --into BASE, or d2-signed for D2-LoRA)"
    )

    def check(self, params, adapters):
        if (params["rank"] is None) == (params["energy"] is None):
            raise UsageError("--rank/--energy", "method svd needs exactly one of --rank K or --energy F")
        cap, what = rank_cap(adapters, True)
        if adapters and params["rank"] is not None and params["rank"] > cap:
            raise UsageError("--rank", f"{params['rank']} is above {what}")

    def rank_cap(self, params, adapters):
        cap, what = rank_cap(adapters, True)
        k = params["rank"]
        return (k, f"svd's --rank {k}") if k is not None and k < cap else (cap, what)

    def factors(self, ctx, module_deltas, weights, params):
        return self._factors_group([(ctx, module_deltas, weights)], params)[0]

    def factors_many(self, jobs, params):
        """Batched: modules with the same shapes and the same stacked ranks
        (every layer's ``c_fc``, say) go through one batched QR and one batched
        SVD of their cores. The arithmetic is the same as :meth:`factors`;
        batching saves the launch and synchronisation latency that dominates
        these small factorisations on a GPU."""
        groups: dict[tuple, list[int]] = {}
        for j, (ctx, mds, _ws) in enumerate(jobs):
            key = (str(ctx.device), tuple((m.shape, m.rank) for m in mds))
            groups.setdefault(key, []).append(j)
        out: list[LowRank | None] = [None] * len(jobs)
        for idx in groups.values():
            for j, lr in zip(idx, self._factors_group([jobs[j] for j in idx], params)):
                out[j] = lr
        return out

    def _factors_group(self, jobs, params) -> list[LowRank]:
        import torch

        from ..kinds import stack_factors

        device = jobs[0][0].device
        stacks = [stack_factors(mds, ws, dtype=torch.float64, device=device) for _ctx, mds, ws in jobs]
        # (G, out, R) in LAPACK's column-major order, as stack_factors lays out each B
        B = torch.stack([st.B.mT for st in stacks]).mT
        A = torch.stack([st.A for st in stacks])  # (G, R, in)
        svd = LowRankSVD(B, A)
        S_cpu = svd.S.cpu()  # one synchronisation per group: ranks and energies
        size = max(int(B.shape[1]), int(A.shape[2]))
        ks = [self.keep(S_cpu[g], params, size) for g in range(len(jobs))]
        P, Ak = svd.factors(max(ks))
        return [
            LowRank(P[g, :, :k] * self.spectrum(svd.S[g, :k], params), Ak[g, :k],
                    self.facts(S_cpu[g], k, int(B.shape[2]), params))
            for g, k in enumerate(ks)
        ]  # fmt: skip

    def keep(self, S: torch.Tensor, params: dict, size: int) -> int:
        """How many of the sum's singular values ``S`` (descending, on the CPU)
        the result keeps; ``size = max(out, in)``."""
        return choose_rank(S, params["rank"], params["energy"], size)

    def spectrum(self, S: torch.Tensor, params: dict) -> torch.Tensor:
        """The singular values written for the kept ``S`` (k,): themselves."""
        return S

    def facts(self, S: torch.Tensor, k: int, stacked: int, params: dict) -> dict:
        """The module's facts for the report: the energy the cut discards."""
        return energy_info(S, k, stacked)

    def merged(self, ctx, module_deltas, weights, W0, params):
        import torch

        # The factorisation always runs in float64 (it is small); the dense
        # product is cast to the caller's dtype.
        lr = self.factors(
            ModuleContext(ctx.name, ctx.indices, ctx.device, torch.float64), module_deltas, weights, params
        )
        return (lr.B @ lr.A).to(ctx.dtype), lr.info

    def summarize(self, facts):
        return summarize_energy(facts)

    def describe(self, summary):
        return describe_energy(summary)
