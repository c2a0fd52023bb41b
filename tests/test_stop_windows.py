"""The command line's SIGTERM and Ctrl-C in the windows around a stop: a
second signal while the first one's line is printed, a signal while an
error's line is printed or as the handlers are handed back, and a process
forked during a command (:func:`loramix.cli.main`).

Each case runs the real ``loramix`` command in a fresh Python whose signal
is sent, by the process to itself, at the point under test (a wrapped
``click.echo``, ``loramix.progress.line_every`` as the command's group
starts, ``loramix.stopping.settle`` as ``main`` hands the process back),
then spun on, so that Python runs the handler there: no real signal lands
on such a cue from outside. Cheap commands (``inspect`` of a missing path,
``--version``): no torch is imported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and fork")

REPO = Path(__file__).resolve().parents[1]

#: what each signal ends a command with: its exit status and its line
_STOP = {"SIGTERM": (143, "loramix: terminated"), "SIGINT": (130, "loramix: interrupted")}

#: the head of every program: argv[1] the signal's name, argv[2] where the first one is sent,
#: argv[3] where a second one is (or "-"), then the command's arguments. ``spin()`` sends the
#: signal and goes on in Python, where the handler runs.
_PROGRAM = """
import os, signal, sys
import click
import loramix.progress as progress
import loramix.stopping as stopping
from loramix import cli
SIG = signal.Signals[sys.argv[1]]
FIRST, SECOND = sys.argv[2], sys.argv[3]
sent = []
def spin(where):
    sent.append(where)
    os.kill(os.getpid(), SIG)
    for _ in range(300000):  # the handler runs here
        pass
echo = click.echo
def echo_then(message=None, *args, **kw):
    line = message if isinstance(message, str) else ""
    if line.endswith(("loramix: terminated", "loramix: interrupted")) and SECOND == "stop-line":
        spin("stop-line")  # a second signal, while the first one's line is printed
    if line.startswith("loramix: error:") and FIRST == "error-line":
        spin("error-line")
    return echo(message, *args, **kw)
click.echo = echo_then
line_every = progress.line_every
def group_starts(*args, **kw):
    if FIRST == "group":
        spin("group")
    return line_every(*args, **kw)
progress.line_every = group_starts
settle = stopping.settle
def handing_back(*args, **kw):
    if FIRST == "hand-back" and "hand-back" not in sent:
        spin("hand-back")
    return settle(*args, **kw)
stopping.settle = handing_back
paths = cli._paths_print_as_given
def streams(*args, **kw):
    if FIRST == "streams":
        spin("streams")
    return paths(*args, **kw)
cli._paths_print_as_given = streams
code = cli.main(sys.argv[4:])
assert FIRST in sent and SECOND in (*sent, "-"), sent  # the signals were sent where meant
sys.exit(code)
"""


def _run(sig: str, first: str, second: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", _PROGRAM, sig, first, second, *args], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("first", ["group", "streams"])
def test_a_second_signal_while_the_stops_line_is_printed_is_dropped(sig, first):
    """A signal stops the command (as its group starts, or as ``_main``
    readies the streams), and a second one comes while ``loramix:
    terminated`` (or ``interrupted``) is printed: the run ends with that one
    line and 143 (130), as a stop already under way drops further signals
    (:func:`loramix.stopping.stop_under_way`). The second one raised inside
    the echo: a traceback and exit 1 (the flake of
    ``test_a_kill_landing_in_a_finalizer_still_stops_the_run[SIGTERM]`` in
    CI); one landing as the streams were readied raised outside ``_main``'s
    ``try`` (a traceback, exit 1, even alone)."""
    p = _run(sig, first, "stop-line", "inspect", "/nonexistent/adapter")
    code, line = _STOP[sig]
    assert (p.returncode, p.stderr.splitlines()) == (code, [line]), p.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_an_errors_line_is_printed_stops_the_run(sig):
    """A signal while a command's one-line error is printed (a bad input, exit
    2): the line is printed whole, then the stop's line, exit 143 (130): the
    process was stopped. It raised inside the echo: a traceback, exit 1."""
    p = _run(sig, "error-line", "-", "inspect", "/nonexistent/adapter")
    code, line = _STOP[sig]
    error = "loramix: error: /nonexistent/adapter: no such file or folder"
    assert (p.returncode, p.stderr.splitlines()) == (code, [error, line]), p.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_as_the_handlers_are_handed_back_stops_the_run_once(sig):
    """A signal as ``main`` hands the process back (put off to the command's
    end: :func:`loramix.cli._hand_back`) ends a command that succeeded with
    the stop's line, 143 (130); a second one while that line is printed is
    dropped. The line was printed after the caller's handlers were back: the
    second SIGTERM killed the process there (-15, no line) and the second
    Ctrl-C raised in the echo (a traceback, exit 1)."""
    p = _run(sig, "hand-back", "stop-line", "--version")
    code, line = _STOP[sig]
    assert (p.returncode, p.stderr.splitlines()) == (code, [line]), p.stderr
    assert p.stdout.startswith("loramix, version"), p.stdout


#: a program running the CLI (argv: how to fork, then the command's arguments) that forks a
#: child as the command's group starts, which sleeps (after saying so on a pipe) until its
#: parent sends it SIGTERM; the parent prints the child's exit status and the handlers the
#: child found, then goes on with the command
_FORK_IN_A_COMMAND = """
import os, signal, sys, time
import loramix.progress as progress
from loramix import cli
HOW = sys.argv[1]
def handlers():
    return {signal.SIGTERM: signal.getsignal(signal.SIGTERM), signal.SIGINT: signal.getsignal(signal.SIGINT)}
BEFORE = handlers()  # the caller's: what the child must find
def sleeper(w):
    found = handlers() == BEFORE
    os.write(w, b"y" if found else b"n")
    time.sleep(60)  # no guard: what unwinds it here unwinds the command (as a real fork's child would)
line_every = progress.line_every
def fork_a_child(*args, **kw):
    r, w = os.pipe()
    if HOW == "os.fork":
        pid = os.fork()
        if pid == 0:
            sleeper(w)
            os._exit(0)
        found = os.read(r, 1)
        os.kill(pid, signal.SIGTERM)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    elif HOW == "multiprocessing":
        import multiprocessing
        p = multiprocessing.get_context("fork").Process(target=sleeper, args=(w,))
        p.start()
        found = os.read(r, 1)
        p.terminate()
        p.join(30)
        code = p.exitcode
    else:  # signalled before its fork hook ran: the handler the parent had, called in the child
        handler = signal.getsignal(signal.SIGTERM)
        pid = os.fork()
        if pid == 0:
            try:
                handler(signal.SIGTERM, sys._getframe())
            finally:
                os._exit(3)
        found = b"-"
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print("child", code, found.decode(), flush=True)
    return line_every(*args, **kw)
progress.line_every = fork_a_child
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing", "before-its-hook"])
def test_a_process_forked_during_a_command_dies_of_sigterm(how):
    """A child forked while a command runs (``os.fork``, a multiprocessing
    fork worker) finds the caller's handlers, not the command's, and dies of
    SIGTERM at once (-15), unwinding nothing; one signalled before its fork
    hook ran dies of it too. It inherited :func:`loramix.cli._terminate`:
    the ``os.fork`` child unwound the parent's command (its ``loramix:
    terminated`` on the shared stderr, exit 143; with an output, the
    parent's temporary removed by the child), the multiprocessing one
    printed a ``Terminated`` traceback and exited 1. The parent's command
    goes on as ever (here: its one-line error, exit 2)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-c", _FORK_IN_A_COMMAND, how, "inspect", "/nonexistent/adapter"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    found = "-" if how == "before-its-hook" else "y"
    assert p.stdout.split() == ["child", str(-signal.SIGTERM), found], (p.stdout, p.stderr)
    error = "loramix: error: /nonexistent/adapter: no such file or folder"
    assert (p.returncode, p.stderr.splitlines()) == (2, [error]), p.stderr


def test_what_counts_as_a_stop_under_way():
    """:func:`loramix.stopping.stop_under_way`: an exception being handled that
    is no :class:`Exception` (a Ctrl-C's, a kill's) or was raised from one
    (click's ``Abort``); not an error, nor a generator being closed. (Guards
    the new function; its use in a clean-up's release is tested below.)"""
    import click

    from loramix.stopping import stop_under_way

    assert not stop_under_way()
    for exc, stop in [(KeyboardInterrupt(), True), (ValueError(), False), (GeneratorExit(), False)]:
        try:
            raise exc
        except BaseException:
            assert stop_under_way() is stop, exc
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise click.exceptions.Abort() from e
    except click.exceptions.Abort:
        assert stop_under_way()


def test_ctrl_c_in_a_clean_up_as_a_generator_closes_stops_the_run():
    """A clean-up in a generator's ``finally`` as the generator is closed
    (``GeneratorExit``: a consumer that stopped early) gets Ctrl-C midway: it
    ends, then the run stops. A generator's close counted as a stop under
    way, and the Ctrl-C was dropped (the run went on: this test slept 5 s
    and failed on the old code)."""
    import time

    from loramix.stopping import deferred

    from .test_reliability import _interrupted_clean_up

    def handler(signum, frame):  # as loramix.cli handles it
        if not deferred(signum, frame):
            raise KeyboardInterrupt

    steps: list = []

    def writer():
        try:
            yield
        finally:
            _interrupted_clean_up(steps)

    before = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            g = writer()
            next(g)
            g.close()
            steps.append("went on")
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, before)
    assert steps == ["cleaned", "went on"]
