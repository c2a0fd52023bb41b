"""Plug-in packages: one module per entry, found by listing the package."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
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


def _class_defs(package: str, skip: tuple[str, ...]) -> Iterator[tuple[ast.ClassDef, dict]]:
    """Each top-level class of the modules :func:`package_modules` would import,
    with the class attributes it sets to literals; read from the source
    without importing the modules (or the package)."""
    spec = importlib.util.find_spec(package)  # imports the parents only, not ``package``
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name in skip or info.name.startswith("_"):
            continue
        path = info.module_finder.find_spec(f"{package}.{info.name}").origin  # no import of the package
        st = os.stat(path)
        for cls, attrs in _parsed(path, st.st_mtime_ns, st.st_size, st.st_ino):
            yield cls, dict(attrs)  # a copy: a caller's change stays out of the memo


@functools.lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int, size: int, ino: int) -> tuple[tuple[ast.ClassDef, dict], ...]:
    """The top-level classes of the source file ``path`` with the class
    attributes they set to literals; parsed once per process and version of
    the file (its stat in the key: an edited or replaced file is parsed
    again). A scenario rerun asks for the kinds' declarations a dozen times
    (each parse a hundredth of a second)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        attrs = {}
        for st in cls.body:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                try:
                    attrs[st.targets[0].id] = ast.literal_eval(st.value)
                except ValueError:  # not a literal
                    pass
        out.append((cls, attrs))
    return tuple(out)


def declared(package: str, base: str | tuple[str, ...], attr: str = "id",
             skip: tuple[str, ...] = ("base",)) -> dict[str, dict]:  # fmt: skip
    """``{name: {attribute: value}}`` of the classes whose bases name ``base``
    (or one of the names ``base`` lists)
    and that set ``attr = "name"`` (a string literal), in the modules
    :func:`package_modules` would import, with the other class attributes they
    set to literals (``needs_base = True``); read from the source without
    importing the modules (or the package), so a plug-in's name and flags are
    known before its imports (torch) are paid for."""
    bases = (base,) if isinstance(base, str) else base
    found: dict[str, dict] = {}
    for cls, attrs in _class_defs(package, skip):
        if any(
            (getattr(b, "id", None) or getattr(b, "attr", None)) in bases for b in cls.bases
        ) and isinstance(attrs.get(attr), str):
            found[attrs[attr]] = attrs
    return found


def defining(
    package: str, method: str, attr: str = "name", skip: tuple[str, ...] = ("base",)
) -> dict[str, dict]:
    """``{name: {attribute: value}}`` as :func:`declared` gives it, of the
    classes that define ``method`` themselves and set ``attr`` to a string
    literal, whatever their bases; read without importing anything."""
    return {
        attrs[attr]: attrs
        for cls, attrs in _class_defs(package, skip)
        if isinstance(attrs.get(attr), str)
        and any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == method for n in cls.body)
    }


def declared_names(package: str, base: str, attr: str = "id") -> list[str]:
    """The names :func:`declared` finds, sorted."""
    return sorted(declared(package, base, attr))


def kind_names() -> list[str]:
    """The adapter kinds' names, sorted: once :mod:`loramix.kinds` is imported,
    its registry's (:data:`loramix.kinds.KINDS`, which may hold kinds registered
    from outside the package); until then the names the kind files declare
    (:func:`declared_names`), read without importing them (they import torch)."""
    import sys

    if (kinds := sys.modules.get("loramix.kinds")) is not None:
        return sorted(kinds.KINDS)
    return list(_declared_kinds())


@functools.cache
def _declared_kinds() -> tuple[str, ...]:
    # once per process: parsing the kind files takes a tenth of a second, and a
    # report asks for every figure it keys
    return tuple(declared_names("loramix.kinds", "AdapterKind"))


def defined_here(mod: ModuleType) -> Iterator[tuple[str, object]]:
    """``(name, object)`` of the module's attributes whose class or self was defined in it."""
    for name, obj in vars(mod).items():
        owner = obj if isinstance(obj, type) else type(obj)
        if owner.__module__ == mod.__name__:
            yield name, obj
