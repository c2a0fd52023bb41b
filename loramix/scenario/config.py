"""Scenario files: a TOML schema, checked in full before any work starts.

The schema is documented with a full example in ``docs/scenarios.md``. Every
problem raises :class:`loramix.errors.ScenarioError` as one line naming the
file and the key (``scenarios/x.toml: adapters.rank: expected ...``); the CLI
turns it into exit code 2.

Paths may use ``${VAR}`` / ``$VAR`` (environment variables) and ``~``; a
relative path is taken relative to the scenario file's folder. When
``LORAMIX_DATA`` is not set it defaults to the first ``shared/data`` folder
found walking up from the scenario file's folder (``../shared/data`` seen from
the repository), else ``shared/data`` beside the scenario file; likewise
``LORAMIX_MODELS`` and ``shared/models``.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ScenarioError, UsageError
from ..options import MAX_BATCH, MAX_SEED, batch_problem, lr_problem, steps_problem
from ..synthetic import MAX_RECORDS
from .traits import ADAPTER_KINDS as ADAPTER_METHODS
from .traits import INITS, applies_to, kinds_for, parse_label, rank_of, trainable_kinds

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")

#: the most random groupings ``plan.random`` asks for: each is merged and
#: evaluated, and ``scenario check`` took ``2^62``, which a run would draw,
#: merge and evaluate one by one
MAX_GROUPINGS = 10_000

# --------------------------------------------------------------------------- the schema
#
# Each key of the file is declared once, as a dataclass field whose metadata
# (a Key) gives its TOML type, default, bound and meaning. The readers below
# take the allowed keys, the type checks and the defaults from it, and
# schema_markdown() writes the key table of docs/scenarios.md from it.


@dataclass(frozen=True)
class Key:
    """A key of the scenario file. ``kind``: int, float, str, bool, str-list,
    int-list (read and checked generically), or table / list / any (read by
    its section's parser). ``bound``: positive, nonneg, steps or nonneg-steps
    (a number of optimizer steps, or epochs, of at most
    :data:`~loramix.options.MAX_STEPS`), batch (positive, at most
    :data:`~loramix.options.MAX_BATCH`), groupings (positive, at most
    :data:`MAX_GROUPINGS`), unit ([0, 1]), open-unit
    ((0, 1)), seed or seqlen (a sequence length: at least 2, a token and the
    next to predict). ``toml``: the key's name in the file when it differs
    from the field's. ``doc_type``: the type column of docs/scenarios.md where
    the kind does not say it (a key its section's parser reads)."""

    kind: str
    help: str
    required: bool = False
    bound: str | None = None
    choices: tuple[str, ...] | None = None
    toml: str | None = None
    doc_default: str | None = None
    doc_type: str | None = None


def key(kind: str, default=None, help: str = "", **kw):
    """A dataclass field declaring one key of the file."""
    return field(default=default, metadata={"key": Key(kind, help, **kw)})


def keys_of(cls) -> dict[str, tuple[str, Key, Any]]:
    """``{toml name: (field name, Key, default)}`` of a schema dataclass."""
    from dataclasses import MISSING, fields

    out = {}
    for f in fields(cls):
        k = f.metadata.get("key")
        if k is not None:
            out[k.toml or f.name] = (f.name, k, None if f.default is MISSING else f.default)
    return out


@dataclass(frozen=True)
class BaseSpec:
    """A local model folder (``path``), or a recipe for ``loramix base build``
    (the ``[base.build]`` table, whose keys :class:`_BuildKeys` declares, read
    into ``build_data``, ``size``, ``steps``, ``seed`` and ``build_params``)."""

    path: Path | None = key("str", help="a local HF causal-LM folder (`config.json` + safetensors) or a GGUF file",
                            doc_default="—")  # fmt: skip
    build: None = key("table", help="a recipe for `loramix base build` (below); give `path` or `build`",
                      doc_default="—")  # fmt: skip
    build_data: tuple[str, ...] = ()  # data specs; empty = the domains' training data
    size: str = "tiny"
    steps: int | None = None
    seed: int = 0
    build_params: dict = field(default_factory=dict)  # extra keyword arguments (lr, batch, ...)


@dataclass(frozen=True)
class _BuildKeys:
    """``[base.build]``: its values land in :class:`BaseSpec`."""

    data: None = key("any", help="text to pre-train the base on (a path, a `synthetic:` spec, or a list)",
                     doc_default="the domains' training splits")  # fmt: skip
    size: str = key("str", "tiny", help="see `loramix base build`", choices=("tiny", "small"))
    steps: int | None = key("int", help="pre-training steps", bound="steps", doc_default="the size's")
    seed: int = key("int", 0, bound="seed", help="pre-training seed")
    lr: float | None = key("float", help="learning rate", bound="positive", doc_default="the size's")
    batch: int | None = key("int", help="windows per step", bound="batch", doc_default="the size's")
    # no max_len or epochs: loramix base build has neither (the size fixes the context,
    # --steps the length); keys the build ignored were recorded in the report all the same


@dataclass(frozen=True)
class DomainSpec:
    name: str
    data: str = key("str", required=True,
                    help="the domain's QA records: .jsonl, .json, .csv, .txt, or `synthetic:NAME[?n=&seed=]`")  # fmt: skip
    train: int = key("int", bound="positive", doc_default="required (optional with `adapter`)",
                     help="records in the training split (with `adapter`: only `[predictors]`' calibration records)")  # fmt: skip
    eval: int = key("int", required=True, bound="positive", help="records in the eval split")
    question_field: str = key("str", "question", toml="question", help="the question's field name")
    answer_field: str = key("str", "answer", toml="answer", help="the answer's field name")
    context_field: str | None = key("str", "context", toml="context",
                                    help="optional field; absent/empty = no context")  # fmt: skip
    overlap: float | None = key("float", bound="unit", doc_default="—",
                                help="synthetic only: share this fraction of templates ...")  # fmt: skip
    overlap_with: str | None = key("str", doc_default="—", help="... with this built-in domain")
    trained_on: str | None = key("str", doc_default="—",
                                 help="with `adapter`: the records it was trained on (a file or spec as `data`, the same "
                                 "fields), left out of the eval split")  # fmt: skip
    trained_on_ngram: int | None = key("int", bound="positive", doc_default="`13` (GPT-3's)",
                                       help="with `trained_on`: the word n-gram length its records are compared by "
                                       "(Contamination, below)")  # fmt: skip
    adapter: Path | None = key("str", doc_default="— (trained here)",
                               help="an adapter trained elsewhere, studied instead of training one: a local PEFT LoRA / "
                               "rsLoRA / DoRA or loramix D2-LoRA folder; in every domain or none (Adapters trained elsewhere, below)")  # fmt: skip

    @property
    def synthetic(self) -> bool:
        return self.data.startswith("synthetic:")


@dataclass(frozen=True)
class AdapterSpec:
    """The training recipe shared by every adapter (domain and merged-data)."""

    methods: tuple[str, ...] = key("str-list", ("lora",), choices=ADAPTER_METHODS, doc_default='`["lora"]`',
                                   help="adapter kinds, each a full study (or `method = \"lora\"`); `KIND@R`: that kind at rank R")  # fmt: skip
    rank: int = key("int", 4, bound="positive", help="LoRA rank")
    alpha: float = key("float", 64.0, bound="positive", help="LoRA alpha")
    tau: float = key("float", 0.5, bound="nonneg", help="D2-LoRA negative-branch weight")
    targets: tuple[str, ...] | None = key("str-list", doc_default="the architecture's",
                                          help="module-name suffixes")  # fmt: skip
    epochs: float | None = key("float", bound="steps", doc_default="`epochs = 1`", help="passes over the data; or `steps`")  # fmt: skip
    steps: int | None = key("int", bound="steps", doc_default="—", help="optimizer steps; or `epochs`")
    lr: float = key("float", 2e-4, bound="positive", help="learning rate")
    batch: int = key("int", 8, bound="positive", help="batch size")
    max_len: int = key("int", 256, bound="seqlen", help="sequence length")
    top_layers: int | None = key("int", bound="positive", doc_default="all layers",
                                 help="adapt only the top N transformer blocks (the targets inside them)")  # fmt: skip
    init: str = key("any", "data", doc_default="`data`", doc_type="string or list",
                    help="initial factors from the seed and the domain's records (`data`), or from the seed alone "
                    "(`shared`); a list of both: each a study of its own (labels `KIND:shared`)")  # fmt: skip
    extra: dict = field(default_factory=dict)  # warmup, weight_decay, ... passed through

    def recipe(self) -> dict:
        # top_layers only when set, so that the cache keys of recipes without it stay as they were.
        top = {} if self.top_layers is None else {"top_layers": self.top_layers}
        return {
            **top,
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
class _TrainerKeys:
    """Optional ``[adapters]`` keys passed to the trainer (``AdapterSpec.extra``) only when given."""

    warmup: int | None = key(
        "int", bound="nonneg-steps", doc_default="trainer default", help="warm-up steps, at most the run's"
    )
    weight_decay: float | None = key("float", bound="nonneg", doc_default="trainer default", help="AdamW weight decay")  # fmt: skip
    grad_clip: float | None = key("float", bound="nonneg", doc_default="trainer default", help="gradient-norm clip")  # fmt: skip


@dataclass(frozen=True)
class MergeSpec:
    """A merge of the study: ``method`` (a registered name) with ``params``.
    ``name``: a variant's own name (``[merge.iso-c-rms]`` with ``method =
    "iso-c"``), so one method can be studied with two sets of parameters;
    empty for the method under its own name."""

    method: str
    params: dict = field(default_factory=dict)
    name: str = ""

    @property
    def label(self) -> str:
        """What the study calls it: step ids, reports, ``predictors.json``'s ``by_method``."""
        return self.name or self.method

    def summary(self) -> dict:
        """Its ``[merge.LABEL]`` table as the report keeps it: the parameters,
        and a variant's ``method``."""
        return {**({"method": self.method} if self.name else {}), **self.params}


@dataclass(frozen=True)
class _MergeKeys:
    methods: None = key("str-list", doc_default='`["sum"]`',
                        help="any of `loramix merge`'s methods, or a variant's NAME; `sum` is always added")  # fmt: skip
    params: None = key("table", toml="METHOD", doc_default="the method's defaults",
                       help="its parameters, as `loramix merge --help` lists them (`lambda` for `--lambda`)")  # fmt: skip
    variant: None = key("table", toml="NAME", doc_default="none",
                        help="a variant: `method = \"METHOD\"` and its parameters, e.g. `iso-c-rms = { method = "
                             "\"iso-c\", flat = \"rms\" }`; NAME is its label in the report and the predictors")  # fmt: skip


@dataclass(frozen=True)
class EvalSpec:
    batch: int = key("int", 16, bound="positive", help="evaluation batch size")
    batch_tokens: int | None = key("int", bound="nonneg", doc_default="`batch` records of the domain's mean length",
                                   help="positions (records x their longest) per forward pass, at most; 0: no "
                                        "cap but `batch` (`loramix eval --batch-tokens`)")  # fmt: skip
    max_len: int = key("int", 256, bound="seqlen", doc_default="`adapters.max_len`", help="sequence length")
    on: str = key(
        "str", "answer", choices=("answer", "all"), help="perplexity over answer tokens or all tokens"
    )
    domains: str = key("str", "all", choices=("all", "members"),
                       help="evaluate each model on every domain, or only on the domains it serves "
                       "(its own; a composition's members; the base on all)")  # fmt: skip


@dataclass(frozen=True)
class PredictorSpec:
    """``[predictors]``: compute every registered feature of the domain adapters and
    validate each predictor of each interference target by leave-one-domain-out."""

    tokens: int = key(
        "int", 256, bound="positive", help="calibration tokens per domain (data-aware features)"
    )
    max_len: int = key("int", 128, bound="seqlen", help="sequence length of the calibration records")
    level: float = key("float", 0.9, bound="open-unit", help="level of the prediction intervals")
    target: str = key("str", "retention", choices=("retention", "delta_ppl", "worst"),
                      help="the target whose best predictor is saved as predictors.json (and `[plan]` "
                      "minimises): the members' mean loss, Δppl % against merged-data training, or the worst "
                      "member's loss (docs/interference.md)")  # fmt: skip
    method: str = key("str", "sum", help="... for this merge method")


@dataclass(frozen=True)
class PlanSpec:
    """``[plan]``: after the predictors step, group one seed's domain adapters of
    one label with :mod:`loramix.grouping` (what ``loramix plan`` does) on the
    study's validated predictor, evaluate the proposed groups' merges and those of
    ``random`` seeded random groupings of the same sizes (docs/scenarios.md)."""

    adapters: str | None = key("str", doc_default="the first of `adapters.methods`",
                               help="the adapter label whose domain adapters are grouped")  # fmt: skip
    seed: int | None = key("int", bound="seed", doc_default="the first of `seeds`",
                           help="the training seed whose adapters are grouped")  # fmt: skip
    max_size: int = key(
        "int", 4, bound="positive", help="largest group (`loramix plan --max-group`), at least 2"
    )
    budget: float | None = key("float", doc_default="`0`, `loramix plan`'s with a predictors file",
                               help="largest predicted cost (retention %, Δppl % or worst member %) of a merged group "
                               "(`loramix plan --budget`)")  # fmt: skip
    methods: tuple[str, ...] = key("str-list", ("plan",), doc_default='`["plan"]`',
                                   help='how the groups are merged, each a comparison of its own: `"plan"`, by '
                                   "the method `loramix plan` proposes for each (docs/predictors.md, The method; a "
                                   "random group by the same rule), or one of `merge.methods` for every group")  # fmt: skip
    random: int = key("int", 20, bound="groupings", help="random groupings with the plan's group sizes")
    random_seed: int = key("int", 0, bound="seed", help="the seed of the random groupings")


@dataclass
class Scenario:
    path: Path
    name: str = key("str", required=True, help="letters, digits, `_ . -`; the report goes to `reports/NAME`")
    description: str = key("str", "", help="copied into the report")
    seeds: tuple[int, ...] = key("int-list", (0,), doc_default="`[0]`", bound="seed",
                                 help="adapter-training seeds (init and batch order)")  # fmt: skip
    data_seed: int = key("int", 0, bound="seed",
                         help="the train/eval split; the same eval sets for every seed")  # fmt: skip
    base: BaseSpec = key("table", required=True, help="`base.path` or `[base.build]`")
    domains: dict[str, DomainSpec] = key("table", required=True, help="at least two `[domains.NAME]` tables")
    adapters: AdapterSpec = key("table", doc_default="the defaults below", help="the adapter training recipe")
    compositions: list[tuple[str, ...]] = key("list", doc_default='`["all-pairs"]`', doc_type="list or table",
                                              help='`"all-pairs"`, `"all-triples"`, `"all-K"`, or lists of '
                                              "domain names (at least 2); or the table below")  # fmt: skip
    # None: all; (N, included compositions): N pairs spanning the similarity; or a tuple of compositions.
    merged_data: tuple | None = key(
        "any", doc_default='`"all"`', doc_type="string, int, table or list",
        help='compositions that get a merged-data adapter (the `delta_ppl%` target): `"all"`, a number N '
        "(N pairs spanning the domains' data similarity, docs/scenarios.md), `{ count = N, include = [...] }` "
        "(the included pairs and N minus as many spanning ones) or lists of domain names")  # fmt: skip
    merges: list[MergeSpec] = key("table", toml="merge", doc_default="sum only", help="the merge methods")
    eval: EvalSpec = key("table", doc_default="the defaults below", help="perplexity settings")
    predictors: PredictorSpec | None = key("table", doc_default="no predictors step",
                                           help="features and validated predictors (below)")  # fmt: skip
    plan: PlanSpec | None = key("table", doc_default="no plan validation",
                                help="`loramix plan`'s groups against random groupings (below); needs `[predictors]`")  # fmt: skip
    variables: dict[str, str] = field(default_factory=dict)  # variables used, resolved

    @property
    def given(self) -> bool:
        """Whether the domains' adapters are given (trained elsewhere), not trained by the study."""
        return any(d.adapter is not None for d in self.domains.values())

    def merges_for(self, adapter_method: str) -> list[MergeSpec]:
        """The merge methods that apply to adapters of ``adapter_method``."""
        return [m for m in self.merges if applies_to(m.method, adapter_method)]

    def inputs(self) -> list[Path]:
        """The files and folders on this machine the study reads: the scenario
        file, the base, the base's pre-training data, each domain's data, its
        ``trained_on`` records and its given adapter (``synthetic:`` specs are
        made, not read). A report folder may hold none of them: it is replaced
        whole."""
        specs = [*self.base.build_data, *(x for d in self.domains.values() for x in (d.data, d.trained_on))]
        paths = [Path(s) for s in specs if s is not None and not s.startswith("synthetic:")]
        given = [d.adapter for d in self.domains.values() if d.adapter is not None]
        return [self.path, *([self.base.path] if self.base.path is not None else []), *paths, *given]


@dataclass(frozen=True)
class _CompositionKeys:
    """``[compositions]`` as a table (instead of a list)."""

    pairs: None = key(
        "any",
        doc_default="—",
        doc_type="string or list",
        help='`"all"` (every pair) or lists of two domain names',
    )
    triples: None = key("any", doc_default="—", doc_type="string or int",
                        help='`"all"`, or a number K: K triples drawn with `seed` (sorted, without repeats)')  # fmt: skip
    groups: None = key("any", doc_default="—", doc_type="table",
                       help="`{ K = N }`: N compositions of K domains drawn with `seed`, as the triples "
                       "(`{ 4 = 20, 6 = 10 }`)")  # fmt: skip
    seed: int = key("int", 0, bound="seed", help="the seed of the triples' and groups' samples")


# The file's tables, in the order docs/scenarios.md lists them.
SCHEMA = (("", Scenario), ("base", BaseSpec), ("base.build", _BuildKeys), ("domains.NAME", DomainSpec),
          ("adapters", AdapterSpec), ("adapters", _TrainerKeys), ("compositions", _CompositionKeys),
          ("merge", _MergeKeys), ("eval", EvalSpec), ("predictors", PredictorSpec), ("plan", PlanSpec))  # fmt: skip


_DOC_TYPES = {"int": "int", "float": "number", "str": "string", "bool": "bool", "str-list": "list of string",
              "int-list": "list of int", "table": "table", "list": "list", "any": "path/spec or list"}  # fmt: skip
_DOC_BOUNDS = {"positive": " > 0", "nonneg": " ≥ 0", "steps": " in (0, 10^9]", "nonneg-steps": " in [0, 10^9]", "unit": " in [0, 1]", "open-unit": " in (0, 1)",
               "seed": " in [0, 2^63 - 1]", "seqlen": " ≥ 2", "batch": f" in [1, {MAX_BATCH}]",
               "groupings": f" in [1, {MAX_GROUPINGS:,}]"}  # fmt: skip


def schema_markdown() -> str:
    """The key table of docs/scenarios.md, from the schema."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for where, cls in SCHEMA:
        for name, (_, k, default) in keys_of(cls).items():
            full = f"{where}.{name}" if where else name
            if k.required:
                dflt = "required"
            elif k.doc_default is not None:
                dflt = k.doc_default
            else:
                dflt = f"`{default}`"
            typ = " / ".join(f"`{c}`" for c in k.choices) if k.choices else k.doc_type or _DOC_TYPES[k.kind]
            rows.append(f"| `{full}` | {typ}{_DOC_BOUNDS.get(k.bound, '')} | {dflt} | {k.help} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- helpers


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, path: Path, import_gguf: bool = True):
        self.path = path
        self.import_gguf = import_gguf  # False: a GGUF base not imported yet is read from its header

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


# What a run can do, checked before it starts: seeds are 64-bit, a synthetic
# domain generates at most MAX_SYNTHETIC_RECORDS records (more takes minutes
# and teaches nothing new), and a rank is at most min(out, in) of every
# targeted weight (MAX_RANK where the base's shapes cannot tell).
MAX_SYNTHETIC_RECORDS = MAX_RECORDS
MAX_RANK = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_seeds(ctx, v, key: str) -> None:
    for s in v if isinstance(v, (list, tuple)) else [v]:
        if not 0 <= s <= MAX_SEED:
            raise ctx.error(key, f"{s} is not a seed: seeds are integers in [0, 2^63 - 1]")


def _base_weights(ctx, base) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """``(model_type, {module: weight shape})`` of the base's 2-D weights, from
    its safetensors headers (a folder; its tokenizer checked too) or from the
    recipe (a GPT-2 of the size's width), without loading a weight."""
    if base.path is None:
        from ..basebuild import SIZES

        cfg, d = SIZES[base.size], SIZES[base.size].n_embd
        shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
                  "mlp.c_proj": (4 * d, d)}  # fmt: skip
        return "gpt2", {f"transformer.h.{i}.{m}": s for i in range(cfg.n_layer) for m, s in shapes.items()}
    from ..errors import LoramixError
    from ..gguf_import import import_preview, imported_base, is_gguf, resolve_base
    from ..io.model_folder import BaseModelFolder

    if not ctx.import_gguf and is_gguf(base.path) and imported_base(base.path) is None:
        try:  # scenario check: the header says what the import would hold, nothing imported
            preview = import_preview(base.path)
        except LoramixError as e:
            raise ctx.error("base.path", e.message) from None
        if not preview["tokenizer"]:
            raise ctx.error("base.path", f"{base.path} has no tokenizer (tokenizer.ggml.model), "
                            "which training and evaluation need")  # fmt: skip
        return preview["model_type"], preview["weights"]
    path = resolve_base(base.path)  # a GGUF: its import (made once, as the run would)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ctx.error("base.path", f"{base.path} has no tokenizer ({', '.join(TOKENIZER_FILES)}), "
                        "which training and evaluation need")  # fmt: skip
    try:
        folder = BaseModelFolder(path)
        check_heads(folder)
    except LoramixError as e:
        raise ctx.error("base.path", e.message) from None
    weights = {k.removesuffix(".weight"): t.shape for k, t in folder.tensors.items()
               if k.endswith(".weight") and len(t.shape) == 2}  # fmt: skip
    return folder.config.get("model_type"), weights


def check_heads(folder) -> None:
    """Refuse a base whose ``config.json`` describes attention that cannot be
    built (:func:`loramix.models.head_problem`), or heads whose ``head_dim``
    does not fit the attention weights (:func:`loramix.models.head_size_problem`,
    from the headers) where a study reads it: its
    evaluations build the model, which ``eval`` and ``train`` refuse, so
    ``scenario check`` does too, not the run's first evaluation."""
    from ..errors import BaseModelError
    from ..models import head_problem, head_size_problem

    if (why := head_problem(folder.config)) is not None:
        raise BaseModelError(folder.path / "config.json", why)
    shapes = {k: t.shape for k, t in folder.tensors.items()}
    names = "model.safetensors.index.json" if folder.sharded else "model.safetensors"
    if (why := head_size_problem(folder.config, shapes, names)) is not None:
        raise BaseModelError(folder.path / "config.json", why)


def _check_fit(ctx, base, adapters) -> None:
    """The targets name weights of the base, and the rank is at most
    ``min(out, in)`` of each targeted weight (:data:`MAX_RANK` when the
    default targets of an unknown architecture leave the shapes unknown)."""
    from ..archs import arch

    model_type, weights = _base_weights(ctx, base)
    known = arch(model_type)
    targets = adapters.targets or (known.targets if known and known.targets else None)
    hits = {t: [n for n in weights if n == t or n.endswith("." + t)] for t in targets or ()}
    for t, names in hits.items():
        if not names and adapters.targets:
            raise ctx.error("adapters.targets", f"{t!r} names no 2-D weight of the base ({model_type})")
    dims = [min(weights[n]) for names in hits.values() for n in names]
    bound, why = MAX_RANK, "the limit"
    if dims:
        bound, why = min(dims), "the smallest dimension of a targeted weight"
    rank = max(rank_of(m, adapters.rank) for m in adapters.methods)  # KIND@R labels train at R
    if rank > bound:
        raise ctx.error("adapters.rank", f"{rank} is above {bound}, {why}")
    blocks = {int(m.group(1)) for n in weights for m in [re.search(r"\.(\d+)\.", n)] if m}
    if adapters.top_layers and blocks and adapters.top_layers > max(blocks) + 1:
        raise ctx.error(
            "adapters.top_layers", f"{adapters.top_layers} is above the base's {max(blocks) + 1} blocks"
        )


def _read(ctx: _Ctx, cls, t: dict, where: str, *, also=(), defaults=None) -> dict:
    """Check ``t``'s keys against the schema of ``cls`` (plus ``also``) and read
    its scalar keys: ``{field name: value}``, the default where absent, each
    checked for its type, bound and choices. Tables and lists are left to
    the section's parser."""
    out = {}
    keys = keys_of(cls)
    _check_keys(ctx, t, set(keys) | set(also), where)
    for name, (fname, k, default) in keys.items():
        if k.kind in ("table", "list", "any"):
            continue
        full = f"{where}.{name}" if where else name
        v = _get(ctx, t, name, where, k.kind, (defaults or {}).get(fname, default), required=k.required)
        if v is not None and k.bound in ("positive", "nonneg", "steps", "nonneg-steps", "batch", "groupings"):
            _positive(ctx, v, full, allow_zero=k.bound.startswith("nonneg"))
        if v is not None and k.bound == "batch" and (why := batch_problem(v)):
            raise ctx.error(full, why)
        if v is not None and k.bound == "groupings" and v > MAX_GROUPINGS:
            raise ctx.error(full, f"{v:,} is more than {MAX_GROUPINGS:,} random groupings, each merged and "
                            "evaluated (a typo?)")  # fmt: skip
        if (
            v is not None
            and k.bound in ("steps", "nonneg-steps")
            and (why := steps_problem(v, "epochs" if name == "epochs" else "steps"))
        ):
            raise ctx.error(full, why)
        if v is not None and k.bound == "seqlen" and v < 2:
            # what encode_records refuses (as --max-len) when the run reaches the step
            raise ctx.error(full, f"must be at least 2, got {v}")
        if v is not None and k.bound == "seed":
            _check_seeds(ctx, v, full)
        if v is not None and k.bound == "unit" and not 0 <= v <= 1:
            raise ctx.error(full, f"must lie in [0, 1], got {v}")
        if v is not None and k.bound == "open-unit" and not 0 < v < 1:
            raise ctx.error(full, f"must lie strictly between 0 and 1, got {v}")
        if k.choices and k.kind == "str" and v not in k.choices:
            raise ctx.error(full, f"must be {' or '.join(repr(c) for c in k.choices)}, got {v!r}")
        out[fname] = v
    return out


def default_data_dir(scenario_dir: Path, name: str = "data") -> Path:
    """``LORAMIX_DATA`` when unset: the first ``shared/data`` walking up from
    the scenario's folder, else ``<scenario folder>/shared/data``
    (``LORAMIX_MODELS``: the same with ``name = "models"``)."""
    d = scenario_dir.resolve()
    for p in [d, *d.parents]:
        if (p / "shared" / name).is_dir():
            return p / "shared" / name
    return d / "shared" / name


def expand(ctx: _Ctx, value: str, key: str, env: dict, used: dict) -> str:
    """Substitute ``${VAR}`` / ``$VAR`` from ``env``; an unknown variable is an error."""

    def sub(m):
        var = m.group(1) or m.group(2)
        if var not in env:
            raise ctx.error(key, f"unknown variable ${{{var}}} (not set in the environment)")
        used[var] = env[var]
        return env[var]

    from ..userpaths import expand_home

    return expand_home(_VAR_RE.sub(sub, value))


def _resolve_path(ctx, value: str, key: str, env: dict, used: dict) -> Path:
    p = Path(expand(ctx, value, key, env, used))
    if not p.is_absolute():
        p = ctx.path.parent / p
    return Path(os.path.normpath(p))


def _var_hint(raw: str, var: str, what: str) -> str:
    """The hint to set ``var`` for a missing path whose value ``raw`` names it
    (not for one that another key's value took from it)."""
    return f" (set {var} to the folder holding {what})" if re.search(rf"\$\{{?{var}\b", raw) else ""


def _given_path(ctx, raw: str, key: str, env: dict, used: dict) -> Path:
    """``domains.NAME.adapter``: an existing adapter folder (or its ``.safetensors`` file)."""
    p = _resolve_path(ctx, raw, key, env, used)
    if not p.exists():
        raise ctx.error(key, f"no such adapter folder: {p}")
    return p


def _synthetic_domains() -> list[str]:
    from ..synthetic import synthetic_domains

    return sorted(synthetic_domains())


def _get_method(name: str):
    from ..methods import get_method

    return get_method(name)


def _merge_registry() -> list[str]:
    from ..methods import available_methods

    return available_methods()


# --------------------------------------------------------------------------- sections


def _parse_base(ctx, t, env, used) -> BaseSpec:
    if not isinstance(t, dict):
        raise ctx.error("base", f"expected a table, got {_typename(t)}")
    _check_keys(ctx, t, set(keys_of(BaseSpec)), "base")
    if ("path" in t) == ("build" in t):
        raise ctx.error("base", "give exactly one of base.path (a model folder) or [base.build] (a recipe)")
    if "path" in t:
        raw = _get(ctx, t, "path", "base", "str")
        p = _resolve_path(ctx, raw, "base.path", env, used)
        from ..errors import LoramixError
        from ..gguf_import import check_gguf_file, means_gguf

        if means_gguf(p):  # imported into the cache when the run starts
            try:  # a .gguf name that is no GGUF file: refused as one, as every command refuses it
                check_gguf_file(p)
            except LoramixError as e:
                raise ctx.error("base.path", e.message) from None
            return BaseSpec(path=p)
        if os.path.lexists(p) and not p.is_dir():  # a file: it was said to be missing
            raise ctx.error("base.path", f"{p} is not a folder: a base is a Hugging Face model folder "
                            "(config.json + model.safetensors) or a .gguf file")  # fmt: skip
        if not p.is_dir():
            raise ctx.error("base.path", f"no such model folder: {p}{_var_hint(raw, 'LORAMIX_MODELS', 'it')}")
        if not (p / "config.json").exists():
            # an adapter folder given as the base (the two paths swapped): say what it holds
            held = (
                "; it holds an adapter (adapter_config.json), not its base"
                if (p / "adapter_config.json").exists()
                else ""
            )
            raise ctx.error("base.path", f"{p} is not a Hugging Face model folder (no config.json){held}")
        return BaseSpec(path=p)
    b = t["build"]
    if not isinstance(b, dict):
        raise ctx.error("base.build", f"expected a table, got {_typename(b)}")
    v = _read(ctx, _BuildKeys, b, "base.build")
    if v["lr"] is not None and (why := lr_problem(v["lr"])) is not None:
        raise ctx.error("base.build.lr", why[1])
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
    extra = {k: v[k] for k in ("lr", "batch") if v[k] is not None}
    return BaseSpec(
        build_data=tuple(specs), size=v["size"], steps=v["steps"], seed=v["seed"], build_params=extra
    )


def _parse_domain(ctx, name, t, env, used, synth_names) -> DomainSpec:
    where = f"domains.{name}"
    if not NAME_RE.match(name):
        raise ctx.error(where, "a domain name may hold letters, digits, '_', '.', '-'")
    if not isinstance(t, dict):
        raise ctx.error(where, f"expected a table, got {_typename(t)}")
    v = _read(ctx, DomainSpec, t, where)
    if v["adapter"] is not None:
        v["adapter"] = _given_path(ctx, v["adapter"], f"{where}.adapter", env, used)
        v["train"] = v["train"] or 0  # nothing is trained: records only [predictors]' calibration reads
    elif v["train"] is None:
        raise ctx.error(f"{where}.train", "missing (required)")
    if v["trained_on"] is not None:
        if v["adapter"] is None:
            raise ctx.error(f"{where}.trained_on", "only with adapter: a study that trains draws its train and eval "
                            "splits apart itself")  # fmt: skip
        if not v["trained_on"].startswith("synthetic:"):
            p = _resolve_path(ctx, v["trained_on"], f"{where}.trained_on", env, used)
            if not p.is_file():
                raise ctx.error(f"{where}.trained_on", f"no such data file: {p}")
            v["trained_on"] = str(p)
    elif v["trained_on_ngram"] is not None:  # else ignored, and taken for a check that ran
        raise ctx.error(
            f"{where}.trained_on_ngram", "only with trained_on: the n of the check of its records"
        )
    raw, train, ev, overlap, overlap_with = v["data"], v["train"], v["eval"], v["overlap"], v["overlap_with"]
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
        _check_seeds(ctx, spec["seed"], f"{where}.data")
        if n > MAX_SYNTHETIC_RECORDS:
            raise ctx.error(f"{where}.train", f"a synthetic domain makes at most {MAX_SYNTHETIC_RECORDS} "
                            f"records; train + eval (or n) asks for {n}")  # fmt: skip
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
        if p.is_dir():  # it was said to be missing
            raise ctx.error(f"{where}.data", f"{p} is a folder, expected a .jsonl, .json, .csv or .txt file")
        if not p.is_file():
            hint = _var_hint(raw, "LORAMIX_DATA", "the QA files")
            raise ctx.error(f"{where}.data", f"no such data file: {p}{hint}")
        data = str(p)
    return DomainSpec(name=name, **{**v, "data": data})


def _parse_adapters(ctx, t) -> AdapterSpec:
    if not isinstance(t, dict):
        raise ctx.error("adapters", f"expected a table, got {_typename(t)}")
    w = "adapters"
    trainer = {k: t[k] for k in keys_of(_TrainerKeys) if k in t}
    v = _read(ctx, AdapterSpec, {k: x for k, x in t.items() if k not in trainer}, w,
              also=("method", *keys_of(_TrainerKeys)))  # fmt: skip
    if "method" in t and "methods" in t:
        raise ctx.error("adapters.method", "give either adapters.method or adapters.methods")
    if "method" in t:
        v["methods"] = [_get(ctx, t, "method", w, "str")]
    kinds = trainable_kinds()
    if not v["methods"]:
        raise ctx.error("adapters.methods", f"empty: list any of {', '.join(kinds)}")
    for m in v["methods"]:
        kind, r, init = parse_label(m)
        if kind not in kinds:
            raise ctx.error("adapters.methods", f"unknown adapter method {m!r}; use {' or '.join(kinds)}")
        if r is not None and not (r.isascii() and r.isdigit() and int(r) > 0):
            raise ctx.error("adapters.methods", f"{m!r}: write KIND@R with a positive rank R (e.g. lora@16)")
        if init is not None and init not in INITS:
            raise ctx.error("adapters.methods", f"{m!r}: write KIND:INIT with INIT one of {', '.join(INITS)}")
    _no_repeats(ctx, "adapters.methods", v["methods"], meaning=_canonical_label)
    _check_scales(ctx, v)
    inits = t.get("init", "data")
    inits = [inits] if isinstance(inits, str) else inits
    if (
        not isinstance(inits, list)
        or not inits
        or any(i not in INITS for i in inits)
        or len(set(inits)) < len(inits)
    ):
        raise ctx.error(
            "adapters.init", f'expected "data", "shared" or a list of both, got {t.get("init")!r}'
        )
    v["init"] = inits[0]  # the labels without ":INIT"; each further one is a study of its own
    v["methods"] = tuple(
        dict.fromkeys(m if i == inits[0] else f"{m}:{i}" for i in inits for m in v["methods"])
    )
    if v["targets"] is not None and not v["targets"]:
        raise ctx.error("adapters.targets", "empty list; leave it out for the default targets")
    v["targets"] = tuple(v["targets"]) if v["targets"] else None
    if v["epochs"] is not None and v["steps"] is not None:
        raise ctx.error("adapters.steps", "give adapters.epochs or adapters.steps, not both")
    if v["epochs"] is None and v["steps"] is None:
        v["epochs"] = 1.0
    extra = {k: x for k, x in _read(ctx, _TrainerKeys, trainer, w).items() if x is not None}
    if (why := lr_problem(v["lr"], extra.get("weight_decay"))) is not None:
        raise ctx.error(f"adapters.{why[0]}", why[1])
    if "warmup" in extra and v["steps"] is not None and extra["warmup"] > v["steps"]:
        # epochs: the step count is known when the domain's data is read, and the trainer refuses it then
        raise ctx.error("adapters.warmup", f"{extra['warmup']} steps is more than adapters.steps = {v['steps']}: "
                        "the learning rate would never reach adapters.lr")  # fmt: skip
    return AdapterSpec(**v, extra=extra)


def _check_scales(ctx, v: dict) -> None:
    """What training refuses only when the run reaches it (``--alpha``,
    ``--tau``): a scale ``alpha / r`` outside float32's range for the rank of
    any label (``KIND@R`` too), where deltas are computed (beyond it inf; below
    it the adapter is refused when read), and a ``tau`` beyond it."""
    from ..io.config_schema import FLOAT32_MAX, FLOAT32_TINY

    for r in sorted({rank_of(m, v["rank"]) for m in v["methods"]}):
        if not FLOAT32_TINY <= v["alpha"] / r <= FLOAT32_MAX:
            raise ctx.error("adapters.alpha", f"{v['alpha']:g} / rank {r} = {v['alpha'] / r:.3g} is outside "
                            "float32's range [1.2e-38, 3.4e38], in which the adapters' deltas are computed")  # fmt: skip
    if v["tau"] > FLOAT32_MAX:
        raise ctx.error("adapters.tau", f"{v['tau']:g} is beyond float32's range (3.4e38), in which D2-LoRA's deltas are computed")  # fmt: skip


def _composition_table(ctx, t: dict, domains: list[str]) -> list:
    """``[compositions]`` as a table: its pairs and seeded samples of triples
    and larger groups, returned in the list form that :func:`_parse_compositions` reads.
    Each size's sample is drawn with its own ``random.Random(seed)``, so adding
    a size leaves the others' samples as they were."""
    v = _read(ctx, _CompositionKeys, t, "compositions")
    out: list = []
    pairs, triples, groups = t.get("pairs"), t.get("triples"), t.get("groups")
    if pairs is None and triples is None and groups is None:
        raise ctx.error(
            "compositions", "give compositions.pairs, compositions.triples and/or compositions.groups"
        )
    if pairs == "all":
        out.append("all-pairs")
    elif isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs):
        out.extend(pairs)
    elif pairs is not None:
        raise ctx.error("compositions.pairs", f'expected "all" or lists of two domain names, got {pairs!r}')
    if triples == "all":
        out.append("all-triples")
    elif isinstance(triples, int) and not isinstance(triples, bool):
        out.extend(_sample(ctx, "compositions.triples", domains, 3, triples, v["seed"]))
    elif triples is not None:
        raise ctx.error("compositions.triples", f'expected "all" or a number of triples, got {triples!r}')
    if groups is not None:
        if not isinstance(groups, dict) or not groups:
            raise ctx.error("compositions.groups", f"expected a table {{ K = N }} (N groups of K domains), got {groups!r}")  # fmt: skip
        for size, n in groups.items():
            key = f"compositions.groups.{size}"
            if not re.fullmatch(r"[0-9]+", size) or int(size) < 2:
                raise ctx.error(key, f"the key is a group size, a whole number >= 2; got {size!r}")
            if int(size) == 3 and triples is not None:
                raise ctx.error(
                    key, "triples are sampled twice: give compositions.triples or groups.3, not both"
                )
            if int(size) > len(domains):
                raise ctx.error(
                    key, f"groups of {size} need at least {size} domains; the scenario has {len(domains)}"
                )
            if not isinstance(n, int) or isinstance(n, bool):
                raise ctx.error(key, f"expected a number of groups, got {n!r}")
            out.extend(_sample(ctx, key, domains, int(size), n, v["seed"]))
    return out


def _sample(ctx, key: str, domains: list[str], k: int, n: int, seed: int) -> list[list[str]]:
    """``n`` of the combinations of ``k`` domains, drawn with ``random.Random(seed)``,
    in the combinations' order. Drawn by index (the same draw as sampling the
    listed combinations), so ``C(len(domains), k)`` is never listed."""
    total = math.comb(len(domains), k)
    if not 1 <= n <= total:
        raise ctx.error(
            key, f"must be between 1 and {total} (all groups of {k} of {len(domains)} domains), got {n}"
        )
    return [_combination(domains, k, i) for i in sorted(random.Random(seed).sample(range(total), n))]


def _combination(items: list[str], k: int, index: int) -> list[str]:
    """The ``index``-th ``k``-combination of ``items`` in ``itertools.combinations``' order."""
    out, start = [], 0
    for left in range(k, 0, -1):
        for i in range(start, len(items)):
            c = math.comb(len(items) - i - 1, left - 1)
            if index < c:
                out.append(items[i])
                start = i + 1
                break
            index -= c
    return out


def _parse_compositions(ctx, v, domains: list[str]) -> list[tuple[str, ...]]:
    if v is None:
        v = ["all-pairs"]
    if isinstance(v, dict):
        v = _composition_table(ctx, v, domains)
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


def _parse_merged_data(ctx, v, compositions: list[tuple[str, ...]], domains: list[str]):
    """``merged_data``: None (every composition), a number of pairs, or a tuple of compositions."""
    if v is None or v == "all":
        return None
    n_pairs = sum(1 for c in compositions if len(c) == 2)
    if isinstance(v, dict):  # { count = N, include = [[a, b], ...] }
        _check_keys(ctx, v, {"count", "include"}, "merged_data")
        n = _get(ctx, v, "count", "merged_data", "int", required=True)
        include = _parse_merged_data(ctx, v.get("include", []) or "all", compositions, domains) or ()
        if not len(include) <= n <= n_pairs:
            raise ctx.error("merged_data.count", f"must be between {len(include)} (the included) and the "
                            f"study's {n_pairs} pairs, got {n}")  # fmt: skip
        return (n, include)
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= n_pairs:
            raise ctx.error("merged_data", f"must be between 1 and the study's {n_pairs} pairs, got {v}")
        return (v, ())
    if not isinstance(v, list) or not v:
        raise ctx.error("merged_data", f'expected "all", a number of pairs, a table or lists of domain names, '
                        f"got {v!r}")  # fmt: skip
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, list) or any(d not in domains for d in item):
            raise ctx.error(
                f"merged_data[{i}]", f"expected a list of the scenario's domain names, got {item!r}"
            )
        comp = tuple(sorted(item, key=domains.index))
        if comp not in compositions:
            raise ctx.error(f"merged_data[{i}]", f"{'+'.join(comp)} is not one of the study's compositions")
        out.append(comp)
    return tuple(dict.fromkeys(out))


def _method_params(name: str) -> dict[str, Any]:
    """``{toml key: Param}`` of a registered merge method (``lambda_`` is ``lambda``)."""
    from ..methods import params_of

    return params_of(name)


def _no_repeats(ctx, where: str, items, meaning=None) -> None:
    """A list of methods or seeds names each once: a repeat is refused (it
    is a typo or a copy left in, and would not run twice). ``meaning`` maps
    an entry to what it stands for (``lora@04`` is ``lora@4``). Compositions
    differ: they are sets of domains, so one written twice, in another order
    or also covered by all-pairs is one composition."""
    seen = set()
    for x in items:
        k = x if meaning is None else meaning(x)
        if k in seen:
            raise ctx.error(where, f"{x!r} is listed twice in {list(items)}")
        seen.add(k)


def _canonical_label(label: str):
    """An adapter label as what it means: ``lora@04`` and ``lora@4`` are one."""
    kind, r, init = parse_label(label)
    return kind, None if r is None else int(r), init  # r: checked digits


#: A variant's name: a step id's and a model column's part (``merge:NAME:a+b``), so no ``/`` or ``:``.
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: What a group's method can also be in a plan's comparison (:mod:`.planval`).
_RESERVED_NAMES = ("plan", "keep")


def _parse_merge(ctx, t, adapters: AdapterSpec, stacked: tuple[int, str]) -> list[MergeSpec]:
    """``[merge]``: ``methods``, each a registered method or a variant
    (``[merge.NAME]`` with ``method = "METHOD"`` and that method's
    parameters), and each one's parameters. ``stacked``: the smallest
    composition's stacked rank and how it is made (``"2 x rank 4"``), the
    bound of a low-rank merge's ``rank``."""
    if t is None:
        return [MergeSpec("sum")]
    if not isinstance(t, dict):
        raise ctx.error("merge", f"expected a table, got {_typename(t)}")
    methods = _get(ctx, t, "methods", "merge", "str-list", ["sum"])
    if not methods:
        raise ctx.error("merge.methods", "empty: list at least sum")
    _no_repeats(ctx, "merge.methods", methods)
    from ..methods import explicit_params

    known = _merge_registry()
    variants = {k: v for k, v in t.items() if k not in known and isinstance(v, dict) and "method" in v}
    for m in methods:
        if m not in known and m not in variants:
            raise ctx.error("merge.methods", f"unknown merge method {m!r}; available: {', '.join(known)}, or a "
                            f'variant: [merge.{m}] with method = "METHOD" and its parameters')  # fmt: skip
    if "sum" not in methods:
        # The naive sum is the study's subject (and the fit's x-y relation).
        methods = ["sum", *methods]
    for k in t:
        if k == "methods":
            continue
        if k not in known and k not in variants:
            raise ctx.error(f"merge.{k}", f"unknown key; allowed: methods, a merge method's name "
                            f'({", ".join(known)}), or a variant\'s name with method = "METHOD"')  # fmt: skip
        if k not in methods:
            raise ctx.error(f"merge.{k}", f"parameters for {k}, which is not in merge.methods")
    out, seen = [], {}
    for label in methods:
        params = t.get(label, {})
        where = f"merge.{label}"
        if not isinstance(params, dict):
            raise ctx.error(where, f"expected a table of parameters, got {_typename(params)}")
        if label in variants:
            m = params["method"]
            if not isinstance(m, str) or m not in known:
                raise ctx.error(
                    f"{where}.method", f"unknown merge method {m!r}; available: {', '.join(known)}"
                )
            if not _VARIANT_NAME.fullmatch(label) or label in _RESERVED_NAMES:
                raise ctx.error(where, "a variant's name is letters, digits, '.', '_' and '-', starting with a "
                                f"letter or digit, and not {' or '.join(_RESERVED_NAMES)}")  # fmt: skip
            params = {k: v for k, v in params.items() if k != "method"}
        else:
            m = label
            if "method" in params:
                raise ctx.error(f"{where}.method", f"{label} is a merge method's own name; give its variant "
                                "another name")  # fmt: skip
        usable = [a for a in adapters.methods if applies_to(m, a)]
        if not usable:
            raise ctx.error("merge.methods", f"{label} does not apply to {', '.join(adapters.methods)} adapters "
                            f"({m} takes {', '.join(sorted(kinds_for(m)))})")  # fmt: skip
        clean = _merge_params(ctx, where, m, params, stacked)
        same = (m, tuple(sorted(explicit_params(m, clean).items())))
        if same in seen:
            raise ctx.error(where, f"merges as {seen[same]} does (the method {m} with the same parameters)")
        seen[same] = label
        out.append(MergeSpec(m, clean, "" if label == m else label))
    return out


def _merge_params(ctx, where: str, m: str, params: dict, stacked: tuple[int, str]) -> dict:
    """``params`` of merge method ``m`` coerced and checked as ``loramix merge`` checks them."""
    reg = _method_params(m)
    clean = {}
    for pk, pv in params.items():
        if pk not in reg:
            raise ctx.error(f"{where}.{pk}", f"unknown parameter; {m} takes "
                            f"{', '.join(sorted(reg)) or 'none'}")  # fmt: skip
        if isinstance(pv, (bool, list, dict)) or (reg[pk].type is not str and isinstance(pv, str)):
            raise ctx.error(
                f"{where}.{pk}", f"expected {_typename(reg[pk].type())}, got {_typename(pv)} {pv!r}"
            )
        try:
            clean[pk] = reg[pk].coerce(pv)
        except UsageError as e:
            raise ctx.error(f"{where}.{pk}", e.problem) from None
    for pk, p in reg.items():
        if p.required and pk not in clean:
            raise ctx.error(f"{where}.{pk}", f"missing (required by {m}: {p.help})")
    try:  # the method's own checks, as `loramix merge` runs them (no adapters yet)
        _get_method(m).validate(clean, [])
    except UsageError as e:
        raise ctx.error(where, e.problem) from None
    if "rank" in clean and clean["rank"] > stacked[0]:
        raise ctx.error(f"{where}.rank", f"{clean['rank']} is above the stacked rank "
                        f"{stacked[0]} of the smallest composition ({stacked[1]})")  # fmt: skip
    return clean


def _parse_eval(ctx, t, adapters: AdapterSpec) -> EvalSpec:
    if t is None:
        return EvalSpec(max_len=adapters.max_len)
    if not isinstance(t, dict):
        raise ctx.error("eval", f"expected a table, got {_typename(t)}")
    return EvalSpec(**_read(ctx, EvalSpec, t, "eval", defaults={"max_len": adapters.max_len}))


def _parse_predictors(ctx, t, merges: list[MergeSpec]) -> PredictorSpec | None:
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ctx.error("predictors", f"expected a table, got {_typename(t)}")
    p = PredictorSpec(**_read(ctx, PredictorSpec, t, "predictors"))
    if p.method not in [m.label for m in merges]:
        raise ctx.error("predictors.method", f"{p.method!r} is not in merge.methods")
    return p


def _parse_plan(
    ctx, t, sc_seeds, adapters: AdapterSpec, merges: list[MergeSpec], predictors
) -> PlanSpec | None:
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ctx.error("plan", f"expected a table, got {_typename(t)}")
    v = _read(ctx, PlanSpec, t, "plan")
    if predictors is None:
        raise ctx.error("plan", "needs [predictors]: the plan's cost is the study's validated predictor")
    v["adapters"] = v["adapters"] or adapters.methods[0]
    if v["adapters"] not in adapters.methods:
        raise ctx.error("plan.adapters", f"{v['adapters']!r} is not one of the study's adapter labels "
                        f"({', '.join(adapters.methods)})")  # fmt: skip
    v["seed"] = sc_seeds[0] if v["seed"] is None else v["seed"]
    if v["seed"] not in sc_seeds:
        raise ctx.error("plan.seed", f"{v['seed']} is not one of the study's seeds {list(sc_seeds)}")
    if v["max_size"] < 2:
        raise ctx.error(
            "plan.max_size", f"must be at least 2 (a group of one merges nothing), got {v['max_size']}"
        )
    usable = [m.label for m in merges if applies_to(m.method, v["adapters"])]
    if not v["methods"]:
        raise ctx.error("plan.methods", 'empty: list "plan" and/or merge methods')
    for m in v["methods"]:
        if m != "plan" and m not in usable:
            raise ctx.error("plan.methods", f'expected "plan" or one of merge.methods for {v["adapters"]} '
                            f"({', '.join(usable)}), got {m!r}")  # fmt: skip
    v["methods"] = tuple(dict.fromkeys(v["methods"]))
    return PlanSpec(**v)


# [adapters] and the merged-data adapters are the training recipe: nothing is trained
# with given adapters. (base.build too: given adapters were trained on a base of their own.)
_NOT_WITH_GIVEN = {
    "adapters": "[adapters] is a training recipe, and nothing is trained: remove it",
    "merged_data": "a merged-data adapter needs the given adapters' training recipe, which is unknown: remove "
    "merged_data",
}


def _given_domains(ctx, raw: dict, domains: dict, base: BaseSpec):
    """With ``adapter`` in every domain: ``(kind, {domain: rank})``, the
    adapters read and checked against the base (:func:`.given.check_given`),
    and the keys that would mean training refused; None with none. Some but
    not all is refused."""
    have = [n for n, d in domains.items() if d.adapter is not None]
    if not have:
        return None
    if len(have) < len(domains):
        miss = next(n for n in domains if n not in have)
        raise ctx.error(f"domains.{miss}.adapter", f"missing: give every domain its adapter or none "
                        f"(domains {', '.join(have)} give one; a study does not mix given and trained adapters)")  # fmt: skip
    for k, why in _NOT_WITH_GIVEN.items():
        if k in raw:
            raise ctx.error(k, f"the domains' adapters are given (domains.*.adapter): {why}")
    if len(raw.get("seeds", [0])) > 1:
        raise ctx.error("seeds", "the domains' adapters are given (domains.*.adapter): one adapter each, so one "
                        "seed; nothing is trained")  # fmt: skip
    if base.path is None:
        raise ctx.error("base.build", "the domains' adapters are given (domains.*.adapter): give the base they "
                        "were trained on as base.path, not a base to build")  # fmt: skip
    from .given import check_given

    return check_given(ctx, domains, base)


def _given_predictors(ctx, p: PredictorSpec, domains: dict) -> None:
    """``[predictors]`` with given adapters: not the Δppl % target (it needs
    merged-data adapters), and calibration records."""
    if p.target == "delta_ppl":
        raise ctx.error("predictors.target", f'"{p.target}" needs merged-data adapters, which a study of given '
                        'adapters has not: use "retention" or "worst"')  # fmt: skip
    for n, d in domains.items():
        if not d.train:
            raise ctx.error(f"domains.{n}.train", "[predictors] calibrates its data-aware features on each "
                            "domain's training records: give train (records, not trained on) with adapter")  # fmt: skip


def load_scenario(path: str | os.PathLike, env: dict | None = None, *, import_gguf: bool = True) -> Scenario:
    """Read and check a scenario file; raise :class:`ScenarioError` on any problem.

    ``env`` (default ``os.environ``) supplies ``${VAR}`` values;
    ``LORAMIX_DATA`` gets its documented default when absent. A GGUF base is
    imported into the cache (once) to check the adapters' targets against its
    weights; with ``import_gguf=False`` (``scenario check``) one not imported
    yet is checked against its header instead, and nothing is written.
    """
    from ..userpaths import non_path

    if (said := non_path(path)) is not None:  # a pathlib TypeError, naming no argument
        raise ScenarioError(None, f"a scenario is a path to its TOML file, not {said}")
    path = Path(path)
    ctx = _Ctx(path, import_gguf)
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
    env.setdefault("LORAMIX_MODELS", str(default_data_dir(path.parent, "models")))
    used: dict[str, str] = {}

    top = _read(ctx, Scenario, raw, "")
    name, seeds = top["name"], list(top["seeds"])
    if not NAME_RE.match(name):
        raise ctx.error("name", f"{name!r}: use letters, digits, '_', '.', '-' (it names the report folder)")
    if not seeds:
        raise ctx.error("seeds", "empty: give at least one seed")
    _no_repeats(ctx, "seeds", seeds)

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
    given = _given_domains(ctx, raw, domains, base)
    if given is None:
        adapters = _parse_adapters(ctx, raw.get("adapters", {}))
        _check_fit(ctx, base, adapters)
        compositions = _parse_compositions(ctx, raw.get("compositions"), list(domains))
        merged_data = _parse_merged_data(ctx, raw.get("merged_data"), compositions, list(domains))
        k = min(len(c) for c in compositions)
        stacked = k * adapters.rank, f"{k} x rank {adapters.rank}"
    else:
        kind, ranks = given
        compositions = _parse_compositions(ctx, raw.get("compositions"), list(domains))
        adapters = AdapterSpec(methods=(kind,), rank=min(ranks.values()), epochs=None)
        merged_data = ()  # none: the given adapters' recipe is unknown
        stacked = min(sum(ranks[d] for d in c) for c in compositions), "given adapters' ranks"
    merges = _parse_merge(ctx, raw.get("merge"), adapters, stacked)
    ev = _parse_eval(ctx, raw.get("eval"), adapters)
    predictors = _parse_predictors(ctx, raw.get("predictors"), merges)
    if given is not None and predictors is not None:
        _given_predictors(ctx, predictors, domains)
    plan = _parse_plan(ctx, raw.get("plan"), seeds, adapters, merges, predictors)
    return Scenario(path=path, name=name, description=top["description"], seeds=tuple(seeds),
                    data_seed=top["data_seed"], base=base, domains=domains, adapters=adapters, compositions=compositions,
                    merged_data=merged_data, merges=merges, eval=ev, predictors=predictors, plan=plan,
                    variables=used)  # fmt: skip


def _merged_data_summary(md):
    if md is None:
        return "all"
    if not md:
        return "none"
    if isinstance(md[0], int):
        return {"count": md[0], "include": [list(c) for c in md[1]]}
    return [list(c) for c in md]


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
        "adapters": {
            "methods": list(s.adapters.methods),
            "given": {n: str(d.adapter) for n, d in s.domains.items()},
        }
        if s.given
        else {"methods": list(s.adapters.methods), "init": s.adapters.init, **s.adapters.recipe()},
        "compositions": [list(c) for c in s.compositions],
        "merged_data": _merged_data_summary(s.merged_data),
        "merge": {m.label: m.summary() for m in s.merges},
        "eval": {
            "batch": s.eval.batch,
            "batch_tokens": s.eval.batch_tokens,
            "max_len": s.eval.max_len,
            "on": s.eval.on,
            "domains": s.eval.domains,
        },
        "predictors": None if s.predictors is None else dict(vars(s.predictors)),
        "plan": None if s.plan is None else dict(vars(s.plan)),
    }
