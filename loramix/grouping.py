"""Propose which adapters to merge together, and how, from predicted interference.

Cost of a group ``C`` (a set of adapters):

* with a predictors file (:mod:`loramix.validation`): its best validated
  predictor applied to ``C``'s composition features (pair values aggregated over
  the member pairs, :func:`loramix.features.composition_value`; the size
  ``k - 1`` where the predictor reads it), with the fit's prediction interval;
  the default budget is ``0``, the zero-interference point (merge only where no
  interference is predicted);
* with a predictors file that has ``by_method`` (one best validated predictor
  per merge method, written by ``loramix scenario run``): ``C`` is costed under
  each of those methods, by that method's own predictor; its cost is the lowest
  of them (with that prediction's interval) and its method the one that
  predicts it (a tie goes to the file's first method, its primary target's);
* without one: the composition's RMS cosine
  ``sqrt(mean_{i<j in C} rms_cosine[i, j]^2)``, no interval; default budget ``0.1``.
  A pair that adapts no module in common (``coverage[i, j] = 0``) counts 0,
  not as missing: its deltas are orthogonal (no weight has both), so summing
  them cannot interfere inside a weight, the best case for a merge. The
  cosines of DoRA and D2-LoRA adapters are those of their residuals ``B A``,
  or with a base those of their effective deltas ``W_hat - W0``, what
  merging adds (:func:`loramix.overlap.similarity`).

Kinds: without a predictors file, adapters of several kinds (LoRA, DoRA,
D2-LoRA) are grouped together by the cosines of their deltas, as
``similarity`` compares them: the sum and TIES merge any mix into a base
(``--into``); only a group of LoRA adapters can also become one adapter.
A predictors file is fitted for one kind, and adapters of others are refused.

Grouping (greedy agglomerative): start from singletons; among all pairs of
groups whose union has at most ``K`` members, merge the one whose union has the
lowest predicted cost, as long as that cost is at most the budget; stop when no
union qualifies. Each step evaluates the union's own composition cost (not a
linkage of pair costs), so a group's cost is exactly what is reported.

Method rule: a group of one is kept as is (``keep``). With predictors per merge
method, a merged group gets the method of lowest predicted cost (above), so the
groups are chosen by the cost of the method they will be merged by. Without a
predictors file (the cost is the RMS cosine, which is no method's), a group of
LoRA adapters gets ``tsv`` (TSV-Merge): on the fourteen real domains' pairs and
triples it kept more of the worst member's gain than the sum in 99 of 101
compositions and than TIES in 84 (reports/merge-methods-14-domains), and where
the members' deltas are orthogonal it is their sum; on groups of four and six
it kept far more than the sum and as much as TIES, within a few points either
way (reports/merge-groups-14-domains, reports/merge-groups-rank16). Otherwise (a group that
mixes kinds or holds DoRA or D2-LoRA adapters, which ``tsv`` does not take, or
one predictor, i.e. an older predictors file, whose cost is that of the merge
method it was fitted for) a merged group of at most :data:`SUM_MAX_GROUP`
adapters gets ``sum`` when its pessimistic cost (the upper end of its
interval, else its point cost) is at most half the budget, and ``ties``
(sign-resolved merging, robust to conflicting deltas) otherwise, as does
every larger group: on the real domains the sum kept more of the worst
member's gain than TIES in 40 of 91 pairs and 4 of 10 triples, and in none
of 30 groups of four and six, not even those of the lowest cosines, where
its worst member mostly fell below the base (reports/merge-groups-14-domains;
again on rank-16 adapters, reports/merge-groups-rank16).

The RMS cosine does not grow with a group's size, while what a merge loses
does (in that study the worst member of a ``tsv`` merge kept 82 % of its
gain in a pair, 50 % in a group of four): a cosine plan with a group of
three or more says so in a note (:data:`SIZE_NOTE`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .api import renamed
from .devices import is_cpu
from .errors import UsageError
from .features import FeatureSet, composition_value, compute_features, registry
from .io.config_schema import is_number

COSINE_BUDGET = 0.1


def fit_features(fit: dict) -> list[str]:
    """The feature matrices a fitted predictor reads."""
    if fit["kind"] == "ols":
        return [fit["feature"]]
    if fit["kind"] == "ols_pairsum":
        return [fit["feature"], fit["size"]]
    if fit["kind"] == "ridge":
        return list(fit["features"])
    return []


@dataclass
class CostModel:
    """Predicted cost of a group of adapters (indices into ``features.names``)."""

    features: FeatureSet
    fit: dict | None = None  # a fitted predictor of loramix.validation; None: RMS cosine
    level: float = 0.9
    by_method: dict[str, dict] = field(default_factory=dict)  # merge method -> its fitted predictor
    kinds: tuple[str, ...] | None = None  # each adapter's kind (``Adapter.method``), in features.names' order
    # merge method (None: the primary) -> (the features it reads, predict_from of its fit at this level), each
    # fit read once: a plan costs n^2 / 2 unions or more, and reading the fit anew was a quarter of it
    _predictors: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        fits = {**({None: self.fit} if self.fit is not None else {}), **self.by_method}
        self._predictors = {}
        if fits:  # the cosine cost reads none (and spares the import)
            from .validation import predictor_of

            self._predictors = {m: (fit_features(f), predictor_of(f, self.level)) for m, f in fits.items()}

    @property
    def method_aware(self) -> bool:
        """Whether groups are costed per merge method (two or more methods with a predictor)."""
        return self.fit is not None and len(self.by_method) >= 2

    @property
    def rule(self) -> str:
        if self.method_aware:
            return RULE_BY_METHOD
        return RULE_COSINE if self.fit is None and self.kinds is not None else RULE

    def lora_only(self, members: list[int]) -> bool:
        """Whether every member is of a kind ``tsv`` merges (the cosine rule's group of LoRA adapters)."""
        from .methods import get_method

        return self.kinds is not None and all(get_method("tsv").applies_to(self.kinds[i]) for i in members)

    @property
    def default_budget(self) -> float:
        return 0.0 if self.fit is not None else COSINE_BUDGET

    def _predict(
        self, method: str | None, members: list[int], x: dict | None = None
    ) -> tuple[float, float | None, float | None]:
        """``(cost, low, high)`` of ``members`` by ``method``'s predictor (None: the
        primary); ``x``: their feature values where already computed."""
        features, predict = self._predictors[method]
        if x is None:
            x = {f: self.features.composition(f, members) for f in features}
        if any(not math.isfinite(x[f]) for f in features):
            return float("nan"), None, None
        return predict(x)

    def method_costs(self, members: list[int]) -> dict[str, tuple[float, float | None, float | None]]:
        """``{method: (cost, low, high)}`` under each merge method's predictor (empty for one adapter)."""
        if len(members) < 2:
            return {}
        # each feature once, though several methods' predictors read it
        x = {f: self.features.composition(f, members) for f in self._method_features}
        return {m: self._predict(m, members, x) for m in self.by_method}

    @cached_property
    def _method_features(self) -> list[str]:
        """The features any merge method's predictor reads, each once."""
        return list(dict.fromkeys(f for m in self.by_method for f in self._predictors[m][0]))

    def choose(self, members: list[int]) -> tuple[str | None, tuple[float, float | None, float | None]]:
        """The method of lowest finite predicted cost and its ``(cost, low, high)``
        (the first such method on a tie; ``None`` and NaN when none is finite)."""
        best = None
        for m, c in self.method_costs(members).items():
            if math.isfinite(c[0]) and (best is None or c[0] < best[1][0]):
                best = (m, c)
        return best if best is not None else (None, (float("nan"), None, None))

    @cached_property
    def _union_predictors(self) -> dict:
        """The method (None: the primary) -> its elementwise predictor
        (:func:`loramix.validation.pair_predictor_of`; None for a line it refuses), for
        the methods :meth:`cost` reads; each fit read once, as ``_predictors``."""
        if self.fit is None:
            return {}
        from .validation import pair_predictor_of

        return {m: pair_predictor_of(self.fit if m is None else self.by_method[m])
                for m in (list(self.by_method) if self.method_aware else [None])}  # fmt: skip

    @property
    def elementwise(self) -> bool:
        """Whether :meth:`union_costs` can cost unions at once (every predictor has
        an elementwise form), so that a plan tries it only then."""
        return all(p is not None for p in self._union_predictors.values())

    def union_costs(self, unions: np.ndarray) -> np.ndarray | None:
        """``cost(list(unions[r]))[0]`` for each row of ``unions`` (m, k), the
        same bits, formed elementwise for all rows at once (a plan of 1,000
        adapters costs half a million pairs, then hundreds of thousands of
        unions); None where that cannot keep the bits: a predictor that is
        not elementwise (:func:`loramix.validation.pair_predictor_of`)."""
        if self.fit is None:
            return _union_values(self._cosines, unions, "rms")
        if not self.elementwise:
            return None
        m, best = len(unions), None
        # each feature once, though several methods' predictors read it (a study's ridges share nine)
        needed = dict.fromkeys(f for method in self._union_predictors for f in self._predictors[method][0])
        values = {
            f: _union_values(self.features.matrices[f], unions, self.features.aggregate[f]) for f in needed
        }
        for method, predict in self._union_predictors.items():
            features = self._predictors[method][0]
            x = {f: values[f] for f in features}
            with np.errstate(over="ignore", invalid="ignore"):
                c = np.array(np.broadcast_to(predict(x), (m,)), dtype=np.float64)
            for f in features:  # _predict: a feature without a value gives no cost
                c[~np.isfinite(x[f])] = np.nan
            if method is None:
                return c
            # choose(): the first method of lowest finite cost; NaN where none is finite
            best = c if best is None else best
            take = np.isfinite(c) & (~np.isfinite(best) | (c < best))
            best = np.where(take, c, best)
        return np.where(np.isfinite(best), best, np.nan)

    @cached_property
    def _cosines(self) -> np.ndarray:
        """``rms_cosine`` with 0 for the pairs that share no module (module
        docstring). The feature gives 0 there itself (:mod:`loramix.features.cosine`);
        this guard keeps the rule for a feature set made before it did, read
        back from a study's cache, whose NaN pair was left out: two such
        adapters were never grouped, yet joined a group by a third one's cosine."""
        m, cov = self.features.matrices["rms_cosine"], self.features.matrices.get("coverage")
        return m if cov is None else np.where(cov == 0, 0.0, m)

    def cost(self, members: list[int]) -> tuple[float, float | None, float | None]:
        """``(cost, low, high)``; a single adapter costs nothing."""
        if len(members) < 2:
            return 0.0, None, None
        if self.fit is None:
            return composition_value(self._cosines, members, "rms"), None, None
        if self.method_aware:
            return self.choose(members)[1]
        return self._predict(None, members)

    def method(self, members: list[int], budget: float) -> str:
        """The merge method the rule of the module docstring proposes for ``members``."""
        if len(members) < 2:
            return "keep"
        if self.method_aware:
            m = self.choose(members)[0]
            if m is not None:
                return m
        if self.fit is None and self.lora_only(members):
            return "tsv"
        cost, _, high = self.cost(members)
        return method_for(len(members), cost, high, budget)


def _union_values(matrix: np.ndarray, unions: np.ndarray, aggregate: str) -> np.ndarray:
    """:func:`loramix.features.composition_value` of each row of ``unions``
    (m, k) at once, with its operations in its order (the pairs in the row's
    order, the finite ones summed one after the other from 0), so the same
    bits; NaN where a row has no finite pair. ``max`` keeps the first of the
    largest, as Python's ``max`` does (a later pair replaces it only where
    greater), so of two equal zeros the same one."""
    M = np.asarray(matrix, dtype=np.float64)
    k = unions.shape[1]
    s, count = np.zeros(len(unions)), np.zeros(len(unions), dtype=np.int64)
    if aggregate == "max":
        s[:] = np.nan
    with np.errstate(over="ignore", invalid="ignore"):
        for p in range(k):
            for q in range(p + 1, k):
                v = M[unions[:, p], unions[:, q]]
                finite = np.isfinite(v)
                if aggregate == "max":  # NaN < v is False: the first finite one is taken by count == 0
                    s = np.where(finite & ((count == 0) | (v > s)), v, s)
                else:
                    s = np.where(finite, s + (v * v if aggregate == "rms" else v), s)
                count += finite
        if aggregate == "max":
            return s
        if aggregate == "rms":
            out = np.sqrt(s / count)
        elif aggregate == "member_sum":
            out = (k - 1) * s / count
        else:
            out = s / count
    out[count == 0] = np.nan
    return out


def greedy_groups(
    n: int, cost, budget: float, max_group: int, bar=None, costs=None, merge_bar=None
) -> list[list[int]]:
    """Greedy agglomerative grouping of ``0..n-1`` (module docstring); ``cost(members)``
    returns the predicted cost first, for ``members`` sorted. Groups come out sorted,
    largest first.

    Each step merges the pair of groups whose union (of at most ``max_group``)
    has the lowest finite cost within ``budget``; equal costs go to the pair
    that comes first with the groups in the order of their smallest members
    (the order a scan of the groups, kept in place as they merge, meets them).
    The candidate unions wait in a heap keyed ``(cost, min A, min B)``, each
    costed once, when the later of its two groups forms; an entry whose group
    has since merged is dropped when it surfaces. So a plan of ``n`` adapters
    costs ``O(n^2)`` unions (``n^2 / 2`` pairs, then ``n`` per merge) and the
    heap's ``log``, where a scan of every pair at every step cost ``O(n^3)``
    look-ups: minutes for 1,000 adapters. ``bar``: a progress bar
    (:func:`loramix.progress.progress_bar`) the first costing of the pairs
    moves; ``merge_bar``: one each merge moves. ``costs``: ``costs(U)`` gives
    ``cost(list(U[r]))[0]`` for each row of an (m, k) array of sorted unions
    at once (:meth:`CostModel.union_costs`),
    or None where it cannot; then ``cost`` is asked one union at a time. The
    same keys either way, so the same groups.
    """
    import heapq

    groups: dict[int, list[int]] = {i: [i] for i in range(n)}  # smallest member -> members, sorted
    heap: list[tuple[float, int, int, int, int]] = []  # (cost, a, b, a's size, b's size) for a < b

    def offer(a: int, b: int) -> None:  # a < b: the smallest members of two live groups
        size_a, size_b = len(groups[a]), len(groups[b])
        if size_a + size_b <= max_group:
            v = cost(sorted(groups[a] + groups[b]))[0]
            if math.isfinite(v) and v <= budget:
                heapq.heappush(heap, (v, a, b, size_a, size_b))

    def offer_unions(ab: list[tuple[int, int]], unions: np.ndarray) -> None:
        """offer() of each ``(a, b)``, whose sorted union is that row of ``unions``, all
        costed at once where ``costs`` can."""
        v = costs(unions)
        if v is None:
            for a, b in ab:
                offer(a, b)
            return
        with np.errstate(invalid="ignore"):
            keep = np.flatnonzero(np.isfinite(v) & (v <= budget))
        for r, x in zip(keep.tolist(), v[keep].tolist()):
            a, b = ab[r]
            heapq.heappush(heap, (x, a, b, len(groups[a]), len(groups[b])))

    def offer_all(pairs: list[tuple[int, int]]) -> None:
        if costs is None:
            for a, b in pairs:
                offer(a, b)
            return
        by_size: dict[int, list[tuple[int, int]]] = {}
        for a, b in pairs:
            k = len(groups[a]) + len(groups[b])
            if k <= max_group:
                by_size.setdefault(k, []).append((a, b))
        for ab in by_size.values():
            offer_unions(ab, np.array([sorted(groups[a] + groups[b]) for a, b in ab], dtype=np.int64))

    if costs is not None:
        if max_group >= 2:  # the singletons' pairs, a < b: already sorted unions
            a, b = np.triu_indices(n, 1)
            offer_unions(list(zip(a.tolist(), b.tolist())), np.stack([a, b], axis=1))
        if bar is not None:
            bar.update(n * (n - 1) // 2)
    else:
        for b in range(n):
            for a in range(b):
                offer(a, b)
            if bar is not None:
                bar.update(b)
    while heap:
        _, a, b, size_a, size_b = heapq.heappop(heap)
        # a group only grows and keeps its smallest member: one of another size has merged since
        if len(groups.get(a, ())) != size_a or len(groups.get(b, ())) != size_b:
            continue
        groups[a] = sorted(groups[a] + groups.pop(b))
        offer_all([(min(a, o), max(a, o)) for o in groups if o != a])
        if merge_bar is not None:
            merge_bar.update(1)
    return sorted(groups.values(), key=lambda g: (-len(g), g))


def scan_groups(n: int, cost, budget: float, max_group: int) -> list[list[int]]:
    """:func:`greedy_groups` in its plainest form, as loramix first ran it: at
    each step every pair of groups is scanned, the groups kept in place as they
    merge, and the first union of lowest cost merged. ``O(n^3)`` look-ups (two
    minutes for 1,000 adapters); the definition :func:`greedy_groups` keeps,
    to the order of equal costs, which the tests and ``benchmarks/bench_plan.py``
    hold it to."""
    groups = [[i] for i in range(n)]
    memo: dict[tuple[int, ...], float] = {}  # a union is costed once, as it was

    def c(members: list[int]) -> float:
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
            return sorted(groups, key=lambda g: (-len(g), g))
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]


#: the largest group the sum/TIES rule gives the sum (module docstring)
SUM_MAX_GROUP = 3


def method_for(size: int, cost: float, high: float | None, budget: float) -> str:
    """The merge method the rule of the module docstring suggests."""
    if size < 2:
        return "keep"
    return "sum" if size <= SUM_MAX_GROUP and (high if high is not None else cost) <= budget / 2 else "ties"


@dataclass
class Plan:
    names: list[str]
    groups: list[dict]
    budget: float
    max_group: int
    cost_source: str
    validated: dict | None = None  # the predictors file's record of the chosen predictor
    rule: str = ""
    validated_by_method: dict | None = None  # merge method -> {"predictor", "validated"} when method-aware
    warnings: list[str] = field(default_factory=list)  # the predictors file's caveats for these adapters
    notes: list[str] = field(default_factory=list)  # the command's note lines: kinds planned apart, residuals

    def table(self) -> list[str]:
        """The lines ``loramix plan`` prints on stdout before its merge commands:
        the cost's source (and its validation), budget, rule, and one row per
        group (kind, method, cost, interval, members)."""
        lines = [f"cost: {self.cost_source}"]
        if self.validated_by_method:
            for m, e in self.validated_by_method.items():
                lines.append(f"  {m}: {e['predictor']}, {_validation(e.get('validated') or {})}")
        elif self.validated is not None:
            lines.append(f"  {_validation(self.validated)}")
        lines += [f"budget: {self.budget:g}; groups of at most {self.max_group}", f"method: {self.rule}"]
        kw = max(len("kind"), *(len(g["kind"]) for g in self.groups))
        mw = max(len("method"), *(len(g["method"]) for g in self.groups))  # dare-ties, core-ties: wider
        lines.append(f"{'group':>5}  {'kind':<{kw}} {'method':<{mw}} {'cost':>9}  {'interval':<21} members")
        for g in self.groups:
            iv = "" if g["interval"] is None else f"[{g['interval'][0]:.3g}, {g['interval'][1]:.3g}]"
            lines.append(f"{g['group']:>5}  {g['kind']:<{kw}} {g['method']:<{mw}} {g['cost']:>9.4g}  {iv:<21} "
                         f"{', '.join(g['members'])}")  # fmt: skip
        return lines

    def __repr__(self) -> str:
        """What a notebook cell ending with the plan shows: the command's table,
        then its warnings and notes, which the command prints on stderr and a
        Python caller otherwise sees only in ``.warnings`` and ``.notes``. The
        dataclass repr was one line of every field (900 characters for three
        adapters), the groups as dicts."""
        head = f"Plan: {len(self.names)} adapters in {len(self.groups)} groups"
        said = [f"warning: {w}" for w in self.warnings] + [f"note: {n}" for n in self.notes]
        return "\n".join([head, *self.table(), *said])

    def to_json_dict(self) -> dict:
        d = {"adapters": self.names, "cost": self.cost_source, "validated": self.validated,
             "budget": self.budget, "max_group": self.max_group, "rule": self.rule or RULE, "groups": self.groups,
             "warnings": self.warnings, "notes": self.notes}  # fmt: skip
        if self.validated_by_method:
            d["validated_by_method"] = self.validated_by_method
        return d


def figure(x) -> str:
    """A held-out figure (MAE, r, coverage) as ``plan`` and ``fit`` print it: 4 significant
    digits, ``n/a`` where there is none."""
    return "n/a" if x is None else f"{x:.4g}"


def _validation(v: dict) -> str:
    """A validated predictor's held-out figures, as ``plan`` prints them."""
    f = figure
    return (f"validated (leave-one-domain-out): MAE {f(v.get('mae'))}, r {f(v.get('r'))}, "
            f"interval coverage {f(v.get('coverage'))}")  # fmt: skip


RULE = (f"sum for a group of at most {SUM_MAX_GROUP} whose pessimistic predicted cost (upper end of the interval, else the "
        "point cost) is at most half the budget, ties otherwise; a group of one is kept")  # fmt: skip
RULE_COSINE = ("tsv for a group of LoRA adapters (it kept the most of each member's gain in the shipped studies, "
               "and is their sum where their deltas are orthogonal); for other kinds sum for a group of at most "
               f"{SUM_MAX_GROUP} "
               "whose RMS cosine is at most half the budget, ties otherwise; a group of one is kept")  # fmt: skip
SIZE_NOTE = ("a group's RMS cosine does not grow with its size, but what a merge loses does: on fourteen real "
             "domains (reports/merge-groups-14-domains) the worst member of a tsv merge kept 82 % of its gain in a "
             "pair, 60 % in a group of three, 50 % in a group of four, on average; --max-group 2 keeps to pairs, "
             "--fit with a study's predictors costs the size")  # fmt: skip
RULE_BY_METHOD = ("each group costed under every merge method with a validated predictor; its cost is the lowest "
                  "prediction and its method the one that makes it; a group of one is kept")  # fmt: skip


def trained_prompt(adapter) -> str:
    """How ``loramix train`` formatted the adapter's records (``raw`` or
    ``chat``, its ``loramix.json``'s ``parameters.prompt``,
    :mod:`loramix.io.provenance`): a calibration pass formats its domain's
    records the same way. ``raw`` where nothing says."""
    from .io.provenance import recorded_parameters

    prompt = recorded_parameters(getattr(adapter, "path", None)).get("prompt")
    return prompt if prompt in ("raw", "chat") else "raw"


def other_base(adapters, base: str | None, fitted: str) -> str | None:
    """The warning that ``adapters`` were trained on another base than ``base``
    (the identity a predictors file or a fit.json records; ``fitted`` says
    which: ``"this fit was"``), or None: the same base, or a file from before
    the field. Adapters made outside loramix (PEFT's own training) record no
    base identity: that the check could not be made is said, not passed over."""
    from .io.provenance import recorded_base

    seen = {i for i in (recorded_base(getattr(a, "path", None)) for a in adapters) if i}
    if base and not seen:
        return (f"the adapters record no base they were trained on (made outside loramix): that it is "
                f"the one {fitted} fitted for ({base[:12]}) is not checked")  # fmt: skip
    if not (base and seen != {base}):
        return None
    return (f"the adapters were trained on another base ({', '.join(sorted(x[:12] for x in seen))}) "
            f"than the one {fitted} fitted for ({base[:12]}): the prediction may not hold")  # fmt: skip


#: the training settings that a study's ``[adapters]`` and an adapter's ``loramix.json`` both record
#: alike (not ``top_layers``: a study's adapters record none, and it gives the same adapter as the full
#: forward; nor the targets: a study's default is the architecture's, which no fit file spells out)
RECIPE_KEYS = ("rank", "alpha", "steps", "epochs", "lr", "batch", "max_len")


def _setting(v) -> str:
    """A setting as the warning says it: numbers by value (16 is 16.0), None as ``none``."""
    if v is None:
        return "none"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v)


def other_recipe(adapters, recipe: dict | None, fitted: str) -> str | None:
    """The warning that ``adapters`` were trained otherwise than the study whose
    fits are used (``recipe``: its ``[adapters]``, at the study's rank), or None.

    Said: each of :data:`RECIPE_KEYS` that differs from what the adapters'
    ``loramix.json`` records (not checked for adapters that record no
    training: :func:`other_base` says so; ``steps`` not for a study by
    epochs, ``max_len`` not where the adapters' is smaller, which may be the
    model's context, to which ``train`` caps what it records), and, where the study put its
    adapters on its top ``top_layers`` blocks, adapters on another number of
    layers (read from their module names). Nothing where the recipe is unknown
    (a file from before it was recorded). The features a fit reads (cosines,
    norms) move with rank, steps, learning rate and the modules adapted, so
    its figures are for adapters trained as its study's."""
    if not isinstance(recipe, dict):
        return None
    from .io.provenance import read_record
    from .overlap import module_layer_type

    said = []
    # None where an adapter records nothing (made outside loramix): then no recipe is compared
    params = [(read_record(getattr(a, "path", None)) or {}).get("parameters") for a in adapters]
    if params and all(isinstance(p, dict) for p in params):
        for key in RECIPE_KEYS:
            want, seen = recipe.get(key), {p.get(key) for p in params}
            # a study by epochs: its adapters record the steps they came to
            if key == "steps" and want is None:
                continue
            if key == "max_len" and is_number(want) and all(is_number(v) and v < want for v in seen):
                continue  # train records the max_len capped at the model's context: a smaller one may be that
            shown = sorted({_setting(v) for v in seen})
            if shown != [_setting(want)]:
                said.append(f"{key} {'/'.join(shown)}, not {_setting(want)}")
    top = recipe.get("top_layers")
    if isinstance(top, int) and not isinstance(top, bool):
        layers = sorted({len({module_layer_type(m)[0] for m in a.modules} - {None}) for a in adapters})
        if layers != [top]:
            said.append(f"{'/'.join(map(str, layers))} layers adapted, not the top {top}")
    if not said:
        return None
    return (f"the adapters were trained otherwise than the study {fitted} fitted on ({'; '.join(said)}): "
            "the prediction may not hold")  # fmt: skip


def adapter_checks(adapters, fitfile: dict, where: str) -> list[str]:
    """Of a predictors file ``fitfile`` (read from ``where``) for ``adapters``: another
    adapter kind refused; warnings for another base, another training recipe
    (:func:`other_recipe`) and a fit no better than the mean."""
    from .scenario.traits import kind_of

    kinds = sorted({a.method for a in adapters})
    want = fitfile.get("adapter_kind")
    # older scenario runs wrote the study's label (``lora@8``, ``lora:shared``): its kind is before @ or :
    if want and kinds != [kind_of(want)]:
        raise UsageError(
            where, f"fitted for {want} adapters, given {', '.join(kinds)}: the fits are per kind"
        )
    warnings = []
    if other := other_base(adapters, fitfile.get("base_identity"), "these predictors were"):
        warnings.append(other)
    from .interference import study_recipe

    recipe = study_recipe(fitfile, where, fitfile.get("adapter_method") or "")
    if other := other_recipe(adapters, recipe, "these predictors were"):
        warnings.append(other)
    if not fitfile.get("beats_mean"):
        warnings.append("no feature predicted this target better than the mean when validated: the prediction "
                        "is the mean of the study's compositions")  # fmt: skip
    return warnings


def one_kind(adapters, where: str, why: str = "the fits are per kind") -> None:
    """Refuse adapters of more than one kind in one line (the fits, and plans, are per kind)."""
    kinds = sorted({a.method for a in adapters})  # the kind's name, on Adapter and NpAdapter alike
    if len(kinds) > 1:
        raise UsageError(where, f"the adapters mix kinds ({', '.join(kinds)}); {why}")


def cost_model(adapters, fit_path, data, base, tokens, device, *, by_method: bool = True,
               fitfile: dict | None = None, max_len: int | None = None, progress: bool = False,
               effective: bool = False) -> tuple[CostModel, str, dict | None]:  # fmt: skip
    """The cost model of the module docstring for loaded ``adapters``; ``by_method=False``
    keeps to the file's primary predictor (``loramix predict``). ``fitfile``: the
    predictors file at ``fit_path`` where the caller has read it already.
    ``tokens``, ``max_len``: the calibration recipe; None: the one the study
    computed its features with (the file's ``calibration``), else the defaults.
    ``data`` runs through ``base`` only when a fit reads a data-aware feature.
    ``effective`` (without a fit): the cosines of kinds that need the base
    (DoRA, D2-LoRA) are those of their effective deltas ``W_hat - W0`` against
    ``base`` (torch-loaded ``adapters``), not of their residuals."""
    if fitfile is None and fit_path is not None:
        from .validation import load_predictors

        fitfile = load_predictors(fit_path)
    fit = fitfile["fits"][fitfile["best"]] if fitfile else None
    methods = (
        {m: e["fit"] for m, e in (fitfile.get("by_method") or {}).items()} if fitfile and by_method else {}
    )
    # every predictor the costs read: (its merge method, None for the primary; its name; its fit)
    predictors = [(None, fitfile["best"], fit)] if fit else []
    predictors += [(m, fitfile["by_method"][m]["best"], f) for m, f in methods.items()]
    # coverage: the pairs that share no module (CostModel._cosines; predict's note where a fit reads a cosine)
    needed = {f.split(":")[0] for _, _, fi in predictors for f in fit_features(fi)} if fit else {"rms_cosine"}
    needed.add("coverage")
    aware = _data_aware(needed)
    unknown = sorted(needed - set(registry()))
    if unknown:
        raise UsageError(fit_path, f"predictor {fitfile['best']} reads unknown feature {unknown[0]}")
    calibration = None
    if data and base is None:
        raise UsageError("--data", "data-aware features need the base model: give --base")
    if data and aware:  # no calibration pass (the base loaded, every domain run) for features no fit reads
        from .features._calibration import DEFAULT_MAX_LEN, DEFAULT_TOKENS, capture

        recipe = (fitfile or {}).get("calibration") or {}
        tokens = tokens if tokens is not None else recipe.get("tokens", DEFAULT_TOKENS)
        max_len = max_len if max_len is not None else recipe.get("max_len", DEFAULT_MAX_LEN)
        calibration = capture(adapters, base, list(data), tokens=tokens, max_len=max_len, device=device,
                              progress=progress, prompts=[trained_prompt(a) for a in adapters])  # fmt: skip
        _warn_short_calibration(list(data), calibration.tokens, tokens)
    elif aware:
        # the predictor that reads it: the primary, or the one of a merge method (by_method)
        who, feat = next((n, g) for _, n, fi in predictors for g in (f.split(":")[0] for f in fit_features(fi))
                         if g in aware)  # fmt: skip
        raise UsageError(fit_path, f"predictor {who} needs data-aware feature {feat}: give --base and --data")
    # a fit's features are the study's, on residuals: only the cosine cost reads effective deltas
    on = base if effective and fit is None else None
    feats = compute_features(
        adapters, calibration=calibration, only=sorted(needed), base=on, progress=progress
    )
    if fit is None:
        on_what = ", on the effective deltas against the base" if on is not None else ""
        kinds = tuple(a.method for a in adapters)
        return CostModel(feats, kinds=kinds), f"RMS cosine of the composition (no --fit given){on_what}", None
    _check_features_present(feats, predictors, fit_path)
    summary = {r["predictor"]: r for r in fitfile["summary"]}.get(fitfile["best"])
    model = CostModel(feats, fit, fitfile["level"], methods)
    if model.method_aware:
        each = "; ".join(f"{m}: {e['best']}" for m, e in fitfile["by_method"].items())
        src = f"the lowest predicted {fitfile['target'].split(' (')[0]} over merge methods ({each}) from {fit_path}"
    else:
        src = f"predicted {fitfile['target']} by {fitfile['best']} from {fit_path}"
    return model, src, summary


def check_calibration_args(data, base, tokens, max_len) -> None:
    """Refuse ``base``, ``tokens`` or ``max_len`` without ``data``
    (``--base``, ``--tokens``, ``--max-len`` without ``--data``): they set
    the calibration pass, which runs only over data (else they were ignored,
    and a user took them for a setting that took effect). ``predict`` and
    ``plan`` make this check, from Python as on the command line."""
    if not data:
        for flag, v in (("--base", base), ("--tokens", tokens), ("--max-len", max_len)):
            if v is not None:
                raise UsageError(flag, "applies with --data (the calibration files it sets the pass over)")


def check_device_arg(data, device, *, given: bool | None = None) -> None:
    """Refuse ``device`` (``--device``) without ``data``: it sets where the
    calibration forward passes run, and without data none runs (a device
    given, ``"gpu"`` or ``"cuda"`` without one, passed unread, taken for a
    setting that took effect). ``given``: whether it was given (the command
    tells it from the option's source); None, from Python, where any device
    but the default ``"cpu"`` was. ``plan`` makes this check, from Python as
    on the command line."""
    if given is None:
        given = str(device).lower() != "cpu"  # "cpu" or torch.device("cpu"): the default's
    if not data and given:
        raise UsageError("--device", "applies with --data (where the calibration forward passes run); "
                         "without it the costs are computed in numpy on the CPU")  # fmt: skip


def _data_aware(features) -> list[str]:
    """The data-aware features (``registry()[f].data_aware``) among the names ``features``, sorted."""
    return sorted(f for f in features if f in registry() and registry()[f].data_aware)


def reads_data(fitfile: dict | None, *, by_method: bool = True) -> bool:
    """Whether a cost from ``fitfile`` (its primary predictor, and with
    ``by_method`` those of its ``by_method``) reads a data-aware feature: only
    then do ``--data`` and ``--base`` matter, and the adapters need torch's
    reader (:func:`cost_model`). False without a file (the RMS cosine)."""
    if not fitfile:
        return False
    fits = [fitfile["fits"][fitfile["best"]]]
    if by_method:
        fits += [e["fit"] for e in (fitfile.get("by_method") or {}).values()]
    return bool(_data_aware({f.split(":")[0] for fi in fits for f in fit_features(fi)}))


def unread_data_note(fit, fitfile: dict | None, data, *, by_method: bool = True) -> list[str]:
    """The note, or none, that ``data`` (``--data``) went unread: the
    predictors of ``fitfile`` read no data-aware feature, so the cost comes
    from the factors alone and ``--data``, ``--base`` and ``--tokens`` change
    nothing. Said, not refused: whether they read any is known only once the
    file is read, and the same command line suits a file whose do."""
    if not data or fitfile is None or reads_data(fitfile, by_method=by_method):
        return []
    return [f"--data unread: the predictors of {fit} read no data-aware feature (their costs come from the "
            "adapters' factors alone)"]  # fmt: skip


def _warn_short_calibration(data: list, got: list[int], tokens: int) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) of a calibration file that
    holds fewer tokens than the recipe asks: its data-aware features rest on
    fewer tokens than the study's did, so they are noisier than those the
    predictor was fitted on."""

    from .errors import warn

    short = [f"{path} ({n})" for path, n in zip(data, got) if n < tokens]
    if short:
        warn(f"calibration files with fewer than the {tokens} tokens asked: {', '.join(short)}; "
             "their data-aware features rest on fewer tokens than the fits'")  # fmt: skip


def _check_features_present(feats: FeatureSet, fits, where) -> None:
    """Refuse, in one line, a predictor reading a per-type or per-band matrix
    (``type_rms_cosine:mlp.gate_proj``) that these adapters have none of: they
    adapt no module of that type (or in that band). ``fits``: ``(merge method
    or None, predictor name, fit)``."""
    for method, name, fit in fits:
        for f in fit_features(fit):
            if f in feats.matrices:
                continue
            family = f.split(":")[0]
            theirs = sorted(k.partition(":")[2] for k in feats.matrices if k.startswith(family + ":"))
            of = f" (merge method {method})" if method else ""
            sub = f.partition(":")[2]
            what = f"module in the {sub} band of layers" if family.startswith("band_") else f"{sub} module"
            raise UsageError(where, f"predictor {name}{of} reads {f}, which these adapters have no value of: they "
                             f"adapt no {what} (theirs: {', '.join(theirs) or 'none'})")  # fmt: skip


def by_method_records(by_method: dict) -> dict:
    """``{method: {"predictor", "validated"}}`` of a predictors file's ``by_method``."""
    return {m: {"predictor": e["best"], "validated": e.get("validated")} for m, e in by_method.items()}


@renamed({"adapters_or_paths": "adapters"})
def plan(adapters, *, fit=None, base=None, data=None, max_group: int = 4, budget: float | None = None,
         tokens: int | None = None, max_len: int | None = None, device="cpu", progress: bool = True) -> Plan:  # fmt: skip
    """Group ``adapters`` (paths or loaded adapters, at least two) for
    merging (module docstring): ``loramix plan``, whose options these are.

    ``fit``: a predictors file (:func:`loramix.validation.write_predictors`),
    or a study's report folder holding one;
    without it the cost is the RMS cosine. ``data``: one calibration file
    per adapter (its domain), in a list (one alone is a list of one, as
    :func:`loramix.train.train_adapter` takes it), and ``base``, needed
    when the predictor reads data-aware features; ``max_group``: ``K``; ``budget``: the largest
    predicted cost of a group (None: 0 with ``fit``, else 0.1 cosine).
    ``tokens``, ``max_len``: the calibration recipe (None: the study's, see
    :func:`cost_model`). ``device``: ``"cpu"`` by default, as in
    :func:`loramix.interference.predict` and for its reason (the costs come
    from the factors in numpy float64); checked with ``data`` before anything
    loads, read by the calibration pass only. ``base`` (with ``fit``),
    ``tokens``, ``max_len`` and another ``device`` than ``"cpu"`` set that
    pass, so without ``data`` they are refused, as ``loramix plan`` refuses
    them. ``progress``: bars of the calibration pass, the similarity the
    features read, the pairs' costing and the merges (on a terminal; elsewhere a plain
    line a minute, :mod:`loramix.progress`).

    Adapters of several kinds (LoRA, DoRA, D2-LoRA): without ``fit`` they
    are grouped together, with one note (a mixed group merges into the base
    only); with ``fit`` (its predictors are per kind) they are refused. ``base``
    without ``fit``: the cosines of DoRA and D2-LoRA adapters are those of
    their effective deltas ``W_hat - W0`` (:func:`loramix.overlap.similarity`
    with ``base``), not of their residuals; with ``fit`` it is the base of
    the calibration pass, and the features stay the study's (residuals).

    Returns a :class:`Plan`, what the command prints as data: ``groups``
    (each ``group``, ``kind``, ``members`` and their ``paths``, ``method``, ``cost``,
    ``interval``; with predictors per merge method also ``costs``, and
    ``merge``, ``{"method", "params"}``, where the file says how its study
    merged by ``method``),
    ``cost_source``, ``validated`` / ``validated_by_method``, ``budget``,
    ``max_group``, ``rule``, ``warnings`` and ``notes`` (the command's
    ``warning:`` and ``note:`` lines); ``to_json_dict()`` is ``--format
    json``'s object. ``loramix.plan`` says those lines' flags as its
    keywords (``no fit given``, ``pass base=BASE``), as its errors do.
    """
    items, data, fit, max_group, tokens, max_len = _plan_inputs(
        adapters, fit=fit, base=base, data=data, max_group=max_group, budget=budget, tokens=tokens,
        max_len=max_len, device=device)  # fmt: skip
    # the fit file too: with --data the adapters load with torch, which a mistyped --fit need not wait for
    from .validation import load_predictors

    fitfile = None if fit is None else load_predictors(fit)  # read and checked once, used thrice
    effective = fit is None and base is not None  # the cosine cost, on effective deltas
    if effective or (fit is not None and data and reads_data(fitfile)):
        # effective deltas are formed with the base's weights, and a calibration pass runs the
        # adapters in the base model: torch's reader
        from .io.adapter_files import load_adapter as load
    else:
        # the cost is the RMS cosine, or features without data (--data given for a file whose
        # predictors read none: ignored), computed in numpy whichever reader loaded the factors,
        # so the numpy reader's (the same checks and values) spares torch
        from .io.np_factors import load_np_adapter as load
    adapters = [load(a) if isinstance(a, (str, os.PathLike)) else a for a in items]
    if fit is not None:  # the fits are per kind; the cosine is one for every kind
        one_kind(adapters, "plan", "the fits are per kind (without --fit, the kinds are grouped together)")
    # the checks of `loramix predict`: another adapter kind refused, another base warned of
    warnings = [] if fitfile is None else adapter_checks(adapters, fitfile, str(fit))
    if fitfile is not None:  # predict notes it; a plan's groups rest on the primary predictor's costs
        from .validation import selection_note

        if (note := selection_note(fitfile.get("selection"))) is not None:
            warnings.append(f"{note}: the groups rest on its predictions")
    model, source, validated = cost_model(adapters, fit, data, base, tokens, device, fitfile=fitfile,
                                          max_len=max_len, progress=progress, effective=effective)  # fmt: skip
    vbm = by_method_records(fitfile["by_method"]) if model.method_aware else None
    p = plan_with(model, source=source, validated=validated, max_group=max_group, budget=budget,
                  validated_by_method=vbm, progress=progress)  # fmt: skip
    merges = {m: e["merge"] for m, e in ((fitfile or {}).get("by_method") or {}).items() if e.get("merge")}
    for g in p.groups:  # the study's method and parameters behind the name (a variant's, iso-c-rms)
        if len(g["members"]) > 1 and g["method"] in merges:
            g["merge"] = merges[g["method"]]
    p.warnings = warnings + _describe(p, model, adapters, items, fit=fit, fitfile=fitfile, data=data,
                                      effective=effective)  # fmt: skip
    return p


def _plan_inputs(adapters, *, fit, base, data, max_group, budget, tokens, max_len, device) -> tuple:
    """:func:`plan`'s arguments checked before anything loads (a mistyped
    path or option fails fast, without torch): ``(items, data, fit,
    max_group, tokens, max_len)``, the adapters as a list, ``data`` as a
    list (or None), ``fit`` a predictors file's path (a study's report
    folder resolved), the counts whole numbers."""
    from .io.peft_layout import adapter_list, check_adapter_paths

    items = adapter_list(adapters)  # one adapter is one, not its characters or modules
    if len(items) < 2:
        raise UsageError("plan", f"needs at least two adapters, got {len(items)}")
    from .options import whole_numbers

    max_group, tokens, max_len = whole_numbers({"--max-group": max_group, "--tokens": tokens,
                                                "--max-len": max_len})  # fmt: skip
    if max_group < 1:
        raise UsageError("--max-group", f"must be at least 1, got {max_group}")
    if budget is not None and not math.isfinite(budget):
        raise UsageError("--budget", f"must be a finite number, got {budget}")
    from .data import data_list

    # one source alone is a list of one, as train_adapter and evaluate take it (a string was taken
    # character by character, a Path raised TypeError); a DataFrame refused (its truth value raised
    # in pandas), as predict refuses it
    data = None if data is None else data_list(data)
    # as `loramix plan` refuses them: without data they set no pass, and were ignored without a word
    # (without fit, base sets the deltas the cosines compare: effective, not residual)
    check_calibration_args(data, base if fit is not None else None, tokens, max_len)
    check_device_arg(data, device)
    if fit is None and data:  # else ignored, and taken for a setting that took effect
        raise UsageError("--data", "applies with --fit (calibration data for predictors that read data-aware "
                         "features); without --fit the cost is the RMS cosine, which reads no data")  # fmt: skip
    if data:  # before anything loads, and also where the fit reads no data (no pass runs to resolve it)
        is_cpu(device)  # an unknown device, or cuda without one: refused (one line)
    check_adapter_paths(items)  # before torch loads: a mistyped path fails fast
    if fit is not None and Path(fit).is_dir():  # a study's report folder, as predict takes it
        if not (Path(fit) / "predictors.json").is_file():
            raise UsageError(fit, "a folder without predictors.json in it (plan reads a predictors file: a scenario "
                             "with a [predictors] table writes one to reports/NAME, loramix fit to its --out, "
                             "fit_evaluations to its out=)")  # fmt: skip
        fit = Path(fit) / "predictors.json"
    return items, data, fit, max_group, tokens, max_len


def _describe(p: Plan, model, adapters, items, *, fit, fitfile, data, effective: bool) -> list[str]:
    """The plan's groups told as ``merge`` takes them (each group's ``kind``
    and its members' ``paths``) and its ``notes``; returns the warnings of
    groups larger than any composition the predictors were validated on."""
    kinds = [a.method for a in adapters]
    paths = [os.fspath(a) if isinstance(a, (str, os.PathLike)) else getattr(a, "path", None) for a in items]
    of = dict(zip(model.features.names, zip(kinds, paths)))
    for g in p.groups:  # "dora+lora": what the group's merge takes (a LoRA group alone can be an adapter)
        g["kind"] = "+".join(sorted({of[m][0] for m in g["members"]}))
        # the members' files, what merge takes (loramix.merge(g["paths"], g["method"], ...)): the names alone
        # were not; None for an adapter loaded from no file
        g["paths"] = [None if of[m][1] is None else str(of[m][1]) for m in g["members"]]
    p.notes = plan_notes(model.features.names, kinds, cosine_cost=fit is None, effective=effective)
    if fit is None and any(len(g["members"]) > 2 for g in p.groups):
        p.notes.append(SIZE_NOTE)
    p.notes += unread_data_note(fit, fitfile, data)
    if fitfile is None:
        return []
    from .interference import fitted_sizes, size_note

    sizes = fitted_sizes(fitfile.get("compositions") or [])
    big = sorted({len(g["members"]) for g in p.groups if size_note(len(g["members"]), sizes)})
    return [f"group(s) of {k}: {size_note(k, sizes)}" for k in big]


def plan_notes(names: list[str], kinds: list[str], *, cosine_cost: bool, effective: bool) -> list[str]:
    """The plan's notes for adapters ``names`` of ``kinds``: that several kinds
    were grouped together, and what a mixed group's merge takes; and, where the cost is
    the RMS cosine (no fit) of residuals, :func:`loramix.overlap.residual_note`
    (a fit reads the features its study computed, on residuals too, and was
    validated on them: the note's ``--base`` would not apply)."""
    notes, distinct = [], sorted(set(kinds))
    if len(distinct) > 1:
        notes.append(f"the adapters are of {len(distinct)} kinds ({', '.join(distinct)}), grouped together: a "
                     "group that mixes kinds merges into the base (--into), not into one adapter")  # fmt: skip
    if cosine_cost:
        from .overlap import residual_note

        if note := residual_note(names, kinds, effective):
            notes.append(note)
    return notes


def describe_groups(model: CostModel, groups: list[list[int]], budget: float) -> list[dict]:
    """Each group (indices) with its members' names, predicted cost, interval and
    the rule's method; with predictors per merge method also ``costs``, the
    predicted cost under each method."""
    names, out = model.features.names, []
    for k, g in enumerate(groups, start=1):
        cost, lo, hi = model.cost(g)
        d = {"group": k, "members": [names[i] for i in g], "cost": cost,
             "interval": None if lo is None else [lo, hi], "method": model.method(g, budget)}  # fmt: skip
        if model.method_aware and len(g) > 1:
            d["costs"] = {m: c[0] for m, c in model.method_costs(g).items()}
        out.append(d)
    return out


def plan_with(model: CostModel, *, source: str, validated: dict | None = None, max_group: int = 4,
              budget: float | None = None, validated_by_method: dict | None = None,
              progress: bool = False) -> Plan:  # fmt: skip
    """The plan of :func:`plan` from a ready cost model (the features already
    computed, e.g. by a scenario's features step); ``progress``: bars of the
    pairs' costing and of the merges (for 1,000 adapters: under a second by
    the cosine, a few seconds under a study's predictors)."""
    from .progress import progress_bar

    b = model.default_budget if budget is None else float(budget)
    names = list(model.features.names)
    n = len(names)
    # search in the order of the names, so that ties (equal predicted costs, e.g. the mean
    # predictor's) go the same way whatever order the adapters were given in
    order = sorted(range(n), key=lambda i: (names[i], i))
    # the merges (at most n - 1; how many, the budget decides) after the pairs: a fitted
    # plan of 1,000 adapters spends most of its time there
    with (
        progress_bar(total=n * (n - 1) // 2, desc="plan: costing pairs", unit="pair", delay=0.5, leave=False,
                     progress=progress) as bar,
        progress_bar(desc="plan: merging", unit="merge", delay=0.5, leave=False, progress=progress) as merges,
    ):  # fmt: skip
        ranked = np.asarray(order, dtype=np.int64)
        costs = (lambda unions: model.union_costs(ranked[unions])) if model.elementwise else None
        groups = greedy_groups(n, lambda m: model.cost([order[i] for i in m]), b, max_group, bar=bar,
                               costs=costs, merge_bar=merges)  # fmt: skip
    groups = [[order[i] for i in g] for g in groups]  # members and groups in the names' order
    return Plan(names, describe_groups(model, groups, b), b, max_group, source, validated, model.rule,
                validated_by_method)  # fmt: skip


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
