"""Signal handlers that raise, and the places they must not: importlib's own
code, a C extension's start-up, and a finalizer.

loramix's handlers for Ctrl-C (SIGINT) and a kill (SIGTERM) raise, so that
the command unwinds and removes what it was writing (:func:`loramix.cli.main`,
a study's worker and the wait on Ray's tasks in
:mod:`loramix.scenario.executors`). Python runs a handler in the main thread
between two bytecodes of whatever runs there, and in a command's first
second that is often an import (``import torch``; later,
transformers' lazy modules). There an exception can be lost, and the run
goes on as if never killed:

* raised in the weakref callback that drops a module's lock
  (``_get_module_lock.<locals>.cb``), Python swallows it, printing
  ``Exception ignored in ... _get_module_lock`` (the flake of the SIGTERM
  tests under load); raised between importlib's taking and giving back its
  global lock, it would leave the lock held;
* raised in Python code that a C extension runs as it starts (torch's
  ``torch._C`` imports numpy), it is the C code's to handle: torch clears it
  and goes on without numpy (the ``sum`` wrote its output and exited 0), or
  numpy's own C part was left half made, and the next ``import numpy``
  failed ("cannot load module more than once per process"): a traceback,
  exit 1;
* raised in a finalizer (a ``__del__``, a ``weakref.finalize`` callback: the
  live training log's removal, a progress bar's close), Python swallows it,
  printing ``Exception ignored in ...``, and the run goes on; the finalizer's
  own work is cut short;
* raised in a module's own code as it is imported, the handler may be run
  by C++ code that the module calls (torch/distributed/__init__.py calls
  ``torch._C._c10d_init()``, which checks for signals): pybind11 turns the
  exception into a C++ one that cannot pass there, and the process aborts
  ("terminate called after throwing an instance of
  'pybind11::error_already_set'", exit -6): 1 in 30 Ctrl-Cs sent 0.8 s into
  a ``merge`` (``benchmarks/bench_interrupt.py``);
* raised in Python code that takes a lock and returns holding it (a
  ``threading.Condition``'s ``__enter__``, under every ``with
  future._condition`` of ``concurrent.futures``; the loop of
  ``_AcquireFutures`` that ``wait()`` takes and gives back every future's
  lock in), the ``with`` is never entered, or the loop never ends, and the
  lock stays held: a study's Ctrl-C as its workers started left a future's
  lock so, and the process pool's manager thread waited on it for ever
  while the run waited on the pool (a hang, seen once in a CI run's
  ``test_ctrl_c_as_workers_start_is_one_line``).

So a handler asks :func:`deferred` first: in any of these it returns at
once, and the signal is sent again :data:`AGAIN_SECONDS` later by a thread
(made pending at once, by ``_thread.interrupt_main``, it would run the
handler again in :func:`deferred`'s own frame, and raise there after all).
Elsewhere, in the functions a module's code calls as it is imported
included (importlib undoes a failed import), or after
:data:`LONGEST_SECONDS` of waiting, it raises as before.

A clean-up (:func:`cleanup`: the removal of a temporary a run was writing)
must not be cut short either: a second Ctrl-C while the first one's
clean-up ran raised in the middle of it and left the temporary behind.
A signal that comes while one runs (in it, or in anything it calls) is
held until it ends (at most :data:`LONGEST_SECONDS`). Then it is dropped
where the clean-up ran for a stop already under way (:func:`stop_under_way`:
an exception that is no :class:`Exception`, a ``KeyboardInterrupt`` say, is
being handled or raised): the run stops all the same; the command line's
handlers drop a signal anywhere in a stop so (:func:`loramix.cli.main`).
Elsewhere (the clean-up after a
finished output, or after an error) it is sent again, and stops the run
there; where that clean-up was the command's last step, :func:`loramix.cli.main`
waits for it (:func:`settle`) before it hands the process back, and the run
stops with its line (it came after ``main`` had given the caller's handlers
back: the Ctrl-C was lost, or raised in an exit handler).

A library call (``loramix.X``, :mod:`loramix.api`) in a process whose
SIGTERM is at its default (it kills the process) unwinds the same way
(:func:`sigterm_unwinds`), and the process then dies of the signal as it
would have: its temporaries and live log are removed, not left for the
next run. A process that handles or ignores SIGTERM itself (a notebook kernel
that does, a job runner, loramix's own command line, a study's worker) keeps
its own: loramix replaces no one's handler, and sets none outside the main
thread or outside the call. A process forked during the call (by a
caller's callback, a data loader's fork worker, ``subprocess``'s
``preexec_fn``) gets SIGTERM's default back as it starts
(:func:`_default_in_child`): SIGTERM kills it at once, as it would have
without loramix, instead of raising into the parent's unwinding there.
"""

from __future__ import annotations

import _thread
import functools
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from importlib import _bootstrap_external

#: the names importlib's own modules have in their frames' globals (frozen or not)
IMPORTLIB = frozenset({"importlib._bootstrap", "importlib._bootstrap_external"})
#: the code that runs a C extension's start-up (and any Python it imports)
EXTENSION_START = frozenset(
    {_bootstrap_external.ExtensionFileLoader.create_module.__code__,
     _bootstrap_external.ExtensionFileLoader.exec_module.__code__}
)  # fmt: skip
#: (module, function) of the Python code that takes a lock and returns holding it, or
#: gives several back in a loop: an exception raised there leaves a lock held for good
#: (threading's ``__enter__``s, a Condition's under every Future's ``with
#: self._condition``; concurrent.futures' ``_AcquireFutures`` in ``wait()``)
LOCK_WINDOWS = frozenset(
    {("threading", "__enter__"), ("concurrent.futures._base", "__enter__"),
     ("concurrent.futures._base", "__exit__")}
)  # fmt: skip
#: how long after a deferred signal it is sent again
AGAIN_SECONDS = 0.01
#: the code that runs a ``weakref.finalize`` callback (a ``__del__`` is known by its name)
FINALIZE = weakref.finalize.__call__.__code__
#: the longest a signal is deferred (a C extension whose start-up never ends)
LONGEST_SECONDS = 30.0

_waiting_since: dict[int, float] = {}
#: the signals that came during a clean-up, in order (:func:`cleanup`)
_held: list[int] = []


def deferred(signum: int, frame) -> bool:
    """Whether a handler called for ``signum`` in ``frame`` (its arguments)
    must not raise now: in a clean-up (:func:`cleanup`), where it is held
    until that ends; or where :func:`unsafe`, where the signal is sent to
    this process again shortly (:func:`_again`)."""
    if cleaning(frame):
        since = _waiting_since.setdefault(signum, time.monotonic())
        if time.monotonic() - since > LONGEST_SECONDS:  # a clean-up that hangs (a network disk)
            _waiting_since.pop(signum, None)
            return False
        _held.append(signum)
        return True
    if not unsafe(frame):
        _waiting_since.pop(signum, None)
        return False
    since = _waiting_since.setdefault(signum, time.monotonic())
    if time.monotonic() - since > LONGEST_SECONDS:
        _waiting_since.pop(signum, None)
        return False
    _send_again(signum)
    return True


def unsafe(frame) -> bool:
    """Whether ``frame`` is importlib's own code or a module's own code run by
    an import, or a lock's window (:data:`LOCK_WINDOWS`), or it or one of its
    callers is a C extension's start-up or a finalizer (an exception raised
    below one ends there)."""
    if frame is None:
        return False
    if frame.f_globals.get("__name__") in IMPORTLIB:
        return True
    if (frame.f_globals.get("__name__"), frame.f_code.co_name) in LOCK_WINDOWS:
        return True
    if frame.f_code.co_name == "<module>" and _importing(frame.f_back):
        return True
    while frame is not None:
        code = frame.f_code
        if code in EXTENSION_START or code is FINALIZE or code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def cleanup(fn):
    """``fn`` made a clean-up: a signal whose handler asks :func:`deferred`
    while it runs, or anything it calls, is held until it returns (or
    raises); then dropped where a stop is already under way, else sent
    again (module docstring). Its own clean-ups nest: the outermost one
    decides."""

    @functools.wraps(fn)
    def clean_up(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            if _held and threading.current_thread() is threading.main_thread():
                if not cleaning(sys._getframe(1)):
                    _release()

    return clean_up


def _release() -> None:
    held = _held[:]
    _held.clear()
    for signum in held:
        _waiting_since.pop(signum, None)
    if not stop_under_way():
        # not stopping yet: the first held signal stops the run, once out of here (sent now,
        # it would be handled in this clean-up's frame, and held again)
        _send_again(held[0])


def stop_under_way() -> bool:
    """Whether this thread is stopping: the exception being handled (in an
    ``except`` or a ``finally`` it passes through, or anything they call) is
    a stop, no :class:`Exception` (a ``KeyboardInterrupt``, a SIGTERM's), or
    was raised from one (click's ``Abort`` from a ``KeyboardInterrupt``). A
    generator being closed (``GeneratorExit``) is no stop. A signal then is
    dropped, not raised: the run stops all the same, and raised there it cut
    short what the stop does (a clean-up, the line that says so)."""
    exc = sys.exc_info()[1]
    return exc is not None and any(
        e is not None and not isinstance(e, (Exception, GeneratorExit)) for e in (exc, exc.__cause__)
    )


def cleaning(frame) -> bool:
    """Whether ``frame`` or one of its callers is a clean-up (:func:`cleanup`)."""
    while frame is not None:
        if frame.f_code is _CLEAN_UP:
            return True
        frame = frame.f_back
    return False


def _importing(frame) -> bool:
    """Whether ``frame`` is importlib's, running a module's code."""
    return frame is not None and frame.f_globals.get("__name__") in IMPORTLIB


def _again(signum: int) -> None:
    time.sleep(AGAIN_SECONDS)
    os.kill(os.getpid(), signum)


#: the signals to be sent again (:func:`_send_again`) and not sent yet
_in_flight = [0]
_in_flight_lock = threading.Lock()


def _send_again(signum: int) -> None:
    """Send ``signum`` to this process again, :data:`AGAIN_SECONDS` from now,
    from a thread; :func:`settle` waits for it."""
    with _in_flight_lock:
        _in_flight[0] += 1
    _thread.start_new_thread(_sent_again, (signum,))


def _sent_again(signum: int) -> None:
    try:
        _again(signum)
    finally:
        with _in_flight_lock:
            _in_flight[0] -= 1


def settle(timeout: float = 1.0) -> None:
    """Wait until every signal that :func:`deferred` or a clean-up put off has
    been sent again (at most ``timeout`` seconds), and let the handlers take
    it: a command that ends meanwhile (:func:`loramix.cli.main`) must not
    hand the process back to its caller's handlers (Python's Ctrl-C raises
    ``KeyboardInterrupt`` wherever it lands, at exit a traceback; a default
    SIGTERM kills) with one of its own signals on the way."""
    if not _in_flight[0]:
        return
    deadline = time.monotonic() + timeout
    while _in_flight[0] and time.monotonic() < deadline:
        time.sleep(AGAIN_SECONDS / 5)
    time.sleep(0.001)  # a signal just sent, pending for this thread, is taken in the sleep


#: the code of every clean-up's wrapper (one function, so one code object)
_CLEAN_UP = cleanup(lambda: None).__code__


#: whether :func:`_default_in_child` is registered to run in every forked child
_fork_hook = [False]


def _default_in_child() -> None:
    """In a child just forked: SIGTERM back at its default where the fork came
    during a library call (its handler is :func:`sigterm_unwinds`'s). That
    handler would unwind the parent's call in the child, the child's own
    code (a worker's loop, a ``preexec_fn``) never told; SIG_DFL is what it
    replaced, so the child dies of the signal at once, as without loramix."""
    import signal

    if getattr(signal.getsignal(signal.SIGTERM), "_unwinds", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forking thread is the child's main thread


class _Killed(BaseException):
    """SIGTERM in a library call (:func:`sigterm_unwinds`): an unwinding that
    no ``except Exception`` stops."""


@contextmanager
def sigterm_unwinds():
    """Within: a SIGTERM to a process that left it at its default first
    unwinds the call (its ``finally`` and ``except BaseException`` remove
    what it was writing), then kills the process with it (SIG_DFL), as it
    would have at once: the caller's own code runs no further, as before.
    A second SIGTERM meanwhile kills at once. Nothing changes where SIGTERM
    has a handler (or is ignored), or outside the main thread, where no
    handler can be set; the handler is there only during the call, and
    not in a process forked meanwhile (:func:`_default_in_child`)."""
    import signal

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return
    got: list[int] = []
    pid = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != pid:  # a forked child, signalled before _default_in_child ran
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # it dies of it, as _default_in_child would have it
            return
        if deferred(signum, frame):
            return
        got.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one kills at once
        raise _Killed

    terminated._unwinds = True  # known so in a forked child (_default_in_child)
    if not _fork_hook[0] and hasattr(os, "register_at_fork"):  # no fork, no hook (Windows)
        os.register_at_fork(after_in_child=_default_in_child)
        _fork_hook[0] = True
    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Killed:
        pass  # its traceback, and with it the call's frames, let go here
    finally:
        if signal.getsignal(signal.SIGTERM) is terminated:  # not one the caller set meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if got:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # delivered to another thread: it ends the process there
        os._exit(128 + signal.SIGTERM)
