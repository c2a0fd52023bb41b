"""API results that stand for what they wrote: path-like (``os.PathLike``).

One rule for every function that writes a folder or a file (``merge``,
``sum_into_base``, ``sum_adapters``, ``train_adapter``, ``build_base``,
``import_gguf``, ``fit_evaluations``, ``run_scenario``, ``save_peft_adapter``,
``save_d2_adapter``): its result

* is path-like for what it wrote: ``os.fspath(res)`` is that folder, so a
  result is passed on where a path is taken
  (``evaluate(merge(..., into=base, out="m/"), data=...)``,
  ``evaluate(base, adapters=[train_adapter(...)])``);
* has ``res.out``, that path as a :class:`pathlib.Path`, and ``res / "name"``,
  a path inside it (``res.out / "name"``);
* carries its figures as attributes (a dict result: as keys too, its
  ``"out"`` the string it always was), and its ``repr`` is one line that
  leaves the long ones out.

Three shapes keep what each function returned before: a dataclass
(:class:`~loramix.methods.MergeResult`, :class:`~loramix.engine.StreamResult`,
with :class:`WrittenFolder`), a dict (:class:`OutputDict`: ``train_adapter``,
``build_base``, ``import_gguf``, ``fit_evaluations``, ``run_scenario``) and,
where a function returned a :class:`~pathlib.Path`, that path
(:class:`WrittenPath`: ``sum_adapters``, ``save_*_adapter``; ``str``, ``==``
and every path method as before). ``fit_evaluations(out=None)`` writes
nothing: its ``out`` is None and ``os.fspath`` of it raises ``TypeError``.

What the folder holds still decides what it can be: a merge written into a
base is a model folder, which is refused as an adapter in one line, as its
path would be.
"""

from __future__ import annotations

import os
from pathlib import Path


def _written(out, what: str) -> str:
    if out is None:  # fit_evaluations(out=None)
        raise TypeError(f"{what} wrote nothing (out=None): it stands for no path")
    return os.fspath(out)


class WrittenFolder:
    """A mixin for a dataclass result with an ``out`` attribute (the folder
    written, a :class:`~pathlib.Path`)."""

    def __fspath__(self) -> str:
        return _written(self.out, type(self).__name__)

    def __truediv__(self, name) -> Path:
        return Path(_written(self.out, type(self).__name__)) / name


def _short(v) -> str:
    """``v`` for a one-line repr: a number or a short string as it is, a
    long string or container as its size."""
    said = repr(v)
    if isinstance(v, (str, dict, list, tuple, set)) and (len(said) > 80 or "\n" in said):
        return f"<{type(v).__name__} of {len(v)}>"
    return said


class OutputDict(dict):
    """A result dict whose ``"out"`` is the folder written: ``res["out"]``
    (a string, as the dict always held it), ``os.fspath(res)`` and ``res.out``
    (a :class:`~pathlib.Path`) are that path; otherwise a plain dict (its
    keys, JSON and equality as before). Its repr is one line: long values
    are said by their size (``'results': <list of 40>``); ``dict(res)`` or
    ``pprint`` shows them."""

    @property
    def out(self) -> Path | None:
        return None if self.get("out") is None else Path(self["out"])

    def __fspath__(self) -> str:
        return _written(self.get("out"), "this result")

    def __truediv__(self, name) -> Path:
        return Path(_written(self.get("out"), "this result")) / name

    def __repr__(self) -> str:
        return (
            "{" + ", ".join(f"{k!r}: {repr(v) if k == 'out' else _short(v)}" for k, v in self.items()) + "}"
        )


_PlainPath = type(Path())  # PosixPath or WindowsPath: Path itself cannot be subclassed before 3.12


class WrittenPath(_PlainPath):
    """The :class:`~pathlib.Path` a function wrote (``sum_adapters``,
    ``save_peft_adapter``, ``save_d2_adapter``), which returned a plain path
    before: it still is one (``str``, ``==``, hashing, ``/``, ``.name``...),
    with ``out`` (itself, as a plain path) and the figures as attributes:
    ``figures`` (a dict) and, where a :class:`~loramix.methods.MergeResult`
    stands behind it, ``result`` and that result's fields (``summary``,
    ``weights``...). Paths derived from it (``res / "x"``, ``res.parent``)
    are plain paths."""

    @classmethod
    def of(cls, path, *, result=None, **figures) -> WrittenPath:
        self = cls(path)
        self.figures, self.result = figures, result
        return self

    # a derived path is a plain one: 3.12's hook, and 3.10/3.11's
    def with_segments(self, *segments):
        return _PlainPath(*segments)

    @classmethod
    def _from_parsed_parts(cls, *args):
        return _PlainPath._from_parsed_parts.__func__(_PlainPath, *args)

    @property
    def out(self) -> Path:
        return _PlainPath(self)

    def __getattr__(self, name: str):
        d = self.__dict__
        if name in d.get("figures", {}):
            return d["figures"][name]
        if d.get("result") is not None and not name.startswith("_"):
            return getattr(d["result"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        said = dict(self.__dict__.get("figures", {}))
        res = self.__dict__.get("result")
        if res is not None:  # the result's own repr fields, less its out
            import dataclasses

            said.update(
                {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.repr and f.name != "out"}
            )
        return (
            f"{type(self).__name__}({str(self)!r}"
            + "".join(f", {k}={_short(v)}" for k, v in said.items())
            + ")"
        )

    def __reduce__(self):  # pickled as the plain path (the figures are not part of it)
        return (_PlainPath, tuple(self.parts))
