"""Adapter file formats: one reader per file, found here, tried in turn.

A reader has ``name``, ``detect(path) -> bool`` (cheap: reads the config at
most) and ``read(path, name=None) -> Adapter``. Every module of this package
(other than ``base``) that defines a reader class registers one instance; a
format name claimed twice is refused. :func:`find_format` returns the reader
that detects ``path``; when none does it says why in one line, naming a
foreign format (kohya, diffusers, a pickle) where it recognises one
(:mod:`loramix.io.unsupported_formats`, torch-free: the numpy reader of
:mod:`loramix.io.np_factors` names them too).
"""

from __future__ import annotations

from pathlib import Path

from ...discovery import defined_here, package_modules
from ...errors import AdapterError
from ..peft_layout import unsupported_peft_type
from ..unsupported_formats import name_unsupported
from .base import read_config, resolve_adapter_paths

FORMATS: dict[str, object] = {}


def register(reader) -> None:
    """Add ``reader``; a second reader with its name is an error."""
    if reader.name in FORMATS and type(FORMATS[reader.name]) is not type(reader):
        raise ValueError(f"adapter format {reader.name!r} is already registered")
    FORMATS[reader.name] = reader


def _discover() -> None:
    for mod in package_modules(__name__, __path__):
        for _, obj in defined_here(mod):
            if isinstance(obj, type) and getattr(obj, "name", "") and callable(getattr(obj, "detect", None)):
                register(obj())


def find_format(path: str | Path):
    """The reader whose ``detect`` accepts ``path``, or :class:`AdapterError`."""
    for reader in FORMATS.values():
        if reader.detect(path):
            return reader
    # Nobody claims it: a foreign format is named; else the layout's own checks say what is wrong.
    if Path(path).exists() and (what := name_unsupported(path)) is not None:
        raise AdapterError(path, what)
    _, cfg, _ = resolve_adapter_paths(path)
    raise AdapterError(cfg, unsupported_peft_type(read_config(cfg)))


_discover()
