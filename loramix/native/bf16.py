"""The streaming merge's last step for a bfloat16 weight (``bf16.c``):
``out = bf16(f32(w0) + d)`` and whether it is all finite, in one pass;
the bits of torch's widen, add and narrow. :func:`kernels` is None where
the kernels are off (:mod:`loramix.native`)."""

from __future__ import annotations

import ctypes

from . import bound

_P = ctypes.c_void_p


class Bf16:
    """Typed entry point of the built ``bf16.c``."""

    def __init__(self, lib, generic: bool = False):
        """``generic``: the portable loop even where the CPU has AVX-512 (for the tests)."""
        self._add = lib.loramix_add_bf16_generic if generic else lib.loramix_add_bf16
        self._add.argtypes, self._add.restype = [_P, _P, _P, ctypes.c_int64], ctypes.c_int

    @property
    def address(self) -> int:
        """The kernel's address, for C code that calls it (``ties.c``'s *formpass*)."""
        return ctypes.cast(self._add, ctypes.c_void_p).value

    def add(self, w0, d, out) -> bool:
        """``out = (w0.float() + d).bfloat16()`` for C-contiguous CPU tensors
        of one size (``w0``, ``out``: bfloat16, ``out`` may be ``w0``; ``d``:
        float32); True when every result is finite (else the bits of the
        NaN results are unspecified: the caller raises)."""
        return not self._add(w0.data_ptr(), d.data_ptr(), out.data_ptr(), d.numel())


def kernels() -> Bf16 | None:
    """The kernel, or None (off, or not built here)."""
    return bound("bf16", Bf16)
