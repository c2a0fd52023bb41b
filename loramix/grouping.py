"""Propose which adapters to merge together, and how, from predicted interference.

Cost of a group ``C`` (a set of adapters):

* with a predictors file (:mod:`loramix.validation`): its best validated
  predictor applied to ``C``'s composition features (pair values aggregated over
  the member pairs, :func:`loramix.features.composition_value`), with the
  fit's prediction interval; the default budget is ``0``, the zero-interference
  point (merge only where no interference is predicted);
* without one: the composition's RMS cosine
  ``sqrt(mean_{i<j in C} rms_cosine[i, j]^2)``, no interval; default budget ``0.1``.

Grouping (greedy agglomerative): start from singletons; among all pairs of
groups whose union has at most ``K`` members, merge the one whose union has the
lowest predicted cost, as long as that cost is at most the budget; stop when no
union qualifies. Each step evaluates the union's own composition cost (not a
linkage of pair costs), so a group's cost is exactly what is reported.

Method rule: a group of one is kept as is (``keep``); a merged group gets
``sum`` when its pessimistic cost (the upper end of its interval, else its point
cost) is at most half the budget, and ``ties`` (sign-resolved merging, robust to
conflicting deltas) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError
from .features import FeatureSet, compute_features, registry
from .validation import load_predictors, predict_from

COSINE_BUDGET = 0.1


def fit_features(fit: dict) -> list[str]:
    """The feature matrices a fitted predictor reads."""
    if fit["kind"] == "ols":
        return [fit["feature"]]
    if fit["kind"] == "ridge":
        return list(fit["features"])
    return []


@dataclass
class CostModel:
    """Predicted cost of a group of adapters (indices into ``features.names``)."""

    features: FeatureSet
    fit: dict | None = None  # a fitted predictor of loramix.validation; None: RMS cosine
    level: float = 0.9

    @property
    def default_budget(self) -> float:
        return 0.0 if self.fit is not None else COSINE_BUDGET

    def cost(self, members: list[int]) -> tuple[float, float | None, float | None]:
        """``(cost, low, high)``; a single adapter costs nothing."""
        if len(members) < 2:
            return 0.0, None, None
        if self.fit is None:
            return self.features.composition("rms_cosine", members), None, None
        x = {f: self.features.composition(f, members) for f in fit_features(self.fit)}
        if any(not math.isfinite(v) for v in x.values()):
            return float("nan"), None, None
        return predict_from(self.fit, x, self.level)


def greedy_groups(n: int, cost, budget: float, max_group: int) -> list[list[int]]:
    """Greedy agglomerative grouping of ``0..n-1`` (module docstring); ``cost(members)``
    returns the predicted cost first. Groups come out sorted, largest first."""
    groups = [[i] for i in range(n)]
    memo: dict[tuple[int, ...], float] = {}

    def c(members):
        key = tuple(sorted(members))
        if key not in memo:
            memo[key] = cost(list(key))[0]
        return memo[key]

    while True:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if len(groups[a]) + len(groups[b]) > max_group:
                    continue
                v = c(groups[a] + groups[b])
                if math.isfinite(v) and v <= budget and (best is None or v < best[0]):
                    best = (v, a, b)
        if best is None:
            break
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: (-len(g), g))


def method_for(size: int, cost: float, high: float | None, budget: float) -> str:
    """The merge method the rule of the module docstring suggests."""
    if size < 2:
        return "keep"
    return "sum" if (high if high is not None else cost) <= budget / 2 else "ties"


@dataclass
class Plan:
    names: list[str]
    groups: list[dict]
    budget: float
    max_group: int
    cost_source: str
    validated: dict | None = None  # the predictors file's record of the chosen predictor

    def to_json_dict(self) -> dict:
        return {"adapters": self.names, "cost": self.cost_source, "validated": self.validated,
                "budget": self.budget, "max_group": self.max_group, "rule": RULE, "groups": self.groups}  # fmt: skip


RULE = ("sum when the pessimistic predicted cost (upper end of the interval, else the point cost) "
        "is at most half the budget, ties otherwise; a group of one is kept")  # fmt: skip


def cost_model(adapters, fit_path, data, base, tokens, device) -> tuple[CostModel, str, dict | None]:
    fitfile = load_predictors(fit_path) if fit_path is not None else None
    fit = fitfile["fits"][fitfile["best"]] if fitfile else None
    needed = {f.split(":")[0] for f in fit_features(fit)} if fit else {"rms_cosine"}
    aware = sorted(f for f in needed if f in registry() and registry()[f].data_aware)
    unknown = sorted(needed - set(registry()))
    if unknown:
        raise UsageError(fit_path, f"predictor {fitfile['best']} reads unknown feature {unknown[0]}")
    calibration = None
    if data:
        if base is None:
            raise UsageError("--data", "data-aware features need the base model: give --base")
        from .features._calibration import capture

        calibration = capture(adapters, base, list(data), tokens=tokens, device=device)
    elif aware:
        raise UsageError(
            fit_path,
            f"predictor {fitfile['best']} needs data-aware feature {aware[0]}: give --base and --data",
        )
    feats = compute_features(adapters, calibration=calibration, only=sorted(needed))
    if fit is None:
        return CostModel(feats), "RMS cosine of the composition (no --fit given)", None
    summary = {r["predictor"]: r for r in fitfile["summary"]}.get(fitfile["best"])
    src = f"predicted {fitfile['target']} by {fitfile['best']} from {fit_path}"
    return CostModel(feats, fit, fitfile["level"]), src, summary


def plan(adapters_or_paths, *, fit=None, data=None, base=None, max_group: int = 4, budget: float | None = None,
         tokens: int = 256, device="cpu") -> Plan:  # fmt: skip
    """Group ``adapters_or_paths`` for merging (module docstring).

    ``fit``: a predictors file (:func:`loramix.validation.write_predictors`);
    ``data``: one calibration file per adapter (its domain) and ``base``, needed
    when the predictor reads data-aware features; ``max_group``: ``K``.
    """
    from .adapter import Adapter
    from .io.adapter_files import load_adapter

    items = list(adapters_or_paths)
    if len(items) < 2:
        raise UsageError("plan", f"needs at least two adapters, got {len(items)}")
    if max_group < 1:
        raise UsageError("--max-group", f"must be at least 1, got {max_group}")
    if budget is not None and not math.isfinite(budget):
        raise UsageError("--budget", f"must be a finite number, got {budget}")
    adapters = [a if isinstance(a, Adapter) else load_adapter(a) for a in items]
    model, source, validated = cost_model(adapters, fit, data, base, tokens, device)
    return plan_with(model, source=source, validated=validated, max_group=max_group, budget=budget)


def describe_groups(model: CostModel, groups: list[list[int]], budget: float) -> list[dict]:
    """Each group (indices) with its members' names, predicted cost, interval and the rule's method."""
    names, out = model.features.names, []
    for k, g in enumerate(groups, start=1):
        cost, lo, hi = model.cost(g)
        out.append({"group": k, "members": [names[i] for i in g], "cost": cost,
                    "interval": None if lo is None else [lo, hi], "method": method_for(len(g), cost, hi, budget)})  # fmt: skip
    return out


def plan_with(model: CostModel, *, source: str, validated: dict | None = None, max_group: int = 4,
              budget: float | None = None) -> Plan:  # fmt: skip
    """The plan of :func:`plan` from a ready cost model (the features already
    computed, e.g. by a scenario's features step)."""
    b = model.default_budget if budget is None else float(budget)
    groups = greedy_groups(len(model.features.names), model.cost, b, max_group)
    names = list(model.features.names)
    return Plan(names, describe_groups(model, groups, b), b, max_group, source, validated)


def random_groupings(n: int, sizes: list[int], count: int, seed: int) -> list[list[list[int]]]:
    """``count`` random partitions of ``0..n-1`` into groups of ``sizes`` (which
    sum to ``n``), drawn with ``random.Random(seed)``: the same seed gives the
    same groupings. Each comes out in :func:`greedy_groups`' order (members
    sorted; groups largest first), so its sizes are ``sorted(sizes, reverse=True)``."""
    import random

    if sum(sizes) != n or any(s < 1 for s in sizes):
        raise UsageError("random groupings", f"group sizes {sizes} do not partition {n} adapters")
    rng, out = random.Random(seed), []
    for _ in range(count):
        idx = list(range(n))
        rng.shuffle(idx)
        groups, at = [], 0
        for s in sorted(sizes, reverse=True):
            groups.append(sorted(idx[at : at + s]))
            at += s
        out.append(sorted(groups, key=lambda g: (-len(g), g)))
    return out
