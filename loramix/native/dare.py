"""DARE's keep-mask (``dare.c``): the draws of ``torch.rand`` from a
generator seeded with ``seed``, compared with ``density``, without torch's
per-entry dispatch; and the drop itself, the mask applied as it is drawn. :func:`kernels` is None where the kernels are off
(:mod:`loramix.native`)."""

from __future__ import annotations

import ctypes

from . import bound


class Dare:
    """Typed entry point of the built ``dare.c``."""

    def __init__(self, lib):
        self._mask = lib.loramix_dare_mask_f32
        self._mask.argtypes = [ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
        self._mask.restype = None
        self._drop = lib.loramix_dare_drop_f32
        self._drop.argtypes = [ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
        self._drop.restype = None

    def mask(self, seed: int, density: float, out) -> None:
        """``out`` (a C-contiguous float32 CPU tensor) = ``torch.rand(out.shape,
        generator=torch.Generator().manual_seed(seed)) < density`` as 1.0 / 0.0."""
        self._mask(seed, density, out.data_ptr(), out.numel())

    def drop(self, seed: int, density: float, x) -> None:
        """``x.mul_(mask).div_(density)`` with :meth:`mask`'s mask, in place
        (``x``: a C-contiguous float32 CPU tensor), the same bits, without
        the mask in memory: one reading of ``x`` instead of three."""
        self._drop(seed, density, x.data_ptr(), x.numel())


def kernels() -> Dare | None:
    """The mask kernels, or None (off, or not built here)."""
    return bound("dare", Dare)
