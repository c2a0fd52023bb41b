"""loramix: compose LoRA-family adapters.

Load many adapters, measure how they overlap (exact, from the low-rank
factors), merge them into base weights, evaluate and predict interference.

The public API is imported lazily so that ``import loramix`` (and the CLI)
starts fast; ``loramix.load_adapter`` etc. resolve on first use. Their
errors name the functions' keywords (``rank``, ``force=True``), where the
CLI, which calls the same functions from their modules, names its flags
(``--rank``, ``--force``): see :mod:`loramix.api`.
"""

from __future__ import annotations

import importlib
import types

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Adapter": "loramix.adapter",
    "ModuleDelta": "loramix.adapter",
    "LoramixError": "loramix.errors",
    "load_adapter": "loramix.io.adapter_files",
    "save_peft_adapter": "loramix.io.adapter_files",
    "save_d2_adapter": "loramix.io.adapter_files",
    "similarity": "loramix.overlap",
    "sum_into_base": "loramix.methods.sum",
    "sum_adapters": "loramix.methods.sum",
    "merge": "loramix.methods",
    "train_adapter": "loramix.train",
    "evaluate": "loramix.perplexity",
    "build_base": "loramix.basebuild",
    "run_scenario": "loramix.scenario.runner",
    "predict": "loramix.interference",
    "plan": "loramix.grouping",
    "fit_evaluations": "loramix.evalfit",
    "inspect_adapter": "loramix.contents",
    "import_gguf": "loramix.gguf_import",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        obj = getattr(importlib.import_module(_API[name]), name)
        if isinstance(obj, types.FunctionType):  # a class (Adapter, LoramixError) is itself
            from .api import python_api

            obj = python_api(obj, name)  # its errors name keywords, not the CLI's flags
        globals()[name] = obj  # the same object on every access
        return obj
    raise AttributeError(f"module 'loramix' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily imported API too, so a notebook's completion offers it."""
    return sorted(set(globals()) | set(_API))
