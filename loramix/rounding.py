"""Narrowing float64 to a 16-bit dtype with one rounding (docs/merging.md, "Sum").

torch converts float64 to bfloat16 or float16 through float32, rounding
twice: a value just off a 16-bit tie is first rounded onto the tie, then to
even, one ulp from the correctly rounded result. Factors with ``w_i s_i``
folded in lie that close to ties often (a float16 ``B`` times
``w s = 0.7 * 3``: 2.2% of its entries, 2.5% of all float16 values).
Rounding to *odd* into float32 first (truncate, then set the
last bit where anything was cut) keeps the information that decides the
second rounding: with at least two more bits than the 16-bit format (float32
has 24, bfloat16 8, float16 11), round-to-odd then round-to-nearest-even is
the one correct rounding.
"""

from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)


def narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, rounded once to nearest even: for float64 ``x``
    and a 16-bit ``dtype`` through float32 rounded to odd, else ``x.to(dtype)``
    (already one rounding). nan, inf, signed zeros and overflow as torch's."""
    if x.dtype != torch.float64 or dtype not in HALF:
        return x.to(dtype)
    t = x.to(torch.float32)
    # truncate toward zero: where rounding to nearest went away from zero, step back
    t = torch.where(t.double().abs() > x.abs(), torch.nextafter(t, torch.zeros_like(t)), t)
    odd = (t.double() != x).to(torch.int32)  # nan != nan: a nan stays a nan
    return (t.view(torch.int32) | odd).view(torch.float32).to(dtype)


def copy_narrowed(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` rounded once: through :func:`narrow` only where a
    float64 ``src`` goes into 16 bits (elsewhere ``copy_`` converts in one
    pass, one rounding, with no temporary)."""
    if src.dtype == torch.float64 and dst.dtype in HALF:
        return dst.copy_(narrow(src, dst.dtype))
    return dst.copy_(src)
