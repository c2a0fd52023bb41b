"""LoRA whose PEFT init moved the base weight (PiSSA, OLoRA): a kind that needs the base.

PEFT's ``init_lora_weights="pissa"`` and ``"olora"`` start the factors at a
low-rank part of ``W0`` ``(out, in)`` and take it out of the base, so that the
model starts where it was::

    W_res = W0 - s B0 A0            B0: (out, r), A0: (r, in), from W0 alone
    trained model: W_res + s B A  = W0 + s (B A - B0 A0)

An adapter saved without PEFT's conversion (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``) holds the trained ``B``,
``A`` and keeps the init in its config; ``PeftModel.from_pretrained`` on the
original base runs the init again (``W_res`` from ``W0``) and loads ``B``,
``A`` over it. So the effective delta is the rank-``2r`` LoRA::

    E = s (B A - B0 A0) = Bf' Af',   Bf' = s [B, -B0] (out, 2r),   Af' = [A; A0] (2r, in)

the pair PEFT's conversion writes. ``B0 A0`` is computed as PEFT computes it
(:func:`initial_factors`), in float32, with the module's own scale ``s``
(rsLoRA, ``rank_pattern`` / ``alpha_pattern`` included):

* PiSSA: ``W0 = V S U^T`` (full SVD of the ``(out, in)`` weight),
  ``B0 = V_r sqrt(S_r / s)``, ``A0 = sqrt(S_r / s) U_r^T``, so ``s B0 A0`` is
  the top-``r`` singular part of ``W0``;
* OLoRA: ``Q R`` of the weight **as stored** (``nn.Linear``: ``(out, in)``;
  a GPT-2 ``Conv1D``: ``(in, out)``, which PEFT does not transpose),
  ``B0 A0 = Q_r R_r`` subtracted from the stored tensor (in ``(out, in)``
  layout ``(Q_r R_r)^T``) and left unscaled by ``s`` in the factors.

The residual ``s B A`` alone means nothing without ``W0`` (it holds most of
``s B0 A0``, a principal part of the base): the commands without a base refuse
such an adapter (:func:`loramix.io.peft_layout.check_base_free`), ``inspect``
lists it with that note. loramix reads these adapters; it does not train or
write them.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .base import AdapterKind, AttachTerms, layout_extra, missing_part

#: the inits this kind reproduces (``init_lora_weights``), as PEFT names them
INITS = ("pissa", "olora")


def initial_factors(init: str, W0: torch.Tensor, r: int, scale: float, fan_in_fan_out: bool):
    """``(B0, A0)``, float32 ``(out, r)`` and ``(r, in)``: the factors PEFT's
    ``init`` (``"pissa"`` or ``"olora"``) sets from the base weight, so that
    its init moved ``W0`` (``(out, in)``, any float dtype) by ``-scale B0 A0``.

    As PEFT 0.21 (``LoraLayer.pissa_init`` / ``olora_init``): the weight in
    float32; PiSSA takes the full SVD of the ``(out, in)`` weight and divides
    the top ``r`` singular values by ``scale``; OLoRA takes the QR of the
    stored tensor (``W0^T`` for ``fan_in_fan_out``) and returns its ``Q_r R_r``
    transposed back to ``(out, in)`` as ``(R_r^T, Q_r^T)``."""
    W = W0.detach().to(torch.float32)
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Sr = S[:r] / scale
        root = torch.diag(torch.sqrt(Sr))
        return V[:, :r] @ root, root @ Uh[:r]
    if init == "olora":
        Q, R = torch.linalg.qr(W.T if fan_in_fan_out else W)
        Qr, Rr = Q[:, :r], R[:r]
        return (Rr.T, Qr.T) if fan_in_fan_out else (Qr, Rr)
    raise ValueError(f"unknown init {init!r}: {' or '.join(INITS)}")


class MovedBaseKind(AdapterKind):
    id = "moved-base"
    label = "PiSSA/OLoRA"
    # PEFT writes peft_type LORA with init_lora_weights; the registry needs a type of its own.
    peft_type = "LORA_MOVED_BASE"
    parts = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos")}
    options = {}
    needs_base = True
    trainable = False  # loramix reads these adapters, it does not train them

    def scaled_factors(self, m, dtype=torch.float64, device=None):
        """The stored pair, ``s B A``: not the delta, which needs ``W0`` (:meth:`based_factors`)."""
        return m.B.to(device=device, dtype=dtype), m.A.to(device=device, dtype=dtype), float(m.scale)

    def based_factors(self, m, W0, dtype=torch.float64, device=None):
        """``(s [B, -B0], [A; A0])`` ``(out, 2r)``, ``(2r, in)``: the effective
        delta ``s (B A - B0 A0)`` as one pair, ``B0 A0`` from ``W0`` (out, in)."""
        if W0 is None:
            raise ValueError(f"{m.name}: the delta of a {self.label} module needs the base weight")
        dev = device if device is not None else W0.device
        B0, A0 = initial_factors(
            m.extra["init"], W0.to(dev), int(m.A.shape[0]), float(m.scale), m.extra["fan_in_fan_out"]
        )
        B, A = m.B.to(device=dev, dtype=dtype), m.A.to(device=dev, dtype=dtype)
        s = float(m.scale)
        return torch.cat([B, -B0.to(dtype)], dim=1) * s, torch.cat([A, A0.to(dtype)], dim=0)

    def delta(self, m, W0, dtype=torch.float64, device=None):
        """``s (B A - B0 A0)`` (out, in); ``W0`` (out, in) is required."""
        Bf, Af = self.based_factors(m, W0, dtype=dtype, device=device)
        return Bf @ Af

    def attach_terms(self, W0, weight, m, dtype):
        """``w s (B A - B0 A0)`` as the pair ``(w Bf', Af')``, rank ``2r``, in float64."""
        Bf, Af = self.based_factors(m, W0, dtype=torch.float64, device=W0.device)
        return AttachTerms(B=weight * Bf, A=Af)

    def layer(self, base, rank, alpha, *, generator=None, **options):
        raise UsageError(
            "--kind",
            "loramix reads PiSSA and OLoRA adapters but does not train them (use PEFT's init_lora_weights)",
        )

    def from_tensors(self, name, fs, config, *, scale, alpha, embedding=False):
        from ..adapter import ModuleDelta
        from ..io.peft_layout import moved_base_init

        extra = layout_extra(self, name, embedding)  # PEFT has these inits on linear layers only
        missing_part(fs, self.parts, name)
        init = moved_base_init(config)
        if init not in INITS:  # a module built by hand, or a config of another init
            raise ValueError(f"module {name}: {self.label} needs init_lora_weights {' or '.join(INITS)}")
        if init == "pissa" and not scale > 0:
            # PEFT's sqrt(S / s) is NaN for a negative scale: its reload gives NaN weights
            raise ValueError(f"module {name}: PiSSA with the scale {scale:g} (PEFT takes sqrt(S / scale))")
        return ModuleDelta(
            name=name, B=fs[("B", "pos")], A=fs[("A", "pos")], scale=scale, alpha=alpha, kind=self,
            extra={**extra, "init": init, "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))},
        )  # fmt: skip

    def tensors(self, m):
        return {"lora_A": m.A, "lora_B": m.B}

    def save(self, out_dir, modules, *, rank, alpha, **kw):
        raise UsageError(
            str(out_dir),
            "PiSSA/OLoRA deltas depend on the base weights: no LoRA adapter holds them without it",
        )


MOVED_BASE = MovedBaseKind()
