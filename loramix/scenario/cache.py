"""A content-addressed cache of scenario artifacts, so a run can resume.

Every artifact (a data split, the base model, an adapter, a merge, an
evaluation) is stored in ``ROOT/<kind>/<key>/`` where ``key`` is the sha256 of
a canonical JSON of everything that determines it::

    key = sha256(json({"kind": kind, "loramix": __version__, "spec": spec}))

``spec`` holds the settings, the sha256 of the data content and the keys of
the upstream artifacts (an adapter's spec names its base's key and its data
split's key, so rebuilding the base changes every key below it).

An artifact is made in a temporary folder beside its target and renamed into
place only when complete, with ``artifact.json`` (its spec and timing, and
the size and sha256 of each of its files) written last inside it, and every
file and folder of it ``fsync``'ed before the rename (the kind's folder after
it): an interrupted run, or a power loss, leaves no half artifact, and the
next run starts again from the first missing one. An entry damaged since (a
file truncated, emptied or rewritten, its ``artifact.json`` unreadable or
another entry's: :func:`entry_damage`) is said in one line on stderr and
made again, never read. A process making an artifact holds
a lock file beside it (``<kind>/.<key>.lock``, :class:`Making`): another
process (a second run on the same cache, or a node sharing it where its file
system's locks reach the nodes) asking for it meanwhile waits, and uses it
once made, or makes it itself if the maker failed or was killed. Where two
processes make it all the same (no locks there; ``fresh=True``, which does
not wait), the first rename wins and the others discard their copy, never
replacing a finished artifact, so a reader never sees a folder move.
``fresh=True`` remakes each artifact once per run (the first time this run
asks for it) and then reuses the new one.

Every lookup is logged (``hit``/``miss``/``fresh``) with the kind and key; the
runner writes that log beside the report (``cache_log.csv``), so one can check
that a second run trained nothing. A hit's seconds are 0, or the time it
waited for another process to make it; a miss's, the time its ``make`` took.

A result derived from cached ones by loramix alone (the predictors'
validation, a figure of the report, its per-domain tables:
:meth:`Cache.derived`) is cached too, keyed by the digest of its inputs and
of loramix's source (:func:`source_digest`), so that a rerun of a finished
study recomputes nothing, and a changed input or a changed line of loramix
redoes it.

The root defaults to ``$LORAMIX_CACHE`` when set, else ``.loramix-cache/`` in
the current folder. A root that loramix makes gets a ``.gitignore`` of ``*``
(:func:`make_root`), so git ignores the cache in whatever folder it is made.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import raise_machine_fault
from ..io.outputs import (
    PAYLOAD,
    new_temporary,
    raise_naming,
    remove_stale_temporaries,
    remove_temporary,
    swap_in,
    sync_folder,
    sync_published,
    sync_tree,
    usual_modes,
)
from ..stopping import cleanup

MARKER = "artifact.json"


def default_cache_dir() -> Path:
    from ..userpaths import env_path

    return env_path("LORAMIX_CACHE") or Path(".loramix-cache")


#: what a cache root that loramix makes holds as its ``.gitignore``: everything
GITIGNORE = "# made by loramix: the scenario cache, never to be committed\n*\n"


def make_root(root: Path) -> None:
    """Make the cache folder ``root`` where missing, with a ``.gitignore`` of
    ``*`` in it: a repository's own ``.gitignore`` names the cache at its top
    only, and a study run from a subfolder (or a ``$LORAMIX_CACHE`` inside
    another repository) would otherwise offer gigabytes to ``git add``. A
    folder that exists is left as it is (it may be the user's own)."""
    if root.is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: of two runs making the root at once, one writes it
        fd = os.open(root / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return
    try:  # synced as an entry is: a power loss must not leave the root without it, never rewritten
        os.write(fd, GITIGNORE.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_folder(root)


def check_cache_root(root: str | os.PathLike) -> Path:
    """``root``, refused in one line naming it where it exists and is not a
    folder (a file given as ``--cache`` or ``$LORAMIX_CACHE``): the run failed
    later naming a path inside it, and ``scenario check`` said ok."""
    from ..errors import UsageError

    root = Path(root)
    if root.is_symlink() and not root.exists():  # mkdir then said only 'File exists'
        raise UsageError(root, f"is a symlink to {os.readlink(root)}, which does not exist: the scenario cache "
                               "(--cache, or $LORAMIX_CACHE) must be a folder; make it, or remove the link")  # fmt: skip
    if root.exists() and not root.is_dir():
        raise UsageError(root, "is not a folder: the scenario cache (--cache, or $LORAMIX_CACHE) must be one")
    return root


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(kind: str, spec: dict) -> str:
    import hashlib

    payload = canonical_json({"kind": kind, "loramix": __version__, "spec": spec})
    return hashlib.sha256(payload.encode()).hexdigest()


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    import hashlib

    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@functools.cache
def source_digest() -> str:
    """sha256 of loramix's source: every ``loramix/**/*.py``, by path and
    content (a hundred files, hundredths of a second). The code version of
    a derived result (:meth:`Cache.derived`): one that takes seconds to redo
    is redone after any change of the code rather than kept stale, where an
    artifact that took a training keys on ``__version__`` alone."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(b"\0" + p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


#: files from this size on are hashed through loramix.io.filehash's cache at a lookup
HASH_CACHED_FROM = 1 << 20


def _intact(p: Path, st: os.stat_result, expected, name: str, memo, full: bool) -> bool:
    """Whether the entry's file ``p`` (of stat ``st``, its name in the cache
    ``name``) has the sha256 ``expected``. A large one through
    :func:`loramix.io.filehash.cached_file_sha256`, keyed by inode, size and
    times, so a warm rerun stats it instead of reading it again (a rewrite in
    place changes its times: rehashed); a small one directly (cheaper than
    that cache's synced entry), or not at all where ``memo``
    (:class:`~loramix.scenario.verified.Verified`) saw it match at the same
    identity. ``full``: every file read and hashed, whatever either memo
    says (``loramix cache verify``), and a large one that differs leaves
    the hash cache."""
    from ..io.st_header import file_sha256

    if full or st.st_size < HASH_CACHED_FROM:
        if memo is not None and not full and memo.vouches(name, st, expected):
            return True
        ok = file_sha256(p) == expected
        if ok and memo is not None:
            memo.learn(name, st, expected)
        if not ok and full and st.st_size >= HASH_CACHED_FROM:
            from ..io.filehash import forget

            forget(p)
        return ok
    from ..io.filehash import cached_file_sha256

    return cached_file_sha256(p) == expected


def _entry_files(folder: Path) -> list[str]:
    """The files of an entry ``folder`` but its marker: POSIX paths relative
    to it, sorted."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def manifest(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of the files of the
    entry being made in ``folder`` (its marker aside): what
    :func:`entry_damage` checks it against. One more read of files just
    written (in the page cache: 1.5 GB/s of sha256 here)."""
    from ..io.st_header import file_sha256

    return {rel: {"size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
            for rel in _entry_files(folder)}  # fmt: skip


#: :func:`entry_damage`'s answer for a folder that holds no entry (no marker): not damaged, missing
MISSING = "missing"


def entry_damage(
    target: Path, kind: str, key: str, *, contents: bool = True, memo=None, full: bool = False
) -> str | None:
    """Why ``target`` is not the complete artifact ``(kind, key)``: None
    where it is, :data:`MISSING` where it holds none (no ``artifact.json``),
    else the damage in a few words: its ``artifact.json`` unreadable, not
    JSON or another entry's (its ``kind`` and ``key``), or a file the marker
    lists (``files``: :func:`manifest`) missing, of another size or, with
    ``contents``, of another sha256. An entry of an earlier loramix, whose
    marker lists no files, is checked for JSON files that do not parse (a
    truncated or emptied ``result.json``). An entry that exists is otherwise
    trusted as its bytes reached the disk before its name (:meth:`Cache._make`);
    this finds what happened to it after: a disk error, a hand edit, a copy
    cut short. ``contents=False`` skips the hashing (sizes alone: a check
    that reads no file but the marker). ``memo``: a
    :class:`~loramix.scenario.verified.Verified` whose rows spare the
    hashing of files that matched before at the same ``stat`` identity
    (what that cannot see: :mod:`loramix.scenario.verified`); ``full``:
    every file hashed (:func:`_intact`). The machine failing under a file
    of it (``EIO``: :data:`~loramix.errors.MACHINE_ERRORS`) is not damage
    but its OSError, raised: said as damage, the entry was made again, hours
    of training perhaps, into the disk that failed."""
    try:
        text = (target / MARKER).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return MISSING if not target.is_file() else "it is a file, not a folder"
    except (OSError, UnicodeDecodeError) as e:
        raise_machine_fault(e, target / MARKER)  # the disk failing is not the entry's damage
        return f"{MARKER} cannot be read: {getattr(e, 'strerror', None) or e}"
    try:
        rec = json.loads(text)
    except ValueError:
        return f"{MARKER} is not valid JSON" if text.strip() else f"{MARKER} is empty"
    if not isinstance(rec, dict) or rec.get("kind") != kind or rec.get("key") != key:
        return f"{MARKER} is another artifact's"
    files = rec.get("files")
    if files is None:  # made by an earlier loramix: its JSON files at least must parse
        for rel in _entry_files(target) if contents else ():
            if rel.endswith(".json"):
                try:
                    json.loads((target / rel).read_bytes())
                except (OSError, ValueError) as e:
                    raise_machine_fault(e, target / rel)
                    return f"{rel} is not valid JSON"
        return None
    if not isinstance(files, dict):
        return f"{MARKER} lists its files wrongly"
    for rel, fact in sorted(files.items()):
        p = target / rel
        try:
            st = p.stat()
        except (OSError, ValueError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            return f"{rel} is missing"
        size = st.st_size
        if not isinstance(fact, dict) or size != fact.get("size"):
            return f"{rel} is {size} bytes, not the {fact.get('size') if isinstance(fact, dict) else '?'} written"
        if contents:
            try:
                if not _intact(p, st, fact.get("sha256"), f"{kind}/{target.name}/{rel}", memo, full):
                    return f"{rel} differs from what was written (sha256)"
            except OSError as e:
                raise_machine_fault(e, p)
                return f"{rel} cannot be read: {e.strerror or e}"
    return None


def verify_entries(root: Path) -> tuple[int, int, list[tuple[Path, str]]]:
    """Check every entry of the cache at ``root`` (every ``<kind>/<entry>/``
    but temporaries) with :func:`entry_damage` hashing every file
    (``full``): returns the entries checked, their bytes, and each damaged
    one with its damage. The memo rows of a damaged entry are forgotten
    (:mod:`.verified`), and those of intact files refreshed."""
    from .verified import Verified

    memo, n, size, damaged = Verified(root), 0, 0, []
    for kind in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(e for e in kind.iterdir() if e.is_dir() and not e.name.startswith(".")):
            try:
                key = json.loads((entry / MARKER).read_text()).get("key")
            except (OSError, ValueError, AttributeError):
                key = None
            # a marker that does not parse or names no key: entry_damage says which
            key = key if isinstance(key, str) and key[:24] == entry.name else entry.name
            why = entry_damage(entry, kind.name, key, memo=memo, full=True)
            if why == MISSING:
                continue  # a folder without a marker: a lookup makes it, nothing to verify
            n += 1
            size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            if why is not None:
                damaged.append((entry, why))
                memo.forget(f"{kind.name}/{entry.name}/")
    memo.save(root)
    return n, size, damaged


def remove_stale(root: Path) -> list[Path]:
    """Remove the temporaries of runs that were killed (their owner is gone)
    from the cache at ``root``; returns them."""
    kinds = [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []
    return [t for k in kinds for t in remove_stale_temporaries(k)]


#: the lock file beside an artifact being made (``<kind>/.<key>.lock``)
LOCK_SUFFIX = ".lock"


def _lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


class Making:
    """An exclusive ``flock`` of ``<kind>/.<key>.lock`` (:data:`LOCK_SUFFIX`),
    held while the artifact ``target`` is made; ``wait``: take it when its
    holder lets go (``waited``: the seconds that took), else give up at once.

    A process that asks for an artifact another one is making waits for it
    and then, finding it finished, uses it, instead of making it too; it
    makes it itself where the maker failed or was killed (the kernel lets go
    of a dead process's lock). The holder removes the lock file before letting
    go: a waiter still holds the file it opened, and whoever takes a later one
    finds the artifact first. So each lock is held by a process that either
    makes the artifact or finds it made: the makers never wait for one
    another, and nothing can deadlock (a step makes one artifact and asks for
    none while making it). After a maker that failed, a waiter and a
    newcomer may both make it: the rename decides. Where no lock can be had (no ``fcntl``, a file
    system that takes none) each process makes its own and the rename
    decides, as before; a file system whose locks do not reach other hosts
    (NFS mounted ``local_lock=flock``) excludes the processes of each host
    alone.

    The holder writes ``"<pid> <host>"`` into the lock file, so that a
    process about to wait says on stderr for whom (``label``: the
    artifact's name in the study, said beside its kind and key): a wait can
    last as long as the other run takes to train an adapter."""

    def __init__(self, target: Path, wait: bool = True, label: str = ""):
        self.path, self.wait = _lock_file(target), wait
        self.what = f"{target.parent.name} {target.name}" + (f" ({label})" if label else "")
        self.fd: int | None = None
        self.waited = 0.0
        self.busy = False  # held by another process, and not waited for

    def __enter__(self) -> Making:
        try:
            import fcntl

            self.fd = self._open()
        except (ImportError, OSError):
            return self
        t0 = time.perf_counter()
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    self.busy = True
                    raise
                _say(f"loramix: waiting for {self.what}, being made by another run{self._holder()}")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                self.waited = time.perf_counter() - t0
            self._sign()
        except OSError:  # held, and not waited for; or no locks here (ENOLCK): not held
            os.close(self.fd)
            self.fd = None
        except BaseException:  # an interrupt while waiting or signing: __exit__ will not run
            os.close(self.fd)
            raise
        return self

    def _open(self) -> int:
        """The lock file, made where missing, and its folder again where a
        ``cache clean`` removed it, emptied (:func:`remove_other_code_derived`),
        since the caller made it: the lock was then silently not taken."""
        for _ in range(3):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)

    def _sign(self) -> None:
        """``"<pid> <host>"`` into the lock file (a waiter's is overwritten)."""
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same; a waiter names no one
            pass

    def _holder(self) -> str:
        """`` (pid N)`` of the lock file's holder, `` (pid N on HOST)`` where it
        runs on another host; empty where unknown (taken a moment ago and not
        yet signed, or by a loramix that signed none)."""
        try:
            pid, host = os.pread(self.fd, 300, 0).decode().split()
            int(pid)
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})" if host == socket.gethostname() else f" (pid {pid} on {host})"

    @cleanup
    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # removed already (by a holder of an older one), or a read-only cache
        finally:
            os.close(self.fd)


def _say(line: str) -> None:
    # tqdm's write: a scenario bar drawn by this process is cleared and redrawn under the
    # line instead of being cut by it (a worker process has no bar: a plain line)
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def remove_stale_locks(root: Path) -> list[Path]:
    """Remove the lock files (:class:`Making`) of the cache at ``root`` that no
    process holds: those of makers that were killed, and not asked for
    since; returns them. Not when a run starts, as :func:`remove_stale` is:
    a lock file removed between a maker's opening it and its taking the
    lock lets a second process make the artifact too."""
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    for kind in [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []:
        for lock in kind.glob(f".*{LOCK_SUFFIX}"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock.unlink()
                removed.append(lock)
            except OSError:
                pass  # held: an artifact being made
            finally:
                os.close(fd)
    return removed


#: a Ray run's stop flag in the cache's root: ``.stop-<run key>`` (``executors._stop_flag``)
STOP_PREFIX = ".stop-"


#: seconds after which a stop flag whose run cannot be checked (no owner tag: an
#: older loramix's; or another host's) is over. A run reads its flag only while
#: it stops: its tasks look every 0.2 s and see it at once, and the run removes
#: it after at most ``executors.STOP_SECONDS`` (30 s); a day leaves room for a
#: run suspended in that window (a laptop asleep overnight) and for clock skew
#: between the hosts of a shared cache.
UNCHECKED_FLAG_SECONDS = 24 * 3600.0


def remove_finished_stop_flags(root: Path, *, now: float | None = None) -> list[Path]:
    """Remove the stop flags (``.stop-<32 hex>[.<owner tag>]``) of the cache at
    ``root`` whose run is over: killed while it stopped its Ray tasks (it
    removes its flag itself otherwise). Over means its process, named by the
    tag (:func:`~loramix.io.outputs.owner_gone`), is gone from this host; for
    a flag whose process cannot be checked (one without a tag, an older
    loramix's, or another host's), that it was last touched more than
    :data:`UNCHECKED_FLAG_SECONDS` before ``now`` (default: the clock).
    Returns them."""
    import re
    import time

    from ..io.outputs import owner_gone, tag_owner

    now = time.time() if now is None else now
    removed = []
    for flag in Path(root).glob(f"{STOP_PREFIX}*"):
        run = flag.name[len(STOP_PREFIX) :].split(".", 1)
        if not re.fullmatch(r"[0-9a-f]{32}", run[0]) or not flag.is_file():
            continue  # not a run's flag
        owner = tag_owner(run[1]) if len(run) == 2 else None
        try:
            if owner is not None and owner["host"] is not None:  # this host's process: is it gone?
                over = owner_gone(run[1])
            elif len(run) == 1 or owner is not None:  # no tag, or another host's process
                over = now - flag.stat().st_mtime > UNCHECKED_FLAG_SECONDS
            else:
                over = False  # a tag this loramix cannot read
        except OSError:
            continue  # gone meanwhile
        if over:
            flag.unlink(missing_ok=True)
            removed.append(flag)
    return removed


def _is_derived(spec) -> bool:
    return isinstance(spec, dict) and spec.keys() == {"inputs", "code"}


def remove_other_code_derived(root: Path) -> list[tuple[Path, int]]:
    """Remove the derived entries (:meth:`Cache.derived`) of the cache at
    ``root`` that another loramix source made (their spec's ``code`` is not
    :func:`source_digest`): this code never reads them again, and the code
    that made them, if it runs again, redoes them in seconds. Returns each
    with its size in bytes. Artifacts (keyed on ``__version__``: a training
    can take hours) are never touched, nor an entry whose lock
    (:class:`Making`) another process holds: it is being made again or
    replaced under ``--fresh``. Each goes by a rename into an owned
    temporary, so a killed clean leaves no half entry; a kind's folder this
    emptied goes too (``rmdir``: not one another process has put anything in,
    a lock file included, meanwhile)."""
    code, removed = source_digest(), []
    for kind in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        before = len(removed)
        writable = _remove_other_code_entries(kind, code, removed)
        if len(removed) > before:
            try:
                kind.rmdir()
            except OSError:
                pass  # not empty: this code's entries, artifacts, or another process's lock
        if not writable:  # a read-only cache: nothing can go
            break
    return removed


def _remove_other_code_entries(kind: Path, code: str, removed: list) -> bool:
    """:func:`remove_other_code_derived` in the folder ``kind``, appending to
    ``removed``; False where the cache cannot be written."""
    for entry in sorted(kind.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # a temporary or a lock file
        try:
            spec = json.loads((entry / MARKER).read_text()).get("spec")
        except (OSError, ValueError, AttributeError):
            continue  # no marker: not an entry this removes
        if not _is_derived(spec) or spec["code"] == code:
            continue
        with Making(entry, wait=False) as lock:
            if lock.busy:
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            try:
                owned = new_temporary(kind, entry.name)
            except OSError:
                return False
            try:
                os.replace(entry, owned / PAYLOAD)
                removed.append((entry, size))
            except OSError:
                pass  # gone meanwhile
            finally:
                remove_temporary(owned)
    return True


def is_cached(root: str | os.PathLike, kind: str, key: str) -> bool:
    """Whether the artifact ``(kind, key)`` is complete in the cache at ``root``
    (read only: unlike :class:`Cache`, nothing is cleaned)."""
    return entry_damage(Path(root) / kind / key[:24], kind, key, contents=False) is None


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
    _aside: object = None  # a TemporaryDirectory: derived results where the cache cannot be written
    _verified: object = None  # the lookups' memo (.verified.Verified), read at the first lookup

    def __post_init__(self):
        self.root = check_cache_root(self.root)
        remove_stale(self.root)

    @property
    def verified(self):
        """The memo of the files this cache's lookups found intact
        (:class:`~loramix.scenario.verified.Verified`), read once."""
        if self._verified is None:
            from .verified import Verified

            self._verified = Verified(self.root)
        return self._verified

    def save_verified(self) -> None:
        """Write what this process's lookups learned into the memo (once, at
        the end of a run: :meth:`.verified.Verified.save`)."""
        if self._verified is not None:
            self._verified.save(self.root)

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
        damage = entry_damage(target, kind, key, memo=self.verified)
        done = damage is None
        redo = self.fresh and key not in self._made_this_run
        if done and not redo:
            self.log.append(CacheEvent(kind, key, "hit", 0.0, label))
            return target
        make_root(self.root)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # said only 'File exists'
            from ..errors import UsageError

            raise UsageError(target.parent, f"is not a folder: the scenario cache keeps its {kind} entries there; "
                                            "move it away") from None  # fmt: skip
        # --fresh remakes it whoever else is making it: it does not wait
        with Making(target, wait=not redo, label=label) as lock:
            if not redo:  # made (or mended) meanwhile: by the process waited for, or just before the lock
                damage = entry_damage(target, kind, key, memo=self.verified)
                if damage is None:
                    self.log.append(CacheEvent(kind, key, "hit", lock.waited, label))
                    return target
            damaged = damage not in (None, MISSING)
            if damaged and not redo:  # --fresh remakes it all the same: nothing to say
                _say(f"loramix: warning: the cached {kind} {target.name}" + (f" ({label})" if label else "")
                     + f" in {self.root} is damaged ({damage}): made again")  # fmt: skip
            # a maker killed before us (the lock was its) left its temporary: it goes now
            remove_stale_temporaries(target.parent, target.name)
            seconds = self._make(kind, key, spec, make, label, target, redo or damaged)
        self._made_this_run.add(key)
        self.log.append(
            CacheEvent(kind, key, "fresh" if redo and (done or damaged) else "miss", seconds, label)
        )
        return target

    def _make(self, kind: str, key: str, spec: dict, make, label: str, target: Path, redo: bool) -> float:
        """Make the artifact into an owned temporary and rename it to
        ``target``; returns the seconds ``make`` took."""
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
                      "spec": spec, "info": info, "files": manifest(tmp)}  # fmt: skip
            with open(tmp / MARKER, "w") as f:
                json.dump(record, f, indent=2, sort_keys=True, default=str)
            usual_modes(tmp)
            # an entry that exists is trusted: its bytes reach the disk before its name does
            sync_tree(tmp)
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
            sync_published(target)  # the entry is whole and in place: a warning where the disk fails this
        except BaseException as e:
            raise_naming(e, (tmp, owned), target)  # a full disk names the artifact, not its temporary
        finally:
            remove_temporary(owned)
        return seconds

    @staticmethod
    def _swap(tmp: Path, target: Path) -> None:
        """``tmp`` (in its owned temporary) in place of ``target``, which goes
        into that temporary, to be removed with it; all or nothing
        (:func:`~loramix.io.outputs.swap_in`)."""
        swap_in(tmp, target)

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

    def derived(self, kind: str, inputs, make: Callable[[Path], dict | None], label: str = "") -> Path:
        """The folder of a result that loramix computes from ``inputs`` alone
        (JSON-able: what it reads, every setting that changes it), made by
        ``make(tmp)`` if needed (:meth:`get_or_make`): its spec is
        ``{"inputs": digest(inputs), "code": source_digest()}``.

        Where the cache cannot be written (a read-only mount, another
        user's folder) a missing one is made in a private temporary folder
        instead, removed with this :class:`Cache` or at exit: a rerun on a
        read-only cache of a finished study only read it before derived
        results were cached, and still goes through."""
        spec = {"inputs": digest(inputs), "code": source_digest()}
        try:
            return self.get_or_make(kind, spec, make, label)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        return self._made_aside(kind, make_key(kind, spec), make)

    def _made_aside(self, kind: str, key: str, make: Callable[[Path], dict | None]) -> Path:
        """``make(folder)`` into a folder of this cache's private temporary one
        (made once per key)."""
        if self._aside is None:
            import tempfile

            self._aside = tempfile.TemporaryDirectory(prefix="loramix-derived-")
        folder = Path(self._aside.name) / kind / key[:24]
        if not folder.is_dir():
            tmp = folder.with_name(folder.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)  # an earlier make that raised
            tmp.mkdir(parents=True)
            make(tmp)
            tmp.rename(folder)
        return folder

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
