"""The study's predictors: every pairwise feature of the domain adapters,
validated leave-one-domain-out against each interference target.

Targets, per composition ``C`` and merge method (seed means, docs/interference.md):

* ``retention``: ``retention_pct = mean_{d in C} 100 (ppl_merge(d) - ppl_d(d)) / ppl_d(d)``,
  measured for every composition;
* ``delta_ppl``: ``delta_ppl_pct`` against the merged-data adapter, for the
  compositions that have one (``merged_data``);
* ``worst``: ``worst_pct = max_{d in C} 100 (ppl_merge(d) - ppl_d(d)) / ppl_d(d)``,
  the worst member's loss, measured for every composition; validated only
  where the study asks for it (``predictors.target = "worst"``): another
  nested validation per merge method, and the other two keep their tables.

The features are the matrices of :mod:`loramix.features` computed by the
plan's ``features`` step (averaged over seeds), summarised per composition by
:func:`loramix.validation.composition_table`; :func:`loramix.validation.validate`
fits and scores every predictor. A pure function of the results: nothing is
computed from a model here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..features import FeatureSet
from ..features.size import ensure_size

if TYPE_CHECKING:  # scenario check reads MIN_COMPOSITIONS, without pandas
    import pandas as pd

TARGETS = {"retention": "retention_pct", "delta_ppl": "delta_ppl_pct", "worst": "worst_pct"}
ALWAYS = ("retention", "delta_ppl")  # validated in every study; the others where predictors.target names them
MIN_COMPOSITIONS = 6  # fewer points than this cannot validate a line held out domain by domain


def feature_set(results: list[dict]) -> FeatureSet:
    """The element-wise mean over seeds of ``FeatureSet.to_json_dict`` results
    (missing values as NaN), with the composition size (:mod:`loramix.features.size`)."""
    first = results[0]
    fs = FeatureSet(names=list(first["names"]))
    for name, f in first["features"].items():
        mats = [np.array(r["features"][name]["matrix"], dtype=np.float64) for r in results]
        fs.matrices[name] = np.mean(mats, axis=0)
        fs.aggregate[name] = f["aggregate"]
        if f["directional"]:
            fs.directional.add(name)
    return ensure_size(fs)  # results cached before the size feature was registered lack it


def targets_for(target: str) -> tuple[str, ...]:
    """The targets a study whose ``predictors.target`` is ``target`` validates:
    :data:`ALWAYS`, and ``target`` after them where it is not one of them."""
    return ALWAYS if target in ALWAYS else (*ALWAYS, target)


def validate_targets(
    summary: pd.DataFrame, features: dict[str, FeatureSet], *, level: float, targets: tuple[str, ...] = ALWAYS
) -> list[dict]:
    """One validation per (adapter kind, target of ``targets``, merge method) with at least
    :data:`MIN_COMPOSITIONS` measured compositions: the predictors file's
    dict (:meth:`loramix.validation.Validation.to_json_dict`, with the nested
    validation of the choice, ``selection``: about seven times the plain
    validation's cost, paid once per inputs and code where the study caches) plus
    ``adapter_method``, ``target_name``, ``merge_method`` and the held-out
    ``predictions`` (records) of the best predictor, the mean and the RMS cosine line."""
    from ..validation import composition_table, validate

    out = []
    for am, fs in features.items():
        for target in targets:
            col = TARGETS[target]
            for mm, g in summary[summary["adapter_method"] == am].groupby("merge_method", sort=False):
                g = g[np.isfinite(g[col].to_numpy(dtype=float))]
                comps = [tuple(c.split("+")) for c in g["composition"]]
                if len(comps) < MIN_COMPOSITIONS:
                    continue
                X = composition_table(fs, comps)
                try:
                    # nested: the choice of the best validated too, in every validation (the
                    # report shows it for each); cached with the rest (assemble._validations)
                    v = validate(comps, g[col].to_numpy(dtype=float), X, level=level, aggregate=fs.aggregate,
                                 target=f"{col} ({mm})", nested=True)  # fmt: skip
                except UsageError:  # too few domains to hold any out
                    continue
                d = v.to_json_dict()
                keep = v.predictions["predictor"].isin(
                    [v.best, "mean", "ols:rms_cosine"]
                )  # the report's; not all
                preds = v.predictions[keep].astype(object).where(v.predictions[keep].notna(), None)
                d.update(adapter_method=am, target_name=target, merge_method=mm,
                         predictions=preds.to_dict(orient="records"))  # fmt: skip
                out.append(d)
    return out


def primary(validations: list[dict], target: str, method: str) -> dict | None:
    """The validation saved as ``predictors.json``: the first adapter kind's for ``target`` and ``method``."""
    return next((v for v in validations if v["target_name"] == target and v["merge_method"] == method), None)
