"""What every feature reads: the adapters, their unique names, the exact
similarity (computed once, with its per-module table) and the calibration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..io.peft_layout import check_compatible, warn_null_targets

#: the warning's last words for a predictor's features (predict, plan)
FEATURES_READ_ALL = "the predictor's features read them all"

if TYPE_CHECKING:  # pandas too: the registry (predict, plan) loads this module, which makes no table
    import pandas as pd

    from ..adapter import Adapter


@dataclass
class FeatureContext:
    adapters: list[Adapter]
    calibration: object | None = None  # loramix.features._calibration.Calibration
    base: object | None = None  # a base model folder: the similarity's effective deltas (compute_features)
    #: whether :attr:`similarity` is computed with its per-module table (a feature that reads it
    #: says so, ``Feature.per_module``): 2M rows for 1,000 adapters on 4 modules, most of a plan's memory
    with_per_module: bool = True
    progress: bool = False  # the similarity's bars (loading, modules) where it is long
    names: list[str] = field(init=False)
    _sim: object | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        from ..overlap import unique_names

        if len(self.adapters) < 2:
            raise UsageError(
                "adapters", f"pairwise features need at least two adapters, got {len(self.adapters)}"
            )
        check_compatible(self.adapters)
        # here, not in the similarity the features share: every feature reads every factor, and
        # with a calibration the base was loaded and its type's default checked (capture); with
        # a base for the similarity, that similarity checks its type's default
        if self.base is None:
            warn_null_targets(self.adapters, FEATURES_READ_ALL)
        self.names = unique_names(self.adapters)

    @property
    def n(self) -> int:
        return len(self.adapters)

    @property
    def similarity(self):
        """:func:`loramix.overlap.similarity`, computed once (with its per-module
        table where :attr:`with_per_module`)."""
        if self._sim is None:
            from ..overlap import similarity

            self._sim = similarity(self.adapters, base=self.base, per_module=self.with_per_module,
                                   progress=self.progress)  # fmt: skip
        return self._sim

    @property
    def per_module(self) -> pd.DataFrame:
        """The similarity's per-module table (:attr:`SimilarityResult.per_module`);
        computed again, with the table, where the first similarity was made
        without one (a feature that reads it and did not say so: right, if slower)."""
        if not self.with_per_module:
            self.with_per_module, self._sim = True, None
        return self.similarity.per_module

    def modules(self) -> dict[str, list[int]]:
        """Module name -> indices of the adapters that adapt it (first-seen order)."""
        out: dict[str, list[int]] = {}
        for i, ad in enumerate(self.adapters):
            for m in ad.modules:
                out.setdefault(m, []).append(i)
        return out


def grouped_cosines(
    per_module: pd.DataFrame, key: pd.Series, n: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{g: (rms, mean)}``: per value ``g`` of ``key`` (aligned with the rows of
    :attr:`SimilarityResult.per_module`), the ``N x N`` RMS cosine
    ``sqrt(mean cos_m^2)`` and signed mean ``mean cos_m`` over the group's
    modules. Pairs without a module in the group are NaN."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if per_module.empty:
        return out
    df = per_module.assign(g=key.to_numpy(), cos2=per_module["cosine"] ** 2)
    for g, part in df.groupby("g", sort=True):
        agg = part.groupby(["i", "j"]).agg(rms=("cos2", "mean"), mean=("cosine", "mean"))
        rms = np.full((n, n), np.nan)
        mean = np.full((n, n), np.nan)
        i = agg.index.get_level_values("i").to_numpy()
        j = agg.index.get_level_values("j").to_numpy()
        rms[i, j] = rms[j, i] = np.sqrt(agg["rms"].to_numpy())
        mean[i, j] = mean[j, i] = agg["mean"].to_numpy()
        out[str(g)] = (rms, mean)
    return out
