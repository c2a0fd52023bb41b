"""DARE (Yu et al. 2023): drop and rescale, then linear or TIES (docs/merging.md).

For deltas ``dW_i`` (out, in)::

    m_i    ~ Bernoulli(density)  entrywise, from a generator seeded by
             module_seed(seed, module, i): reproducible, independent of the
             order modules are visited and of the device (drawn on the CPU)
    t_i    = dW_i * m_i / density
    dare-linear: merged = lambda * sum_i w_i t_i
    dare-ties:   merged = lambda * elect_and_merge(t_i, w_i)   (sign election, disjoint mean)

``density = 1`` keeps everything (no draw), as PEFT does. In a streaming
merge on the CPU the deltas of factor kinds are formed, dropped and combined
block by block of rows, never whole (:func:`_from_factors`), the same bits;
into a bfloat16 base each block is added to ``W0`` as it is combined
(:class:`FactorDrops`).
"""

from __future__ import annotations

from . import register
from .base import (
    DENSITY,
    DIVIDE,
    LAMBDA,
    SEED,
    SIGN,
    FactorBlocks,
    MergeMethod,
    _by_rows,
    _rows,
    dare_mask,
    dense_deltas,
    elect_and_merge,
    factor_sources,
    module_seed,
)


def _drop_all(xs, density: float, seeds, scratch=None, then=None):
    """``x_j * m_j / density`` in place for each ``x_j`` of ``xs``,
    ``m_j = dare_mask(x_j.shape, density, seeds[j])``; ``density = 1`` keeps
    everything (no draw). ``then(r0, r1, j)`` (optional) runs afterwards on
    the rows ``r0:r1``.

    With ``scratch`` on large CPU matrices (a streaming merge): float32
    deltas are dropped by the native kernel, each whole by one thread
    (:func:`_dropped_by_kernel`), then ``then`` runs by blocks of rows.
    Else the masks are drawn a few at a time in parallel (each from its own
    generator, so the draws are those of one at a time; a draw is serial and
    the largest cost of DARE), into reused tensors, and each is applied by
    blocks of rows, ``then`` on each block after its rows of every delta are
    dropped, while they are in the cache."""
    blocked = scratch is not None and all(_by_rows(x, scratch) and x.device.type == "cpu" for x in xs)
    if density < 1.0 and blocked and _dropped_by_kernel(xs, density, seeds):
        if then is not None:
            _rows(xs[0], then)
        return xs
    if density < 1.0 and blocked:
        from ..engine import run_threads

        group = max(1, min(len(xs), run_threads()))  # masks drawn at once: one per thread
        for g0 in range(0, len(xs), group):
            part = list(range(g0, min(len(xs), g0 + group)))
            _drop_group(xs, part, density, seeds, scratch, then if part[-1] == len(xs) - 1 else None)
        return xs
    if density < 1.0:
        for x, seed in zip(xs, seeds):
            m = dare_mask(tuple(x.shape), density, seed).to(device=x.device, dtype=x.dtype, non_blocking=True)
            x.mul_(m).div_(density)
    if then is not None:
        then(0, xs[0].shape[0], 0)
    return xs


def _dropped_by_kernel(xs, density: float, seeds) -> bool:
    """Each float32 ``x_j`` dropped whole in place by the native kernel
    (``dare.c``: its mask applied as it is drawn, never held, the same
    bits), one delta per thread of the run; False, nothing done, without
    the kernels or for another dtype."""
    import torch

    from ..engine import parallel_rows
    from ..native import dare

    kernel = dare.kernels()
    if kernel is None or not all(x.dtype == torch.float32 and x.is_contiguous() for x in xs):
        return False

    def drop(i0: int, i1: int, k: int) -> None:
        for i in range(i0, i1):
            kernel.drop(seeds[i], density, xs[i])

    parallel_rows(len(xs), 1, drop)  # a draw is serial: the deltas share out the threads
    return True


def _drop_group(xs, part, density: float, seeds, scratch, then) -> None:
    """The masks of ``xs[i]`` for ``i`` in ``part`` drawn in parallel, then
    applied by blocks of rows (followed by ``then`` on each block)."""
    import torch

    from ..engine import parallel_rows

    masks = [
        scratch.get(f"dare_mask{n}", tuple(xs[i].shape), torch.float32, torch.device("cpu"))
        for n, i in enumerate(part)
    ]

    def draw(r0: int, r1: int, k: int) -> None:
        for n in range(r0, r1):
            dare_mask(tuple(xs[part[n]].shape), density, seeds[part[n]], out=masks[n])

    parallel_rows(len(part), 1, draw)  # one mask per thread

    def apply(r0: int, r1: int, j: int) -> None:
        for i, m in zip(part, masks):
            xs[i][r0:r1].mul_(m[r0:r1].to(xs[i].dtype)).div_(density)
        if then is not None:
            then(r0, r1, j)

    _rows(xs[0], apply)


def _from_factors(ctx, module_deltas, weights, params, combine):
    """DARE's merge of the deltas ``w_i B_i A_i`` of factor kinds from their
    factors, block by block of rows, no delta formed whole (:class:`FactorDrops`):
    the merged delta, or, where the streaming merge takes one not yet formed
    (``ctx.deferred``), the :class:`FactorDrops` itself, which adds each block
    to ``W0`` as it is combined. ``combine(blocks, out_rows)`` combines the
    blocks already dropped (``lambda`` included). The same bits as dropping
    the dense deltas; memory: the result (or nothing) and a few blocks per
    thread instead of a float32 delta per adapter. None where it does not
    apply (the kernels off, a dense or small delta, another device or dtype,
    no ``ctx.scratch``): the caller takes the dense way."""
    from ..native import dare

    density, kernel = params["density"], dare.kernels()
    if kernel is None or density >= 1.0:
        return None
    srcs = factor_sources(ctx, module_deltas, weights, "dare_rows")
    if srcs is None:
        return None
    drops = FactorDrops(srcs, kernel, density, _seeds(ctx, params), combine, ctx.scratch)
    return drops if ctx.deferred else drops.materialize()


def generator_states(kernel, seeds, ats) -> list:
    """For each seed ``seeds[i]``, the generator's state at each draw of
    ``ats[i]`` (:meth:`loramix.native.dare.Dare.states`: its twists alone),
    the seeds shared out with the run's threads (each generator's twists
    are serial: one per thread)."""
    from ..engine import parallel_rows

    states = [None] * len(seeds)

    def find(i0: int, i1: int, j: int) -> None:
        for i in range(i0, i1):
            states[i] = kernel.states(seeds[i], ats[i])

    parallel_rows(len(seeds), 1, find)
    return states


class FactorDrops(FactorBlocks):
    """A module's DARE delta from factors, not yet formed
    (:class:`~loramix.methods.base.FactorBlocks`): each block of rows of
    each delta dropped by the native kernel with its mask's draws for those
    entries (``dare.c``: each generator's state at each block's first entry,
    found here by its twists alone, one generator per thread)."""

    role = "dare"

    def __init__(self, srcs, kernel, density: float, seeds, combine, scratch):
        super().__init__(srcs, combine, scratch)
        self.kernel, self.density = kernel, density
        self.states = generator_states(kernel, seeds, [self.block_starts] * len(srcs))

    def prune(self, i: int, b: int, x) -> None:
        self.kernel.drop_from(self.states[i], b, self.density, x)


def fused_election(fused, weights, params):
    """``combine(blocks, out)`` for :class:`~loramix.methods.base.FactorBlocks`:
    :func:`~loramix.methods.base.elect_and_merge`'s fused election (``fused``,
    ``ties.c``) of blocks already pruned, by ``params``' sign and divide, then
    ``lambda``."""
    mass, by_count, lam = params["sign"] == "mass", params["divide"] == "count", params["lambda_"]

    def combine(blocks, out) -> None:
        fused.elect(blocks, [None] * len(blocks), weights, mass, by_count, out)
        if lam != 1.0:
            out.mul_(lam)

    return combine


def _election_kernels(n: int):
    """The fused election (``ties.c``) for ``n`` float32 deltas on the CPU, as
    :func:`~loramix.methods.base.elect_and_merge` takes it, or None."""
    from ..native import ties

    return ties.kernels() if n <= ties.MAX_ADAPTERS else None


def _dropped(ctx, module_deltas, weights, W0, params):
    """``[w_i dW_i m_i / density]``: weighted, dropped and rescaled deltas."""
    xs = dense_deltas(ctx, module_deltas, W0, weights)
    return _drop_all(xs, params["density"], _seeds(ctx, params), ctx.scratch)


def _seeds(ctx, params) -> list[int]:
    """Each adapter's mask seed in this module (by its index in the user's
    list, so the masks do not depend on which adapters touch the module)."""
    return [module_seed(params["seed"], ctx.name, i) for i in ctx.indices]


@register
class DareLinear(MergeMethod):
    name = "dare-linear"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "drop entries at random with probability 1-density, rescale by 1/density, weighted sum"
    params = (DENSITY, SEED, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        lam = params["lambda_"]

        def combine(blocks, out) -> None:  # as add() below, on blocks already dropped
            out.copy_(blocks[0])
            for x in blocks[1:]:
                out.add_(x)
            if lam != 1.0:
                out.mul_(lam)

        out = _from_factors(ctx, module_deltas, weights, params, combine)
        if out is not None:
            return out
        xs = dense_deltas(ctx, module_deltas, W0, weights)

        def add(r0: int, r1: int, j: int) -> None:  # x_0 + x_1 + ... in order, by blocks of rows
            out = xs[0][r0:r1]
            for x in xs[1:]:
                out.add_(x[r0:r1])
            if lam != 1.0:
                out.mul_(lam)

        _drop_all(xs, params["density"], _seeds(ctx, params), ctx.scratch, add)
        return xs[0]


@register
class DareTies(MergeMethod):
    name = "dare-ties"
    uses_base = False  # reads W0 only for kinds that need it
    thread_independent = True
    summary = "drop and rescale as dare-linear, then TIES sign election and disjoint mean"
    params = (DENSITY, SEED, SIGN, DIVIDE, LAMBDA)

    def delta(self, ctx, module_deltas, weights, W0, params):
        fused, lam = _election_kernels(len(module_deltas)), params["lambda_"]
        out = None
        if fused is not None:
            out = _from_factors(ctx, module_deltas, weights, params, fused_election(fused, weights, params))
        if out is not None:
            return out
        xs = _dropped(ctx, module_deltas, weights, W0, params)
        out = elect_and_merge(xs, weights, params["sign"], params["divide"], ctx.scratch)
        return out.mul_(lam) if lam != 1.0 else out
