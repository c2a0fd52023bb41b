"""Running one step of a study's plan (:mod:`loramix.scenario.plan`).

:func:`run_step` makes (or reads back) one cache artifact and returns its
result: a small picklable dict (paths as strings, evaluations as
``{domain: {ppl, tokens, nll_sum}}``), so a step can run in this process, in a
worker process or on a Ray node sharing the cache folder. A step only reads
the results of its dependencies, which the executor passes in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Cache
from .config import Scenario
from .plan import DomainData, Step


@dataclass
class StepContext:
    """What every step of one run shares: the scenario, its prepared data,
    the cache and the device. A worker builds its own from the picklable
    :meth:`payload`."""

    sc: Scenario
    data: dict[str, DomainData]
    cache: Cache
    device: object
    _base_model: tuple | None = field(default=None, repr=False)
    _base_model_path: str | None = field(default=None, repr=False)

    def payload(self) -> dict:
        return {"sc": self.sc, "data": self.data, "cache_root": str(self.cache.root), "fresh": self.cache.fresh,
                "device": str(self.device)}  # fmt: skip

    @classmethod
    def from_payload(cls, p: dict, device=None) -> StepContext:
        return cls(p["sc"], p["data"], Cache(Path(p["cache_root"]), fresh=p["fresh"]), device or p["device"])

    def base_model(self, path: str):
        """The base (model, tokenizer), loaded once per process."""
        if self._base_model is None or self._base_model_path != path:
            from ..models import load_causal_lm

            self._base_model = load_causal_lm(path, device=self.device)
            self._base_model_path = path
        return self._base_model


def _data_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    dd, part = ctx.data[st.args["domain"]], st.args["part"]
    text = dd.train_text if part == "train" else dd.eval_text

    def make(tmp):
        (tmp / f"{part}.jsonl").write_text(text)
        return {"domain": dd.name}

    folder = ctx.cache.get_or_make("data", st.spec, make, label=st.label)
    return {"path": str(folder / f"{part}.jsonl")}


def _base_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    if st.cache_kind is None:  # a given folder (a GGUF: its import; "given" is the file)
        return {"path": st.args["path"], "info": {"path": st.args.get("given", st.args["path"])}}
    b = ctx.sc.base

    def make(tmp):
        from ..basebuild import build_base

        kw = {k: v for k, v in b.build_params.items() if k in ("lr", "batch")}
        res = build_base(st.args["records"], tmp / "model", size=b.size, steps=b.steps, seed=b.seed,
                         device=str(ctx.device), progress=False, **kw)  # fmt: skip
        return {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "out"}

    folder = ctx.cache.get_or_make("base", st.spec, make, label=st.label)
    path = str(folder / "model")
    return {"path": path, "info": {"path": path, **ctx.cache.record("base", folder)["info"]}}


def _train_kwargs(ad) -> dict:
    kw = {"steps": ad.steps} if ad.steps is not None else {"epochs": ad.epochs}
    if "warmup" in ad.extra:
        kw["warmup"] = int(ad.extra["warmup"])
    if "weight_decay" in ad.extra:
        kw["weight_decay"] = ad.extra["weight_decay"]
    if "grad_clip" in ad.extra:
        kw["clip"] = ad.extra["grad_clip"]
    return kw


def _adapter_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Train (or reuse) one adapter, named ``name`` inside its cache entry so
    that similarity and predict show readable names."""
    ad, a = ctx.sc.adapters, st.args
    train_paths = [deps[f"data/{d}/train"]["path"] for d in a["domains"]]

    def make(tmp):
        from ..train import train_adapter

        res = train_adapter(deps["base"]["path"], train_paths, tmp / a["name"], method=a["method"], rank=ad.rank,
                            alpha=ad.alpha, tau=ad.tau, targets=list(ad.targets) if ad.targets else None,
                            lr=ad.lr, batch=ad.batch, max_len=ad.max_len, eval_size=0, seed=a["seed"],
                            shared_init=ad.init == "shared", device=str(ctx.device), progress=False,
                            **_train_kwargs(ad))  # fmt: skip
        return {
            k: v for k, v in res.items() if (isinstance(v, (int, float, str)) or v is None) and k != "out"
        }

    folder = ctx.cache.get_or_make("adapter", st.spec, make, label=st.label)
    # The entry may have been made under another name (same data, another scenario).
    return {"path": str(next(p.parent for p in sorted(folder.glob("*/adapter_config.json"))))}


def evaluate_on_splits(ctx: StepContext, base_path: str, *, adapters=(), model_path=None) -> dict:
    """Per-domain ``{ppl, tokens, nll_sum}`` of a model on every eval split."""
    from ..perplexity import evaluate

    ev, names = ctx.sc.eval, list(ctx.data)
    base = str(model_path) if model_path is not None else ctx.base_model(base_path)
    df = evaluate(base, adapters=[str(a) for a in adapters], data=[ctx.data[n].eval for n in names],
                  on=ev.on, max_len=ev.max_len, batch_size=ev.batch, device=str(ctx.device))  # fmt: skip
    out = {}
    for i, n in enumerate(names):
        row = df.iloc[i]
        out[n] = {"ppl": float(row["ppl"]), "tokens": int(row["tokens"]),
                  "nll_sum": float(row["nll"]) * int(row["tokens"])}  # fmt: skip
    return out


def _eval_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    if "merge" in st.args:
        adapters = [Path(deps[st.args["merge"]]["path"]) / "adapter"]
    else:
        adapters = [deps[a]["path"] for a in st.args.get("adapters", ())]
    base = deps["base"]["path"]
    return ctx.cache.json_artifact("eval", st.spec, lambda: evaluate_on_splits(ctx, base, adapters=adapters),
                                   st.label)  # fmt: skip


def _merge_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """A low-rank merge (``svd``) is kept as an adapter; a dense merge is
    written into a copy of the base, evaluated, then deleted."""
    from ..methods import merge as do_merge

    a, dev, base = st.args, str(ctx.device), deps["base"]["path"]
    paths = [deps[x]["path"] for x in a["adapters"]]

    def make(tmp):
        if a["low_rank"]:
            res = do_merge(paths, a["method"], out=tmp / "adapter", device=dev, **a["params"])
            return {"summary": res.summary}
        res = do_merge(paths, a["method"], into=base, out=tmp / "model", device=dev, **a["params"])
        ev = evaluate_on_splits(ctx, base, model_path=tmp / "model")
        shutil.rmtree(tmp / "model")
        (tmp / "result.json").write_text(json.dumps(ev, indent=2, sort_keys=True))
        return {"summary": res.summary}

    folder = ctx.cache.get_or_make("merge", st.spec, make, label=st.label)
    out = {"path": str(folder), "summary": ctx.cache.record("merge", folder)["info"].get("summary", {})}
    if not a["low_rank"]:
        out["eval"] = json.loads((folder / "result.json").read_text())
    return out


def _similarity_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Pairwise RMS/mean cosine and coverage of the domain adapters (and, for
    a kind whose delta needs the base, of the effective deltas)."""
    from ..io.adapter_files import load_adapter
    from ..overlap import similarity

    names, pre = st.args["names"], st.label
    ads = [load_adapter(deps[f"adapter/{pre}/{d}"]["path"], name=d) for d in names]
    sim = similarity(ads, per_module=True, progress=False)
    sim_eff = similarity(ads, base=deps["base"]["path"], progress=False) if st.args["effective"] else None

    def mat(df):
        return df.loc[names, names].to_numpy(dtype=float).tolist()

    return {"names": names, "rms": mat(sim.rms), "mean": mat(sim.mean), "coverage": mat(sim.coverage),
            "rms_effective": None if sim_eff is None else mat(sim_eff.rms), "per_module": sim.per_module}  # fmt: skip


_RUNNERS = {"data": _data_step, "base": _base_step, "adapter": _adapter_step, "merged-data": _adapter_step,
            "eval": _eval_step, "merge": _merge_step, "similarity": _similarity_step}  # fmt: skip


def run_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Run ``st`` given ``deps`` (``{step id: result}`` of its dependencies)."""
    return _RUNNERS[st.kind](ctx, st, deps)
