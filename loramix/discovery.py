"""Plug-in packages: one module per entry, found by listing the package."""

from __future__ import annotations

import ast
import importlib
import importlib.util
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


def declared_names(package: str, base: str, attr: str = "id", skip: tuple[str, ...] = ("base",)) -> list[str]:
    """The string constants ``attr = "..."`` of the classes whose bases name
    ``base``, in the modules :func:`package_modules` would import, read from
    their source without importing them (or the package): a plug-in's name is
    known before the modules' own imports (torch) are paid for. Sorted."""
    spec = importlib.util.find_spec(package)  # imports the parents only, not ``package``
    names = []
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name in skip or info.name.startswith("_"):
            continue
        path = info.module_finder.find_spec(f"{package}.{info.name}").origin  # no import of the package
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            if not any((getattr(b, "id", None) or getattr(b, "attr", None)) == base for b in cls.bases):
                continue
            for st in cls.body:
                if (isinstance(st, ast.Assign) and any(getattr(t, "id", None) == attr for t in st.targets)
                        and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)):  # fmt: skip
                    names.append(st.value.value)
    return sorted(names)


def defined_here(mod: ModuleType) -> Iterator[tuple[str, object]]:
    """``(name, object)`` of the module's attributes whose class or self was defined in it."""
    for name, obj in vars(mod).items():
        owner = obj if isinstance(obj, type) else type(obj)
        if owner.__module__ == mod.__name__:
            yield name, obj
