"""Run a scenario: the composition study of arXiv 2508.11985, cached and resumable.

For each adapter method ``a`` (lora, d2lora) and training seed ``s``:

1. one adapter per domain ``d``, trained on ``d``'s training split;
2. for each composition ``C`` (a set of domains), a *merged-data* adapter
   trained with the same recipe on the union of the training splits of ``C``;
3. the similarity of the domain adapters (RMS cosine, DESIGN.md section 2;
   D2-LoRA on the signed residual, and on the effective delta for reference);
4. for each composition and merge method ``m``, the merge of ``C``'s domain
   adapters (``sum``: the naive sum ``W0 + sum_i dW_i``, applied on the fly);
5. the perplexity of the base, each domain adapter, each merged-data adapter
   and each merge on every domain's eval split, pooled token-weighted over
   ``C``'s domains::

       ppl_C = exp( sum_{d in C} NLL_d / sum_{d in C} N_d )
       delta_ppl% = 100 (ppl_C(merge) - ppl_C(merged-data)) / ppl_C(merged-data)

Data splits are drawn once with ``data_seed`` (the same eval sets for every
seed); the base is shared by all seeds; the seeds vary adapter training
(initialisation and batch order), so the spread over seeds measures training
noise. A composition's RMS cosine is
:func:`loramix.fit.composition_cosine` of the pairwise matrix.

Every artifact goes through :class:`loramix.scenario.cache.Cache`; dense
merged models (as large as the base) are evaluated and then deleted, keeping
their evaluation and merge record; low-rank merges (``svd``) are kept as
adapters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..environment import environment
from ..errors import OutputError, ScenarioError, UsageError
from .cache import Cache, default_cache_dir
from .config import Scenario, load_scenario, scenario_summary


def merges_for(sc: Scenario, adapter_method: str):
    return sc.merges_for(adapter_method)


def comp_name(comp) -> str:
    return "+".join(comp)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _records_jsonl(records) -> str:
    return "".join(
        json.dumps({"question": r.question, "answer": r.answer, "context": r.context}, ensure_ascii=False)
        + "\n"
        for r in records
    )


@dataclass
class DomainData:
    name: str
    train: list
    eval: list
    train_text: str
    eval_text: str
    source_sha256: str | None
    train_key: str = ""
    eval_key: str = ""
    train_path: Path | None = None

    @property
    def sha256_train(self) -> str:
        return _sha256_text(self.train_text)

    @property
    def sha256_eval(self) -> str:
        return _sha256_text(self.eval_text)


def prepare_data(sc: Scenario) -> dict[str, DomainData]:
    """Load and split every domain (cheap; done before any work so that a
    domain too small for its sizes fails first)."""
    from ..data import load_records, split_records
    from ..errors import LoramixError
    from ..io.safetensors_io import file_sha256

    out = {}
    for name, d in sc.domains.items():
        try:
            recs = load_records(d.data, question_field=d.question_field, answer_field=d.answer_field,
                                context_field=d.context_field)  # fmt: skip
        except LoramixError as e:
            raise ScenarioError(f"{sc.path}: domains.{name}.data", e.message) from None
        if len(recs) < d.train + d.eval:
            raise ScenarioError(f"{sc.path}: domains.{name}.train",
                                f"{d.data} has {len(recs)} records, fewer than train={d.train} + eval={d.eval}")  # fmt: skip
        train_all, ev = split_records(recs, eval_size=d.eval, seed=sc.data_seed)
        idx = list(range(len(train_all)))
        random.Random(sc.data_seed + 1).shuffle(idx)
        train = [train_all[i] for i in sorted(idx[: d.train])]
        src = None if d.synthetic else file_sha256(d.data)
        out[name] = DomainData(name, train, ev, _records_jsonl(train), _records_jsonl(ev), src)
    return out


def check_report_dir(out: Path, name: str, force: bool) -> None:
    """A report folder may be replaced when it holds an earlier report of the
    same scenario (or with ``force``); anything else is refused."""
    if not out.exists() or force:
        return
    rj = out / "report.json"
    if rj.is_file():
        try:
            if json.loads(rj.read_text()).get("scenario", {}).get("name") == name:
                return
        except (OSError, json.JSONDecodeError):
            pass
    raise OutputError(out, "exists and is not a report of this scenario; pass --force to replace it")


@dataclass
class _Progress:
    total: int
    cache: Cache
    enabled: bool = True
    bar: object = None
    timings: dict = field(default_factory=dict)  # step kind -> {seconds, made, reused} (this run)

    def __post_init__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="scenario", unit="step", disable=not self.enabled,
                        dynamic_ncols=True, file=sys.stderr)  # fmt: skip

    def step(self, kind: str, label: str):
        prog = self

        class _Step:
            def __enter__(self):
                prog.bar.set_postfix_str(f"{kind}: {label}", refresh=True)
                self.t0 = time.perf_counter()
                self.n0 = len(prog.cache.log)

            def __exit__(self, *exc):
                t = prog.timings.setdefault(kind, {"seconds": 0.0, "made": 0, "reused": 0})
                t["seconds"] += time.perf_counter() - self.t0
                for e in prog.cache.log[self.n0 :]:
                    t["reused" if e.status == "hit" else "made"] += 1
                if exc[0] is None:
                    prog.bar.update(1)

        return _Step()

    def close(self):
        self.bar.set_postfix_str("done")
        self.bar.close()


class Runner:
    def __init__(self, sc: Scenario, *, cache: Cache, device, progress: bool = True):
        self.sc = sc
        self.cache = cache
        self.device = device
        self.progress_enabled = progress
        self._base_model = None  # (model, tokenizer), loaded on first evaluation miss
        self.base_path: Path | None = None
        self.base_key = ""
        self.base_info: dict = {}

    # ------------------------------------------------------------------ plan
    def total_steps(self, n_dom: int) -> int:
        sc = self.sc
        n_comp = len(sc.compositions)
        per = 0
        for am in sc.adapters.methods:
            per += len(sc.seeds) * (n_dom + n_comp + 1 + n_dom + n_comp + n_comp * len(merges_for(sc, am)))
        return n_dom + 1 + 1 + per

    # ------------------------------------------------------------------ artifacts
    def data_artifact(self, dd: DomainData) -> None:
        for part, text in (("train", dd.train_text), ("eval", dd.eval_text)):
            spec = {"sha256": _sha256_text(text), "records": text.count("\n")}

            def make(tmp, text=text, part=part):
                (tmp / f"{part}.jsonl").write_text(text)
                return {"domain": dd.name}

            folder = self.cache.get_or_make("data", spec, make, label=f"{dd.name}/{part}")
            if part == "train":
                dd.train_key, dd.train_path = folder.name, folder / "train.jsonl"
            else:
                dd.eval_key = folder.name

    def base_artifact(self, data: dict[str, DomainData]) -> None:
        b = self.sc.base
        if b.path is not None:
            # A given folder: its key is the content of its config and weights.
            h = hashlib.sha256()
            from ..gguf_import import resolve_base
            from ..io.safetensors_io import file_sha256

            path = resolve_base(b.path)
            for f in sorted(path.iterdir()):
                if f.suffix in (".json", ".safetensors") and f.name != "loramix.json":
                    h.update(f.name.encode() + file_sha256(f).encode())
            self.base_path, self.base_key = path, h.hexdigest()
            self.base_info = {"path": str(b.path)}
            return
        from ..data import load_records

        if b.build_data:
            records = [r for spec in b.build_data for r in load_records(spec)]
        else:
            records = [r for dd in data.values() for r in dd.train]
        spec = {"recipe": {"size": b.size, "steps": b.steps, "seed": b.seed, **b.build_params},
                "data_sha256": _sha256_text(_records_jsonl(records))}  # fmt: skip

        def make(tmp):
            from ..basebuild import build_base

            kw = {k: v for k, v in b.build_params.items() if k in ("lr", "batch")}
            res = build_base(records, tmp / "model", size=b.size, steps=b.steps, seed=b.seed,
                             device=str(self.device), progress=False, **kw)  # fmt: skip
            return {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "out"}

        folder = self.cache.get_or_make("base", spec, make, label=f"base build {b.size}")
        self.base_path, self.base_key = folder / "model", folder.name
        self.base_info = {"path": str(self.base_path), **self.cache.record("base", folder)["info"]}

    def adapter_artifact(
        self, method: str, seed: int, domains: list[DomainData], label: str, name: str
    ) -> Path:
        """Train (or reuse) one adapter; returns its folder, named ``name`` inside
        the cache entry so that similarity and predict show readable names."""
        ad = self.sc.adapters
        spec = {"base": self.base_key, "method": method, "recipe": ad.recipe(), "seed": seed,
                "data": [d.train_key for d in domains]}  # fmt: skip

        def make(tmp):
            from ..train import train_adapter

            kw = {}
            if ad.steps is not None:
                kw["steps"] = ad.steps
            else:
                kw["epochs"] = ad.epochs
            if "warmup" in ad.extra:
                kw["warmup"] = int(ad.extra["warmup"])
            if "weight_decay" in ad.extra:
                kw["weight_decay"] = ad.extra["weight_decay"]
            if "grad_clip" in ad.extra:
                kw["clip"] = ad.extra["grad_clip"]
            res = train_adapter(str(self.base_path), [str(d.train_path) for d in domains], tmp / name,
                                method=method, rank=ad.rank, alpha=ad.alpha, tau=ad.tau,
                                targets=list(ad.targets) if ad.targets else None, lr=ad.lr, batch=ad.batch,
                                max_len=ad.max_len, eval_size=0, seed=seed, device=str(self.device),
                                progress=False, **kw)  # fmt: skip
            return {
                k: v for k, v in res.items() if (isinstance(v, (int, float, str)) or v is None) and k != "out"
            }

        folder = self.cache.get_or_make("adapter", spec, make, label=label)
        # The entry may have been made under another name (same data, another scenario).
        return next(p.parent for p in sorted(folder.glob("*/adapter_config.json")))

    def _base_loaded(self):
        if self._base_model is None:
            from ..models import load_causal_lm

            self._base_model = load_causal_lm(str(self.base_path), device=self.device)
        return self._base_model

    def _evaluate(self, data: dict[str, DomainData], *, adapters=(), model_path=None) -> dict:
        """Per-domain ``{ppl, tokens, nll_sum}`` of a model on every eval split."""
        from ..perplexity import evaluate

        ev = self.sc.eval
        names = list(data)
        base = str(model_path) if model_path is not None else self._base_loaded()
        df = evaluate(base, adapters=[str(a) for a in adapters], data=[data[n].eval for n in names],
                      on=ev.on, max_len=ev.max_len, batch_size=ev.batch, device=str(self.device))  # fmt: skip
        out = {}
        for i, n in enumerate(names):
            row = df.iloc[i]
            out[n] = {"ppl": float(row["ppl"]), "tokens": int(row["tokens"]),
                      "nll_sum": float(row["nll"]) * int(row["tokens"])}  # fmt: skip
        return out

    def eval_spec(self, data, model: dict) -> dict:
        ev = self.sc.eval
        return {"model": model, "data": {n: d.eval_key for n, d in data.items()},
                "settings": {"on": ev.on, "max_len": ev.max_len}}  # fmt: skip

    def eval_artifact(self, data, model: dict, adapters=(), label="") -> dict:
        spec = self.eval_spec(data, model)
        return self.cache.json_artifact("eval", spec, lambda: self._evaluate(data, adapters=adapters), label)

    def merge_artifact(
        self, data, merge, adapter_paths: list[Path], adapter_keys: list[str], label: str
    ) -> dict:
        """Evaluation of one merge (not ``sum``): svd keeps its adapter; dense
        merges are written into a copy of the base, evaluated, then deleted."""
        from ..methods import get_method
        from ..methods import merge as do_merge

        spec = {
            "method": merge.method,
            "params": merge.params,
            "base": self.base_key,
            "adapters": adapter_keys,
        }
        low_rank = get_method(merge.method).low_rank
        if low_rank:

            def make(tmp):
                res = do_merge([str(p) for p in adapter_paths], merge.method, out=tmp / "adapter",
                               device=str(self.device), **merge.params)  # fmt: skip
                return {"summary": res.summary}

            folder = self.cache.get_or_make("merge", spec, make, label=label)
            rec = self.cache.record("merge", folder)
            ev = self.eval_artifact(data, {"base": self.base_key, "merge": folder.name},
                                    adapters=[folder / "adapter"], label=label)  # fmt: skip
            return {"eval": ev, "summary": rec["info"].get("summary", {})}

        spec = {**spec, **self.eval_spec(data, {"dense": True})}

        def make(tmp):
            res = do_merge([str(p) for p in adapter_paths], merge.method, into=str(self.base_path),
                           out=tmp / "model", device=str(self.device), **merge.params)  # fmt: skip
            ev = self._evaluate(data, model_path=tmp / "model")
            shutil.rmtree(tmp / "model")
            (tmp / "result.json").write_text(json.dumps(ev, indent=2, sort_keys=True))
            return {"summary": res.summary}

        folder = self.cache.get_or_make("merge", spec, make, label=label)
        rec = self.cache.record("merge", folder)
        return {
            "eval": json.loads((folder / "result.json").read_text()),
            "summary": rec["info"].get("summary", {}),
        }

    # ------------------------------------------------------------------ the study
    def run(self) -> dict:
        import numpy as np
        import pandas as pd
        from transformers.utils import logging as hf_logging

        from ..fit import composition_cosine
        from ..io.adapter_files import load_adapter
        from ..overlap import similarity
        from .report import compute_fits, delta_pct, records, summarize

        hf_logging.disable_progress_bar()  # one overall bar; no per-save/per-load bars
        sc = self.sc
        t_start = time.perf_counter()
        data = prepare_data(sc)
        prog = _Progress(self.total_steps(len(data)), self.cache, enabled=self.progress_enabled)
        try:
            for dd in data.values():
                with prog.step("data", dd.name):
                    self.data_artifact(dd)
            with prog.step("base", "build" if sc.base.path is None else "hash"):
                self.base_artifact(data)
            with prog.step("evaluate", "base"):
                ev_base = self.eval_artifact(data, {"base": self.base_key}, label="base")

            evaluations: list[dict] = []
            results: list[dict] = []
            sims: list[dict] = []
            per_module_frames = []
            merge_summaries: list[dict] = []
            adapter_paths: list[dict] = []

            def add_evals(am, seed, model, ev):
                for dom, r in ev.items():
                    evaluations.append({"adapter_method": am, "seed": seed, "model": model, "domain": dom,
                                        "ppl": r["ppl"], "tokens": r["tokens"], "nll": r["nll_sum"]})  # fmt: skip

            def union(ev, comp):
                nll = sum(ev[d]["nll_sum"] for d in comp)
                tok = sum(ev[d]["tokens"] for d in comp)
                return math.exp(nll / tok), tok

            names = list(data)
            for am in sc.adapters.methods:
                for seed in sc.seeds:
                    add_evals(am, seed, "base", ev_base)
                    # 1. domain adapters
                    dom_paths, dom_keys = {}, {}
                    for d in names:
                        with prog.step("train", f"{am} seed {seed}: {d}"):
                            p = self.adapter_artifact(am, seed, [data[d]], label=f"{am}/{seed}/{d}", name=d)
                        dom_paths[d], dom_keys[d] = p, p.parent.name
                    # 2. merged-data adapters
                    md_paths, md_keys = {}, {}
                    for comp in sc.compositions:
                        cn = comp_name(comp)
                        with prog.step("train", f"{am} seed {seed}: merged data {cn}"):
                            p = self.adapter_artifact(am, seed, [data[d] for d in comp],
                                                      label=f"{am}/{seed}/merged-data {cn}",
                                                      name=f"merged-data_{cn}")  # fmt: skip
                        md_paths[cn], md_keys[cn] = p, p.parent.name
                    # 3. similarity
                    with prog.step("similarity", f"{am} seed {seed}"):
                        ads = [load_adapter(dom_paths[d], name=d) for d in names]
                        sim = similarity(ads, per_module=True, progress=False)
                        sim_eff = None
                        if am == "d2lora":
                            sim_eff = similarity(ads, base=str(self.base_path), progress=False)
                    rms = sim.rms.loc[names, names].to_numpy(dtype=float)
                    rms_eff = None if sim_eff is None else sim_eff.rms.loc[names, names].to_numpy(dtype=float)
                    mean = sim.mean.loc[names, names].to_numpy(dtype=float)
                    sims.append({"adapter_method": am, "seed": seed, "names": names, "rms": rms.tolist(),
                                 "mean": mean.tolist(),
                                 "coverage": sim.coverage.loc[names, names].to_numpy(float).tolist(),
                                 "rms_effective": None if rms_eff is None else rms_eff.tolist()})  # fmt: skip
                    pm = sim.per_module.copy()
                    pm.insert(0, "seed", seed)
                    pm.insert(0, "adapter_method", am)
                    per_module_frames.append(pm)
                    # 4-5. evaluations
                    adapter_paths.append({"adapter_method": am, "seed": seed,
                                          **{d: str(dom_paths[d]) for d in names},
                                          **{f"merged-data:{c}": str(p) for c, p in md_paths.items()}})  # fmt: skip
                    ev_single = {}
                    for d in names:
                        with prog.step("evaluate", f"{am} seed {seed}: adapter {d}"):
                            ev_single[d] = self.eval_artifact(data, {"base": self.base_key, "adapters": [dom_keys[d]]},
                                                              adapters=[dom_paths[d]], label=f"{am}/{seed}/{d}")  # fmt: skip
                        add_evals(am, seed, f"adapter:{d}", ev_single[d])
                    for comp in sc.compositions:
                        cn = comp_name(comp)
                        idx = [names.index(d) for d in comp]
                        cos = composition_cosine(rms, idx)
                        cos_eff = None if rms_eff is None else composition_cosine(rms_eff, idx)
                        mean_cos = float(
                            np.mean([mean[i, j] for a, i in enumerate(idx) for j in idx[a + 1 :]])
                        )
                        with prog.step("evaluate", f"{am} seed {seed}: merged data {cn}"):
                            ev_md = self.eval_artifact(data, {"base": self.base_key, "adapters": [md_keys[cn]]},
                                                       adapters=[md_paths[cn]], label=f"{am}/{seed}/merged-data {cn}")  # fmt: skip
                        add_evals(am, seed, f"merged-data:{cn}", ev_md)
                        ppl_md, tok = union(ev_md, comp)
                        ppl_base, _ = union(ev_base, comp)
                        for mg in merges_for(sc, am):
                            with prog.step("merge", f"{am} seed {seed}: {mg.method} {cn}"):
                                if mg.method == "sum":
                                    ev_m = self.eval_artifact(
                                        data, {"base": self.base_key, "adapters": [dom_keys[d] for d in comp],
                                               "sum": True},
                                        adapters=[dom_paths[d] for d in comp], label=f"{am}/{seed}/sum {cn}")  # fmt: skip
                                else:
                                    r = self.merge_artifact(data, mg, [dom_paths[d] for d in comp],
                                                            [dom_keys[d] for d in comp],
                                                            label=f"{am}/{seed}/{mg.method} {cn}")  # fmt: skip
                                    ev_m = r["eval"]
                                    merge_summaries.append({"adapter_method": am, "seed": seed, "composition": cn,
                                                            "merge_method": mg.method, "summary": r["summary"]})  # fmt: skip
                            add_evals(am, seed, f"merge:{mg.method}:{cn}", ev_m)
                            ppl_m, _ = union(ev_m, comp)
                            results.append({
                                "adapter_method": am, "seed": seed, "composition": cn, "k": len(comp),
                                "merge_method": mg.method, "rms_cosine": cos, "mean_cosine": mean_cos,
                                "rms_cosine_effective": cos_eff, "ppl_merge": ppl_m, "ppl_merged_data": ppl_md,
                                "delta_ppl_pct": delta_pct(ppl_m, ppl_md), "ppl_base": ppl_base,
                                "eval_tokens": tok,
                            })  # fmt: skip
        finally:
            prog.close()

        res_df = pd.DataFrame(results)
        summary = summarize(res_df)
        fits = compute_fits(summary)
        per_module = pd.concat(per_module_frames, ignore_index=True) if per_module_frames else pd.DataFrame()
        by_layer = []
        if not per_module.empty:
            pm = per_module.assign(
                pair=per_module["a"] + "+" + per_module["b"], cos2=per_module["cosine"] ** 2
            )
            g = pm.groupby(["adapter_method", "seed", "pair", "layer"], sort=False)["cos2"].mean()
            g = (
                np.sqrt(g)
                .reset_index()
                .groupby(["adapter_method", "pair", "layer"], sort=False)["cos2"]
                .mean()
            )
            by_layer = g.reset_index().rename(columns={"cos2": "rms_cosine"}).to_dict(orient="records")
        sim_mean = []
        for am in sc.adapters.methods:
            mats = [np.array(s["rms"], dtype=float) for s in sims if s["adapter_method"] == am]
            sim_mean.append({"adapter_method": am, "names": names, "rms": np.mean(mats, axis=0).tolist()})
        best = {}
        for am, g in summary.groupby("adapter_method", sort=False):
            means = g.groupby("merge_method", sort=False)["delta_ppl_pct"].mean()
            best[am] = {"method": str(means.idxmin()), "delta": float(means.min())}

        counts = self.cache.counts()
        # What each reused artifact cost when it was made (from its cache record).
        made_seconds: dict[str, float] = {}
        for e in self.cache.log:
            if e.status == "hit":
                rec = self.cache.record(e.kind, e.key)
                made_seconds[e.kind] = made_seconds.get(e.kind, 0.0) + float(rec.get("seconds", 0.0))
        by_kind = prog.timings
        ppl_params = None
        try:
            cfg = json.loads((self.base_path / "config.json").read_text())
            if self.base_info.get("params"):
                ppl_params = int(self.base_info["params"])
            self.base_info["config"] = {k: cfg.get(k) for k in ("model_type", "n_layer", "n_embd", "vocab_size",
                                                                 "num_hidden_layers", "hidden_size") if k in cfg}  # fmt: skip
        except (OSError, ValueError):
            pass
        report = {
            "loramix_version": __version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "scenario_file": str(sc.path),
            "scenario": scenario_summary(sc),
            "environment": environment(self.device),
            "base": {"key": self.base_key, "parameters": ppl_params, **self.base_info},
            "domains": {
                n: {
                    "data": sc.domains[n].data,
                    "train": len(d.train),
                    "eval": len(d.eval),
                    "eval_tokens": ev_base[n]["tokens"],
                    "sha256_train": d.sha256_train,
                    "sha256_eval": d.sha256_eval,
                    "source_sha256": d.source_sha256,
                }
                for n, d in data.items()
            },  # fmt: skip
            "similarity": sims,
            "similarity_mean": sim_mean,
            "cosine_by_layer": by_layer,
            "evaluations": evaluations,
            "results": records(res_df),
            "summary": records(summary),
            "fits": fits,
            "best_methods": best,
            "merge_summaries": merge_summaries,
            "adapters": adapter_paths,
            "cache": {"root": str(self.cache.root), "counts": counts},
            "timings": {
                "total_seconds": time.perf_counter() - t_start,
                "by_kind": by_kind,
                "made_seconds": made_seconds,
            },  # fmt: skip
        }
        self.per_module = per_module
        return report


def run_scenario(
    scenario,
    out: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    fresh: bool = False,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Run a scenario file (or a loaded :class:`Scenario`) and write its report.

    ``out`` defaults to ``reports/<name>``; ``cache_dir`` to ``$LORAMIX_CACHE``
    or ``.loramix-cache``. Everything is checked before any work starts.
    ``threads``: torch's CPU threads during the run (restored after). The
    default is 1: the study's models are small, and on a small CPU shared
    with other processes several OpenMP threads spin-wait on each other
    (measured here: a tiny-GPT-2 training step 30-60x slower with 2 threads
    than with 1 while other jobs ran). Raise it on a dedicated machine.
    Returns the report dict (also written as ``report.json``), with ``out``.
    """
    from ..devices import resolve_device
    from ..io.outputs import atomic_output_dir
    from .report import write_report

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    out = Path(out) if out is not None else Path("reports") / sc.name
    check_report_dir(out, sc.name, force)
    dev = resolve_device(device)
    if threads is not None and threads < 1:
        raise UsageError("--threads", f"must be at least 1, got {threads}")
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    cache = Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), fresh=fresh)
    runner = Runner(sc, cache=cache, device=dev, progress=progress)
    try:
        report = runner.run()
    finally:
        torch.set_num_threads(old_threads)
    report["out_hint"] = str(out / "fit.json")
    with atomic_output_dir(out, force=True) as tmp:
        cache.write_log(tmp / "cache_log.csv")
        write_report(tmp, report, per_module=runner.per_module)
    report["out"] = str(out)
    return report
