"""DELLA (Deep et al. 2024), mergekit's ``della`` (``della_magprune``
sparsification, L1 rescaling, TIES sign consensus, normalised; docs/merging.md).

For each delta ``x = w_i dW_i`` (out, in), row by row::

    rank      = 1..in, the position of |x_rc| in its row, ascending
    p_rc      = density - epsilon + 2 epsilon (rank - 1) / (in - 1)     keep probability
    keep_rc   ~ Bernoulli(p_rc)                                          seeded per (seed, module, adapter)
    t_i       = (x * keep) * ||x||_1 / ||x * keep||_1                    (L1 rescale)
    merged    = lambda * elect_and_merge(t_i, w_i, sign, divide)         divide=weight: mergekit's normalize

so larger magnitudes are dropped less often. The rescale is skipped, as
mergekit's ``rescaled_masked_tensor`` skips it, where ``||dW_i||_1`` or
``||dW_i * keep||_1`` (the *unweighted* delta's: mergekit sparsifies before it
weights) is below ``1e-7``; the factor ``||x||_1 / ||x * keep||_1`` itself
does not depend on ``w_i``. The draws come from a CPU
generator seeded with :func:`~loramix.methods.base.module_seed` (the same on
any device); ``torch.bernoulli`` with that generator, as mergekit draws with
the global one. On float32 CPU deltas the native kernel keeps row by row,
the same bits: each entry's rank bounded by a count of its magnitude's
leading bits, which decides nearly every keep, the few left ranked exactly,
ties as torch's sort ranks them where that changes a keep; it sums the rows'
L1 norms as it goes (:func:`_kept_by_kernel`, docs/merging.md). In a
streaming merge on the CPU the deltas of factor kinds are never formed
whole: each block of rows is formed from the factors and kept, its keep
saved as bits, then formed again, kept by those bits, rescaled and elected
(:class:`FactorKeeps`), the same bits.
"""

from __future__ import annotations

from . import register
from .base import (
    DENSITY,
    LAMBDA,
    SEED,
    SIGN,
    FactorBlocks,
    MergeMethod,
    Param,
    dense_deltas,
    elect_and_merge,
    factor_sources,
    module_seed,
)
from .dare import fused_election, generator_states
from .params import in_unit_interval

EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "half-width of the keep probabilities around density (by magnitude rank)",
    check=in_unit_interval,
)
DIVIDE_WEIGHT = Param(
    "divide",
    str,
    "weight",
    "divide agreeing entries by their summed weights (mergekit's normalize) or by their count",
    choices=("weight", "count"),
)


def della_table(n: int, density: float, epsilon: float):
    """The ``n`` keep probabilities by rank (0 .. n-1), float32 on the CPU,
    with the elementwise float32 operations the (out, in) formula would run
    (a single column: the middle, 0.5 of the way)."""
    import torch

    ranks = torch.arange(n, dtype=torch.float32)
    return (density - epsilon) + (ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)) * (2 * epsilon)


def della_keep_probs(x, density: float, epsilon: float):
    """``p`` (out, in) float32 on the CPU: the keep probability of each entry by its rank in its row."""
    import torch

    a = x.detach().abs().float().cpu()
    # Sorted as int32: for non-negative floats the bit patterns order as the values, and
    # torch's CPU argsort runs the same comparison sort for both dtypes (equal magnitudes
    # keep the float sort's order), about 1.2x faster than on the floats.
    order = a.view(torch.int32).argsort(dim=1)
    del a
    # The table scattered to the entries by the inverse of the sorting permutation: the
    # same bits as ranks -> probabilities on the whole matrix, without its three passes.
    table = della_table(order.shape[1], density, epsilon)
    return torch.empty(order.shape, dtype=torch.float32).scatter_(1, order, table.expand(order.shape))


def della_prune_(x, density: float, epsilon: float, seed: int, weight: float = 1.0):
    """Drop entries of ``x = weight * dW`` with :func:`della_keep_probs`,
    rescale to the L1 norm, in place. The rescale is skipped where the L1 norm
    of ``dW`` or of ``dW * keep`` is below ``1e-7`` (mergekit's guard, on the
    unweighted delta, so that the weights' overall size does not change which
    deltas are rescaled); a zero ``weight`` leaves ``x = 0``."""
    return della_prune_all([x], density, epsilon, [seed], [weight])[0]


def della_prune_all(xs, density: float, epsilon: float, seeds, weights):
    """:func:`della_prune_` of each ``x_i`` with ``seeds[i]`` and
    ``weights[i]``, in place. float32 CPU matrices are kept by the native
    kernel (:func:`_kept_by_kernel`, the same bits); others by torch."""
    if density >= 1.0:
        return xs
    import torch

    norms = _kept_by_kernel(xs, density, epsilon, seeds)
    if norms is None:
        before = [l1_norm(x) for x in xs]
        for x, seed in zip(xs, seeds):
            g = torch.Generator(device="cpu").manual_seed(seed)
            keep = torch.bernoulli(della_keep_probs(x, density, epsilon), generator=g)
            x.mul_(keep.to(device=x.device, dtype=x.dtype))
        norms = [(b, l1_norm(x)) for b, x in zip(before, xs)]
    for x, (before, after), weight in zip(xs, norms, weights):
        scale = rescale(before, after, weight)
        if scale is not None:
            x.mul_(scale)
    return xs


def rescale(before: float, after: float, weight: float) -> float | None:
    """The L1 rescale of a kept delta ``x = weight * dW``: ``||x||_1 /
    ||x * keep||_1`` (``before``, ``after``), or None (no rescale) where the
    *unweighted* delta's norm or its kept part's is below ``1e-7``
    (mergekit's guard, which sees the delta before its weight) or the
    weight is zero."""
    w = abs(weight)
    return before / after if w > 0 and before / w >= 1e-7 and after / w >= 1e-7 else None


def _keeps_as_torch(kernel, table) -> bool:
    """Whether ``dare.c`` keeps as torch would with the probabilities
    ``table``: its std::sort steps order equal magnitudes as this torch's
    argsort, and the table rises with the rank, as its bounds need (as
    della_table's float32 steps make it)."""
    return kernel.sorts_as_torch() and bool((table[1:] >= table[:-1]).all())


def _kept_by_kernel(xs, density: float, epsilon: float, seeds) -> list[tuple[float, float]] | None:
    """``x_i *= bernoulli(della_keep_probs(x_i), seeds[i])`` for each float32
    CPU matrix ``x_i`` by the native kernel (``dare.c``), the same bits, in
    blocks of rows shared out with the run's threads: each row's keep
    decided by bounds on its rank (a count of its magnitudes' leading bits),
    the few left open ranked exactly, std::sort's steps where equal
    magnitudes would keep otherwise; no probability matrix formed, the
    generator's state at each block's first entry found first by its twists
    alone. Returns each ``x_i``'s :func:`l1_norm` before and after the keep
    (the kernel sums each row as numpy does). None, nothing done, without
    the kernels, for another dtype or device, or where this torch's sort
    orders equal magnitudes otherwise than std::sort's steps in ``dare.c``."""

    import torch

    from ..engine import _block_bounds, block_rows, run_threads
    from ..native import dare

    kernel = dare.kernels()
    ok = all(
        x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous() for x in xs
    )
    if kernel is None or not ok:
        return None
    tables = [della_table(x.shape[1], density, epsilon) for x in xs]
    if not all(_keeps_as_torch(kernel, t) for t in tables):
        return None
    bounds = [_block_bounds(x.shape[0], block_rows(*x.shape, run_threads()), 1, 0, 1) for x in xs]
    states = generator_states(kernel, seeds, [[r0 * x.shape[1] for r0, _ in b] for x, b in zip(xs, bounds)])
    return _keep_blocks(
        kernel, states, tables, bounds, lambda i, r0, r1, j: xs[i][r0:r1], [x.numel() > 0 for x in xs]
    )


def _keep_blocks(kernel, states, tables, bounds, rows_of, nonempty, bits=None) -> list[tuple[float, float]]:
    """Each delta ``i``'s blocks ``bounds[i]`` kept in place by the kernel
    (``dare.c``; ``rows_of(i, r0, r1, j)``: its rows there, thread ``j``'s
    work; ``states[i]``: the generator's at each block's first entry;
    ``tables[i]``: its keep probabilities), the blocks of all the deltas
    shared out with the run's threads; each keep written to ``bits[i]``
    where given. Returns each delta's L1 norm before and after the keep: the
    exact sum of the kernel's row sums (numpy's), rounded once."""
    import math

    import numpy as np

    from ..engine import parallel_rows

    sums = [np.zeros((2, b[-1][1] if b else 0), dtype=np.float32) for b in bounds]
    jobs = [(i, b) for i in range(len(bounds)) if nonempty[i] for b in range(len(bounds[i]))]

    def keep(j0: int, j1: int, j: int) -> None:
        for i, b in jobs[j0:j1]:
            r0, r1 = bounds[i][b]
            kernel.della_keep_from(
                states[i], b, tables[i], rows_of(i, r0, r1, j), sums[i][0, r0:r1], sums[i][1, r0:r1],
                None if bits is None else bits[i][r0:r1],
            )  # fmt: skip

    parallel_rows(len(jobs), 1, keep)
    return [(math.fsum(s[0].tolist()), math.fsum(s[1].tolist())) for s in sums]


def l1_norm(x) -> float:
    """``||x||_1`` of ``x`` (out, in) as a float, the same bits on any number
    of threads: each row's ``sum |x_r|`` in ``x``'s dtype (numpy's pairwise
    order within the row), the rows in blocks shared out with the streaming
    run's threads (:func:`loramix.engine.parallel_rows`: a row is never
    split), then the exact sum of the row sums (``math.fsum``), rounded once.
    torch's ``x.abs().sum()`` splits the entries between its threads and
    rounds by their number: ``della --into`` wrote other bytes with
    ``--threads 1`` and ``--threads 2``. Elsewhere than float32/float64 on
    the CPU, torch's sum in float64."""
    import math

    import numpy as np
    import torch

    from ..engine import block_rows, parallel_rows, run_threads

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return float(x.detach().abs().sum(dtype=torch.float64))
    a = x.detach().numpy()
    rows, cols = a.shape
    step = block_rows(rows, cols, run_threads())
    parts = parallel_rows(rows, step, lambda r0, r1, j: np.add.reduce(np.abs(a[r0:r1]), axis=1).tolist())
    return math.fsum(v for part in parts for v in part)


@register
class Della(MergeMethod):
    name = "della"
    uses_base = False  # reads W0 only for kinds that need it
    summary = "drop entries with magnitude-ranked probabilities, rescale (L1), TIES election, normalised sum"
    params = (DENSITY, EPSILON, SEED, SIGN, DIVIDE_WEIGHT, LAMBDA)

    def check(self, params, adapters):
        from ..errors import UsageError

        d, e = params["density"], params["epsilon"]
        if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
            raise UsageError("--epsilon", f"density +- epsilon must lie in (0, 1); got {d} +- {e}")

    def delta(self, ctx, module_deltas, weights, W0, params):
        out = _from_factors(ctx, module_deltas, weights, params)
        if out is not None:
            return out
        seeds = [module_seed(params["seed"], ctx.name, i) for i in ctx.indices]
        xs = dense_deltas(ctx, module_deltas, W0, weights)
        della_prune_all(xs, params["density"], params["epsilon"], seeds, weights)
        out = elect_and_merge(xs, weights, params["sign"], params["divide"], ctx.scratch)
        return out.mul_(params["lambda_"]) if params["lambda_"] != 1.0 else out


def _from_factors(ctx, module_deltas, weights, params):
    """DELLA's merge of the deltas ``w_i B_i A_i`` of factor kinds from their
    factors, block by block of rows, no delta formed whole
    (:class:`FactorKeeps`): the merged delta, or, where the streaming merge
    takes one not yet formed (``ctx.deferred``), the :class:`FactorKeeps`
    itself, which adds each block to ``W0`` as it is combined. The same bits
    as the dense way; memory: each delta's keep as bits (an eighth of a byte
    an entry) and a few blocks per thread instead of a float32 delta per
    adapter. None where it does not apply (the kernels off or not torch's
    order, a dense or small delta, another device or dtype, no
    ``ctx.scratch``, more adapters than the fused election takes): the
    caller takes the dense way."""
    from ..native import dare, ties

    density, epsilon = params["density"], params["epsilon"]
    kernel, fused = dare.kernels(), ties.kernels()
    if kernel is None or fused is None or len(module_deltas) > ties.MAX_ADAPTERS or density >= 1.0:
        return None
    srcs = factor_sources(ctx, module_deltas, weights, "della_rows")
    if srcs is None:
        return None
    table = della_table(srcs[0].shape[1], density, epsilon)
    if not _keeps_as_torch(kernel, table):
        return None  # the dense way then keeps by torch's
    seeds = [module_seed(params["seed"], ctx.name, i) for i in ctx.indices]
    keeps = FactorKeeps(
        srcs, kernel, table, seeds, weights, fused_election(fused, weights, params), ctx.scratch
    )
    return keeps if ctx.deferred else keeps.materialize()


class FactorKeeps(FactorBlocks):
    """A module's DELLA delta from factors, not yet formed
    (:class:`~loramix.methods.base.FactorBlocks`), in two readings of the
    factors. First (here, on the run's threads): each block of rows of each
    delta formed and kept by the native kernel (``dare.c``, each block's
    draws from the generator's state at its first entry), which writes the
    keep as bits and sums each row's ``|x|`` before and after it; from those
    sums each delta's L1 rescale, as :func:`della_prune_all` computes it.
    Then, as the merge adds the module: each block formed again (the same
    bits), kept by its bits and rescaled (:meth:`prune`), and combined."""

    role = "della"

    def __init__(self, srcs, kernel, table, seeds, weights, combine, scratch):
        import numpy as np

        super().__init__(srcs, combine, scratch)
        self.kernel = kernel
        rows, cols = self.shape
        states = generator_states(kernel, seeds, [self.block_starts] * len(srcs))
        self.bits = [np.empty((rows, (cols + 7) // 8), dtype=np.uint8) for _ in srcs]
        norms = _keep_blocks(
            kernel, states, [table] * len(srcs), [self.bounds] * len(srcs),
            lambda i, r0, r1, j: srcs[i].rows(r0, r1, j), [True] * len(srcs), self.bits,
        )  # fmt: skip
        self.scales = [rescale(before, after, weight) for (before, after), weight in zip(norms, weights)]

    def prune(self, i: int, b: int, x) -> None:
        r0, r1 = self.bounds[b]
        self.kernel.della_apply(self.bits[i][r0:r1], x, self.scales[i])
