"""The report's answer to the study's question, and its predictors section.

* :func:`section_answer` (the report's first section): does similarity predict
  interference across the pairs (Pearson r of each target with the RMS cosine
  over the pairs, with its count), which predictor is best under
  leave-one-domain-out and with what held-out error (its first line says so
  when no feature beats the mean), and the paper's three pairs beside ours.
* :func:`section_predictors`: every validation's table (r, R^2, MAE, interval
  coverage per predictor) and the figures.
* :func:`write_predictor_files`: ``predictors.json`` (the primary validation,
  with the base identity and the adapter kind it was fitted for, read by
  ``loramix predict`` and ``loramix plan --fit``), ``validation.csv``,
  ``predictions.csv`` and the plots.

Everything reads ``report.json``'s data only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .report import _f, _table, trained_recipe

# arXiv 2508.11985, GPT-2 small: delta_ppl% of the naive sum against merged-data training.
PAPER_PAIRS = {("math", "medicine"): -9.1, ("math", "finance"): 4.5, ("finance", "medicine"): 27.6}
TOP_ROWS = 8


def primary_validation(report: dict) -> dict | None:
    from .predictors import primary

    p = report["scenario"].get("predictors")
    vals = report.get("validations") or []
    return primary(vals, p["target"], p["method"]) if p and vals else None


def _pearson(x, y) -> tuple[float, int]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan"), int(len(x))
    return float(np.corrcoef(x, y)[0, 1]), int(len(x))


def _best_line(v: dict) -> str:
    rows = {r["predictor"]: r for r in v["summary"]}
    b, m = rows[v["best"]], rows["mean"]
    if not v["beats_mean"]:
        return (f"**No feature predicts {v['target']} better than the mean** under leave-one-domain-out over "
                f"{len(v['y'])} compositions (held-out MAE of the mean {_f(m['mae'])} points; best feature "
                f"{_best_feature(v)}).")  # fmt: skip
    return (f"Best validated predictor of {v['target']}: **{v['best']}**, held-out MAE {_f(b['mae'])} points "
            f"against {_f(m['mae'])} for the mean (r = {_f(b['r'])}, R² = {_f(b['r2'])}, "
            f"{_f(100 * b['coverage'], 0) if b['coverage'] is not None else '—'}% of held-out values inside "
            f"the {100 * v['level']:g}% intervals; leave-one-domain-out over {len(v['y'])} compositions).")  # fmt: skip


def _selection_note(v: dict) -> str:
    rows = {r["predictor"]: r for r in v["summary"]}
    cos = rows.get("ols:rms_cosine")
    nested = selection_words(v.get("selection"))
    if nested is None:  # a validation made before the choice was validated (or with no fold to choose in)
        note = (f"The best is chosen among {len(rows)} predictors by this same held-out MAE, so its error is "
                "slightly optimistic")  # fmt: skip
    else:
        note = f"The best is chosen among {len(rows)} predictors by this same held-out MAE; {nested}"
    if cos is not None:
        note += f"; the plain RMS-cosine line scores MAE {_f(cos['mae'])}, r = {_f(cos['r'])}"
    return note + "."


def selection_words(sel: dict | None) -> str | None:
    """The nested validation of the choice of the best (``selection``,
    :func:`loramix.validation.nested_selection`) in words, saying plainly when
    its held-out MAE is not below the mean's; None where there is none."""
    from collections import Counter

    if not sel or sel.get("mae") is None or sel.get("mean_mae") is None:
        return None
    chosen = sel.get("chosen") or {}
    counts = Counter(chosen.values()).most_common()
    top, count = counts[0] if counts else ("none", 0)
    others = max(len(counts) - 1, 0)
    which = (f"every one of the {count} outer folds chose {top}" if others == 0 else
             f"the outer folds chose {top} in {count} of {len(chosen)}, {others} other predictor"
             f"{'s' if others > 1 else ''} in the rest")  # fmt: skip
    words = (f"choosing it is validated too (nested leave-one-domain-out, the choice made again without each "
             f"held-out domain): held-out MAE {_f(sel['mae'])} against {_f(sel['mean_mae'])} for the mean on the "
             f"same folds (r = {_f(sel['r'])}, n = {sel['n']}; {which})")  # fmt: skip
    if not sel["mae"] < sel["mean_mae"]:
        words += ", so **choosing a predictor this way does not beat the mean on held-out domains**"
    return words


def _best_feature(v: dict) -> str:
    r = next((r for r in v["summary"] if r["predictor"] != "mean"), None)
    return "none" if r is None else f"{r['predictor']}, MAE {_f(r['mae'])}, r = {_f(r['r'])}"


def _similarity_lines(summary: pd.DataFrame, target: str | None = None) -> list[str]:
    """Pearson r of each target with the RMS cosine over the pairs, per merge
    method: retention % and Δppl %, and the worst member % where it is the
    study's ``target``."""
    L = []
    pairs = summary[summary["k"] == 2]
    cols = [("retention_pct", "retention %"), ("delta_ppl_pct", "Δppl %")]
    if target == "worst":
        cols.insert(1, ("worst_pct", "worst member %"))
    for (am, mm), g in pairs.groupby(["adapter_method", "merge_method"], sort=False):
        for col, name in cols:
            r, n = _pearson(g["rms_cosine"], g[col])
            if n >= 3:
                # the ranges over the same n pairs as r (Δppl % only where a merged-data adapter is)
                gc = g[
                    np.isfinite(g[col].to_numpy(dtype=float))
                    & np.isfinite(g["rms_cosine"].to_numpy(dtype=float))
                ]
                L.append(f"- {am}, {mm}: Pearson r of {name} with the RMS cosine over {n} pairs = **{_f(r)}** "
                         f"({name} from {_f(gc[col].min(), 1)} to {_f(gc[col].max(), 1)}; cosine from "
                         f"{_f(gc['rms_cosine'].min(), 3)} to {_f(gc['rms_cosine'].max(), 3)})")  # fmt: skip
    return L


def _ablation_lines(report: dict, summary: pd.DataFrame) -> list[str]:
    """The initialisation ablation: each ``KIND:shared`` label against ``KIND`` (independent)."""
    sims = {s["adapter_method"]: np.array(s["rms"], dtype=float) for s in report.get("similarity_mean", [])}
    pairs = summary[(summary["k"] == 2) & (summary["merge_method"] == "sum")]
    L = []
    for shared in [a for a in sims if a.endswith(":shared")]:
        indep = shared.removesuffix(":shared")
        if indep not in sims:
            continue
        parts = []
        for a, name in ((indep, "independent"), (shared, "shared")):
            m = sims[a]
            off = m[~np.eye(len(m), dtype=bool)]
            g = pairs[pairs["adapter_method"] == a]
            r, n = _pearson(g["rms_cosine"], g["retention_pct"])
            parts.append(f"{name} initialisation: RMS cosine between domains {_f(float(np.nanmean(off)), 3)} on "
                         f"average, r of retention % (sum) with it **{_f(r)}** over {n} pairs, mean retention % "
                         f"{_f(float(g['retention_pct'].mean()), 1)}")  # fmt: skip
        L.append(f"- Initialisation ablation ({indep}): " + "; ".join(parts) + ".")
    return L


def _paper_rows(summary: pd.DataFrame) -> list[list[str]]:
    rows = []
    s = summary[(summary["merge_method"] == "sum") & (summary["k"] == 2)]
    for (a, b), paper in PAPER_PAIRS.items():
        g = s[s["composition"].isin([f"{a}+{b}", f"{b}+{a}"])]
        for _, r in g.iterrows():
            rows.append([r["composition"], r["adapter_method"], f"{paper:+.1f}", _f(r["delta_ppl_pct"], 1), _f(r["retention_pct"], 1),
                         _f(r["rms_cosine"], 3)])  # fmt: skip
    return rows


def setup_lines(report: dict, v) -> list[str]:
    """The setup choices of a study at scale: top layers, the merged-data
    compositions and how they were chosen, where models are evaluated, the predictors."""
    sc, L = v.sc, []
    ad = sc["adapters"]
    if ad.get("top_layers"):
        L.append(f"- Adapters on the top {ad['top_layers']} transformer block(s) only (the targets inside them); "
                 "the blocks below are frozen and shared by every adapter and merge")  # fmt: skip
    md = sc.get("merged_data", "all")
    with_md = list(
        dict.fromkeys(r["composition"] for r in report["results"] if r.get("delta_ppl_pct") is not None)
    )
    if md not in ("all", "none"):  # none: given adapters (the introduction says why)
        how = (f"{md['count']} pairs: {', '.join('+'.join(c) for c in md['include']) or 'none'} by name, the others "
               "at evenly spaced ranks of the domains' data similarity (cosine of the word counts of their training "
               "splits, known before training)") if isinstance(md, dict) else "the listed compositions"  # fmt: skip
        L.append(f"- Merged-data adapters (the Δppl % target), {how}: {', '.join(with_md)}; every other "
                 "composition has the retention target only")  # fmt: skip
    if sc["eval"].get("domains") == "members":
        L.append("- Each model is evaluated only on the domains it serves: a domain adapter on its domain, a merge "
                 "or merged-data adapter on its members, the base on all")  # fmt: skip
    p = sc.get("predictors")
    if p:
        from .predictors import MIN_COMPOSITIONS

        if primary_validation(report) is not None:
            saved = f"`predictors.json` holds the best predictor of {p['target']} ({p['method']})"
        else:  # nothing validated: say so rather than name a file that is not there
            n = len({r["composition"] for r in report["results"]})
            saved = (f"**no predictor of {p['target']} ({p['method']}) could be validated** (leave-one-domain-out "
                     f"needs at least {MIN_COMPOSITIONS} compositions with a measured target and enough domains to "
                     f"hold out; this study has {n} compositions), so there is no `predictors.json`")  # fmt: skip
        L.append(f"- Predictors: every feature of `loramix.features` from the domain adapters' factors, the "
                 f"data-aware ones from {p['tokens']} calibration tokens of each domain's training split "
                 f"(max_len {p['max_len']}); {100 * p['level']:g}% prediction intervals; {saved}")  # fmt: skip
    return L


def section_answer(report: dict, v) -> list[str]:
    """The report's first section (module docstring)."""
    val = primary_validation(report)
    if val is None:
        return []
    L = ["## The answer", "", _best_line(val) + " " + _selection_note(val), ""]
    L += _similarity_lines(v.summary, report["scenario"]["predictors"]["target"])
    L += _ablation_lines(report, v.summary)
    L.append("")
    rows = _paper_rows(v.summary)
    if rows:
        L.append("The paper's three pairs (arXiv 2508.11985, GPT-2 small, Δppl % of the naive sum against "
                 "merged-data training) beside ours (SmolLM2 here; Δppl % needs the pair's merged-data adapter):")  # fmt: skip
        L.append("")
        L.append(_table(["pair", "adapters", "paper Δppl %", "our Δppl %", "our retention %", "our RMS cosine"],
                        rows))  # fmt: skip
        L.append("")
    L.append("Retention % = mean over the member domains of 100 · (ppl of the merge − ppl of the domain's own "
             "adapter) / ppl of the domain's own adapter, each on that domain's eval split: 0 when the merge "
             "keeps every member's gain, positive when it loses some.")  # fmt: skip
    L.append("")
    return L


def section_predictors(report: dict, v) -> list[str]:
    """Every validation: the best predictors, the mean and the plain cosine."""
    vals = report.get("validations") or []
    if not vals:
        return []
    L = ["## Predictors, validated leave-one-domain-out", ""]
    L.append("For each held-out domain, every predictor is fitted on the compositions without it and predicts "
             "those with it (docs/predictors.md); r, R², MAE and the coverage of the prediction intervals pool "
             "these held-out predictions. `ols:F` is a line on feature F; `ridge` a regularised combination of "
             "the overall features; `mean` the training mean. Full tables: `validation.csv`, `predictions.csv`.")  # fmt: skip
    L.append("")
    for val in vals:
        rows = val["summary"]
        keep = rows[:TOP_ROWS] + [r for r in rows[TOP_ROWS:] if r["predictor"] in ("mean", "ols:rms_cosine")]
        L.append(f"### {val['target']}, {val['adapter_method']} ({len(val['y'])} compositions)")
        L.append("")
        L.append(val["headline"])
        if (nested := selection_words(val.get("selection"))) is not None:
            L[-1] += f" The best is chosen by this held-out MAE; {nested}."
        L.append("")
        L.append(_table(["predictor", "n", "r", "R²", "MAE", "coverage"],
                        [[r["predictor"], str(r["n"]), _f(r["r"]), _f(r["r2"]), _f(r["mae"]),
                          _f(r["coverage"])] for r in keep]))  # fmt: skip
        L.append("")
    L.append("![predicted vs measured](predicted_vs_measured.png)")
    L.append("")
    L.append("![interference by merge method](interference_by_method.png)")
    L.append("")
    return L


def by_method(vals: list[dict], val: dict) -> dict:
    """``predictors.json``'s ``by_method``: the best validated predictor of the
    primary validation's target and adapter kind for each merge method, the
    primary's method first (:func:`loramix.validation.method_entry`)."""
    from ..validation import method_entry

    same = [
        v
        for v in vals
        if v["adapter_method"] == val["adapter_method"] and v["target_name"] == val["target_name"]
    ]
    same.sort(key=lambda v: v["merge_method"] != val["merge_method"])
    return {v["merge_method"]: method_entry(v) for v in same}


def merge_of(merges: dict, label: str) -> dict:
    """``{"method", "params"}`` of the study's merge ``label``, from the report's
    ``scenario.merge`` (``{label: its table}``, a variant's holding ``method``)."""
    params = dict(merges.get(label) or {})
    return {"method": params.pop("method", label), "params": params}


def write_predictor_files(folder: Path, report: dict, cache=None) -> None:
    """``predictors.json``, ``validation.csv``, ``predictions.csv`` and the
    predictors' plots (kept in ``cache``: :func:`.plots.drawn`)."""
    from . import plots
    from .traits import kind_of

    vals = report.get("validations") or []
    if not vals:
        return
    rows = [{"adapter_method": v["adapter_method"], "target": v["target_name"], "merge_method": v["merge_method"],
             **r} for v in vals for r in v["summary"]]  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "validation.csv", index=False)
    preds = [{"adapter_method": v["adapter_method"], "target": v["target_name"], "merge_method": v["merge_method"],
              **r} for v in vals for r in v["predictions"]]  # fmt: skip
    pd.DataFrame(preds).to_csv(folder / "predictions.csv", index=False)
    val = primary_validation(report)
    if val is not None:
        out = {k: x for k, x in val.items() if k != "predictions"}
        # ``adapter_method`` keeps the study's label (``lora@2``); readers match ``adapter_kind`` to a kind
        out.update(scenario=report["scenario"]["name"], base_identity=report["base"].get("identity"),
                   adapter_kind=kind_of(val["adapter_method"]),
                   adapters=trained_recipe(report["scenario"]))  # fmt: skip
        # the recipe of the data-aware features the fits read: predict and plan
        # compute them the same way (a feature of 128 tokens is not one of 256)
        rp = report["scenario"].get("predictors") or {}
        if "tokens" in rp and "max_len" in rp:
            out["calibration"] = {"tokens": rp["tokens"], "max_len": rp["max_len"]}
        out["by_method"] = by_method(vals, val)
        for label, e in out["by_method"].items():  # what `loramix plan` writes in a group's merge command
            e["merge"] = merge_of(report["scenario"]["merge"], label)
        (folder / "predictors.json").write_text(json.dumps(out, indent=1) + "\n")
        pred = pd.DataFrame(val["predictions"])
        plots.drawn(cache, plots.predicted_vs_measured, folder / "predicted_vs_measured.png",
                    pred[pred["predictor"] == val["best"]],
                    # which adapters: a study of several labels (lora, lora:data) validates each
                    title=f"{report['scenario']['name']}: {val['best']}, {val['adapter_method']} adapters "
                          "(held out by domain)",
                    ylabel=val["target"])  # fmt: skip
    name = report["scenario"]["name"]
    plots.drawn(cache, plots.interference_by_method, folder / "interference_by_method.png",
                pd.DataFrame(report["summary"]), title=f"{name}: interference by merge method",
                worst=(report["scenario"].get("predictors") or {}).get("target") == "worst")  # fmt: skip


# The D2-LoRA paper (arXiv 2602.14728): accuracy points over LoRA, training volatility, merge gap.
D2_PAPER = (
    "+2.2 points over LoRA (+1.6 against LoRA at rank 2r), 36% lower training volatility, merge gap near zero"
)


def _kind_stats(evals: pd.DataFrame, summary: pd.DataFrame) -> list[dict]:
    """Per adapter label: each domain adapter's perplexity on its own eval split
    (mean over domains; the spread over seeds, as the mean over domains of the
    sample std and of the coefficient of variation), its gain over the base
    (%, mean over domains), and the retention % of the sum (merged vs the
    unmerged own adapters)."""
    stats = []
    base = evals[evals["model"] == "base"].groupby("domain")["ppl"].mean()
    own = evals[evals["model"].str.startswith("adapter:")]
    own = own[own["model"].str.slice(len("adapter:")) == own["domain"]]
    for am, g in own.groupby("adapter_method", sort=False):
        per = g.groupby("domain")["ppl"]
        mean, std = per.mean(), per.std(ddof=1)
        ret = summary[(summary["adapter_method"] == am) & (summary["merge_method"] == "sum")]["retention_pct"]
        stats.append({"label": am, "ppl": float(mean.mean()),
                      "gain": float((100 * (base[mean.index] - mean) / base[mean.index]).mean()),
                      "std": float(std.mean()), "cv": float((100 * std / mean).mean()),
                      "seeds": int(g["seed"].nunique()), "retention": float(ret.mean())})  # fmt: skip
    return stats


def _kind_verdicts(stats: list[dict]) -> list[str]:
    """D2-LoRA against each LoRA label, in the paper's three terms: quality
    (perplexity), training volatility (seed CV ratio) and the merge gap."""
    from .traits import kind_of

    L = []
    for d in (s for s in stats if kind_of(s["label"]) == "d2lora"):
        for lo in (s for s in stats if kind_of(s["label"]) == "lora"):
            dp = 100 * (d["ppl"] - lo["ppl"]) / lo["ppl"]
            cv = d["cv"] / lo["cv"] if lo["cv"] > 0 else math.nan
            L.append(f"- {d['label']} against {lo['label']}: held-out perplexity {abs(dp):.1f}% "
                     f"{'lower' if dp < 0 else 'higher'} ({_f(d['ppl'])} vs {_f(lo['ppl'])}; paper: better); "
                     f"training volatility (seed CV) {_f(cv, 2)}x LoRA's (paper: 0.64x, 36% lower); retention "
                     f"of the sum {_f(d['retention'], 1)} vs {_f(lo['retention'], 1)} points (paper: merge gap "
                     "near zero; merging one adapter into the base is exact here by construction, so the sum of "
                     "two is the merge that can lose)")  # fmt: skip
    return L


def section_kinds(report: dict, v) -> list[str]:
    """Adapter kinds (and ranks) side by side, when the study has more than one."""
    labels = list(dict.fromkeys(v.summary["adapter_method"])) if not v.summary.empty else []
    if len(labels) < 2:
        return []
    L = ["## Adapter kinds compared", ""]
    L.append("Each domain adapter on its own domain's held-out split (perplexity, mean over domains), its gain "
             "over the base, the spread over training seeds (sample std of the perplexity and the coefficient of "
             "variation, mean over domains: the training volatility), and merged against unmerged: the retention "
             "% of the sum (the merge's perplexity on each member against the member's own adapter). `KIND@R` is "
             f"that kind at rank R. The D2-LoRA paper reports {D2_PAPER}, in accuracy on its own benchmarks; "
             "these are perplexities, so compare directions and ratios, not points.")  # fmt: skip
    L.append("")
    stats = _kind_stats(v.evals, v.summary)
    rows = [[s["label"], _f(s["ppl"]), _f(s["gain"], 1), _f(s["std"], 3), _f(s["cv"], 2), str(s["seeds"]),
             _f(s["retention"], 1)] for s in stats]  # fmt: skip
    L.append(_table(["adapters", "held-out ppl", "gain over base %", "seed std", "seed CV %", "seeds",
                     "retention % (sum)"], rows))  # fmt: skip
    L.append("")
    verdicts = _kind_verdicts(stats)
    if verdicts:
        L += [*verdicts, ""]
    return L


def _interval(iv) -> str:
    return "—" if not iv or iv[0] is None else f"[{_f(iv[0])}, {_f(iv[1])}]"


def section_plan(report: dict, v) -> list[str]:
    """Does ``loramix plan`` beat random groupings? (:mod:`.planval`)"""
    pv = report.get("plan_validation")
    if not pv:
        return []
    L = ["## Does `loramix plan` beat random groupings?", ""]
    from .planval import MEASURES

    measure = pv.get("measure", "retention_pct")  # a report.json written before the worst target
    words, agg = MEASURES[measure]
    for m in pv["by_method"]:
        L += [f"- {m['verdict']}"]
    L.append("")
    val = pv.get("validated") or {}
    how = f" (held-out MAE {_f(val.get('mae'))}, r = {_f(val.get('r'))})" if val else ""
    if pv.get("validated_by_method"):
        how = " (held-out MAE " + "; ".join(
            f"{m}: {_f((e.get('validated') or {}).get('mae'))} by {e['predictor']}"
            for m, e in pv["validated_by_method"].items()) + ")"  # fmt: skip
    sizes = "+".join(str(s) for s in pv["sizes"] if s > 1) or "none"
    L.append(f"The {len(pv['names'])} `{pv['adapter_method']}` domain adapters of seed {pv['seed']}, grouped as "
             f"`loramix plan --fit predictors.json --max-group {pv['max_size']} --budget {pv['budget']:g}` groups "
             f"them: cost {pv['cost']}{how}; proposed method: {pv['rule']}. Each group of two or more is merged "
             f"and evaluated on its members' eval splits, and so is every group of {pv['random_count']} random "
             f"groupings with the same group sizes ({sizes}; seed {pv['random_seed']}). A member's loss is "
             "100 · (ppl of the merge − ppl of the member's own adapter) / ppl of the own adapter; a group's "
             f"{words} is the {agg} over its members' losses, a grouping's the {agg} over the domains it merges "
             "(lower is better). Every group: `plan_validation.csv`.")  # fmt: skip
    L.append("")
    ms = pv["by_method"]
    head = ["group", "members", "proposed", "predicted cost", "interval"]
    head += [f"{words} ({'as proposed' if m['how'] == 'plan' else m['how']})" for m in ms]
    rows = []
    for k, g in enumerate(pv["plan_groups"]):
        if len(g["members"]) > 1:
            rows.append([str(g["group"]), ", ".join(g["members"]), g["method"], _f(g["cost"]),
                         _interval(g.get("interval")), *(_f(m["plan"]["groups"][k][measure]) for m in ms)])  # fmt: skip
    if rows:
        L += [_table(head, rows), ""]
    alone = [g["members"][0] for g in pv["plan_groups"] if len(g["members"]) == 1]
    if alone:
        L += [f"Kept alone: {', '.join(alone)}.", ""]
    rows = []
    for m in ms:
        c, label = m["comparison"], "as proposed" if m["how"] == "plan" else m["how"]
        if c is None:
            continue
        pred = float(np.mean([r["predicted"] for r in m["random"]]))
        std = f" ± {_f(c['std'])}" if c["std"] is not None else ""
        rows.append([label, _f(m["plan"]["predicted"]), _f(pred), _f(m["plan"][measure]),
                     f"{_f(c['mean'])}{std}", f"{_f(c['min'])} / {_f(c['median'])} / {_f(c['max'])}",
                     f"{c['beats']} of {c['n']}", f"{c['rank']} of {c['of']}", _f(c["p_value"], 3)])  # fmt: skip
    if rows:
        L.append(_table(["merged", "predicted: plan", "predicted: random mean", f"{words}: plan",
                         "random mean ± std", "random min / median / max", "plan beats", "plan's rank",
                         "one-sided p"], rows))  # fmt: skip
        L.append("")
        pred = ("the largest group's predicted cost" if measure == "worst_pct"
                else "the mean over the merged domains of their group's predicted cost")  # fmt: skip
        L.append(f"Predicted: {pred}. The p-value counts the random groupings at least as good as the plan's, "
                 "`(1 + #) / (R + 1)`.")  # fmt: skip
        L.append("")
        L.append("![plan vs random groupings](plan_vs_random.png)")
        L.append("")
    return L


def write_plan_files(folder: Path, report: dict, cache=None) -> None:
    """``plan_validation.csv`` (every group of every grouping, for each way of
    merging) and ``plan_vs_random.png`` (kept in ``cache``: :func:`.plots.drawn`)."""
    from . import plots
    from .planval import MEASURES

    pv = report.get("plan_validation")
    if not pv:
        return
    measure = pv.get("measure", "retention_pct")
    rows = []
    for m in pv["by_method"]:
        for name, gr in [
            ("plan", m["plan"]),
            *((f"random-{k}", r) for k, r in enumerate(m["random"], start=1)),
        ]:
            for g in gr["groups"]:
                iv = g.get("interval") or [None, None]
                rows.append({"merged": m["how"], "grouping": name, "group": g["group"], "size": len(g["members"]),
                             "members": "+".join(g["members"]), "method": g["method"], "predicted_cost": g["cost"],
                             "low": iv[0], "high": iv[1], "retention_pct": g["retention_pct"],
                             "grouping_retention_pct": gr["retention_pct"], "worst_pct": g.get("worst_pct"),
                             "grouping_worst_pct": gr.get("worst_pct")})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "plan_validation.csv", index=False)
    ms = [m for m in pv["by_method"] if m["comparison"] is not None]
    if ms:
        plots.drawn(cache, plots.plan_vs_random, folder / "plan_vs_random.png",
                    [(m["how"], m["plan"][measure], [r[measure] for r in m["random"]]) for m in ms],
                    title=f"{report['scenario']['name']}: loramix plan against random groupings "
                    f"({pv['adapter_method']}, seed {pv['seed']})", what=MEASURES[measure][0])  # fmt: skip
