"""sha256 of weight files: cached on disk, and started before torch loads.

Every merge into a base records the base's sha256 (its provenance). A file's
hash is remembered under :func:`cache_dir` by (resolved path, inode, size,
change time and mtime in ns), as git's index does, so a base is hashed once
per change (a rename, a chmod or a new hard link change the change time
too: one more hash). An entry is ``fsync``'ed before it is renamed into
place, and its folder after, as every cache entry (about 4 ms, once per
file hashed): it keys a GGUF import's folder and a study's given adapters,
where a lost write that left another hash would be a wrong cache hit.

The first merge into a base must hash it (and its adapters). A command line
knows its inputs before it imports torch (about 2 s on one core, while the
other cores idle), so ``loramix sum/merge`` call :func:`prefetch_inputs`
first: a daemon thread hashes the files during the import (hashlib releases
the GIL) and :func:`cached_file_sha256` later waits for that thread's answer
instead of hashing the file again. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from .outputs import ORPHAN_SECONDS, remove_stale_temporaries, sync_fd, sync_folder, temporary_file
from .st_header import file_sha256

# A model folder's weight files (loramix.io.model_folder reads them from here: one place).
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def cache_dir() -> Path:
    """``$LORAMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/loramix``, else ``~/.cache/loramix``."""
    from ..userpaths import env_path

    return env_path("LORAMIX_CACHE_DIR") or (env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramix"


#: the folders of :func:`cache_dir` whose files are written through temporaries
#: (``bases/`` has its own: :func:`loramix.gguf_import.remove_stale_imports`)
WRITTEN_FOLDERS = ("sha256", "layouts", "native", "prefix", "verified")
#: the temporaries of older loramix in sha256/ (``<key>.tmp<pid>.<thread>``) and
#: layouts/ (``<key>.tmp<pid>``), which name no host and no process start
_PID_ONLY = re.compile(r"\.tmp\d+(\.\d+)?$")


def remove_stale_cache_temporaries() -> list[Path]:
    """Remove from :data:`WRITTEN_FOLDERS` of :func:`cache_dir` the temporaries
    of writers that were killed (``kill -9``, between the write and the
    rename), and return them. A temporary's name says its host, pid and
    process start (:func:`loramix.io.outputs.temporary_file`): it is removed
    when that process is gone on this host, so a live writer's stays (a pid
    reused since is told apart by its start); another host's is kept, as it
    cannot be checked. One named by the pid alone (an older loramix) is
    removed once :data:`~loramix.io.outputs.ORPHAN_SECONDS` old: its writer
    wrote a few kilobytes and renamed them at once."""
    removed = []
    for part in WRITTEN_FOLDERS:
        folder = cache_dir() / part
        removed += remove_stale_temporaries(folder)
        if part not in ("sha256", "layouts"):
            continue
        try:
            entries = [e for e in os.scandir(folder) if _PID_ONLY.search(e.name)]
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False) and time.time() - e.stat().st_mtime >= ORPHAN_SECONDS:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except OSError:
                pass  # gone meanwhile (renamed by its writer, or removed by another clean)
    return removed


class HashingStopped(Exception):
    """Hashing was abandoned because its ``stop`` event was set."""


# Hashes in flight in this process (started by prefetch), by file identity.
_PENDING: dict[str, Future] = {}
_LOCK = threading.Lock()


def _sha256(path: Path, stop: threading.Event | None, chunk: int = 8 << 20) -> str:
    if stop is None:
        return file_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop.is_set():  # an interrupted merge should not wait for a 10 GB hash
                raise HashingStopped(str(path))
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> str | None:
    try:
        st = path.stat()
        # the change time too: a tool that puts the mtime back after rewriting a file
        # in place (touch -d, touch -r, rsync --inplace) cannot put it back (git's index
        # keeps it for that); the mtime stays last, for _store
        return f"{path.resolve()}\0{st.st_ino}\0{st.st_size}\0{st.st_ctime_ns}\0{st.st_mtime_ns}"
    except OSError:
        return None


def _entry(ident: str) -> Path:
    return (
        cache_dir()
        / "sha256"
        / (hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".txt")
    )


def _cached(ident: str) -> str | None:
    try:
        digest = _entry(ident).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    # anything but 64 hex digits is a damaged entry (a disk that lost a write): rehashed
    return digest if _DIGEST.fullmatch(digest) else None


_DIGEST = re.compile(r"[0-9a-f]{64}")


#: a file modified this recently (ns) is hashed but its hash not remembered:
#: a rewrite within the file system's timestamp tick (milliseconds) could
#: keep size, inode and mtime, and so the identity (git's "racy" files)
RACY_NS = 2_000_000_000


def _store(ident: str, digest: str) -> None:
    mtime_ns = int(ident.rsplit("\0", 1)[1])
    if time.time_ns() - mtime_ns < RACY_NS:
        return
    entry = _entry(ident)
    # a temporary whose name says who writes it, so that `cache clean` knows one left by
    # a killed process (not atomic_write: its sweep of this folder, which grows by one
    # entry per file ever hashed, would cost more than the write)
    tmp = temporary_file(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(digest + "\n")
            f.flush()
            # on the disk before its name, as every cache entry: an entry keys a GGUF
            # import's folder and a study's given adapters, where one that named
            # another file's hash would be a wrong cache hit, not a rehash
            sync_fd(f.fileno())
        os.replace(tmp, entry)
        sync_folder(entry.parent)
    except OSError:  # a read-only or full cache only costs the rehash
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only one fails this too (EROFS before ENOENT)


def forget(path: Path) -> None:
    """Remove the remembered hash of ``path`` at its identity now: one found
    not to match what it should be (``loramix cache verify``), with its
    identity unchanged (bits rotten under the file system), is hashed again
    at its next use instead of vouched for."""
    ident = _identity(Path(path))
    if ident is not None:
        try:
            _entry(ident).unlink(missing_ok=True)
        except OSError:
            pass


def _wait(fut: Future, stop: threading.Event | None) -> str | None:
    """The prefetched hash, or None if its thread failed (then the caller
    hashes); :class:`HashingStopped` once ``stop`` is set."""
    while True:
        try:
            return fut.result(timeout=0.05)
        except FutureTimeout:
            if stop is not None and stop.is_set():
                raise HashingStopped("waiting for a prefetched hash") from None
        except Exception:
            return None


def cached_file_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a file, cached under :func:`cache_dir` by its resolved path,
    inode, size, change time and mtime (ns); any change means a rehash. A hash that
    :func:`prefetch` has in flight for the same file is waited for, not
    repeated."""
    path = Path(path)
    ident = _identity(path)
    if ident is None:
        return _sha256(path, stop)
    with _LOCK:
        fut = _PENDING.get(ident)
    if fut is not None and (digest := _wait(fut, stop)) is not None:
        return digest
    digest = _cached(ident)
    if digest is not None:
        return digest
    digest = _sha256(path, stop)
    _store(ident, digest)
    return digest


def model_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder as :class:`BaseModelFolder` hashes
    them (the shards named by the index and the index itself, or
    ``model.safetensors``), read without validating anything; [] for
    anything else (a GGUF file, a broken folder: those are for the real
    reader to report)."""
    folder = Path(folder)
    try:
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted({str(v) for v in weight_map.values()})
            files = [folder / n for n in names if "/" not in n and "\\" not in n]
            return [*files, index]
        single = folder / SINGLE_NAME
        return [single] if single.is_file() else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def prefetch(paths) -> None:
    """Start hashing ``paths`` (those not cached yet) in one daemon thread,
    in order; :func:`cached_file_sha256` picks the results up. Never raises:
    a file that cannot be hashed here is hashed, or reported, by the caller
    later. A daemon: a command that fails on its input exits at once."""
    todo = []
    with _LOCK:
        for p in map(Path, paths):
            ident = _identity(p)
            if ident is None or ident in _PENDING or _cached(ident) is not None:
                continue
            fut: Future = Future()
            _PENDING[ident] = fut
            todo.append((p, ident, fut))
    if not todo:
        return

    def run() -> None:
        for p, ident, fut in todo:
            try:
                digest = _sha256(p, None)
            except BaseException as e:  # the caller hashes it again, and reports what fails
                fut.set_exception(e)
                continue
            _store(ident, digest)
            fut.set_result(digest)

    threading.Thread(target=run, name="loramix-prefetch-sha256", daemon=True).start()


def adapter_weight_file(adapter: str | os.PathLike) -> list[Path]:
    """``[adapter_model.safetensors]`` of an adapter folder, or the file
    itself when it is a ``.safetensors`` file; [] otherwise."""
    p = Path(adapter)
    try:
        if p.is_dir():
            f = p / "adapter_model.safetensors"
            return [f] if f.is_file() else []
        return [p] if p.suffix == ".safetensors" and p.is_file() else []
    except OSError:
        return []


def adapter_sha256(adapter: str | os.PathLike) -> str | None:
    """sha256 of ``adapter``'s weights file (a folder's ``adapter_model.*``, or
    the file given), as :attr:`loramix.adapter.Adapter.sha256` and a merge's
    provenance record it; cached (:func:`cached_file_sha256`). None where
    there is no adapter to read there (the machine failing under it raises
    its OSError, :data:`~loramix.errors.MACHINE_ERRORS`)."""
    from ..errors import LoramixError, raise_machine_fault
    from .peft_layout import resolve_adapter_paths

    try:
        weights = resolve_adapter_paths(adapter)[2]
        return cached_file_sha256(weights) if weights.is_file() else None
    except (LoramixError, OSError) as e:
        raise_machine_fault(e, adapter)  # a failing disk is no "no adapter here" (a null in eval's JSON)
        return None


def adapter_identity_of(config: dict, weights_sha256: str) -> str:
    """The identity of an adapter in PEFT's layout, from its parsed
    ``adapter_config.json`` and its weights file's sha256::

        sha256("adapter_config.json:" + sha256(canonical JSON of the config) + "\\n"
               + "weights:" + weights_sha256 + "\\n")

    The canonical JSON (keys sorted at every level, no whitespace, ASCII
    escapes) is of the config as loramix reads it, so two files that differ
    only in key order, whitespace or escapes (or in a duplicate key's
    earlier value, which the parser drops) are one adapter, and any field
    that changes the delta (``lora_alpha``, ``target_modules``,
    ``rank_pattern``, ``use_dora``, D2-LoRA's fields) makes another. The
    file names are not in it: a renamed ``.safetensors`` file is the same
    adapter. :attr:`loramix.adapter.Adapter.identity`, a merge's
    provenance (``identity`` of each adapter input), ``eval --format
    json``'s ``adapter_identity`` and a study's given adapter's cache key
    (:func:`loramix.scenario.given.given_key`) are all this."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    lines = f"adapter_config.json:{hashlib.sha256(canon.encode()).hexdigest()}\nweights:{weights_sha256}\n"
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_identity(adapter: str | os.PathLike) -> str:
    """The identity of the adapter at ``adapter`` (a folder, or a
    ``.safetensors`` file with its config beside it):
    :func:`adapter_identity_of` its config and weights file for PEFT's
    layout; for an adapter in another layout (a reader's own, which names
    no config), ``sha256("name:sha256\\n" per file of its folder, or the
    file given, sorted)``. The weights' hashes are cached on disk
    (:func:`cached_file_sha256`). Raises :class:`loramix.errors.AdapterError`
    (one line) where no adapter is there, or its config is not PEFT's."""
    from .peft_layout import check_adapter_path

    p = Path(adapter)
    _, cfg, weights, config = check_adapter_path(p)
    if cfg is not None:
        return adapter_identity_of(config, cached_file_sha256(weights))
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    lines = sorted(f"{f.name}:{cached_file_sha256(f)}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def adapter_identity_or_none(adapter: str | os.PathLike) -> str | None:
    """:func:`adapter_identity`, or None where there is no adapter to read there
    (the machine failing under it raises its OSError, :data:`~loramix.errors.MACHINE_ERRORS`)."""
    from ..errors import LoramixError, raise_machine_fault

    try:
        return adapter_identity(adapter)
    except (LoramixError, OSError) as e:
        raise_machine_fault(e, adapter)  # a failing disk is no "no adapter here" (fit: "it has changed")
        return None


def prefetch_inputs(adapters=(), base: str | os.PathLike | None = None) -> None:
    """:func:`prefetch` of the adapters' weight files (read first) and a
    base model folder's weight files (nothing for None or anything that is
    not a safetensors model folder)."""
    files = [f for a in adapters for f in adapter_weight_file(a)]
    if base is not None:
        files += model_weight_files(base)
    prefetch(files)
