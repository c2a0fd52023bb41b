"""Composition size: ``pairs_per_member = k - 1`` for a composition of ``k`` adapters.

The matrix is all ones and aggregates by ``member_sum`` (each member's sum over
its ``k - 1`` partners, averaged over the members), so a pair has 1, a triple 2,
a group of four 3. Why ``k - 1``: a member ``d`` of a summed composition
carries the other ``k - 1`` deltas on top of its own, and the retention target
averages over the members, so interference that adds up pair by pair grows
like ``(k - 1)`` times the mean pair value (docs/predictors.md). As a feature
on its own it is the size-only baseline; the ridge combines it with the overall
features; the ``ols_pairsum`` predictors of :mod:`loramix.validation` scale a
pair line by it.
"""

from __future__ import annotations

import numpy as np

from . import Feature, FeatureSet, register

SIZE = "pairs_per_member"


def _size(ctx):
    return {SIZE: np.ones((ctx.n, ctx.n))}


def ensure_size(fs: FeatureSet) -> FeatureSet:
    """Add the size matrix to a feature set computed without it (e.g. cached
    before the size was registered); it depends on nothing but ``len(names)``."""
    if SIZE not in fs.matrices:
        fs.matrices[SIZE] = np.ones((len(fs.names), len(fs.names)))
        fs.aggregate[SIZE] = "member_sum"
    return fs


register(Feature(SIZE, _size, aggregate="member_sum", doc="composition size: k - 1 partners per member"))
