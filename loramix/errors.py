"""Errors a user can cause, and the operating system's errors sorted by whose they are.

Every such error names the file (or setting) at fault and the problem in one
line. The CLI prints ``loramix: error: <where>: <problem>`` on stderr and exits
with code 2; a traceback is shown only with ``--debug``. The errno of an
``OSError`` decides, wherever it is caught: one the user can fix
(:data:`SYSTEM_ERRORS`) is such an error, exit 2; the machine failing under a
path (:data:`MACHINE_ERRORS`) is one line naming the path too, but exit 1, a
failed run, also where a reader caught it and refused the file
(:attr:`LoramixError.fault`).
"""

from __future__ import annotations

import errno
import os
import sys

# What the system says about a path the user gave (a full disk, a read-only
# or missing folder, a name too long, a symlink loop, a folder that cannot be
# renamed onto: another mount, an overlay's lower layer, a mount point; a
# socket, or a device file with no device behind it, ENXIO; a file a program
# runs from, ETXTBSY): the user's to fix, so one line naming the path, exit 2;
# other OSErrors stay bugs with tracebacks.
SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                 errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT, errno.EEXIST, errno.EXDEV,
                 errno.EBUSY, errno.ENXIO, errno.ETXTBSY}  # fmt: skip
# The machine failing under a path: a disk's or a network file system's I/O
# error (EIO); a file system found corrupt (EUCLEAN, Linux's); a network file
# system's handle gone stale (ESTALE); a FUSE or network mount whose server or
# process is gone (ENOTCONN); memory, or the table of open files, exhausted
# (ENOMEM, EMFILE, ENFILE). Not the user's input, so exit 1 as a failed run,
# but one line naming the path all the same; an output it struck was not kept.
MACHINE_ERRORS = {errno.EIO, getattr(errno, "EUCLEAN", errno.EIO), errno.ESTALE, errno.ENOTCONN, errno.ENOMEM,
                  errno.EMFILE, errno.ENFILE}  # fmt: skip


class LoramixError(Exception):
    """A problem with the user's input: one line, naming where it is.

    ``where`` is usually a path; it may also be a setting such as
    ``--density`` or a scenario key such as ``scenario.toml: adapters.rank``.
    Settings are written as the CLI's flags; ``loramix.X`` says them as its
    keywords (``density``, ``pass force=True``), see :mod:`loramix.api`.
    """

    exit_code = 2

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else str(where)
        self.problem = " ".join(str(problem).split())  # always one line
        #: the machine's failure (an OSError of :data:`MACHINE_ERRORS`) this error was made
        #: while handling, or None: a reader's "cannot read" of a file the disk failed to
        #: give. The CLI says it as that OSError (exit 1), ``loramix.X`` raises it: the errno
        #: decides in one place, not in each reader that refuses a file it could not read.
        self.fault = machine_fault(sys.exc_info()[1], self.where)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem

    def __reduce__(self):
        # Pickled as (where, problem): Exception's default pickles args, the one joined
        # message, which __init__ cannot take back; a worker process's error (a scenario
        # step) then failed to unpickle in the parent, which saw a broken pool instead.
        return type(self), (self.where, self.problem), self.__dict__


def machine_fault(e: BaseException | None, where: str | None = None) -> OSError | None:
    """The OSError of :data:`MACHINE_ERRORS` that ``e`` is, or was raised
    while handling (its ``__cause__`` or ``__context__``, and so on), or a
    :class:`LoramixError`'s own :attr:`~LoramixError.fault`; else None. One
    that names no file (a read's error) is given ``where``, the file the
    error that caught it names."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in MACHINE_ERRORS:
            if e.filename is None and e.filename2 is None:
                e.filename = where
            return e
        if getattr(e, "fault", None) is not None and isinstance(e, LoramixError):
            return e.fault
        e = e.__cause__ or e.__context__
    return None


def raise_machine_fault(e: BaseException | None, where: str | os.PathLike | None = None) -> None:
    """Raise the machine's failure :func:`machine_fault` finds in ``e`` (an
    OSError of :data:`MACHINE_ERRORS`, or one a :class:`LoramixError` was made
    on), naming ``where`` when it names no file; return where there is none.

    For the code that falls back when a file cannot be read (a cache read
    anew, a record taken as absent): the user's errors (ENOENT, EACCES, a
    read-only disk) still fall back after this call, while a failing disk is
    said as the failure it is (exit 1, the OSError from Python), not taken
    for a missing file whose absence changes the result or whose rewrite
    meets the same disk. Called in the ``except`` block, before the fallback."""
    fault = machine_fault(e, None if where is None else str(where))
    if fault is not None:
        raise fault


class LoramixWarning(UserWarning):
    """Something a user should know about a result that is still computed
    (not an error): one line. The CLI prints ``loramix: warning: <line>``
    on stderr; a notebook sees a Python warning."""


def warn(text: str, category: type[Warning] = LoramixWarning) -> None:
    """Issue ``text`` as a warning said at the caller's own line: the first
    frame outside the loramix package (a script's, a notebook cell's), where
    Python shows it and its filters (``default``: once per line) apply. A
    fixed ``stacklevel`` said it inside loramix instead, under the wrapper of
    :func:`loramix.api.python_api` (``loramix/api.py:265: LoramixWarning: ...``
    followed by ``return f(*args, **kwargs)``), as the number of loramix's
    own frames between differs from call to call. The CLI prints only the
    text (``loramix: warning: <text>``)."""
    import sys
    import warnings

    package = os.path.dirname(__file__) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(text, category, stacklevel=level)


class AdapterError(LoramixError):
    """An adapter file or folder is missing, malformed or unsupported."""


class BaseModelError(LoramixError):
    """A base model folder is missing, malformed or does not fit the adapters."""


class DataError(LoramixError):
    """A data file is missing, empty or lacks the expected fields."""


class ScenarioError(LoramixError):
    """A scenario file is invalid; raised before any work starts."""


class OutputError(LoramixError):
    """An output path is refused (exists without --force, or is an input)."""


class UsageError(LoramixError):
    """A parameter is out of range (density, rank, method name, ...)."""
