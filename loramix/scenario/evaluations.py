"""``report.json``'s evaluations, with the base's stored once.

A study evaluates its base once (the plan's one ``eval/base`` step: one
model, each domain's one eval split, drawn before and apart from any seed),
and its tables list that evaluation in every (adapter label, seed) block,
first, as ``model == "base"`` rows. ``report.json`` keeps those rows once,
in ``base_evaluation`` (one row per domain, without ``adapter_method``,
``seed`` and ``model``), and ``evaluations`` holds the other rows; every
reader takes :func:`evaluations`, which puts the base's rows back at the head
of each block, as they were, so that report.md, the CSVs and the figures are
the same whichever form a ``report.json`` has (one written before this
module repeats the base's rows and has no ``base_evaluation``).
"""

from __future__ import annotations

#: the key of the base's rows in report.json, and the model name of those rows in the tables
KEY = "base_evaluation"
BASE = "base"
_LABEL = ("adapter_method", "seed")


def expand(rows: list[dict], base: list[dict]) -> list[dict]:
    """``rows`` (no base rows) with ``base`` (one row per domain) inserted at
    the head of each (adapter_method, seed) block, in the blocks' order."""
    out: list[dict] = []
    seen: set = set()
    for e in rows:
        label = tuple(e[k] for k in _LABEL)
        if label not in seen:
            seen.add(label)
            out += [{**dict(zip(_LABEL, label)), "model": BASE, **b} for b in base]
        out.append(e)
    return out


def compact(evals: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(rows, base)``: the evaluations without the base's rows, and the base's
    rows of the first block, once (:func:`expand` gives ``evals`` back).
    Refused (:class:`ValueError`) where a block's base rows differ from the
    first block's (they are one evaluation: another would be another model
    or other eval splits), or where ``evals`` is not in blocks that
    :func:`expand` rebuilds."""
    rows = [e for e in evals if e["model"] != BASE]
    blocks: dict[tuple, list[dict]] = {}
    for e in evals:
        if e["model"] == BASE:
            blocks.setdefault(tuple(e[k] for k in _LABEL), []).append(
                {k: v for k, v in e.items() if k not in (*_LABEL, "model")}
            )
    if not blocks:
        return evals, []
    (first, base), *others = blocks.items()
    for label, got in others:
        if got != base:
            doms = [b["domain"] for b in base]
            bad = next((g["domain"] for g in got if g not in base), None) or "their domains"
            raise ValueError(f"base evaluation of {'/'.join(map(str, label))} differs from "
                             f"{'/'.join(map(str, first))}'s on {bad} (domains {', '.join(doms)}): "
                             "one base on the same eval splits must score the same")  # fmt: skip
    if expand(rows, base) != evals:
        raise ValueError("the base's evaluations are not at the head of each adapter label and seed: "
                         "not stored once")  # fmt: skip
    return rows, base


def evaluations(report: dict) -> list[dict]:
    """Every evaluation row of ``report`` (``report.json``'s data), the base's
    in each block: :func:`expand` of its ``evaluations`` and
    ``base_evaluation``, or its ``evaluations`` as they are where it has no
    ``base_evaluation`` (a report written before: the base's rows repeated,
    or a table built by hand)."""
    base = report.get(KEY)
    return report["evaluations"] if base is None else expand(report["evaluations"], base)
