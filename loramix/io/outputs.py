"""Atomic outputs and provenance (docs/merging.md, "Outputs").

Everything is written into a temporary folder beside the target (a short
name, ``.lmx-<8 hex>``, so that any legal target name works) and renamed into
place at the end, so an error or an interrupt leaves nothing half-written.
An existing target is refused unless ``force``; a target that is (or
contains, or lies inside) an input is always refused. The final rename never
replaces a target that appeared while the run was writing (another run, say)
unless ``force``: it is an atomic no-replace rename (``renameat2`` with
``RENAME_NOREPLACE``; where the system lacks it, a check and rename under an
exclusive ``flock`` of the parent folder).

A temporary folder holds ``owner.json`` (pid, host, process start time,
target) while it is written; a run that is killed (``kill -9``) cannot remove
its own, so the next run to the same target, and
:func:`remove_stale_temporaries`, remove those whose owner is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

TMP_PREFIX = ".lmx-"
OWNER_NAME = "owner.json"
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
NAME_MAX = 255


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def normalized_path(path: str | os.PathLike) -> str:
    """An input's path as provenance records it: absolute and normalised
    (no ``..``; symlinks kept), so that the same input named relatively or
    absolutely gives the same record and byte-identical output files."""
    return os.path.abspath(os.fspath(path))


def check_output(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work starts; return it as a Path."""
    if out is None or not str(os.fspath(out)).strip():
        raise OutputError("--out", "is empty; give the folder to write")
    out = Path(out)
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise OutputError(out, f"the name is longer than {NAME_MAX} bytes, which no file system allows")
    for inp in inputs:
        if inp is not None and _overlaps(out, Path(inp)):
            raise OutputError(out, f"output would overwrite the input {inp}; choose another --out")
    if os.path.lexists(out) and not force:
        raise OutputError(out, "already exists; pass --force to replace it")
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    return out


# ---- owners of temporary folders ---------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which
    tells a live owner from a later process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _owner_record(target: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "target": target}  # fmt: skip


def _owner_alive(rec: dict) -> bool:
    """Whether the process that made a temporary may still be writing it.
    Another host's owner cannot be checked: it counts as alive."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return rec.get("start") is None or _start_time(pid) == rec.get("start")


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Remove the temporary folders (``.lmx-*`` with an ``owner.json``) in
    ``folder`` whose owning process is gone; only those for ``target`` (a
    name in ``folder``) when given. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            rec = json.loads(Path(entry.path, OWNER_NAME).read_text())
        except (OSError, ValueError):
            continue  # not ours, or finishing right now: leave it
        if not isinstance(rec, dict) or (target is not None and rec.get("target") != target):
            continue
        if not _owner_alive(rec):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def new_temporary(parent: Path, target: str) -> Path:
    """A fresh temporary folder ``parent/.lmx-<8 hex>`` for ``target`` (a
    name in ``parent``), with its ``owner.json``; remove that record with
    :func:`release_temporary` before renaming the folder into place."""
    tmp = Path(parent) / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        (tmp / OWNER_NAME).write_text(json.dumps(_owner_record(target)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def release_temporary(tmp: Path) -> None:
    """Drop ``tmp``'s owner record: it is complete and about to be renamed."""
    (Path(tmp) / OWNER_NAME).unlink(missing_ok=True)


# ---- the final rename ----------------------------------------------------------------


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the file
    system does not offer it; an OSError for any other failure."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _appeared(out: Path) -> OutputError:
    return OutputError(out, "appeared while loramix was writing it (another run?); it was left as it "
                            "is and nothing was written; pass --force to replace it")  # fmt: skip


def _locked_rename(tmp: Path, out: Path, force: bool) -> None:
    """Check and rename under an exclusive ``flock`` of the parent folder:
    for systems without ``renameat2``; excludes other loramix runs."""
    import fcntl

    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.lexists(out):
            if not force:
                raise _appeared(out)
            old = out.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``out`` atomically. Without
    ``force`` a target that exists now (it appeared during the run) is left
    untouched and an :class:`OutputError` raised; with ``force`` it is
    swapped out atomically (``RENAME_EXCHANGE``) and removed."""
    for _ in range(8):  # with force, the target may come and go meanwhile
        try:
            done = _rename(tmp, out, _RENAME_NOREPLACE)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not force:
                raise _appeared(out) from None
            try:
                done = _rename(tmp, out, _RENAME_EXCHANGE)
            except FileNotFoundError:
                continue  # the target vanished between the two calls: try again
            if done:
                shutil.rmtree(tmp, ignore_errors=True)  # now the old target
        if not done:
            _locked_rename(tmp, out, force)
        return
    raise OutputError(out, "kept changing while loramix tried to replace it")


@contextmanager
def atomic_output_dir(
    out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out``.

    On any exception (``KeyboardInterrupt`` included) the temporary folder is
    removed and ``out`` is left as it was. Stale temporaries of earlier runs
    to ``out`` (their owner is gone) are removed first; a target that
    appears meanwhile is refused at the end unless ``force``
    (:func:`publish`).
    """
    out = check_output(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    try:
        tmp = new_temporary(out.parent, out.name)
    except OSError as e:
        raise OutputError(out, f"cannot write beside it: {e.strerror or e}") from None
    try:
        yield tmp
        release_temporary(tmp)
        publish(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # name the output, not its temporary (nor nothing, for a full disk)
            inside = str(e.filename or tmp)
            if inside.startswith(str(tmp)):
                e.filename = str(out) + inside[len(str(tmp)) :]
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator:
    """Write one file through a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def provenance(method: str, parameters: dict, inputs: list[dict], **extra) -> dict:
    """The provenance record written into every output.

    ``inputs`` are dicts with at least ``path`` and ``sha256`` (an
    :meth:`Adapter.provenance` or a base model's record).
    """
    from .. import __version__

    rec = {
        "loramix_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "parameters": parameters,
        "inputs": inputs,
    }
    rec.update(extra)
    return rec


def write_provenance(folder: str | Path, record: dict, filename: str = "loramix.json") -> Path:
    path = Path(folder) / filename
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return path
