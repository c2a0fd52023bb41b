"""DoRA (Liu et al. 2024), as PEFT stores it (``use_dora: true``): a kind that
needs the base.

One module adapts ``W0`` ``(out, in)`` with LoRA factors and a magnitude
vector ``m`` ``(out,)``::

    dW = s B A                                   B: (out, r), A: (r, in), s as LoRA
    V  = W0 + dW,   c = m / ||V||_row            ||V||_row: (out,), the norm of each output row
    W_hat = c * V                                (row-scaled)
    effective delta = W_hat - W0 = (c - 1) W0 + c dW        depends on W0: needs_base

equal to PEFT's ``merge_and_unload`` for one adapter. A GPT-2 ``Conv1D``
(``fan_in_fan_out``) stores ``W0^T``; every caller passes ``W0`` as its
``(out, in)`` view, so ``m`` stays per output feature (PEFT's
``DoraLinearLayer`` transposes the same way).

On an embedding ``E0`` ``(vocab, dim)`` (PEFT's ``DoraEmbeddingLayer``; the
module in the weight's layout, :mod:`loramix.kinds.lora`) the magnitude is
per embedding feature, ``m`` ``(dim,)``, and the norms are those of the
columns (over the vocabulary)::

    c = m / ||E0 + dE||_col   (dim,),   E_hat = (E0 + dE) * c[None, :]
    y = E_hat[ids] = c * E0[ids] + s B[ids] @ (A * c[None, :])

Several DoRA adapters on one module add their effective deltas, each against
the same ``W0`` (``docs/adapters.md``, "DoRA"). Stored as PEFT's ``lora_A``
/ ``lora_B`` (``lora_embedding_A`` / ``_B``) / ``lora_magnitude_vector``;
loramix reads DoRA, it does not train or write it.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .base import AdapterKind, AttachTerms, is_embedding, layout_extra, missing_part


def dora_gain(W0: torch.Tensor, dW: torch.Tensor, magnitude: torch.Tensor, norm_dim: int = 1) -> torch.Tensor:
    """``c = m / ||W0 + dW||`` in ``dW``'s dtype: the norms along ``norm_dim``
    (1: of the rows, ``(out,)``; 0: of the columns, ``(in,)``, an embedding's)."""
    V = W0.to(dW.dtype) + dW
    return magnitude.to(device=dW.device, dtype=dW.dtype) / torch.linalg.vector_norm(V, dim=norm_dim)


def _norm_dim(m) -> int:
    """The axis the norms run over: 0 (columns) on an embedding, else 1 (rows)."""
    return 0 if is_embedding(m) else 1


class DoraKind(AdapterKind):
    id = "dora"
    label = "DoRA"
    # PEFT writes peft_type LORA with use_dora; the registry needs a type of its own.
    peft_type = "DORA"
    parts = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos"), "lora_magnitude_vector": ("M", "pos")}
    options = {}
    needs_base = True
    embedding = True
    trainable = False  # loramix reads DoRA, it does not train it

    def scaled_factors(self, m, dtype=torch.float64, device=None):
        return m.B.to(device=device, dtype=dtype), m.A.to(device=device, dtype=dtype), float(m.scale)

    def delta(self, m, W0, dtype=torch.float64, device=None):
        """``W_hat - W0`` (out, in); ``W0`` (out, in) is required."""
        if W0 is None:
            raise ValueError(f"{m.name}: the effective delta of a DoRA module needs the base weight")
        Bf, Af = self.factors(m, dtype=dtype, device=device)
        dW = Bf @ Af
        W0 = W0.to(device=dW.device, dtype=dtype)
        nd = _norm_dim(m)
        c = dora_gain(W0, dW, m.extra["magnitude"], nd).unsqueeze(nd)
        return (c - 1) * W0 + c * dW

    def norm_axis(self, m):
        return _norm_dim(m)

    def gains(self, m, w0_sq, v_sq):
        """``(c - 1, c)`` with ``c = m / ||W0 + dW||``, as :func:`dora_gain` (no guard: a zero norm divides)."""
        c = m.extra["magnitude"].to(device=v_sq.device, dtype=v_sq.dtype) / v_sq.sqrt()
        return c - 1, c

    def num_parameters(self, m):
        return m.A.numel() + m.B.numel() + m.extra["magnitude"].numel()

    def attach_terms(self, W0, weight, m, dtype):
        """``w ((c - 1) W0 + c dW)``: a per-output gain ``w (c - 1)`` and the pair
        ``(w c Bf, Af)`` (on an embedding ``(w Bf, Af * c)``, ``c`` per column);
        ``c`` once, in float64."""
        Bf, Af = self.factors(m, dtype=torch.float64, device=W0.device)
        nd = _norm_dim(m)
        c = dora_gain(W0.double(), Bf @ Af, m.extra["magnitude"], nd)
        if nd == 0:
            return AttachTerms(B=weight * Bf, A=Af * c.unsqueeze(0), gain=weight * (c - 1))
        return AttachTerms(B=weight * c.unsqueeze(1) * Bf, A=Af, gain=weight * (c - 1))

    def layer(self, base, rank, alpha, *, generator=None, **options):
        raise UsageError(
            "--kind", "loramix reads DoRA adapters but does not train them (use PEFT's use_dora)"
        )

    def from_tensors(self, name, fs, config, *, scale, alpha, embedding=False):
        from ..adapter import ModuleDelta

        extra = layout_extra(self, name, embedding)
        missing_part(fs, {k: v for k, v in self.parts.items() if v[0] != "M"}, name)
        from ..io.peft_layout import magnitude_problem

        B, A = fs[("B", "pos")], fs[("A", "pos")]
        # per output feature: of a linear layer's rows, of an embedding's columns (its width)
        if (why := magnitude_problem(name, fs, A.shape[1] if embedding else B.shape[0])) is not None:
            raise ValueError(why)
        mag = fs[("M", "pos")]
        return ModuleDelta(
            name=name, B=B, A=A, scale=scale, alpha=alpha, kind=self, extra={**extra, "magnitude": mag}
        )

    def tensors(self, m):
        return {"lora_A": m.A, "lora_B": m.B, "lora_magnitude_vector": m.extra["magnitude"]}

    def save(self, out_dir, modules, *, rank, alpha, **kw):
        raise UsageError(
            str(out_dir), "DoRA deltas depend on the base weights: no LoRA adapter holds a DoRA merge"
        )


DORA = DoraKind()
