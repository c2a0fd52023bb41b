"""Merge methods, discovered from this package and registered by name (see docs/merging.md).

A method is one file in this package defining a
:class:`~loramix.methods.base.MergeMethod` subclass decorated with
:func:`register`: its parameters (:class:`~loramix.methods.base.Param`, which
become the ``merge`` command's options), the adapter kinds it applies to,
its math, and how it summarises and describes its per-module facts. Every
module of the package is imported on first use of the registry (no list to
keep), and a second method with a taken name is refused. Built in:

===========  =====================================================  ==========
name         what                                                   output
===========  =====================================================  ==========
sum          ``sum_i w_i dW_i`` (exact)                             adapter or model
svd          the sum recompressed to rank k / an energy fraction    adapter or model
ties         trim, elect sign, disjoint mean                        model
dare-linear  random drop + rescale, weighted sum                    model
dare-ties    random drop + rescale, then TIES election              model
magnitude    top-density entries of each delta, weighted sum        model
task-arith.  lambda times the weighted sum (exact)                  adapter or model
breadcrumbs  drop largest (gamma) and smallest magnitudes, sum      model
della        magnitude-ranked random drop, L1 rescale, TIES         model
d2-signed    D2-LoRA: sum residuals, project once, add              model
core-ties    ties on the deltas' cores in their factors' SVD bases  adapter or model
core-dare-*  dare-ties / dare-linear likewise                       adapter or model
knots-ties   ties on U^T dW_i, U the deltas' joint left basis       adapter or model
knots-dare-* dare-ties likewise                                     adapter or model
iso-c        the sum's singular values set to their mean (Iso-C)    adapter or model
iso-cts      iso-c, the sum's least directions each adapter's own   adapter or model
tsv          each delta's singular vectors decorrelated (TSV)       adapter or model
===========  =====================================================  ==========

Any method writes an adapter with ``out_rank`` / ``energy`` (the merged
delta truncated by SVD; :func:`loramix.methods.runner.truncate`).

Every method acts on the true per-module deltas (``ModuleDelta.delta``),
one module at a time, on the chosen device. Use :func:`merge` from Python::

    from loramix.methods import merge
    res = merge(["a/", "b/"], "ties", into="base/", out="merged/", density=0.3)
    res.summary          # what the CLI prints
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..options import check_dtype, parse_weights
from ..results import WrittenFolder
from .params import check_divide_weights

_REGISTRY: dict[str, type] = {}
# Modules of this package that hold no method.
_NOT_METHODS = {"base", "params", "runner"}
# Names the merge command uses for its own options: a method parameter may not take one.
RESERVED = {
    "method",
    "adapters",
    "weights",
    "into",
    "out",
    "device",
    "dtype",
    "force",
    "progress",
    "out_rank",
}
_loaded = False


def register(cls):
    """Class decorator: make a :class:`MergeMethod` available by its ``name``.

    A name already taken by another class, or a parameter named like one of
    the command's own options (:data:`RESERVED`), is refused."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    old = _REGISTRY.get(cls.name)
    # The same class imported again (a reloaded module) is not a duplicate.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"merge method {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}"
        )
    clash = sorted({p.name.rstrip("_") for p in cls.params} & RESERVED)
    if clash:
        raise ValueError(f"merge method {cls.name!r}: parameter {clash[0]} clashes with a merge option")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in pkgutil.iter_modules(__path__):
            if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def method_classes() -> dict[str, type]:
    """name -> :class:`MergeMethod` subclass, for every registered method."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


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


def params_of(name: str) -> dict:
    """``{Param.key: Param}`` of the method called ``name``: its parameters by
    the names files write them under (``lambda``, not ``lambda_``)."""
    return {p.key: p for p in get_method(name).params}


def explicit_params(name: str, params: dict) -> dict:
    """``params`` (by :attr:`Param.key`) of the method called ``name`` as its
    own: its parameters that differ from their defaults, the required ones
    always. Two merges by one method with equal explicit parameters merge alike."""
    declared = params_of(name)
    return {
        k: v
        for k, v in params.items()
        if k in declared and (declared[k].required or v != declared[k].default)
    }


@dataclass
class MergeResult(WrittenFolder):
    """What :func:`merge` wrote; path-like: ``os.fspath(res)`` is ``out``, a
    :class:`~pathlib.Path`, and ``res / name`` a path inside it
    (:mod:`loramix.results`), so it is passed on as its folder.

    ``kind`` is ``"adapter"`` (a PEFT folder) or ``"model"`` (a base with the
    merge added). ``modules`` holds per-module facts (svd: rank and discarded
    energy; d2-signed: difference to adding effective deltas); ``summary``
    the totals the CLI prints. ``record`` is the ``loramix.json`` content.
    The repr leaves out ``modules``, ``record`` and ``stream`` (a notebook
    echoing the result showed thousands of characters of them).
    """

    out: Path
    method: str
    kind: str
    params: dict
    weights: list[float]
    modules: dict[str, dict] = field(default_factory=dict, repr=False)
    summary: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict, repr=False)
    #: what the engine wrote for a model output (tensors, bytes, device, seconds)
    stream: Any = field(default=None, repr=False)


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
    progress: bool = True,
    **params,
) -> MergeResult:
    """Merge ``adapters`` (paths or loaded :class:`~loramix.adapter.Adapter`\\ s;
    one of them alone is a list of one) with ``method`` and write the result
    to ``out``.

    ``weights``: one per adapter (default 1; a list or ``"1,0.5"``).
    ``into``: a Hugging Face base folder; the result is that model with the
    merged delta added. Without it the result is a PEFT adapter: exact for
    the low-rank methods (``sum``, ``task-arithmetic``, ``svd``,
    ``core-ties``, ``core-dare-ties``, ``core-dare-linear``, ``knots-ties``,
    ``knots-dare-ties``, ``iso-c``, ``iso-cts``, ``tsv``: those whose class
    has ``low_rank``), the SVD truncation of the merged delta for any other
    method (and any of those but ``iso-c`` and ``iso-cts``) given
    ``out_rank`` (a rank) or ``energy`` (a fraction kept). ``params`` are the
    method's (``density``, ``sign``, ``divide``, ``lambda_``/``lambda``,
    ``seed``, ``gamma``, ``epsilon``, ``rank``, ``energy``, ``common``,
    ``flat``) and ``out_rank``; ``None`` values mean "not given".
    ``dtype``: the output dtype (default: the base's, or the adapters' for
    an adapter). ``device``: where the deltas are formed and merged,
    ``"auto"`` (CUDA where torch sees a GPU, else the CPU), ``"cpu"`` or
    ``"cuda"``. ``force``: replace an existing ``out``. ``progress``: a bar of the bytes written into a model (on
    a terminal).

    Every check runs before any work: bad input raises a one-line
    :class:`~loramix.errors.LoramixError`. The same inputs and parameters
    give byte-identical output files (the creation time is only in
    ``loramix.json``).

    Returns a :class:`MergeResult`: ``out``, ``method``, ``kind``
    (``"model"`` or ``"adapter"``), the ``params`` used, the ``weights``, a
    ``summary`` (modules; svd's discarded energy), per-module facts in
    ``modules`` and, for a model, the engine's ``stream``.
    """
    # Checks that need no torch come first: a bad command line fails fast.
    from ..io.peft_layout import adapter_list, check_adapter_paths

    m = get_method(method)
    # one path or loaded adapter is one adapter, as in similarity and evaluate: iterated, a path
    # gave its characters and an Adapter its modules
    adapters = adapter_list(adapters)
    if not adapters:
        raise UsageError("merge", "no adapters given")
    weights = parse_weights(weights, len(adapters))
    if dtype is None or isinstance(dtype, str):  # a torch dtype is taken as it is
        check_dtype(dtype)
    check_adapter_paths(adapters)  # a mistyped path: what loading it would say, without torch
    from .base import split_truncation

    # the truncation and the method's own parameters too (run_merge checks them again)
    own = dict(params)
    trunc = split_truncation(m, own, into)
    own_params = m.coerce_params(own)
    m.check(own_params, [])  # the cross-parameter checks (svd: --rank or --energy); no adapter yet
    check_divide_weights(own_params, weights, m)
    if into is not None or m.low_rank or trunc is not None:  # else run_merge says "pass --into" first
        from ..io.outputs import check_output

        # an --out that exists (a command run again): checked again with the adapters loaded
        check_output(out, force=force, inputs=[getattr(a, "path", a) for a in adapters] + [into])
    if into is not None:  # after the output's checks, which name a symlink loop as one
        from ..models import read_model_config

        read_model_config(into)  # a mistyped --into: BaseModelFolder's first checks, without torch
    elif not m.low_rank and trunc is None:
        _refuse_a_dense_adapter(m, adapters, own, device)
    _warn_repeated(adapters)  # once the command line is known good: not a warning above its one-line error
    from .runner import run_merge

    res = run_merge(adapters, method, weights=weights, into=into, out=out, device=device, dtype=dtype,
                    force=force, progress=progress, **params)  # fmt: skip
    # after the merge, which hashed the base for its provenance: its hashes are read back from the cache
    if into is not None:
        from ..trained_base import warn_other_bases

        warn_other_bases(adapters, into, "merged into it")
    else:
        from ..trained_base import warn_mixed_bases

        warn_mixed_bases(adapters, "merged with it")
    return res


def _warn_repeated(adapters: Sequence) -> None:
    """Warn of an adapter file given more than once (the same folder or file
    by any name): each copy is a member, so its delta is merged that many
    times (``sum a a`` is ``2 dW_a``), which a repeated shell argument does
    unasked; ``--weights`` scales one copy instead."""
    from collections import Counter

    from ..errors import warn

    def key(a):
        p = getattr(a, "path", a)
        return os.path.realpath(p).removesuffix("/adapter_model.safetensors") if p is not None else id(a)

    first = {}
    for a in adapters:
        first.setdefault(key(a), getattr(a, "path", a))
    for k, n in Counter(map(key, adapters)).items():
        if n > 1:
            warn(f"{first[k]}: given {n} times, so its delta is merged {n} times (a weight scales one "
                 "copy instead: weights=, --weights)")  # fmt: skip


def _refuse_a_dense_adapter(m, adapters: Sequence, params: dict, device) -> None:
    """A dense method without ``--into`` or a truncation has nothing to write:
    run_merge says so once the adapters load and its earlier checks pass. For
    PEFT LoRA paths on the CPU those checks are made here, in run_merge's order
    and with its lines, on the numpy reader's adapters (the same checks of
    the files), so that the refusal needs no torch: the files read, shapes
    that fit (check_compatible), the method's checks, one base, then "pass
    --into". Anything else (a loaded Adapter, DoRA, D2-LoRA, embedding LoRA,
    modules_to_save, a device that may be a GPU) is left to run_merge."""
    from ..devices import is_cpu
    from ..errors import LoramixError
    from ..io.np_factors import load_np_adapter
    from ..io.peft_layout import LORA, check_compatible
    from .base import check_adapter_output

    if not m.applies_to(LORA) or not all(isinstance(a, (str, os.PathLike)) for a in adapters):
        return
    ads = []
    for a in adapters:  # as run_merge loads them: all of them, in order (their errors first)
        ad = load_np_adapter(a, torch_fallback=False)
        if ad is None or ad.kind != LORA:
            return
        ads.append(ad)
    try:
        if not is_cpu(device):
            return
    except LoramixError:  # a bad --device: run_merge says so, after the adapters
        return
    check_compatible(ads)
    m.check(m.coerce_params(params), ads)
    check_adapter_output(m, ads, None)


__all__ = [
    "register",
    "get_method",
    "available_methods",
    "method_classes",
    "merge",
    "MergeResult",
    "parse_weights",
]
