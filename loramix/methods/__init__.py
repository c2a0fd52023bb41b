"""Merge methods, registered by name (DESIGN.md sections 3-5).

A method is one small file in this package defining a
:class:`~loramix.methods.base.MergeMethod` subclass decorated with
:func:`register`. Built in:

===========  =====================================================  ==========
name         what                                                   output
===========  =====================================================  ==========
sum          ``sum_i w_i dW_i`` (exact)                             adapter or model
svd          the sum recompressed to rank k / an energy fraction    adapter or model
ties         trim, elect sign, disjoint mean                        model
dare-linear  random drop + rescale, weighted sum                    model
dare-ties    random drop + rescale, then TIES election              model
magnitude    top-density entries of each delta, weighted sum        model
d2-signed    D2-LoRA: sum residuals, project once, add              model
===========  =====================================================  ==========

Every method acts on the true per-module deltas (``ModuleDelta.delta``),
one module at a time, on the chosen device. Use :func:`merge` from Python::

    from loramix.methods import merge
    res = merge(["a/", "b/"], "ties", into="base/", out="merged/", density=0.3)
    res.summary          # what the CLI prints
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

_REGISTRY: dict[str, type] = {}
# Modules of the built-in methods, imported on first use of the registry.
_BUILTINS = ("sum", "svd", "ties", "dare", "magnitude", "d2_signed")
_loaded = False


def register(cls):
    """Class decorator: make a :class:`MergeMethod` available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTINS:
            importlib.import_module(f"{__name__}.{mod}")


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str):
    """An instance of the method called ``name``; an unknown name is a
    :class:`UsageError` listing the known ones."""
    _load_builtins()
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise UsageError(
            "--method", f"unknown method {name!r}; known methods: {', '.join(available_methods())}"
        )
    return _REGISTRY[key]()


@dataclass
class MergeResult:
    """What :func:`merge` wrote.

    ``kind`` is ``"adapter"`` (a PEFT folder) or ``"model"`` (a base with the
    merge added). ``modules`` holds per-module facts (svd: rank and discarded
    energy; d2-signed: difference to adding effective deltas); ``summary``
    the totals the CLI prints. ``record`` is the ``loramix.json`` content.
    """

    out: Path
    method: str
    kind: str
    params: dict
    weights: list[float]
    modules: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def parse_weights(weights: Any, n: int) -> list[float]:
    """``None`` -> all 1; a ``"1,0.5"`` string or a sequence of ``n`` numbers."""
    import math

    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        parts = [p.strip() for p in weights.split(",") if p.strip()]
    else:
        parts = list(weights)
    try:
        ws = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UsageError("--weights", f"{weights!r} is not a comma-separated list of numbers") from None
    if len(ws) != n:
        raise UsageError("--weights", f"{len(ws)} weights given for {n} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise UsageError("--weights", f"{weights!r} holds a non-finite number")
    return ws


def parse_dtype(dtype: Any):
    """``None``/``"auto"`` -> None; ``float32``/``fp32``/``float16``/``bfloat16``/... -> torch dtype."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "auto": None,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return names[key]


def merge(
    adapters: Sequence,
    method: str,
    *,
    weights: Any = None,
    into: str | Path | None = None,
    out: str | Path,
    device: str = "auto",
    dtype: Any = None,
    force: bool = False,
    progress: bool = False,
    **params,
) -> MergeResult:
    """Merge ``adapters`` (paths or loaded :class:`~loramix.adapter.Adapter`\\ s)
    with ``method`` and write the result to ``out``.

    ``weights``: one per adapter (default 1; a list or ``"1,0.5"``).
    ``into``: a Hugging Face base folder; the result is that model with the
    merged delta added. Without it, low-rank methods (``sum``, ``svd``) write
    a PEFT adapter; the others need ``into``. ``params`` are the method's
    (``density``, ``sign``, ``divide``, ``lambda_``/``lambda``, ``seed``,
    ``rank``, ``energy``); ``None`` values mean "not given". ``dtype``: the
    output dtype (default: the base's, or the adapters' for an adapter).

    Every check runs before any work: bad input raises a one-line
    :class:`~loramix.errors.LoramixError`. The same inputs and parameters
    give byte-identical output files (the creation time is only in
    ``loramix.json``).
    """
    from .runner import run_merge

    return run_merge(
        adapters,
        method,
        weights=weights,
        into=into,
        out=out,
        device=device,
        dtype=dtype,
        force=force,
        progress=progress,
        **params,
    )


__all__ = [
    "register",
    "get_method",
    "available_methods",
    "merge",
    "MergeResult",
    "parse_weights",
    "parse_dtype",
]


