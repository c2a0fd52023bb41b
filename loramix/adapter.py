"""The in-memory adapter model that every part of loramix shares.

An adapter is a set of modules. Each module adapts one weight ``W0`` of shape
``out x in`` (``nn.Linear`` layout; a GPT-2 ``Conv1D`` stores ``in x out``, but
the factors below are the same, only the base tensor is transposed).

LoRA module::

    dW = s * B @ A                       B: (out, r), A: (r, in), s = alpha / r
                                         (alpha / sqrt(r) with rsLoRA)

D2-LoRA module (DESIGN.md section 4)::

    dW = s * (B @ A - tau * B_neg @ A_neg)          a rank-2r signed residual
    V  = W0 + dW
    W* = V * (||W0||_n / ||V||_n)                   norm per output unit (norm_dim=1)
    W_hat = W* + dW                                  the merged weight
    effective delta = W_hat - W0                     depends on W0

Factors are kept as stored (fp32/fp16/bf16); nothing forms ``B @ A`` unless a
caller asks for a dense delta, one module at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io.peft_layout import check_compatible  # noqa: F401  (torch-free, used by the numpy similarity)

LORA = "lora"
D2LORA = "d2lora"


@dataclass
class ModuleDelta:
    """Low-rank factors of one adapted weight (see the module docstring).

    ``name`` is the module path inside the base model, as PEFT sees it (no
    ``base_model.model.`` prefix, no ``.weight`` suffix), e.g.
    ``transformer.h.0.attn.c_attn`` or ``model.layers.3.self_attn.q_proj``.
    """

    name: str
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    scale: float
    alpha: float
    # D2-LoRA only: the negative branch, its weight and the projection axis.
    B_neg: torch.Tensor | None = None  # (out, r)
    A_neg: torch.Tensor | None = None  # (r, in)
    tau: float = 0.0
    norm_dim: int = 1
    eps: float = 1e-8

    @property
    def kind(self) -> str:
        return D2LORA if self.B_neg is not None else LORA

    @property
    def rank(self) -> int:
        """Rank of one branch (``r``); the D2 residual has rank ``2r``."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta, in ``nn.Linear`` layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def num_parameters(self) -> int:
        n = self.A.numel() + self.B.numel()
        if self.B_neg is not None:
            n += self.A_neg.numel() + self.B_neg.numel()
        return n

    def factors(self, dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed residual as one factor pair, scale folded into ``B``.

        Returns ``(Bf, Af)`` with ``dW = Bf @ Af``. LoRA: ``Bf = s B`` (out, r),
        ``Af = A`` (r, in). D2: ``Bf = s [B, -tau B_neg]`` (out, 2r),
        ``Af = [A; A_neg]`` (2r, in).
        """
        B = self.B.to(device=device, dtype=dtype)
        A = self.A.to(device=device, dtype=dtype)
        if self.B_neg is not None:
            B = torch.cat([B, -self.tau * self.B_neg.to(device=device, dtype=dtype)], dim=1)
            A = torch.cat([A, self.A_neg.to(device=device, dtype=dtype)], dim=0)
        return B * self.scale, A

    def residual(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Dense ``dW`` (out, in): the LoRA delta, or the D2 signed residual."""
        B, A = self.factors(dtype=dtype, device=device)
        return B @ A

    def delta(
        self, W0: torch.Tensor | None = None, dtype: torch.dtype = torch.float64, device=None
    ) -> torch.Tensor:
        """Dense effective delta (out, in): what merging adds to ``W0``.

        LoRA: ``s B A`` (``W0`` unused). D2: ``W_hat - W0``, which needs ``W0``
        in ``(out, in)`` layout.
        """
        dW = self.residual(dtype=dtype, device=device)
        if self.kind == LORA:
            return dW
        if W0 is None:
            raise ValueError(f"{self.name}: the effective delta of a D2-LoRA module needs the base weight")
        from .d2lora import d2_merged_weight

        W0 = W0.to(device=dW.device, dtype=dtype)
        return d2_merged_weight(W0, dW, norm_dim=self.norm_dim, eps=self.eps) - W0

    def squared_norm(self) -> float:
        """``||dW||_F^2`` of the residual from the factors, in float64:
        ``sum((Bf^T Bf) * (Af Af^T))``, cost O(r^2 (out + in))."""
        B, A = self.factors()
        return float(((B.T @ B) * (A @ A.T)).sum())

    def norm(self) -> float:
        return math.sqrt(max(self.squared_norm(), 0.0))


@dataclass
class Adapter:
    """A loaded adapter: modules plus where it came from.

    ``modules`` maps module name to :class:`ModuleDelta`, in file order.
    ``config`` is the adapter's raw ``adapter_config.json``.
    """

    name: str
    method: str  # LORA or D2LORA
    modules: dict[str, ModuleDelta]
    config: dict = field(default_factory=dict)
    path: Path | None = None  # the folder, or the .safetensors file given
    weights_path: Path | None = None
    sha256: str | None = None

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules.values())

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "path": None if self.path is None else str(self.path),
            "sha256": self.sha256,
            "method": self.method,
        }
