"""RMS and signed mean cosine per layer band (thirds of the depth).

With ``L`` = 1 + the largest layer index among the bank's modules, layer
``l`` falls in band ``b = min(2, floor(3 l / L))``: 0 bottom, 1 middle, 2 top
third. For the modules ``M_b`` of band ``b`` shared by ``i`` and ``j``::

    band_rms_cosine:b[i, j]  = sqrt(mean_{m in M_b} cos_m^2)
    band_mean_cosine:b[i, j] = mean_{m in M_b} cos_m

Modules without a layer index are left out; NaN where a pair shares no module
of the band.
"""

from __future__ import annotations

import numpy as np

from . import Feature, register
from ._context import grouped_cosines

BANDS = ("bottom", "middle", "top")


def layer_band(layer: np.ndarray, n_layers: int) -> np.ndarray:
    """Band index ``min(2, floor(3 l / L))`` of each layer index ``l``."""
    return np.minimum(2, (3 * np.asarray(layer, dtype=np.int64)) // max(n_layers, 1))


def _groups(ctx):
    import pandas as pd  # here, not at the top: the registry (predict, plan) loads this module

    from ..overlap import module_layer_type

    layers = [module_layer_type(m)[0] for m in ctx.modules()]
    known = [x for x in layers if x is not None]
    per = ctx.per_module
    if not known or per.empty:
        return {}
    per = per[per["layer"].notna()]
    band = layer_band(per["layer"].astype(np.int64).to_numpy(), max(known) + 1)
    return grouped_cosines(per, pd.Series([BANDS[b] for b in band], index=per.index), ctx.n)


def _rms(ctx):
    return {f"band_rms_cosine:{g}": rm for g, (rm, _) in _groups(ctx).items()}


def _mean(ctx):
    return {f"band_mean_cosine:{g}": mn for g, (_, mn) in _groups(ctx).items()}


register(
    Feature(
        "band_rms_cosine", _rms, aggregate="rms", doc="RMS cosine per third of the depth", per_module=True
    )
)
register(
    Feature(
        "band_mean_cosine",
        _mean,
        aggregate="mean",
        doc="signed mean cosine per third of the depth",
        per_module=True,
    )
)
