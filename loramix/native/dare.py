"""DARE's keep-mask (``dare.c``): the draws of ``torch.rand`` from a
generator seeded with ``seed``, compared with ``density``, without torch's
per-entry dispatch; the drop itself, the mask applied as it is drawn; and
the generator's state at any draw (its twists alone), so that a delta's
blocks can be dropped apart, in any order. DELLA's keep draws from the
same generator, each entry's probability by its rank in its row.
:func:`kernels` is None where the kernels are off (:mod:`loramix.native`)."""

from __future__ import annotations

import ctypes

from . import bound


class Dare:
    """Typed entry point of the built ``dare.c``."""

    def __init__(self, lib):
        u64, f32, i32, i64, ptr = (
            ctypes.c_uint64,
            ctypes.c_float,
            ctypes.c_int32,
            ctypes.c_int64,
            ctypes.c_void_p,
        )
        self._mask = _entry(lib, "loramix_dare_mask_f32", u64, f32, ptr, i64)
        self._drop = _entry(lib, "loramix_dare_drop_f32", u64, f32, ptr, i64)
        self._states = _entry(lib, "loramix_dare_states", u64, ptr, i64, ptr, ptr)
        self._drop_from = _entry(lib, "loramix_dare_drop_from", ptr, i32, f32, ptr, i64)
        self._della = _entry(
            lib, "loramix_della_keep_from", ptr, i32, ptr, ptr, i64, i64, ptr, ptr, ptr, result=i64
        )
        self._della_apply = _entry(lib, "loramix_della_apply", ptr, ptr, i64, i64, f32, ctypes.c_int)
        self._torch_ranks = _entry(lib, "loramix_della_torch_ranks", ptr, i64, ptr, result=i64)
        self._sorts_as_torch: bool | None = None

    def mask(self, seed: int, density: float, out) -> None:
        """``out`` (a C-contiguous float32 CPU tensor) = ``torch.rand(out.shape,
        generator=torch.Generator().manual_seed(seed)) < density`` as 1.0 / 0.0."""
        self._mask(seed, density, out.data_ptr(), out.numel())

    def drop(self, seed: int, density: float, x) -> None:
        """``x.mul_(mask).div_(density)`` with :meth:`mask`'s mask, in place
        (``x``: a C-contiguous float32 CPU tensor), the same bits, without
        the mask in memory: one reading of ``x`` instead of three."""
        self._drop(seed, density, x.data_ptr(), x.numel())

    def states(self, seed: int, at):
        """``(words, index)``: the generator of :meth:`mask` where its draw
        ``at[k]`` is next (``at`` increasing), for :meth:`drop_from`: numpy
        ``(len(at), 624)`` uint32 and ``(len(at),)`` int32. Only the twists
        run, about a third of a draw's cost."""
        import numpy as np

        at = np.ascontiguousarray(at, dtype=np.int64)
        words, index = np.empty((at.size, 624), dtype=np.uint32), np.empty(at.size, dtype=np.int32)
        self._states(seed, at.ctypes.data, at.size, words.ctypes.data, index.ctypes.data)
        return words, index

    def drop_from(self, states, k: int, density: float, x) -> None:
        """:meth:`drop` of ``x`` (C-contiguous float32) with the mask's draws
        from state ``k`` of :meth:`states`' ``states`` on: a block of a
        delta dropped as the whole delta's drop would drop those entries."""
        words, index = states
        self._drop_from(words[k].ctypes.data, int(index[k]), density, x.data_ptr(), x.numel())

    def della_keep_from(self, states, k: int, table, x, before=None, after=None, bits=None) -> int:
        """DELLA's keep of the rows of ``x`` (a C-contiguous float32 CPU block
        ``(rows, n)`` of a delta, in place): ``x *= bernoulli(p)`` with ``p``
        each entry's ``table[rank]`` (``table``: n float32 probabilities,
        ``rank``: its place in torch's argsort of its row's magnitudes), the
        draws from state ``k`` of :meth:`states` on, as torch draws them.
        ``before``, ``after`` (optional float32 numpy arrays of ``rows``):
        each row's ``np.add.reduce(np.abs(row))`` before and after the keep,
        the same bits. ``bits`` (optional, a C-contiguous uint8 numpy array
        ``(rows, (n + 7) // 8)``): the keep, bit ``c % 8`` of byte ``c // 8``
        of row ``r`` set where entry ``(r, c)`` is kept, for
        :meth:`della_apply`. Returns how many rows were ranked by
        std::sort's own steps (those where the order of equal magnitudes
        changes a keep; ``dare.c``)."""
        words, index = states
        rows, n = x.shape
        for a in (before, after):  # the kernel writes rows floats there
            if a is not None and not (
                a.dtype.name == "float32" and a.shape == (rows,) and a.flags.c_contiguous
            ):
                raise ValueError(f"DELLA's keep: row sums need a contiguous float32 array of {rows}")
        _check_bits(bits, rows, n)
        sums = [None if a is None else a.ctypes.data for a in (before, after, bits)]
        again = self._della(
            words[k].ctypes.data, int(index[k]), table.data_ptr(), x.data_ptr(), rows, n, *sums
        )
        if again < 0:
            raise MemoryError(f"DELLA's keep: no work memory for a row of {n} entries")
        return again

    def della_apply(self, bits, x, scale: float | None) -> None:
        """``x = x * keep`` by the keep :meth:`della_keep_from` wrote in
        ``bits`` for the same entries, then ``x * float32(scale)`` unless
        ``scale`` is None, in place (``x``: a C-contiguous float32 CPU block
        ``(rows, n)``): the bits of that keep and torch's ``x.mul_(scale)``
        after it."""
        rows, n = x.shape
        _check_bits(bits, rows, n)
        self._della_apply(
            bits.ctypes.data, x.data_ptr(), rows, n, 1.0 if scale is None else scale, scale is not None
        )

    def sorts_as_torch(self) -> bool:
        """Whether ``dare.c``'s ranks by std::sort's steps are those of this
        torch's argsort, on rows whose many equal magnitudes its introsort
        orders its own way (checked once: about a millisecond). They are
        libstdc++'s algorithm; a torch built with another C++ library
        would sort equal magnitudes otherwise, and DELLA then takes torch's
        own way."""
        if self._sorts_as_torch is None:
            import torch

            g = torch.Generator().manual_seed(0)
            probe = [
                torch.randint(-k, k + 1, (n,), generator=g).float() for k, n in ((1, 17), (3, 700), (8, 4096))
            ]
            probe.append(torch.zeros(300))
            same = True
            for x in probe:
                want = torch.empty(x.numel(), dtype=torch.int32)
                want[x.abs().view(torch.int32).argsort()] = torch.arange(x.numel(), dtype=torch.int32)
                got = torch.empty_like(want)
                if self._torch_ranks(x.data_ptr(), x.numel(), got.data_ptr()) < 0:
                    raise MemoryError("DELLA's keep: no work memory for its sort check")
                same = same and torch.equal(got, want)
            self._sorts_as_torch = same
        return self._sorts_as_torch


def _entry(lib, name: str, *argtypes, result=None):
    """``lib``'s function ``name``, typed: those arguments, ``result`` (none by default)."""
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), result
    return fn


def kernels() -> Dare | None:
    """The mask kernels, or None (off, or not built here)."""
    return bound("dare", Dare)


def _check_bits(bits, rows: int, n: int) -> None:
    """A keep's bits must be a C-contiguous uint8 ``(rows, (n + 7) // 8)``
    array: the kernels read and write that many bytes."""
    if bits is not None and not (
        bits.dtype.name == "uint8" and bits.shape == (rows, (n + 7) // 8) and bits.flags.c_contiguous
    ):
        raise ValueError(f"DELLA's keep: its bits need a contiguous uint8 array of {rows} x {(n + 7) // 8}")
