"""Which base an adapter was trained on, and whether a base given is that one.

An adapter records its training base in one of two places:

- ``loramix train``'s ``loramix.json``: an input of kind ``base_model`` with
  the base's ``identity`` (:meth:`~loramix.io.model_folder.BaseModelFolder.identity`,
  a hash of its config and weight files), its resolved ``path`` and, for a
  GGUF file, the file's ``gguf_sha256``;
- PEFT's ``adapter_config.json``: ``base_model_name_or_path``, a hub name
  or a local path (a summed adapter carries its first input's).

Two bases are *the same* where their keys meet (:func:`base_keys`): the
identity of the folder (a GGUF file: of its import in the user cache, so a
GGUF and its import are one base, as is a folder named relatively or
absolutely, or moved), the identity of the base a loramix merge into the
folder started from (its ``loramix.json``: an adapter merged into a merge
of its own base), and the sha256 of the GGUF file the folder was imported
from (``loramix base import``, whichever ``--dtype``: a bfloat16 import is
the same model rounded). A hub name, or a path that is not on this
machine, cannot be compared: nothing is said. Adapters that record no base
(PEFT's own training without a name) are not compared either.

``sum``, ``merge`` and ``eval`` warn (:func:`warn_other_bases`) where an
adapter's recorded base is clearly another one, once per adapter, naming
both (a warning, not a refusal: the shapes fit, and a base copied or
re-saved elsewhere is the same model under another identity); a merge
without ``--into`` where its adapters' recorded bases clearly differ from
each other (:func:`warn_mixed_bases`); ``predict`` and ``plan``
compare :func:`loramix.io.provenance.recorded_base` with the identity their fit file records;
a study of given adapters with its base's identity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LoramixError, raise_machine_fault
from .io.provenance import base_input, read_record, recorded_inputs


def _record(path: str | os.PathLike) -> dict:
    """The ``loramix.json`` beside (or in) an adapter or a model folder, or {}."""
    return read_record(path) or {}


def _peft_base(path) -> str | None:
    """``base_model_name_or_path`` of the adapter's ``adapter_config.json``, or None."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "adapter_config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise_machine_fault(e, f)  # a failing disk: said, not the check skipped for want of a name
        return None
    name = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _gguf_source(path: Path) -> str | None:
    """``gguf:<sha256>`` of the GGUF file ``path`` is, or that the folder
    ``path`` was imported from (its ``loramix.json``, ``loramix base
    import``'s or the user cache's import), else None."""
    from .gguf_import import means_gguf
    from .io.filehash import cached_file_sha256

    if means_gguf(path):
        return f"gguf:{cached_file_sha256(path)}"
    rec = _record(path / "config.json")
    sha = next((i.get("sha256") for i in recorded_inputs(rec) if i.get("kind") == "gguf"), None)
    return f"gguf:{sha}" if rec.get("method") == "gguf-import" and isinstance(sha, str) else None


def base_identity(base: str | os.PathLike) -> str | None:
    """The identity of the base model at ``base`` as a training record names
    it (:meth:`~loramix.io.model_folder.BaseModelFolder.identity`): of the
    folder, or of a GGUF file's import in the user cache (nothing is
    imported). None where there is none to read: a GGUF file not imported
    yet, a folder without a config; the machine failing under a file of it
    (:data:`~loramix.errors.MACHINE_ERRORS`) raises its OSError."""
    from .gguf_import import imported_base, means_gguf
    from .io.model_folder import BaseModelFolder

    try:
        p = imported_base(base) if means_gguf(Path(base)) else base
        return None if p is None else BaseModelFolder(p).identity()
    except (LoramixError, OSError) as e:
        raise_machine_fault(e, base)  # a failing disk: said, not "no identity" (a check skipped)
        return None


def base_keys(base: str | os.PathLike) -> set[str]:
    """What names the base model at ``base`` (a folder or a GGUF file):
    ``id:<identity>`` of the folder, ``id:<identity>`` of the base a loramix
    merge into it started from, ``gguf:<sha256>`` of the GGUF file it is, or
    was imported from. A GGUF file not imported yet has its ``gguf:`` key
    only (nothing is imported to compare). Empty where nothing can be read
    (no config, pickled weights only); the machine failing under a file
    (:data:`~loramix.errors.MACHINE_ERRORS`) raises its OSError."""
    from .gguf_import import imported_base, means_gguf
    from .io.model_folder import BaseModelFolder

    p, keys = Path(base), set()
    try:
        if means_gguf(p):  # the file, and its import in the user cache where there is one
            keys.add(_gguf_source(p))
            if (p := imported_base(p)) is None:
                return keys
        if src := _gguf_source(p):
            keys.add(src)
        keys.add(f"id:{BaseModelFolder(p).identity()}")
    except (LoramixError, OSError) as e:
        raise_machine_fault(e, p)  # a failing disk: said, not fewer keys (another base not told)
        return keys
    for i in recorded_inputs(_record(p / "config.json")):
        if i.get("role") == "base" and isinstance(i.get("identity"), str):  # a loramix merge into this base
            keys.add(f"id:{i['identity']}")
    return keys


def _trained_keys(adapter) -> tuple[str, set[str] | None]:
    """``(how the adapter names its base, its keys)``: keys None where it
    records none that can be compared (a hub name, a path not here)."""
    rec = base_input(adapter)
    if rec is not None and isinstance(rec.get("identity"), str):
        keys = {f"id:{rec['identity']}"}
        if isinstance(rec.get("gguf_sha256"), str):
            keys.add(f"gguf:{rec['gguf_sha256']}")
        where = rec.get("path")
        if isinstance(where, str) and os.path.isdir(where):  # a `base import` folder: its GGUF file too
            src = _gguf_source(Path(where))
            keys |= {src} if src else set()
        shown = rec.get("gguf") or rec.get("path")
        return f"{shown} ({rec['identity'][:12]})", keys
    name = _peft_base(adapter)
    if name is None:
        return "", None
    # a local path as PEFT recorded it (absolute, or relative to where the run was): compared by content
    return name, (base_keys(name) or None) if os.path.exists(name) else None


def other_base(adapter, base: str | os.PathLike, own=None) -> str | None:
    """The base ``adapter`` (a path) was trained on, as it records it, where
    that is clearly not ``base`` (their :func:`base_keys` do not meet;
    ``own``: a function giving ``base``'s, called only where the adapter
    records a base, where the caller reads them once for many adapters);
    None where it is, or where nothing comparable is recorded."""
    shown, keys = _trained_keys(adapter)
    if not keys:
        return None
    return shown if _clearly_other(keys, base_keys(base) if own is None else own()) else None


def _clearly_other(keys: set[str], own: set[str]) -> bool:
    """Whether two sets of :func:`base_keys` name two bases: none in common,
    and a kind in common to compare (an identity alone says nothing of a
    GGUF file not imported yet, whose key is its file's hash)."""
    kinds = {k.split(":", 1)[0] for k in keys} & {k.split(":", 1)[0] for k in own}
    return bool(kinds) and not keys & own


def warn_other_bases(adapters, base, what: str) -> None:
    """One :class:`~loramix.errors.LoramixWarning` per adapter (paths or
    loaded adapters with a ``path``) trained on another base than ``base``
    (a folder or a GGUF file; a loaded model is not compared): its shapes
    fit, so ``what`` (``"merged into it"``) goes on."""
    import functools

    from .errors import warn

    if not isinstance(base, (str, os.PathLike)):
        return
    own = functools.cache(functools.partial(base_keys, base))  # read once, only where an adapter records one
    for a in adapters:
        path = getattr(a, "path", a)
        if isinstance(path, (str, os.PathLike)) and (seen := other_base(path, base, own)) is not None:
            warn(f"{os.fspath(path)}: trained on another base, {seen}, than {os.fspath(base)}; its "
                 f"modules fit its shapes, so it is {what} all the same")  # fmt: skip


def warn_mixed_bases(adapters, what: str) -> None:
    """One :class:`~loramix.errors.LoramixWarning` per adapter (paths or
    loaded adapters with a ``path``) trained on another base than the first
    adapter that records a comparable one (:func:`_trained_keys`; their keys
    do not meet, :func:`_clearly_other`): a merge in adapter space (no
    ``--into``) has no base of its own to compare with, and its output
    records its first input's base, which the others' deltas were not
    trained against. ``what`` (``"merged with it"``) goes on: their shapes fit."""
    from .errors import warn

    first = None
    for a in adapters:
        path = getattr(a, "path", a)
        if not isinstance(path, (str, os.PathLike)):
            continue
        shown, keys = _trained_keys(path)
        if not keys:
            continue
        if first is None:
            first = (path, shown, keys)
        elif _clearly_other(keys, first[2]):
            warn(f"{os.fspath(path)}: trained on another base, {shown}, than {os.fspath(first[0])} "
                 f"({first[1]}); its modules fit, so it is {what} all the same")  # fmt: skip
