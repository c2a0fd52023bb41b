"""A content-addressed cache of scenario artifacts, so a run can resume.

Every artifact (a data split, the base model, an adapter, a merge, an
evaluation) is stored in ``ROOT/<kind>/<key>/`` where ``key`` is the sha256 of
a canonical JSON of everything that determines it::

    key = sha256(json({"kind": kind, "loramix": __version__, "spec": spec}))

``spec`` holds the settings, the sha256 of the data content and the keys of
the upstream artifacts (an adapter's spec names its base's key and its data
split's key, so rebuilding the base changes every key below it).

An artifact is made in a temporary folder beside its target and renamed into
place only when complete, with ``artifact.json`` (its spec and timing) written
last inside it: an interrupted run leaves no half artifact, and the next run
starts again from the first missing one. Several processes (or nodes sharing
the folder) may make the same artifact at once: the first rename wins and the
others discard their copy, never replacing a finished artifact, so a reader
never sees a folder move. ``fresh=True`` remakes each artifact
once per run (the first time this run asks for it) and then reuses the new one.

Every lookup is logged (``hit``/``miss``/``fresh``) with the kind and key; the
runner writes that log beside the report (``cache_log.csv``), so one can check
that a second run trained nothing.

The root defaults to ``$LORAMIX_CACHE`` when set, else ``.loramix-cache/`` in
the current folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..io.outputs import (
    PAYLOAD,
    new_temporary,
    raise_naming,
    remove_stale_temporaries,
    remove_temporary,
    usual_modes,
)

MARKER = "artifact.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAMIX_CACHE") or ".loramix-cache")


def check_cache_root(root: str | os.PathLike) -> Path:
    """``root``, refused in one line naming it where it exists and is not a
    folder (a file given as ``--cache`` or ``$LORAMIX_CACHE``): the run failed
    later naming a path inside it, and ``scenario check`` said ok."""
    from ..errors import UsageError

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(root, "is not a folder: the scenario cache (--cache, or $LORAMIX_CACHE) must be one")
    return root


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(kind: str, spec: dict) -> str:
    import hashlib

    payload = canonical_json({"kind": kind, "loramix": __version__, "spec": spec})
    return hashlib.sha256(payload.encode()).hexdigest()


def remove_stale(root: Path) -> list[Path]:
    """Remove the temporaries of runs that were killed (their owner is gone)
    from the cache at ``root``; returns them."""
    kinds = [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []
    return [t for k in kinds for t in remove_stale_temporaries(k)]


def is_cached(root: str | os.PathLike, kind: str, key: str) -> bool:
    """Whether the artifact ``(kind, key)`` is complete in the cache at ``root``
    (read only: unlike :class:`Cache`, nothing is cleaned)."""
    return (Path(root) / kind / key[:24] / MARKER).is_file()


@dataclass
class CacheEvent:
    kind: str
    key: str
    status: str  # hit | miss | fresh
    seconds: float
    label: str = ""


@dataclass
class Cache:
    root: Path
    fresh: bool = False
    log: list[CacheEvent] = field(default_factory=list)
    _made_this_run: set = field(default_factory=set)

    def __post_init__(self):
        self.root = check_cache_root(self.root)
        remove_stale(self.root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:24]

    def has(self, kind: str, key: str) -> bool:
        return is_cached(self.root, kind, key)

    def get_or_make(
        self, kind: str, spec: dict, make: Callable[[Path], dict | None], label: str = ""
    ) -> Path:
        """The folder of the artifact ``(kind, spec)``, made by ``make(tmp)`` if needed.

        ``make`` writes the artifact into ``tmp`` and may return a dict of
        extra facts, stored in ``artifact.json`` under ``info``.
        """
        key = make_key(kind, spec)
        target = self.path(kind, key)
        done = (target / MARKER).is_file()
        redo = self.fresh and key not in self._made_this_run
        if done and not redo:
            self.log.append(CacheEvent(kind, key, "hit", 0.0, label))
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # the artifact is made inside an owned temporary, which keeps its owner.json until it
        # is removed: a run killed at any point (a replaced folder swapped into it included)
        # leaves a temporary that a later run removes
        owned = new_temporary(target.parent, target.name)
        tmp = owned / PAYLOAD
        t0 = time.perf_counter()
        try:
            tmp.mkdir()
            info = make(tmp) or {}
            seconds = time.perf_counter() - t0
            record = {"kind": kind, "key": key, "label": label, "loramix_version": __version__,
                      "seconds": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "spec": spec, "info": info}  # fmt: skip
            with open(tmp / MARKER, "w") as f:
                json.dump(record, f, indent=2, sort_keys=True, default=str)
            usual_modes(tmp)
            if redo and target.exists():
                self._swap(tmp, target)
            else:
                try:
                    os.replace(tmp, target)
                except OSError:  # the target exists: another process finished it first
                    if (target / MARKER).is_file():
                        pass  # keep theirs (same spec, same content); ours goes with the temporary
                    elif target.exists():
                        self._swap(tmp, target)  # a stale folder without its marker
                    else:
                        raise
        except BaseException as e:
            raise_naming(e, (tmp, owned), target)  # a full disk names the artifact, not its temporary
        finally:
            remove_temporary(owned)
        self._made_this_run.add(key)
        self.log.append(CacheEvent(kind, key, "fresh" if done else "miss", seconds, label))
        return target

    @staticmethod
    def _swap(tmp: Path, target: Path) -> None:
        """``tmp`` (in its owned temporary) in place of ``target``, which goes
        into that temporary, to be removed with it."""
        os.replace(target, tmp.parent / "replaced")
        os.replace(tmp, target)

    def record(self, kind: str, key_or_path) -> dict:
        p = key_or_path if isinstance(key_or_path, Path) else self.path(kind, key_or_path)
        return json.loads((p / MARKER).read_text())

    def json_artifact(self, kind: str, spec: dict, compute: Callable[[], dict], label: str = "") -> dict:
        """A small JSON result (an evaluation): computed once, then read back."""

        def make(tmp: Path):
            with open(tmp / "result.json", "w") as f:
                json.dump(compute(), f, indent=2, sort_keys=True)

        folder = self.get_or_make(kind, spec, make, label)
        return json.loads((folder / "result.json").read_text())

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {hit: n, miss: n, fresh: n}}`` over this run's lookups."""
        out: dict[str, dict[str, int]] = {}
        for e in self.log:
            d = out.setdefault(e.kind, {"hit": 0, "miss": 0, "fresh": 0})
            d[e.status] += 1
        return out

    def write_log(self, path: Path) -> None:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "key", "status", "seconds", "label"])
            for e in self.log:
                w.writerow([e.kind, e.key, e.status, f"{e.seconds:.3f}", e.label])
