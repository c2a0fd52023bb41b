"""LoRA (Hu et al. 2021), as PEFT stores it.

One module adapts ``W0`` ``(out, in)``::

    dW = s * B @ A        B: (out, r), A: (r, in); s = alpha / r (alpha / sqrt(r) with rsLoRA)
    y  = base(x) + s * (x @ A^T) @ B^T                         x: (..., in), y: (..., out)

The delta does not depend on ``W0``. Stored as PEFT's ``lora_A`` / ``lora_B``
(``docs/adapters.md``). On an embedding ``E0`` ``(vocab, dim)`` (PEFT's
``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B`` ``(dim, r)``) the
module keeps ``B = lora_embedding_A^T`` ``(vocab, r)`` and ``A =
lora_embedding_B^T`` ``(r, dim)``: the same formula in the weight's layout,
``dE = s B A``, and a lookup adds ``s B[ids] @ A``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterKind, TrainableLayer, check_rank, kaiming_, layout_extra, missing_part


class LoraKind(AdapterKind):
    id = "lora"
    label = "LoRA"
    peft_type = "LORA"
    parts = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos")}
    options = {}
    needs_base = False
    embedding = True

    def scaled_factors(self, m, dtype=torch.float64, device=None):
        return m.B.to(device=device, dtype=dtype), m.A.to(device=device, dtype=dtype), float(m.scale)

    def layer(self, base, rank, alpha, *, generator=None, dtype=torch.float32, **options):
        return LoraLinear(base, rank, alpha, generator=generator, dtype=dtype)

    def from_tensors(self, name, fs, config, *, scale, alpha, embedding=False):
        from ..adapter import ModuleDelta

        missing_part(fs, self.parts, name)
        return ModuleDelta(
            name=name, B=fs[("B", "pos")], A=fs[("A", "pos")], scale=scale, alpha=alpha, kind=self,
            extra=layout_extra(self, name, embedding),
        )  # fmt: skip

    def tensors(self, m):
        return {"lora_A": m.A, "lora_B": m.B}

    def save(self, out_dir, modules, *, rank, alpha, fan_in_fan_out=False, **kw):
        """A PEFT LoRA folder with the real ``r`` and ``lora_alpha`` (scale not folded)."""
        from ..io.formats.peft import save_peft_adapter

        kw.pop("options", None)
        return save_peft_adapter(
            out_dir,
            {n: (m.B, m.A) for n, m in modules.items()},
            fan_in_fan_out=fan_in_fan_out,
            alphas={n: float(alpha) for n in modules},
            **kw,
        )


LORA = LoraKind()


class LoraLinear(TrainableLayer):
    """LoRA around a frozen linear projection.

    ``y = base(x) + s * (x @ A^T) @ B^T`` with ``A`` ``(r, in)``, ``B``
    ``(out, r)``, ``s = alpha / r``. ``B`` starts at zero, ``A``
    Kaiming-uniform (``a = sqrt(5)``), as PEFT does, so the adapted layer
    starts equal to ``base``. The factors are float32 unless ``dtype`` says
    otherwise; the input is cast to them and the result back.
    """

    kind = LORA

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(base)
        check_rank(rank)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))
        kaiming_(self.lora_A, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        u = x.to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return y + (u @ self.lora_B.T * self.scale).to(y.dtype)

    def residual(self) -> torch.Tensor:
        """Dense ``dW = s B A`` ``(out, in)``, float64, detached (for checks and merging)."""
        return self.scale * (self.lora_B.detach().double() @ self.lora_A.detach().double())

    def merged_weight(self) -> torch.Tensor:
        """``W0 + dW`` ``(out, in)``, float64."""
        return self.base_weight().detach().double() + self.residual()
