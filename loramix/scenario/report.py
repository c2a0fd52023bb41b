"""The scenario report: tables, fit, plots, written from the run's results.

Inputs are plain tables (pandas), so a report can be re-rendered from a
``report.json`` without rerunning anything:

* ``results``: one row per (adapter method, seed, composition, merge method)
  with the composition's RMS cosine and the perplexities on the union of its
  domains' eval splits; ``delta_ppl_pct = 100 (ppl_merge - ppl_merged_data)
  / ppl_merged_data``.
* ``summary``: ``results`` averaged over seeds; ``*_std`` is the sample
  standard deviation (``ddof = 1``; empty with one seed).
* ``fits``: for each adapter method and merge method, ``delta_ppl_pct`` of the
  summary rows (one point per composition) regressed on ``rms_cosine``
  (:func:`loramix.fit.fit_line`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..fit import fit_line
from ..io.outputs import json_safe
from ..perplexity import RECORD_COLUMNS
from .evaluations import evaluations

RESULT_COLUMNS = [
    "adapter_method", "seed", "composition", "k", "merge_method", "rms_cosine", "mean_cosine",
    "rms_cosine_effective", "ppl_merge", "ppl_merged_data", "delta_ppl_pct", "ppl_base", "eval_tokens",
    "retention_pct", "worst_pct",
]  # fmt: skip
SUMMARY_VALUES = ["rms_cosine", "mean_cosine", "ppl_merge", "ppl_merged_data", "delta_ppl_pct", "ppl_base",
                  "retention_pct", "worst_pct"]  # fmt: skip
PI_LEVEL = 0.95
MAX_DOMAIN_TABLES = 12  # beyond this many compositions, per-domain tables only for those with merged data


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._+-]`` replaced by ``-``:
    a file name every filesystem takes (adapter labels carry ``:`` and ``@``)."""
    import re

    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def similarity_png(label: str) -> str:
    """The similarity heatmap's file name for adapter label ``label``."""
    return f"similarity_{safe_name(label)}.png"


def _kinds(names) -> list:
    """The traits of the distinct adapter kinds of the study labels ``names``
    (``KIND[@R][:INIT]``, in order; the report asks the kinds, not their names):
    :func:`~loramix.scenario.traits.kind_traits`, torch-free."""
    from .traits import kind_of, kind_traits

    return [kind_traits(k) for k in dict.fromkeys(kind_of(n) for n in names)]


def delta_pct(ppl: float, ppl_ref: float) -> float:
    """``100 (ppl - ppl_ref) / ppl_ref``."""
    return 100.0 * (ppl - ppl_ref) / ppl_ref


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of every value column."""
    keys = ["adapter_method", "composition", "k", "merge_method"]
    g = results.groupby(keys, sort=False)
    out = g[SUMMARY_VALUES].mean()
    std = g[SUMMARY_VALUES].std(ddof=1)
    std.columns = [f"{c}_std" for c in std.columns]
    out = out.join(std)
    out["n_seeds"] = g["seed"].nunique()
    return out.reset_index()


def compute_fits(summary: pd.DataFrame, init: str | None = None) -> list[dict]:
    """One fit per (adapter method, merge method): ``delta_ppl_pct ~ rms_cosine``
    over the compositions (seed means); with the study's default ``init``,
    each says how its adapters were initialised (``loramix predict`` picks
    the study that matches the adapters it is given)."""
    from .traits import init_of

    fits = []
    for (am, mm), g in summary.groupby(["adapter_method", "merge_method"], sort=False):
        g = g[
            np.isfinite(g["delta_ppl_pct"].to_numpy(dtype=float))
        ]  # compositions with a merged-data adapter
        f = fit_line(g["rms_cosine"], g["delta_ppl_pct"], labels=g["composition"]).to_dict()
        fits.append(
            {"adapter_method": am, "merge_method": mm, **({"init": init_of(am, init)} if init else {}), **f}
        )
    return fits


def records(df: pd.DataFrame) -> list[dict]:
    return json_safe(df.to_dict(orient="records"))


# --------------------------------------------------------------------------- markdown


def _f(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{nd}f}"


def _pm(m, s, nd=2) -> str:
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return _f(m, nd)
    return f"{_f(m, nd)} ± {_f(s, nd)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _model_label(model: str) -> str:
    """``adapter:arith`` -> ``adapter arith``; ``merge:ties:a+b`` -> ``ties``."""
    kind, _, rest = model.partition(":")
    if kind == "adapter":
        return f"adapter {rest}"
    if kind == "merged-data":
        return "merged-data"
    if kind == "merge":
        return rest.split(":")[0]
    return model


def given_adapters(sc: dict) -> dict | None:
    """``{domain: path}`` of a study of given adapters (``domains.NAME.adapter``), else None."""
    return sc.get("adapters", {}).get("given")


def trained_recipe(sc: dict) -> dict | None:
    """The ``[adapters]`` recipe of the study ``sc`` (report.json's ``scenario``)
    as the fit files record it, for ``loramix predict`` (its labels' ranks are
    in the labels); None for a study of given adapters, trained elsewhere."""
    ads = sc.get("adapters") or {}
    return None if "given" in ads else {k: v for k, v in ads.items() if k != "methods"}


class _View:
    """What several report sections read, taken from ``report.json`` once."""

    def __init__(self, report: dict, cache=None):
        self.cache = cache  # the scenario cache a slow section is kept in, or None
        self.sc = report["scenario"]
        self.env = report["environment"]
        self.summary = pd.DataFrame(report["summary"])
        self.evals = pd.DataFrame(evaluations(report))
        self.seeds = self.sc["seeds"]
        self.nseed = len(self.seeds)
        self.spread = " (mean ± sample std over seeds)" if self.nseed > 1 else ""


def _section_intro(report: dict, v: _View) -> list[str]:
    """Title, provenance and the definition of Δppl %."""
    sc = v.sc
    L: list[str] = []
    L.append(f"# Composition study: {sc['name']}")
    L.append("")
    if sc.get("description"):
        L += [sc["description"].strip(), ""]
    if given_adapters(sc):
        return L + _intro_given(report, sc)
    L.append(
        f"Generated by `loramix scenario run {report['scenario_file']}` on {report['created']} "
        f"(loramix {report['loramix_version']}), following the protocol of *Naive LoRA Summation* "
        "(arXiv 2508.11985): one adapter per domain, a merged-data adapter per composition trained on "
        "the union of its domains' training data with the same recipe, the naive sum (and other merges) "
        "of the domain adapters, perplexity on each domain's eval split and on their union."
    )
    L.append("")
    L.append("`Δppl % = 100 · (ppl_merge − ppl_merged_data) / ppl_merged_data`, on the union of the "
             "composition's eval splits (token-weighted). Negative: the merge beats training on the merged "
             "data.")  # fmt: skip
    L.append("")
    return L


def _intro_given(report: dict, sc: dict) -> list[str]:
    """The provenance of a study of given adapters, and why it has no Δppl %."""
    paths = ", ".join(f"{d} `{p}`" for d, p in given_adapters(sc).items())
    return [
        f"Generated by `loramix scenario run {report['scenario_file']}` on {report['created']} "
        f"(loramix {report['loramix_version']}) on adapters trained elsewhere ({', '.join(sc['adapters']['methods'])}; "
        f"given: {paths}): the naive sum (and other merges) of the domain adapters, perplexity on each domain's "
        "eval split and on their union, against the base and each member's own adapter.",
        "",
        "No merged-data adapter: the given adapters' training recipe is unknown, so there is no Δppl % and no "
        "fit of it on the cosine; the merges are measured by retention % and kept gain % instead.",
        "",
    ]


def _summary_given(am: str, g: pd.DataFrame) -> str:
    """The naive sum's retention % over a study of given adapters' compositions."""
    g = g[g["retention_pct"].notna()]
    lo, hi = g.loc[g["retention_pct"].idxmin()], g.loc[g["retention_pct"].idxmax()]
    if len(g) == 1:  # not "ranges from x (a+b) to x (a+b) over 1 compositions"
        return (f"- **{am}**: retention % of the naive sum (its perplexity against the members' own adapters) "
                f"is {_f(lo['retention_pct'], 1)} ({lo['composition']}), at RMS cosine "
                f"{_f(lo['rms_cosine'], 3)}.")  # fmt: skip
    return (f"- **{am}**: retention % of the naive sum (its perplexity against the members' own adapters) ranges "
            f"from {_f(lo['retention_pct'], 1)} ({lo['composition']}) to {_f(hi['retention_pct'], 1)} "
            f"({hi['composition']}) over {len(g)} compositions; their RMS cosine from "
            f"{_f(g['rms_cosine'].min(), 3)} to {_f(g['rms_cosine'].max(), 3)}.")  # fmt: skip


def _section_summary(report: dict, v: _View) -> list[str]:
    """The key numbers, computed from the tables below."""
    sc, summary = v.sc, v.summary
    L: list[str] = []
    L.append("## Summary")
    L.append("")
    for am in dict.fromkeys(summary["adapter_method"]):
        g = summary[(summary["adapter_method"] == am) & (summary["merge_method"] == "sum")]
        if given_adapters(sc):
            if g["retention_pct"].notna().any():
                L.append(_summary_given(am, g))
            continue
        # the compositions with a merged-data adapter: the cosines beside the Δppl % are theirs
        g = g[g["delta_ppl_pct"].notna()]
        if g.empty:
            continue
        lo, hi = g.loc[g["delta_ppl_pct"].idxmin()], g.loc[g["delta_ppl_pct"].idxmax()]
        head = f"- **{am}**: Δppl % of the naive sum against merged-data training "
        if len(g) == 1:
            line = (f"{head}is {_f(lo['delta_ppl_pct'], 1)} ({lo['composition']}), at RMS cosine "
                    f"{_f(lo['rms_cosine'], 3)}")  # fmt: skip
        else:
            line = (f"{head}ranges from {_f(lo['delta_ppl_pct'], 1)} ({lo['composition']}) to "
                    f"{_f(hi['delta_ppl_pct'], 1)} ({hi['composition']}) over {len(g)} compositions; "
                    f"their RMS cosine from {_f(g['rms_cosine'].min(), 3)} to {_f(g['rms_cosine'].max(), 3)}")  # fmt: skip
        f = next(
            (f for f in report["fits"] if f["adapter_method"] == am and f["merge_method"] == "sum"), None
        )
        if f is not None and f.get("pearson_r") is not None:
            line += (
                f"; Pearson r of Δppl % with RMS cosine {_f(f['pearson_r'], 2)} over {f['n']} compositions"
            )
            if f.get("loo_rmse") is not None:
                line += f" (leave-one-out RMSE {_f(f['loo_rmse'], 1)} points)"
        best = report.get("best_methods", {}).get(am)
        if best and len(sc["merge"]) > 1:
            line += f"; lowest mean Δppl %: **{best['method']}** ({_f(best['delta'], 1)} %)"
        L.append(line + ".")
    L.append("")
    return L


def _section_setup(report: dict, v: _View) -> list[str]:
    """Base, adapters, seeds, merges, evaluation, and the domains table."""
    sc, seeds = v.sc, v.seeds
    L: list[str] = []
    L.append("## Setup")
    L.append("")
    b = sc["base"]
    if "path" in b:
        L.append(f"- Base model: `{b['path']}`")
    else:
        bb = b["build"]
        data = ", ".join(f"`{d}`" for d in bb["data"]) or "the domains' training splits"
        L.append(f"- Base model: built by `loramix base build` (size `{bb['size']}`, steps {bb['steps']}, "
                 f"seed {bb['seed']}) on {data}")  # fmt: skip
    base_info = report.get("base", {})
    if base_info.get("parameters"):
        L.append(f"  — {base_info['parameters']:,} parameters")
    elif base_info.get("params_note"):  # a quantized or pickle-only base: why no count
        L.append(f"  — parameters {base_info['params_note']}")
    ad = sc["adapters"]
    if given_adapters(sc):
        L.append(f"- Adapters: {', '.join(ad['methods'])}, given (trained elsewhere): "
                 + ", ".join(f"{d} `{p}`" for d, p in ad["given"].items()))  # fmt: skip
        L.append(f"- Eval splits drawn with data seed {sc['data_seed']} (no training seed: one adapter per "
                 "domain, given)")  # fmt: skip
    else:
        L += _recipe_lines(ad, seeds, sc)
    # a variant's table holds its method: "`iso-c-rms` (iso-c, flat=rms)"
    merges = ", ".join(f"`{m}`" + (f" ({', '.join(v if k == 'method' else f'{k}={v}' for k, v in p.items())})"
                                   if p else "") for m, p in sc["merge"].items())  # fmt: skip
    L.append(f"- Merge methods: {merges}")
    ev = sc["eval"]
    L.append(f"- Evaluation: perplexity over {ev['on']} tokens, max_len {ev['max_len']}, batch {ev['batch']}"
             + _cap_said(ev))  # fmt: skip
    from .answer import setup_lines

    L += setup_lines(report, v)
    L.append("")
    rows = []
    # given adapters: no training split (a train count is [predictors]' calibration records only)
    train = not given_adapters(sc) or any(d["train"] for d in report["domains"].values())
    # domains.NAME.trained_on: the records each adapter was trained on, left out of its eval pool
    left = any("left_out" in d for d in report["domains"].values())
    for name, d in report["domains"].items():
        rows.append([name, f"`{d['data']}`", *([str(d["train"])] if train else []), str(d["eval"]),
                     str(d.get("eval_tokens", "—")), *([_left_out(d)] if left else []),
                     *([d["sha256_train"][:12]] if train else [])])  # fmt: skip
    head = ["domain", "data", "train", "eval", "eval tokens", "left out (trained on)", "train sha256"]
    drop = ({"train", "train sha256"} if not train else set()) | (
        {"left out (trained on)"} if not left else set()
    )
    L.append(_table([h for h in head if h not in drop], rows))
    L.append("")
    return L


def _cap_said(ev: dict) -> str:
    """The cap on an evaluation batch's positions, as the report's setup says it;
    nothing for a study summarised before the cap existed (its batches had none)."""
    if "batch_tokens" not in ev:
        return ""
    cap = ev["batch_tokens"]
    if cap is None:
        return " (at most `batch` records of the domain's mean length in positions)"
    return " (no cap on positions)" if cap == 0 else f" (at most {cap:,} positions)"


def _left_out(d: dict) -> str:
    """The setup table's count of records left out as trained on, and of
    them those found by n-gram overlap only (loramix.contamination)."""
    if "left_out" not in d:
        return "—"
    near, n = d.get("left_out_ngram", 0), d.get("trained_on_ngram")
    by = f" by {n}-grams" if n is not None else ""  # a report of before trained_on_ngram: 13 (unrecorded)
    return f"{d['left_out']}" + (f" ({near} near copies{by})" if near else "")


def _recipe_lines(ad: dict, seeds: list, sc: dict) -> list[str]:
    """The setup's lines on the adapters' training recipe and seeds."""
    sched = f"{ad['steps']} steps" if ad.get("steps") else f"{ad['epochs']:g} epoch(s)"
    extra = {k: v for k, v in ad.items() if k in ("warmup", "weight_decay", "grad_clip")}
    return [f"- Adapters: {', '.join(ad['methods'])}; rank {ad['rank']}, alpha {ad['alpha']:g}"
            + "".join(f", tau {ad['tau']:g} ({k.label})" for k in _kinds(ad["methods"]) if "tau" in k.options)
            + f", targets {', '.join(ad['targets']) if ad['targets'] else '(default)'}; {sched}, lr "
            f"{ad['lr']:g}, batch {ad['batch']}, max_len {ad['max_len']}"
            + "".join(f", {k} {v:g}" for k, v in extra.items()),
            f"- Seeds: {', '.join(map(str, seeds))} (adapter training; data split seed {sc['data_seed']})"]  # fmt: skip


def _section_sum_tables(report: dict, v: _View) -> list[str]:
    """The naive sum against merged-data training, one table per adapter kind."""
    summary, spread = v.summary, v.spread
    L: list[str] = []
    sums = summary[summary["merge_method"] == "sum"]
    if given_adapters(v.sc):
        return _sum_tables_given(sums)
    for am in dict.fromkeys(summary["adapter_method"]):
        g = sums[sums["adapter_method"] == am]
        L.append(f"## Naive sum vs merged-data training: {am}{spread}")
        L.append("")
        rows = []
        for _, r in g.iterrows():
            rows.append([r["composition"], _pm(r["ppl_merge"], r.get("ppl_merge_std")),
                         _pm(r["ppl_merged_data"], r.get("ppl_merged_data_std")),
                         _pm(r["delta_ppl_pct"], r.get("delta_ppl_pct_std")),
                         _pm(r.get("retention_pct"), r.get("retention_pct_std")),
                         _pm(r["rms_cosine"], r.get("rms_cosine_std"), 4), _f(r["mean_cosine"], 4),
                         _f(r["ppl_base"])])  # fmt: skip
        L.append(_table(["composition", "ppl sum", "ppl merged-data", "Δppl %", "retention %", "RMS cosine",
                         "mean cosine", "ppl base"], rows))  # fmt: skip
        L.append("")
    return L


def _sum_tables_given(sums: pd.DataFrame) -> list[str]:
    """The naive sum per composition, one table per adapter label, without
    merged-data columns (given adapters have none)."""
    L: list[str] = []
    for am in dict.fromkeys(sums["adapter_method"]):
        g = sums[sums["adapter_method"] == am]
        rows = [[r["composition"], _f(r["ppl_merge"]), _f(r.get("retention_pct")), _f(r["rms_cosine"], 4),
                 _f(r["mean_cosine"], 4), _f(r["ppl_base"])] for _, r in g.iterrows()]  # fmt: skip
        L += [f"## Naive sum: {am}", "",
              _table(["composition", "ppl sum", "retention %", "RMS cosine", "mean cosine", "ppl base"], rows), ""]  # fmt: skip
    return L


def _section_per_domain(report: dict, v: _View) -> list[str]:
    """Perplexity per composition and domain, first seed: by way of the scenario
    cache where there is one (:meth:`~.cache.Cache.derived`, kind ``report``),
    keyed by all it reads, so that a rerun copies the first run's text
    (0.5-0.7 s of a loaded CPU for the 14-domain study, against 5 ms for the key)."""
    if v.cache is None:
        return _per_domain(report, v)
    # pandas and numpy too: the union's NLL is their sum
    inputs = {"section": "per_domain", "merge": list(v.sc["merge"]), "seeds": v.seeds,
              "summary": report["summary"], "evaluations": evaluations(report),
              "pandas": pd.__version__, "numpy": np.__version__}  # fmt: skip

    def make(tmp: Path):
        (tmp / "section.md").write_bytes("\n".join(_per_domain(report, v)).encode())

    folder = v.cache.derived("report", inputs, make, label="per composition and domain")
    return [(folder / "section.md").read_bytes().decode()]  # joined as its lines were


def _per_domain(report: dict, v: _View) -> list[str]:
    sc, summary, evals, seeds, nseed = v.sc, v.summary, v.evals, v.seeds, v.nseed
    L: list[str] = []
    L.append("## Per composition and domain")
    L.append("")
    given = given_adapters(sc)  # one adapter per domain, none trained: no seeds to choose from
    L.append("Perplexity on each eval split" + ("" if given else " (first seed"
             + (f" {seeds[0]}" if nseed > 1 else "") + ")") + ": the base, each domain's own adapter, "
             + ("" if given else "the merged-data adapter ") + "and each merge of the composition.")  # fmt: skip
    L.append("")
    if not evals.empty:
        ev0 = evals[evals["seed"] == seeds[0]]
        comps = list(dict.fromkeys(summary["composition"]))
        if len(comps) > MAX_DOMAIN_TABLES:  # a study at scale: those with a merged-data adapter
            comps = [c for c in comps if (ev0["model"] == f"merged-data:{c}").any()]
            L += [
                f"(The {len(comps)} compositions with a merged-data adapter; `evaluations.csv` has the rest.)",
                "",
            ]
        for am in dict.fromkeys(summary["adapter_method"]):
            e_am = ev0[ev0["adapter_method"] == am]
            for comp in comps:
                doms = comp.split("+")
                models = ["base"] + [f"adapter:{d}" for d in doms] + [f"merged-data:{comp}"]
                models += [
                    f"merge:{m}:{comp}"
                    for m in sc["merge"]
                    if not e_am[e_am["model"] == f"merge:{m}:{comp}"].empty
                ]  # noqa: E501
                cols = doms + ["union"]
                rows = []
                for m in models:
                    em = e_am[e_am["model"] == m].set_index("domain")
                    if em.empty:
                        continue
                    vals = []
                    for c in cols:
                        if c == "union":
                            sub = em.loc[[d for d in doms if d in em.index]]
                            tok = sub["tokens"].sum()
                            # a report.json written before "nll_sum" holds the total in "nll"
                            total = sub["nll_sum"] if "nll_sum" in sub.columns else sub["nll"]
                            vals.append(_f(math.exp(total.sum() / tok)) if tok else "—")
                        else:
                            vals.append(_f(em.loc[c, "ppl"]) if c in em.index else "—")
                    rows.append([_model_label(m), *vals])
                L.append(f"### {am}: {comp}")
                L.append("")
                L.append(_table(["model", *cols], rows))
                L.append("")
    return L


def _section_by_method(report: dict, v: _View) -> list[str]:
    """Δppl % by merge method (only with several methods)."""
    sc, summary, spread = v.sc, v.summary, v.spread
    L: list[str] = []
    if len(sc["merge"]) > 1 and given_adapters(sc):
        return _by_method_given(summary)
    if len(sc["merge"]) > 1:
        L.append(f"## Δppl % by merge method{spread}")
        L.append("")
        for am in dict.fromkeys(summary["adapter_method"]):
            g = summary[summary["adapter_method"] == am]
            methods = list(dict.fromkeys(g["merge_method"]))
            rows = []
            for comp in dict.fromkeys(g[g["delta_ppl_pct"].notna()]["composition"]):
                gc = g[g["composition"] == comp].set_index("merge_method")
                rows.append([comp] + [_pm(gc.loc[m, "delta_ppl_pct"], gc.loc[m, "delta_ppl_pct_std"])
                                      if m in gc.index else "—" for m in methods])  # fmt: skip
            mean_row = ["**mean**"] + [_f(g[g["merge_method"] == m]["delta_ppl_pct"].mean()) for m in methods]
            rows.append(mean_row)
            for col, name in (("retention_pct", "retention %"), ("worst_pct", "worst member %")):
                if col in g and g[col].notna().any():  # worst_pct: not in a report.json written before it
                    rows.append([f"**mean {name}** (all compositions)"]
                                + [_f(g[g["merge_method"] == m][col].mean()) for m in methods])  # fmt: skip
            L.append(f"### {am}")
            L.append("")
            L.append(_table(["composition", *methods], rows))
            L.append("")
        best = report.get("best_methods", {})
        for am, m in best.items():
            L.append(
                f"- {am}: lowest mean Δppl % across compositions: **{m['method']}** ({_f(m['delta'])} %)"
            )
        L.append("")
        L.append("![Δppl by method](delta_by_method.png)")
        L.append("")
    return L


def _by_method_given(summary: pd.DataFrame) -> list[str]:
    """Retention % by merge method and composition (given adapters: no Δppl %)."""
    L = ["## Retention % by merge method", ""]
    for am in dict.fromkeys(summary["adapter_method"]):
        g = summary[summary["adapter_method"] == am]
        methods = list(dict.fromkeys(g["merge_method"]))
        rows = []
        for comp in dict.fromkeys(g["composition"]):
            gc = g[g["composition"] == comp].set_index("merge_method")
            rows.append([comp] + [_f(gc.loc[m, "retention_pct"]) if m in gc.index else "—" for m in methods])
        rows.append(["**mean**"] + [_f(g[g["merge_method"] == m]["retention_pct"].mean()) for m in methods])
        if "worst_pct" in g:  # not in a report.json written before it
            rows.append(["**mean worst member %**"] + [_f(g[g["merge_method"] == m]["worst_pct"].mean())
                                                       for m in methods])  # fmt: skip
        L += [f"### {am}", "", _table(["composition", *methods], rows), ""]
    return L


def _section_fit(report: dict, v: _View) -> list[str]:
    """The fit of Δppl % on RMS cosine, and how to apply it."""
    sc = v.sc
    L: list[str] = []
    if given_adapters(sc):  # no Δppl %: the introduction says why
        return L
    L.append("## Does similarity predict interference?")
    L.append("")
    L.append("Least-squares line `Δppl % = slope · RMS cosine + intercept` over the compositions (seed means); "
             "a composition's RMS cosine is the quadratic mean of its pairwise RMS cosines "
             "(`sqrt(mean_{i<j} rms_ij²)`, the pair's own value for two adapters). Leave-one-out: refit "
             "without each composition and predict it. `loramix predict A B ... --fit fit.json` applies "
             "these fits to new adapters.")  # fmt: skip
    L.append("")
    rows = []
    for f in report["fits"]:
        rows.append([f["adapter_method"], f["merge_method"], str(f["n"]), _f(f["slope"], 3),
                     _f(f["intercept"], 3), _f(f["pearson_r"], 3), _f(f["r2"], 3), _f(f["residual_se"], 3),
                     _f(f["loo_rmse"], 3), _f(f["loo_mae"], 3)])  # fmt: skip
    L.append(_table(["adapters", "merge", "n", "slope", "intercept", "Pearson r", "R²", "resid. SE",
                     "LOO RMSE", "LOO MAE"], rows))  # fmt: skip
    L.append("")
    notes = [f for f in report["fits"] if f["merge_method"] == "sum"]
    few = [f for f in notes if f["n"] < 3]
    for f in few:
        L.append(f"- {f['adapter_method']}: {f['n']} composition(s): too few for a leave-one-out error "
                 "(add domains or compositions).")  # fmt: skip
    if few:  # else the figure's line would continue the last item of the list
        L.append("")
    L.append("![Δppl vs cosine](delta_vs_cosine.png)")
    L.append("")
    # the example runs `predict` on a label's adapters, which refuses a fit of fewer than two distinct
    # points ("too few to predict"): shown for the first label whose sum line exists, else not at all
    usable = {f["adapter_method"] for f in notes if f.get("slope") is not None}
    ads = [a for a in report.get("adapters") or [] if a.get("adapter_method") in usable]
    if ads and len(sc.get("compositions", [])):
        first = ads[0]
        pair = sc["compositions"][0][:2]
        L.append("Predict a composition from its adapters alone (here two of this study's own adapters, "
                 "cached):")  # fmt: skip
        L.append("")
        L.append("```bash")
        L.append(
            f"loramix predict {first[pair[0]]} {first[pair[1]]} --fit {report.get('out_hint', 'fit.json')}"
        )
        L.append("```")
        L.append("")
    return L


def _section_similarity(report: dict, v: _View) -> list[str]:
    """The similarity matrices of the domain adapters."""
    L: list[str] = []
    L.append("## Similarity of the domain adapters")
    L.append("")
    for sim in report["similarity_mean"]:
        names = sim["names"]
        rows = [[n] + [_f(v, 4) for v in row] for n, row in zip(names, sim["rms"])]
        L.append(f"RMS cosine, {sim['adapter_method']} ({'' if given_adapters(v.sc) else 'mean over seeds; '}"
                 f"{'signed residual' if _kinds([sim['adapter_method']])[0].needs_base else 'delta B·A'}):")  # fmt: skip
        L.append("")
        L.append(_table(["", *names], rows))
        L.append("")
        L += _partial_coverage(report, sim["adapter_method"])
        L.append(f"![similarity {sim['adapter_method']}]({similarity_png(sim['adapter_method'])})")
        L.append("")
    L.append("![cosine by layer](cosine_by_layer.png)")
    L.append("")
    return L


def _partial_coverage(report: dict, method: str) -> list[str]:
    """A note where two adapters of ``method`` adapt different module sets
    (given adapters with other ``target_modules`` or layers): a pair's cosine
    is over the modules both adapt, so it says nothing of the others'. Each
    such pair with its coverage ``|M_i & M_j| / |M_i | M_j|`` (first seed:
    the sets are the recipe's, the same for every seed of a trained study)."""
    sim = next((s for s in report["similarity"] if s["adapter_method"] == method and s.get("coverage")), None)
    if sim is None:
        return []
    names, cov = sim["names"], sim["coverage"]
    part = [f"{names[i]}+{names[j]} {cov[i][j]:.2f}" for i in range(len(names)) for j in range(i + 1, len(names))
            if cov[i][j] < 1]  # fmt: skip
    if not part:
        return []
    return [f"Modules in common: a cosine is over the modules both adapters adapt; these pairs adapt different "
            f"modules (shared / all adapted): {', '.join(part)}. The modules only one of them adapts are in "
            "no cosine, but in every merge.", ""]  # fmt: skip


def _section_timings(report: dict, v: _View) -> list[str]:
    """Timings and environment."""
    env = v.env
    L: list[str] = []
    L.append("## Timings and environment")
    L.append("")
    t = report["timings"]
    # a given adapter's step only passes its folder on: its reading and checks are the scenario's loading
    rows = [[k, _f(v["seconds"], 1), str(v["made"]), str(v["reused"])] for k, v in t["by_kind"].items()
            if k != "given"]  # fmt: skip
    rows.append(["**total (wall)**", _f(t["total_seconds"], 1), "", ""])
    L.append(_table(["step", "seconds (this run)", "made", "reused from cache"], rows))
    L.append("")
    if "given" in t["by_kind"]:
        L += ["The given adapters have no row: they are read and checked against the base when the scenario "
              "is loaded, before the steps run, and their steps only pass each adapter's folder on.", ""]  # fmt: skip
    if t.get("made_seconds"):
        L.append("Time to make each artifact when it was first made (from the cache records):")
        L.append("")
        L.append(_table(["step", "seconds"], [[k, _f(v, 1)] for k, v in t["made_seconds"].items()]))
        L.append("")
    L.append(f"- Date: {report['created']}")
    L.append(f"- Device: {env['device']} ({env.get('device_name', '')}); CPU: {env['cpu']} "
             f"({env['cpu_count']} logical cores, torch threads {env['torch_threads']})")  # fmt: skip
    L.append(f"- Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"numpy {env['numpy']}, pandas {env['pandas']}; {env['platform']}")  # fmt: skip
    L.append(f"- Cache: `{report['cache']['root']}`")
    ex = report.get("executor")
    if ex and ex["name"] != "serial":
        L.append(f"- Executor: {ex['name']}, {ex['jobs']} jobs of {ex['threads_per_job']} torch thread(s) each "
                 "(step seconds above add up over the jobs)")  # fmt: skip
    L.append("")
    fit = "" if given_adapters(v.sc) else "`fit.json` (for `loramix predict`), "
    L.append("Files: `results.csv` (one row per adapter method, seed, composition and merge method), "
             f"`evaluations.csv` (every perplexity), `report.json` (everything here), {fit}"
             "`similarity_per_module.csv`, `cache_log.csv`.")  # fmt: skip
    L.append("")
    return L


def _section_answer(report: dict, v: _View) -> list[str]:
    from .answer import section_answer

    return section_answer(report, v)


def _section_predictors(report: dict, v: _View) -> list[str]:
    from .answer import section_predictors

    return section_predictors(report, v)


def _section_compose(report: dict, v: _View) -> list[str]:
    from .compose import section

    return section(report, v)


def _section_plan(report: dict, v: _View) -> list[str]:
    from .answer import section_plan

    return section_plan(report, v)


def _section_kinds(report: dict, v: _View) -> list[str]:
    from .answer import section_kinds

    return section_kinds(report, v)


_SECTIONS = (_section_intro, _section_answer, _section_compose, _section_plan, _section_summary, _section_setup, _section_kinds,
             _section_sum_tables, _section_per_domain, _section_by_method, _section_fit, _section_predictors,
             _section_similarity, _section_timings)  # fmt: skip


def render_markdown(report: dict, cache=None) -> str:
    """``report.md``: one function per section, in this order; ``cache``: the
    scenario cache a slow section is kept in (:func:`_section_per_domain`), or None."""
    v = _View(report, cache)
    return "\n".join(line for section in _SECTIONS for line in section(report, v))


def write_report(folder: Path, report: dict, per_module: pd.DataFrame | None = None, cache=None) -> None:
    """Write report.json, results.csv, evaluations.csv, fit.json, report.md and plots into ``folder``;
    ``cache``: the scenario cache the figures are kept in (:func:`.plots.drawn`), None to draw them."""
    from . import plots

    folder = Path(folder)
    report = json_safe(report)
    results = pd.DataFrame(report["results"], columns=RESULT_COLUMNS)
    results.to_csv(folder / "results.csv", index=False)
    # the per-record lists (the eval-split bootstrap's) stay in report.json: a CSV cell is no place for a list
    evals = pd.DataFrame(evaluations(report))
    evals.drop(columns=list(RECORD_COLUMNS), errors="ignore").to_csv(folder / "evaluations.csv", index=False)
    if per_module is not None and not per_module.empty:
        per_module.to_csv(folder / "similarity_per_module.csv", index=False)
    fit = {
        "scenario": report["scenario"]["name"],
        # the base the fits hold for, as predictors.json records it: predict warns of adapters from another
        "base_identity": report.get("base", {}).get("identity"),
        "loramix_version": report["loramix_version"],
        "created": report["created"],
        "x": "rms_cosine: RMS cosine of the composition = sqrt(mean over pairs of pairwise RMS cosine^2)",
        "y": "delta_ppl_pct = 100 (ppl_merge - ppl_merged_data) / ppl_merged_data on the union eval split",
        "cosine_on": "residual (LoRA: s B A; D2-LoRA: the signed residual, base-free)",
        "points": "one per composition, mean over seeds",
        "prediction_level": PI_LEVEL,
        # how its adapters were trained: predict warns of adapters trained otherwise
        "adapters": trained_recipe(report["scenario"]),
        "fits": report["fits"],
    }
    given = given_adapters(report["scenario"])
    if not given:  # given adapters: no Δppl %, nothing to fit
        (folder / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    summary = pd.DataFrame(report["summary"])
    name = report["scenario"]["name"]
    from ..plots import similarity_heatmap

    for sim in report["similarity_mean"]:
        df = pd.DataFrame(sim["rms"], index=sim["names"], columns=sim["names"])
        order = [sim["names"][i] for i in plots.cluster_order(df.to_numpy(dtype=float))]
        df = df.loc[order, order]
        plots.drawn(cache, similarity_heatmap, folder / similarity_png(sim["adapter_method"]), df,
                    title=f"{name}: RMS cosine of the domain adapters ({sim['adapter_method']}; clustered order)")  # fmt: skip
    from .answer import write_plan_files, write_predictor_files
    from .compose import write_files as write_compose_files

    write_predictor_files(folder, report, cache)
    write_compose_files(folder, report, cache)
    write_plan_files(folder, report, cache)
    summary = summary[
        np.isfinite(summary["delta_ppl_pct"].to_numpy(dtype=float))
    ]  # with a merged-data adapter
    sums = summary[summary["merge_method"] == "sum"]
    if given:
        return _draw_layers_and_md(folder, report, cache, name)
    plots.drawn(cache, plots.delta_vs_cosine, folder / "delta_vs_cosine.png", sums,
                [f for f in report["fits"] if f["merge_method"] == "sum"],
                title=f"{name}: interference of the naive sum against similarity")  # fmt: skip
    plots.drawn(cache, plots.delta_by_method, folder / "delta_by_method.png", summary,
                title=f"{name}: Δppl % by merge method and composition")  # fmt: skip
    _draw_layers_and_md(folder, report, cache, name)


def _draw_layers_and_md(folder: Path, report: dict, cache, name: str) -> None:
    """cosine_by_layer.png and report.md."""
    from . import plots

    by_layer = pd.DataFrame(report["cosine_by_layer"])
    if not by_layer.empty:
        plots.drawn(cache, plots.cosine_by_layer, folder / "cosine_by_layer.png", by_layer,
                    title=f"{name}: RMS cosine by layer")  # fmt: skip
    (folder / "report.md").write_text(render_markdown(report, cache))
