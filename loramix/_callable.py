"""Modules that are also the function they are named after.

``loramix.similarity`` is both a module and its main function, and so are
``loramix.merge``, ``loramix.evaluate`` and ``loramix.predict``. Once such a
module is imported, Python binds it as the package attribute, hiding the
function that ``loramix/__init__.py`` exports lazily. Making the module
object callable keeps ``loramix.similarity(paths)`` working whichever way
round things were imported.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Call as ``make_callable(__name__)`` at the end of the module."""
    sys.modules[module_name].__class__ = _CallableModule
