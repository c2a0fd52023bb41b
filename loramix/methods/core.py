"""Core-space merging (Panariello et al., NeurIPS 2025, arXiv 2509.17786): a
dense method applied to the adapters' deltas written in the small bases their
factors span, which gives an exact adapter (docs/merging.md, "Core space and
KnOTS").

For one module with the adapters' factors ``Bf_i = s_i B_i`` (out, r_i) and
``A_i`` (r_i, in), ``R = sum_i r_i``::

    [Bf_1 ... Bf_N] = U_B S V^T          U_B (out, p), p = min(out, R): left singular vectors
    [A_1; ...; A_N] = U S' V_A^T         V_A (in, q),  q = min(in, R): right singular vectors
    M_i = U_B^T dW_i V_A = (U_B^T Bf_i)(A_i V_A)          (p, q): the core of delta i
    D   = method(M_1 ... M_N; w, params)                  (p, q): TIES, DARE, ... on the cores
    merged delta = U_B D V_A^T                            an adapter of rank min(p, q) <= R

The bases are lossless: ``U_B U_B^T Bf_i = Bf_i`` and ``A_i V_A V_A^T = A_i``,
so ``U_B M_i V_A^T = dW_i``, and a linear method (``sum``) is the same in
either space. TIES and DARE act entry by entry, so here they act on the
deltas' coordinates in these bases, ``p x q`` numbers per adapter instead of
``out x in``: the method's own trim, election and drops, at the cost of an
SVD of ``out x R`` and ``R x in`` factors. A singular vector's sign is
LAPACK's choice; it is the same for every adapter, so flipping it flips a row
(a column) of every core, and a mass election with it, but a count election
breaks a tie (as many positive as negative entries) toward ``+``, which does
not flip. So each vector's sign is fixed: its entry of largest magnitude is
positive (:func:`core_bases`), and the merge does not depend on LAPACK's.

``core-ties``, ``core-dare-ties`` and ``core-dare-linear`` are
:meth:`CoreSpace.of` ``ties``, ``dare-ties`` and ``dare-linear``, with their
parameters. LoRA-like adapters only (whatever reads as LoRA: AdaLoRA, LoHa,
LoKr): a kind whose delta depends on the base (DoRA, D2-LoRA, PiSSA saved
unconverted) spans no fixed space. The SVDs run in float64 on one torch
thread, as :class:`~loramix.methods.svd.LowRankSVD` does, so the output is
the same bytes on any thread count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register
from .base import LORA, LowRank, MergeMethod, ModuleContext
from .dare import DareLinear, DareTies
from .svd import one_torch_thread
from .ties import Ties

if TYPE_CHECKING:
    import torch


def core_bases(factors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_B, V_A^T)`` for the factor pairs ``[(Bf_i, A_i)]`` of one module:
    the left singular vectors of ``[Bf_1 ... Bf_N]`` (out, p) and the right
    singular vectors of ``[A_1; ...; A_N]`` as rows (q, in), float64; each
    vector's sign such that its entry of largest magnitude (the first such)
    is positive."""
    import torch

    P = left_singular_vectors(torch.cat([B for B, _ in factors], dim=1))
    V = left_singular_vectors(torch.cat([A for _, A in factors], dim=0).T)
    return signed_columns(P), signed_columns(V).T


def left_singular_vectors(X: torch.Tensor) -> torch.Tensor:
    """``U`` (m, min(m, n)) of ``X`` (m, n) in float64, on one torch thread (as
    :func:`~loramix.methods.svd.dense_svd`): for a tall ``X``, ``Q U_R`` from
    its reduced QR ``X = Q R`` and the SVD of the small ``R``, 1.7x faster
    than LAPACK's SVD of an 11008 x 48 ``X`` here (9.0 against 15.4 ms)."""
    import torch

    X = X.double()
    with one_torch_thread(X.device):
        if X.shape[0] <= X.shape[1]:
            return torch.linalg.svd(X, full_matrices=False)[0]
        Q, R = torch.linalg.qr(X)
        return Q @ torch.linalg.svd(R)[0]


def signed_columns(X: torch.Tensor) -> torch.Tensor:
    """The columns of ``X`` (m, n), each times the sign of its entry of
    largest magnitude (the first, where two tie): an SVD's vectors with
    their signs fixed."""
    import torch

    top = X.gather(0, X.abs().argmax(dim=0, keepdim=True))
    return X * torch.where(top < 0, -1.0, 1.0).to(X.dtype)


class CoreSpace(MergeMethod):
    """A dense method (``inner``) applied to the deltas' cores; see the module
    docstring. :meth:`of` makes and registers ``<prefix>-<inner's name>``,
    with the inner method's parameters. A subclass with other bases
    (:class:`loramix.methods.knots.Knots`) overrides :meth:`bases`."""

    inner: type[MergeMethod]
    #: the registered names' prefix, and what the summary calls the space
    prefix = "core"
    paper = "Core Space merging"
    low_rank = True
    uses_base = False
    thread_independent = True
    kinds = (LORA,)
    kinds_reason = (
        "its bases are spanned by the adapters' factors, and a delta that depends on the base "
        "weight (DoRA, D2-LoRA, PiSSA saved unconverted) has no factors that span it"
    )

    def factors(self, ctx, module_deltas, weights, params):
        import torch

        from ..adapter import ModuleDelta

        pairs = [m.factors(dtype=torch.float64, device=ctx.device) for m in module_deltas]
        UB, VAt = self.bases(pairs)
        cores = [
            ModuleDelta(name=ctx.name, B=UB.T @ B, A=A if VAt is None else A @ VAt.T, scale=1.0,
                        alpha=float(A.shape[0]), kind=LORA)
            for B, A in pairs
        ]  # fmt: skip
        # the inner method's dense way on the (p, q) cores: its seeds and the order of its sums
        # are those of the module, its scratch and deferred forms are for full-size deltas
        here = ModuleContext(ctx.name, ctx.indices, ctx.device, torch.float64)
        D = self.inner().delta(here, cores, weights, None, params)
        if VAt is None:
            B, A = UB, D
        else:  # the smaller of p and q is the written rank
            B, A = (UB, D @ VAt) if UB.shape[1] <= VAt.shape[0] else (UB @ D, VAt)
        return LowRank(B.to(ctx.dtype), A.to(ctx.dtype))

    def bases(self, pairs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(U, V^T)``: the cores are ``U^T dW_i V``; ``V^T`` None: ``U^T dW_i``."""
        return core_bases(pairs)

    @classmethod
    def of(cls, inner: type[MergeMethod]) -> type[CoreSpace]:
        """Register ``<prefix>-<name>``: ``inner`` (a dense method) in this space, with its parameters."""
        made = type(
            cls.__name__ + inner.__name__,
            (cls,),
            {
                "inner": inner,
                "name": f"{cls.prefix}-{inner.name}",
                "summary": f"{inner.name} in the bases the deltas' factors span ({cls.paper}; an exact adapter)",
                "params": inner.params,
                "__module__": cls.__module__,
            },
        )
        return register(made)

    def merged(self, ctx, module_deltas, weights, W0, params):
        # the factor pair: the engine adds it in one fused addmm, no dense delta formed
        lr = self.factors(ctx, module_deltas, weights, params)
        return (lr.B, lr.A), {}


CoreTies = CoreSpace.of(Ties)
CoreDareTies = CoreSpace.of(DareTies)
CoreDareLinear = CoreSpace.of(DareLinear)
