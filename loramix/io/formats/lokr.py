"""PEFT LoKr adapters (``peft_type: LOKR``), read as LoRA.

LoKr (LyCORIS; Edalati et al. 2022, KronA) makes each module's delta a
Kronecker product. PEFT stores, per module, ``W1`` ``(a, b)`` and ``W2``
``(c, d)`` with ``a c = out`` and ``b d = in``, each either whole
(``lokr_w1``, ``lokr_w2``) or as a rank-``r`` pair (``lokr_w1_a`` ``(a, r)``
and ``lokr_w1_b`` ``(r, b)``; ``lokr_w2_a``, ``lokr_w2_b``), and applies
(``make_kron``)::

    dW = kron(W1, W2) * s          s = alpha / r

Write each side as a product ``W1 = U1 V1``, ``W2 = U2 V2``: a pair is its
own, a whole ``W`` ``(a, b)`` is ``I_a W`` or ``W I_b`` (the identity on its
shorter side, so the inner size is ``min(a, b)``). The mixed-product rule
``kron(U1, U2) kron(V1, V2) = kron(U1 V1, U2 V2)`` then gives exact factors::

    B = kron(U1, U2)     (out, k1 k2)
    A = kron(V1, V2)     (k1 k2, in)

so loramix reads a LoKr module as the LoRA module ``s B A`` of rank ``k1
k2`` (formed in float32, where PEFT's parameters live; an identity's
products are exact) and every command takes it as a LoRA. ``r`` and
``alpha`` follow ``rank_pattern`` / ``alpha_pattern`` as LoRA's do (PEFT's
rule), with ``alpha`` where LoRA has ``lora_alpha``; ``s`` uses ``r`` even
where both sides are whole, as PEFT's does. LoKr on convolutions
(``use_effective_conv2d``, ``lokr_t2``, 4-D factors) is refused.
``docs/adapters.md`` has the math.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import AdapterError
from .base import LoraReading, check_config_rank, checked_scale


def side_factors(W, U, V) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V`` the side's matrix: the pair as given, or a
    whole ``W`` ``(a, b)`` as ``(I_a, W)`` where ``a <= b``, else ``(W, I_b)``."""
    if W is None:
        return U, V
    a, b = W.shape
    eye = torch.eye(min(a, b), dtype=W.dtype)
    return (eye, W) if a <= b else (W, eye)


class PeftLokr(LoraReading):
    name = "peft-lokr"
    peft_type = "LOKR"
    label = "LoKr"
    lycoris = True
    parts = {
        "lokr_w1": ("W", "1"),
        "lokr_w1_a": ("U", "1"),
        "lokr_w1_b": ("V", "1"),
        "lokr_w2": ("W", "2"),
        "lokr_w2_a": ("U", "2"),
        "lokr_w2_b": ("V", "2"),
        "lokr_t2": ("T", "2"),  # read to be refused by name (a convolution's Tucker core)
    }
    read_as = ("PEFT LoKr, read as LoRA: B = kron(U1, U2) and A = kron(V1, V2), W1 = U1 V1 and W2 = U2 V2 (a whole "
               "W is I W or W I), so B A = kron(W1, W2); the scale alpha / r; params count B and A")  # fmt: skip

    def lora_factors(self, module: str, fs: dict, config: dict, cfg_path: Path, weights: Path) -> tuple:
        """The Kronecker factors, ``alpha / r`` and ``alpha`` (module docstring)."""
        if ("T", "2") in fs:
            raise AdapterError(weights, f"module {module}: not supported: LoKr on convolutions (lokr_t2)")
        r_cfg, alpha = self.rank_alpha(config, module)
        sides = []
        for n in ("1", "2"):
            W, U, V = (fs.get((f, n)) for f in ("W", "U", "V"))
            if (W is None) == (U is None and V is None) or (W is None and (U is None or V is None)):
                raise AdapterError(weights, f"module {module} needs lokr_w{n} or both lokr_w{n}_a and "
                                   f"lokr_w{n}_b, and holds {self._held(fs, n)}")  # fmt: skip
            if W is None:
                if U.shape[1] != V.shape[0]:
                    raise AdapterError(weights, f"module {module}: lokr_w{n}_a {tuple(U.shape)} and lokr_w{n}_b "
                                       f"{tuple(V.shape)} must be (rows, r) and (r, cols)")  # fmt: skip
                check_config_rank(module, int(U.shape[1]), r_cfg, cfg_path, weights)
            sides.append(side_factors(W, U, V))
        (U1, V1), (U2, V2) = sides
        return (
            torch.kron(U1, U2),
            torch.kron(V1, V2),
            checked_scale({}, module, alpha, r_cfg, cfg_path),
            alpha,
        )

    def _held(self, fs: dict, n: str) -> str:
        held = [p for p, k in self.parts.items() if k in fs and k[1] == n]
        return ", ".join(held) if held else "none of them"
