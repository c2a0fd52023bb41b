"""PEFT LoHa adapters (``peft_type: LOHA``), read as LoRA of rank ``r^2``.

LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara) makes each module's delta
the elementwise product of two low-rank matrices. PEFT stores, per module,
``hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in)``, ``hada_w2_a``,
``hada_w2_b`` (the same shapes) and applies (``HadaWeight``)::

    dW = ((W1a @ W1b) * (W2a @ W2b)) * s          s = alpha / r

The Hadamard product of two rank-``r`` matrices is one matrix of rank at
most ``r^2``, with exact factors (the rows of ``B`` and the columns of ``A``
are Kronecker products, a Khatri-Rao product)::

    B[i, k r + l] = W1a[i, k] W2a[i, l]      B: (out, r^2)
    A[k r + l, j] = W1b[k, j] W2b[l, j]      A: (r^2, in)
    B @ A = (W1a @ W1b) * (W2a @ W2b)

so loramix reads a LoHa module as the LoRA module ``s B A`` (formed in
float32, where PEFT's parameters live) and every command takes it as a
LoRA. ``r`` and ``alpha`` follow ``rank_pattern`` / ``alpha_pattern`` as
LoRA's do (PEFT's rule), with ``alpha`` where LoRA has ``lora_alpha``.
LoHa on convolutions (``use_effective_conv2d``, or a 4-D factor) is
refused. ``docs/adapters.md`` has the math.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import AdapterError
from .base import LoraReading, check_config_rank, checked_scale


def khatri_rao(W1a, W1b, W2a, W2b) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = (W1a @ W1b) * (W2a @ W2b)``: ``B`` ``(out,
    r1 r2)`` the rowwise Kronecker products of ``W1a`` ``(out, r1)`` and
    ``W2a`` ``(out, r2)``, ``A`` ``(r1 r2, in)`` the columnwise ones of
    ``W1b`` ``(r1, in)`` and ``W2b`` ``(r2, in)``."""
    out, inn = W1a.shape[0], W1b.shape[1]
    B = (W1a[:, :, None] * W2a[:, None, :]).reshape(out, -1)
    A = (W1b[:, None, :] * W2b[None, :, :]).reshape(-1, inn)
    return B, A


class PeftLoha(LoraReading):
    name = "peft-loha"
    peft_type = "LOHA"
    label = "LoHa"
    lycoris = True
    parts = {
        "hada_w1_a": ("B", "pos"),
        "hada_w1_b": ("A", "pos"),
        "hada_w2_a": ("B", "neg"),
        "hada_w2_b": ("A", "neg"),
    }
    read_as = ("PEFT LoHa, read as LoRA of rank r^2: B and A are the Khatri-Rao factors of (W1a W1b) * (W2a W2b) "
               "and the scale alpha / r; params count B and A, not LoHa's four factors")  # fmt: skip

    def lora_factors(self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path) -> tuple:
        """The Khatri-Rao factors, ``alpha / r`` and ``alpha`` (module docstring)."""
        self.require_all(module, fs, weights)
        W1a, W1b, W2a, W2b = (fs[k] for k in self.parts.values())
        r = int(W1b.shape[0])
        if not (W1a.shape == W2a.shape and W1b.shape == W2b.shape and W1a.shape[1] == r):
            shapes = ", ".join(f"{p} {tuple(fs[k].shape)}" for p, k in self.parts.items())
            raise AdapterError(weights, f"module {module}: {shapes}; the a factors must be (out, r) and the b "
                               "factors (r, in), one r")  # fmt: skip
        r_cfg, alpha = self.rank_alpha(config, module)
        check_config_rank(module, r, r_cfg, cfg_path, weights)
        return (*khatri_rao(W1a, W1b, W2a, W2b), checked_scale({}, module, alpha, r, cfg_path), alpha)
