"""Which evaluated records an adapter was trained on, from its provenance.

``loramix train`` records in its ``loramix.json`` each data source (its
absolute ``path`` and ``records_sha256``, the hash of the records it read)
and how it split them (``parameters.limit``, ``eval_size``, ``seed``,
``fields``). That split is deterministic (:func:`loramix.data.split_records`),
so the training records of a source can be rebuilt exactly: read the file
again with the same ``limit`` and fields, check that the records hash as
recorded (else the file changed: nothing is guessed), and split with the
same seed. An evaluation of such an adapter (on the fly, or merged into the
base folder it is given) on records of its own training split scores what
the adapter learnt, not how it generalises; :func:`warn_trained_on` says so.
"""

from __future__ import annotations

import os
from pathlib import Path


def _adapter_paths(adapters, base) -> list[str]:
    """The adapters given, and those a loramix merge in ``base`` was made of
    (its ``loramix.json`` inputs with role ``adapter``)."""
    from .io.provenance import read_record, recorded_inputs

    paths = [os.fspath(getattr(a, "path", a)) for a in adapters if getattr(a, "path", a) is not None]
    if isinstance(base, (str, os.PathLike)) and Path(base).is_dir():  # a .gguf file is no merge
        inputs = recorded_inputs(read_record(base))
        paths += [i["path"] for i in inputs if i.get("role") == "adapter" and isinstance(i.get("path"), str)]
    return paths


def training_split(adapter_path, unknown: dict | None = None) -> dict[str, set]:
    """``{absolute data path: {(question, answer, context), ...}}``: the
    training records ``loramix train`` drew from each of the adapter's data
    files, rebuilt from its ``loramix.json``; a source whose file no longer
    holds the recorded records (or a synthetic spec) is left out, and said in
    ``unknown`` (``{data path: why}``, where given). The machine failing
    under the record or a data file (``EIO``) raises its OSError: taken as
    no record or an unknown split, the held-out check passed or refused
    (exit 2) what was a failing disk."""
    from .data import load_records, split_records
    from .errors import LoramixError, raise_machine_fault
    from .io.provenance import read_record, records_sha256

    rec = read_record(adapter_path) or {}
    params, inputs = rec.get("parameters"), rec.get("inputs")
    if rec.get("method") != "train" or not isinstance(params, dict) or not isinstance(inputs, list):
        return {}
    fields = params.get("fields") if isinstance(params.get("fields"), dict) else {}
    out = {}
    for i in inputs:
        if not (isinstance(i, dict) and i.get("kind") == "data" and isinstance(i.get("path"), str)):
            continue
        try:
            recs = load_records(i["path"], limit=params.get("limit"), **fields)
            if records_sha256(recs) != i.get("records_sha256"):
                if unknown is not None:
                    unknown[i["path"]] = "its records changed since the adapter was trained on them"
                continue
            es = params.get("eval_size")
            tr = split_records(recs, eval_size=es, seed=params.get("seed", 0))[0] if es else recs
        except (LoramixError, OSError, TypeError, ValueError) as e:  # moved or unreadable: not guessed
            raise_machine_fault(e, i["path"])  # not unreadable: a failing disk, said as such (exit 1)
            if unknown is not None:
                unknown[i["path"]] = f"it cannot be read as it was for training ({type(e).__name__})"
            continue
        out[i["path"]] = {(r.question, r.answer, r.context) for r in tr}
    return out


def _unreadable_record(path) -> tuple[Path, str] | None:
    """``(file, problem)``: the adapter's ``loramix.json`` where one is there
    but reads as no record (damaged, not JSON, not an object), or as a
    training record whose fields :func:`training_split` reads are of the
    wrong type (:func:`_damage`): its training split is unknown."""
    from .io.provenance import FILENAME, read_record

    p = Path(path)
    f = (p if p.is_dir() else p.parent) / FILENAME
    if not f.is_file():
        return None
    rec = read_record(path)
    problem = "not a readable record" if rec is None else _damage(rec)
    return (f, problem) if problem else None


def _damage(rec: dict) -> str | None:
    """What in a record read as a JSON object keeps :func:`training_split`
    from rebuilding its split, or None. Taken as they were, a ``method`` or
    ``inputs`` of the wrong type read as a record of no training data
    (nothing held out), and a string ``seed`` split the records by another
    permutation than training's (its training records scored as held out)."""
    method = rec.get("method")
    if not isinstance(method, str):
        return "a record whose method is not a string"
    if method != "train":
        return None
    params, inputs = rec.get("parameters"), rec.get("inputs")
    if not isinstance(params, dict):
        return "a training record whose parameters are not an object"
    if not isinstance(inputs, list) or not all(
        isinstance(i, dict) and isinstance(i.get("kind"), str) for i in inputs
    ):
        return "a training record whose inputs are not a list of objects with a kind"
    if any(i["kind"] == "data" and not isinstance(i.get("path"), str) for i in inputs):
        return "a training record with a data input whose path is not a string"
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        return "a training record whose parameters.seed is not an integer"
    if not isinstance(params.get("fields", {}), dict):
        return "a training record whose parameters.fields is not an object"
    return None


def _trained(adapters, base, data: list, strict: bool = False) -> list[tuple[int, str, set]]:
    """``[(index in data, adapter path, its training records from that file)]``
    for every path in ``data`` some adapter evaluated (given, or merged into
    ``base``) was trained on. ``strict`` (``--held-out``): an adapter whose
    record is damaged, or whose training file among ``data`` no longer reads
    as it did, is refused (:class:`~loramix.errors.UsageError`): its split
    cannot be rebuilt, so nothing could be held out of it."""
    from .errors import UsageError
    from .io.outputs import normalized_path

    files = {i: normalized_path(d) for i, d in enumerate(data) if isinstance(d, (str, os.PathLike))}
    if not files:
        return []
    out = []
    for path in dict.fromkeys(_adapter_paths(adapters, base)):
        unknown: dict = {}
        split = training_split(path, unknown)
        if strict and (bad := _unreadable_record(path)):
            raise UsageError("--held-out", f"{bad[0]}: {bad[1]}, so the records the adapter was "
                             "trained on are unknown")  # fmt: skip
        for i, f in files.items():
            if strict and f in unknown:
                raise UsageError("--held-out", f"{data[i]}: {path} was trained on this file, but {unknown[f]}: "
                                 "its training split cannot be rebuilt")  # fmt: skip
        out += [(i, path, split[f]) for i, f in files.items() if f in split]
    return out


def _key(r) -> tuple:
    return (r.question, r.answer, r.context)


def warn_trained_on(adapters, base, data: list, sets: list) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) for each evaluated data
    file some of whose records (``sets``: ``[(name, records)]``, in ``data``'s
    order) are in the training split of an adapter being evaluated, given or
    merged into ``base``: ``N of the M records evaluated``, naming the adapter."""

    from .errors import warn

    for i, path, trained in _trained(adapters, base, data):
        name, recs = sets[i]
        if n := sum(_key(r) in trained for r in recs):
            warn(f"{name}: {n} of the {len(recs)} records evaluated are in the training split of "
                 f"{path}: it was trained on them, so their perplexity is not held out (held_out=True, "
                 f"eval --held-out, scores only the others)")  # fmt: skip


def held_out(adapters, base, data: list, sets: list, limit: int | None) -> tuple[list, dict]:
    """``sets`` (read without a limit) less every record an evaluated adapter
    was trained on, then cut to ``limit`` (the first ``limit`` records none was
    trained on), and ``{name: records left out}``. A set left empty is refused
    (:class:`~loramix.errors.UsageError` naming ``--held-out`` and the file)."""
    from .errors import UsageError

    drop: dict[int, set] = {}
    for i, _, trained in _trained(adapters, base, data, strict=True):
        drop.setdefault(i, set()).update(trained)
    out, dropped = [], {}
    for i, (name, recs) in enumerate(sets):
        kept = [r for r in recs if _key(r) not in drop.get(i, ())]
        if not kept:
            raise UsageError(
                "--held-out", f"{data[i]}: every record is in an evaluated adapter's training split"
            )
        dropped[name] = len(recs) - len(kept)
        out.append((name, kept[:limit] if limit is not None else kept))
    return out, dropped
