"""The ``loramix`` command: a thin layer over the library.

Each command lives in its own module of this package and exposes ``command``
(a click command or group). Heavy imports (torch, transformers) happen inside
the commands, so ``loramix --help`` is quick.

Errors a user can cause (:class:`loramix.errors.LoramixError`) print one line
on stderr and exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import os
import sys
import warnings

import click

from .. import __version__
from ..devices import DEVICE_CHOICES
from ..errors import MACHINE_ERRORS, SYSTEM_ERRORS, LoramixError, LoramixWarning, UsageError
from ..stopping import deferred, stop_under_way
from .threads import threads_option

# module (in this package) -> command name
COMMANDS = {
    "inspect_cmd": "inspect",
    "similarity_cmd": "similarity",
    "sum_cmd": "sum",
    "merge_cmd": "merge",
    "base_cmd": "base",
    "train_cmd": "train",
    "eval_cmd": "eval",
    "scenario_cmd": "scenario",
    "predict_cmd": "predict",
    "plan_cmd": "plan",
    "fit_cmd": "fit",
    "cache_cmd": "cache",
    "convert_cmd": "convert",
}


#: ``--prompt raw|chat`` for the commands that format records (train, eval)
prompt_option = click.option(
    "--prompt",
    type=click.Choice(["raw", "chat"]),
    default="raw",
    show_default=True,
    help="raw: 'Question: ...\\nAnswer:'; chat: the base tokenizer's own chat template (instruct models).",
)


def data_options(help: str):
    """``--data FILE`` (repeatable) plus further files listed after it; the
    command gets ``data`` and ``more_data`` and uses ``[*data, *more_data]``."""

    def decorate(f):
        # paths (or synthetic:NAME specs, which click.Path takes as they are): ~ expanded
        f = click.argument("more_data", nargs=-1, type=click.Path(path_type=str))(f)
        return click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=str),
                            help=help)(f)  # fmt: skip

    return decorate


def calibration_options(f=None, *, base_help: str = "Base model folder (with --data)."):
    """``--data`` (one calibration file per adapter), ``--base``, ``--tokens`` and
    ``--max-len``: the data-aware features of ``predict`` and ``plan``
    (``base_help``: what ``--base`` does beyond that, ``plan``'s)."""
    if f is None:
        return functools.partial(calibration_options, base_help=base_help)
    for opt in reversed([
        click.option("--data", multiple=True, type=click.Path(path_type=str),
                     help="One calibration file per adapter, in order (predictors that read data-aware features)."),
        click.option("--base", type=click.Path(path_type=str), default=None, help=base_help),
        click.option("--tokens", type=click.IntRange(min=1), default=None,
                     help="Calibration tokens per domain (default: the study's, from the predictors file; else 256)."),
        click.option("--max-len", "max_len", type=click.IntRange(min=2), default=None,
                     help="Length at which calibration records are cut (default: the study's; else 128)."),
    ]):  # fmt: skip
        f = opt(f)
    return f


def check_calibration_args(data, base, tokens, max_len) -> None:
    """Refuse ``--base``, ``--tokens`` or ``--max-len`` without ``--data``: they
    set the calibration pass, which runs only over data (else they were
    ignored, and a user took them for a setting that took effect): the
    library's check (:func:`loramix.grouping.check_calibration_args`),
    made before anything is read."""
    from ..grouping import check_calibration_args as check

    check(data, base, tokens, max_len)


# Library errors name the parameter; the CLI says the flag.
FLAGS = {
    "weights": "--weights",
    "dtype": "--dtype",
    "device": "--device",
    "into": "--into",
    "eval_size": "--eval-size",
}


# Options several commands take, spelled once.
def device_opt(default: str = "auto", what: str = "Where the arithmetic runs"):
    """``--device``, one spelling for every command: its choices shown as a
    click choice would show them, checked by the library (one line, exit 2),
    which takes ``cuda:N`` too; ``what``: what runs there."""
    return click.option("--device", default=default, show_default=True, metavar=f"[{'|'.join(DEVICE_CHOICES)}]",
                        help=f"{what}: auto (CUDA where torch sees a GPU, else the CPU), cpu or cuda.")  # fmt: skip


format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="Output format.")  # fmt: skip
# Every command with a bar takes both spellings: train and scenario run took
# only --quiet, eval, sum and merge only --no-progress, so each refused the other's.
progress_option = click.option("--progress/--no-progress", " /--quiet", default=True, show_default=True,
                               help="A progress bar on stderr (where it is a terminal).")  # fmt: skip


def field_options(f):
    """``--question-field``, ``--answer-field``, ``--context-field``: where a
    record of a JSONL file keeps its parts (``train`` and ``eval``)."""
    for opt in reversed([
        click.option("--question-field", default="question", show_default=True, help="Field holding the question."),
        click.option("--answer-field", default="answer", show_default=True, help="Field holding the answer."),
        click.option("--context-field", default="context", show_default=True,
                     help="Field holding a passage put before the question (absent or empty: none)."),
    ]):  # fmt: skip
        f = opt(f)
    return f


def merge_options():
    """The options ``sum`` and ``merge`` share: ``--weights``, ``--into``,
    ``--out``, ``--dtype``, ``--device``, ``--force``, ``--threads``,
    ``--progress/--no-progress`` (or ``--quiet``). Values are checked by the library
    (:mod:`loramix.options`), so bad ones get the one-line error."""
    opts = [
        click.option("--weights", default=None, help="One weight per adapter, e.g. 1,0.5 (default: all 1)."),
        click.option("--into", type=click.Path(), default=None,
                     help="Base model folder to merge into (writes a model); without it, write one adapter."),
        click.option("--out", "-o", required=True, type=click.Path(),
                     help="Output folder (refused if it exists, unless --force)."),
        click.option("--dtype", default=None,
                     help="Output dtype: float32, float16, bfloat16 or float64 (default: the base's, or the adapters')."),
        device_opt(what="Where the deltas are formed and merged"),
        click.option("--force", is_flag=True, help="Replace an existing --out."),
        threads_option,
        progress_option,
    ]  # fmt: skip

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


class LazyGroup(click.Group):
    """Imports a command's module only when that command is used."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            # past click's main, which would print a blank line for it (and, standalone, "Aborted!")
            raise Interrupted from e

    def list_commands(self, ctx):
        return sorted(COMMANDS.values())

    def get_command(self, ctx, name):
        for mod, cmd in COMMANDS.items():
            if cmd == name:
                return expand_home_params(importlib.import_module(f"{__name__}.{mod}").command)
        return None


class _HomePath(click.Path):
    """A ``click.Path`` whose value has its leading ``~`` expanded first
    (:func:`loramix.userpaths.expand_home`): ``--out=~/x`` and a quoted
    ``'~/x'``, which the shell leaves as they are."""

    def convert(self, value, param, ctx):
        from ..userpaths import expand_home

        return super().convert(expand_home(value), param, ctx)


def expand_home_params(command: click.Command) -> click.Command:
    """``command`` (and a group's subcommands) with every ``click.Path``
    parameter's type made a :class:`_HomePath` of the same settings: the one
    place the command line expands ``~`` (:mod:`loramix.userpaths`)."""
    for p in command.params:
        if isinstance(p.type, click.Path) and not isinstance(p.type, _HomePath):
            home = _HomePath.__new__(_HomePath)
            home.__dict__.update(p.type.__dict__)
            p.type = home
    for sub in getattr(command, "commands", {}).values():
        expand_home_params(sub)
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loramix")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Compose LoRA-family adapters: inspect, compare, merge, train, evaluate."""
    from ..progress import line_every

    line_every()  # a bad $LORAMIX_PROGRESS_EVERY is refused before the work, not at its first bar
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _paths_print_as_given() -> None:
    """A path that is not valid UTF-8 (``caf\\xe9/``) prints as its bytes
    instead of failing the whole command on output."""
    for stream, real in ((sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__)):
        if stream is real and getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


class Terminated(BaseException):
    """SIGTERM, raised to unwind like Ctrl-C (``finally`` and ``except
    BaseException`` clean up), but not a ``KeyboardInterrupt``: click would
    print a blank line for one (closing a terminal's ``^C`` echo, which a
    kill has not made)."""


class Interrupted(BaseException):
    """Ctrl-C in a command, carried past click (which takes neither this nor
    :class:`Terminated`) to :func:`main`'s one line: click printed a blank
    line for a ``KeyboardInterrupt`` before its ``Abort``, a line of its own
    below the ``^C`` a terminal echoes (a kill of the process group, or stderr
    in a file, has no ``^C`` to close)."""


def _terminate(signum, frame):
    # A kill (SIGTERM: timeout, a job scheduler) unwinds like Ctrl-C, so outputs
    # and temporaries half made are removed, not left for the next run to find;
    # not in importlib, a C extension's start-up or a finalizer, where it can be lost
    # (loramix.stopping)
    if not _in_a_child(signum, frame) and not _not_now(signum, frame) and not deferred(signum, frame):
        raise Terminated


def _interrupt(signum, frame):
    # Ctrl-C: Python's own handler raises anywhere, and there it was lost the same way
    if not _in_a_child(signum, frame) and not _not_now(signum, frame) and not deferred(signum, frame):
        raise KeyboardInterrupt


#: the process whose command :func:`main` runs (None: none runs), and the caller's
#: handlers it replaced (signal -> handler; None: not Python's, the default then)
_owner: dict = {"pid": None, "handlers": {}}
#: whether :func:`_callers_in_child` is registered to run in every forked child
_fork_hook = [False]


def _callers_in_child() -> None:
    """In a child just forked while a command runs (a multiprocessing fork
    worker, an ``os.fork`` of a library the command calls): the caller's
    handlers back in place of :func:`_terminate` and :func:`_interrupt`,
    as :func:`loramix.stopping.sigterm_unwinds` does for a library call.
    Those raised into the copy of the parent's command there, the child's
    own code never told: an ``os.fork`` child unwound the command (its
    ``loramix: terminated`` line, exit 143, the parent's temporary removed
    by the child), a multiprocessing one printed a traceback and exited 1.
    With the caller's (SIGTERM's default, for a console script), SIGTERM
    kills the child at once, as without loramix."""
    import signal

    if _owner["pid"] in (None, os.getpid()):
        return
    for s, before in _owner["handlers"].items():
        if signal.getsignal(s) in (_terminate, _interrupt):  # the forking thread is the child's main thread
            signal.signal(s, signal.SIG_DFL if before is None else before)


def _in_a_child(signum: int, frame) -> bool:
    """Whether this is a child forked while a command runs, signalled before
    :func:`_callers_in_child` ran: then the caller's handlers are put back
    and the signal goes to its own (the default: the child dies of it)."""
    import signal

    if _owner["pid"] in (None, os.getpid()):
        return False
    _callers_in_child()
    handler = signal.getsignal(signum)
    if handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
    elif callable(handler):
        handler(signum, frame)
    return True


#: set once a stop's line is printed (:func:`_interrupted`): a signal after it is dropped
_stopping = [False]
#: set while an error's one line is printed (:func:`_saying`): a signal then is kept
_reporting = [False]


def _interrupted(e: BaseException) -> int:
    """One line, and the exit status of a process stopped by the signal: 128 + 15
    for SIGTERM (what a shell or scheduler expects of a terminated job), 128 + 2
    for Ctrl-C. A signal from now on is dropped (:func:`_not_now`): raised in
    the line's echo, it ended the run with a traceback, exit 1."""
    _stopping[0] = True
    if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
        click.echo("loramix: terminated", err=True)
        return 143
    click.echo(f"{_line_start()}loramix: interrupted", err=True)
    return 130


def _line_start() -> str:
    """On a terminal, what takes the cursor to the start of its line and clears
    it: Ctrl-C left the terminal's ``^C`` echo there (after a bar's last
    state, or alone), which the one line replaces; elsewhere nothing."""
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    return "\r\x1b[K" if tty else ""


def main(argv=None) -> int:
    import signal
    import threading

    handlers = {}  # signal -> the handler before (None: not Python's, the default then)
    _late.clear()
    _stopping[0] = _reporting[0] = False
    if threading.current_thread() is threading.main_thread():
        if not _fork_hook[0] and hasattr(os, "register_at_fork"):  # no fork, no hook (Windows)
            os.register_at_fork(after_in_child=_callers_in_child)
            _fork_hook[0] = True
        _owner.update(pid=os.getpid(), handlers=handlers)
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
        # only where Ctrl-C raises now: one ignored (a job started with `nohup` or `&`) stays so
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    code = None
    try:
        with warnings.catch_warnings():  # restores the caller's showwarning
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            code = _main(argv)
    finally:
        code = _hand_back(handlers, code)
    return code


#: while :func:`main` hands the signals back (:func:`_hand_back`): those that come then
_late: list[int] = []
_handing_back = [False]


def _hand_back(handlers: dict, code: int | None) -> int | None:
    """Give the caller's handlers back (``handlers``: signal -> the one before),
    once the signals put off in the command's last milliseconds (a clean-up's,
    :mod:`loramix.stopping`) have come: sent again after that, a Ctrl-C met
    Python's handler, raising wherever it landed (at exit, a traceback), and
    a SIGTERM the default action, where the command had said nothing.
    Returns the exit status: ``code`` (the command's; None where it raised),
    or where a signal was kept for the end (:func:`_not_now`) that signal's
    (:func:`_stopped_by`). Its line is printed before the handlers go back,
    so that a second signal meanwhile is dropped: printed after, a second
    Ctrl-C raised in it (a traceback) and a second SIGTERM killed the
    process, where the command had said nothing."""
    import signal

    from ..stopping import settle

    _handing_back[0] = True
    try:
        if handlers:
            settle()
            code = _stopped_by(code)
        for s, before in handlers.items():
            signal.signal(s, signal.SIG_DFL if before is None else before)  # takes a pending one first
    finally:
        _handing_back[0] = False
        _owner["pid"] = None  # a process forked from now on has the caller's handlers already
    return _stopped_by(code)  # one that came as the handlers went back


def _stopped_by(code: int | None) -> int | None:
    """``code``, or where a signal was kept for the command's end
    (:func:`_not_now`) and the command was not stopped already (by a signal,
    130 or 143, or an exception out of :func:`_main`: None), the exit status
    of a run stopped by it, its line printed (:func:`_interrupted`): the
    signal came last, after the command's output or its error's line."""
    import signal

    late, _late[:] = _late[:], []
    if not late or code is None or code in (130, 143):
        return code
    return _interrupted(Terminated() if signal.SIGTERM in late else KeyboardInterrupt())


def _not_now(signum: int, frame) -> bool:
    """Whether a signal landing in ``frame`` is kept for :func:`main`'s end
    (:func:`_hand_back`) rather than raised: while a stop is under way (its
    clean-ups, its line: :func:`loramix.stopping.stop_under_way`,
    :func:`_interrupted`), while an error's line is printed (:func:`_saying`),
    while the handlers are handed back, or in the lines of :func:`main` itself
    or of a function it calls directly (``_main``'s own, ``catch_warnings``'):
    raised in most of those, nothing catches it (a traceback), and in a stop's
    it cut short what the stop does. One kept ends a command that was not
    stopped already as it would have ended it (:func:`_stopped_by`); in a
    stop, it is dropped (the run stops with the first one's line and status)."""
    mine = frame is not None and (frame.f_code is main.__code__ or (
        frame.f_back is not None and frame.f_back.f_code is main.__code__))  # fmt: skip
    if _stopping[0] or _reporting[0] or _handing_back[0] or mine or stop_under_way():
        _late.append(signum)
        return True
    return False


@contextlib.contextmanager
def _saying():
    """Within: an error's one line is printed, and a signal meanwhile is kept
    for the command's end (:func:`_not_now`), which it then stops with its
    own line and status, after the error's. Raised inside the echo, it
    ended the run with a traceback, exit 1."""
    _reporting[0] = True
    try:
        yield
    finally:
        _reporting[0] = False


def _show_warning(shown_before, message, category, filename, lineno, file=None, line=None):
    """loramix's own warnings as one line on stderr; others as they were
    shown before (``shown_before``: Python's, or a caller's)."""
    if issubclass(category, LoramixWarning):
        click.echo(f"loramix: warning: {message}", err=True)
    else:
        shown_before(message, category, filename, lineno, file, line)


def _main(argv) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        _paths_print_as_given()  # in the try: a signal landing there stops the run with its line
        cli.main(args=argv, prog_name="loramix", standalone_mode=False)
    except LoramixError as e:
        if e.fault is not None:  # a reader's refusal of a file the machine failed to give: that failure
            return _said_os_error(e.fault, debug)
        if debug:
            raise
        if isinstance(e, UsageError) and e.where in FLAGS:
            e.where = FLAGS[e.where]
        with _saying():
            click.echo(f"loramix: error: {e.message}", err=True)
        return 2
    except click.exceptions.Abort as e:  # click's form of an interrupt (its cause)
        return _interrupted(e)
    except click.UsageError as e:
        with _saying():
            if e.ctx is None or isinstance(e, click.exceptions.NoArgsIsHelpError):
                e.show()  # `loramix` alone: the help
                return e.exit_code
            # one line, as for every other bad input; click's own is four (usage, hint, blank, error)
            message = " ".join(e.format_message().split())
            click.echo(f"loramix: error: {message} (see '{e.ctx.command_path} --help')", err=True)
        return 2
    except click.ClickException as e:
        with _saying():
            e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, Interrupted, Terminated) as e:
        return _interrupted(e)
    except OSError as e:
        return _said_os_error(e, debug)
    except RecursionError:
        if debug:
            raise
        with _saying():
            click.echo("loramix: error: an input is nested too deeply to read (RecursionError)", err=True)
        return 2
    return 0


def _said_os_error(e: OSError, debug: bool) -> int:
    """``e`` said in one line naming its path, and the exit code its errno
    gives (:data:`~loramix.errors.SYSTEM_ERRORS`: 2, the user's to fix;
    :data:`~loramix.errors.MACHINE_ERRORS`: 1, the machine's); any other
    errno, or ``--debug``, raises it (a traceback)."""
    if debug or (e.errno not in SYSTEM_ERRORS and e.errno not in MACHINE_ERRORS):
        raise e
    with _saying():
        click.echo(f"loramix: error: {_os_error_line(e)}", err=True)
    return 1 if e.errno in MACHINE_ERRORS else 2


#: what the line says after the system's words for the errno: what happened, what to do
_SAID_AFTER = {
    errno.ENOSPC: "nothing was written",
    errno.EDQUOT: "nothing was written",
    errno.EFBIG: "nothing was written",
    # a rename onto (or of) a folder of an overlay's lower layer, a container image's: the kernel's EXDEV
    errno.EXDEV: "the file system cannot rename onto it (another mount, or a folder of an overlay's lower layer, "
    "as in a container image); nothing was written: remove it first, or write elsewhere",
    errno.ENXIO: "a socket, or a device file with no device behind it: give a file or a folder",
    errno.ETXTBSY: "a program runs from it: write elsewhere",
    errno.ESTALE: "the network file system lost track of it (replaced or removed on the server?): run again",
    errno.ENOTCONN: "its mount lost its server or process (FUSE, sshfs, a network file system): mount it again",
    errno.ENOMEM: "the machine ran out of memory",
    errno.EMFILE: "loramix reached the limit on the files a process may open (ulimit -n)",
    errno.ENFILE: "the system's table of open files is full",
}


def _os_error_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else e.filename2
    problem = e.strerror or errno.errorcode.get(e.errno, str(e))
    if e.errno in _SAID_AFTER:
        problem += "; " + _SAID_AFTER[e.errno]
    elif e.errno in MACHINE_ERRORS:  # EIO, EUCLEAN
        problem += "; the disk or its file system failed (see the system log: dmesg)"
    if isinstance(where, (str, bytes)):
        where = os.fsdecode(where)
    return LoramixError(where, problem).message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry point: the command, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown.

    With torch loaded, Python's own exit (freeing every module and object
    one by one) costs 0.3-0.8 s here, a fifth of a short command such as
    ``loramix sum`` on a 124M base. What must happen at exit still does: the
    ``atexit`` handlers (logging's flush, Ray's and multiprocessing's
    shutdown), then stdout and stderr are flushed. Every output is complete
    and published before a command returns, and loramix's own threads are
    joined by then (only the daemon that prefetches hashes may still run).
    An exception out of :func:`main` (``--debug``) takes Python's normal
    exit with its traceback, and so does a run under a profiler
    (:func:`_profiled`), whose results are written after the command returns."""
    import atexit

    if _profiled():
        sys.exit(code)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (loramix ... | head): nothing left to say
                pass
        os._exit(code)


def _profiled() -> bool:
    """Whether a profiler is enabled in this process: ``python -m cProfile -o
    FILE -m loramix ...`` (or ``-m profile``) writes FILE once the command has
    returned, so an ``os._exit`` left no file. cProfile is a
    ``sys.setprofile`` hook up to Python 3.11, a ``sys.monitoring``
    profiler tool from 3.12. (Not whether cProfile is imported: peft and
    transformers import it.)"""
    if sys.getprofile() is not None:
        return True
    mon = getattr(sys, "monitoring", None)
    return mon is not None and mon.get_tool(mon.PROFILER_ID) is not None
