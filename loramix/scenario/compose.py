"""Which of the study's adapters compose, and by which merge method.

The measure is the share of each member's gain over the base that a merge
keeps, on that member's own eval split ``d``:

    kept_d = 100 (ppl_base(d) - ppl_merge(d)) / (ppl_base(d) - ppl_own(d))

100: the merge is as good on ``d`` as ``d``'s own adapter; 0: no better than
the base; below 0: worse than the base. Each member's share is averaged
over the seeds (a seed where the own adapter does not beat the base has no
gain to keep, and no share); a composition's figure is its **worst**
member's, since a merge serves every member at once and the mean would let
one member that gains everything hide another that loses it. A
composition's best method is the merge method with the highest figure; its
verdict compares that figure with :data:`COMPOSES_AT` and :data:`PARTLY_AT`.

With several seeds, the spread is the sample standard deviation over seeds
of the worst member's share: a best method that leads the runner-up by
less than the larger of their two spreads, and a figure within its spread
of a threshold, are flagged. With one seed nothing is flagged and the
report says that the spread is not measured.

Eval-split noise (:func:`eval_interval`): the eval splits are small (16
records in the real study), so a figure also carries the sampling noise of
the records that make them up. A paired bootstrap resamples each member's
eval records with replacement, :data:`BOOT_RESAMPLES` times, the same
records for the base, the own adapter and the merge (and every seed: they
share the split), recomputes each ``kept_d`` from the resampled NLL and
token sums, and takes the worst member per resample (of those with a gain
to keep in the figure itself); the
:data:`BOOT_INTERVAL` % percentile interval of those worst-member figures
is the composition's eval interval, and a verdict whose interval holds
values on both sides of a threshold is *within eval noise*. It needs each
evaluation's per-record NLL (``record_nll`` in ``report.json``'s
evaluations) and its records' token counts (``record_tokens``, once per
domain: the same for every model evaluated on it; a ``report.json`` written
before they were kept once has them in each evaluation); where an
evaluation lacks them (made before loramix kept them) the interval is not
computed.

:func:`rows` reads only ``report.json``'s ``evaluations`` (with
``base_evaluation``: :func:`.evaluations.evaluations`), ``record_tokens``,
``summary`` and ``scenario`` (a report written before this module existed
re-renders);
:func:`section` is the report's section, :func:`write_files` writes
``composability.csv`` and ``kept_gain.png``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..perplexity import RECORD_COLUMNS
from .evaluations import evaluations
from .report import _f, _table

#: a composition whose worst member keeps at least this % of its gain composes
COMPOSES_AT = 90.0
#: ... at least this %, partly; below it, it does not compose
PARTLY_AT = 50.0
#: compositions listed at each end of a kind's ranking (all of them up to twice this)
LIST_ENDS = 8
#: resamples of the eval-split bootstrap (module docstring), the interval (%) it reports, and its seed
BOOT_RESAMPLES = 1000
BOOT_INTERVAL = 90.0
BOOT_SEED = 0
#: the columns the bootstrap adds to a row (last in composability.csv)
BOOT_COLUMNS = ("kept_worst_pct_lo", "kept_worst_pct_hi", "verdict_within_eval_noise")
CSV = "composability.csv"
PNG = "kept_gain.png"
SIZE_PNG = "kept_by_size.png"
VERDICTS = ("composes", "partly", "does not compose", "no gain to keep")


def member_shares(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per (adapter_method, seed, composition, merge_method, member domain):
    the base's, the own adapter's and the merge's perplexity on the member's
    eval split and ``kept`` (module docstring; NaN where the own adapter's
    gain is not positive)."""
    ev = evals[["adapter_method", "seed", "model", "domain", "ppl"]]
    key = ["adapter_method", "seed", "domain"]
    base = ev[ev["model"] == "base"].drop(columns="model").rename(columns={"ppl": "ppl_base"})
    own = (
        ev[ev["model"] == "adapter:" + ev["domain"]].drop(columns="model").rename(columns={"ppl": "ppl_own"})
    )
    m = ev[ev["model"].str.startswith("merge:")].rename(columns={"ppl": "ppl_merge"})
    parts = m["model"].str.split(":", n=2, expand=True)
    m = m.assign(merge_method=parts[1], composition=parts[2]).drop(columns="model")
    # a study evaluated on every domain evaluates each merge on non-members too: not its gain to keep
    m = m[[d in c.split("+") for d, c in zip(m["domain"], m["composition"])]]
    m = m.merge(base, on=key, how="left").merge(own, on=key, how="left")
    m["kept"] = kept_gain(*(m[c].to_numpy(dtype=float) for c in ("ppl_base", "ppl_own", "ppl_merge")))
    return m


def kept_gain(ppl_base, ppl_own, ppl_merge) -> np.ndarray:
    """A member's kept gain (%), elementwise over arrays of one shape (any:
    the point values' ``(rows,)``, the bootstrap's ``(seeds, resamples)``)::

        kept = 100 (ppl_base - ppl_merge) / (ppl_base - ppl_own)   where ppl_base - ppl_own > 0

    and NaN where the own adapter's gain ``ppl_base - ppl_own`` is not
    positive (or a perplexity is NaN): no gain to keep. The one formula of
    :func:`member_shares` and :func:`worst_resamples`."""
    b, o, m = (np.asarray(x, dtype=float) for x in (ppl_base, ppl_own, ppl_merge))
    gain = b - o
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain > 0, 100.0 * (b - m) / gain, np.nan)


def _per_method(shares: pd.DataFrame) -> pd.DataFrame:
    """Per (adapter_method, composition, merge_method): the worst member's
    seed-mean share ``kept``, its spread over seeds ``kept_std``, the
    members' mean share ``kept_mean`` and the members with no gain."""
    keys = ["adapter_method", "composition", "merge_method"]
    per = shares.groupby([*keys, "domain"], sort=False)["kept"].agg(["mean", "std"]).reset_index()
    out = per.groupby(keys, sort=False)["mean"].mean().rename("kept_mean").reset_index()
    worst = per.dropna(subset=["mean"]).sort_values("mean", kind="stable").drop_duplicates(keys)
    worst = worst.rename(columns={"mean": "kept", "std": "kept_std", "domain": "worst_member"})
    none = per[per["mean"].isna()].groupby(keys, sort=False)["domain"].agg("+".join).rename("no_gain")
    out = out.merge(worst, on=keys, how="left").merge(none.reset_index(), on=keys, how="left")
    return out.assign(no_gain=out["no_gain"].fillna(""))


def resample_indices(domain: str, n: int, resamples: int = BOOT_RESAMPLES) -> np.ndarray:
    """``(resamples, n)`` record indices of domain ``domain``'s eval split
    (``n`` records) drawn with replacement, seeded by :data:`BOOT_SEED` and
    the domain's name: a domain's resamples are the same in every
    composition, method, seed and re-render."""
    rng = np.random.default_rng([BOOT_SEED, zlib.crc32(domain.encode())])
    return rng.integers(0, n, size=(resamples, n))


def resampled_ppl(evals: pd.DataFrame, record_tokens: dict | None = None) -> dict:
    """``{(adapter_method, seed, domain, model): (R,) perplexities}`` of every
    evaluation with per-record NLL, on each of the domain's :func:`resample_indices`
    resamples: ``exp(C X / C t)`` with ``C`` the ``(R, n)`` counts of each record
    in each resample, ``X`` the ``(n, M)`` record NLL sums of the ``M`` models
    evaluated on the domain and ``t`` the ``(n,)`` record token counts:
    ``record_tokens[domain]`` (``report.json``'s, once per domain), or, without
    it (a report written before), each evaluation's own ``record_tokens``."""
    nll_key, tok_key = RECORD_COLUMNS
    if nll_key not in evals:
        return {}
    has = evals[nll_key].map(lambda x: isinstance(x, list) and len(x) > 0)
    out = {}
    for (am, seed, dom), g in evals[has].groupby(["adapter_method", "seed", "domain"], sort=False):
        toks = [record_tokens[dom]] if record_tokens is not None else g[tok_key].tolist()
        if any(t != toks[0] for t in toks):  # not the same records (never in a study): not paired
            continue
        X = np.array(g[nll_key].tolist(), dtype=float).T  # (n, M)
        n = X.shape[0]
        idx = resample_indices(dom, n)
        R = idx.shape[0]
        C = (
            np.bincount((idx + n * np.arange(R)[:, None]).ravel(), minlength=R * n)
            .reshape(R, n)
            .astype(float)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ppl = np.exp((C @ X) / (C @ np.asarray(toks[0], dtype=float))[:, None])  # (R, M)
        out.update({(am, seed, dom, m): ppl[:, j] for j, m in enumerate(g["model"])})
    return out


def worst_resamples(boot: dict, am: str, comp: str, method: str, seeds, skip: str = "") -> np.ndarray | None:
    """The worst member's kept gain of ``comp`` merged by ``method`` on each
    resample of ``boot`` (:func:`resampled_ppl`; module docstring): per
    resample, each member's share is averaged over the seeds where its own
    adapter beats the base on that resample, and the worst member's taken (a
    resample where no member has a gain is left out). ``skip``: the members
    (``a+b``) with no gain to keep in the figure itself, left out here too (a
    resample where such a member gains a little would give it a share the
    verdict never counts). None where an evaluation has no resamples or no
    resample has a gain."""
    shares = []
    for d in (d for d in comp.split("+") if d not in skip.split("+")):
        try:
            per_seed = [[boot[(am, s, d, m)] for m in ("base", f"adapter:{d}", f"merge:{method}:{comp}")]
                        for s in seeds]  # fmt: skip
        except KeyError:
            return None
        k = kept_gain(*(np.array(x) for x in zip(*per_seed)))  # (S, R)
        fin = np.isfinite(k)
        with np.errstate(invalid="ignore"):
            shares.append(np.where(fin, k, 0.0).sum(axis=0) / fin.sum(axis=0))  # NaN where no seed has a gain
    if not shares:
        return None
    worst = np.where(np.isnan(shares), np.inf, shares).min(axis=0)
    worst = worst[np.isfinite(worst)]
    return worst if len(worst) else None


def eval_interval(
    boot: dict, am: str, comp: str, method: str, seeds, skip: str = ""
) -> tuple[float, float] | None:
    """The :data:`BOOT_INTERVAL` % percentile interval of :func:`worst_resamples`,
    or None where it is None. (A minimum of noisy figures is biased low; on
    the real study the resamples' median sits 0.07 points below the figure,
    median over its rows: ``benchmarks/eval_interval_bias.py``.)"""
    worst = worst_resamples(boot, am, comp, method, seeds, skip)
    if worst is None:
        return None
    tail = (100.0 - BOOT_INTERVAL) / 2
    lo, hi = np.percentile(worst, [tail, 100.0 - tail])
    return float(lo), float(hi)


def within_noise(kept: float, lo: float | None, hi: float | None) -> bool | None:
    """Whether the interval ``[lo, hi]`` holds figures of two verdicts
    (``lo < t <= hi`` for a threshold ``t``); None where there is no interval
    or no figure."""
    if lo is None or hi is None or not np.isfinite(kept):
        return None
    return any(lo < t <= hi for t in (PARTLY_AT, COMPOSES_AT))


def verdict(kept: float) -> str:
    """The verdict of a worst-member share ``kept`` (%)."""
    if not np.isfinite(kept):
        return "no gain to keep"
    return "composes" if kept >= COMPOSES_AT else "partly" if kept >= PARTLY_AT else "does not compose"


def _near_threshold(kept: float, std: float) -> bool | None:
    if not (np.isfinite(kept) and np.isfinite(std)):
        return None
    return bool(min(abs(kept - COMPOSES_AT), abs(kept - PARTLY_AT)) < std)


def _row(gc: list[dict], ret: dict, nseed: int) -> dict:
    """A composition's row from its methods' figures ``gc`` (best first) and
    ``ret``: ``(method) -> (retention %, its std)``."""
    best = gc[0]
    second = gc[1] if len(gc) > 1 and np.isfinite(gc[1]["kept"]) else None
    lead = None
    if nseed > 1 and second is not None and np.isfinite(best["kept"]):
        spread = np.nanmax([best["kept_std"], second["kept_std"]])
        lead = bool(best["kept"] - second["kept"] < spread) if np.isfinite(spread) else None
    r, r_std = ret.get(best["merge_method"], (None, None))
    return {"adapter_method": best["adapter_method"], "composition": best["composition"],
            "k": len(best["composition"].split("+")), "verdict": verdict(best["kept"]),
            "best_method": best["merge_method"], "kept_worst_pct": best["kept"],
            "kept_worst_pct_std": best["kept_std"],
            "worst_member": best["worst_member"] if isinstance(best["worst_member"], str) else None,
            "kept_mean_pct": best["kept_mean"], "retention_pct": r, "retention_pct_std": r_std,
            "runner_up": None if second is None else second["merge_method"],
            "runner_up_kept_worst_pct": None if second is None else second["kept"],
            "lead_within_spread": lead,
            "verdict_within_spread": _near_threshold(best["kept"], best["kept_std"]) if nseed > 1 else None,
            "no_gain": best["no_gain"], "n_seeds": nseed}  # fmt: skip


def compute(report: dict) -> list[dict]:
    """The rows, per adapter kind ranked by the best method's worst-member
    share (highest first; a composition with no gain to keep last);
    ``by_method``: every method's figure, in the scenario's merge order."""
    evals, summary = pd.DataFrame(evaluations(report)), pd.DataFrame(report["summary"])
    if evals.empty or summary.empty:
        return []
    keys = ["adapter_method", "composition", "merge_method"]
    # the scenario's order of kinds, compositions and merges
    summary = summary.assign(order=np.arange(len(summary)))
    per = summary[[*keys, "order", "retention_pct", "retention_pct_std"]].merge(
        _per_method(member_shares(evals)), on=keys, how="inner"
    )
    seeds = list(report["scenario"]["seeds"])
    nseed = len(seeds)
    boot = resampled_ppl(evals, report.get("record_tokens"))
    out = []
    for am in dict.fromkeys(summary["adapter_method"]):
        rows = []
        for _, g in per[per["adapter_method"] == am].groupby("composition", sort=False):
            ret = {
                m: (a, b) for m, a, b in zip(g["merge_method"], g["retention_pct"], g["retention_pct_std"])
            }
            by = g.sort_values("order").to_dict(orient="records")
            best_first = sorted(by, key=_rank_key)
            r = _row(best_first, ret, nseed)
            lo, hi = eval_interval(boot, am, r["composition"], r["best_method"], seeds, r["no_gain"]) or (
                None,
                None,
            )
            r.update(kept_worst_pct_lo=lo, kept_worst_pct_hi=hi,
                     verdict_within_eval_noise=within_noise(r["kept_worst_pct"], lo, hi))  # fmt: skip
            rows.append({**r, "by_method": {b["merge_method"]: b["kept"] for b in by}})
        rows.sort(key=lambda r: -r["kept_worst_pct"] if np.isfinite(r["kept_worst_pct"]) else np.inf)
        out += [{**r, "rank": i} for i, r in enumerate(rows, start=1)]
    return out


def _rank_key(m: dict) -> tuple:
    """Methods best first: the higher worst-member share, then the higher
    mean share, then the scenario's order (a method with no figure last)."""
    k, mean = m["kept"], m["kept_mean"]
    return (-k if np.isfinite(k) else np.inf, -mean if np.isfinite(mean) else np.inf, m["order"])


#: a row's figures that are NaN where a composition has no gain to keep, which
#: report.json writes as null (:func:`rows` reads them back as NaN)
NAN_FIGURES = ("kept_worst_pct", "kept_worst_pct_std", "kept_mean_pct")


def rows(report: dict) -> list[dict]:
    """``report["composability"]``, or, for a report written before it was
    kept there, the same rows computed from its evaluations. A figure that
    JSON wrote as null (NaN: no gain to keep) is NaN again, as :func:`compute`
    gives it."""
    got = report.get("composability")
    if got is None:
        return compute(report)
    nan = float("nan")
    return [{**r, **{k: nan for k in NAN_FIGURES if k in r and r[k] is None},
             "by_method": {m: nan if x is None else x for m, x in (r.get("by_method") or {}).items()}}
            for r in got]  # fmt: skip


def _figure(x) -> str:
    """A kept-gain figure on its verdict's side of each threshold (:func:`.plots.threshold_text`)."""
    from .plots import threshold_text

    return threshold_text(x, (PARTLY_AT, COMPOSES_AT)) if x is not None and np.isfinite(x) else _f(x, 0)


def _kept(r: dict) -> str:
    """The worst member's figure (:func:`_figure`) ± its seed spread."""
    std = r.get("kept_worst_pct_std")
    return _figure(r["kept_worst_pct"]) + (f" ± {_f(std, 0)}" if std is not None and np.isfinite(std) else "")


def _best(r: dict) -> str:
    """The best method, with a note where its lead is within the seed spread."""
    if r.get("runner_up") is None:
        return f"`{r['best_method']}`"
    note = " (lead within the seed spread)" if r.get("lead_within_spread") else ""
    return f"`{r['best_method']}`{note}"


def _verdict(r: dict) -> str:
    """The verdict, with the noise it is within: ``(within seed and eval noise)``."""
    v = f"**{r['verdict']}**" if r["verdict"] == "composes" else r["verdict"]
    noise = [
        n for n, k in (("seed", "verdict_within_spread"), ("eval", "verdict_within_eval_noise")) if r.get(k)
    ]
    return v + (f" (within {' and '.join(noise)} noise)" if noise else "")


def _interval(r: dict) -> str:
    lo, hi = r.get("kept_worst_pct_lo"), r.get("kept_worst_pct_hi")
    return "—" if lo is None or hi is None else f"{_f(lo, 0)} to {_f(hi, 0)}"


def _table_rows(rs: list[dict], interval: bool) -> list[list[str]]:
    return [[str(r["rank"]), r["composition"], _verdict(r), _best(r), _kept(r), *([_interval(r)] if interval else []),
             r.get("worst_member") or "—", _f(r.get("kept_mean_pct"), 0), _f(r.get("retention_pct"), 1),
             "—" if r.get("runner_up") is None else f"`{r['runner_up']}` {_figure(r['runner_up_kept_worst_pct'])}"]
            for r in rs]  # fmt: skip


def _has_interval(rs: list[dict]) -> bool:
    return any(r.get("kept_worst_pct_lo") is not None for r in rs)


def _kind_lines(am: str, rs: list[dict], interval: bool) -> list[str]:
    """A kind's count line and table; ``interval``: with the eval interval's column."""
    counts = {v: sum(r["verdict"] == v for r in rs) for v in VERDICTS}
    bests = pd.Series([r["best_method"] for r in rs if r["verdict"] != "no gain to keep"]).value_counts()
    line = (f"**{am}**, {len(rs)} compositions: {counts['composes']} compose, {counts['partly']} partly, "
            f"{counts['does not compose']} do not")  # fmt: skip
    if counts["no gain to keep"]:
        line += f", {counts['no gain to keep']} have no gain to keep"
    if len(bests):
        line += "; best method " + ", ".join(f"`{m}` for {n}" for m, n in bests.items())
    ties = sum(bool(r.get("lead_within_spread")) for r in rs)
    if ties:
        line += f" ({ties} of those leads within the seed spread)"
    if any(r.get("verdict_within_eval_noise") is not None for r in rs):
        line += f"; {sum(bool(r.get('verdict_within_eval_noise')) for r in rs)} verdict(s) within eval noise"
    # the domains to keep apart: who loses its gain where a merge does not compose (the three most often)
    losers = pd.Series([r["worst_member"] for r in rs if r["verdict"] == "does not compose"]).value_counts()
    if len(losers):
        line += "; where it does not compose, the member that loses most is " + ", ".join(
            f"{d} ({n})" for d, n in losers.iloc[:3].items()) + (f" and {len(losers) - 3} other(s)" if len(losers) > 3 else "")  # fmt: skip
    L = [line + ".", ""]
    shown = rs if len(rs) <= 2 * LIST_ENDS else rs[:LIST_ENDS] + rs[-LIST_ENDS:]
    body = _table_rows(shown, interval)
    head = ["rank", "composition", "verdict", "best method", "kept gain % (worst member)",
            *([f"{BOOT_INTERVAL:g}% eval interval"] if interval else []), "worst member",
            "kept gain % (mean of members)", "retention % (best)", "runner-up"]  # fmt: skip
    if len(shown) < len(rs):
        body.insert(LIST_ENDS, ["…", f"{len(rs) - len(shown)} more in `{CSV}`", *[""] * (len(head) - 2)])
    L += [_table(head, body), ""]
    return L + _size_lines(am, rs)


def size_rows(rs: list[dict]) -> list[dict]:
    """Per composition size ``k`` (with two sizes or more): the compositions,
    their verdicts, each method's worst-member figures (``values``, the
    compositions in name order, NaN for no gain to keep), their mean over the
    compositions of that size (``kept``, NaN ones left out) and how often each
    method is best. A kind's methods, in the scenario's order."""
    sizes = sorted({r["k"] for r in rs})
    if len(sizes) < 2:
        return []
    methods = list(dict.fromkeys(m for r in rs for m in r["by_method"]))
    out = []
    for k in sizes:
        mine = sorted((r for r in rs if r["k"] == k), key=lambda r: r["composition"])
        values = {m: [float(r["by_method"].get(m, np.nan)) for r in mine] for m in methods}
        out.append({"k": k, "n": len(mine), **{v: sum(r["verdict"] == v for r in mine) for v in VERDICTS},
                    "values": values,
                    "kept": {m: float(np.nanmean(x)) if np.isfinite(x).any() else np.nan for m, x in values.items()},
                    "best": {m: sum(r["best_method"] == m and r["verdict"] != "no gain to keep" for r in mine)
                             for m in methods}})  # fmt: skip
    return out


def _size_lines(am: str, rs: list[dict]) -> list[str]:
    """The by-size table (:func:`size_rows`), where a kind has compositions of several sizes."""
    got = size_rows(rs)
    if not got:
        return []
    methods = list(got[0]["kept"])
    head = ["size", "compositions", "compose / partly / not", *[f"`{m}`" for m in methods], "best method"]
    body = [[str(g["k"]), str(g["n"]), f"{g['composes']} / {g['partly']} / {g['does not compose']}",
             *[_f(g["kept"][m], 1) for m in methods],
             ", ".join(f"`{m}` {n}" for m, n in sorted(g["best"].items(), key=lambda x: -x[1]) if n)]
            for g in got]  # fmt: skip
    return [f"By size ({am}): the worst member's kept gain %, the mean over the compositions of each size, "
            "per merge method:", "", _table(head, body), "", f"Each composition by size: ![kept gain by size]({SIZE_PNG})",
            ""]  # fmt: skip


def _noise_line(rs: list[dict]) -> str:
    """The eval-split bootstrap in one line, or why it is not computed."""
    missing = sum(r.get("kept_worst_pct_lo") is None and np.isfinite(r["kept_worst_pct"]) for r in rs)
    if not _has_interval(rs):
        return ("The eval-split interval is not computed: this report's evaluations have no per-record NLL "
                "(made before loramix kept it), so a verdict may be within the eval split's sampling noise.")  # fmt: skip
    line = (f"Eval interval: the {BOOT_INTERVAL:g}% percentile interval of the worst member's kept gain over "
            f"{BOOT_RESAMPLES} paired bootstrap resamples of each member's eval records (the same records "
            "for the base, the own adapter and the merge); a verdict whose interval crosses a threshold is "
            "marked *within eval noise*.")  # fmt: skip
    if missing:
        line += f" {missing} composition(s) have none: an evaluation of theirs has no per-record NLL."
    return line


def section(report: dict, v) -> list[str]:
    """``## Which adapters compose?``: per adapter kind, the compositions
    ranked by their best method's worst-member share, with a verdict each
    (the best and the worst :data:`LIST_ENDS`; all of them in :data:`CSV`)."""
    rs = rows(report)
    if not rs:
        return []
    L = ["## Which adapters compose?", ""]
    L.append(
        "Kept gain % of a member = 100 · (ppl of the base − ppl of the merge) / (ppl of the base − ppl of the "
        "member's own adapter), on the member's eval split: 100 when the merge is as good there as the member's "
        "own adapter, 0 when it is no better than the base, below 0 when it is worse. A composition's figure is "
        "its **worst** member's (a merge serves all its members at once; the mean, also listed, can hide a "
        "member that loses its gain), under its best merge method (the one with the highest figure; "
        f"runner-up beside it). Verdict: **composes** at {COMPOSES_AT:g}% or more, **partly** from "
        f"{PARTLY_AT:g}% to {COMPOSES_AT:g}%, **does not compose** below {PARTLY_AT:g}%. Retention % is "
        "the best method's: the mean over the members of the merge's perplexity change against the member's "
        "own adapter (lower is better)."
    )
    L.append("")
    if v.nseed > 1:
        L.append(f"Figures are means over {v.nseed} seeds ± the worst member's sample std over seeds; a best "
                 "method that leads its runner-up by less than the larger of their spreads is marked *lead within "
                 "the seed spread*, and a verdict whose figure is within its spread of a threshold *within seed "
                 "noise*: those calls are within seed-to-seed noise.")  # fmt: skip
    elif v.sc.get("adapters", {}).get("given"):
        L.append("One given adapter per domain: the spread over training seeds is not measured, so a small lead of "
                 "one method or a figure near a threshold may be noise.")  # fmt: skip
    else:
        L.append("One training seed: the seed-to-seed spread is not measured, so a small lead of one method or a "
                 "figure near a threshold may be noise.")  # fmt: skip
    L += ["", _noise_line(rs), ""]
    for am in dict.fromkeys(r["adapter_method"] for r in rs):
        L += _kind_lines(am, [r for r in rs if r["adapter_method"] == am], _has_interval(rs))
    if any(r["k"] == 2 for r in rs):
        L += [
            f"Pairs at a glance (the same order as the similarity heatmaps): ![kept gain of pairs]({PNG})",
            "",
        ]
    L += [f"Every composition, with each method's figure: `{CSV}`.", ""]
    return L


def csv_frame(rs: list[dict]) -> pd.DataFrame:
    """``composability.csv``: one row per composition, ``kept_worst_pct_<method>`` for each method,
    then the eval interval's :data:`BOOT_COLUMNS` (empty where not computed)."""
    df = pd.DataFrame(
        [{k: x for k, x in r.items() if k != "by_method" and k not in BOOT_COLUMNS} for r in rs]
    )
    lead = ["adapter_method", "rank", "composition", "k", "verdict", "best_method"]
    df = df[lead + [c for c in df.columns if c not in lead]]
    methods = list(dict.fromkeys(m for r in rs for m in r["by_method"]))
    for m in methods:
        df[f"kept_worst_pct_{m}"] = [r["by_method"].get(m) for r in rs]
    for c in BOOT_COLUMNS:
        df[c] = [r.get(c) for r in rs]
    return df


def pair_matrix(rs: list[dict], am: str, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The pairs of kind ``am`` as three ``names x names`` frames (symmetric):
    the best method's worst-member share (NaN where no pair), the method,
    and whether the verdict is within eval noise."""
    kept = pd.DataFrame(np.nan, index=names, columns=names)
    method = pd.DataFrame("", index=names, columns=names)
    noisy = pd.DataFrame(False, index=names, columns=names)
    for r in rs:
        if r["adapter_method"] != am or r["k"] != 2:
            continue
        a, b = r["composition"].split("+")
        x = np.nan if r["kept_worst_pct"] is None else float(r["kept_worst_pct"])
        kept.loc[a, b] = kept.loc[b, a] = x
        method.loc[a, b] = method.loc[b, a] = r["best_method"]
        noisy.loc[a, b] = noisy.loc[b, a] = bool(r.get("verdict_within_eval_noise"))
    return kept, method, noisy


def write_files(folder: Path, report: dict, cache=None) -> None:
    """``composability.csv`` and, with pairs, ``kept_gain.png`` (in the
    similarity heatmaps' clustered order; kept in ``cache``: :func:`.plots.drawn`)."""
    from . import plots

    rs = rows(report)
    if not rs:
        return
    csv_frame(rs).to_csv(folder / CSV, index=False)
    panels = []
    for sim in report["similarity_mean"]:
        am, names = sim["adapter_method"], sim["names"]
        if not any(r["adapter_method"] == am and r["k"] == 2 for r in rs):
            continue
        order = [names[i] for i in plots.cluster_order(np.array(sim["rms"], dtype=float))]
        kept, method, noisy = pair_matrix(rs, am, order)
        # plain lists, NaN as None: the figure's cache key is their JSON (a map with no noisy
        # cell keeps the key it had before the eval interval)
        noise = [noisy.to_numpy(bool).tolist()] if noisy.to_numpy(bool).any() else []
        panels.append(
            (
                am,
                order,
                [[None if np.isnan(x) else x for x in row] for row in kept.to_numpy(float)],
                method.to_numpy().tolist(),
                *noise,
            )
        )
    if panels:
        plots.drawn(cache, plots.kept_gain_heatmap, folder / PNG, panels,
                    title=f"{report['scenario']['name']}: share of the worse member's gain the best merge keeps",
                    thresholds=(PARTLY_AT, COMPOSES_AT))  # fmt: skip
    by_size = size_panels(rs)
    if by_size:
        plots.drawn(cache, plots.kept_by_size, folder / SIZE_PNG, by_size,
                    title=f"{report['scenario']['name']}: the worst member's kept gain by composition size",
                    thresholds=(PARTLY_AT, COMPOSES_AT))  # fmt: skip


def size_panels(rs: list[dict]) -> list[tuple[str, dict]]:
    """:func:`.plots.kept_by_size`'s panels, from :func:`size_rows`: per label
    whose compositions come in several sizes, ``{method: {size: [each
    composition's figure]}}`` (None for no gain to keep: plain lists, the
    figure's cache key is their JSON)."""
    out = []
    for am in dict.fromkeys(r["adapter_method"] for r in rs):
        got = size_rows([r for r in rs if r["adapter_method"] == am])
        if got:
            out.append((am, {m: {g["k"]: [None if np.isnan(x) else x for x in g["values"][m]] for g in got}
                             for m in got[0]["values"]}))  # fmt: skip
    return out
