"""A validated predictor from a user's own evaluations (``loramix fit``).

Inputs: the JSON that ``loramix eval --format json`` writes, for single
adapters and for merges of them (``eval --adapter A --adapter B [--merged]``,
the sum; or ``eval --base M`` of a model folder ``M`` that ``sum``/``merge
--into`` wrote, whose JSON carries a ``merge`` label). A merge is paired with
its members by what the files record: the members' adapters (the merge
label's, or the ``--adapter`` list), the base, the scoring (``on``,
``prompt``) and the data rows.

An adapter is matched by its content where both files record it: its
identity, the sha256 of its config (canonical JSON) and weights together
(:func:`loramix.io.filehash.adapter_identity_of`; ``adapter_identity``,
the merge label's ``identity``, from a merge's provenance), so a member
evaluated from a copy elsewhere is the same adapter, while one rewritten at
the same path between the evaluations, or the same weights under another
config (another ``lora_alpha``, ``target_modules``, ``rank_pattern``,
``use_dora``, D2-LoRA field: another delta), is another adapter, refused,
not matched. Older files: eval JSONs (and merges) of a loramix before
identities recorded the weights file's sha256 alone (``adapter_sha256``,
the merge label's ``sha256``; new files record it too). Where either file
has no identity, that old key is matched against the other file's old key
only, as before, which cannot tell two configs of one set of weights
apart: a member whose weights match two such adapters is refused as
ambiguous, not guessed. Where either file has neither (an eval JSON written
before eval recorded digests, or an adapter without a weights file to
hash), the adapters are matched by their resolved paths, as before. The
features are read from each adapter's single evaluation's path, refused
where the adapter there (by the key its evaluation recorded) has changed
since.

Each single adapter must be evaluated on one data set, its domain ``d`` (the
row's name, :func:`loramix.data.data_names`: the file's stem). A merge of
members ``C`` must be evaluated, on the same base, on every member's domain
with the same records and scored tokens. Its interference is the study's
retention target (docs/interference.md, :func:`loramix.scenario.assemble.retention_pct`)::

    y_C = mean_{d in C} 100 (ppl_d(merge) - ppl_d(adapter_d)) / ppl_d(adapter_d)

the merge's perplexity on each member's data against that member's own;
with ``target="worst"`` the study's worst-member target, the largest of
those losses (:func:`loramix.scenario.assemble.worst_pct`). The
study's ``delta_ppl%`` compares against an adapter trained on the members'
pooled data: given the evaluation of one (``merged_data``: one adapter on the
data of the composition's domains, the same records and tokens as theirs),
the composition gets ``delta_ppl_pct = 100 (ppl_C(merge) - ppl_C(ref)) /
ppl_C(ref)``, ``ppl_C = exp(sum_d NLL_d / sum_d N_d)`` (:func:`add_delta_ppl`),
and each merge method with :data:`MIN_COMPOSITIONS` of them a line of it on the
RMS cosine in ``fit.json``, as a study's (:func:`line_fits`).
``x``: the factor features of :mod:`loramix.features` (the data-aware ones
need calibration data and are left out) over the member adapters, the
``rms_cosine`` among them, summarised per composition as a study does
(:func:`loramix.validation.composition_table`: the quadratic mean over pairs
for the RMS cosine, :func:`loramix.fit.composition_cosine`).

A merge method is one set of predictors per setting: merges by one method
with other parameters (``eval`` records those of a ``merge --into`` folder)
are labelled by the ones that differ, ``ties --density 0.2`` beside ``ties
--density 0.5`` (:func:`merge_labels`), as a study's variants are. Per label
with at least :data:`MIN_COMPOSITIONS` compositions, every
predictor is fitted and validated leave-one-domain-out
(:func:`loramix.validation.validate`; ``ols:rms_cosine`` is the line of
:func:`loramix.fit.fit_line`). The output folder holds what a study's report
folder holds for its predictors (``predictors.json``, with ``by_method``,
``validation.csv``, ``predictions.csv``), ``fit.json`` where there are lines,
and ``points.csv`` (each composition,
its ``x``, ``y`` and the files they came from): ``loramix predict --fit OUT``
and ``loramix plan --fit OUT`` read it. Every refusal is one line naming the
file, before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .trained_base import base_identity

#: the fewest compositions of one merge method that a line is fitted and validated on
MIN_COMPOSITIONS = 3
#: ``--target`` -> the interference fitted (the study's name of it, docs/interference.md) and its definition
TARGETS = {
    "retention": ("retention_pct", "retention_pct = mean over the members d of 100 (ppl_d(merge) - ppl_d(adapter_d)) "
                  "/ ppl_d(adapter_d), ppl_d on member d's evaluation data"),
    "worst": ("worst_pct", "worst_pct = max over the members d of 100 (ppl_d(merge) - ppl_d(adapter_d)) / "
              "ppl_d(adapter_d), ppl_d on member d's evaluation data"),
}  # fmt: skip


@dataclass
class Evaluation:
    """One ``eval --format json`` file: a single adapter (``method`` None) or a merge."""

    path: str
    base: str  # the base the adapters were evaluated on, or merged into (realpath)
    members: list[str]  # the adapters (realpaths)
    method: str | None
    on: str
    prompt: str
    rows: dict  # data name -> its result row
    digests: list  # per member, its weights' sha256 as recorded, or None (an older JSON)
    identities: list  # per member, its identity (config and weights) as recorded, or None (an older JSON)
    params: dict | None = None  # a merge's parameters as it merged by them, or None (not recorded)


def _real(p: str) -> str:
    return os.path.realpath(p)


def _rows(path, results) -> dict:
    """The data rows of ``results`` (the ``union`` row, the last, left out), checked."""
    if not isinstance(results, list) or not results:
        raise UsageError(path, "not a loramix eval --format json output (no 'results' rows)")
    rows = results[:-1] if len(results) > 1 else results
    for r in rows:
        ok = isinstance(r, dict) and isinstance(r.get("data"), str)
        ok = ok and all(
            isinstance(r.get(k), int) and not isinstance(r.get(k), bool) for k in ("records", "tokens")
        )
        if (
            not ok
            or not isinstance(r.get("ppl"), (int, float))
            or not math.isfinite(r["ppl"])
            or r["ppl"] <= 0
        ):
            raise UsageError(path, "not a loramix eval --format json output (a result row without data, records, "
                             "tokens and a finite ppl)")  # fmt: skip
    return {r["data"]: r for r in rows}


def read_evaluation(path: str | os.PathLike) -> Evaluation:
    """The evaluation in ``path`` (module docstring); one line where it is not one that fits."""
    from .fit import read_json_file

    d = read_json_file(Path(path), "evaluation", "give the JSON that loramix eval --format json wrote",
                       "loramix eval --format json > FILE writes one", "eval JSON")  # fmt: skip
    keys_ok = isinstance(d, dict) and isinstance(d.get("base"), str) and isinstance(d.get("adapters"), list)
    if not keys_ok or not all(isinstance(d.get(k), str) for k in ("on", "prompt")):
        raise UsageError(path, "not a loramix eval --format json output (no base, adapters, on and prompt)")
    rows = _rows(path, d.get("results"))
    made, given = d.get("merge"), d["adapters"]
    if made is not None and not given:
        if not isinstance(made, dict) or not isinstance(made.get("adapters"), list):
            raise UsageError(
                path, "its 'merge' is not the label eval writes (method, adapters, weights, base)"
            )
        base, members, method, weights = (
            made.get("base"),
            made["adapters"],
            made.get("method"),
            made.get("weights"),
        )
    elif made is None and given:
        base, members, weights = d["base"], given, d.get("weights")
        method = "sum" if len(given) > 1 else None
    else:
        what = "the base alone" if made is None else "a merge with adapters on top of it"
        raise UsageError(path, f"evaluates {what}: give evaluations of single adapters and of merges of them")
    if not all(isinstance(x, str) for x in [base, method or "", *members]):
        raise UsageError(path, "its adapters, base or merge method are not paths and a name")
    if weights is not None and any(w != 1 for w in weights):
        raise UsageError(
            path, f"a merge with weights {weights}: fit takes merges of weight 1 each, as a study's"
        )
    # the label's keys from the merge's record, else eval's own: the identity (config and weights),
    # and the weights' sha256 alone that older loramix recorded (and new still records)
    label = made is not None and not given
    recorded = {"identities": made.get("identity") if label else d.get("adapter_identity"),
                "sha256": made.get("sha256") if label else d.get("adapter_sha256")}  # fmt: skip
    for what, digests in recorded.items():
        if digests is None:  # an older eval JSON (or merge): matched by the older key, or by path
            recorded[what] = digests = [None] * len(members)
        if not (isinstance(digests, list) and len(digests) == len(members)
                and all(x is None or (isinstance(x, str) and len(x) == 64) for x in digests)):  # fmt: skip
            raise UsageError(
                path, f"its adapters' {what} are not one digest (or null) per adapter: not eval's JSON"
            )
    params = {} if made is None else made.get("params")  # the sum of --adapter's: no parameters
    if params is not None and not (isinstance(params, dict) and all(
            isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in params.values())):  # fmt: skip
        raise UsageError(
            path, "its merge's 'params' are not the method's parameters eval writes (name: value)"
        )
    return Evaluation(str(path), _real(base), [_real(m) for m in members], method, d["on"], d["prompt"], rows,
                      recorded["sha256"], recorded["identities"], params)  # fmt: skip


def _key(e: Evaluation, i: int) -> tuple[str | None, str | None]:
    """``(identity, sha256)`` of ``e``'s member ``i`` as its file records them."""
    return e.identities[i], e.digests[i]


def _same(a: tuple, b: tuple) -> bool | None:
    """Whether the members keyed ``a`` and ``b`` (:func:`_key`) are one adapter: by identity where
    both record one, else by the weights' sha256 where both do (an older file: the old key only
    against the old key), else None (unknown: matched by path)."""
    for x, y in zip(a, b):
        if x is not None and y is not None:
            return x == y
    return None


def _shown(k: tuple) -> str:
    """A member's key, short, for a message."""
    return f"identity {k[0][:12]}" if k[0] is not None else f"sha256 {k[1][:12]}"


def _domains(evals: list[Evaluation]) -> dict[str, tuple[str, Evaluation]]:
    """adapter realpath -> (its domain, its evaluation), from the single-adapter evaluations."""
    own: dict[str, tuple[str, Evaluation]] = {}
    seen: dict[str, str] = {}
    for e in (e for e in evals if e.method is None):
        if len(e.rows) != 1:
            raise UsageError(e.path, f"evaluates one adapter on {len(e.rows)} data sets: evaluate each adapter "
                             "on its own domain's data alone (its retention is measured there)")  # fmt: skip
        (dom,) = e.rows
        (a,) = e.members
        if a in own:
            raise UsageError(
                e.path, f"evaluates {a} again ({own[a][1].path} did): give one evaluation per adapter"
            )
        twin = next((o for o in own.values() if _same(_key(e, 0), _key(o[1], 0))), None)
        if twin is not None:
            raise UsageError(e.path, f"evaluates {a}, the same adapter ({_shown(_key(e, 0))}) as "
                             f"{twin[1].members[0]} ({twin[1].path}): give one evaluation per adapter")  # fmt: skip
        if dom in seen:
            raise UsageError(e.path, f"evaluates a second adapter on domain {dom} ({seen[dom]}): one adapter "
                             "per domain")  # fmt: skip
        own[a], seen[dom] = (dom, e), a
    return own


def _match(m: Evaluation, own: dict) -> list[str]:
    """The members of the merge ``m`` as the keys of ``own`` (the single
    evaluations' adapters): by identity where both files record one, else by
    the weights' sha256 where both do, else by resolved path (module
    docstring); a member that matches none is kept as it is (:func:`_point`
    refuses it), one whose path holds another adapter, or whose weights
    alone (an older file) match two adapters, is refused here."""
    keys = []
    for i, a in enumerate(m.members):
        mine = _key(m, i)
        hits = [b for b, (_, e) in own.items() if _same(mine, _key(e, 0))]
        if len(hits) > 1:  # only by the weights alone: identities are one per evaluation (_domains)
            raise UsageError(m.path, f"member {a} ({_shown(mine)}, the weights alone, as an older loramix "
                             f"recorded) has the weights of {' and '.join(hits)}, evaluated with other configs: "
                             "evaluate the merge again, so that its file says which")  # fmt: skip
        if hits:
            keys.append(hits[0])
            continue
        there = own.get(a)
        if there is not None and _same(mine, _key(there[1], 0)) is False:
            raise UsageError(m.path, f"member {a} ({_shown(mine)}) is not the adapter {there[1].path} evaluated "
                             f"at that path ({_shown(_key(there[1], 0))}): it was rewritten between the "
                             "evaluations; evaluate both again")  # fmt: skip
        keys.append(a)
    return keys


def _point(m: Evaluation, own: dict, target: str) -> tuple[tuple[str, ...], float]:
    """The composition (its members' domains, sorted) and ``y_C`` of the merge ``m``
    (its ``target``: :data:`TARGETS`)."""
    from .scenario import assemble

    ppl_own = {}
    for a in m.members:
        if a not in own:
            raise UsageError(m.path, f"member {a} has no evaluation among the files given: evaluate it alone "
                             "on its domain's data")  # fmt: skip
        dom, e = own[a]
        if e.base != m.base:
            raise UsageError(m.path, f"the merge is of base {m.base}, member {a} was evaluated on {e.base} "
                             f"({e.path}): not the same base")  # fmt: skip
        if (e.on, e.prompt) != (m.on, m.prompt):
            raise UsageError(m.path, f"scored with --on {m.on} --prompt {m.prompt}, member {a} ({e.path}) with "
                             f"--on {e.on} --prompt {e.prompt}: not the same scoring")  # fmt: skip
        mine, theirs = e.rows[dom], m.rows.get(dom)
        if theirs is None or (theirs["records"], theirs["tokens"]) != (mine["records"], mine["tokens"]):
            got = "no row" if theirs is None else f"{theirs['records']} records, {theirs['tokens']} tokens"
            raise UsageError(m.path, f"member {a} was evaluated on {dom} ({mine['records']} records, "
                             f"{mine['tokens']} tokens, {e.path}), the merge has {got} of it: not the same "
                             "data")  # fmt: skip
        ppl_own[dom] = float(mine["ppl"])
    if len(ppl_own) != len(m.members) or len(ppl_own) < 2:
        raise UsageError(m.path, "a merge needs two or more distinct members")
    y = {"retention": assemble.retention_pct, "worst": assemble.worst_pct}[
        target
    ]  # the study's own functions
    return tuple(sorted(ppl_own)), y({d: m.rows[d] for d in ppl_own}, ppl_own)


def _same_base_and_scoring(e: Evaluation, first: Evaluation) -> None:
    """``e`` (a merge, or a merged-data adapter) evaluated on the base and with the scoring of
    ``first`` (the first merge): a fit is of one base and one scoring, since retention on
    answers and on all tokens are not one y."""
    if (e.base, e.on, e.prompt) != (first.base, first.on, first.prompt):
        raise UsageError(e.path, f"evaluated on {e.base} with --on {e.on} --prompt {e.prompt}, {first.path} on "
                         f"{first.base} with --on {first.on} --prompt {first.prompt}: a fit is of one base "
                         "and one scoring")  # fmt: skip


def merge_labels(merges: list[Evaluation]) -> list[tuple[str, dict | None]]:
    """Each merge's ``(label, merge)``: ``label`` names its predictors
    (``by_method``), ``merge`` is ``{"method", "params"}`` (the parameters
    that are not the method's defaults; None where the file records none).
    A method merged by one set of parameters is labelled by its name
    (``ties``); merged by several, each label adds the parameters that differ
    (``ties --density 0.2``, ``ties --density 0.5``), as a study's variants
    are fitted apart. A merge that records no parameters beside merges of
    its method that differ is refused: which it was cannot be told."""
    from .methods import available_methods, explicit_params, params_of

    out = []
    for m in merges:
        if m.params is None or m.method not in available_methods():
            out.append((m.method, None))
            continue
        out.append((m.method, {"method": m.method, "params": explicit_params(m.method, m.params)}))
    for method in dict.fromkeys(m.method for m in merges):
        mine = [i for i, m in enumerate(merges) if m.method == method]
        kinds = {json.dumps(out[i][1], sort_keys=True) for i in mine}
        if len(kinds) < 2:
            continue
        unknown = next((i for i in mine if out[i][1] is None), None)
        if unknown is not None:
            raise UsageError(merges[unknown].path, f"its {method} merge records no parameters, and the other "
                             f"{method} merges were made with different ones: evaluate it again with this loramix")  # fmt: skip
        differ = [k for k in dict.fromkeys(k for i in mine for k in out[i][1]["params"])
                  if len({json.dumps(out[i][1]["params"].get(k)) for i in mine}) > 1]  # fmt: skip
        declared = params_of(method)
        for i in mine:
            params = out[i][1]["params"]
            said = " ".join(f"{declared[k].flag} {params.get(k, declared[k].default)}" for k in differ)
            out[i] = (f"{method} {said}", out[i][1])
    return out


def collect_points(evals: list[Evaluation], target: str = "retention") -> tuple[dict, list[dict]]:
    """``(own, points)``: each adapter's domain and evaluation, and one point per merge
    (``composition``, ``merge_method``, its label, :func:`merge_labels`; ``y``, its
    ``target``; ``file``, ``merge``), each checked against its members."""
    own = _domains(evals)
    points, seen = [], {}
    merges = [e for e in evals if e.method is not None]
    labels = merge_labels(merges)
    for m, (label, merge) in zip(merges, labels):
        _same_base_and_scoring(m, merges[0])
        m.members = _match(m, own)
        comp, y = _point(m, own, target)
        key = (comp, label)
        if key in seen:
            raise UsageError(m.path, f"a second {label} merge of {'+'.join(comp)} ({seen[key]}): give one")
        seen[key] = m.path
        points.append({"composition": comp, "merge_method": label, "y": y, "file": m.path, "merge": merge})
    if not points:
        raise UsageError(evals[-1].path, "no merge among the evaluations given: a fit needs evaluations of "
                         "merges and of their members")  # fmt: skip
    return own, points


def _pooled_nll(path, rows: dict, comp) -> float:
    """``sum_d NLL_d / sum_d N_d`` over the domains ``comp`` (``NLL_d`` = the row's mean ``nll`` times its
    ``tokens``): the log of the study's ``ppl_C`` (docs/interference.md)."""
    for d in comp:
        v = rows[d].get("nll")
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not rows[d]["tokens"]:
            raise UsageError(path, f"its row of {d} has no finite nll per scored token: not eval's JSON")
    return sum(rows[d]["nll"] * rows[d]["tokens"] for d in comp) / sum(rows[d]["tokens"] for d in comp)


def _reference(r: Evaluation, own: dict, merges: list[Evaluation]) -> tuple:
    """The composition whose merged-data adapter ``r`` evaluates (its data rows' domains), checked
    against the domains' own evaluations and the merges' base and scoring."""
    by_domain = {dom: e for dom, e in own.values()}
    first = merges[0]
    if r.method is not None or len(r.rows) < 2:
        raise UsageError(r.path, "a merged-data evaluation is of one adapter on two or more domains' data")
    _same_base_and_scoring(r, first)
    for dom, row in r.rows.items():
        e = by_domain.get(dom)
        if e is None:
            raise UsageError(r.path, f"data set {dom} is no domain of an adapter evaluated alone")
        if (row["records"], row["tokens"]) != (e.rows[dom]["records"], e.rows[dom]["tokens"]):
            raise UsageError(r.path, f"its {dom} row has {row['records']} records, {row['tokens']} tokens, "
                             f"{e.path}'s {e.rows[dom]['records']} and {e.rows[dom]['tokens']}: not the same "
                             "data")  # fmt: skip
    return tuple(sorted(r.rows))


def add_delta_ppl(points: list[dict], evals: list[Evaluation], refs: list[Evaluation], own: dict) -> None:
    """``delta_ppl_pct`` (and ``merged_data``, its file) of each point whose composition has a
    merged-data evaluation in ``refs``, None elsewhere: ``100 (ppl_C(merge) - ppl_C(ref)) / ppl_C(ref)``."""
    from .scenario.report import delta_pct

    merges = {e.path: e for e in evals if e.method is not None}
    seen: dict[tuple, Evaluation] = {}
    for r in refs:
        comp = _reference(r, own, list(merges.values()))
        if comp in seen:
            raise UsageError(
                r.path, f"a second merged-data evaluation of {'+'.join(comp)} ({seen[comp].path})"
            )
        if not any(p["composition"] == comp for p in points):
            raise UsageError(
                r.path, f"no merge of {'+'.join(comp)} among the evaluations: nothing to compare with"
            )
        seen[comp] = r
    for p in points:
        r = seen.get(p["composition"])
        m = merges[p["file"]]
        p["delta_ppl_pct"] = None if r is None else delta_pct(
            math.exp(_pooled_nll(m.path, m.rows, p["composition"])),
            math.exp(_pooled_nll(r.path, r.rows, p["composition"])))  # fmt: skip
        p["merged_data"] = None if r is None else os.path.abspath(r.path)


def line_fits(points: list[dict], kind: str) -> list[dict]:
    """fit.json's ``fits``: per merge method, the line ``delta_ppl_pct ~ rms_cosine``
    (:func:`loramix.fit.fit_line`) of the points that have a ``delta_ppl_pct``."""
    from .fit import fit_line

    fits = []
    for mm in dict.fromkeys(p["merge_method"] for p in points):
        mine = [p for p in points if p["merge_method"] == mm and p.get("delta_ppl_pct") is not None]
        if not mine:
            continue
        if len(mine) < MIN_COMPOSITIONS:
            raise UsageError(mine[0]["merged_data"], f"{len(mine)} {mm} merge(s) with a merged-data evaluation: "
                             f"a fitted line needs {MIN_COMPOSITIONS} or more")  # fmt: skip
        f = fit_line([p["rms_cosine"] for p in mine], [p["delta_ppl_pct"] for p in mine],
                     labels=["+".join(p["composition"]) for p in mine])  # fmt: skip
        fits.append({"adapter_method": kind, "merge_method": mm, **f.to_dict()})
    return fits


def _features(own: dict, where: str):
    """The factor features of the adapters of ``own``, named by their domains (a FeatureSet)."""
    from .features import compute_features, registry
    from .features.size import ensure_size
    from .grouping import one_kind
    from .io.filehash import adapter_identity_or_none, adapter_sha256
    from .io.np_factors import load_np_adapter

    paths = list(own)
    for p in paths:  # the factors read (and the config that scales them) are those evaluated
        e = own[p][1]
        then = _key(e, 0)
        if then[0] is not None:
            changed = adapter_identity_or_none(p) != then[0]
        else:  # an older file: its weights alone
            changed = then[1] is not None and adapter_sha256(p) != then[1]
        if changed:
            raise UsageError(e.path, f"{p} has changed since it was evaluated ({_shown(then)} then): "
                             "evaluate it again")  # fmt: skip
    adapters = [load_np_adapter(p) for p in paths]
    one_kind(adapters, where, "a fit is per adapter kind")
    only = sorted(n for n, f in registry().items() if not f.data_aware)
    fs = compute_features(adapters, only=only)
    fs.names = [own[p][0] for p in paths]
    return ensure_size(fs), adapters[0].method


def _validations(points: list[dict], fs, level: float, target: str) -> dict:
    """merge method -> :meth:`Validation.to_json_dict` of its points (module docstring)."""
    from .validation import composition_table, validate

    out = {}
    for mm in dict.fromkeys(p["merge_method"] for p in points):
        mine = [p for p in points if p["merge_method"] == mm]
        where = mine[0]["file"]
        if len(mine) < MIN_COMPOSITIONS:
            raise UsageError(where, f"{len(mine)} {mm} merge(s) ({', '.join(p['file'] for p in mine)}): a fitted "
                             f"line needs {MIN_COMPOSITIONS} compositions or more")  # fmt: skip
        comps = [p["composition"] for p in mine]
        X = composition_table(fs, comps)
        try:
            # nested: the choice of the best validated too (``selection``), as a study's validations are
            v = validate(comps, [p["y"] for p in mine], X, level=level, aggregate=fs.aggregate,
                         target=f"{TARGETS[target][0]} ({mm})", nested=True)  # fmt: skip
        except UsageError as e:  # no domain can be held out
            raise UsageError(where, f"the {mm} merges: {e.problem}") from None
        out[mm] = v.to_json_dict()
        out[mm]["predictions"] = v.predictions
        for p, x in zip(mine, X["rms_cosine"]):
            p["rms_cosine"] = float(x)
    return out


def _predictors_file(
    vals: dict, base_identity, kind: str, evals: list[str], points: list[dict], target: str
) -> dict:
    """``predictors.json``: the primary method's validation (``sum`` where there is one), by_method, and
    what it was fitted from."""
    from .validation import method_entry

    primary = "sum" if "sum" in vals else next(iter(vals))
    order = [primary, *(m for m in vals if m != primary)]
    out = {k: x for k, x in vals[primary].items() if k != "predictions"}
    merges = {p["merge_method"]: p["merge"] for p in points if p.get("merge") is not None}
    out.update(scenario=None, base_identity=base_identity, adapter_kind=kind, adapters=None,
               by_method={m: {**method_entry(vals[m]), **({"merge": merges[m]} if m in merges else {})}
                          for m in order})  # fmt: skip
    out["fitted_from"] = {
        "evaluations": [os.path.abspath(p) for p in evals],
        "y": TARGETS[target][1],
        "x": "the factor features of loramix.features over the members (rms_cosine: sqrt(mean over pairs of "
        "rms_ij^2))",
        "points": [
            {**p, "composition": list(p["composition"]), "file": os.path.abspath(p["file"])} for p in points
        ],
    }
    return out


def _fit_file(fits: list[dict], base_identity, files: list[str], points: list[dict]) -> dict:
    """``fit.json`` as a study writes it (:func:`loramix.scenario.report.write_files`), of ``fits``."""
    from .scenario.report import PI_LEVEL

    return {
        "scenario": None, "base_identity": base_identity,
        "x": "rms_cosine: RMS cosine of the composition = sqrt(mean over pairs of pairwise RMS cosine^2)",
        "y": "delta_ppl_pct = 100 (ppl_merge - ppl_merged_data) / ppl_merged_data on the union of the "
             "members' evaluation data (ppl_C = exp(sum_d NLL_d / sum_d N_d))",
        "cosine_on": "residual (LoRA: s B A; D2-LoRA: the signed residual, base-free)",
        "points": "one per composition: a merge, its members' and its merged-data adapter's evaluations",
        "prediction_level": PI_LEVEL, "adapters": None, "fits": fits,
        "fitted_from": {"evaluations": [os.path.abspath(p) for p in files]},
    }  # fmt: skip


def _write(out, force: bool, inputs: list[str], files: dict, vals: dict, points: list[dict]) -> Path:
    """``files`` (name -> JSON dict), the validations' tables and ``points.csv`` into ``out``, atomically."""
    import json

    import pandas as pd

    from .io.outputs import atomic_output_dir

    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        for name, d in files.items():
            (tmp / name).write_text(json.dumps(d, indent=1) + "\n")
        rows = [{"merge_method": m, **r} for m, v in vals.items() for r in v["summary"]]
        pd.DataFrame(rows).to_csv(tmp / "validation.csv", index=False)
        preds = [v["predictions"].assign(merge_method=m) for m, v in vals.items()]
        pd.concat(preds, ignore_index=True).to_csv(tmp / "predictions.csv", index=False)
        # the merge's parameters are predictors.json's (by_method), not a column
        pts = [{**{k: v for k, v in p.items() if k != "merge"}, "composition": "+".join(p["composition"])}
               for p in points]  # fmt: skip
        pd.DataFrame(pts).to_csv(tmp / "points.csv", index=False)
    return Path(out)


def _paths(files, where: str) -> list[str]:
    """``files`` (one path or a list; None: none) as strings; a DataFrame or
    anything else that is no path refused in one line naming ``where``."""
    from .errors import UsageError
    from .userpaths import is_table, non_path

    if is_table(files):  # its truth value raised in pandas; iterated, its column names
        raise UsageError(
            where, f"takes evaluation files (eval --format json > FILE), not a {type(files).__name__}"
        )
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    if (said := next(filter(None, map(non_path, files)), None)) is not None:
        raise UsageError(where, f"takes evaluation files (eval --format json > FILE), not {said}")
    return [os.fspath(p) for p in files]


def fit_evaluations(
    evaluations,
    *,
    merged_data=(),
    out=None,
    level: float = 0.9,
    target: str = "retention",
    force: bool = False,
) -> dict:
    """Fit and validate interference predictors from ``loramix eval`` results (module docstring).

    ``evaluations``: paths of the JSON files ``loramix eval --format json``
    wrote, for single adapters (each on its own domain's data) and merges of
    them. ``merged_data``: evaluations of adapters trained on the pooled data
    of a composition, each on its domains' data: the compositions that have
    one get ``delta_ppl_pct`` too, and a ``fit.json`` its line on the RMS
    cosine per merge method, as a study's. ``out``: the folder to write
    (``predictors.json``, [``fit.json``], ``validation.csv``,
    ``predictions.csv``, ``points.csv``; atomically, an existing one refused
    unless ``force``); None writes nothing. ``level``: the prediction
    intervals' (and their validated coverage's). ``target``: ``y``, the
    members' mean loss (``retention``) or the largest (``worst``). The features are computed
    from the factors in numpy float64, as ``loramix predict``'s.
    Returns ``out``, ``adapter_kind``, ``base_identity``, ``points`` (per
    merge: ``composition``, ``merge_method``, ``y`` (retention % or worst member %),
    ``rms_cosine``, ``file``, ``delta_ppl_pct`` and ``merged_data``, None
    without one), ``methods`` (per merge method: ``best``, ``beats_mean``,
    ``headline``, the held-out ``summary`` and ``selection``, the choice of the best
    validated too: :func:`loramix.validation.nested_selection`), the primary (``sum`` where
    fitted) first, and ``lines`` (fit.json's fits; empty without ``merged_data``);
    a dict, path-like for ``out`` (:mod:`loramix.results`; with ``out=None``
    its ``out`` is None and ``os.fspath`` of it a ``TypeError``).
    """
    from .io.config_schema import is_number
    from .io.outputs import check_output

    if not (is_number(level) and 0 < level < 1):
        raise UsageError("--level", f"must lie in (0, 1), got {level!r}")
    if target not in TARGETS:
        raise UsageError("--target", f"must be one of {', '.join(TARGETS)}, got {target!r}")
    files, ref_files = _paths(evaluations, "evaluations"), _paths(merged_data, "--merged-data")
    if not files:
        raise UsageError("evaluations", "none given: the eval --format json files to fit")
    if out is not None:
        check_output(out, force=force, inputs=[*files, *ref_files])  # before the adapters are read
    evals = [read_evaluation(p) for p in files]
    own, points = collect_points(evals, target)
    add_delta_ppl(points, evals, [read_evaluation(p) for p in ref_files], own)
    used = {a for e in evals if e.method is not None for a in e.members}
    own = {a: v for a, v in own.items() if a in used}  # an adapter in no merge is no domain of any fit
    fs, kind = _features(own, points[0]["file"])
    vals = _validations(points, fs, level, target)
    identity = base_identity(next(e.base for e in evals if e.method is not None))
    fits = line_fits(points, kind)
    written = {
        "predictors.json": _predictors_file(vals, identity, kind, [*files, *ref_files], points, target)
    }
    if fits:
        written["fit.json"] = _fit_file(fits, identity, [*files, *ref_files], points)
    if out is not None:
        out = _write(out, force, [*files, *ref_files], written, vals, points)
    d = written["predictors.json"]
    methods = {
        m: {k: vals[m].get(k) for k in ("best", "beats_mean", "headline", "summary", "selection")}
        for m in d["by_method"]
    }
    from .results import OutputDict

    return OutputDict({"out": None if out is None else str(out), "adapter_kind": kind, "base_identity": identity,
                       "points": d["fitted_from"]["points"], "methods": methods, "lines": fits})  # fmt: skip
