"""Running one step of a study's plan (:mod:`loramix.scenario.plan`).

:func:`run_step` makes (or reads back) one cache artifact and returns its
result: a small picklable dict (paths as strings, evaluations as
``{domain: {ppl, tokens, nll_sum}}``), so a step can run in this process, in a
worker process or on a Ray node sharing the cache folder. A step only reads
the results of its dependencies, which the executor passes in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ScenarioError, UsageError
from .cache import Cache
from .config import Scenario
from .plan import DomainData, Step
from .traits import init_of, kind_of, rank_of


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

    def base_copy(self, path: str, top_layers: int | None = None) -> tuple:
        """A copy of :meth:`base_model`'s model (the same weights, its own
        modules) and its tokenizer, for a training to change: a deep copy
        costs less than loading the base again (7-10 ms of CPU against 80 ms
        per adapter on the quickstart's tiny base). The held model is never
        trained, and merges restore its weights (:func:`_restore`), so every
        copy is the base as loaded. With ``top_layers`` (the adapters on the
        top ``N`` of ``L`` blocks, ``0 < N < L``, trained from the cached
        prefix) the copy shares the held model's embedding and blocks
        ``0 .. L-N-1`` (:func:`loramix.prefix.copy_sharing_prefix`), which
        such a training only reads: one model more in memory is then the top
        blocks alone (and a head not tied to the embedding), and the prefix is hashed once per
        process, not once per adapter (0.5 s each on SmolLM2)."""
        import copy

        model, tok = self.base_model(path)
        if top_layers is not None:
            from ..prefix import blocks, copy_sharing_prefix

            n = len(blocks(model))
            if 0 < top_layers < n:
                return copy_sharing_prefix(model, n - top_layers), tok
        return copy.deepcopy(model), tok


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
        from ..models import parameter_count

        # a built base's count is basebuild's; a given one's is read from its headers, or why not
        n, why = parameter_count(st.args["path"])
        counted = {"params": n} if n is not None else {"params_note": why}
        return {"path": st.args["path"], "info": {"path": st.args.get("given", st.args["path"]), **counted}}
    b = ctx.sc.base

    def make(tmp):
        from ..basebuild import build_base

        kw = {k: v for k, v in b.build_params.items() if k in ("lr", "batch")}
        res = build_base(st.args["records"], out=tmp / "model", size=b.size, steps=b.steps, seed=b.seed,
                         device=str(ctx.device), progress=False, **kw)  # fmt: skip
        return {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "out"}

    folder = ctx.cache.get_or_make("base", st.spec, make, label=st.label)
    path = str(folder / "model")
    return {"path": path, "info": {"path": path, **ctx.cache.record("base", folder)["info"]}}


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def top_layer_targets(base_path: str, top_layers: int, targets) -> str:
    """A PEFT regex selecting ``targets`` (suffixes; the architecture's defaults
    when None) inside the top ``top_layers`` blocks of the base: any module
    ``<...>.<i>.<...>.<target>`` with ``i >= L - top_layers``."""
    import re

    from ..archs import arch

    cfg = json.loads((Path(base_path) / "config.json").read_text())
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    a = arch(cfg.get("model_type"))
    suffixes = list(targets) if targets else list(a.targets if a else ())
    if not n or not suffixes:
        raise ValueError(f"{base_path}: cannot tell the layers or the default targets of this model")
    layers = "|".join(str(i) for i in range(max(0, n - top_layers), n))
    return rf".*\.(?:{layers})\.(?:.*\.)?(?:{'|'.join(re.escape(t) for t in suffixes)})"


def _prefix_cache(base_path: str) -> bool:
    from ..archs import arch

    a = arch(json.loads((Path(base_path) / "config.json").read_text()).get("model_type"))
    return bool(a and a.prefix_cache)


def layer_kwargs(fn, ad, base_path: str) -> dict:
    """How ``fn`` (training or evaluation) is told to adapt only the top layers:
    ``top_layers`` where it takes it and the base's architecture allows the
    frozen-prefix cache (:mod:`loramix.archs`), else, for training, the targets
    restricted to those layers (the same adapter, with the full forward)."""
    if ad.top_layers is None:
        return {"targets": list(ad.targets) if ad.targets else None} if _accepts(fn, "targets") else {}
    if _accepts(fn, "top_layers") and _prefix_cache(base_path):
        kw = {"top_layers": ad.top_layers}
        if _accepts(fn, "targets"):
            kw["targets"] = list(ad.targets) if ad.targets else None
        return kw
    if _accepts(fn, "targets"):
        return {"targets": top_layer_targets(base_path, ad.top_layers, ad.targets)}
    return {}


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
    if st.cache_kind is None:  # given (trained elsewhere): read where it is
        return {"path": st.args["path"]}
    ad, a = ctx.sc.adapters, st.args
    train_paths = [deps[f"data/{d}/train"]["path"] for d in a["domains"]]

    def make(tmp):
        from ..prefix import remembering_digests
        from ..train import train_adapter

        base = deps["base"]["path"]
        layers = layer_kwargs(train_adapter, ad, base)
        try:
            # the copy's prefix tensors are the held base's, which nothing writes: its digest is remembered
            with remembering_digests():
                res = train_adapter(base, train_paths, out=tmp / a["name"], method=kind_of(a["method"]),
                                    rank=rank_of(a["method"], ad.rank),
                                    alpha=ad.alpha, tau=ad.tau, lr=ad.lr, batch=ad.batch, max_len=ad.max_len, eval_size=0,
                                    seed=a["seed"], shared_init=init_of(a["method"], ad.init) == "shared", device=str(ctx.device), progress=False,
                                    loaded=ctx.base_copy(base, layers.get("top_layers")), **layers, **_train_kwargs(ad))  # fmt: skip
        except UsageError as e:
            # with adapters.epochs the steps are known once the data is read: name the key, not the flag
            if e.where != "--warmup":
                raise
            raise ScenarioError(f"{ctx.sc.path}: adapters.warmup",
                                f"{e.problem.replace('--lr', 'adapters.lr')} (adapter {st.label})") from None  # fmt: skip
        return {
            k: v for k, v in res.items() if (isinstance(v, (int, float, str)) or v is None) and k != "out"
        }

    folder = ctx.cache.get_or_make("adapter", st.spec, make, label=st.label)
    # The entry may have been made under another name (same data, another scenario).
    return {"path": str(next(p.parent for p in sorted(folder.glob("*/adapter_config.json"))))}


def evaluate_on_splits(ctx: StepContext, base_path: str, *, adapters=(), domains=None, model=None) -> dict:
    """Per-domain ``{ppl, tokens, nll_sum, record_nll, record_tokens}`` of a
    model on the eval splits of ``domains`` (default: every domain):
    ``record_*`` are each eval record's NLL sum and scored tokens, in the
    split's record order (the eval-split bootstrap of
    :mod:`loramix.scenario.compose`; an evaluation cached before they were
    kept lacks them). ``model``: an in-memory ``(model, tokenizer)`` to
    evaluate instead of the base folder."""
    from ..perplexity import RECORD_COLUMNS, evaluate
    from ..prefix import remembering_digests

    ev = ctx.sc.eval
    names = list(ctx.data) if domains is None else list(domains)
    base = model or ctx.base_model(base_path)
    with remembering_digests():  # the study's own base: only in-place writes, which the digests see
        df = evaluate(base, adapters=[str(a) for a in adapters], data=[ctx.data[n].eval for n in names],
                      on=ev.on, max_len=ev.max_len, batch=ev.batch, batch_tokens=ev.batch_tokens,
                      device=str(ctx.device), progress=False,
                      per_record=True,
                      **{k: v for k, v in layer_kwargs(evaluate, ctx.sc.adapters, base_path).items()
                         if k == "top_layers"})  # fmt: skip
    nll_key, tok_key = RECORD_COLUMNS
    out = {}
    for i, n in enumerate(names):
        row = df.iloc[i]
        out[n] = {"ppl": float(row["ppl"]), "tokens": int(row["tokens"]),
                  "nll_sum": float(row["nll"]) * int(row["tokens"]),
                  nll_key: [float(x) for x in row[nll_key]],
                  tok_key: [int(x) for x in row[tok_key]]}  # fmt: skip
    return out


def _eval_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    if "merge" in st.args:
        adapters = [Path(deps[st.args["merge"]]["path"]) / "adapter"]
    else:
        adapters = [deps[a]["path"] for a in st.args.get("adapters", ())]
    base, doms = deps["base"]["path"], st.args.get("domains")
    return ctx.cache.json_artifact("eval", st.spec,
                                   lambda: evaluate_on_splits(ctx, base, adapters=adapters, domains=doms),
                                   st.label)  # fmt: skip


def merged_in_memory(model, adapters, method: str, params: dict) -> tuple[dict, dict]:
    """Add a dense merge's per-module deltas to ``model``'s weights in place
    (``W <- W0 + delta``, computed by the method from ``W0`` in ``(out, in)``
    layout, an embedding's ``(vocab, dim)``, float32, exactly as the streaming
    engine does); returns the original weights ``{module: W0}`` (to restore)
    and the method's facts."""
    import torch

    from ..layers import weight_view
    from ..methods import get_method
    from ..methods.base import ModuleContext
    from ..methods.runner import module_plan

    m = get_method(method)
    p = m.validate(dict(params), adapters)
    saved, facts = {}, {}
    with torch.no_grad():
        for name, items in module_plan(adapters).items():
            mod = model.get_submodule(name)
            view = weight_view(mod)  # a view of the stored weight: Conv1D stores W0^T
            W0 = view.to(torch.float32)
            ctx = ModuleContext(name, tuple(i for i, _ in items), W0.device, torch.float32)
            d, f = m.merged(ctx, [md for _, md in items], [1.0] * len(items), W0, p)
            d = d[0] @ d[1] if isinstance(d, tuple) else d
            saved[name] = mod.weight.detach().clone()
            view.add_(d.to(view.dtype))
            if f:
                facts[name] = f
    return saved, {"modules": len(saved), **(m.summarize(facts) if facts else {})}


def _restore(model, saved: dict) -> None:
    import torch

    with torch.no_grad():
        for name, w0 in saved.items():
            model.get_submodule(name).weight.copy_(w0)


def _merge_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """A low-rank merge (``svd``) is kept as an adapter; a dense merge is
    written into a copy of the base, evaluated, then deleted."""
    from ..methods import merge as do_merge

    a, dev, base = st.args, str(ctx.device), deps["base"]["path"]
    paths = [deps[x]["path"] for x in a["adapters"]]

    def make(tmp):
        if a["low_rank"]:
            import warnings

            with warnings.catch_warnings():
                # a given adapter's base was compared with base.path once, when the study read it
                # (scenario.given): not again per merge, against the first adapter's
                warnings.filterwarnings(
                    "ignore", message=r"(?s).*: trained on another base, .*merged with it"
                )
                res = do_merge(paths, a["method"], out=tmp / "adapter", device=dev, progress=False,
                               **a["params"])  # fmt: skip
            return {"summary": res.summary}
        # A dense merge changes only the adapted modules: add its deltas to the
        # base held in memory, evaluate, restore, instead of writing a whole model.
        from ..io.adapter_files import load_adapter

        model = ctx.base_model(base)
        saved, summary = merged_in_memory(
            model[0], [load_adapter(x) for x in paths], a["method"], a["params"]
        )
        try:
            ev = evaluate_on_splits(ctx, base, domains=a.get("domains"), model=model)
        finally:
            _restore(model[0], saved)
        (tmp / "result.json").write_text(json.dumps(ev, indent=2, sort_keys=True))
        return {"summary": summary}

    folder = ctx.cache.get_or_make("merge", st.spec, make, label=st.label)
    out = {"path": str(folder), "summary": ctx.cache.record("merge", folder)["info"].get("summary", {})}
    if not a["low_rank"]:
        out["eval"] = json.loads((folder / "result.json").read_text())
    return out


def _similarity_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Pairwise RMS/mean cosine and coverage of the domain adapters, from
    their numpy factors (no torch), and, for a kind whose delta needs the
    base, the RMS cosine of the effective deltas: formed with the base's
    weights in torch, so kept in the cache (``similarity``), and read back
    by a rerun, which then imports no torch."""
    from ..io.np_factors import load_np_adapter
    from ..overlap import similarity

    names, pre = st.args["names"], st.label
    paths = [deps[f"adapter/{pre}/{d}"]["path"] for d in names]

    def mat(df):
        return df.loc[names, names].to_numpy(dtype=float).tolist()

    sim = similarity(
        [load_np_adapter(p, name=d) for p, d in zip(paths, names)], per_module=True, progress=False
    )
    rms_eff = None
    if st.args["effective"]:

        def effective() -> dict:
            from ..io.adapter_files import load_adapter

            ads = [load_adapter(p, name=d) for p, d in zip(paths, names)]
            return {"rms_effective": mat(similarity(ads, base=deps["base"]["path"], progress=False).rms)}

        rms_eff = ctx.cache.json_artifact("similarity", st.spec, effective, st.label)["rms_effective"]
    return {"names": names, "rms": mat(sim.rms), "mean": mat(sim.mean), "coverage": mat(sim.coverage),
            "rms_effective": rms_eff, "per_module": sim.per_module}  # fmt: skip


def _features_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Every registered feature of the domain adapters (:mod:`loramix.features`),
    the data-aware ones from calibration activations of each domain's training
    split: the matrices as JSON (``FeatureSet.to_json_dict``)."""

    def compute():
        from ..features import compute_features
        from ..features._calibration import capture
        from ..io.adapter_files import load_adapter

        names, p = st.args["names"], ctx.sc.predictors
        ads = [load_adapter(deps[a]["path"], name=d) for a, d in zip(st.args["adapters"], names)]
        data = [deps[f"data/{d}/train"]["path"] for d in names]
        base = deps["base"]["path"]
        cal = capture(ads, base, data, tokens=p.tokens, max_len=p.max_len, device=str(ctx.device),
                      loaded=ctx.base_model(base))  # fmt: skip
        return compute_features(ads, calibration=cal).to_json_dict()

    return ctx.cache.json_artifact("features", st.spec, compute, st.label)


_RUNNERS = {"data": _data_step, "base": _base_step, "adapter": _adapter_step, "merged-data": _adapter_step,
            "eval": _eval_step, "merge": _merge_step, "similarity": _similarity_step,
            "features": _features_step}  # fmt: skip


def reads_back(ctx: StepContext, st: Step) -> bool:
    """Whether running ``st`` in this process only reads back what is on disk,
    with neither torch nor a model: its artifact is complete in the cache
    (and the run is not ``fresh``; the effective deltas' similarity
    included), or it is a base or an adapter given as a folder, or the similarity of the
    domain adapters' factors (numpy, tenths of a second). A run whose every
    step reads back imports neither torch nor transformers."""
    if st.cache_kind is not None:
        return not ctx.cache.fresh and ctx.cache.has(st.cache_kind, st.key)
    return st.kind in ("base", "adapter") or (st.kind == "similarity" and not st.args.get("effective"))


def run_step(ctx: StepContext, st: Step, deps: dict) -> dict:
    """Run ``st`` given ``deps`` (``{step id: result}`` of its dependencies)."""
    return _RUNNERS[st.kind](ctx, st, deps)
