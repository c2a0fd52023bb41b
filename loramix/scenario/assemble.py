"""The study's tables from the results of its plan: a pure function.

:func:`assemble` reads ``{step id: result}`` (as returned by an executor) and
builds the report's data, in the order a serial run lists it: per adapter
kind and seed, the evaluations, one row per composition and merge method
(docs/interference.md defines ``delta_ppl%``), the similarity matrices and
the merge summaries. It computes no model, and reads nothing from disk but
the cached validations of the predictors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from ..fit import composition_cosine
from ..perplexity import RECORD_COLUMNS
from .config import Scenario
from .plan import comp_name, merge_evaluation


def union_ppl(ev: dict, comp) -> tuple[float, int]:
    """Token-weighted perplexity of the union of ``comp``'s eval splits:
    ``exp(sum_d NLL_d / sum_d N_d)``, and the token count."""
    nll = sum(ev[d]["nll_sum"] for d in comp)
    tok = sum(ev[d]["tokens"] for d in comp)
    return math.exp(nll / tok), tok


class _Tables:
    def __init__(self):
        self.evaluations: list[dict] = []
        self.results: list[dict] = []
        self.sims: list[dict] = []
        self.per_module: list[pd.DataFrame] = []
        self.merge_summaries: list[dict] = []
        self.adapters: list[dict] = []
        self.record_tokens: dict[str, list[int]] = {}  # domain -> its eval records' scored tokens
        self._tokens_of: dict[str, str] = {}  # domain -> the model whose list is kept, for the error

    def add_evals(self, am, seed, model, ev):
        nll_key, tok_key = RECORD_COLUMNS
        for dom, r in ev.items():
            # per-record NLL only where the evaluation kept it (not one cached before)
            rec = {nll_key: r[nll_key]} if nll_key in r else {}
            if rec:
                self._add_tokens(dom, f"{am}/{seed}/{model}", r[tok_key])
            # "nll" per scored token, as `loramix eval` and evaluate() give it; "nll_sum" the total
            # (written as "nll" before, which read as eval's mean in another unit)
            nll = r["nll_sum"] / r["tokens"] if r["tokens"] else math.nan
            self.evaluations.append({"adapter_method": am, "seed": seed, "model": model, "domain": dom,
                                     "ppl": r["ppl"], "tokens": r["tokens"], "nll": nll,
                                     "nll_sum": r["nll_sum"], **rec})  # fmt: skip

    def _add_tokens(self, dom: str, who: str, tokens: list[int]) -> None:
        """Keep ``tokens`` (one int per eval record of ``dom``) once per domain:
        every evaluation on ``dom`` scores the same split's answer tokens with
        the base's tokenizer and the study's ``max_len``, so the lists agree;
        one that does not would pair records that are not the same (the
        bootstrap of :mod:`.compose`), and is refused rather than dropped."""
        kept = self.record_tokens.setdefault(dom, list(tokens))
        self._tokens_of.setdefault(dom, who)
        if kept != list(tokens):
            raise ValueError(f"eval split {dom}: {who} scored other record tokens than {self._tokens_of[dom]} "
                             f"({sum(tokens)} against {sum(kept)} in all): not the same records")  # fmt: skip


def _similarity(t: _Tables, am, seed, sim: dict):
    t.sims.append({"adapter_method": am, "seed": seed, "names": sim["names"], "rms": sim["rms"],
                   "mean": sim["mean"], "coverage": sim["coverage"], "rms_effective": sim["rms_effective"]})  # fmt: skip
    pm = sim["per_module"].copy()
    pm.insert(0, "seed", seed)
    pm.insert(0, "adapter_method", am)
    t.per_module.append(pm)


def _pair_values(sim: dict, key: str) -> np.ndarray | None:
    """The similarity step's ``sim[key]`` (N x N; None where it is None) with 0
    for the pairs that adapt no module in common (``coverage`` 0), whose cosine
    the similarity leaves NaN: their deltas touch disjoint weights, so they are
    orthogonal over all parameters, and a composition's cosine counts them 0,
    as ``loramix predict`` and ``plan`` do (:mod:`loramix.features.cosine`),
    instead of leaving them out of its mean."""
    if sim.get(key) is None:
        return None
    return np.where(np.array(sim["coverage"], dtype=float) == 0, 0.0, np.array(sim[key], dtype=float))


def _composition_rows(t: _Tables, sc: Scenario, results: dict, am, seed, comp, sim, names, ev_base):
    from .report import delta_pct

    pre, cn = f"{am}/{seed}", comp_name(comp)
    rms, mean, rms_eff = (_pair_values(sim, k) for k in ("rms", "mean", "rms_effective"))
    idx = [names.index(d) for d in comp]
    cos = composition_cosine(rms, idx)
    cos_eff = None if rms_eff is None else composition_cosine(rms_eff, idx)
    mean_cos = float(np.mean([mean[i, j] for a, i in enumerate(idx) for j in idx[a + 1 :]]))
    ev_md = results.get(f"eval/{pre}/merged-data/{cn}")
    ppl_md = float("nan")
    if ev_md is not None:
        t.add_evals(am, seed, f"merged-data:{cn}", ev_md)
        ppl_md, _ = union_ppl(ev_md, comp)
    ppl_base, tok = union_ppl(ev_base, comp)
    own = {d: results[f"eval/{pre}/adapter/{d}"][d]["ppl"] for d in comp}
    for mg in sc.merges_for(am):
        merge = results.get(f"merge/{pre}/{mg.label}/{cn}")
        ev_m = merge_evaluation(results, pre, mg.label, cn)
        if merge is not None:
            t.merge_summaries.append({"adapter_method": am, "seed": seed, "composition": cn,
                                      "merge_method": mg.label, "summary": merge["summary"]})  # fmt: skip
        t.add_evals(am, seed, f"merge:{mg.label}:{cn}", ev_m)
        ppl_m, _ = union_ppl(ev_m, comp)
        t.results.append({
            "adapter_method": am, "seed": seed, "composition": cn, "k": len(comp),
            "merge_method": mg.label, "rms_cosine": cos, "mean_cosine": mean_cos,
            "rms_cosine_effective": cos_eff, "ppl_merge": ppl_m, "ppl_merged_data": ppl_md,
            "delta_ppl_pct": delta_pct(ppl_m, ppl_md), "ppl_base": ppl_base, "eval_tokens": tok,
            "retention_pct": retention_pct(ev_m, own), "worst_pct": worst_pct(ev_m, own),
        })  # fmt: skip


def retention_pct(ev_merge: dict, own: dict[str, float]) -> float:
    """The retention target of a composition ``C``:
    ``mean_{d in C} 100 (ppl_merge(d) - ppl_d(d)) / ppl_d(d)``, the merge's
    perplexity on each member's eval split against that member's own adapter
    on it (``own = {d: ppl_d(d)}``); 0 when the merge keeps every member's gain,
    positive when it loses some."""
    return float(np.mean(member_losses(ev_merge, own)))


def worst_pct(ev_merge: dict, own: dict[str, float]) -> float:
    """The worst-member target of a composition ``C``:
    ``max_{d in C} 100 (ppl_merge(d) - ppl_d(d)) / ppl_d(d)``, the largest of
    the losses whose mean is :func:`retention_pct`. Per seed, like every
    value of a result row; the summary's is the mean over seeds, the worst
    member's loss a user merging one seed's adapters meets on average."""
    return float(np.max(member_losses(ev_merge, own)))


def member_losses(ev_merge: dict, own: dict[str, float]) -> list[float]:
    """``[100 (ppl_merge(d) - ppl_d(d)) / ppl_d(d) for d in own]``, in ``own``'s order."""
    from .report import delta_pct

    return [delta_pct(ev_merge[d]["ppl"], own[d]) for d in own]


def _by_layer(per_module: pd.DataFrame) -> list[dict]:
    """RMS cosine per layer and domain pair, averaged over seeds."""
    if per_module.empty:
        return []
    pm = per_module.assign(pair=per_module["a"] + "+" + per_module["b"], cos2=per_module["cosine"] ** 2)
    g = pm.groupby(["adapter_method", "seed", "pair", "layer"], sort=False)["cos2"].mean()
    g = np.sqrt(g).reset_index().groupby(["adapter_method", "pair", "layer"], sort=False)["cos2"].mean()
    return g.reset_index().rename(columns={"cos2": "rms_cosine"}).to_dict(orient="records")


def _validations(sc: Scenario, results: dict, summary: pd.DataFrame, cache=None) -> list[dict]:
    """The predictors step's validations (:mod:`.predictors`); empty without
    ``[predictors]``. With ``cache``, read back from it where the same inputs
    (the summary, every seed's features, the level) were validated by the
    same code (:meth:`~loramix.scenario.cache.Cache.derived`): seconds of a
    rerun. A fresh validation is read back too, from the JSON written, so
    that both give the report the same values."""
    from .predictors import feature_set, targets_for, validate_targets

    if sc.predictors is None:
        return []
    runs = {am: [results[f"features/{am}/{s}"] for s in sc.seeds] for am in sc.adapters.methods}
    targets = targets_for(sc.predictors.target)

    def compute() -> list[dict]:
        feats = {am: feature_set(r) for am, r in runs.items()}
        return validate_targets(summary, feats, level=sc.predictors.level, targets=targets)

    if cache is None:
        return compute()

    def make(tmp):
        # in order (not sorted: report.json keeps it) and NaN as NaN, read back as the same floats
        (tmp / "result.json").write_text(json.dumps(compute(), indent=1, default=_item))

    inputs = {"summary": summary.to_dict(orient="split"), "features": runs, "level": sc.predictors.level,
              "targets": list(targets)}  # fmt: skip
    folder = cache.derived("validation", inputs, make, label="predictors")
    return json.loads((folder / "result.json").read_text())


def _item(x):
    """A numpy scalar as the Python one (``json.dumps``'s ``default``)."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON")


def assemble(sc: Scenario, results: dict[str, dict], cache=None) -> dict:
    """The report's data from the plan's results (``{step id: result}``);
    ``cache``: where the validations are kept (:func:`_validations`).

    Returns ``evaluations``, ``results`` (a DataFrame), ``summary``, ``fits``,
    ``similarity``, ``similarity_mean``, ``per_module`` (a DataFrame),
    ``cosine_by_layer``, ``best_methods``, ``merge_summaries``, ``adapters``,
    ``validations`` (:mod:`.predictors`), ``ev_base`` (the base's evaluation)
    and ``record_tokens``: ``{domain: (n_d,) scored tokens of each eval
    record}``, once per domain, the evaluations keeping only their
    ``record_nll`` (:meth:`_Tables._add_tokens`).
    """
    from .report import compute_fits, summarize

    t = _Tables()
    names = list(sc.domains)
    ev_base = results["eval/base"]
    for am in sc.adapters.methods:
        for seed in sc.seeds:
            pre = f"{am}/{seed}"
            t.add_evals(am, seed, "base", ev_base)
            sim = results[f"similarity/{pre}"]
            _similarity(t, am, seed, sim)
            t.adapters.append({"adapter_method": am, "seed": seed,
                               **{d: results[f"adapter/{pre}/{d}"]["path"] for d in names},
                               **{f"merged-data:{comp_name(c)}": results[f"merged-data/{pre}/{comp_name(c)}"]["path"]
                                  for c in sc.compositions if f"merged-data/{pre}/{comp_name(c)}" in results}})  # fmt: skip
            for d in names:
                t.add_evals(am, seed, f"adapter:{d}", results[f"eval/{pre}/adapter/{d}"])
            for comp in sc.compositions:
                _composition_rows(t, sc, results, am, seed, comp, sim, names, ev_base)
    res_df = pd.DataFrame(t.results)
    summary = summarize(res_df)
    per_module = pd.concat(t.per_module, ignore_index=True) if t.per_module else pd.DataFrame()
    sim_mean = []
    for am in sc.adapters.methods:
        mats = [np.array(s["rms"], dtype=float) for s in t.sims if s["adapter_method"] == am]
        sim_mean.append({"adapter_method": am, "names": names, "rms": np.mean(mats, axis=0).tolist()})
    best = {}
    for am, g in summary.groupby("adapter_method", sort=False):
        means = g.groupby("merge_method", sort=False)["delta_ppl_pct"].mean()
        if means.isna().all():  # no merged-data adapter (given adapters): no Δppl % to rank by
            continue
        best[am] = {"method": str(means.idxmin()), "delta": float(means.min())}
    return {"evaluations": t.evaluations, "results": res_df, "summary": summary, "fits": compute_fits(summary, sc.adapters.init),
            "validations": _validations(sc, results, summary, cache),
            "similarity": t.sims, "similarity_mean": sim_mean, "per_module": per_module,
            "cosine_by_layer": _by_layer(per_module), "best_methods": best,
            "merge_summaries": t.merge_summaries, "adapters": t.adapters, "ev_base": ev_base,
            "record_tokens": t.record_tokens}  # fmt: skip
