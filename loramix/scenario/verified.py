"""What the scenario cache's lookups found intact, remembered by ``stat``.

A lookup checks each file of an entry against the sha256 its
``artifact.json`` lists (:func:`loramix.scenario.cache.entry_damage`).
Reading every small file again at every lookup cost a warm rerun about
0.7 s per GB of them. A file that matched is remembered here by its path in
the cache and its identity, as git's index and :mod:`loramix.io.filehash`
do::

    row = [st_ino, st_size, st_mtime_ns, st_ctime_ns, sha256]

and a later lookup that finds the same identity and expects the same sha256
takes the file as intact without reading it. Any write to the file (a
truncation, an edit in place, a copy over it, ``touch``), a replacement (new
inode) or a ``chmod`` changes the identity, and the file is hashed again.
What the identity cannot show is damage that leaves the file's metadata as
it was: bits that rot on the disk under the file system, a write to the
block device, another host writing a shared file system whose times lag.
``loramix cache verify`` hashes every file, whatever this memo says, and
forgets the rows of what it finds damaged.

A file whose change time is less than :data:`~loramix.io.filehash.RACY_NS`
old is not remembered: a rewrite within the file system's timestamp tick
could keep its identity (git's "racy" files). So a run's own new entries are
remembered by the next run that looks them up.

The memo of a cache root is one JSON file of the per-user cache
(``$LORAMIX_CACHE_DIR/verified/<sha256 of the root's resolved path>.json``,
:func:`loramix.io.filehash.cache_dir`: writable where the scenario cache may
not be, and one per host of a shared root, whose ``stat`` each host sees its
own way), read once per run and written once at its end where it learned
something, through a temporary named after its writer and a rename. It is
not ``fsync``'ed: a memo lost costs one more hash of each file, and one
that does not parse is ignored; a row can only vouch for an identity that
the file had when it matched. Two runs saving at once: the last rename
wins, and the other's rows are learned again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

#: the folder of the per-user cache the memos live in (listed in filehash.WRITTEN_FOLDERS)
FOLDER = "verified"


def memo_file(root: Path) -> Path:
    from ..io.filehash import cache_dir

    name = hashlib.sha256(str(Path(root).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir() / FOLDER / f"{name}.json"


def _entry_of(name: str) -> str:
    """``<kind>/<entry>`` of a row's name."""
    return "/".join(name.split("/", 2)[:2])


def _row(st: os.stat_result, sha256: str) -> list:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256]


class Verified:
    """The memo of the cache at ``root``: ``{"<kind>/<entry>/<file>": row}``."""

    def __init__(self, root: Path):
        self.path = memo_file(root)
        self.rows = self._read()
        self.learned: dict[str, list] = {}
        self.forgotten: set[str] = set()

    def _read(self) -> dict:
        try:
            rows = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return rows if isinstance(rows, dict) else {}

    def vouches(self, name: str, st: os.stat_result, sha256) -> bool:
        """Whether the file ``name`` (its path in the cache), of stat ``st``,
        matched ``sha256`` when it last had this identity."""
        return isinstance(sha256, str) and self.rows.get(name) == _row(st, sha256)

    def learn(self, name: str, st: os.stat_result, sha256: str) -> None:
        """The file ``name``, of stat ``st`` taken before it was hashed,
        matched ``sha256``: remembered unless it changed too recently."""
        from ..io.filehash import RACY_NS

        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return
        row = _row(st, sha256)
        if self.rows.get(name) != row:
            self.rows[name] = self.learned[name] = row
            self.forgotten.discard(name)

    def forget(self, prefix: str) -> None:
        """Forget the rows of the entry ``<kind>/<entry>/`` (``prefix``)."""
        for name in [n for n in self.rows if n.startswith(prefix)]:
            del self.rows[name]
            self.learned.pop(name, None)
            self.forgotten.add(name)

    def save(self, root: Path) -> None:
        """Write what this run learned or forgot into the memo file (as it is
        now: another run's rows kept), dropping the rows of entries no longer
        in the cache at ``root``. Never raises: a memo not written costs
        hashes, not results."""
        if not self.learned and not self.forgotten:
            return
        from ..io.outputs import temporary_file

        rows = self._read()
        rows.update(self.learned)
        for name in self.forgotten:
            rows.pop(name, None)
        here = {e: (Path(root) / e).is_dir() for e in {_entry_of(n) for n in rows}}
        rows = {n: r for n, r in rows.items() if here[_entry_of(n)]}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_file(self.path)
            tmp.write_text(json.dumps(rows, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            if tmp is not None:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
            return
        self.learned.clear()
        self.forgotten.clear()
