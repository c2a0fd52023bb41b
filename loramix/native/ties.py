"""TIES' fused passes (``ties.c``) for :mod:`loramix.methods.base`: the
threshold count of a block and its trim + sign election + disjoint mean.
:func:`kernels` is None where the kernels are off (:mod:`loramix.native`)."""

from __future__ import annotations

import ctypes
import functools

from . import bound

#: adapters one election takes at most (the eager code takes more)
MAX_ADAPTERS = 64

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Ties:
    """Typed entry points of the built ``ties.c``, float32 and float64."""

    def __init__(self, lib, generic: bool = False, form: str | None = None):
        """``form``: ``"dispatched"`` (the default: the best the CPU has, as
        loramix runs them), ``"generic"`` (the portable loops even where the
        CPU has AVX-512 or AVX2) or ``"avx2"`` (elect and pass in their AVX2
        form even where the CPU has AVX-512; see :func:`has_avx2`), for the
        tests; ``generic=True`` is ``form="generic"``."""
        form = form or ("generic" if generic else "dispatched")
        tails = {"dispatched": "", "generic": "_generic", "avx2": "_avx2"}
        if form not in tails:
            raise ValueError(f"form: one of {sorted(tails)}, not {form!r}")
        n, i, p, i64 = ctypes.c_int, ctypes.c_int, _P, _I64
        self._fns: dict = {}
        for suf, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
            for name, args, res in (
                ("count", [p, i64, real, real, p, ctypes.POINTER(i64)], i64),
                ("elect", [n, p, p, p, i, i, p, i64], None),
                ("pass", [n, p, p, p, p, p, p, p, i, i, p, i64, p, p, p, p, p], i64),
                ("fixup", [n, p, p, p, p, i, i, p, i64, p], i64),
            ):
                # fixup: scalar, one kind; count: no AVX2 form (the one pass does its work)
                tail = "" if name == "fixup" or (form == "avx2" and name == "count") else tails[form]
                fn = getattr(lib, f"loramix_{name}_{suf}{tail}")
                fn.argtypes, fn.restype = args, res
                self._fns[name, suf] = fn
        # form + pass (float32, x86-64 with AVX2 and FMA): not in the portable form
        self._isa = {"dispatched": 0, "avx2": 2}.get(form)
        self._form = self._formpass = None
        if self._isa is not None and getattr(lib, "loramix_formpass_f32", None) is not None:
            self._form, self._formpass = lib.loramix_form_f32, lib.loramix_formpass_f32
            self._form.argtypes, self._form.restype = [i, p, p, i64, i64, i64, p], ctypes.c_int
            # isa, n, Bs, As, K, rows, cols, tile_rows, tiles, then pass's arguments without m,
            # then the bfloat16 add's: add, w0, outb, w0rec, provrec, bad
            self._formpass.argtypes = [i, n, p, p, i64, i64, i64, i64, p, *[p] * 6, i, i, *[p] * 12]
            self._formpass.restype = i64
        self._formed: dict = {}  # (rows, cols, k) -> whether forms_like_mm

    @staticmethod
    def _suffix(dtype) -> str:
        import numpy as np

        return {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]

    def count(self, a, lo, hi, window):
        """``(#{|a| > hi}, the |a| in [lo, hi])`` for a C-contiguous numpy
        array ``a``; ``window`` (same dtype, at least ``a.size``) holds the
        collected magnitudes, and the second result is a copy of them. Its
        first ``a.size`` entries are all work space: the kernel may write
        past the collected ones (whole vectors, ``ties.c``'s APPEND)."""
        n = _I64(0)
        above = self._fns["count", self._suffix(a.dtype)](
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
        self._fns["elect", self._suffix(dt)](
            n, ptrs, lam.ctypes.data, w.ctypes.data, int(mass), int(by_count), out.data_ptr(), out.numel()
        )

    def one_pass(self, lo, hi, prov, rlo, rhi, weights, mass: bool, by_count: bool, space) -> OnePass:
        """*pass* (``ties.c``) prepared for blocks of ``len(lo)`` deltas:
        ``lo``, ``hi``, ``prov`` (the provisional trims' lambdas, each in
        ``[lo_i, hi_i]``), ``rlo``, ``rhi`` (the bands whose positions are
        recorded, inside the windows), ``weights``: numpy arrays of the
        blocks' dtype; ``space(role, n, dtype)`` lends a numpy work array of
        ``n`` entries."""
        formpass = None
        if self._formpass is not None and self._suffix(lo.dtype) == "f32":
            formpass = functools.partial(self._formpass, self._isa)
        return OnePass(
            self._fns["pass", self._suffix(lo.dtype)], lo, hi, prov, rlo, rhi, weights, mass, by_count, space,
            formpass,
        )  # fmt: skip

    def form(self, B, A, out) -> bool:
        """``out = B @ A`` (C-contiguous float32 CPU tensors, ``(rows, k) @
        (k, cols)``) as *form* (``ties.c``) makes a one-pass tile: every
        entry the fused multiply-add chain along ``k`` from +0. False
        (``out`` untouched) where this build or CPU has no form."""
        if self._form is None:
            return False
        (rows, k), cols = B.shape, A.shape[1]
        return self._form(self._isa, B.data_ptr(), A.data_ptr(), k, rows, cols, out.data_ptr()) == 0

    def forms_like_mm(self, rows: int, cols: int, k: int) -> bool:
        """Whether :meth:`form` gives ``torch.mm``'s bits for ``(rows, k) @
        (k, cols)`` float32 products on this machine (MKL's sgemm kernels
        accumulate each entry along ``k`` from a zeroed output, as *form*
        does; another BLAS, CPU or shape may not): checked once per shape on
        factors made to show a difference (random values, exact zeros of
        both signs, a column of zeros, subnormal products), and remembered.
        Only then does a merge take :meth:`OnePass.run_formed`, so its bits
        are those of blocks formed by ``torch.mm``."""
        key = (rows, cols, k)
        ok = self._formed.get(key)
        if ok is None:
            ok = self._formed[key] = self._check_form(rows, cols, k)
        return ok

    def _check_form(self, rows: int, cols: int, k: int) -> bool:
        import torch

        if self._form is None or rows < 1 or cols < 1 or k < 1:
            return False
        g = torch.Generator().manual_seed(0x5EED + 7919 * rows + 131 * cols + k)
        B, A = torch.randn(rows, k, generator=g), torch.randn(k, cols, generator=g)
        B[0] = 0.0  # +0 products of either sign: the sign of an exact zero sum
        if rows > 1:
            B[1] = -0.0
        if rows > 2:
            B[2] *= 1e-36  # products and sums below the normal range (no flush to zero)
        A[:, 0] = 0.0
        A[:, -1] = -A[:, -1].abs()
        want, got = torch.mm(B, A), torch.empty(rows, cols)
        return self.form(B, A, got) and torch.equal(want.view(torch.int32), got.view(torch.int32))

    def fixup(self, vals, prov, lams, weights, mass: bool, by_count: bool, pos, out) -> int:
        """*fixup* (``ties.c``): ``out.flat[pos[r]]`` elected again with the
        trims at ``lams`` (None: not trimmed) for the records ``r`` (values
        ``vals[i][r]``, numpy) where they trim another way than at ``prov``;
        returns how many. ``out``: a C-contiguous tensor."""
        import numpy as np

        dt, n = prov.dtype, len(vals)
        lam = np.array([-1.0 if v is None else v for v in lams], dtype=dt)
        w = np.array([float(v) for v in weights], dtype=dt)
        return int(
            self._fns["fixup", self._suffix(dt)](
                n, (_P * n)(*(v.ctypes.data for v in vals)), prov.ctypes.data, lam.ctypes.data, w.ctypes.data,
                int(mass), int(by_count), pos.ctypes.data, pos.size, out.data_ptr(),
            )
        )  # fmt: skip


class OnePass:
    """The count of each of a module's blocks against its ``[lo_i, hi_i]``
    and the election trimmed at ``prov_i``, in one reading of the blocks
    (``ties.c``, *pass*). Its work arrays and the call's fixed arguments are
    made once per module and thread: a block's call costs one ``ctypes``
    call. After :meth:`run`: ``above[i]`` entries of block ``i`` above
    ``hi_i``, its magnitudes in the window in ``windows[i][:n_window[i]]``,
    and the records, the positions ``pos[:records]`` where some block is in
    its band, with block ``i``'s value there in ``vals[i][:records]``."""

    def __init__(self, fn, lo, hi, prov, rlo, rhi, weights, mass: bool, by_count: bool, space, formpass=None):
        import numpy as np

        self._fn, self._space, self._formpass, n = fn, space, formpass, len(lo)
        self._fixed = (lo, hi, prov, rlo, rhi, weights)  # kept alive: the call holds their addresses
        self._head = (n, None, *(a.ctypes.data for a in self._fixed), int(mass), int(by_count))
        self.above, self.n_window = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.capacity = self._records_capacity = 0
        self._bad = ctypes.c_int(0)

    def _grow(self, m: int) -> None:
        import numpy as np

        n, dt = len(self.above), self._fixed[0].dtype
        self.windows = [self._space(f"pass_window{i}", m, dt) for i in range(n)]
        self.vals = [self._space(f"pass_value{i}", m, dt) for i in range(n)]
        self.pos = self._space("pass_pos", m, np.dtype(np.int64))
        self._tail = (
            self.above.ctypes.data,
            (_P * n)(*(a.ctypes.data for a in self.windows)),
            self.n_window.ctypes.data,
            self.pos.ctypes.data,
            (_P * n)(*(a.ctypes.data for a in self.vals)),
        )
        self.capacity = m

    def run_formed(self, Bs, As, out, tile_rows: int, into=None) -> int | None:
        """:meth:`run` on the blocks ``B_i @ A_i`` (C-contiguous float32
        factors: those rows of ``B_i``, all of ``A_i``), formed ``tile_rows``
        rows at a time by *form* into this pass's tiles (see
        :meth:`Ties.forms_like_mm` for when that is the same); None where
        no form runs here.

        ``into = (add, w0, outb)``: the election goes on, tile by tile, into
        ``outb = bf16(f32(w0) + election)`` (``add``: the address of
        ``bf16.c``'s kernel, :attr:`loramix.native.bf16.Bf16.address`; ``w0``,
        ``outb``: C-contiguous bfloat16 tensors of the block's size, ``outb``
        may be ``w0``), and ``out`` is only a tile's work space. Then also
        ``w0rec[:records]`` and ``provrec[:records]``: ``w0``'s bits and the
        provisional election at the records' positions, and ``bad``: whether
        some result is not finite."""
        if self._formpass is None:
            return None
        (rows, k), cols = Bs[0].shape, As[0].shape[1]
        m = rows * cols
        if m > self.capacity:
            self._grow(m)
        n = self._head[0]
        tiles = [self._space(f"pass_tile{i}", tile_rows * cols, self._fixed[0].dtype) for i in range(n)]
        tail = (None,) * 6
        if into is not None:
            import numpy as np

            add, w0, outb = into
            if self._records_capacity < m:
                self.w0rec = self._space("pass_w0", m, np.dtype(np.uint16))
                self.provrec = self._space("pass_prov", m, np.dtype(np.float32))
                self._records_capacity = m
            self._bad.value = 0
            tail = (add, w0.data_ptr(), outb.data_ptr(), self.w0rec.ctypes.data, self.provrec.ctypes.data,
                    ctypes.addressof(self._bad))  # fmt: skip
        got = self._formpass(
            n, (_P * n)(*(b.data_ptr() for b in Bs)), (_P * n)(*(a.data_ptr() for a in As)), k, rows, cols,
            tile_rows, (_P * n)(*(t.ctypes.data for t in tiles)), *self._head[2:], out.data_ptr(), *self._tail,
            *tail,
        )  # fmt: skip
        return None if got < 0 else int(got)

    @property
    def bad(self) -> bool:
        """After :meth:`run_formed` ``into`` bfloat16: whether some result was not finite."""
        return bool(self._bad.value)

    def run(self, blocks, out) -> int:
        """Count and elect the ``blocks`` (C-contiguous tensors of one shape)
        into ``out``; returns the number of records."""
        m = out.numel()
        if m > self.capacity:
            self._grow(m)
        n = self._head[0]
        ptrs = (_P * n)(*(b.data_ptr() for b in blocks))
        return int(self._fn(n, ptrs, *self._head[2:], out.data_ptr(), m, *self._tail))


def has_avx2(lib) -> bool:
    """Whether the AVX2 forms of the built library ``lib`` can run here (an
    x86-64 build, and a CPU with AVX2)."""
    fn = getattr(lib, "loramix_has_avx2", None)
    return fn is not None and bool(fn())


def kernels() -> Ties | None:
    """The fused TIES kernels, or None (off, or not built here)."""
    return bound("ties", Ties)
