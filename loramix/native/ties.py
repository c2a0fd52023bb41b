"""TIES' fused passes (``ties.c``) for :mod:`loramix.methods.base`: the
threshold count of a block and its trim + sign election + disjoint mean.
:func:`kernels` is None where the kernels are off (:mod:`loramix.native`)."""

from __future__ import annotations

import ctypes

from . import enabled, library

#: adapters one election takes at most (the eager code takes more)
MAX_ADAPTERS = 64

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Ties:
    """Typed entry points of the built ``ties.c``, float32 and float64."""

    def __init__(self, lib):
        self._count, self._elect = {}, {}
        for suf, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
            f = getattr(lib, f"loramix_count_{suf}")
            f.argtypes, f.restype = [_P, _I64, real, real, _P, ctypes.POINTER(_I64)], _I64
            e = getattr(lib, f"loramix_elect_{suf}")
            e.argtypes, e.restype = [ctypes.c_int, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P, _I64], None
            self._count[suf], self._elect[suf] = f, e

    @staticmethod
    def _suffix(dtype) -> str:
        import numpy as np

        return {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]

    def count(self, a, lo, hi, window):
        """``(#{|a| > hi}, the |a| in [lo, hi])`` for a C-contiguous numpy
        array ``a``; ``window`` (same dtype, at least ``a.size``) holds the
        collected magnitudes, and the second result is a copy of them."""
        n = _I64(0)
        above = self._count[self._suffix(a.dtype)](
            a.ctypes.data, a.size, float(lo), float(hi), window.ctypes.data, ctypes.byref(n)
        )
        return int(above), window[: n.value].copy()

    def elect(self, blocks, lams, weights, mass: bool, by_count: bool, out) -> None:
        """``out = elect(trim(blocks))`` (``ties.c``): ``blocks`` and ``out``
        are C-contiguous tensors of one shape and dtype on the CPU; ``lams``
        the trims' ``hardshrink`` lambdas (None: not trimmed)."""
        import numpy as np

        dt = out.detach().numpy().dtype
        n = len(blocks)
        ptrs = (_P * n)(*(b.data_ptr() for b in blocks))
        lam = np.array([-1.0 if v is None else v for v in lams], dtype=dt)
        w = np.array([float(v) for v in weights], dtype=dt)
        self._elect[self._suffix(dt)](
            n, ptrs, lam.ctypes.data, w.ctypes.data, int(mass), int(by_count), out.data_ptr(), out.numel()
        )


_KERNELS: list = []


def kernels() -> Ties | None:
    """The fused TIES kernels, or None (off, or not built here)."""
    if not enabled():
        return None
    if not _KERNELS:
        lib = library("ties")
        _KERNELS.append(None if lib is None else Ties(lib))
    return _KERNELS[0]
