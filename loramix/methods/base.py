"""The interface every merge method implements, and the pieces they share.

A method is one small class, registered by name (see :mod:`loramix.methods`).
It works on one module at a time, on the *true* deltas of that module::

    dW_i = ModuleDelta.delta(W0)      (out, in): s_i B_i A_i for LoRA, W_hat_i - W0 for D2-LoRA and DoRA

never on ``A`` and ``B`` separately (docs/merging.md).

* Dense methods implement :meth:`MergeMethod.delta` and return the merged
  dense delta ``(out, in)`` that the streaming engine adds to ``W0``.
* Low-rank methods (``low_rank = True``) implement :meth:`MergeMethod.factors`
  and return ``(B, A)`` with ``B @ A`` the merged delta; they can be written as
  a PEFT adapter, and their :meth:`delta` is ``B @ A``.

Parameters are declared with :class:`Param`; :meth:`MergeMethod.validate`
fills the defaults and turns anything out of range into a one-line
:class:`~loramix.errors.UsageError` before any work starts. A method also
says which adapter kinds it applies to (``kinds``), how its per-module facts
add up (:meth:`MergeMethod.summarize`) and how to say the summary in words
(:meth:`MergeMethod.describe`), so that the runner, the CLI and the scenario
study need no special case per method.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UsageError
from .params import DENSITY, DIVIDE, LAMBDA, SEED, SIGN, Param  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter, ModuleDelta

# Torch is imported inside the functions that compute: the ``merge`` command
# builds its options from the methods' declarations, and ``--help`` must stay
# quick. For the same reason the adapter kind names the methods name are spelled
# here (they equal loramix.adapter.LORA / D2LORA; a test checks).
LORA, D2LORA = "lora", "d2lora"


@dataclass
class ModuleContext:
    """Where a module's merge runs.

    ``indices`` are the positions (in the user's list) of the adapters that
    touch this module, aligned with the ``module_deltas`` a method receives:
    DARE derives its per-adapter seeds from them. ``dtype`` is the compute
    dtype of dense deltas (float32 in files, float64 in the reference tests).
    ``scratch`` (optional: anything with ``get(role, shape, dtype, device)``,
    e.g. :class:`loramix.engine.Buffers`) lends work tensors that are reused
    from module to module: the dense deltas, masks and sums of a method come
    from it instead of fresh allocations (a fresh 180 MB tensor costs a page
    fault per 4 KiB page, more than the arithmetic), and a merged delta that
    lives in it is valid until the next module's merge.
    """

    name: str
    indices: tuple[int, ...]
    device: torch.device | None = None  # None: the CPU
    dtype: torch.dtype | None = None  # None: float32
    scratch: object | None = None
    #: whether the method may give a delta not yet formed (:class:`OnePassTies`,
    #: :class:`loramix.methods.dare.FactorDrops`):
    #: a streaming merge into a base sets it (loramix.engine.add_delta takes it)
    deferred: bool = False

    def empty(self, role: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised work tensor: from ``scratch`` under ``role``, else fresh."""
        import torch

        dtype = self.dtype if dtype is None else dtype
        if self.scratch is None:
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        return self.scratch.get(role, tuple(shape), dtype, self.device)

    def __post_init__(self):
        import torch

        self.device = torch.device("cpu") if self.device is None else torch.device(self.device)
        self.dtype = torch.float32 if self.dtype is None else self.dtype


@dataclass
class LowRank:
    """A low-rank merge result for one module: ``delta = B @ A``.

    ``info`` is what goes into the report (e.g. discarded energy).
    """

    B: torch.Tensor  # (out, k)
    A: torch.Tensor  # (k, in)
    info: dict = field(default_factory=dict)


class MergeMethod:
    """Base class; subclasses set ``name``, ``params`` and implement
    :meth:`delta` (dense) or :meth:`factors` (``low_rank = True``)."""

    name: str = ""
    summary: str = ""
    params: tuple[Param, ...] = ()
    #: the result is ``B @ A`` of small rank: can be written as an adapter
    low_rank: bool = False
    #: the merge equals the adapters applied together in the forward
    #: (``W0 + sum_i w_i dW_i``), so a study evaluates it without writing it
    attachable: bool = False
    #: whether :meth:`merged` reads ``W0`` even for adapter kinds that do not
    #: ``need_base`` (the default, safe for a method from outside: into a base
    #: it always gets ``W0``); see :meth:`needs_base`
    uses_base: bool = True
    #: whether :meth:`merged` gives the same bits on any number of torch
    #: threads (products, elementwise arithmetic, exact selection; not
    #: reductions such as sums or norms, whose rounding follows the split):
    #: a streaming merge then runs it on one thread (engine.cpu_threads);
    #: otherwise on the threads torch had, as before. Adapter kinds that
    #: ``need_base`` take norms, so they always get those threads.
    thread_independent: bool = False
    #: the adapter kinds (``Adapter.method``) the method applies to; None: every
    #: kind (a method acts on effective deltas, which every kind defines)
    kinds: tuple[str, ...] | None = None
    #: why other kinds are refused (appended to the error)
    kinds_reason: str = ""
    #: why an adapter output of it may not be truncated by SVD (``--out-rank``,
    #: ``--energy``), or None: it may
    no_truncation: str | None = None

    @classmethod
    def applies_to(cls, kind) -> bool:
        """Whether adapters of ``kind`` (a kind object or its name) can be merged with it."""
        return cls.kinds is None or str(kind) in cls.kinds

    def one_thread(self, module_deltas: Sequence[ModuleDelta]) -> bool:
        """Whether merging these deltas of one module may run on one torch
        thread without changing a bit (see ``thread_independent``)."""
        return self.thread_independent and not any(m.kind.needs_base for m in module_deltas)

    def needs_base(self, module_deltas: Sequence[ModuleDelta]) -> bool:
        """Whether merging these deltas of one module into a base reads ``W0``:
        the method's own use (``uses_base``) or a kind whose effective delta
        depends on it (DoRA, D2-LoRA). Where it does not, the streaming engine
        passes ``W0 = None`` and never forms it whole in float32."""
        return self.uses_base or any(m.kind.needs_base for m in module_deltas)

    # -- validation -------------------------------------------------------------
    def validate(self, params: dict, adapters: Sequence[Adapter]) -> dict:
        """Fill defaults, coerce and range-check; unknown parameters are errors.

        ``params`` uses Python names (``lambda_``; ``lambda`` is accepted too).
        ``None`` values count as "not given".
        """
        out = self.coerce_params(params)
        for ad in adapters:
            if not self.applies_to(ad.kind):
                why = f": {self.kinds_reason}" if self.kinds_reason else ""
                raise UsageError(
                    ad.path or ad.name,
                    f"method {self.name} needs {' or '.join(self.kinds)} adapters; "
                    f"this is a {ad.kind.name} adapter{why}",
                )
        self.check(out, adapters)
        return out

    def coerce_params(self, params: dict) -> dict:
        """The part of :meth:`validate` that needs no adapters (and no torch):
        ``params`` with defaults filled, coerced and range-checked."""
        known = {p.name: p for p in self.params}
        given = {("lambda_" if k == "lambda" else k): v for k, v in params.items() if v is not None}
        for k in given:
            if k not in known:
                takes = ", ".join(p.flag for p in self.params) or "no parameters"
                flag = "--" + k.rstrip("_").replace("_", "-")
                raise UsageError(flag, f"does not apply to method {self.name} (it takes {takes})")
        out = {}
        for p in self.params:
            if p.required and p.name not in given:
                raise UsageError(p.flag, f"method {self.name} needs {p.flag} ({p.help})")
            out[p.name] = p.coerce(given[p.name]) if p.name in given else p.default
        return out

    # -- reporting --------------------------------------------------------------
    def summarize(self, facts: dict[str, dict]) -> dict:
        """Totals of the per-module ``facts`` (module -> what :meth:`merged` or
        :meth:`factors` reported; called only when some module reported
        facts) for the summary; none by default."""
        return {}

    def describe(self, summary: dict) -> list[str]:
        """Lines that say :meth:`summarize`'s totals to a user (the CLI prints them)."""
        return []

    def check(self, params: dict, adapters: Sequence[Adapter]) -> None:
        """Cross-parameter and adapter checks of a method (override); :func:`merge`
        calls it first with no adapters, before they load."""

    def rank_cap(self, params: dict, adapters: Sequence[Adapter]) -> tuple[int, str]:
        """The largest rank this method's merged delta has in any module, and
        those words for it: for the exact factors of a low-rank method the
        stacked rank ``R = sum_i r_i``, else ``min(out, in)``
        (:func:`rank_cap`). ``--out-rank`` above it is refused."""
        return rank_cap(adapters, self.low_rank)

    # -- the math ---------------------------------------------------------------
    def delta(
        self,
        ctx: ModuleContext,
        module_deltas: Sequence[ModuleDelta],
        weights: Sequence[float],
        W0: torch.Tensor | None,
        params: dict,
    ) -> torch.Tensor:
        """The merged dense delta ``(out, in)`` of one module, on ``ctx.device``
        in ``ctx.dtype``. ``W0`` is ``(out, in)`` (needed by D2-LoRA and DoRA)."""
        if self.low_rank:
            lr = self.factors(ctx, module_deltas, weights, params)
            return (lr.B @ lr.A).to(ctx.dtype)
        raise NotImplementedError

    def merged(
        self,
        ctx: ModuleContext,
        module_deltas: Sequence[ModuleDelta],
        weights: Sequence[float],
        W0: torch.Tensor | None,
        params: dict,
    ) -> tuple[torch.Tensor, dict]:
        """:meth:`delta` plus the module's facts for the report (override to add some)."""
        return self.delta(ctx, module_deltas, weights, W0, params), {}

    def factors(
        self, ctx: ModuleContext, module_deltas: Sequence[ModuleDelta], weights: Sequence[float], params: dict
    ) -> LowRank:
        """Low-rank methods: ``(B, A)`` with ``B @ A`` the merged delta."""
        raise NotImplementedError(f"method {self.name} has no low-rank form")

    def factors_many(
        self, jobs: Sequence[tuple[ModuleContext, Sequence[ModuleDelta], Sequence[float]]], params: dict
    ) -> Iterable[LowRank]:
        """:meth:`factors` of many modules (``jobs``: ``(ctx, module_deltas,
        weights)`` each), in order. Methods may batch same-shaped modules;
        by default each module's are formed when the caller takes them (it
        keeps them in the output's dtype: not every module's float64 at once)."""
        for ctx, mds, ws in jobs:
            yield self.factors(ctx, mds, ws, params)


# ----------------------------------------------------------------------------- shared helpers


def dense_deltas(
    ctx: ModuleContext,
    module_deltas: Sequence[ModuleDelta],
    W0: torch.Tensor | None,
    weights: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """``[w_i dW_i]`` (out, in) each, tensors of their own (fresh, or
    ``ctx.scratch``'s) on ``ctx.device`` in ``ctx.dtype`` (callers may modify
    them in place): the true deltas (``s B A``; the effective delta, e.g.
    ``W_hat - W0``, for a kind that ``needs_base``), times ``weights`` if
    given. For a kind that does not need the base the weight is folded into
    ``B`` before the product (saves a pass over ``out x in``)."""
    return list(iter_dense_deltas(ctx, module_deltas, W0, weights))


def iter_dense_deltas(
    ctx: ModuleContext,
    module_deltas: Sequence[ModuleDelta],
    W0: torch.Tensor | None,
    weights: Sequence[float] | None = None,
    *,
    reuse: bool = False,
) -> Iterator[torch.Tensor]:
    """:func:`dense_deltas` one at a time, each formed when the caller asks
    for it. ``reuse``, for a caller done with each delta before it takes the
    next (a running sum into the first): every delta after the first is
    formed in one shared work tensor, which the next overwrites, so a module
    holds two dense deltas whatever the number of adapters, not one each."""
    import torch

    from ..engine import large_op

    if W0 is not None:
        W0 = W0.to(device=ctx.device, dtype=ctx.dtype)
    for j, m in enumerate(module_deltas):
        w = 1.0 if weights is None else float(weights[j])
        if m.kind.needs_base:
            require_base(m, W0)
            d = m.delta(W0, dtype=ctx.dtype, device=ctx.device)
            yield d.mul_(w) if w != 1.0 else d
        else:
            Bw, A = _weighted_factors(ctx, m, w)
            role = f"delta{min(j, 1) if reuse else j}"
            with large_op():
                d = torch.mm(Bw, A, out=ctx.empty(role, (Bw.shape[0], A.shape[1])))
            yield d
        del d


def _weighted_factors(ctx: ModuleContext, m: ModuleDelta, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w B, A)`` of a factor kind in ``ctx``'s dtype and device, the weight
    folded into ``B`` (one pass over ``(out, k)``, not over ``(out, in)``):
    the dense way and :func:`ties_from_factors` give the same bits because
    both fold it so."""
    B, A = m.factors(dtype=ctx.dtype, device=ctx.device)
    return (B * w if w != 1.0 else B), A


def require_base(m: ModuleDelta, W0: torch.Tensor | None) -> None:
    """Refuse (one line naming the module) to form the effective delta of a
    kind that ``needs_base`` without the base weight."""
    if W0 is None and m.kind.needs_base:
        raise UsageError(
            m.name, f"{m.kind.label} effective deltas depend on the base weight: pass --into BASE"
        )


def kth_largest(x: torch.Tensor, k: int, scratch=None) -> torch.Tensor:
    """The ``k``-th largest value of a contiguous 1-D tensor of non-negative
    floats (``1 <= k <= numel``), as a 0-d tensor.

    Exact, and several times faster than ``torch.kthvalue`` on large tensors.
    A large float32/float64 tensor on the CPU goes through
    :func:`_kth_largest_bracket` (a sample brackets the answer, one pass
    counts and collects; ``scratch`` lends its masks). Otherwise: the bit
    pattern of a non-negative IEEE float orders like the float, so a
    histogram of its top bits (sign, exponent and 7 mantissa bits) finds the
    bucket that holds the answer, and ``kthvalue`` runs on that bucket only
    (small buckets also keep the boolean selection cheap).
    """
    import torch

    n = x.numel()
    if n >= BRACKET_MIN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        found = _kth_largest_bracket(x, k, scratch)
        if found is not None:
            return found
    if x.dtype == torch.float32:
        key = x.view(torch.int32) >> 16  # 15 bits: sign (0), 8 exponent, 7 mantissa
        nb = 1 << 15
    elif x.dtype == torch.float64:
        key = x.view(torch.int64) >> 45  # 18 bits: sign (0), 11 exponent, 6 mantissa
        nb = 1 << 18
    else:
        return torch.kthvalue(x.float(), n - k + 1).values.to(x.dtype)
    hist = torch.bincount(key, minlength=nb)
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # [b]: entries whose bucket is >= b
    b = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[b + 1]) if b + 1 < nb else 0
    bucket = x[key == b]
    return torch.kthvalue(bucket, bucket.numel() - (k - above) + 1).values


#: tensors from this size take :func:`_kth_largest_bracket`
BRACKET_MIN = 1 << 16
#: one element in this many goes into the sample (a prime: a sample of a
#: matrix by a stride that divides its rows would see the same columns)
SAMPLE_STRIDE = 31


def _kth_largest_bracket(x: torch.Tensor, k: int, scratch=None) -> torch.Tensor | None:
    """:func:`kth_largest` by a bracket, in numpy (its comparisons, counts and
    boolean selection cost a fraction of torch's on the CPU): the quantile
    of a strided sample gives ``lo <= hi`` (:func:`_bracket`); one pass
    counts the entries above ``hi`` and collects those in ``[lo, hi]``, and
    if the answer lies among them (it does unless the sample misleads)
    ``np.partition`` picks it exactly. None when it does not: then the
    caller's exact method runs."""
    import numpy as np
    import torch

    a = x.detach().reshape(-1).numpy()
    n = a.size
    lo, hi = _bracket(np.array(a[::SAMPLE_STRIDE]), k, n)

    def mask(role: str) -> np.ndarray:
        if scratch is None:
            return np.empty(n, dtype=bool)
        return scratch.get(role, (n,), torch.bool, torch.device("cpu")).numpy()

    above, window = mask("kth_above"), mask("kth_window")
    np.greater(a, hi, out=above)
    np.greater_equal(a, lo, out=window)
    np.not_equal(window, above, out=window)  # lo <= a <= hi
    return _pick(int(np.count_nonzero(above)), a[window], k, x.dtype)


def trim_(t: torch.Tensor, density: float, scratch=None) -> torch.Tensor:
    """Zero all but the top ``k = int(density * numel)`` entries of ``|t|``,
    in place (PEFT's ``magnitude_based_pruning`` count); returns ``t``.

    Entries tied with the k-th magnitude are all kept (PEFT's ``topk`` keeps
    an arbitrary subset of them); for real-valued deltas ties are vanishingly
    rare, and tied zeros change nothing. Scaling ``t`` by a nonzero weight
    first keeps the same entries.
    """
    if density >= 1.0:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return t.zero_()
    import torch

    if _by_rows(t, scratch):
        thr = _abs_kth_largest_by_rows(t, k, scratch)
        if thr is not None:

            def keep(r0: int, r1: int, j: int) -> None:
                x = t[r0:r1]
                a = torch.abs(x, out=scratch.get(f"abs{j}", x.shape, x.dtype, x.device))
                x.mul_(a.ge_(thr))

            _rows(t, keep)
            return t
    a = torch.abs(t) if scratch is None else torch.abs(t, out=scratch.get("abs", t.shape, t.dtype, t.device))
    thr = kth_largest(a.reshape(-1), k, scratch)
    return t.mul_(a.ge_(thr))  # a becomes the 0/1 keep mask, in its own dtype


#: elements per block of rows of the methods' elementwise work at least (1 MiB
#: of float32; a large tensor takes larger ones: :func:`loramix.engine.block_rows`)
ROW_BLOCK_ELEMENTS = 1 << 18
#: ... and at most, where the blocks are formed from factors (:class:`_FactorRows`,
#: 2 MiB of float32 per delta): a block formed and read again at once is still in
#: the cache. On a 7B MLP module with 3 deltas (one thread, AMD EPYC), blocks of
#: 4M entries took 1.7 ns per entry for the products and 0.9 for the pass, blocks
#: of 512K 1.2 and 0.9: the products' writes and the pass's reads stay in the cache
FACTOR_BLOCK_ELEMENTS = 1 << 19
#: the one pass forms factors' blocks itself (where that gives torch.mm's bits,
#: :func:`_formable`) in tiles of whole rows, about this many entries per delta,
#: each passed at once, from the cache. One 7B module, 3 rank-16 deltas, 2 threads
#: (2-core Zen 4), ms: 11008 x 4096 78/76/75/75, 4096 x 11008 91/81/77/78 with 32K,
#: 64K, 128K, 256K (torch.mm's blocks: 92, 93): a wide matrix's tile of 2 rows
#: reads all of A for few entries
FORM_TILE_ENTRIES = 1 << 17


def _by_rows(t: torch.Tensor, scratch) -> bool:
    """Whether ``t`` is worked on by blocks of rows: a large float matrix on
    the CPU, with work buffers to lend (a streaming merge)."""
    import torch

    return (
        scratch is not None
        and t.device.type == "cpu"
        and t.dim() == 2
        and t.is_contiguous()
        and t.numel() >= BRACKET_MIN
        and t.dtype in (torch.float32, torch.float64)
    )


def _rows(t, fn, step: int | None = None, taper: int = 0) -> list:
    """``fn(r0, r1, j)`` over the blocks of rows of ``t`` (a tensor or a
    :class:`_DeltaRows`; at least ``engine.MIN_ROWS`` rows each, starting on
    a multiple of it; ``step`` rows each, default :func:`_row_step`, shrinking
    to ``taper`` towards the end), shared out with the streaming run's threads
    (:func:`loramix.engine.parallel_rows`)."""
    from ..engine import MIN_ROWS, parallel_rows

    return parallel_rows(t.shape[0], _row_step(t) if step is None else step, fn, MIN_ROWS, taper)


def _row_step(t, formed: bool = False) -> int:
    """Rows per block of ``t`` for :func:`_rows`: :func:`loramix.engine.block_rows`
    of :data:`ROW_BLOCK_ELEMENTS` at least, and, for blocks formed from factors
    into memory (``t.owned``, not ``formed`` by the one pass's own tiles), at most
    :data:`FACTOR_BLOCK_ELEMENTS` entries where that allows."""
    from ..engine import aligned_rows, block_rows, run_threads

    rows, cols = t.shape
    step = block_rows(rows, cols, run_threads(), ROW_BLOCK_ELEMENTS)
    if getattr(t, "owned", False) and not formed:
        step = min(step, aligned_rows(FACTOR_BLOCK_ELEMENTS // max(cols, 1)))
    return step


class _DeltaRows:
    """A dense delta ``x`` (out, in) read by blocks of rows: ``rows(r0, r1,
    j)`` is ``x[r0:r1]`` (a view: what a caller does to it is done to
    ``x``); ``abs_sample()`` is ``|x|`` at every ``SAMPLE_STRIDE``-th entry
    (``stride``: how far apart, for :func:`_bracket`'s margin). ``owned``:
    whether a block is the thread's own buffer (else a view of ``x``)."""

    stride = SAMPLE_STRIDE
    owned = False

    def __init__(self, x: torch.Tensor):
        self.x, self.shape, self.dtype, self.device = x, tuple(x.shape), x.dtype, x.device

    def rows(self, r0: int, r1: int, j: int) -> torch.Tensor:
        return self.x[r0:r1]

    def abs_sample(self):
        import numpy as np

        return np.abs(self.x.detach().reshape(-1).numpy()[::SAMPLE_STRIDE])


class _FactorRows(_DeltaRows):
    """The delta ``B @ A`` ((out, k) @ (k, in)) formed block by block from
    its factors and never whole: ``rows(r0, r1, j)`` is ``B[r0:r1] @ A``,
    into thread ``j``'s work buffer ``role`` of ``scratch`` (valid until
    that thread's next call). Each entry is one dot product over ``k``, so a
    block of at least ``engine.MIN_ROWS`` rows from a multiple of it has the
    bits of those rows of ``B @ A`` (tests/test_engine.py). Re-forming a
    block costs ``2 k`` flops per entry, less than storing the whole delta and reading it
    back from memory twice. The sample holds the same entries as the dense
    delta's (formed from the factors in small products: their values may
    differ in the last bit, which the exact count that checks the bracket
    does not mind, :func:`_pick`)."""

    owned = True

    def __init__(self, B: torch.Tensor, A: torch.Tensor, scratch, role: str):
        self.B, self.A, self.scratch, self.role = B, A, scratch, role
        self.shape, self.dtype, self.device = (B.shape[0], A.shape[1]), A.dtype, A.device

    def rows(self, r0: int, r1: int, j: int) -> torch.Tensor:
        import torch

        out = self.scratch.get(f"{self.role}/{j}", (r1 - r0, self.shape[1]), self.dtype, self.device)
        return torch.mm(self.B[r0:r1], self.A, out=out)

    def abs_sample(self):
        import torch

        # the dense delta's sample, every SAMPLE_STRIDE-th entry of it flattened: in row r
        # the columns o(r), o(r) + S, ... with o(r) = (-r in) mod S, so the rows that share
        # an o(r) make one small product with those columns of A; with B's rows and A's
        # columns put in that order once, each product takes contiguous slices
        rows, cols, groups, size = _sample_plan(*self.shape)
        B, A = self.B.index_select(0, rows), self.A.index_select(1, cols)  # 3x faster than [rows]
        out = torch.empty(size, dtype=self.dtype, device=self.device)
        for r0, r1, c0, c1, at in groups:
            torch.mm(B[r0:r1], A[:, c0:c1], out=out[at : at + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        return out.abs_().numpy()


def factor_sources(ctx: ModuleContext, module_deltas, weights, role: str) -> list | None:
    """Each delta ``w_i B_i A_i`` as a :class:`_FactorRows` (blocks of rows
    formed from its factors, ``w_i`` folded in, into work buffers
    ``role{i}/j`` of ``ctx.scratch``), for a merge that never forms a delta
    whole (:class:`FactorBlocks`); None where that does not apply: no
    ``ctx.scratch`` (not a streaming merge), another device than the CPU or
    work dtype than float32, a kind whose delta needs ``W0``, a module under
    :data:`BRACKET_MIN` entries, or deltas of different shapes."""
    import torch

    if (
        ctx.scratch is None
        or ctx.device.type != "cpu"
        or ctx.dtype != torch.float32
        or any(m.kind.needs_base for m in module_deltas)
    ):
        return None
    shape = module_deltas[0].shape
    if shape[0] * shape[1] < BRACKET_MIN or any(m.shape != shape for m in module_deltas):
        return None
    return [
        _FactorRows(*_weighted_factors(ctx, m, float(w)), ctx.scratch, f"{role}{i}")
        for i, (m, w) in enumerate(zip(module_deltas, weights))
    ]


class FactorBlocks:
    """A module's merged delta from the factors of its deltas, not yet
    formed: each block of rows of each delta formed (:class:`_FactorRows`,
    the bits of those rows of the dense delta), pruned in place by
    :meth:`prune` (a subclass's: DARE's drop, DELLA's keep), then combined
    (``combine(blocks, out_rows)``) while the blocks are in the cache: into
    a float32 delta (:meth:`materialize`), or added to a bfloat16 ``W0``
    block by block (:meth:`add_bf16`, for the streaming merge's
    ``add_delta``: no float32 delta written and read back). ``shape``:
    ``(out, in)``; ``bounds``: the blocks, the same on any number of
    threads, for a subclass that keeps something per block."""

    #: the name of the work buffers :meth:`add_bf16` combines into
    role = "factor"

    def __init__(self, srcs, combine, scratch):
        from ..engine import MIN_ROWS, _block_bounds, run_threads

        self.srcs, self.combine, self.scratch = srcs, combine, scratch
        self.shape = tuple(srcs[0].shape)
        # blocks without a taper: the same bounds on any number of threads, so the
        # engine's blocks of the same step (add_bf16) are these
        self.step = _row_step(srcs[0])
        self.bounds = _block_bounds(self.shape[0], self.step, MIN_ROWS, 0, run_threads())
        self.index = {r0: b for b, (r0, _) in enumerate(self.bounds)}

    @property
    def block_starts(self) -> list[int]:
        """Each block's first entry in the row-major delta, ``r0 * in``: where
        a subclass's draws for the block start."""
        return [r0 * self.shape[1] for r0, _ in self.bounds]

    def prune(self, i: int, b: int, x) -> None:
        """Block ``b`` (rows ``bounds[b]``) of delta ``i``, formed in ``x``: pruned in place."""
        raise NotImplementedError

    def _block(self, r0: int, r1: int, j: int, out) -> None:
        """Rows ``r0:r1`` of the merged delta into ``out`` (thread ``j``'s work)."""
        b = self.index[r0]  # KeyError: blocks other than the bounds' (a programming error)
        blocks = [s.rows(r0, r1, j) for s in self.srcs]
        for i, x in enumerate(blocks):
            self.prune(i, b, x)
        self.combine(blocks, out)

    def materialize(self):
        """The merged delta ``(out, in)``, float32, in ``scratch``'s ``elect_out``."""
        import torch

        from ..engine import parallel_rows

        out = self.scratch.get("elect_out", self.shape, torch.float32, self.srcs[0].device)

        def block(b0: int, b1: int, j: int) -> None:
            for r0, r1 in self.bounds[b0:b1]:
                self._block(r0, r1, j, out[r0:r1])

        parallel_rows(len(self.bounds), 1, block)
        return out

    def add_bf16(self, stored, out, read, by_blocks) -> bool | None:
        """``out = bf16(f32(stored) + delta)`` for a bfloat16 ``stored``
        ``(out, in)`` whose rows ``read(r0, r1)`` fills from the file
        (``out`` may be ``stored``), block by block by ``by_blocks(step,
        taper, fn)`` (the engine's threads): each block of the delta
        combined into a thread's work buffer and added by the kernel the
        engine's add of :meth:`materialize`'s delta uses, the same bits. True
        when every result is finite (else the caller checks); None, nothing
        done, without the bfloat16 kernel."""
        import torch

        from ..native import bf16

        kernel = bf16.kernels()
        if kernel is None:
            return None
        cols = self.shape[1]

        def block(r0: int, r1: int, j: int) -> bool:
            read(r0, r1)
            delta = self.scratch.get(f"{self.role}_out/{j}", (r1 - r0, cols), torch.float32, stored.device)
            self._block(r0, r1, j, delta)
            return kernel.add(stored[r0:r1], delta, out[r0:r1])

        return all(by_blocks(self.step, 0, block))


@functools.lru_cache(maxsize=64)
def _sample_plan(out_f: int, in_f: int):
    """How :meth:`_FactorRows.abs_sample` forms an ``(out_f, in_f)`` delta's
    sample: ``(rows, cols, groups, size)``, B's rows ordered by their first
    sampled column ``o(r)``, A's columns ``o, o + S, ...`` for o = 0, 1, ...
    in turn, and for each ``o`` that some row has, ``(r0, r1, c0, c1, at)``:
    those rows and columns, and where their product goes in the sample
    (``size`` entries). The same for every delta of that shape."""
    import torch

    offsets = (-(torch.arange(out_f) * in_f)) % SAMPLE_STRIDE
    rows = torch.argsort(offsets, stable=True)
    per_offset = torch.bincount(offsets, minlength=SAMPLE_STRIDE).tolist()
    col_sets = [torch.arange(o, in_f, SAMPLE_STRIDE) for o in range(min(SAMPLE_STRIDE, in_f))]
    groups, r0, c0, at = [], 0, 0, 0
    for o, c in enumerate(col_sets):
        r1, c1 = r0 + per_offset[o], c0 + c.numel()
        if r1 > r0:
            groups.append((r0, r1, c0, c1, at))
            at += (r1 - r0) * (c1 - c0)
        r0, c0 = r1, c1
    return rows, torch.cat(col_sets), tuple(groups), at


def _abs_kth_largest_by_rows(t, k: int, scratch) -> torch.Tensor | None:
    """The ``k``-th largest of ``|t|`` (``t`` a tensor or a :class:`_DeltaRows`)
    as :func:`_kth_largest_bracket` finds it, by blocks of rows of ``t``
    (never forming ``|t|`` whole); None when the sample's bracket misses it."""
    return _abs_kth_largest_many([t], k, scratch)[0]


def _abs_kth_largest_many(ts, k: int, scratch) -> list:
    """:func:`_abs_kth_largest_by_rows` of each of ``ts`` (all of one shape),
    together: the samples' brackets and the final picks run one per thread,
    and one pass over blocks of rows counts every ``t``'s block (formed, for
    factors, while the others wait in the cache)."""
    import numpy as np
    import torch

    srcs = [t if isinstance(t, _DeltaRows) else _DeltaRows(t) for t in ts]
    s0 = srcs[0]
    n = s0.shape[0] * s0.shape[1]
    brackets = _each(len(srcs), lambda i: _bracket(srcs[i].abs_sample(), k, n, srcs[i].stride))
    fused = _fused(s0)

    def count(r0: int, r1: int, j: int):
        out = []
        for src, (lo, hi) in zip(srcs, brackets):
            x = src.rows(r0, r1, j).detach().numpy()
            m = x.size
            if fused is not None:
                out.append(
                    fused.count(x, lo, hi, scratch.get(f"kwin{j}", (m,), src.dtype, src.device).numpy())
                )
                continue
            # a formed block is the thread's own: its magnitudes can take its place
            kabs = x if src.owned else scratch.get(f"kabs{j}", x.shape, src.dtype, src.device).numpy()
            a = np.abs(x, out=kabs)
            above = scratch.get(f"kabove{j}", (m,), torch.bool, src.device).numpy().reshape(x.shape)
            window = scratch.get(f"kwindow{j}", (m,), torch.bool, src.device).numpy().reshape(x.shape)
            np.greater(a, hi, out=above)
            np.greater_equal(a, lo, out=window)
            np.not_equal(window, above, out=window)  # lo <= |x| <= hi
            out.append((int(np.count_nonzero(above)), a[window]))
        return out

    return _pick_each(_rows(s0, count), k, s0.dtype)


def _pick_each(parts, k: int, dtype) -> list:
    """Each delta's :func:`_pick` from the blocks' counts: ``parts[b][i]`` is
    ``(entries above the bracket, magnitudes inside it)`` of delta ``i`` in
    block ``b``; the deltas one per thread."""
    import numpy as np

    def pick(i: int):
        mine = [p[i] for p in parts]
        return _pick(sum(int(c) for c, _ in mine), np.concatenate([w for _, w in mine]), k, dtype)

    return _each(len(parts[0]), pick)


def _each(n: int, fn) -> list:
    """``[fn(0), ..., fn(n - 1)]``, shared out with the streaming run's
    threads like :func:`_rows`' blocks."""
    from ..engine import parallel_rows

    return [r for part in parallel_rows(n, 1, lambda i0, i1, j: [fn(i) for i in range(i0, i1)]) for r in part]


def _bracket(sample, k: int, n: int, stride: int = SAMPLE_STRIDE):
    """``(lo, hi)`` around the ``k``-th largest of ``n`` values from a sample
    of them (its ranks ``i_lo .. i_hi`` of :func:`_bracket_ranks` left at
    those places, :func:`_select_ranks`): the sample's quantile with a margin of 8
    standard errors of its rank, plus two sampling ``stride``s (a strided
    sample's entries are not independent draws) and 8; infinite where it
    reaches an end."""

    import numpy as np

    m = sample.size
    _, i_lo, i_hi = _bracket_ranks(m, k, n, stride)
    if not _select_ranks(sample, i_lo, i_hi):
        # two single partitions: numpy's partition at two indices at once costs several times more
        sample.partition(i_lo)
        sample[i_lo:].partition(i_hi - i_lo)  # the entries from i_lo on are those at or above it
    lo = sample[i_lo] if i_lo > 0 else sample.dtype.type(-np.inf)
    hi = sample[i_hi] if i_hi < m - 1 else sample.dtype.type(np.inf)
    return lo, hi


#: :func:`_select_ranks` takes samples from this size (smaller ones are partitioned whole)
SELECT_MIN = 1 << 15
#: ... and looks at every this-many-th entry of the sample first
SUBSAMPLE = 16


def _select_ranks(sample, i_lo: int, i_hi: int) -> bool:
    """Put the values of ranks ``i_lo .. i_hi`` of ``sample`` (ascending from
    0, as ``np.sort`` orders them) at ``sample[i_lo : i_hi + 1]``, sorted, as
    two partitions there would leave them (the same values, so the same
    ``lo``, ``hi`` and estimate), without partitioning the whole sample
    (Floyd and Rivest's selection): the ranks are bracketed in every
    :data:`SUBSAMPLE`-th entry, ``[a, b]`` (8 standard errors of a rank
    wide, plus 2), one pass counts the entries below ``a`` and collects those
    in ``[a, b]`` (a few percent; :func:`_count_between`), and two partitions
    of those and a sort of what lies between give the ranks. The rest
    of ``sample`` is then not a permutation of it any more (its callers'
    copy). False, with ``sample`` untouched, for a small sample, a NaN in it,
    or ranks outside ``[a, b]`` (the subsample misled, rarely: it is no random
    draw): the caller partitions. On a 7B MLP module's sample (1.45M magnitudes)
    this is a few times faster than the two partitions, which took about a
    sixth of a TIES merge's time there."""
    import numpy as np

    m = sample.size
    if m < SELECT_MIN:
        return False
    sub = sample[::SUBSAMPLE].copy()
    ms = sub.size

    def place(i: int, side: int) -> int:
        q = i / (m - 1)
        return int(q * (ms - 1) + side * (8.0 * math.sqrt(q * (1.0 - q) * ms) + 2.0))

    j_lo, j_hi = max(0, place(i_lo, -1)), min(ms - 1, place(i_hi, +1))
    if j_lo > 0:
        sub.partition(j_lo)
    if j_hi < ms - 1:
        sub[j_lo:].partition(j_hi - j_lo)
    a = sub[j_lo] if j_lo > 0 else sample.dtype.type(-np.inf)
    b = sub[j_hi] if j_hi < ms - 1 else sample.dtype.type(np.inf)
    counted = _count_between(sample, a, b)
    if counted is None:
        low = sample < a
        below = int(np.count_nonzero(low))
        sel = sample[~low & ~(sample > b)]  # NaN is neither below nor above: here
        if np.isnan(sel).any():
            return False
    else:
        below, sel = counted
    if not (below <= i_lo and below + sel.size > i_hi):
        return False
    # only the ranks asked for are sorted (a fifth of those collected on a 7B module)
    a_at, b_at = i_lo - below, i_hi - below
    sel.partition(a_at)
    sel[a_at:].partition(b_at - a_at)
    sample[i_lo : i_hi + 1] = np.sort(sel[a_at : b_at + 1])
    return True


def _count_between(sample, a, b):
    """``(#{s < a}, the s in [a, b] in their order)`` of a sample of
    magnitudes (float32 or float64, none negative) in one pass of the fused
    kernels' *count* (``ties.c``); None without them, or where the sample
    holds a NaN (which *count* puts nowhere, so the entries below could not
    be told by subtraction)."""
    import numpy as np

    from ..native import ties

    fused = ties.kernels() if sample.dtype in (np.float32, np.float64) and sample.flags.c_contiguous else None
    if fused is None or np.isnan(sample.sum()):  # the sum of magnitudes is NaN only with a NaN
        return None
    above, sel = fused.count(sample, a, b, np.empty_like(sample))
    return sample.size - above - sel.size, sel


def _bracket_ranks(m: int, k: int, n: int, stride: int) -> tuple[float, int, int]:
    """Where :func:`_bracket` looks in the sorted sample of ``m``: the
    answer's place ``at`` and the bracket's ends ``i_lo <= at <= i_hi``."""
    p = k / n  # the fraction at or above the answer
    at = (1.0 - p) * (m - 1)
    margin = 8.0 * math.sqrt(p * (1.0 - p) * m) + 2.0 * stride + 8.0
    return at, max(0, math.floor(at - margin)), min(m - 1, math.ceil(at + margin))


def _pick(n_above: int, inside, k: int, dtype) -> torch.Tensor | None:
    """The ``k``-th largest of all, given ``n_above`` values above the bracket
    and the values ``inside`` it (a numpy array of the caller's, reordered);
    None when it is not inside."""
    import torch

    r = k - n_above  # the answer is the r-th largest inside
    if n_above >= k or r > inside.size:
        return None
    at = inside.size - r
    # a 7B module's window holds ~250K magnitudes: selecting in a few percent of them,
    # bracketed from a subsample, is several times faster than partitioning them all
    if not _select_ranks(inside, at, at):
        inside.partition(at)
    return torch.tensor(inside[at], dtype=dtype)


def module_seed(seed: int, module: str, index: int) -> int:
    """A 63-bit generator seed from ``(seed, module name, adapter index)``.

    Derived with sha256, so it does not depend on the order modules are
    visited, on the process (no Python ``hash``), or on the device.
    """
    h = hashlib.sha256(f"loramix.dare/{seed}/{module}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dare_mask(
    shape: tuple[int, ...], density: float, seed: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask as float32 0/1 on the CPU, drawn from
    a CPU generator seeded with ``seed`` (the same draws on any device), into
    ``out`` (a float32 CPU tensor of ``shape``) when given.

    ``torch.rand(float32) < density`` draws exactly what PEFT's
    ``random_pruning`` draws (``torch.bernoulli(torch.full_like(x, density))``
    on a float32 ``x``) from a generator in the same state; tests check it.
    The native kernel (``loramix/native/dare.c``: torch's Mersenne Twister
    and its conversion, one entry at a time) gives the same bits about 4x
    faster; the draw is serial, DARE's largest cost.
    """
    import torch

    from ..native import dare

    kernel = dare.kernels()
    if kernel is not None and (out is None or out.is_contiguous()):
        out = torch.empty(shape, dtype=torch.float32) if out is None else out
        kernel.mask(seed, density, out)
        return out
    g = torch.Generator(device="cpu").manual_seed(seed)
    if out is None:
        return torch.rand(shape, generator=g, dtype=torch.float32).lt_(density)
    return torch.rand(shape, generator=g, dtype=torch.float32, out=out).lt_(density)


def trim_and_elect(
    xs: Sequence[torch.Tensor], weights: Sequence[float], density: float, sign: str, divide: str, scratch=None
) -> torch.Tensor:
    """``elect_and_merge([trim_(x, density) for x in xs], ...)``, the same
    values; with ``scratch``, on large matrices, each delta's threshold is
    found first and the trim runs block by block just before the election,
    while the block is in the cache."""
    x0 = xs[0]
    thresholds = []
    if density < 1.0 and _by_rows(x0, scratch) and all(x.is_contiguous() and x.shape == x0.shape for x in xs):
        k = int(density * x0.numel())
        one = (
            _ties_in_one_pass([_DeltaRows(x) for x in xs], k, weights, sign, divide, scratch)
            if k > 0
            else None
        )
        if one is not None and one is not MISSED:
            return one
        thresholds = _abs_kth_largest_many(xs, k, scratch) if k > 0 else [None] * len(xs)
        for x, thr in zip(xs, thresholds):
            if thr is None:  # nothing kept, or the sample missed: trimmed here, the exact way
                trim_(x, density, scratch)
    else:
        xs = [trim_(x, density, scratch) for x in xs]
    if not any(t is not None for t in thresholds):
        return elect_and_merge(xs, weights, sign, divide, scratch)
    return _trim_and_elect_rows([_DeltaRows(x) for x in xs], thresholds, weights, sign, divide, scratch)


def ties_from_factors(
    ctx: ModuleContext,
    module_deltas: Sequence[ModuleDelta],
    weights: Sequence[float],
    density: float,
    sign: str,
    divide: str,
    deferred=None,
) -> torch.Tensor | OnePassTies | None:
    """:func:`trim_and_elect` of the deltas ``w_i B_i A_i`` of factor kinds
    (those that do not need the base) from their factors, the same bits,
    without forming any delta whole (:class:`_FactorRows`): one pass over
    blocks of rows finds each delta's exact threshold, a second re-forms
    each block, trims and elects it while it is in the cache. Memory: the
    result and a few blocks per thread, instead of one float32 delta per
    adapter. None where it does not apply (a dense or small delta, another
    device, no ``ctx.scratch``, nothing trimmed or nothing kept, or a
    sample that missed its bracket): the caller then takes the dense way.

    ``deferred``, a function that forms the delta (the caller's whole way):
    where the one pass applies, its brackets only, as a :class:`OnePassTies`
    that runs the pass when the engine adds it."""
    import torch

    if (
        density >= 1.0
        or ctx.scratch is None
        or ctx.device.type != "cpu"
        or ctx.dtype not in (torch.float32, torch.float64)
        or any(m.kind.needs_base for m in module_deltas)
    ):
        return None
    out_f, in_f = module_deltas[0].shape
    k = int(density * out_f * in_f)
    if k <= 0 or out_f * in_f < BRACKET_MIN or any(m.shape != (out_f, in_f) for m in module_deltas):
        return None
    srcs = [
        _FactorRows(*_weighted_factors(ctx, m, float(w)), ctx.scratch, f"ties_rows{i}")
        for i, (m, w) in enumerate(zip(module_deltas, weights))
    ]
    one = _OnePass.prepare(srcs, k, weights, sign, divide, ctx.scratch)
    if one is not None and deferred is not None:
        return OnePassTies(one, deferred)
    got = None if one is None else one.run()
    if got is not None:
        return None if got is MISSED else got
    thresholds = _abs_kth_largest_many(srcs, k, ctx.scratch)
    if any(t is None for t in thresholds):
        return None
    return _trim_and_elect_rows(srcs, thresholds, weights, sign, divide, ctx.scratch)


#: what :func:`_ties_in_one_pass` gives when a sample's bracket missed its threshold
MISSED = object()
#: the one pass is taken while the brackets hold at most this share of the
#: entries, summed over the deltas (each ~0.5% for a 7B module at density 0.2,
#: ~3% for GPT-2 small's): their positions are recorded, with every delta's
#: value there, and elected again
ONE_PASS_MAX_SHARE = 1 / 4
#: ... and while those records take at most this many bytes
ONE_PASS_MAX_BYTES = 64 << 20
#: the positions recorded in the one pass: where some delta's magnitude lies
#: within this many standard errors (of the sample's rank) of the estimate
#: (the bracket takes 8); the threshold lies outside with odds of ~6e-5, and
#: then the two passes run instead
ONE_PASS_BAND = 4.0


def _ties_in_one_pass(srcs, k: int, weights, sign: str, divide: str, scratch):
    """:func:`trim_and_elect` of the deltas ``srcs`` (:class:`_DeltaRows`, one
    shape) by the fused kernels' *pass* (``loramix/native/ties.c``): each
    block of rows is formed and read once, instead of once to count for the
    thresholds and again to trim and elect. The block is counted against
    each delta's bracket ``[lo_i, hi_i]`` and elected trimmed at the
    sample's estimate of the threshold (in the bracket); that is the final
    result wherever no delta is inside its bracket (an entry above ``hi_i``
    is kept, one below ``lo_i`` trimmed, at any threshold in between). The
    positions where some delta is inside are recorded with every delta's
    value, and once the exact thresholds are picked, those that the exact
    trims cut another way are elected again (*fixup*): the same bits as the
    two passes. None where it does not apply (no kernels, brackets too wide:
    :data:`ONE_PASS_MAX_SHARE`); :data:`MISSED` where a bracket missed."""
    one = _OnePass.prepare(srcs, k, weights, sign, divide, scratch)
    return None if one is None else one.run()


class _OnePass:
    """The state of :func:`_ties_in_one_pass` for one module: the brackets
    (from the samples), the blocks' step, each thread's prepared kernel
    pass; :meth:`block` runs the pass on a block of rows, :meth:`thresholds`
    picks the exact thresholds from every block's counts."""

    @classmethod
    def prepare(cls, srcs, k: int, weights, sign: str, divide: str, scratch) -> _OnePass | None:
        """The brackets of ``srcs`` for the ``k`` largest magnitudes, or None
        where the one pass does not apply (no kernels, brackets too wide)."""
        fused = _fused(srcs[0], len(srcs))
        if fused is None:
            return None
        one = cls(srcs, k, weights, sign, divide, scratch, fused)
        return one if one.lo is not None else None

    def __init__(self, srcs, k: int, weights, sign: str, divide: str, scratch, fused):
        import numpy as np
        import torch

        s0, n = srcs[0], len(srcs)
        self.srcs, self.k, self.weights, self.scratch, self.fused = srcs, k, weights, scratch, fused
        self.shape = s0.shape
        rows, cols = s0.shape
        total = rows * cols

        def bracket(i: int):
            sample = srcs[i].abs_sample()
            m = sample.size
            lo, hi = _bracket(sample, k, total, srcs[i].stride)
            # _bracket left the sample's ranks i_lo .. i_hi (those in [lo, hi]) together:
            # the estimate is the sample's own k-th largest, at rank `at` among them, and
            # the band ONE_PASS_BAND standard errors of that rank around it
            at, i_lo, i_hi = _bracket_ranks(m, k, total, srcs[i].stride)
            inside = np.sort(sample[i_lo : i_hi + 1])
            p = k / total
            band = ONE_PASS_BAND * math.sqrt(p * (1.0 - p) * m)
            mid, rlo, rhi = (
                inside[min(max(round(r - i_lo), 0), inside.size - 1)] for r in (at, at - band, at + band)
            )
            # in [lo, hi] (the infinite ends included): what the records and the fixup assume
            mid, rlo, rhi = (min(max(v, lo), hi) for v in (mid, rlo, rhi))
            return lo, hi, mid, rlo, rhi, inside.size / m

        brackets = _each(n, bracket)
        dt = torch.empty(0, dtype=s0.dtype).numpy().dtype
        share = sum(b[5] for b in brackets)
        self.lo = None
        if share > ONE_PASS_MAX_SHARE or share * total * (8 + n * dt.itemsize) > ONE_PASS_MAX_BYTES:
            return
        self.lo, self.hi, self.prov, self.rlo, self.rhi = (
            np.array([b[j] for b in brackets], dtype=dt) for j in range(5)
        )
        self.w = np.array([float(v) for v in weights], dtype=dt)
        self.mass, self.by_count = sign == "mass", divide == "count"
        self._passes: dict = {}  # thread -> its prepared pass
        self.Bs, self.As = _formable(srcs)
        self.tile_rows = max(1, FORM_TILE_ENTRIES // cols)
        # formed tile by tile, a block need not fit the cache: larger blocks, fewer calls
        self.step, self.taper = _row_step(s0, formed=True), 0
        if self.Bs is None or not fused.forms_like_mm(min(self.step, rows), cols, self.As[0].shape[0]):
            self.step = _row_step(s0)
        else:  # the last blocks no larger than those formed into memory
            self.taper = min(self.step, _row_step(s0))

    def _pass(self, j: int):
        one = self._passes.get(j)
        if one is None:
            import torch

            def space(role: str, m: int, dtype):
                t = self.scratch.get(f"{role}/{j}", (m,), getattr(torch, dtype.name), self.srcs[0].device)
                return t.numpy()

            args = (self.lo, self.hi, self.prov, self.rlo, self.rhi, self.w, self.mass, self.by_count, space)
            one = self._passes[j] = self.fused.one_pass(*args)
        return one

    def formed(self, r0: int, r1: int) -> list | None:
        """The factors' rows ``r0:r1`` where the pass may form that block itself, else None."""
        if self.Bs is not None and self.fused.forms_like_mm(r1 - r0, self.shape[1], self.As[0].shape[0]):
            return [b[r0:r1] for b in self.Bs]
        return None

    @staticmethod
    def _part(one, r0: int, cols: int, records: int) -> tuple:
        counts = [(int(c), a[:m].copy()) for c, a, m in zip(one.above, one.windows, one.n_window)]
        return counts, one.pos[:records] + r0 * cols, [v[:records].copy() for v in one.vals]

    def block(self, r0: int, r1: int, j: int, out) -> tuple:
        """The pass on rows ``r0:r1`` in thread ``j``, elected into ``out``
        (those rows): ``(counts, positions, values)``, the block's part."""
        one, Bs = self._pass(j), self.formed(r0, r1)
        records = None if Bs is None else one.run_formed(Bs, self.As, out, self.tile_rows)
        if records is None:
            records = one.run([s.rows(r0, r1, j) for s in self.srcs], out)
        return self._part(one, r0, self.shape[1], records)

    def run(self):
        """The pass over every block into ``scratch``'s ``elect_out``, then the
        fixup: :func:`_ties_in_one_pass`'s result."""
        import numpy as np

        from ..engine import run_threads

        s0 = self.srcs[0]
        out = self.scratch.get("elect_out", s0.shape, s0.dtype, s0.device)
        parts = _rows(s0, lambda r0, r1, j: self.block(r0, r1, j, out[r0:r1]), self.step, self.taper)
        lams = self.thresholds(parts)
        if lams is None or lams is MISSED:
            return lams
        per_thread = -(-len(parts) // run_threads())  # the blocks' records in one share per thread

        def fixup(j: int) -> None:
            mine = parts[j * per_thread : (j + 1) * per_thread]
            at = np.concatenate([p[1] for p in mine])
            if at.size:
                vals = [np.concatenate([p[2][i] for p in mine]) for i in range(len(self.srcs))]
                self.fused.fixup(vals, self.prov, lams, self.weights, self.mass, self.by_count, at, out)

        _each(-(-len(parts) // per_thread), fixup)
        return out

    def thresholds(self, parts) -> list | None:
        """The trims' lambdas just below each exact threshold, from the
        blocks' parts; :data:`MISSED` where a bracket missed, None where a
        threshold lies outside its band (its entries were not recorded)."""
        thresholds = _pick_each([p[0] for p in parts], self.k, self.srcs[0].dtype)
        if any(t is None for t in thresholds):
            return MISSED
        if not all(a <= float(t) <= b for a, t, b in zip(self.rlo, thresholds, self.rhi)):
            return None
        return [_just_below(t) for t in thresholds]


class OnePassTies:
    """A module's TIES delta from factors, not yet formed: what
    :meth:`~loramix.methods.ties.Ties.delta` gives a streaming merge into a
    base that takes it (``ModuleContext.deferred``), so that the one pass
    (:func:`_ties_in_one_pass`) can add each tile of the election to ``W0``
    while it is in the cache (:meth:`add_bf16`) instead of writing a
    float32 delta for the engine to read back. ``shape``: ``(out, in)``.
    :meth:`materialize` forms it as the method would have, the same bits."""

    def __init__(self, one: _OnePass, materialize):
        self.one, self._materialize, self.shape = one, materialize, tuple(one.shape)

    def materialize(self) -> torch.Tensor:
        """The dense delta ``(out, in)``, as :meth:`Ties.delta` gives it: the
        one pass on the brackets found, else the method's whole way."""
        out = self.one.run()
        return self._materialize() if out is None or out is MISSED else out

    def add_bf16(self, stored, out, read, by_blocks) -> bool | None:
        """``out = bf16(f32(stored) + delta)`` for a bfloat16 ``stored``
        ``(out, in)`` whose rows ``read(r0, r1)`` fills from the file
        (``out`` may be ``stored``); the bits of the engine's add of
        :meth:`materialize`'s delta (the same kernel, tile by tile, and at
        the records the kernel's add of their final election). Blocks run by
        ``by_blocks(step, taper, fn)`` (the engine's threads). True when every
        result is finite (else some may not be: the caller checks); None when
        a threshold lay outside what the pass recorded: ``stored`` and
        ``out`` then hold neither ``W0`` nor the result (read again, and add
        :meth:`materialize`'s delta)."""
        import numpy as np
        import torch

        from ..native import bf16

        one, kernel = self.one, bf16.kernels()
        cols, add = self.shape[1], kernel.address

        def block(r0: int, r1: int, j: int) -> tuple:
            read(r0, r1)
            w0, outb = stored[r0:r1], out[r0:r1]
            p, Bs = one._pass(j), one.formed(r0, r1)
            if Bs is not None:
                tile = one.scratch.get(f"ties_tile/{j}", (one.tile_rows, cols), torch.float32, stored.device)
                records = p.run_formed(Bs, one.As, tile, one.tile_rows, into=(add, w0, outb))
                if records is not None:
                    mine = (p.w0rec[:records].copy(), p.provrec[:records].copy(), p.bad)
                    return (*one._part(p, r0, cols, records), *mine)
            # formed into memory: the block's election, then the add, the same bits
            blk = one.scratch.get(f"ties_block/{j}", (r1 - r0, cols), torch.float32, stored.device)
            records = p.run([s.rows(r0, r1, j) for s in one.srcs], blk)
            at = torch.from_numpy(p.pos[:records])
            mine = (w0.reshape(-1)[at].view(torch.uint16).numpy(), blk.reshape(-1)[at].numpy())
            return (*one._part(p, r0, cols, records), *mine, not kernel.add(w0, blk, outb))

        parts = by_blocks(one.step, one.taper, block)
        lams = one.thresholds(parts)
        if lams is None or lams is MISSED:
            return None
        flat, how = out.view(-1), (one.prov, lams, one.weights, one.mass, one.by_count)

        def fixup(i: int) -> bool:
            # a block's records, elected again where the exact trims cut otherwise. The
            # tiles added every record's provisional election already: only those the fixup
            # moved (about a tenth) are added to their W0 again, by the kernel the tiles used
            at, vals, w0, final = parts[i][1:5]
            bits = final.view(f"u{final.itemsize}")
            prov = bits.copy()
            if not one.fused.fixup(vals, *how, np.arange(at.size), torch.from_numpy(final)):
                return True
            moved = np.flatnonzero(bits != prov)
            sums = torch.empty(moved.size, dtype=torch.bfloat16)
            finite = kernel.add(torch.from_numpy(w0[moved]), torch.from_numpy(final[moved]), sums)
            flat[torch.from_numpy(at[moved])] = sums
            return finite

        finite = _each(len(parts), fixup)  # every block's, on the run's threads
        return not any(p[5] for p in parts) and all(finite)


def _formable(srcs) -> tuple[list, list] | tuple[None, None]:
    """``(Bs, As)``: the factors of ``srcs`` where the one pass may form
    their blocks itself, tile by tile (:meth:`loramix.native.ties.OnePass.run_formed`:
    float32 :class:`_FactorRows` of one rank with C-contiguous factors, as
    ``torch.mm`` reads them); else ``(None, None)``."""
    import torch

    if not all(isinstance(s, _FactorRows) and s.dtype == torch.float32 for s in srcs):
        return None, None
    Bs, As = [s.B for s in srcs], [s.A for s in srcs]
    if len({a.shape[0] for a in As}) != 1 or not all(t.is_contiguous() for t in (*Bs, *As)):
        return None, None
    return Bs, As


def _trim_and_elect_rows(srcs, thresholds, weights, sign: str, divide: str, scratch) -> torch.Tensor:
    """The election of :func:`trim_and_elect` by blocks of rows of the
    deltas ``srcs`` (:class:`_DeltaRows`), each block trimmed at its delta's
    threshold first (None: nothing to trim). The result is ``scratch``'s."""
    import torch

    s0 = srcs[0]
    out = scratch.get("elect_out", s0.shape, s0.dtype, s0.device)
    below = [None if t is None else _just_below(t) for t in thresholds]

    fused = _fused(s0, len(srcs))

    def block(r0: int, r1: int, j: int) -> None:
        shape = (r1 - r0, s0.shape[1])
        blocks = [s.rows(r0, r1, j) for s in srcs]
        if fused is not None:
            fused.elect(blocks, below, weights, sign == "mass", divide == "count", out[r0:r1])
            return
        for xb, lam in zip(blocks, below):
            if lam is not None:  # |x| >= thr is |x| > lam: one pass instead of abs, compare, multiply
                torch.hardshrink(xb, lam, out=xb)
        g = scratch.get(f"elect_g{j}", shape, s0.dtype, s0.device)
        den = scratch.get(f"elect_den{j}", shape, s0.dtype, s0.device)
        _elect(blocks, weights, sign, divide, g, out[r0:r1], den)

    _rows(s0, block)
    return out


def _fused(t, adapters: int = 1):
    """The fused kernels (:mod:`loramix.native.ties`) for blocks of ``t`` (a
    tensor or :class:`_DeltaRows`: float32/float64 on the CPU), or None: the
    eager code, the same bits, runs instead."""
    import torch

    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    from ..native import ties

    return ties.kernels() if adapters <= ties.MAX_ADAPTERS else None


def _just_below(thr: torch.Tensor) -> float | None:
    """The largest float of ``thr``'s dtype below ``thr`` (a 0-d tensor, the
    k-th largest magnitude): ``hardshrink(x, lam)`` zeroes ``|x| <= lam``,
    so it keeps exactly ``|x| >= thr``. None when ``thr <= 0`` (everything is
    kept). A trimmed entry becomes +0 where ``x * 0`` gives -0 for a negative
    ``x``; the election cannot tell them apart (``+0 >= 0`` and ``-0 >= 0``,
    and a sum that starts from +0 loses the sign of zeros added to it)."""
    import numpy as np

    t = thr.detach().cpu().numpy()
    if not t > 0:
        return None
    return float(np.nextafter(t, t.dtype.type(-np.inf)))


def elect_and_merge(
    xs: Sequence[torch.Tensor], weights: Sequence[float], sign: str, divide: str, scratch=None
) -> torch.Tensor:
    """TIES' sign election and disjoint merge of trimmed, *weighted* deltas
    ``x_i = w_i t_i``::

        mass:  g = sign(sum_i x_i)          count: g = sign(sum_i sign(x_i))     (0 -> +1)
        keep_i = sign(x_i) == g             (zeros are never kept)
        merged = sum_i keep_i x_i / D,  D = max(sum_i keep_i, 1)        divide=count (PEFT)
                                        D = sum_i keep_i w_i, 0 -> 1    divide=weight (mergekit)

    ``divide=weight`` with a negative ``w_i`` is computed as written (``D``
    can cancel the sign, vanish or nearly); ``merge`` refuses it before
    (:func:`~loramix.methods.params.check_divide_weights`). A zero ``w_i``
    gives ``x_i = 0``, never kept: that adapter neither votes nor counts.

    The sign is elected on the weighted deltas, as mergekit does; PEFT elects
    on the unweighted ones, which gives the same result for ``count`` with
    positive weights and for ``mass`` with equal positive weights.

    The ``xs`` are consumed (overwritten). Float arithmetic only, no boolean
    tensors: ``y_i = max(x_i g, 0)`` is ``|x_i|`` where ``x_i`` agrees with
    ``g`` and 0 elsewhere, so ``sum_i keep_i x_i = g sum_i y_i`` and
    ``keep_i = sign(y_i)``. ``scratch`` (optional, a ``get(role, shape,
    dtype, device)``) lends the work tensors; the result is one of them. With
    it, a large matrix is worked on by blocks of rows (the same operations on
    each block: elementwise, so the same values).
    """
    import torch

    x0 = xs[0]
    if _by_rows(x0, scratch) and all(x.is_contiguous() and x.shape == x0.shape for x in xs):
        out = scratch.get("elect_out", x0.shape, x0.dtype, x0.device)
        fused = _fused(x0, len(xs))

        def block(r0: int, r1: int, j: int) -> None:
            if fused is not None:
                fused.elect(
                    [x[r0:r1] for x in xs],
                    [None] * len(xs),
                    weights,
                    sign == "mass",
                    divide == "count",
                    out[r0:r1],
                )
                return
            shape = (r1 - r0, x0.shape[1])
            g = scratch.get(f"elect_g{j}", shape, x0.dtype, x0.device)
            den = scratch.get(f"elect_den{j}", shape, x0.dtype, x0.device)
            _elect([x[r0:r1] for x in xs], weights, sign, divide, g, out[r0:r1], den)

        _rows(x0, block)
        return out

    def work(role: str) -> torch.Tensor:
        if scratch is None:
            return torch.empty_like(x0)
        return scratch.get(role, x0.shape, x0.dtype, x0.device)

    return _elect(xs, weights, sign, divide, work("elect_g"), work("elect_num"), work("elect_den"))


def _elect(xs, weights, sign: str, divide: str, g, num, den) -> torch.Tensor:
    """:func:`elect_and_merge` into the work tensors ``g``, ``num`` (the
    result) and ``den``, all of the ``xs``' shape."""
    import torch

    if sign == "mass":
        g.copy_(xs[0])
        for x in xs[1:]:
            g += x
    else:
        torch.sign(xs[0], out=g)
        for x in xs[1:]:
            g += torch.sign(x)
    g = g.ge_(0).mul_(2).sub_(1)  # +1 / -1, in place
    num.zero_()
    den.zero_()
    for x, w in zip(xs, weights):
        y = x.mul_(g).clamp_(min=0)
        num += y
        if divide == "count":
            den += y.sign_()  # y is no longer needed
        else:
            den.add_(y.sign_(), alpha=float(w))
    if divide == "count":
        den.clamp_(min=1.0)
    else:
        den.masked_fill_(den == 0, 1.0)
    return num.mul_(g).div_(den)


# ----------------------------------------------------------------------------- truncation facts


def energy_info(S: torch.Tensor, k: int, stacked: int) -> dict:
    """The facts of a rank-``k`` truncation of singular values ``S``."""
    e = S.double().cpu() ** 2
    total, dropped = float(e.sum()), float(e[k:].sum())
    return {
        "rank": int(k),
        "stacked_rank": int(stacked),
        "energy_total": total,
        "energy_discarded": dropped,
        "energy_discarded_fraction": dropped / total if total > 0 else 0.0,
    }


def summarize_energy(facts: dict[str, dict]) -> dict:
    """Totals of per-module truncation facts: ranks, discarded energy (absolute
    and relative to ``sum ||D||_F^2``) and the worst module."""
    facts = {n: f for n, f in facts.items() if "energy_total" in f}
    if not facts:
        return {}
    total = sum(i["energy_total"] for i in facts.values())
    dropped = sum(i["energy_discarded"] for i in facts.values())
    worst = max(facts, key=lambda n: facts[n]["energy_discarded_fraction"])
    return {
        "ranks": sorted({i["rank"] for i in facts.values()}),
        "energy_discarded": dropped,
        "energy_discarded_fraction": dropped / total if total > 0 else 0.0,
        "worst_module": worst,
        "worst_module_discarded_fraction": facts[worst]["energy_discarded_fraction"],
    }


def ranks_text(ranks: Sequence[int]) -> str:
    """The sorted ``ranks`` of a merge's modules in words: ``8`` or ``5..9``."""
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def factor_pair_merged(m: MergeMethod, ctx: ModuleContext, module_deltas, weights, params) -> tuple:
    """:meth:`MergeMethod.merged` of a low-rank method whose factors are
    computed in float64 (``iso-c``, ``tsv``): the pair ``(B, A)`` in
    ``ctx.dtype``, which the engine adds in one fused product (no dense delta
    formed), and the module's facts."""
    import torch

    lr = m.factors(
        ModuleContext(ctx.name, ctx.indices, ctx.device, torch.float64), module_deltas, weights, params
    )
    return (lr.B.to(ctx.dtype), lr.A.to(ctx.dtype)), lr.info


def describe_energy(summary: dict) -> list[str]:
    """:func:`summarize_energy`'s totals in words."""
    if "energy_discarded_fraction" not in summary:
        return []
    return [
        f"rank {ranks_text(summary['ranks'])}; discarded energy {summary['energy_discarded']:.4g} "
        f"({100 * summary['energy_discarded_fraction']:.3g}% of ||merged||^2); worst module "
        f"{summary['worst_module']} ({100 * summary['worst_module_discarded_fraction']:.3g}%)"
    ]


# ----------------------------------------------------------------------------- an adapter output


def check_adapter_output(m: MergeMethod, ads: Sequence, trunc) -> None:
    """Without a base the result must be an adapter: a low-rank method, or any
    method truncated to a rank (``trunc``), and adapters whose deltas do not
    depend on the base, made for one base. ``ads``: loaded
    :class:`~loramix.adapter.Adapter`\\ s (a kind object each), or the numpy
    reader's LoRA adapters (``kind`` ``"lora"``, which needs no base). Torch-free."""
    from ..errors import AdapterError
    from ..io.peft_layout import check_one_base

    check_one_base(list(ads))
    # first: no flag makes an adapter of these, so the method's hint below would mislead
    for ad in ads:
        if getattr(ad.kind, "needs_base", False):
            raise AdapterError(
                ad.path or ad.name,
                f"is a {ad.kind.label} adapter: its effective delta depends on the base weights, so no "
                "LoRA adapter holds the result; merge it into the base with --into BASE",
            )
    if not m.low_rank and trunc is None:
        names = _low_rank_names()
        small = _in_small_bases(m)
        core = f"; {' and '.join(small)}: {m.name} in bases the adapters span" if small else ""
        raise UsageError(
            "into",
            f"method {m.name} writes a dense delta: pass --into BASE, or --out-rank K / --energy F "
            f"for an adapter truncated by SVD (only {', '.join(names)} write an exact adapter{core})",
        )


def _low_rank_names() -> list[str]:
    from . import _REGISTRY

    return sorted(n for n, c in _REGISTRY.items() if c.low_rank)


def _in_small_bases(m: MergeMethod) -> list[str]:
    """The registered methods that run ``m`` on the deltas in small bases
    (:meth:`loramix.methods.core.CoreSpace.of`: their ``inner``), sorted."""
    from . import _REGISTRY

    return sorted(n for n, c in _REGISTRY.items() if getattr(c, "inner", None) is type(m))


# ----------------------------------------------------------------------------- the adapter output's truncation


def rank_cap(adapters: Sequence, stacked: bool) -> tuple[int, str]:
    """The largest rank of a merged module delta over the adapters' modules
    ``m``, and its words: with ``stacked`` (exact factors
    ``B_cat (out, R_m) @ A_cat (R_m, in)``) the stacked rank
    ``max_m R_m``, ``R_m = sum_i r_i`` over the adapters that touch ``m``
    (what ``svd --rank`` was always checked against; a module narrower than
    ``R_m`` keeps ``min(out, in)``), else ``max_m min(out_m, in_m)``, which
    bounds any ``(out, in)`` delta. Torch-free: ``adapters`` may be the numpy
    reader's."""
    ranks: dict[str, int] = {}
    dims: dict[str, int] = {}
    for ad in adapters:
        for name, md in ad.modules.items():
            ranks[name] = ranks.get(name, 0) + md.rank
            dims[name] = min(md.shape)
    if stacked:
        cap = max(ranks.values(), default=0)
        return cap, f"the stacked rank {cap} of the adapters (the sum of their ranks)"
    cap = max(dims.values(), default=0)
    return cap, f"{cap}, the largest rank a merged module can have (per module min(out, in))"


def check_out_rank(m: MergeMethod, params: dict, ads: Sequence, trunc) -> None:
    """``--out-rank K`` above :meth:`MergeMethod.rank_cap` is refused, as
    ``svd --rank`` is: no module would hold rank ``K``. Below the cap a module
    of lower rank keeps all of it (``min(K, rank)``, exactly)."""
    out_rank = None if trunc is None else trunc[0]
    if out_rank is None:
        return
    cap, what = m.rank_cap(params, ads)
    if out_rank > cap:
        raise UsageError("--out-rank", f"{out_rank} is above {what}: give at most {cap}")


def split_truncation(m: MergeMethod, params: dict, into) -> tuple[int | None, float | None] | None:
    """Pop the adapter-output truncation (``out_rank``; ``energy`` unless the
    method declares its own) from ``params``: ``(out_rank, energy)`` or None.
    Torch-free, as is :meth:`MergeMethod.coerce_params` of what is left."""
    out_rank = params.pop("out_rank", None)
    energy = None if any(q.name == "energy" for q in m.params) else params.pop("energy", None)
    if out_rank is None and energy is None:
        return None
    if m.no_truncation is not None:
        raise UsageError("--out-rank/--energy", f"method {m.name} is not truncated: {m.no_truncation}")
    if into is not None:
        raise UsageError(
            "--out-rank/--energy", "truncate an adapter output; a merge --into BASE is not truncated"
        )
    return check_truncation(out_rank, energy)


def check_truncation(out_rank, energy) -> tuple[int | None, float | None]:
    """``(out_rank, energy)`` coerced and range-checked; at most one of them."""
    if out_rank is not None and energy is not None:
        raise UsageError("--out-rank/--energy", "give one of --out-rank K or --energy F, not both")
    from ..options import check_numbers

    check_numbers({"--out-rank": out_rank, "--energy": energy})  # "2" was parsed, True taken as 1
    if out_rank is not None:
        if not (isinstance(out_rank, numbers.Integral) or float(out_rank).is_integer()):
            raise UsageError("--out-rank", f"{out_rank!r} is not a valid int")  # int(2.5) kept rank 2
        out_rank = int(out_rank)
        if out_rank < 1:
            raise UsageError("--out-rank", f"{out_rank} is below 1")
    if energy is not None:
        energy = float(energy)
        if not 0.0 < energy <= 1.0:
            raise UsageError("--energy", f"{energy} is outside (0, 1]: it is the fraction of the energy kept")
    return out_rank, energy
