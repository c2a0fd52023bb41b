"""API results that stand for what they wrote: path-like (``os.PathLike``).

``merge`` (a :class:`~loramix.methods.MergeResult`), ``sum_into_base`` (a
:class:`~loramix.engine.StreamResult`), ``train_adapter`` and ``build_base``
(dicts) each write one folder, ``out``. Their results are path-like
(``os.fspath(res) == str(res.out)``), so one is passed on where a path is
taken: ``evaluate(merge(..., into=base, out="m/"), data=...)``,
``evaluate(base, adapters=[train_adapter(...)])``. What the folder holds still
decides what it can be: a merge written into a base is a model folder, which
is refused as an adapter in one line, as its path would be.
"""

from __future__ import annotations

import os


class WrittenFolder:
    """A mixin for a result with an ``out`` attribute (the folder written)."""

    def __fspath__(self) -> str:
        return os.fspath(self.out)


class OutputDict(dict):
    """A result dict whose ``"out"`` is the folder written: ``res["out"]``,
    ``res.out`` and ``os.fspath(res)`` are that path; otherwise a plain dict
    (its keys, JSON and equality as before)."""

    @property
    def out(self) -> str:
        return self["out"]

    def __fspath__(self) -> str:
        return os.fspath(self["out"])
