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
target) while it is written, and is made and removed under a name that says
its owner (:func:`temporary_file`'s); a run that is killed (``kill -9``) at
any point cannot remove its own, so the next run to the same target, and
:func:`remove_stale_temporaries`, remove those whose owner is gone. An output
folder is written inside its temporary (``.lmx-<hex>/output``), so the
temporary keeps its ``owner.json`` to the end: through the rename, and after
it, when a replaced target lies there until it is removed. A temporary file
(:func:`atomic_write`) carries the same facts in its name.

A full disk (or a file-size limit) is the output's problem whatever file
was being written or copied when it struck: the error names the output.

Before the final rename every file of the output, and every folder, is
``fsync``'ed (:func:`sync_tree`), and the parent folder after it
(:func:`sync_folder`): the rename is what makes an output (or a scenario
cache entry) exist, so after a power loss or an OS crash one that exists
holds all its bytes, instead of a name whose data never reached the disk.
An error the disk reports only then (a delayed write's ``EIO``, a network
file system's ``ENOSPC``) fails the command like any other, naming the
output. One that fails only the parent folder's ``fsync``, after the rename
(:func:`sync_published`), is a warning: the output is whole and in place,
only its name's durability is unconfirmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from ..errors import OutputError, UsageError
from ..stopping import cleanup

TMP_PREFIX = ".lmx-"
OWNER_NAME = "owner.json"
#: the output folder inside its temporary folder
PAYLOAD = "output"
#: errors that a full disk or a file-size limit raise
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
NAME_MAX = 255


def resolved(path: str | os.PathLike) -> Path:
    """``path`` with its symlinks resolved; a symlink loop on the way is a
    one-line :class:`UsageError` naming it (``Path.resolve`` raises
    RuntimeError for one, a traceback in the CLI)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        raise UsageError(path, "is a symlink loop, or lies under one") from None


def _overlaps(a: Path, b: Path) -> bool:
    a, b = resolved(a), resolved(b)
    return a == b or a in b.parents or b in a.parents


def normalized_path(path: str | os.PathLike) -> str:
    """An input's path as provenance records it: absolute and normalised
    (no ``..``; symlinks kept), so that the same input named relatively or
    absolutely gives the same record and byte-identical output files."""
    return os.path.abspath(os.fspath(path))


def check_output(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work starts; return it as a Path."""
    if out is not None and not isinstance(out, (str, os.PathLike)):  # else a pathlib TypeError
        raise OutputError("--out", f"is a {type(out).__name__}, not a path; give the folder to write")
    if out is None or not str(os.fspath(out)).strip():
        raise OutputError("--out", "is empty; give the folder to write")
    out = Path(out)
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise OutputError(out, f"the name is longer than {NAME_MAX} bytes, which no file system allows")
    where, cwd = resolved(out), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        # renaming onto the folder a command runs in fails (EBUSY) after all the work; and it is never meant
        raise OutputError(out, "is the current folder or holds it; choose another --out")
    if os.path.ismount(out):
        # the rename that puts an output in place cannot replace a mount point (a container's volume, say):
        # EBUSY, after all the work
        raise OutputError(out, "is a mount point, which an output renamed into place cannot replace; write into "
                               "a folder inside it")  # fmt: skip
    for inp in inputs:
        # an input that is no path is refused where it is read, naming it (not a pathlib TypeError here)
        if isinstance(inp, (str, os.PathLike)) and _overlaps(out, Path(inp)):
            raise OutputError(out, f"output would overwrite the input {inp}; choose another --out")
    check_parents(out)
    if os.path.lexists(out) and not force:
        raise OutputError(out, "already exists; pass --force to replace it")
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    return out


def check_parents(out: str | Path) -> None:
    """Refuse ``out`` whose nearest existing parent is a file, in one line
    naming that file (``mkdir -p`` said ``File exists`` or ``Not a
    directory`` of it, which reads as a problem with ``out`` itself)."""
    out = Path(out)
    above = next((q for q in out.parents if os.path.lexists(q)), None)
    if above is not None and not above.is_dir():
        raise OutputError(above, f"is a file, not a folder: {out} cannot be written inside it")


# ---- owners of temporary folders ---------------------------------------------------


#: the kernel's flag of a process that has begun to exit (``include/linux/sched.h``)
_PF_EXITING = 0x4


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux):
    ``[0]`` the state, ``[6]`` the kernel's flags, ``[19]`` the start time;
    None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which
    tells a live owner from a later process that reused its pid."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[19].decode()


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
    fields = _proc_stat(pid)
    if fields is not None and (fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING):
        # exiting (its files, and locks, already let go), or killed and not yet reaped by its
        # parent (a worker pool's, under load): it writes nothing more
        return False
    return rec.get("start") is None or (None if fields is None else fields[19].decode()) == rec.get("start")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def owner_tag() -> str:
    """This process in a file name: ``<host hash>.<pid>.<start>`` (start 0
    where unknown), read back by :func:`tag_owner`."""
    rec = _owner_record("")
    return f"{_short_hash(rec['host'])}.{rec['pid']}.{rec['start'] or 0}"


def tag_owner(tag: str) -> dict | None:
    """The owner record (:func:`_owner_alive`) an :func:`owner_tag` names, its
    host None where not this one; None where ``tag`` is not one."""
    parts = tag.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    host = socket.gethostname() if parts[0] == _short_hash(socket.gethostname()) else None
    return {"pid": int(parts[1]), "host": host, "start": None if parts[2] == "0" else parts[2]}


def owner_gone(tag: str) -> bool:
    """Whether ``tag`` (:func:`owner_tag`) names a process of this host that is
    gone; False where it names another host's, or is no tag."""
    rec = tag_owner(tag)
    return rec is not None and not _owner_alive(rec)


def temporary_file(path: Path) -> Path:
    """A fresh temporary file name beside ``path`` that says who writes it:
    ``.lmx-<random>.<target hash>.<host hash>.<pid>.<start>.tmp``."""
    return path.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}.{_short_hash(path.name)}.{owner_tag()}.tmp"


def _file_owner(name: str) -> tuple[str, dict] | None:
    """``(target hash, owner record)`` of a :func:`temporary_file` name, or None."""
    parts = name[len(TMP_PREFIX) : -len(".tmp")].split(".", 2) if name.endswith(".tmp") else []
    rec = tag_owner(parts[2]) if len(parts) == 3 else None
    return None if rec is None else (parts[1], rec)


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` whose owning process is gone:
    folders ``.lmx-*`` with an ``owner.json``, and files named by
    :func:`atomic_write`; only those for ``target`` (a name in ``folder``)
    when given. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_file(follow_symlinks=False):
            owner = _file_owner(entry.name)
            if owner is None or (target is not None and owner[0] != _short_hash(target)):
                continue
            if not _owner_alive(owner[1]):
                discard(entry.path)
                removed.append(Path(entry.path))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            rec = json.loads(Path(entry.path, OWNER_NAME).read_text())
        except (OSError, ValueError):
            # No owner record: a folder of new_temporary being made, whose name says its
            # owner; or a run killed while removing the empty folder after it. A live owner
            # writes its record at once, so one that has waited ORPHAN_SECONDS has none.
            if (named := _file_owner(entry.name)) is not None:
                if (target is None or named[0] == _short_hash(target)) and not _owner_alive(named[1]):
                    discard(entry.path)
                    removed.append(Path(entry.path))
                continue
            if _age(entry) >= ORPHAN_SECONDS:
                discard(entry.path)
                removed.append(Path(entry.path))
            continue
        if not isinstance(rec, dict) or (target is not None and rec.get("target") != target):
            continue
        if not _owner_alive(rec):
            discard(entry.path)
            removed.append(Path(entry.path))
    return removed


@cleanup
def discard(path: str | os.PathLike) -> None:
    """Remove the folder ``path`` (errors ignored) or the file ``path`` (if
    there); a signal meanwhile waits until it is gone
    (:func:`loramix.stopping.cleanup`)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


#: how old a temporary folder without an owner record must be to be removed
ORPHAN_SECONDS = 60.0


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


@cleanup
def remove_temporary(owned: Path) -> None:
    """Remove a temporary folder of :func:`new_temporary` (by the process that
    made it), so that it names its owner at every moment: it is first renamed
    to a name that says its owner (:func:`temporary_file`'s, as while it was
    made), then removed. A run killed meanwhile (a replaced model can take
    seconds) leaves a temporary that the next run can tell is stale: a
    removal that took owner.json out of the folder before its ``rmdir`` left
    an empty ``.lmx-<hex>`` naming no one, kept for :data:`ORPHAN_SECONDS`.
    A second Ctrl-C or SIGTERM meanwhile waits until it is gone
    (:func:`loramix.stopping.cleanup`)."""
    try:
        target = json.loads((owned / OWNER_NAME).read_text())["target"]
    except (OSError, ValueError, TypeError, KeyError):
        target = None  # gone already, or no record: nothing to name
    if target is not None:
        named = temporary_file(owned.parent / target)
        try:
            os.rename(owned, named)
            owned = named
        except OSError:
            pass  # removed meanwhile; or a file system that cannot rename it: removed as it is
    shutil.rmtree(owned, ignore_errors=True)


def new_temporary(parent: Path, target: str) -> Path:
    """A fresh temporary folder ``parent/.lmx-<8 hex>`` for ``target`` (a
    name in ``parent``), with its ``owner.json``. What is made goes into a
    folder inside it (:data:`PAYLOAD`), which is renamed into place; the
    temporary, owner record and all, is removed after."""
    tmp = Path(parent) / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    # made under a name that says its owner (:func:`temporary_file`'s), then renamed: a
    # process killed (kill -9, the out-of-memory killer) between the mkdir and its owner
    # record left a folder that named no one, kept for ORPHAN_SECONDS after the run
    staging = temporary_file(Path(parent) / target)
    record = _owner_record(target)
    try:
        # inside the try: an interrupt landing just after the mkdir (a Ctrl-C) removes it
        staging.mkdir()
        (staging / OWNER_NAME).write_text(json.dumps(record))
        os.rename(staging, tmp)
    except BaseException:
        discard(staging)
        # a SIGTERM or Ctrl-C landing as the rename returned left it under its final name,
        # which the caller never got to remove (seen once in a SIGTERM test: a .lmx-<hex> left)
        if _owned_by(tmp, record):
            discard(tmp)
        raise
    return tmp


def _owned_by(tmp: Path, record: dict) -> bool:
    """Whether the temporary ``tmp`` holds ``record`` as its owner (this
    call's: not another process's of the same name, whose rename onto it
    failed ours)."""
    try:
        return json.loads((tmp / OWNER_NAME).read_text()) == json.loads(json.dumps(record))
    except (OSError, ValueError):
        return False


# ---- durability ---------------------------------------------------------------------


def sync_fd(fd: int) -> None:
    """``fsync(fd)``; nothing where the file system cannot sync it."""
    try:
        os.fsync(fd)
    except OSError as e:
        # a file system that cannot sync this (a folder, on some network or FUSE ones) has
        # nothing more to give; a write the disk failed (EIO, ENOSPC) is the output's error
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def _fsync(path: str | os.PathLike, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        sync_fd(fd)  # read-only is enough: Linux syncs the file's data whoever wrote it
    finally:
        os.close(fd)


def sync_folder(folder: str | os.PathLike) -> None:
    """``fsync`` a folder: the names in it (a rename into it) are on the disk."""
    _fsync(folder, getattr(os, "O_DIRECTORY", 0))


def sync_published(path: str | os.PathLike) -> None:
    """``fsync`` the folder that ``path`` (an output, a cache entry) was just
    renamed into (:func:`sync_folder`). Where that fails (the disk's ``EIO``,
    a folder that cannot be opened to read), ``path`` is in place and whole:
    every byte of it was on the disk before the rename (:func:`sync_tree`,
    :func:`sync_fd`), and the target it replaced is gone. Only the rename's
    own durability is unconfirmed: after a power loss or an OS crash ``path``
    may be missing (or the old one back), never partial. So it is one
    :class:`~loramix.errors.LoramixWarning` line naming ``path``, and the
    command succeeds: an error (exit 2, or 1 for ``EIO``) said the output was
    not written while it was there, and a caller that removed it or ran again
    to get it lost a finished result."""
    try:
        sync_folder(Path(path).parent)
    except OSError as e:
        from ..errors import warn

        warn(f"{path}: written, but the disk did not confirm that its name is stored (fsync of its folder: "
             f"{e.strerror or e}); after a power loss or an OS crash it may be missing, never partial")  # fmt: skip


def sync_tree(folder: str | os.PathLike) -> None:
    """``fsync`` every regular file under ``folder``, then every folder, the
    deepest first: all of it is on the disk before it is renamed into place.
    A file already synced, or written with ``O_DIRECT``, costs a call and the
    device's cache flush; a buffered one waits for its write-back."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync(p)
        sync_folder(root)


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
            swap_in(tmp, out)
        else:
            os.rename(tmp, out)
    finally:
        os.close(fd)


@cleanup
def swap_in(new: Path, target: Path) -> None:
    """Put the folder ``new`` (inside an owned temporary of
    :func:`new_temporary`) in place of ``target``, which goes into that
    temporary (as ``replaced``), to be removed with it: two renames, for a
    system without ``renameat2``'s exchange, all or nothing. A signal
    meanwhile is held until both are done (:func:`~loramix.stopping.cleanup`);
    the second failing with an OS error (a read-only or full file system, a
    permission) puts ``target`` back, and the error is raised. Before,
    ``target`` (an old output replaced with ``--force``, a cache entry made
    again) lay in the temporary, removed with it: gone, nothing in its place."""
    replaced = new.parent / "replaced"
    os.replace(target, replaced)
    try:
        os.replace(new, target)
    except BaseException:
        try:
            os.replace(replaced, target)
        except OSError:
            pass  # the error raised is the rename's; what is in the temporary stays there
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it
    (``os.umask`` can only be read by setting it, which races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a new file gets here
    (``0o666`` less the umask; executables are left alone): safetensors
    writes its files owner-only (``0o600``), which would make a model or
    adapter folder unreadable to the other users of a shared one."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode and not st.st_mode & 0o111:
                os.chmod(p, mode)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` (the output inside a temporary
    folder of :func:`new_temporary`) to ``out`` atomically, its files
    given their usual modes first (:func:`usual_modes`). Without
    ``force`` a target that exists now (it appeared during the run) is left
    untouched and an :class:`OutputError` raised; with ``force`` it is
    swapped out atomically (``RENAME_EXCHANGE``) into the temporary folder,
    which the caller removes. All of ``tmp`` is on the disk before the
    rename (:func:`sync_tree`; an error there, the disk's ``EIO`` say, is
    raised and nothing is renamed), and the rename after it where the disk
    confirms it: where it does not, ``out`` is whole and in place, and that
    is a warning line, not an error (:func:`sync_published`). A rename the
    file system refuses (``EXDEV``: ``out`` a folder of an overlay's lower
    layer, as in a container image; ``EBUSY``: a mount point made there
    during the run, :func:`check_output` refuses one before) is raised,
    ``out`` left as it was."""
    usual_modes(tmp)
    sync_tree(tmp)
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
        if not done:
            _locked_rename(tmp, out, force)
        sync_published(out)
        return
    raise OutputError(out, "kept changing while loramix tried to replace it")


@contextmanager
def atomic_output_dir(
    out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a folder to write (``.lmx-<hex>/output``, inside a temporary
    folder beside ``out``); on success rename it to ``out``.

    On any exception (``KeyboardInterrupt`` included) the temporary folder is
    removed and ``out`` is left as it was; an :class:`OSError`, or
    safetensors' error for a failed write, names ``out`` (for a full disk
    whatever file it struck: :func:`name_output`). Stale temporaries of
    earlier runs to ``out`` (their owner is gone) are removed first; a
    target that appears meanwhile is refused at the end unless ``force``
    (:func:`publish`).
    """
    out = check_output(out, force=force, inputs=inputs)
    made = make_parents(out.parent)
    owned = tmp = None
    # one try from the parents made on: a SIGTERM or Ctrl-C that raised while the temporary
    # was made (new_temporary removes its own) left the parents made for out
    try:
        remove_stale_temporaries(out.parent, out.name)
        try:
            owned = new_temporary(out.parent, out.name)
        except OSError as e:
            raise OutputError(out, f"cannot write beside it: {e.strerror or e}") from None
        tmp = owned / PAYLOAD
        tmp.mkdir()
        yield tmp
        publish(tmp, out, force)
    except BaseException as e:
        if owned is not None:
            remove_temporary(owned)
        remove_made_parents(out.parent, made)
        raise_naming(e, tuple(p for p in (tmp, owned) if p is not None), out)
    remove_temporary(owned)  # its owner.json, and a replaced target


def make_parents(folder: Path) -> Path | None:
    """``mkdir -p folder``; returns the highest folder it made (None: none),
    for :func:`remove_made_parents` to undo where the run that needed them
    writes nothing (every output, and ``loramix train``'s live log)."""
    missing = [q for q in (folder, *folder.parents) if not os.path.lexists(q)]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


@cleanup
def remove_made_parents(folder: Path, made: Path | None) -> None:
    """Undo :func:`make_parents` for a run that wrote nothing: remove
    ``folder`` and its parents up to ``made`` (what it returned) while they
    are empty; nothing where ``made`` is None. A folder another run wrote
    into meanwhile is kept, and so are those above it."""
    if made is None:
        return
    for q in (folder, *folder.parents):
        try:
            q.rmdir()
        except OSError:
            return  # not empty (another run writes there too), or gone
        if q == made:
            return


def os_error(e: BaseException) -> OSError | None:
    """``e`` as an :class:`OSError`: itself, or safetensors' error for a
    failed write (its message ends ``(os error N)``); else None."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(m[1]), os.strerror(int(m[1]))) if m else None


def raise_naming(e: BaseException, temporaries: tuple[Path, ...], out: Path) -> NoReturn:
    """Raise ``e`` again; as an :class:`OSError` naming ``out``
    (:func:`name_output`) where it is one, or safetensors' failed write."""
    err = os_error(e)
    if err is None:
        raise e
    name_output(err, temporaries, out)
    if err is e:
        raise e
    raise err from None


def name_output(e: OSError, temporaries: tuple[Path, ...], out: Path) -> None:
    """Make ``e`` name the output ``out``: for a full disk whatever it named
    (a copied input, say); else where it names no path, or a path in the
    first of ``temporaries`` (the output's path there) or in another."""
    inside = None if e.filename is None else os.fsdecode(e.filename)
    if e.errno in NO_SPACE or inside is None:
        e.filename, e.filename2 = str(out), None
        return
    for k, t in enumerate(map(str, temporaries)):
        if inside == t or inside.startswith(t + os.sep):
            e.filename = str(out) + (inside[len(t) :] if k == 0 else "")
            return


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, replace: bool = True) -> Iterator:
    """Write one file through a temporary sibling and rename it into place.
    The sibling's name says which process writes it, so one left by a killed
    process is removed by the next write to ``path`` (or
    :func:`remove_stale_temporaries`). Without ``replace`` a file that
    exists at the end (another run's, or one made meanwhile) is left as it
    is and an :class:`OutputError` raised: the rename does not replace.
    The file is on the disk before the rename, and the rename after it
    where the disk confirms it (:func:`sync_fd`, :func:`sync_published`: a
    warning where it does not, the file being whole and in place). A
    ``path`` under a file is refused in one line naming that file
    (:func:`check_parents`)."""
    path = Path(path)
    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary_file(path)
    try:
        f = open(tmp, mode)
    except BaseException as e:
        # Nothing was made, so nothing to remove: on a read-only folder the
        # unlink fails too (EROFS before ENOENT), and its error named the
        # temporary instead of the file asked for.
        raise_naming(e, (tmp,), path)
    try:
        with f:
            yield f
            f.flush()
            sync_fd(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_file(tmp, path)
        sync_published(path)
    except BaseException as e:
        discard(tmp)
        raise_naming(e, (tmp,), path)


def _publish_file(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists: ``renameat2``'s
    no-replace rename, else a hard link (which fails on an existing name)."""
    try:
        if not _rename(tmp, path, _RENAME_NOREPLACE):
            os.link(tmp, path)
            tmp.unlink()
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise _appeared(path) from None


def json_safe(obj):
    """``obj`` as standard JSON takes it: NaN and inf as None (``null``, never the
    bare ``NaN`` strict parsers reject), numpy scalars as Python ones, keys as
    strings; dicts, lists and tuples walked."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


#: the libraries whose versions can change an output's numbers (a DARE mask is
#: torch's generator, a training run torch's kernels, a tokenizer transformers')
SOFTWARE = ("torch", "transformers", "safetensors", "numpy")


@functools.lru_cache(maxsize=1)
def software_versions() -> dict:
    """``{"python": ..., name: version}`` for :data:`SOFTWARE`, from the installed
    distributions (about 20 ms once, importing none of them): the same record
    whatever a command happened to import."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def provenance(method: str, parameters: dict, inputs: list[dict], **extra) -> dict:
    """The provenance record written into every output.

    ``inputs`` are dicts with at least ``path`` and ``sha256`` (an
    :meth:`Adapter.provenance` or a base model's record); ``software``: the
    versions of :func:`software_versions`, with loramix's own beside them.
    """
    from .. import __version__

    rec = {
        "loramix_version": __version__,
        "software": dict(software_versions()),
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
