"""D2-LoRA math, as loramix defines it (DESIGN.md section 4).

    dW    = s * (B+ @ A+ - tau * B- @ A-)        s = alpha / r, tau fixed
    V     = W0 + dW                               (out, in)
    W*    = V * (||W0||_n / max(||V||_n, eps))    norm per output unit: norm_dim=1
    W_hat = W* + dW                               merged weight

While training the forward is ``y = W* x + dW x + b``, so the merged and the
unmerged forwards agree to rounding.
"""

from __future__ import annotations

import torch


def d2_project(W0: torch.Tensor, dW: torch.Tensor, norm_dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``W* = (W0 + dW) * ||W0||_n / ||W0 + dW||_n`` along ``norm_dim``.

    ``W0`` and ``dW`` are ``(out, in)``. ``norm_dim=1`` takes one norm per
    output unit (a row), as DoRA's reference code does; ``norm_dim=0`` one per
    input column. The division is guarded by ``eps``.
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
