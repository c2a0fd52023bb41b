"""Scenario files: a TOML schema, checked in full before any work starts.

The schema is documented with a full example in ``docs/scenarios.md``. Every
problem raises :class:`loramix.errors.ScenarioError` as one line naming the
file and the key (``scenarios/x.toml: adapters.rank: expected ...``); the CLI
turns it into exit code 2.

Paths may use ``${VAR}`` / ``$VAR`` (environment variables) and ``~``; a
relative path is taken relative to the scenario file's folder. When
``LORAMIX_DATA`` is not set it defaults to the first ``shared/data`` folder
found walking up from the scenario file's folder (``../shared/data`` seen from
the repository), else ``shared/data`` beside the scenario file.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ScenarioError, UsageError

ADAPTER_METHODS = ("lora", "d2lora")

# Merges that do not apply to a kind of adapter (the merge methods refuse them):
# svd recompresses LoRA factors; d2-signed needs D2-LoRA adapters.
NOT_APPLICABLE = {"svd": {"d2lora"}, "d2-signed": {"lora"}}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class BaseSpec:
    """A local model folder (``path``), or a recipe for ``loramix base build``."""

    path: Path | None = None
    build_data: tuple[str, ...] = ()  # data specs; empty = the domains' training data
    size: str = "tiny"
    steps: int | None = None
    seed: int = 0
    build_params: dict = field(default_factory=dict)  # extra keyword arguments (lr, batch, ...)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    data: str  # a resolved file path, or a synthetic:NAME spec
    train: int
    eval: int
    question_field: str = "question"
    answer_field: str = "answer"
    context_field: str | None = "context"

    @property
    def synthetic(self) -> bool:
        return self.data.startswith("synthetic:")


@dataclass(frozen=True)
class AdapterSpec:
    """The training recipe shared by every adapter (domain and merged-data)."""

    methods: tuple[str, ...] = ("lora",)
    rank: int = 4
    alpha: float = 64.0
    tau: float = 0.5
    targets: tuple[str, ...] | None = None
    epochs: float | None = None
    steps: int | None = None
    lr: float = 2e-4
    batch: int = 8
    max_len: int = 256
    extra: dict = field(default_factory=dict)  # warmup, weight_decay, ... passed through

    def recipe(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "tau": self.tau,
            "targets": list(self.targets) if self.targets else None,
            "epochs": self.epochs,
            "steps": self.steps,
            "lr": self.lr,
            "batch": self.batch,
            "max_len": self.max_len,
            **{k: self.extra[k] for k in sorted(self.extra)},
        }


@dataclass(frozen=True)
class MergeSpec:
    method: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method


@dataclass(frozen=True)
class EvalSpec:
    batch: int = 16
    max_len: int = 256
    on: str = "answer"


@dataclass
class Scenario:
    path: Path
    name: str
    description: str
    seeds: tuple[int, ...]
    data_seed: int
    base: BaseSpec
    domains: dict[str, DomainSpec]
    adapters: AdapterSpec
    compositions: list[tuple[str, ...]]
    merges: list[MergeSpec]
    eval: EvalSpec
    variables: dict[str, str] = field(default_factory=dict)  # variables used, resolved

    def merges_for(self, adapter_method: str) -> list[MergeSpec]:
        """The merge methods that apply to adapters of ``adapter_method``."""
        return [m for m in self.merges if adapter_method not in NOT_APPLICABLE.get(m.method, set())]


# --------------------------------------------------------------------------- helpers


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.path}: {key}" if key else self.path, problem)


def _typename(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)  # fmt: skip


def _check_keys(ctx: _Ctx, table: dict, allowed: set[str], where: str) -> None:
    for k in table:
        if k not in allowed:
            key = f"{where}.{k}" if where else k
            raise ctx.error(key, f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _get(ctx: _Ctx, table: dict, key: str, where: str, kind: str, default=None, required=False):
    """Read ``table[key]`` and check its type. ``kind``: int, float, str, bool,
    str-list, int-list. Integers are accepted where a number is expected."""
    full = f"{where}.{key}" if where else key
    if key not in table:
        if required:
            raise ctx.error(full, "missing (required)")
        return default
    v = table[key]
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": isinstance(v, str),
        "bool": isinstance(v, bool),
        "str-list": isinstance(v, list) and all(isinstance(x, str) for x in v),
        "int-list": isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    }[kind]
    if not ok:
        want = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "str-list": "a list of strings", "int-list": "a list of integers"}[kind]  # fmt: skip
        raise ctx.error(full, f"expected {want}, got {_typename(v)} {v!r}")
    if kind == "float":
        v = float(v)
        if not math.isfinite(v):
            raise ctx.error(full, f"must be finite, got {v}")
    return v


def _positive(ctx, v, key, allow_zero=False):
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise ctx.error(key, f"must be {'at least 0' if allow_zero else 'positive'}, got {v}")
    return v


def default_data_dir(scenario_dir: Path) -> Path:
    """``LORAMIX_DATA`` when unset: the first ``shared/data`` walking up from
    the scenario's folder, else ``<scenario folder>/shared/data``."""
    d = scenario_dir.resolve()
    for p in [d, *d.parents]:
        if (p / "shared" / "data").is_dir():
            return p / "shared" / "data"
    return d / "shared" / "data"


def expand(ctx: _Ctx, value: str, key: str, env: dict, used: dict) -> str:
    """Substitute ``${VAR}`` / ``$VAR`` from ``env``; an unknown variable is an error."""

    def sub(m):
        var = m.group(1) or m.group(2)
        if var not in env:
            raise ctx.error(key, f"unknown variable ${{{var}}} (not set in the environment)")
        used[var] = env[var]
        return env[var]

    return os.path.expanduser(_VAR_RE.sub(sub, value))


def _resolve_path(ctx, value: str, key: str, env: dict, used: dict) -> Path:
    p = Path(expand(ctx, value, key, env, used))
    if not p.is_absolute():
        p = ctx.path.parent / p
    return Path(os.path.normpath(p))


def _synthetic_domains() -> list[str]:
    from ..synthetic import synthetic_domains

    return sorted(synthetic_domains())


def _merge_registry() -> list[str]:
    from ..methods import available_methods

    return available_methods()


# --------------------------------------------------------------------------- sections

TOP_KEYS = {"name", "description", "seeds", "data_seed", "base", "domains", "adapters", "compositions",
            "merge", "eval"}  # fmt: skip


def _parse_base(ctx, t, env, used) -> BaseSpec:
    if not isinstance(t, dict):
        raise ctx.error("base", f"expected a table, got {_typename(t)}")
    _check_keys(ctx, t, {"path", "build"}, "base")
    if ("path" in t) == ("build" in t):
        raise ctx.error("base", "give exactly one of base.path (a model folder) or [base.build] (a recipe)")
    if "path" in t:
        raw = _get(ctx, t, "path", "base", "str")
        p = _resolve_path(ctx, raw, "base.path", env, used)
        from ..gguf_import import is_gguf

        if is_gguf(p):  # imported into the cache when the run starts
            return BaseSpec(path=p)
        if not p.is_dir():
            raise ctx.error("base.path", f"no such model folder: {p}")
        if not (p / "config.json").exists():
            raise ctx.error("base.path", f"{p} is not a Hugging Face model folder (no config.json)")
        return BaseSpec(path=p)
    b = t["build"]
    if not isinstance(b, dict):
        raise ctx.error("base.build", f"expected a table, got {_typename(b)}")
    known = {"data", "size", "steps", "seed", "lr", "batch", "max_len", "epochs"}
    _check_keys(ctx, b, known, "base.build")
    data = b.get("data", [])
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ctx.error("base.build.data", f"expected a data spec or a list of them, got {data!r}")
    specs = []
    for i, d in enumerate(data):
        if d.startswith("synthetic:"):
            specs.append(d)
        else:
            p = _resolve_path(ctx, d, f"base.build.data[{i}]", env, used)
            if not p.is_file():
                raise ctx.error(f"base.build.data[{i}]", f"no such data file: {p}")
            specs.append(str(p))
    size = _get(ctx, b, "size", "base.build", "str", "tiny")
    if size not in ("tiny", "small"):
        raise ctx.error("base.build.size", f"must be 'tiny' or 'small', got {size!r}")
    steps = _positive(ctx, _get(ctx, b, "steps", "base.build", "int"), "base.build.steps")
    seed = _get(ctx, b, "seed", "base.build", "int", 0)
    extra = {}
    for k, kind in (("lr", "float"), ("batch", "int"), ("max_len", "int"), ("epochs", "float")):
        v = _get(ctx, b, k, "base.build", kind)
        if v is not None:
            extra[k] = _positive(ctx, v, f"base.build.{k}")
    return BaseSpec(build_data=tuple(specs), size=size, steps=steps, seed=seed, build_params=extra)


def _parse_domain(ctx, name, t, env, used, synth_names) -> DomainSpec:
    where = f"domains.{name}"
    if not NAME_RE.match(name):
        raise ctx.error(where, "a domain name may hold letters, digits, '_', '.', '-'")
    if not isinstance(t, dict):
        raise ctx.error(where, f"expected a table, got {_typename(t)}")
    _check_keys(ctx, t, {"data", "train", "eval", "question", "answer", "context", "overlap",
                         "overlap_with"}, where)  # fmt: skip
    raw = _get(ctx, t, "data", where, "str", required=True)
    train = _positive(ctx, _get(ctx, t, "train", where, "int", required=True), f"{where}.train")
    ev = _positive(ctx, _get(ctx, t, "eval", where, "int", required=True), f"{where}.eval")
    qf = _get(ctx, t, "question", where, "str", "question")
    af = _get(ctx, t, "answer", where, "str", "answer")
    cf = _get(ctx, t, "context", where, "str", "context")
    overlap = _get(ctx, t, "overlap", where, "float")
    overlap_with = _get(ctx, t, "overlap_with", where, "str")
    if raw.startswith("synthetic:"):
        from ..data import parse_synthetic_spec

        try:
            spec = parse_synthetic_spec(raw)
        except Exception as e:  # DataError: bad query parameter
            raise ctx.error(f"{where}.data", getattr(e, "problem", str(e))) from None
        if spec["domain"] not in synth_names:
            raise ctx.error(f"{where}.data", f"unknown synthetic domain {spec['domain']!r}; built-in: "
                            f"{', '.join(synth_names)}")  # fmt: skip
        if overlap is not None:
            if not 0 <= overlap <= 1:
                raise ctx.error(f"{where}.overlap", f"must lie in [0, 1], got {overlap}")
            spec["overlap"] = overlap
        if overlap_with is not None:
            if overlap_with not in synth_names:
                raise ctx.error(f"{where}.overlap_with", f"unknown synthetic domain {overlap_with!r}; "
                                f"built-in: {', '.join(synth_names)}")  # fmt: skip
            spec["overlap_with"] = overlap_with
        if spec["overlap"] > 0 and not spec["overlap_with"]:
            raise ctx.error(
                f"{where}.overlap_with", "overlap > 0 needs the domain whose templates are shared"
            )
        # Generate exactly train + eval records unless the spec says n.
        n = spec["n"] if "n=" in raw else train + ev
        if n < train + ev:
            raise ctx.error(f"{where}.data", f"n={n} records cannot give train={train} + eval={ev}")
        q = f"n={n}&seed={spec['seed']}"
        if spec["overlap"] > 0:
            q += f"&overlap={spec['overlap']:g}&with={spec['overlap_with']}"
        data = f"synthetic:{spec['domain']}?{q}"
    else:
        if overlap is not None or overlap_with is not None:
            raise ctx.error(f"{where}.overlap", "overlap applies to synthetic:NAME domains only")
        p = _resolve_path(ctx, raw, f"{where}.data", env, used)
        if not p.is_file():
            hint = ""
            if "LORAMIX_DATA" in used:
                hint = " (set LORAMIX_DATA to the folder holding the QA files)"
            raise ctx.error(f"{where}.data", f"no such data file: {p}{hint}")
        data = str(p)
    return DomainSpec(name=name, data=data, train=train, eval=ev, question_field=qf, answer_field=af,
                      context_field=cf)  # fmt: skip


def _parse_adapters(ctx, t) -> AdapterSpec:
    if not isinstance(t, dict):
        raise ctx.error("adapters", f"expected a table, got {_typename(t)}")
    w = "adapters"
    known = {"methods", "method", "rank", "alpha", "tau", "targets", "epochs", "steps", "lr", "batch",
             "max_len", "warmup", "weight_decay", "grad_clip"}  # fmt: skip
    _check_keys(ctx, t, known, w)
    if "method" in t and "methods" in t:
        raise ctx.error("adapters.method", "give either adapters.method or adapters.methods")
    if "method" in t:
        methods = [_get(ctx, t, "method", w, "str")]
    else:
        methods = _get(ctx, t, "methods", w, "str-list", ["lora"])
    if not methods:
        raise ctx.error("adapters.methods", "empty: list lora and/or d2lora")
    for m in methods:
        if m not in ADAPTER_METHODS:
            raise ctx.error("adapters.methods", f"unknown adapter method {m!r}; use lora or d2lora")
    rank = _positive(ctx, _get(ctx, t, "rank", w, "int", 4), "adapters.rank")
    alpha = _positive(ctx, _get(ctx, t, "alpha", w, "float", 64.0), "adapters.alpha")
    tau = _positive(ctx, _get(ctx, t, "tau", w, "float", 0.5), "adapters.tau", allow_zero=True)
    targets = _get(ctx, t, "targets", w, "str-list")
    if targets is not None and not targets:
        raise ctx.error("adapters.targets", "empty list; leave it out for the default targets")
    epochs = _positive(ctx, _get(ctx, t, "epochs", w, "float"), "adapters.epochs")
    steps = _positive(ctx, _get(ctx, t, "steps", w, "int"), "adapters.steps")
    if epochs is not None and steps is not None:
        raise ctx.error("adapters.steps", "give adapters.epochs or adapters.steps, not both")
    if epochs is None and steps is None:
        epochs = 1.0
    lr = _positive(ctx, _get(ctx, t, "lr", w, "float", 2e-4), "adapters.lr")
    batch = _positive(ctx, _get(ctx, t, "batch", w, "int", 8), "adapters.batch")
    max_len = _positive(ctx, _get(ctx, t, "max_len", w, "int", 256), "adapters.max_len")
    if max_len < 2:
        raise ctx.error("adapters.max_len", f"must be at least 2, got {max_len}")
    extra = {}
    for k, kind in (("warmup", "int"), ("weight_decay", "float"), ("grad_clip", "float")):
        v = _get(ctx, t, k, w, kind)
        if v is not None:
            extra[k] = _positive(ctx, v, f"adapters.{k}", allow_zero=True)
    return AdapterSpec(methods=tuple(dict.fromkeys(methods)), rank=rank, alpha=alpha, tau=tau,
                       targets=tuple(targets) if targets else None, epochs=epochs, steps=steps, lr=lr,
                       batch=batch, max_len=max_len, extra=extra)  # fmt: skip


def _parse_compositions(ctx, v, domains: list[str]) -> list[tuple[str, ...]]:
    if v is None:
        v = ["all-pairs"]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise ctx.error("compositions", f"expected a list, got {_typename(v)}")
    if not v:
        raise ctx.error("compositions", "empty: list all-pairs, all-triples or sets of domains")
    out: list[tuple[str, ...]] = []
    for i, item in enumerate(v):
        key = f"compositions[{i}]"
        if isinstance(item, str):
            m = re.fullmatch(r"all-(pairs|triples|(\d+))", item)
            if not m:
                raise ctx.error(key, f"unknown composition {item!r}; use all-pairs, all-triples, all-K "
                                "or a list of domain names")  # fmt: skip
            k = {"pairs": 2, "triples": 3}.get(m.group(1)) or int(m.group(1))
            if k < 2:
                raise ctx.error(key, f"{item}: a composition needs at least 2 domains")
            if k > len(domains):
                raise ctx.error(key, f"{item} needs at least {k} domains; the scenario has {len(domains)}")
            out.extend(itertools.combinations(domains, k))
        elif isinstance(item, list):
            if not item:
                raise ctx.error(key, "empty composition: list at least 2 domains")
            for d in item:
                if not isinstance(d, str):
                    raise ctx.error(key, f"expected domain names, got {_typename(d)} {d!r}")
                if d not in domains:
                    raise ctx.error(key, f"unknown domain {d!r}; the scenario defines {', '.join(domains)}")
            if len(set(item)) != len(item):
                raise ctx.error(key, f"a domain appears twice in {item}")
            if len(item) < 2:
                raise ctx.error(key, f"composition {item} needs at least 2 domains")
            out.append(tuple(sorted(item, key=domains.index)))
        else:
            raise ctx.error(key, f"expected a string or a list of domain names, got {_typename(item)}")
    return list(dict.fromkeys(out))  # dedupe, keep order


def _method_params(name: str) -> dict[str, Any]:
    """``{toml key: Param}`` of a registered merge method (``lambda_`` is ``lambda``)."""
    from ..methods import get_method

    return {("lambda" if p.name == "lambda_" else p.name): p for p in get_method(name).params}


def _parse_merge(ctx, t, adapters: AdapterSpec, min_k: int) -> list[MergeSpec]:
    if t is None:
        return [MergeSpec("sum")]
    if not isinstance(t, dict):
        raise ctx.error("merge", f"expected a table, got {_typename(t)}")
    methods = _get(ctx, t, "methods", "merge", "str-list", ["sum"])
    if not methods:
        raise ctx.error("merge.methods", "empty: list at least sum")
    known = _merge_registry()
    for m in methods:
        if m not in known:
            raise ctx.error("merge.methods", f"unknown merge method {m!r}; available: {', '.join(known)}")
        usable = [a for a in adapters.methods if a not in NOT_APPLICABLE.get(m, set())]
        if not usable:
            raise ctx.error("merge.methods", f"{m} does not apply to {', '.join(adapters.methods)} adapters "
                            f"({m} takes {', '.join(sorted(set(ADAPTER_METHODS) - NOT_APPLICABLE[m]))})")  # fmt: skip
    if "sum" not in methods:
        # The naive sum is the study's subject (and the fit's x-y relation).
        methods = ["sum", *methods]
    for k in t:
        if k == "methods":
            continue
        if k not in known:
            raise ctx.error(f"merge.{k}", f"unknown key; allowed: methods, {', '.join(known)}")
        if k not in methods:
            raise ctx.error(f"merge.{k}", f"parameters for {k}, which is not in merge.methods")
    out = []
    for m in dict.fromkeys(methods):
        params = t.get(m, {})
        if not isinstance(params, dict):
            raise ctx.error(f"merge.{m}", f"expected a table of parameters, got {_typename(params)}")
        reg = _method_params(m)
        clean = {}
        for pk, pv in params.items():
            if pk not in reg:
                raise ctx.error(f"merge.{m}.{pk}", f"unknown parameter; {m} takes "
                                f"{', '.join(sorted(reg)) or 'none'}")  # fmt: skip
            if isinstance(pv, (bool, list, dict)) or (reg[pk].type is not str and isinstance(pv, str)):
                raise ctx.error(
                    f"merge.{m}.{pk}", f"expected {_typename(reg[pk].type())}, got {_typename(pv)} {pv!r}"
                )
            try:
                clean[pk] = reg[pk].coerce(pv)
            except UsageError as e:
                raise ctx.error(f"merge.{m}.{pk}", e.problem) from None
        for pk, p in reg.items():
            if p.required and pk not in clean:
                raise ctx.error(f"merge.{m}.{pk}", f"missing (required by {m}: {p.help})")
        if "density" in clean and not 0 < clean["density"] <= 1:
            raise ctx.error(f"merge.{m}.density", f"must lie in (0, 1], got {clean['density']}")
        if m == "svd":
            if ("rank" in clean) == ("energy" in clean):
                raise ctx.error("merge.svd", "give exactly one of rank or energy")
            if "rank" in clean and clean["rank"] > min_k * adapters.rank:
                raise ctx.error("merge.svd.rank", f"{clean['rank']} is above the stacked rank "
                                f"{min_k * adapters.rank} of the smallest composition ({min_k} x rank "
                                f"{adapters.rank})")  # fmt: skip
        out.append(MergeSpec(m, clean))
    return out


def _parse_eval(ctx, t, adapters: AdapterSpec) -> EvalSpec:
    if t is None:
        return EvalSpec(max_len=adapters.max_len)
    if not isinstance(t, dict):
        raise ctx.error("eval", f"expected a table, got {_typename(t)}")
    _check_keys(ctx, t, {"batch", "max_len", "on"}, "eval")
    batch = _positive(ctx, _get(ctx, t, "batch", "eval", "int", 16), "eval.batch")
    max_len = _positive(ctx, _get(ctx, t, "max_len", "eval", "int", adapters.max_len), "eval.max_len")
    on = _get(ctx, t, "on", "eval", "str", "answer")
    if on not in ("answer", "all"):
        raise ctx.error("eval.on", f"must be 'answer' or 'all', got {on!r}")
    return EvalSpec(batch=batch, max_len=max_len, on=on)


def load_scenario(path: str | os.PathLike, env: dict | None = None) -> Scenario:
    """Read and check a scenario file; raise :class:`ScenarioError` on any problem.

    ``env`` (default ``os.environ``) supplies ``${VAR}`` values;
    ``LORAMIX_DATA`` gets its documented default when absent.
    """
    path = Path(path)
    ctx = _Ctx(path)
    if not path.is_file():
        raise ScenarioError(path, "no such scenario file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(path, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(path, f"not UTF-8 text: {e.reason}") from None
    env = dict(os.environ if env is None else env)
    env.setdefault("LORAMIX_DATA", str(default_data_dir(path.parent)))
    used: dict[str, str] = {}

    _check_keys(ctx, raw, TOP_KEYS, "")
    name = _get(ctx, raw, "name", "", "str", required=True)
    if not NAME_RE.match(name):
        raise ctx.error("name", f"{name!r}: use letters, digits, '_', '.', '-' (it names the report folder)")
    description = _get(ctx, raw, "description", "", "str", "")
    seeds = _get(ctx, raw, "seeds", "", "int-list", [0])
    if not seeds:
        raise ctx.error("seeds", "empty: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ctx.error("seeds", f"repeated seed in {seeds}")
    data_seed = _get(ctx, raw, "data_seed", "", "int", 0)

    if "domains" not in raw:
        raise ctx.error("domains", "missing (required): define at least two [domains.NAME] tables")
    doms = raw["domains"]
    if not isinstance(doms, dict):
        raise ctx.error("domains", f"expected tables [domains.NAME], got {_typename(doms)}")
    if len(doms) < 2:
        raise ctx.error("domains", f"a composition study needs at least 2 domains, got {len(doms)}")
    synth = _synthetic_domains()
    domains = {n: _parse_domain(ctx, n, t, env, used, synth) for n, t in doms.items()}

    if "base" not in raw:
        raise ctx.error("base", "missing (required): base.path or [base.build]")
    base = _parse_base(ctx, raw["base"], env, used)
    adapters = _parse_adapters(ctx, raw.get("adapters", {}))
    compositions = _parse_compositions(ctx, raw.get("compositions"), list(domains))
    merges = _parse_merge(ctx, raw.get("merge"), adapters, min(len(c) for c in compositions))
    ev = _parse_eval(ctx, raw.get("eval"), adapters)
    return Scenario(path=path, name=name, description=description, seeds=tuple(seeds), data_seed=data_seed,
                    base=base, domains=domains, adapters=adapters, compositions=compositions,
                    merges=merges, eval=ev, variables=used)  # fmt: skip


def scenario_summary(s: Scenario) -> dict[str, Any]:
    """A JSON-able view of the checked scenario (for report.json and cache keys)."""
    return {
        "name": s.name,
        "description": s.description,
        "file": str(s.path),
        "seeds": list(s.seeds),
        "data_seed": s.data_seed,
        "base": {"path": str(s.base.path)}
        if s.base.path
        else {
            "build": {
                "data": list(s.base.build_data),
                "size": s.base.size,
                "steps": s.base.steps,
                "seed": s.base.seed,
                **s.base.build_params,
            }
        },  # fmt: skip
        "domains": {n: {"data": d.data, "train": d.train, "eval": d.eval} for n, d in s.domains.items()},
        "adapters": {"methods": list(s.adapters.methods), **s.adapters.recipe()},
        "compositions": [list(c) for c in s.compositions],
        "merge": {m.method: m.params for m in s.merges},
        "eval": {"batch": s.eval.batch, "max_len": s.eval.max_len, "on": s.eval.on},
    }
