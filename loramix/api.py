"""The package's functions as Python calls them: errors in keyword terms.

loramix raises :class:`~loramix.errors.LoramixError` in the command line's
terms, as the CLI prints it: ``where`` may be a flag (``--rank``) and the
problem may name others (``pass --force to replace it``). ``loramix.X`` is
the function ``X`` wrapped by :func:`python_api`, which renders such an
error for Python before its caller sees it: each flag that stands for a
parameter of the function called becomes that keyword (``--max-len`` ->
``max_len``; :data:`RENAMES` where the names differ, ``--lambda`` ->
``lambda_`` in ``merge``), a flag for a bool parameter ``name=True``
(``--force`` -> ``force=True``), an upper-case placeholder after a flag
its value (``--into BASE`` -> ``into=BASE``), and a literal value after it
that value in Python (``--prompt chat`` -> ``prompt='chat'``, ``--max-len
128`` -> ``max_len=128``: a number, or one of the few words a keyword takes,
:func:`_choices`). A flag the function has no
parameter for that is another function's keyword is said as that one's
(:data:`ELSEWHERE`: ``sum_adapters``' ``--into BASE`` is
``sum_into_base's into=BASE``); any other (another command's, ``ray start
--head``) is left as it is.

The CLI, and loramix's own modules, call the functions from their modules,
unwrapped: the CLI's lines are the library's, and only the outermost
``loramix.X`` call renders an error, once.

The sentences a result carries for the command to print (:data:`RESULT_TEXT`:
``plan``'s ``cost_source``, ``notes`` and ``warnings``, ``predict``'s
``notes`` and ``warnings``) are rendered the same way, in a copy of the
result; the command prints the library's own.

A warning (:class:`~loramix.errors.LoramixWarning`) is not rendered: it is
issued where it arises, under the caller's own filters, and may have been
recorded, or shown, before the outermost call ends; it is said at the
caller's line, the first outside loramix (:func:`~loramix.errors.warn`). Its
line is worded for both readers instead: one that points at another step or
option names the keyword and the flag (``evaluate merged=True, eval
--merged``, ``held_out=True, eval --held-out``).

A SIGTERM in a ``loramix.X`` call, in a process that leaves SIGTERM at its
default (a plain script, where it kills at once), first unwinds the call as
Ctrl-C unwinds a command: what it was writing is removed (an output's
temporary, a training's live log, a study's half-made cache entry, its
workers stopped), then the process dies of the signal as before, the
caller's next line unrun (:func:`~loramix.stopping.sigterm_unwinds`). Every
function does, not only those given an ``out``: any that takes a base may
import a GGUF into the cache. A handler of the caller's own (a notebook
kernel's, a job runner's) or SIG_IGN is kept, and so is SIGTERM in a call
outside the main thread or inside another call (the outer one's handler);
the CLI, which calls the functions unwrapped, keeps its own
(``loramix: terminated``, exit 143), and a study's workers theirs. A
process forked during the call (a callback's, a fork data loader's worker)
has SIGTERM at its default again: it dies of it at once.

:func:`renamed` keeps the keywords of the previous release working, with a
:class:`DeprecationWarning`: one name per concept across the functions, the
commands' (``adapters``, ``into``, ``out``, ``method``, ``batch``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable

from .errors import LoramixError, UsageError
from .stopping import sigterm_unwinds

#: per function, the flags whose keyword is not the flag's own name
RENAMES = {
    "evaluate": {"--adapter": "adapters"},
    "merge": {"--lambda": "lambda_"},
    "run_scenario": {"--cache": "cache_dir"},
}

#: per function, flags it has no keyword for that stand for another function's keyword: said as that
#: one's (``sum_adapters``' "pass --into BASE": "pass sum_into_base's into=BASE"), not as the flag
ELSEWHERE = {
    "sum_adapters": {"--into": "sum_into_base's into"},
    "plan": {"--into": "merge's into"},
}

#: per function, the fields of its result that are sentences the command prints (plan's "cost:",
#: "warning:" and "note:" lines), said in keyword terms as its errors are
RESULT_TEXT = {
    "plan": ("cost_source", "warnings", "notes"),
    "predict": ("warnings", "notes"),
}

# Flags as loramix writes them, alone or joined by "/" (--rank/--energy), not
# inside a word or a path (a folder "runs--out"), with an optional upper-case
# placeholder for the value after them, or the word after them: a literal value
# where it is one (:func:`_literal`), else the sentence's next word.
_FLAGS = re.compile(r"(?<![\w./-])(--[a-z][a-z0-9-]*(?:/--[a-z][a-z0-9-]*)*)(?![\w-])"
                    r"( [A-Z]+\b| -?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.,]*\w)| [a-z][a-z0-9_]*(?![\w-]))?")  # fmt: skip


def _choices(kw: str) -> tuple[str, ...]:
    """The literal values of a keyword that takes one of a few words, from the
    tables the checks use; () for any other."""
    from .data import ON_CHOICES, PROMPT_MODES
    from .devices import DEVICE_CHOICES
    from .options import DTYPE_NAMES

    return {
        "prompt": PROMPT_MODES,
        "on": ON_CHOICES,
        "device": DEVICE_CHOICES,
        "dtype": tuple(DTYPE_NAMES),
    }.get(kw, ())


def _literal(kw: str, word: str) -> str | None:
    """``word``, written after flag ``--kw`` in a CLI sentence, as Python writes
    that value: a number as it is, one of the keyword's choices quoted
    (``--prompt chat`` -> ``prompt='chat'``); None for a word that is no value
    of it (``--force to``, ``--out that``)."""
    if word[:1].isdigit() or word[:1] == "-":
        return word
    return repr(word) if word in _choices(kw) else None


def keyword_namer(
    f: Callable, renames: dict[str, str], elsewhere: dict[str, str] | None = None
) -> Callable[[str], str | None]:
    """``flag -> keyword`` for ``f``: ``"--max-len"`` -> ``"max_len"``,
    ``"--force"`` -> ``"force=True"`` (a parameter whose default is False);
    a flag in ``elsewhere`` (:data:`ELSEWHERE`), which ``f`` has no keyword
    for, as another function's keyword (``"sum_into_base's into"``); None for
    a flag that stands for no parameter of ``f`` (any flag does where ``f``
    takes ``**params``, as ``merge`` does its methods' parameters)."""
    params = inspect.signature(f).parameters
    any_name = any(p.kind is p.VAR_KEYWORD for p in params.values())
    elsewhere = elsewhere or {}

    def name(flag: str) -> str | None:
        kw = renames.get(flag, flag[2:].replace("-", "_"))
        p = params.get(kw)
        if p is None and flag in elsewhere:
            return elsewhere[flag]
        if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return kw if any_name else None
        return f"{kw}=True" if p.default is False else kw

    return name


def python_terms(text: str, name: Callable[[str], str | None]) -> str:
    """``text`` with each flag that ``name`` knows said as its keyword."""

    def say(m: re.Match) -> str:
        kws = [name(flag) for flag in m[1].split("/")]
        if None in kws:
            return m[0]
        value = m[2] or ""
        if value and len(kws) == 1 and not kws[0].endswith("=True"):
            if value[1:].isupper():  # a placeholder: --into BASE -> into=BASE
                return f"{kws[0]}={value[1:]}"
            if (literal := _literal(kws[0], value[1:])) is not None:
                return f"{kws[0]}={literal}"
        return "/".join(kws) + value

    return _FLAGS.sub(say, text)


def python_api(f: Callable, public_name: str) -> Callable:
    """``f`` as ``loramix.<public_name>``: the same call, whose
    :class:`LoramixError` names ``f``'s keywords, not the CLI's flags (the
    same exception, its ``where``, ``problem`` and message rendered; one
    made on the machine's failure is that OSError, :attr:`LoramixError.fault`), and
    which a SIGTERM left at its default unwinds before it kills the process
    (:func:`~loramix.stopping.sigterm_unwinds`, module docstring)."""
    name = keyword_namer(f, RENAMES.get(public_name, {}), ELSEWHERE.get(public_name))
    fields = RESULT_TEXT.get(public_name, ())

    @functools.wraps(f)
    def call(*args, **kwargs):
        try:
            with sigterm_unwinds():  # a kill where SIGTERM is at its default leaves no temporary
                result = f(*args, **kwargs)
        except LoramixError as e:
            if e.fault is not None:  # the machine failed under an input: its OSError, not bad input
                raise e.fault from None
            if e.where is not None and e.where.startswith("--"):  # else a path or a setting, as given
                e.where = python_terms(e.where, name)
            e.problem = python_terms(e.problem, name)
            e.args = (e.message,)
            raise
        return rendered(result, fields, name) if fields else result

    # pickled by reference as loramix.<name>, which is this object (a pool's task)
    call.__module__, call.__qualname__ = "loramix", public_name
    return call


def rendered(result, fields: tuple[str, ...], name: Callable[[str], str | None]):
    """``result`` (a dict or a dataclass) with each of ``fields``, a sentence
    or a list of them, in keyword terms (:func:`python_terms`): a copy, the
    same type; the other fields are the same objects."""
    import dataclasses

    def say(v):
        if isinstance(v, str):
            return python_terms(v, name)
        return [python_terms(t, name) if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    if isinstance(result, dict):
        return {k: say(v) if k in fields else v for k, v in result.items()}
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(
            result, **{k: say(getattr(result, k)) for k in fields if hasattr(result, k)}
        )
    return result


# ---- one name per concept: the old keywords kept for one release ----------------------------------------------


def _warn_deprecated(text: str) -> None:
    """A :class:`DeprecationWarning` pointed at the caller's own line: the
    first frame outside the loramix package, so that Python shows it there
    (it shows a DeprecationWarning only for code in ``__main__``: a
    script's or a notebook's). Outside the package, not only this module:
    ``loramix.predict`` and ``loramix.run_scenario`` have a wrapper of
    :mod:`loramix.blas` between :func:`python_api`'s and :func:`renamed`'s,
    and a warning pointed at it was hidden by the default filters."""
    from .errors import warn

    warn(text, DeprecationWarning)


def _from_position(fname: str, extra: tuple, positional: tuple[str, ...], lead: int, kwargs: dict) -> dict:
    """``kwargs`` with the values ``extra`` given after the ``lead`` positional
    parameters bound to their old names ``positional``, warned."""
    if len(extra) > len(positional):  # Python's own words for too many
        s = "" if lead == 1 else "s"
        raise TypeError(f"{fname}() takes {lead} positional argument{s} but {lead + len(extra)} were given")
    names = positional[: len(extra)]
    for n in names:
        if n in kwargs:
            raise UsageError(fname, f"{n} given twice, by position and as {n}=")
    said = ", ".join(f"{n}=..." for n in names)
    them = "them as keywords" if len(names) > 1 else "it as a keyword"
    _warn_deprecated(f"{fname}: passing {', '.join(names)} by position is deprecated; pass {them} ({said})")
    return {**kwargs, **dict(zip(names, extra))}


def renamed(
    old: dict[str, str | tuple[str, ...]] | None = None, *, positional: tuple[str, ...] = ()
) -> Callable:
    """Keep ``f``'s callers of the previous release working, warned.

    ``old``: ``{old keyword: new keyword}``; a call with the old keyword gets
    a :class:`DeprecationWarning` naming both and runs as if given the new one
    (the same value, the same result). ``positional``: the names, in their
    old order, of parameters that were positional and are now keyword-only;
    a call passing them by position gets a warning and runs as if given them
    as keywords. Both forms of one parameter at once (``batch=`` and
    ``batch_size=``, or a value by position and by keyword) raise a one-line
    :class:`~loramix.errors.UsageError`, before any work. ``f``'s own
    signature is what ``inspect.signature`` and ``help`` show.

    A new name may be a tuple of keywords: the old keyword took a dict of
    them (``evaluate``'s ``fields={"question_field": "q"}``, now
    ``question_field="q"``), which is spread over them, warned; a key that
    is none of them is refused naming the old keyword.
    """
    old = dict(old or {})

    def wrap(f: Callable) -> Callable:
        leading = [p.name for p in inspect.signature(f).parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        lead, fname = len(leading), f.__name__

        @functools.wraps(f)
        def call(*args, **kwargs):
            if len(args) > lead and positional:
                kwargs = _from_position(fname, args[lead:], positional, lead, kwargs)
                args = args[:lead]
            for was, now in old.items():
                if was in kwargs:
                    kwargs = (_spread if isinstance(now, tuple) else _renamed)(fname, was, now, kwargs,
                                                                               leading[: len(args)])  # fmt: skip
            return f(*args, **kwargs)

        call.__renamed__ = dict(old)  # read by the tests of the signatures' rules
        call.__positional__ = tuple(positional)
        return call

    return wrap


def _renamed(fname: str, was: str, now: str, kwargs: dict, given: list[str]) -> dict:
    """``kwargs`` with the old keyword ``was`` given as ``now``, warned."""
    if now in kwargs or now in given:
        raise UsageError(fname, f"give {now} or its old name {was}, not both")
    _warn_deprecated(f"{fname}: the keyword {was} is deprecated; its name is now {now} (the same meaning)")
    kwargs = dict(kwargs)
    kwargs[now] = kwargs.pop(was)
    return kwargs


def _spread(fname: str, was: str, now: tuple[str, ...], kwargs: dict, given: list[str]) -> dict:
    """``kwargs`` with the dict given as the old keyword ``was`` spread over the
    keywords ``now`` it held (None or an empty dict: none of them), warned."""
    kwargs = dict(kwargs)
    value = kwargs.pop(was)
    if value is not None and not isinstance(value, dict):
        raise UsageError(fname, f"{was} is a dict of {', '.join(now)}, not a {type(value).__name__}")
    value = dict(value or {})
    if unknown := [k for k in value if k not in now]:
        raise UsageError(fname, f"{was}: {', '.join(map(repr, unknown))} is none of {', '.join(now)}")
    for k in value:
        if k in kwargs or k in given:
            raise UsageError(fname, f"give {k} or its old form {was}={{{k!r}: ...}}, not both")
    said = ", ".join(f"{k}=..." for k in now)
    _warn_deprecated(f"{fname}: the keyword {was} is deprecated; pass its entries as keywords ({said})")
    return {**kwargs, **value}
