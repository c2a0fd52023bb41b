"""The largest pair's RMS cosine in a composition.

The same pair matrix as ``rms_cosine`` (:mod:`.cosine`), aggregated over a
composition ``C`` by its worst pair, not by the RMS over its pairs::

    max_cosine(C) = max_{i<j in C} rms_cosine[i, j]

The RMS over pairs dilutes one conflicting pair with members that are
orthogonal to it: a pair at 0.3 in a group of 8 whose other 27 pairs are at 0
has an RMS of 0.3 / sqrt(28) = 0.057, as if it held no conflict. The maximum
keeps 0.3. For a pair the two are the same; groups of more than two tell
which one the merged members' losses follow.
"""

from __future__ import annotations

from . import Feature, register
from .cosine import _rms


def _max(ctx):
    return {"max_cosine": _rms(ctx)["rms_cosine"]}


register(Feature("max_cosine", _max, aggregate="max", doc="the composition's largest pair RMS cosine"))
