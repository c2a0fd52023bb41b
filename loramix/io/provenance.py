"""Reading the provenance a loramix output records in its ``loramix.json``.

:func:`loramix.io.outputs.provenance` writes the record; this module is its
one reader, for whatever reads an adapter's (or a merged base's) record back:
a study comparing a given adapter's base with its own
(:mod:`loramix.scenario.given`), ``plan`` and ``predict`` checking the base a
fit was made for (:mod:`loramix.grouping`, :mod:`loramix.interference`),
``eval`` rebuilding a training split (:mod:`loramix.heldout`) or warning of
another prompt format (:mod:`loramix.perplexity`). It imports ``json`` and
``hashlib`` alone (no torch, no numpy), so that an ``eval`` reads a record
without the libraries of the commands that fit and group.

The fields read, each only where it has the type given (anything else reads
as not recorded):

* ``method`` (str): what made the output, ``"train"`` for ``loramix train``;
* ``parameters`` (object): the settings (``prompt``, ``init``, ``limit``,
  ``eval_size``, ``seed``, ``fields``, ...);
* ``inputs`` (list of objects): each with ``kind`` (``"base_model"``,
  ``"data"``, ...), ``path``, ``identity`` (a base's, a str),
  ``records_sha256`` (a data source's, :func:`records_sha256`), ``role``
  (``"adapter"`` in a merge's record).

A missing, unreadable or damaged file (not JSON, not a JSON object) is no
record: None, never an error; only the machine failing under it (``EIO``:
:data:`~loramix.errors.MACHINE_ERRORS`) is its OSError. Every reader
treats the record as optional: adapters made outside loramix (PEFT's own
training) have none, and a check that cannot be made from it is skipped or
said (each caller says which), not guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import raise_machine_fault

#: the record's file name, in the output folder
FILENAME = "loramix.json"


def read_record(path: str | os.PathLike | None) -> dict | None:
    """The ``loramix.json`` of the output at ``path`` (a folder, or a file in
    one: an adapter's weights file), or None: no path (an adapter held in
    memory), no such file, or one that cannot be read, is not JSON or is not
    a JSON object."""
    if path is None:
        return None
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / FILENAME
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        # a failing disk is not "no record": taken as none, a held-out check found
        # no training data and passed, and a trained-base check had nothing to compare
        raise_machine_fault(e, f)
        return None
    return rec if isinstance(rec, dict) else None


def recorded_parameters(path: str | os.PathLike | None) -> dict:
    """The record's ``parameters`` object; ``{}`` where there is none."""
    params = (read_record(path) or {}).get("parameters")
    return params if isinstance(params, dict) else {}


def recorded_inputs(record: dict | None) -> list[dict]:
    """``record``'s ``inputs`` that are objects; ``[]`` where it records none."""
    inputs = (record or {}).get("inputs")
    return [i for i in inputs if isinstance(i, dict)] if isinstance(inputs, list) else []


def base_input(path: str | os.PathLike | None) -> dict | None:
    """The ``inputs`` entry of the base the output was made from (training
    provenance): the first of kind ``base_model`` whose ``identity`` is a
    str (with its ``path``, and ``gguf_sha256`` for a GGUF base), or None."""
    return next((i for i in recorded_inputs(read_record(path))
                 if i.get("kind") == "base_model" and isinstance(i.get("identity"), str)), None)  # fmt: skip


def recorded_base(path: str | os.PathLike | None) -> str | None:
    """The identity of the base the output was made from (:func:`base_input`'s);
    None where none is (PEFT's own training records none: its
    ``base_model_name_or_path`` is a name, which a renamed or copied folder
    changes, so it is not compared here: :mod:`loramix.trained_base` does
    where it is a path on this machine)."""
    return (base_input(path) or {}).get("identity")


def records_sha256(records) -> str:
    """The hash a data source's ``records_sha256`` records::

        sha256(json([question, answer, context]) + "\\n" per record, in order)

    of the :class:`~loramix.data.QARecord` s read from it (after its
    ``limit``), so that a reader can tell the same records from a file
    changed since."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.question, r.answer, r.context], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
