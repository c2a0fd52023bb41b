"""Errors a user can cause.

Every such error names the file (or setting) at fault and the problem in one
line. The CLI prints ``loramix: error: <where>: <problem>`` on stderr and exits
with code 2; a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import os


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
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem

    def __reduce__(self):
        # Pickled as (where, problem): Exception's default pickles args, the one joined
        # message, which __init__ cannot take back; a worker process's error (a scenario
        # step) then failed to unpickle in the parent, which saw a broken pool instead.
        return type(self), (self.where, self.problem), self.__dict__


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
