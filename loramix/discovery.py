"""Plug-in packages: one module per entry, found by listing the package."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType


def package_modules(package: str, path, skip: tuple[str, ...] = ("base",)) -> Iterator[ModuleType]:
    """Import and yield every module of ``package`` (its ``__path__`` is ``path``)
    except those in ``skip`` and private ones (``_name``), in name order."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name in skip or info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{package}.{info.name}")


def defined_here(mod: ModuleType) -> Iterator[tuple[str, object]]:
    """``(name, object)`` of the module's attributes whose class or self was defined in it."""
    for name, obj in vars(mod).items():
        owner = obj if isinstance(obj, type) else type(obj)
        if owner.__module__ == mod.__name__:
            yield name, obj
