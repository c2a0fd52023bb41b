"""Does ``loramix plan`` beat random groupings? The study's check of the grouping.

With a ``[plan]`` table, once the predictors step has run (its validation is
part of :func:`loramix.scenario.assemble.assemble`), the domain adapters of one
label and seed are grouped by :mod:`loramix.grouping`, as ``loramix plan --fit
predictors.json`` groups them: the cost of a group is the lowest over the
study's merge methods of each method's best validated predictor of
``predictors.target``, fitted on that label's compositions, and its method the
one of lowest cost (:mod:`loramix.grouping`), read from the features step's
matrices of that seed. Each
group of two or more is merged and evaluated on its members' eval splits; so is
every group of ``plan.random`` random groupings with the same group sizes
(:func:`loramix.grouping.random_groupings`, seeded by ``plan.random_seed``).
Each entry of ``plan.methods`` is a comparison of its own: ``"plan"`` merges
each group by the method the plan's rule proposes for it (a random group by
the same rule, from its own predicted cost), a method name merges every group by it.

The groups are known only once the predictors are, so their steps are planned
then (:func:`steps`): ordinary merge and evaluation steps of the plan
(:meth:`loramix.scenario.plan._Planner.merge_steps`, evaluated on the members
only), cached under keys made from their specs like every other step, so a
group that is also one of the study's compositions is a cache hit and a rerun
makes nothing; the runner hands them to the same executor.

Measured, per group ``C``: each member's loss ``100 (ppl_merge(d) -
ppl_own(d)) / ppl_own(d)`` against its own adapter, and their mean (retention %,
docs/interference.md) and largest (worst member %). Per grouping: the mean of
the losses over the domains it merges (a domain kept alone loses nothing and is
left out; every grouping here merges as many domains, so this ranks them as the
mean over all domains would), and their largest. The plan is judged by the one
its target costs (:data:`MEASURES`: the worst member's with ``predictors.target
= "worst"``, the mean otherwise): its value set against the random groupings'
distribution, its rank among them and the share of them it beats.
"""

from __future__ import annotations

import numpy as np

from .config import MergeSpec, Scenario
from .plan import DomainData, Step, _Planner, comp_name, merge_evaluation

PREFIX = "plan/"
ALPHA = 0.05  # one-sided empirical p-value for "beats random groupings"
#: a grouping's measure: (its words, the aggregate of the losses of the domains it merges that it is)
MEASURES = {"retention_pct": ("retention %", "mean"), "worst_pct": ("worst member %", "largest")}


def measure_of(target: str) -> str:
    """The grouping measure that predictors target ``target`` costs: the worst
    member's loss for ``worst``, the members' mean loss otherwise (``delta_ppl``
    too: a plan group has no merged-data adapter to compare with)."""
    return "worst_pct" if target == "worst" else "retention_pct"


def _validation_for(validations: list[dict], am: str, target: str, method: str) -> dict | None:
    return next((v for v in validations if v["adapter_method"] == am and v["target_name"] == target
                 and v["merge_method"] == method), None)  # fmt: skip


def cost_model(sc: Scenario, results: dict, validations: list[dict]):
    """``(CostModel, source, validated, validated_by_method)`` for the plan's label
    and seed: the validated best predictor of ``predictors.target`` under each of
    the study's merge methods, ``predictors.method``'s first (what ``loramix plan
    --fit predictors.json`` reads from the file's ``by_method``), or, where the
    study could not validate one, the RMS cosine (``loramix plan`` without ``--fit``)."""
    from ..grouping import CostModel, by_method_records
    from .answer import by_method
    from .predictors import TARGETS, feature_set

    p, pr = sc.plan, sc.predictors
    fs = feature_set([results[f"features/{p.adapters}/{p.seed}"]])
    v = _validation_for(validations, p.adapters, pr.target, pr.method)
    if v is None:
        from .traits import kind_of

        return (
            CostModel(fs, kinds=(kind_of(p.adapters),) * len(fs.names)),
            "RMS cosine of the composition (the study validated no predictor for it)",
            None,
            None,
        )
    summary = {r["predictor"]: r for r in v["summary"]}.get(v["best"])
    bm = by_method(validations, v)
    model = CostModel(fs, v["fits"][v["best"]], v["level"], {m: e["fit"] for m, e in bm.items()})
    if model.method_aware:
        each = "; ".join(f"{m}: {e['best']}" for m, e in bm.items())
        src = (f"the lowest predicted {TARGETS[pr.target]} over merge methods ({each}), each the study's best "
               "validated predictor")  # fmt: skip
        return model, src, summary, by_method_records(bm)
    src = f"predicted {TARGETS[pr.target]} ({pr.method}) by {v['best']}, the study's best validated predictor"
    return model, src, summary, None


def propose(sc: Scenario, results: dict, validations: list[dict]) -> dict:
    """The plan's grouping and the random groupings, each group with its predicted
    cost, interval and the method the rule proposes for it (a pure function of
    the study's results)."""
    from ..grouping import describe_groups, plan_with, random_groupings

    p = sc.plan
    model, source, validated, vbm = cost_model(sc, results, validations)
    pl = plan_with(model, source=source, validated=validated, max_group=p.max_size, budget=p.budget,
                   validated_by_method=vbm)  # fmt: skip
    sizes = [len(g["members"]) for g in pl.groups]
    rand = random_groupings(len(pl.names), sizes, p.random, p.random_seed)
    return {"adapter_method": p.adapters, "seed": p.seed, "names": pl.names, "cost": source, "validated": validated,
            "measure": measure_of(sc.predictors.target),
            "validated_by_method": vbm, "budget": pl.budget, "max_size": p.max_size, "rule": pl.rule,
            "methods": list(p.methods), "sizes": sizes, "random_count": p.random, "random_seed": p.random_seed,
            "plan": pl.groups, "random": [describe_groups(model, g, pl.budget) for g in rand]}  # fmt: skip


def merge_spec(sc: Scenario, label: str) -> MergeSpec:
    """The study's merge ``label`` (a method's defaults where the study does not merge by it)."""
    return next((m for m in sc.merges if m.label == label), MergeSpec(label))


def method_of(group: dict, how: str) -> str:
    """The method group ``group`` is merged by under ``plan.methods`` entry ``how``."""
    return group["method"] if how == "plan" else how


def merged_members(members: list[str], names: list[str]) -> tuple[str, ...]:
    """A group's members in the order they are merged: the study's domain order
    (``names``), as its compositions are. The plan lists a group's members by
    name, a random grouping by domain: merged in those two orders, one set of
    domains was two merges (another key, other float roundings), and the plan
    "lost" to a random grouping of the same group by 4e-5 points; nor was a plan
    group that is a composition of the study the cache hit it is now."""
    return tuple(sorted(members, key=names.index))


def _merged(proposal: dict):
    """``(method, members)`` of every merge the proposal evaluates, each once, in order."""
    seen = {}
    for how in proposal["methods"]:
        for groups in [proposal["plan"], *proposal["random"]]:
            for g in groups:
                if len(g["members"]) > 1:
                    seen.setdefault(
                        (method_of(g, how), merged_members(g["members"], proposal["names"])), None
                    )
    return list(seen)


def steps(sc: Scenario, data: dict[str, DomainData], study_steps: list[Step], proposal: dict) -> list[Step]:
    """The merge and evaluation steps of every merged group of the proposal (each
    distinct group and method once), after the study's steps they depend on."""
    pl = _Planner(sc, data)
    pl.steps = {s.id: s for s in study_steps}
    pre = f"{proposal['adapter_method']}/{proposal['seed']}"
    for method, members in _merged(proposal):
        pl.merge_steps(pre, members, merge_spec(sc, method), prefix=PREFIX, group="plan", members=True)
    known = {s.id for s in study_steps}
    return [s for k, s in pl.steps.items() if k not in known]


def _grouping(results: dict, groups: list[dict], how: str, pre: str, own: dict, names: list[str],
              measure: str) -> dict:  # fmt: skip
    """One grouping merged under ``how``: each group's method and measured
    retention % and worst member %, the grouping's (module docstring) and its
    predicted ``measure``: the mean over the merged domains of their group's
    predicted cost, or with ``worst_pct`` the largest group's."""
    from .assemble import member_losses

    per_domain, out = {}, []
    for g in groups:
        g = {**g, "method": method_of(g, how) if len(g["members"]) > 1 else "keep", "retention_pct": None,
             "worst_pct": None}  # fmt: skip
        if len(g["members"]) > 1:
            members = merged_members(g["members"], names)
            ev = merge_evaluation(results, pre, g["method"], comp_name(members), PREFIX)
            # summed in the domains' order too: one set, one mean to the last bit, so a random
            # grouping that draws the plan's groups ties it instead of beating it by 1e-16
            deltas = dict(zip(members, member_losses(ev, {d: own[d] for d in members})))
            per_domain.update(deltas)
            g.update(retention_pct=float(np.mean(list(deltas.values()))), worst_pct=max(deltas.values()),
                     ppl={d: ev[d]["ppl"] for d in g["members"]})  # fmt: skip
        out.append(g)
    # the predicted cost of the method it is merged by, where the plan costed that method
    costs = [g.get("costs", {}).get(g["method"], g["cost"]) for g in out if len(g["members"]) > 1
             for _ in g["members"]]  # fmt: skip
    merged = [per_domain[d] for d in names if d in per_domain]
    predicted = None if not costs else float(max(costs) if measure == "worst_pct" else np.mean(costs))
    return {"groups": out, "retention_pct": float(np.mean(merged)) if merged else None,
            "worst_pct": max(merged) if merged else None, "predicted": predicted}  # fmt: skip


def assemble(proposal: dict, results: dict) -> dict:
    """The section's data: per entry of ``plan.methods``, the plan's grouping and
    the random groupings measured, the plan's rank among them and the verdict."""
    pre = f"{proposal['adapter_method']}/{proposal['seed']}"
    own = {d: results[f"eval/{pre}/adapter/{d}"][d]["ppl"] for d in proposal["names"]}
    out = {k: v for k, v in proposal.items() if k not in ("plan", "random")}
    out.update(plan_groups=proposal["plan"], own_ppl=own, by_method=[])
    measure = proposal["measure"]
    for how in proposal["methods"]:
        plan = _grouping(results, proposal["plan"], how, pre, own, proposal["names"], measure)
        rand = [_grouping(results, g, how, pre, own, proposal["names"], measure) for g in proposal["random"]]
        c = compare(plan[measure], [r[measure] for r in rand])
        m = {"how": how, "plan": plan, "random": rand, "comparison": c}
        m["verdict"] = verdict(m, proposal["budget"], measure)
        out["by_method"].append(m)
    return out


def compare(value: float | None, random_values: list[float | None]) -> dict | None:
    """The plan's value against the random groupings' (lower is better): their
    mean, std, min, median and max; how many it beats (strictly lower), ties and
    loses to; its rank among all (1 = lowest; ties share the best rank) and the
    one-sided empirical p-value ``(1 + #{random <= plan}) / (R + 1)``."""
    if value is None or not random_values or any(v is None for v in random_values):
        return None
    r = np.asarray(random_values, dtype=float)
    beats, ties = int((r > value).sum()), int((r == value).sum())
    return {"n": len(r), "mean": float(r.mean()), "std": float(r.std(ddof=1)) if len(r) > 1 else None,
            "min": float(r.min()), "median": float(np.median(r)), "max": float(r.max()),
            "beats": beats, "ties": ties, "loses": len(r) - beats - ties, "fraction_beaten": beats / len(r),
            "rank": 1 + int((r < value).sum()), "of": len(r) + 1,
            "p_value": (1 + int((r <= value).sum())) / (len(r) + 1)}  # fmt: skip


def _how(methods: str) -> str:
    return "merged as `loramix plan` proposes" if methods == "plan" else f"merged by {methods}"


def verdict(m: dict, budget: float, measure: str = "retention_pct") -> str:
    """One line, with the numbers."""
    c, p = m["comparison"], m["plan"]
    if c is None:
        return (f"No comparison: at budget {budget:g} the plan merges no adapters (every group is a single "
                "adapter), so there is nothing to measure; raise `plan.budget`.")  # fmt: skip
    std = f" ± {c['std']:.2f}" if c["std"] is not None else ""
    ties = f", ties {c['ties']}" if c["ties"] else ""
    words, agg = MEASURES[measure]
    nums = (f"{words} of the plan's grouping {p[measure]:.2f} (the {agg} over the domains it merges of the merge's "
            f"perplexity change against each domain's own adapter) against {c['mean']:.2f}{std} for {c['n']} random "
            "groupings of the same sizes "
            f"(median {c['median']:.2f}); it beats {c['beats']}{ties} and loses to {c['loses']} of them, rank "
            f"{c['rank']} of {c['of']}, one-sided p = {c['p_value']:.3f}")  # fmt: skip
    if c["p_value"] <= ALPHA:
        head = "Yes: `loramix plan` beats random groupings"
    elif p[measure] < c["mean"]:
        head = f"Not clearly: `loramix plan` beats the random mean, not significantly (p > {ALPHA})"
    else:
        head = "No: `loramix plan` does no better than random groupings"
    return f"**{head}** ({_how(m['how'])}): {nums}."
