"""Functional interference: how much adapter ``j`` moves domain ``i``'s outputs,
relative to how much domain ``i``'s own adapter does.

Module ``m``, calibration inputs ``X_i`` (T x in) of domain ``i``. Adapter ``j``
adds ``X_i dW_j^T = (X_i Af_j^T) Bf_j^T`` to the module's output (``X_i Af_j^T`` is
only T x r). Its size, from ``S_i = A_cat G_i A_cat^T`` (:mod:`._calibration`)::

    ||X_i Af_j^T Bf_j^T||_F^2 = tr(Bf_j (Af_j G_i Af_j^T) Bf_j^T)
                              = sum((Bf_j^T Bf_j) * (Af_j G_i Af_j^T))       (r x r)

    F_m[i, j] = ||X_i Af_j^T Bf_j^T||_F / ||X_i Af_i^T Bf_i^T||_F

aggregated over the modules both adapt by RMS, ``D[i, j] = sqrt(mean_m F_m[i, j]^2)``
(directional: ``j`` acting on ``i``'s data). The pair value is the mean of both
directions, ``functional_interference = (D + D^T) / 2``; ``D`` itself is kept
as ``functional_interference:directional``. Weight-orthogonal deltas can still
interfere here (``dW_j X_i != 0`` when ``A_j`` reads directions ``X_i`` occupies).
Modules where domain ``i``'s own adapter does nothing on ``X_i`` are left out.
"""

from __future__ import annotations

import numpy as np

from . import Feature, register


def directional(ctx) -> np.ndarray:
    """``D`` (N x N), NaN where ``i`` and ``j`` share no usable module."""
    from ._calibration import input_factors  # torch: here, not when the registry is read

    cal = ctx.calibration
    total = np.zeros((ctx.n, ctx.n))
    count = np.zeros((ctx.n, ctx.n))
    for m, own in cal.owners.items():
        btb = {k: (lambda B: B.T @ B)(input_factors(ctx.adapters[k].modules[m])[0]) for k in own}
        for i in own:
            own_sq = float((btb[i] * cal.block(i, m, i, i)).sum())
            if not own_sq > 0:
                continue
            for j in own:
                total[i, j] += float((btb[j] * cal.block(i, m, j, j)).sum()) / own_sq
                count[i, j] += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(total / count)


def _functional(ctx):
    D = directional(ctx)
    return {"functional_interference": (D + D.T) / 2, "functional_interference:directional": D}


register(Feature(
    "functional_interference", _functional, data_aware=True, aggregate="rms",
    directional=frozenset({"functional_interference:directional"}),
    doc="||B_j A_j X_i|| / ||B_i A_i X_i||, RMS over modules, mean of both directions",
))  # fmt: skip
