"""RMS and signed mean cosine per module type.

The type is what follows the layer index in the module name
(:func:`loramix.overlap.module_layer_type`: ``self_attn.q_proj``,
``mlp.down_proj``, ``attn.c_attn``, ``attn.c_proj`` vs ``mlp.c_proj``). For
type ``t`` with modules ``M_t`` shared by ``i`` and ``j``::

    type_rms_cosine:t[i, j]  = sqrt(mean_{m in M_t} cos_m^2)
    type_mean_cosine:t[i, j] = mean_{m in M_t} cos_m

NaN for a pair that shares no module of type ``t``.
"""

from __future__ import annotations

from . import Feature, register
from ._context import grouped_cosines


def _groups(ctx):
    per = ctx.per_module
    return grouped_cosines(per, per["type"], ctx.n)


def _rms(ctx):
    return {f"type_rms_cosine:{g}": rm for g, (rm, _) in _groups(ctx).items()}


def _mean(ctx):
    return {f"type_mean_cosine:{g}": mn for g, (_, mn) in _groups(ctx).items()}


register(Feature("type_rms_cosine", _rms, aggregate="rms", doc="RMS cosine per module type", per_module=True))
register(
    Feature(
        "type_mean_cosine", _mean, aggregate="mean", doc="signed mean cosine per module type", per_module=True
    )
)
