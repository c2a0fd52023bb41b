"""Module coverage: ``|M_i & M_j| / |M_i | M_j|`` for the module sets ``M_i``
adapted by ``i`` and ``j`` (1: same modules; 0: disjoint, a sum cannot interfere
inside a weight)."""

from __future__ import annotations

from . import Feature, register


def _coverage(ctx):
    return {"coverage": ctx.similarity.coverage.to_numpy()}


register(Feature("coverage", _coverage, aggregate="mean", doc="shared / union adapted modules"))
