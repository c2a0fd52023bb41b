"""Adapter kinds: one file per kind, found here by name.

Every module of this package (other than ``base``) that defines an
:class:`~loramix.kinds.base.AdapterKind` instance registers it; a name (or
PEFT type) claimed twice is refused. Its class names it with a literal
``id = "..."``, which ``train`` reads from the file without importing it
(:func:`loramix.discovery.kind_names`: these modules import torch). :func:`get_kind` turns a name from a file
or a command line into the kind object; :func:`stack_factors` is the one place
that stacks the factors of several modules (see ``docs/adapters.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..discovery import defined_here, package_modules
from .base import AdapterKind, AttachTerms, TrainableLayer, Wrapped, is_adaptable

__all__ = [
    "AdapterKind",
    "AttachTerms",
    "TrainableLayer",
    "Wrapped",
    "is_adaptable",
    "KINDS",
    "register",
    "get_kind",
    "Stacked",
    "stack_factors",
    "LORA",
    "D2LORA",
]

KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to :data:`KINDS`; a second kind with its name or PEFT type is an error."""
    for other in KINDS.values():
        if other is not kind and (other.name == kind.name or other.peft_type == kind.peft_type):
            raise ValueError(f"adapter kind {kind.name!r} ({kind.peft_type}) is already registered")
    KINDS[kind.name] = kind
    return kind


def _discover() -> None:
    for mod in package_modules(__name__, __path__):
        for _, obj in defined_here(mod):
            if isinstance(obj, AdapterKind):
                register(obj)


def get_kind(kind: str | AdapterKind) -> AdapterKind:
    """The registered kind named ``kind`` (``"lora"``, ``"d2lora"``, ...)."""
    if isinstance(kind, AdapterKind):
        return kind
    try:
        return KINDS[str(kind)]
    except KeyError:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(sorted(KINDS))}") from None


class Stacked(NamedTuple):
    """Factors of ``n`` modules side by side: ``B`` (out, R), ``A`` (R, in),
    ``offsets`` (n + 1 column bounds, ``R = offsets[-1]``), ``scales`` (n,)."""

    B: torch.Tensor
    A: torch.Tensor
    offsets: list[int]
    scales: torch.Tensor


def stack_factors(
    modules: Sequence,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device=None,
    fold_scale: bool = True,
) -> Stacked:
    """Stack the residuals ``dW_i = s_i B_i A_i`` of modules of one shape.

    ``B = [c_1 B_1 | ... | c_n B_n]`` (out, R) and ``A = [A_1; ...; A_n]``
    (R, in), ``R = sum_i k_i``, with ``c_i = w_i s_i`` (``fold_scale``, the
    default: then ``B @ A = sum_i w_i dW_i`` and ``scales`` are ones) or
    ``c_i = w_i`` (then ``scales[i] = s_i``, to be applied to whatever the
    caller forms from the blocks, e.g. Gram products). ``weights`` default to 1.
    ``B`` is a transposed view of a contiguous ``(R, out)`` tensor, so
    ``B.T`` rows are the stacked columns. The residual only: a kind that
    ``needs_base`` adds its effective delta elsewhere.
    """
    parts = []
    for i, m in enumerate(modules):
        B, A, s = m.kind.scaled_factors(m, dtype=dtype, device=device)
        c = (float(weights[i]) if weights is not None else 1.0) * (s if fold_scale else 1.0)
        if c != 1.0:
            B = B * c
        parts.append((B, A, 1.0 if fold_scale else s))
    offsets = [0]
    for B, _, _ in parts:
        offsets.append(offsets[-1] + int(B.shape[1]))
    out_f, in_f = int(parts[0][0].shape[0]), int(parts[0][1].shape[1])
    dev = device if device is not None else parts[0][1].device
    Bt = torch.empty(offsets[-1], out_f, dtype=dtype, device=dev)
    A_cat = torch.empty(offsets[-1], in_f, dtype=dtype, device=dev)
    for k, (B, A, _) in enumerate(parts):
        Bt[offsets[k] : offsets[k + 1]].copy_(B.T)
        A_cat[offsets[k] : offsets[k + 1]].copy_(A)
    scales = torch.tensor([sc for _, _, sc in parts], dtype=torch.float64, device=dev)
    return Stacked(Bt.T, A_cat, offsets, scales)


_discover()
LORA = get_kind("lora")
D2LORA = get_kind("d2lora")
