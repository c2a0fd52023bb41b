"""Task arithmetic (Ilharco et al. 2023), mergekit's ``task_arithmetic`` (docs/merging.md)::

    merged = lambda * sum_i w_i dW_i

``sum`` scaled by a global ``lambda`` (mergekit's default ``normalize: false``:
no division by the summed weights). Exact: as an adapter it is the stacked
factors with ``lambda w_i`` folded into ``B``.
"""

from __future__ import annotations

from . import register
from .base import LAMBDA
from .sum import Sum


@register
class TaskArithmetic(Sum):
    name = "task-arithmetic"
    summary = "lambda times the weighted sum of the deltas (mergekit's task_arithmetic; exact)"
    params = (LAMBDA,)

    @staticmethod
    def _scaled(weights, params):
        return [float(w) * params["lambda_"] for w in weights]

    def delta(self, ctx, module_deltas, weights, W0, params):
        return super().delta(ctx, module_deltas, self._scaled(weights, params), W0, params)

    def merged(self, ctx, module_deltas, weights, W0, params):
        return super().merged(ctx, module_deltas, self._scaled(weights, params), W0, params)

    def factors(self, ctx, module_deltas, weights, params):
        return super().factors(ctx, module_deltas, self._scaled(weights, params), params)
