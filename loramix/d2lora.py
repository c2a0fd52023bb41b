"""D2-LoRA math, in one place (as loramix defines it: ``docs/d2lora.md``).

One module adapts a weight ``W0`` of shape ``(out, in)`` (``nn.Linear``
layout) with two LoRA branches of rank ``r``::

    dW    = s * (B+ @ A+ - tau * B- @ A-)        (out, in), rank 2r; s = alpha / r, tau fixed
          = Bf @ Af                               Bf = s [B+, -tau B-] (out, 2r), Af = [A+; A-] (2r, in)
    V     = W0 + dW                               (out, in)
    c     = ||W0||_n / max(||V||_n, eps)          one factor per output row (norm_dim=1, shape (out,))
                                                  or per input column (norm_dim=0, shape (in,))
    W*    = c * V                                 the projection onto the base's norms
    W_hat = W* + dW                               the merged weight
    effective delta = W_hat - W0                  what merging adds; depends on W0

While training the forward is ``y = W* x + dW x + b``, so the merged and the
unmerged forwards agree to rounding. :func:`d2_norm_scale` gives ``c`` from the
factors without forming ``dW``; :func:`d2_merged_weight` and
:func:`d2_effective_delta` are the dense forms used to merge.
"""

from __future__ import annotations

import torch

from .errors import UsageError


def d2_signed_factors(
    B_pos: torch.Tensor, A_pos: torch.Tensor, B_neg: torch.Tensor, A_neg: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed residual without its scale as one pair: ``([B+, -tau B-], [A+; A-])``.

    ``B+``, ``B-`` ``(out, r)``; ``A+``, ``A-`` ``(r, in)``; returns
    ``(out, 2r)`` and ``(2r, in)`` with ``dW / s`` their product.
    Differentiable (the training layer uses it on its parameters).
    """
    return torch.cat([B_pos, B_neg * (-tau)], dim=1), torch.cat([A_pos, A_neg], dim=0)


def d2_project(W0: torch.Tensor, dW: torch.Tensor, norm_dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``W* = (W0 + dW) * ||W0||_n / max(||W0 + dW||_n, eps)`` along ``norm_dim``.

    ``W0`` and ``dW`` are ``(out, in)``. ``norm_dim=1`` takes one norm per
    output unit (a row), as DoRA's reference code does; ``norm_dim=0`` one per
    input column.
    """
    V = W0 + dW
    target = torch.linalg.vector_norm(W0, dim=norm_dim, keepdim=True)
    current = torch.linalg.vector_norm(V, dim=norm_dim, keepdim=True).clamp_min(eps)
    return V * (target / current)


def d2_merged_weight(
    W0: torch.Tensor, dW: torch.Tensor, norm_dim: int = 1, eps: float = 1e-8
) -> torch.Tensor:
    """``W_hat = W* + dW`` (out, in)."""
    return d2_project(W0, dW, norm_dim=norm_dim, eps=eps) + dW


def d2_effective_delta(
    W0: torch.Tensor, dW: torch.Tensor, norm_dim: int = 1, eps: float = 1e-8
) -> torch.Tensor:
    """``W_hat - W0`` (out, in): what merging the module adds to ``W0``.

    Outside autograd it is computed in place on one buffer, with
    :func:`d2_merged_weight`'s operations in its order (the same bits): three
    ``(out, in)`` tensors alive instead of five, each float64 on a merge."""
    if torch.is_grad_enabled() and (W0.requires_grad or dW.requires_grad):
        return d2_merged_weight(W0, dW, norm_dim=norm_dim, eps=eps) - W0
    V = W0 + dW
    target = torch.linalg.vector_norm(W0, dim=norm_dim, keepdim=True)
    current = torch.linalg.vector_norm(V, dim=norm_dim, keepdim=True).clamp_min(eps)
    return V.mul_(target / current).add_(dW).sub_(W0)


def d2_norm_scale(
    W0: torch.Tensor,
    Bf: torch.Tensor,
    Af: torch.Tensor,
    *,
    norm_dim: int = 1,
    eps: float = 1e-8,
    w0_sq: torch.Tensor | None = None,
    w0_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c = ||W0||_n / max(||W0 + Bf Af||_n, eps)`` without forming ``Bf Af``.

    ``W0`` ``(out, in)``, ``Bf`` ``(out, k)``, ``Af`` ``(k, in)``. Returns
    ``(out,)`` for ``norm_dim=1`` (a norm per output row) or ``(in,)`` for
    ``norm_dim=0`` (per input column). ``w0_sq`` is ``||W0||_n^2`` if already
    known (the training layer caches it, with ``w0_norm = sqrt(w0_sq)``).
    Cost ``O(out * in * k)`` plus ``O((out + in) k^2)``; differentiable in
    ``Bf`` and ``Af``.

    Row case: ``||V_i||^2 = ||W0_i||^2 + 2 sum_k (W0 Af^T)_ik Bf_ik +
    sum_k (Bf G)_ik Bf_ik`` with ``G = Af Af^T``. Column case: the transpose,
    ``W0^T Bf`` and ``H = Bf^T Bf``.
    """
    if w0_sq is None:
        w0_sq = W0.double().pow(2).sum(dim=norm_dim).to(Bf.dtype)
    # A 16-bit base is multiplied in its own dtype (fp32 accumulation) rather than
    # copied to fp32 every step; fp32/fp64 bases keep full precision.
    mm = W0.dtype if W0.dtype in (torch.float16, torch.bfloat16) else Bf.dtype
    W0 = W0.to(mm)
    if norm_dim == 1:
        cross = ((Af.to(mm) @ W0.T).to(Bf.dtype).T * Bf).sum(1)  # <W0_i, dW_i>, (out,)
        own = ((Bf @ (Af @ Af.T)) * Bf).sum(1)  # ||dW_i||^2
    elif norm_dim == 0:
        cross = ((W0.T @ Bf.to(mm)).to(Bf.dtype) * Af.T).sum(1)  # <W0_:j, dW_:j>, (in,)
        own = ((Af.T @ (Bf.T @ Bf)) * Af.T).sum(1)
    else:
        raise UsageError("--norm-dim", f"norm_dim must be 0 or 1, got {norm_dim}")
    v_sq = (w0_sq + 2 * cross + own).clamp_min(eps * eps)  # sqrt(max(.,eps^2)) = max(||V||, eps)
    return (w0_sq.sqrt() if w0_norm is None else w0_norm) / v_sq.sqrt()
