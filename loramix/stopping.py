"""Signal handlers that raise, and the one time they must not: an import.

loramix's handlers for a kill (SIGTERM) raise, so that the command unwinds
and removes what it was writing (:func:`loramix.cli.main`, a study's worker
in :mod:`loramix.scenario.executors`). Python runs a handler in the main
thread between two bytecodes of whatever runs there, and that is often an
import: a command's first ``import torch`` (seconds), transformers' lazy
modules. An exception raised there can be lost, and the run goes on as if
never killed:

* torch's C start-up imports numpy and, when that fails, clears the error and
  goes on without it: a kill landing in numpy's import, under torch's, was
  lost, the ``sum`` wrote its output and exited 0 (about 1 kill in 15 sent
  0.3-1.1 s into it, on a loaded machine); or numpy was left half made and
  the next ``import numpy`` failed ("cannot load module more than once per
  process"): a traceback, exit 1;
* raised in the weakref callback that drops a module's lock
  (``_get_module_lock.<locals>.cb``), Python swallows it, printing
  ``Exception ignored in ... _get_module_lock``: the flake of the SIGTERM
  tests under load.

So a handler asks :func:`deferred` first: while any import is in progress
(importlib's code is on the main thread's stack) it returns at once, and the
signal is sent again :data:`AGAIN_SECONDS` later by a thread (made pending at
once, by ``_thread.interrupt_main``, it would run the handler again in
:func:`deferred`'s own frame and raise into the import after all). Once no
import is in progress, or after :data:`LONGEST_SECONDS` of waiting (a
program that runs loramix from inside an import of its own), the handler
raises as before.
"""

from __future__ import annotations

import _thread
import os
import time

#: the names importlib's own modules have in their frames' globals (frozen or not)
IMPORTLIB = frozenset({"importlib._bootstrap", "importlib._bootstrap_external"})
#: how long after a deferred signal it is sent again
AGAIN_SECONDS = 0.01
#: the longest a signal waits for imports to finish (``import torch``: seconds)
LONGEST_SECONDS = 30.0

_waiting_since: dict[int, float] = {}


def deferred(signum: int, frame) -> bool:
    """Whether a handler called for ``signum`` in ``frame`` (its arguments)
    must not raise now, because an import is in progress in the main thread;
    if so, the signal is sent to this process again shortly (:func:`_again`)."""
    if not importing(frame):
        _waiting_since.pop(signum, None)
        return False
    since = _waiting_since.setdefault(signum, time.monotonic())
    if time.monotonic() - since > LONGEST_SECONDS:
        _waiting_since.pop(signum, None)
        return False
    _thread.start_new_thread(_again, (signum,))
    return True


def importing(frame) -> bool:
    """Whether ``frame`` or one of its callers is importlib's code."""
    while frame is not None:
        if frame.f_globals.get("__name__") in IMPORTLIB:
            return True
        frame = frame.f_back
    return False


def _again(signum: int) -> None:
    time.sleep(AGAIN_SECONDS)
    os.kill(os.getpid(), signum)
