"""The study as a plan: every step of a scenario, its dependencies and its cache key.

:func:`plan` turns a checked :class:`~loramix.scenario.config.Scenario` into a
list of :class:`Step` in dependency order (each step's dependencies come
before it). A step is one artifact of the content-addressed cache
(:mod:`loramix.scenario.cache`) and its key is known before anything runs:
an artifact's spec names its upstream artifacts by their folder names,
``make_key(kind, spec)[:24]``, which depend only on their own specs. So a plan
says exactly which cache entries a run reads or makes, and an executor
(:mod:`loramix.scenario.executors`) may run independent steps in any order or
in parallel.

For each adapter kind ``a`` and seed ``s`` the steps are (docs/interference.md
gives the protocol)::

    data/<domain>/<part>         the train and eval splits       (cache: data)
    base                         the base model (built or hashed) (cache: base)
    eval/base                    the base on every eval split      (cache: eval)
    adapter/a/s/<domain>         one adapter per domain            (cache: adapter;
                                 given, ``domains.NAME.adapter``: not cached, keyed by its files' hash)
    merged-data/a/s/<comp>       one adapter on the union of comp  (cache: adapter)
                                 (the compositions of ``merged_data`` only)
    similarity/a/s               RMS cosine of the domain adapters (numpy, not cached;
                                 the effective deltas' of a kind that needs the base: cache: similarity)
    features/a/s                 every pairwise feature, with ``[predictors]`` (cache: features)
    eval/a/s/adapter/<domain>    each domain adapter               (cache: eval)
    eval/a/s/merged-data/<comp>  each merged-data adapter          (cache: eval)
    merge/a/s/<method>/<comp>    a merge: written, evaluated       (cache: merge)
    eval/a/s/merge/<method>/<comp>  a low-rank merge or the sum    (cache: eval)

Data splits are drawn once with ``data_seed``; the seeds vary adapter
training only. With ``eval.domains = "members"`` an evaluation covers only the
domains its model serves (the base: all). ``a`` is an adapter label: a kind,
or ``KIND@R`` for that kind at rank ``R``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..data import TRUNCATION
from ..errors import ScenarioError
from ..perplexity import NLL_RULE
from ..train import PREFIX_PARTS
from .cache import make_key
from .config import Scenario
from .traits import applied_on_the_fly, init_of, needs_base


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
    left_out: int = 0  # records left out as the given adapter's training records (domains.NAME.trained_on)
    left_out_ngram: int = 0  # ... of them, those found by n-gram overlap only (loramix.contamination)
    ngram: int | None = None  # the n of that overlap (domains.NAME.trained_on_ngram); None without trained_on

    @property
    def sha256_train(self) -> str:
        return _sha256_text(self.train_text)

    @property
    def sha256_eval(self) -> str:
        return _sha256_text(self.eval_text)


def prepare_data(sc: Scenario) -> dict[str, DomainData]:
    """Load and split every domain (cheap; done before any work so that a
    domain too small for its sizes fails first)."""
    from ..data import check_context_field, is_synthetic_spec, load_records, split_records
    from ..errors import LoramixError
    from ..io.st_header import file_sha256  # torch-free (safetensors_io re-exports it)

    out = {}
    for name, d in sc.domains.items():
        fields = dict(
            question_field=d.question_field, answer_field=d.answer_field, context_field=d.context_field
        )
        try:
            recs = load_records(d.data, named_by=f"domains.{name}.{{}}", **fields)
            if not is_synthetic_spec(d.data):
                check_context_field([(d.data, recs)], d.context_field, f"domains.{name}.{{}}")
        except LoramixError as e:
            raise ScenarioError(f"{sc.path}: domains.{name}.data", e.message) from None
        left, near, ngram = 0, 0, None
        if d.trained_on is not None:
            try:
                seen = load_records(d.trained_on, named_by=f"domains.{name}.{{}}", **fields)
            except LoramixError as e:
                raise ScenarioError(f"{sc.path}: domains.{name}.trained_on", e.message) from None
            from ..contamination import N, contaminated  # numpy: only for a study that gives trained_on

            ngram = N if d.trained_on_ngram is None else d.trained_on_ngram
            found = contaminated(recs, seen, n=ngram)
            kept = [r for r, f in zip(recs, found, strict=True) if f is None]
            left, near, recs = len(recs) - len(kept), found.count("ngram"), kept
        if len(recs) < d.train + d.eval:
            # with a given adapter and no train key, eval alone is too large: name the key the user wrote
            key, want = (
                ("train", f"train={d.train} + eval={d.eval}") if d.train else ("eval", f"eval={d.eval}")
            )
            gone = f" once the {left} it was trained on are left out" if left else ""
            raise ScenarioError(f"{sc.path}: domains.{name}.{key}",
                                f"{d.data} has {len(recs)} records{gone}, fewer than {want}")  # fmt: skip
        if len(recs) == d.eval and d.train == 0:
            # given adapters, no calibration: every record is eval's, in order, as the split
            # would keep them (it refuses to leave no training record)
            train_all, ev = [], list(recs)
        else:
            train_all, ev = split_records(recs, eval_size=d.eval, seed=sc.data_seed)
        idx = list(range(len(train_all)))
        random.Random(sc.data_seed + 1).shuffle(idx)
        train = [train_all[i] for i in sorted(idx[: d.train])]
        src = None if d.synthetic else file_sha256(d.data)
        out[name] = DomainData(
            name, train, ev, _records_jsonl(train), _records_jsonl(ev), src, left, near, ngram
        )
    return out


def _word_counts(records) -> dict[str, int]:
    import re
    from collections import Counter

    words = Counter()
    for r in records:
        words.update(re.findall(r"\w+", f"{r.context or ''} {r.question} {r.answer}".lower()))
    return words


def data_similarity(data: dict[str, DomainData]) -> dict[tuple[str, str], float]:
    """Cosine of the word-count vectors of two domains' training splits
    (``\\w+`` words, lower-cased), for every pair of domains: a similarity known
    before any adapter is trained."""
    counts = {n: _word_counts(d.train) for n, d in data.items()}
    norms = {n: sum(v * v for v in c.values()) ** 0.5 for n, c in counts.items()}
    names, out = list(data), {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            dot = sum(v * counts[b].get(w, 0) for w, v in counts[a].items())
            out[(a, b)] = dot / (norms[a] * norms[b]) if norms[a] and norms[b] else 0.0
    return out


def merged_data_compositions(sc: Scenario, data: dict[str, DomainData]) -> list[tuple[str, ...]]:
    """The compositions that get a merged-data adapter (``merged_data``): all;
    the listed ones; or, for a number ``N``, ``N`` of the study's pairs at evenly
    spaced ranks of :func:`data_similarity` (the least and the most similar pair
    included), so that they span the similarity range."""
    md = sc.merged_data
    if md is None:
        return list(sc.compositions)
    if not md:  # none (given adapters: their recipe is unknown)
        return []
    if not isinstance(md[0], int):
        return [c for c in sc.compositions if c in md]
    (n, include), sim = md, data_similarity(data)
    pairs = sorted(
        (c for c in sc.compositions if len(c) == 2 and c not in include), key=lambda c: (sim[c], c)
    )
    chosen, m = set(include), n - len(include)
    if m == 1:
        chosen.add(pairs[len(pairs) // 2])
    elif m > 1:
        chosen |= {pairs[round(i * (len(pairs) - 1) / (m - 1))] for i in range(m)}
    return [c for c in sc.compositions if c in chosen]


@dataclass(frozen=True)
class Step:
    """One artifact of the study.

    ``kind``: data, base, adapter, merged-data, similarity, eval or merge.
    ``cache_kind``/``spec``: the cache entry it reads or makes (``None`` for
    a step that is not cached: the similarity of a kind whose delta needs no
    base, a base or an adapter given as a folder).
    ``key``: ``make_key(cache_kind, spec)``, or the given base's or adapter's content hash.
    ``deps``: ids of the steps whose results it uses. ``args``: what running
    it needs besides the spec (names, merge parameters, dependency roles).
    ``group``: the row of the report's timing table it counts under.
    """

    id: str
    kind: str
    cache_kind: str | None
    spec: dict | None
    key: str
    deps: tuple[str, ...]
    label: str
    group: str
    args: dict = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        """The artifact's folder in the cache, which downstream specs name."""
        return self.key[:24] if self.cache_kind else self.key


def merge_evaluation(results: dict, pre: str, label: str, cn: str, prefix: str = "") -> dict:
    """The evaluation of the merge of ``cn`` by the study's merge ``label``
    (:meth:`_Planner.merge_steps`): its evaluation step's result, or, for a
    dense merge (evaluated in memory, no evaluation step), its merge step's."""
    ev = results.get(f"{prefix}eval/{pre}/merge/{label}/{cn}")
    return ev if ev is not None else results[f"{prefix}merge/{pre}/{label}/{cn}"]["eval"]


#: the stand-in key of a GGUF base not imported yet (``plan(..., import_gguf=False)``)
NOT_IMPORTED = "not-imported:"


def base_folder_key(path: Path) -> str:
    """A given base folder's key::

        sha256(identity "\n" + "name:sha256\n" per tokenizer file present, by name)

    ``identity`` is the hash of its config and weights that merge and training
    provenance record for the base; the tokenizer files
    (:func:`loramix.models.tokenizer_files`) are added because every training
    and evaluation reads the data through them (the identity leaves them out: a
    merge never reads them). A GGUF file is imported (once, into the cache) and
    its folder's files used."""
    from ..gguf_import import resolve_base
    from ..io.model_folder import BaseModelFolder
    from ..models import tokenizer_files

    folder = Path(resolve_base(path))
    lines = [BaseModelFolder(folder).identity() + "\n"]
    lines += [f"{n}:{h}\n" for n, h in tokenizer_files(folder).items()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class _Planner:
    """Builds the steps in the order a serial run makes them."""

    def __init__(self, sc: Scenario, data: dict[str, DomainData], import_gguf: bool = True):
        self.sc, self.data, self.import_gguf = sc, data, import_gguf
        self.steps: dict[str, Step] = {}

    def add(self, id, kind, cache_kind, spec, deps, label, group, key=None, **args) -> Step:
        key = key if key is not None else make_key(cache_kind, spec)
        st = Step(id, kind, cache_kind, spec, key, tuple(deps), label, group, args)
        self.steps[id] = st
        return st

    def key_of(self, step_id: str) -> str:
        return self.steps[step_id].folder_name

    def data_steps(self) -> None:
        for dd in self.data.values():
            for part, text in (("train", dd.train_text), ("eval", dd.eval_text)):
                if not text:
                    # no training split (given adapters, no [predictors]): nothing reads one, and the
                    # empty file, one key for every domain, read as cache hits on a first run
                    continue
                spec = {"sha256": _sha256_text(text), "records": text.count("\n")}
                self.add(f"data/{dd.name}/{part}", "data", "data", spec, (), f"{dd.name}/{part}", "data",
                         domain=dd.name, part=part)  # fmt: skip

    def base_step(self) -> None:
        b = self.sc.base
        if b.path is not None:
            from ..gguf_import import import_preview, imported_base, is_gguf, resolve_base

            if not self.import_gguf and is_gguf(b.path) and imported_base(b.path) is None:
                # scenario check before the run's import: no key can name an artifact made on
                # it (the key hashes the import's files), so every step is one to make
                pre = import_preview(b.path)
                self.add("base", "base", None, None, (), "hash", "base", key=NOT_IMPORTED + b.path.name,
                         path=None, given=str(b.path), arch=pre["arch"], import_bytes=pre["bytes"])  # fmt: skip
                return
            folder = resolve_base(b.path)  # a GGUF: its imported folder, which every step uses
            self.add("base", "base", None, None, (), "hash", "base", key=base_folder_key(folder),
                     path=str(folder), given=str(b.path))  # fmt: skip
            return
        from ..data import load_records

        if b.build_data:
            records = [r for spec in b.build_data for r in load_records(spec)]
        else:
            records = [r for dd in self.data.values() for r in dd.train]
        spec = {"recipe": {"size": b.size, "steps": b.steps, "seed": b.seed, **b.build_params},
                "data_sha256": _sha256_text(_records_jsonl(records))}  # fmt: skip
        self.add("base", "base", "base", spec, (), f"base build {b.size}", "base", records=records)

    def eval_domains(self, serves, members: bool = False) -> list[str]:
        """The domains a model is evaluated on: all, or (``eval.domains = "members"``,
        or ``members``) only those it serves (``serves``: its domains; None for the base)."""
        if (self.sc.eval.domains == "all" and not members) or serves is None:
            return list(self.data)
        return [n for n in self.data if n in serves]

    def eval_spec(self, names: list[str]) -> dict:
        """What an evaluation on the domains ``names`` depends on besides its model
        (``nll``: evaluations made by an earlier rule of loramix.perplexity are not reused)."""
        ev = self.sc.eval
        return {"data": {n: self.key_of(f"data/{n}/eval") for n in names},
                "settings": {"on": ev.on, "max_len": ev.max_len, "truncation": TRUNCATION, "nll": NLL_RULE}}  # fmt: skip

    def eval_step(self, id, model: dict, deps, label, group, serves=None, members=False, **args) -> Step:
        names = self.eval_domains(serves, members)
        spec = {"model": model, **self.eval_spec(names)}
        eval_deps = ("base", *(f"data/{n}/eval" for n in names), *deps)
        return self.add(id, "eval", "eval", spec, eval_deps, label, group, domains=names, **args)

    def adapter_step(self, id, kind, am, seed, domains, label, name, after=()) -> Step:
        # ``after``: steps to wait for, whose results it does not take (a union's domains' adapters).
        # "init": adapters cached before per-data initialisation (the default since) were
        # trained from the seed alone and must not be reused for it; "truncation": nor those
        # trained on records cut by an earlier rule (loramix.data).
        spec = {"base": self.key_of("base"), "method": am, "recipe": self.sc.adapters.recipe(), "seed": seed,
                "init": init_of(am, self.sc.adapters.init), "data": [self.key_of(f"data/{d}/train") for d in domains],
                "truncation": TRUNCATION}  # fmt: skip
        if len(domains) > 1 and self.sc.adapters.top_layers is not None:
            # a union's prefix states are its domains' own since this rule (loramix.train.PREFIX_PARTS),
            # which changes its bits: one trained from the union's as a whole is not served for it
            spec["prefix_parts"] = PREFIX_PARTS
        deps = ("base", *(f"data/{d}/train" for d in domains), *after)
        return self.add(id, kind, "adapter", spec, deps, label, "train", method=am, seed=seed,
                        domains=list(domains), name=name)  # fmt: skip

    def given_step(self, id, am, domain, label) -> Step:
        """An adapter trained elsewhere (``domains.NAME.adapter``): not cached and
        not trained, as a base given as a folder; its key is the hash of its
        files (:func:`~loramix.scenario.given.given_key`), which every step
        downstream names, so they are made again when the files change."""
        from .given import given_key

        path = self.sc.domains[domain].adapter
        return self.add(id, "adapter", None, {"method": am, "given": str(path)}, (), label, "given",
                        key=given_key(path), method=am, domains=[domain], name=domain, path=str(path))  # fmt: skip

    def seed_steps(self, am: str, seed: int) -> None:
        sc, names, base = self.sc, list(self.data), self.key_of("base")
        pre = f"{am}/{seed}"
        for d in names:
            if sc.given:
                self.given_step(f"adapter/{pre}/{d}", am, d, f"{pre}/{d}")
            else:
                self.adapter_step(f"adapter/{pre}/{d}", "adapter", am, seed, [d], f"{pre}/{d}", d)
        md_comps = merged_data_compositions(sc, self.data)
        for comp in md_comps:
            cn = comp_name(comp)
            # with a frozen prefix, a union trains on its domains' cached states (loramix.train.PREFIX_PARTS):
            # started beside a domain's own training (--jobs > 1), it computed that domain's states again
            after = [f"adapter/{pre}/{d}" for d in comp] if sc.adapters.top_layers is not None else []
            self.adapter_step(f"merged-data/{pre}/{cn}", "merged-data", am, seed, comp,
                              f"{pre}/merged-data {cn}", f"merged-data_{cn}", after)  # fmt: skip
        dom = [f"adapter/{pre}/{d}" for d in names]
        # a kind whose delta needs the base: the effective deltas' cosine takes its weights, in torch, so
        # it is kept in the cache as a model step is (a rerun imports no torch); else numpy, uncached
        if needs_base(am):
            spec = {
                "base": base,
                "adapters": [self.key_of(a) for a in dom],
                "names": names,
                "effective": True,
            }
            self.add(f"similarity/{pre}", "similarity", "similarity", spec, ("base", *dom), pre, "similarity",
                     names=names, effective=True)  # fmt: skip
        else:
            self.add(f"similarity/{pre}", "similarity", None, None, ("base", *dom), pre, "similarity",
                     key=f"similarity/{pre}", names=names, effective=False)  # fmt: skip
        if sc.predictors:
            self.features_step(pre, names)
        for d in names:
            a = f"adapter/{pre}/{d}"
            self.eval_step(f"eval/{pre}/adapter/{d}", {"base": base, "adapters": [self.key_of(a)]}, (a,),
                           f"{pre}/{d}", "evaluate", serves=(d,), adapters=[a])  # fmt: skip
        for comp in sc.compositions:
            cn = comp_name(comp)
            md = f"merged-data/{pre}/{cn}"
            if comp in md_comps:
                self.eval_step(f"eval/{pre}/merged-data/{cn}", {"base": base, "adapters": [self.key_of(md)]},
                               (md,), f"{pre}/merged-data {cn}", "evaluate", serves=comp, adapters=[md])  # fmt: skip
            for mg in sc.merges_for(am):
                self.merge_steps(pre, comp, mg)

    def features_step(self, pre: str, names: list[str]) -> None:
        """Every registered feature of the domain adapters, the data-aware ones
        from ``predictors.tokens`` calibration tokens of each domain's training split.
        The key names the registered features and their aggregates: a feature
        added (one new file, :mod:`loramix.features`) makes the step again, where
        a cached one without it would have left the feature out of the study's
        validation without a word."""
        from ..features import registry

        p = self.sc.predictors
        ads = [f"adapter/{pre}/{d}" for d in names]
        spec = {"base": self.key_of("base"), "adapters": [self.key_of(a) for a in ads],
                "data": [self.key_of(f"data/{d}/train") for d in names],
                "settings": {"tokens": p.tokens, "max_len": p.max_len, "truncation": TRUNCATION},
                "features": {n: f.aggregate for n, f in sorted(registry().items())}}  # fmt: skip
        deps = ("base", *(f"data/{d}/train" for d in names), *ads)
        self.add(
            f"features/{pre}", "features", "features", spec, deps, pre, "features", names=names, adapters=ads
        )

    def merge_steps(self, pre: str, comp, mg, *, prefix: str = "", group: str = "merge",
                    members: bool = False) -> str:  # fmt: skip
        """The sum is evaluated on the fly; a low-rank merge is kept as an
        adapter and evaluated; a dense merge is written, evaluated and deleted
        in one step (its result is the evaluation). ``prefix``: of the step ids
        (the plan validation's); ``members``: evaluate on the members only,
        whatever ``eval.domains`` says. Returns the id of the step whose result
        holds the evaluation (a dense merge's ``eval``)."""
        from ..methods import get_method

        cn, base = comp_name(comp), self.key_of("base")
        ads = [f"adapter/{pre}/{d}" for d in comp]
        keys = [self.key_of(a) for a in ads]
        label = f"{pre}/{prefix}{mg.label} {cn}"
        eval_id = f"{prefix}eval/{pre}/merge/{mg.label}/{cn}"
        if applied_on_the_fly(mg.method):
            self.eval_step(eval_id, {"base": base, "adapters": keys, "sum": True}, ads, label,
                           group, serves=comp, members=members, adapters=ads)  # fmt: skip
            return eval_id
        spec = {"method": mg.method, "params": mg.params, "base": base, "adapters": keys}
        merge_id = f"{prefix}merge/{pre}/{mg.label}/{cn}"
        if get_method(mg.method).low_rank:
            self.add(merge_id, "merge", "merge", spec, ("base", *ads), label, group, method=mg.method,
                     params=mg.params, adapters=ads, low_rank=True)  # fmt: skip
            self.eval_step(eval_id, {"base": base, "merge": self.key_of(merge_id)}, (merge_id,), label, group,
                           serves=comp, members=members, merge=merge_id)  # fmt: skip
            return eval_id
        names = self.eval_domains(comp, members)
        spec = {**spec, "model": {"dense": True}, **self.eval_spec(names)}
        deps = ("base", *(f"data/{n}/eval" for n in names), *ads)
        self.add(merge_id, "merge", "merge", spec, deps, label, group, method=mg.method, params=mg.params,
                 adapters=ads, low_rank=False, domains=names)  # fmt: skip
        return merge_id


def plan(sc: Scenario, data: dict[str, DomainData] | None = None, *, import_gguf: bool = True) -> list[Step]:
    """Every step of the study ``sc``, dependencies first.

    ``data``: the prepared domains (:func:`prepare_data`; loaded when omitted).
    Pure apart from reading the data and, for a given base folder, hashing
    its files (a GGUF base is imported into the cache first). With
    ``import_gguf=False`` (``scenario check``) a GGUF base not imported yet is
    not: its step's key is a stand-in (:data:`NOT_IMPORTED`), so no step is
    found cached, and its ``args`` hold ``arch`` and ``import_bytes``
    (:func:`loramix.gguf_import.import_preview`).
    """
    data = prepare_data(sc) if data is None else data
    p = _Planner(sc, data, import_gguf)
    p.data_steps()
    p.base_step()
    p.eval_step("eval/base", {"base": p.key_of("base")}, (), "base", "evaluate")
    for am in sc.adapters.methods:
        for seed in sc.seeds:
            p.seed_steps(am, seed)
    return list(p.steps.values())
