"""Exact pairwise similarity of adapter deltas, from the low-rank factors.

The math is in ``docs/adapters.md`` (Similarity). For module ``m`` and adapters ``i, j`` with deltas
``dW_i = Bf_i @ Af_i`` (``Bf`` (out, r_i) with the scale folded in, ``Af``
(r_i, in), from :meth:`ModuleDelta.factors`)::

    <dW_i, dW_j>_F = sum( (Bf_i^T Bf_j) * (Af_i Af_j^T) )        (r_i x r_j)

All ``n`` adapters that touch ``m`` are done at once: stack the factors,
``B_cat = [Bf_1 ... Bf_n]`` (out, R) and ``A_cat = [Af_1; ...; Af_n]`` (R, in)
with ``R = sum r_i``, form the ``R x R`` product of Gram matrices::

    G  = (B_cat^T B_cat) * (A_cat A_cat^T)                         (R x R)
    IP = P^T G P                                                   (n x n)

where ``P`` (R x n) is the one-hot matrix mapping each column of ``B_cat`` to
its adapter, so ``IP[i, j] = <dW_i, dW_j>_F`` and ``diag(IP) = ||dW_i||_F^2``.
Cost ``O(R^2 (out + in))`` per module instead of ``O(n^2 out in)``; all in
float64 (factors so large or small that the products would leave its range
are first brought to unit size by powers of two, exactly:
:func:`_unit_factors`). Nothing of size ``out x in`` is formed.

Reported, per pair of adapters ``(i, j)``:

* ``cos_m(i, j) = IP[i, j] / (||dW_i|| ||dW_j||)`` per module; a module whose
  delta is exactly zero in either adapter has no cosine (listed in
  ``SimilarityResult.zero_norm``, left out of the means);
* ``rms = sqrt(mean_m cos_m^2)`` and ``mean = mean_m cos_m`` over the modules
  both adapters touch and that have a cosine;
* ``coverage = |shared modules| / |union of modules|``.

Kinds whose effective delta needs the base (DoRA, D2-LoRA): ``factors()``
is the residual ``dW``, so the result is base-free. With ``base=`` (a base
model folder) those modules use the *effective* delta ``W_hat - W0`` instead
(:meth:`ModuleDelta.delta`), a row or column scaling of ``W0`` and of
``dW``; its inner products are formed from the factors, ``W0`` and the
per-row (or per-column) gains, no dense delta held (see
:func:`_effective_inner_products`, ``docs/adapters.md``).

Where the arithmetic runs: on the CPU (``device`` "cpu", or "auto" without a
GPU) and without ``base``, in numpy float64: adapters given as paths are read
as numpy factors (:mod:`loramix.io.np_factors`), so the run never imports
torch; loaded :class:`Adapter` objects are viewed as numpy. Otherwise
(``device="cuda"``, a ``torch.device``, effective deltas with ``base``) in
torch float64 on the device. Both run the same code on their arrays. Without
``base`` the factors are read by numpy on any device, one module at a time,
and each module's stack crosses to the device in one copy, while a second
thread reads the next module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .api import renamed
from .blas import ONE_THREAD_BELOW, openblas_threads
from .devices import is_cpu, resolve_device, torch_threads
from .errors import AdapterError, UsageError
from .io.np_factors import NpModule
from .io.peft_layout import (
    D2LORA,
    adapter_list,
    check_base_free,
    check_compatible,
    check_default_targets,
    check_one_base,
    is_loaded_adapter,
    not_an_adapter,
    warn_null_targets,
)

if TYPE_CHECKING:  # on the CPU the arithmetic is numpy's: torch is imported only for another device
    import torch

    from .adapter import Adapter

PER_MODULE_COLUMNS = ["module", "layer", "type", "i", "j", "a", "b", "cosine"]

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_layer_type(name: str) -> tuple[int | None, str]:
    """``(layer index, module type)`` parsed from a module name.

    The layer is the first all-digit component (``transformer.h.3.attn.c_attn``
    and ``model.layers.3.self_attn.q_proj`` give 3). The type is what follows
    it (``attn.c_attn``, ``self_attn.q_proj``): GPT-2 has two ``c_proj``
    (attention and MLP), so the last component alone would mix two different
    matrices. Without a layer index the type is the last component.
    """
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name.rsplit(".", 1)[-1]
    rest = name[m.end() :]
    return int(m.group(1)), rest or name.rsplit(".", 1)[-1]


@dataclass
class SimilarityResult:
    """Similarity of ``N`` adapters (all DataFrames indexed by adapter name).

    * ``rms``: N x N RMS cosine ``sqrt(mean_m cos_m^2)`` (NaN where a pair has
      no module with a cosine);
    * ``mean``: N x N signed mean cosine;
    * ``coverage``: N x N shared / union modules;
    * ``shared``: N x N number of modules with a cosine (the ``m`` averaged);
    * ``norms``: N x M Frobenius norms ``||dW||_F`` with the scale applied
      (NaN where an adapter lacks the module);
    * ``per_module``: long table (``per_module=True`` only, else empty):
      ``module, layer, type, i, j, a, b, cosine`` for each pair ``i < j``;
    * ``zero_norm``: ``adapter, module`` pairs whose delta is zero (no cosine);
    * ``effective``: True when the kinds that need the base (DoRA, D2-LoRA)
      used their effective deltas (``base=``), else their residuals;
    * ``kinds``: each adapter's kind name (``lora``, ``dora``, ``d2lora``).
    """

    names: list[str]
    rms: pd.DataFrame
    mean: pd.DataFrame
    coverage: pd.DataFrame
    shared: pd.DataFrame
    norms: pd.DataFrame
    per_module: pd.DataFrame
    zero_norm: pd.DataFrame
    effective: bool = False
    paths: list[str | None] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """What a notebook cell ending with the result shows: the adapters,
        their kinds and deltas, the tables it holds and the RMS cosine matrix
        (``loramix similarity``'s first table). The dataclass repr printed
        every table in full inside one call-like line: 22 lines, 1,090
        characters for two adapters on four modules, the norms' columns cut
        by pandas."""
        tables = ["rms", "mean", "coverage", "shared", "norms"]
        tables += [t for t in ("per_module", "zero_norm") if len(getattr(self, t))]
        kinds = ", ".join(dict.fromkeys(self.kinds)) or "?"
        delta = "effective" if self.effective else "residual"
        return (
            f"SimilarityResult: {len(self.names)} adapters ({kinds}; {delta} deltas); "
            f"tables {', '.join('.' + t for t in tables)}\nRMS cosine:\n{self.rms.round(4).to_string()}"
        )

    def to_json_dict(self, per_module: bool = False) -> dict:
        """Plain lists (NaN as None), for ``--format json``."""

        def mat(df: pd.DataFrame) -> list[list[float | None]]:
            return [[None if not math.isfinite(x) else float(x) for x in row] for row in df.to_numpy()]

        out = {
            "names": list(self.names),
            "paths": list(self.paths),
            "delta": "effective" if self.effective else "residual",
            "rms": mat(self.rms),
            "mean": mat(self.mean),
            "coverage": mat(self.coverage),
            "shared_modules": [[int(x) for x in row] for row in self.shared.to_numpy()],
            "zero_norm": json.loads(self.zero_norm.to_json(orient="records", double_precision=15)),
        }
        if per_module:
            # via pandas' JSON writer: numpy scalars and missing layers (<NA>) become plain JSON
            for by in ("type", "layer"):
                out[f"by_{by}"] = json.loads(
                    breakdown(self.per_module, by).to_json(orient="records", double_precision=15)
                )
        return out


def breakdown(per_module: pd.DataFrame, by: str) -> pd.DataFrame:
    """RMS and signed mean cosine per pair and per ``by`` (``type`` or ``layer``).

    Long table ``a, b, <by>, rms, mean, modules``.
    """
    cols = ["a", "b", by, "rms", "mean", "modules"]
    if per_module.empty:
        return pd.DataFrame(columns=cols)
    df = per_module.assign(cos2=per_module["cosine"] ** 2)
    g = df.groupby(["i", "j", "a", "b", by], sort=True, dropna=False)
    out = g.agg(rms=("cos2", "mean"), mean=("cosine", "mean"), modules=("cosine", "size")).reset_index()
    out["rms"] = np.sqrt(out["rms"])
    return out[cols]


def residual_note(names: Sequence[str], kinds: Sequence[str], effective: bool) -> str | None:
    """The note where DoRA or D2-LoRA adapters (kinds that ``needs_base``;
    ``kinds[i]``: adapter ``names[i]``'s) were compared without the base: on
    their residuals, which are not what merging adds. None where none was
    (``effective``, or no such kind). ``similarity`` and ``plan`` print it."""
    if effective:
        return None
    from .discovery import declared

    declared_kinds = declared("loramix.kinds", "AdapterKind")  # read from the files: no torch
    based = [
        (n, declared_kinds[k]) for n, k in zip(names, kinds) if declared_kinds.get(k, {}).get("needs_base")
    ]
    if not based:
        return None
    labels = " and ".join(dict.fromkeys(d.get("label") or d["id"] for _, d in based))
    return (f"{', '.join(n for n, _ in based)} ({labels}) compared on their residuals (docs/adapters.md), not the "
            "deltas W_hat - W0 that merging adds, which depend on the base: pass --base BASE to compare those")  # fmt: skip


def unique_names(adapters: Sequence[Adapter]) -> list[str]:
    """Adapter names, made unique (full path, then ``#k``) where they collide."""
    names = [a.name for a in adapters]
    if len(set(names)) == len(names):
        return names
    counts = {n: names.count(n) for n in names}
    names = [str(a.path) if counts[a.name] > 1 and a.path is not None else a.name for a in adapters]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


def _progress(iterable, total: int, desc: str, enabled: bool, unit: str = "module"):
    if not enabled:
        return iterable
    from .progress import progress_bar

    # delay: a quick run shows no bar at all; where stderr is not a terminal
    # (pipes, CI logs), a plain line a minute instead
    return progress_bar(iterable, total=total, desc=desc, unit=unit, delay=0.5, progress=True, leave=False)


# Rows per strip of the Gram product: large enough for efficient GEMMs and
# few thread synchronisations, small enough that skipping the part below the
# diagonal saves real work.
GRAM_BLOCK = 192


def _stack_factors(deltas: list, device) -> tuple:
    """``Bt = B_cat^T`` (R, out) and ``A_cat`` (R, in) in float64 *without*
    the scales, the column offsets of each delta (``len(deltas) + 1``) and the
    scales (n,). Numpy modules (:class:`~loramix.io.np_factors.NpModule`, D2:
    ``[B, -tau B_neg]`` and ``[A; A_neg]``, their scale apart) are stacked in
    numpy: arrays for ``device`` None, else moved to ``device`` in one copy
    per factor matrix (not two per delta: a GPU run over 1,000 adapters made
    96,000 small copies). Torch modules (read against a base) go through
    :func:`loramix.kinds.stack_factors` with ``fold_scale=False`` on ``device``."""
    if device is not None and not isinstance(deltas[0], NpModule):
        from .kinds import stack_factors  # imports torch

        st = stack_factors(deltas, dtype=_torch().float64, device=device, fold_scale=False)
        return st.B.T, st.A, st.offsets, st.scales
    parts = []
    for d in deltas:
        if d.kind == D2LORA:  # (s [B, -tau B_neg], [A; A_neg]) with s left out, as the torch path's
            B, A = (np.asarray(x, dtype=np.float64) for x in (d.B, d.A))
            Bn, An = (np.asarray(x, dtype=np.float64) for x in (d.B_neg, d.A_neg))
            parts.append((np.concatenate([B, -d.tau * Bn], axis=1), np.concatenate([A, An]), float(d.scale)))
        else:  # numpy factors may be LazyFactors: read them now
            parts.append((np.asarray(d.B), np.asarray(d.A), float(d.scale)))
    offsets = [0]
    for B, _, _ in parts:
        offsets.append(offsets[-1] + int(B.shape[1]))
    out_f, in_f = int(parts[0][0].shape[0]), int(parts[0][1].shape[1])
    Bt, A_cat = np.empty((offsets[-1], out_f)), np.empty((offsets[-1], in_f))
    for k, (B, A, _) in enumerate(parts):
        Bt[offsets[k] : offsets[k + 1]], A_cat[offsets[k] : offsets[k + 1]] = B.T, A
    scales = np.array([sc for _, _, sc in parts])
    if device is None:
        return Bt, A_cat, offsets, scales
    torch = _torch()
    Bt, A_cat, scales = (torch.from_numpy(x).to(device) for x in (Bt, A_cat, scales))
    return Bt, A_cat, offsets, scales


def _torch():
    import torch

    return torch


def _groups(offsets: list[int], block: int) -> list[tuple[int, int]]:
    """Split the deltas into ``ceil(R / block)`` consecutive runs ``[t0, t1)``
    of about equal column count."""
    n, R = len(offsets) - 1, offsets[-1]
    k = max(1, min(n, math.ceil(R / max(block, 1))))
    groups, t0 = [], 0
    for g in range(1, k + 1):
        target = R * g / k
        t1 = t0 + 1
        while t1 < n and offsets[t1] < target:
            t1 += 1
        if g == k:
            t1 = n
        groups.append((t0, t1))
        t0 = t1
        if t0 >= n:
            break
    return groups


def _lowrank_inner_products(Bt, A_cat, offsets: list[int]):
    """``(IP, in_range)``: ``IP = P^T ((B_cat^T B_cat) * (A_cat A_cat^T)) P``
    (n x n), unscaled, and whether the two Gram factors' diagonals (the
    squared norms of the rows of ``Bt`` and ``A_cat``) lie in
    :data:`GRAM_RANGE`, where nothing the products form can overflow or lose
    digits below float64's normal range.

    ``G`` is symmetric, so it is formed in horizontal strips starting at the
    diagonal (strip ``[r0, r1)`` x columns ``[r0, R)``): about half the
    ``O(R^2 (out + in))`` flops, in a few large GEMMs. Each strip is summed
    per delta (numpy: ``add.reduceat`` over the rank blocks; torch: with the
    one-hot ``P`` (R, n)) and mirrored. Numpy arrays or torch tensors alike
    (the result is of the same kind).
    """
    n = len(offsets) - 1
    on_np = isinstance(Bt, np.ndarray)
    ip, in_range = np.zeros((n, n)), True
    if on_np:
        starts = np.asarray(offsets[:-1])
    else:
        P, ip = _one_hot(offsets, Bt.device), _torch().from_numpy(ip).to(Bt.device)
    # out-of-range products are found (in_range, then _out_of_range) and formed again or refused
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for a0, a1 in _groups(offsets, GRAM_BLOCK):
            r0, r1 = offsets[a0], offsets[a1]
            BB, AA = Bt[r0:r1] @ Bt[r0:].T, A_cat[r0:r1] @ A_cat[r0:].T
            in_range = in_range and all(_in_gram_range(X[:, : r1 - r0].diagonal()) for X in (BB, AA))
            G = BB * AA  # (r1 - r0, R - r0)
            del BB, AA
            if on_np:  # block sums in O(|G|), where P^T G P would cost O(|G| n)
                rows = np.add.reduceat(G, starts[a0:a1] - r0, axis=0)
                blk = np.add.reduceat(rows, starts[a0:] - r0, axis=1)  # (a1 - a0, n - a0)
            else:
                blk = P[r0:r1, a0:a1].T @ G @ P[r0:, a0:]  # (a1 - a0, n - a0)
            ip[a0:a1, a0:] = blk
            ip[a1:, a0:a1] = blk[:, a1 - a0 :].T
    # a strip's square part X X^T need not be symmetric to the bit (BLAS may sum
    # (i, j) and (j, i) in other orders): the upper triangle, mirrored
    i, j = np.tril_indices(n, -1)
    ip[i, j] = ip[j, i]
    return ip, in_range


def _module_inner_products(deltas: list, W0, device):
    """``(IP', mant, exp, bad)``: the Frobenius inner products of one module's
    deltas, ``IP[i, j] = c_i c_j IP'[i, j]`` with ``c_i = mant_i 2^exp_i``
    (``IP'`` n x n float64 numpy, ``mant`` (n,) float, ``exp`` (n,) int), and
    ``bad``, the first delta whose squared norm ``IP'[k, k]`` leaves
    float64's range (:func:`_out_of_range`), or None.

    Factored deltas (all LoRA, and D2 without a base) go through the stacked
    Gram product of the module docstring, scales applied to the small result
    (``c_i = 1``); where a factor's size takes the products out of float64's
    range (:data:`GRAM_RANGE`: a row of a factor whose squared norm is 0 or
    beyond ``1e+-144``), on factors brought to unit size
    (:func:`_unit_factors`), ``c_i`` their scale and the powers of two taken
    out. ``W0`` (out, in), float64 on ``device``, or None: given, the deltas
    of kinds that ``needs_base`` are their effective deltas, combined from
    the factors (:func:`_effective_inner_products`; ``c_i = 1``). ``device``
    None: numpy, factored deltas only (``W0`` is None).
    """
    one, zero = np.ones(len(deltas)), np.zeros(len(deltas), dtype=np.int64)
    if W0 is not None:
        ip = _host(_effective_inner_products(deltas, W0))
        return ip, one, zero, _out_of_range(ip)
    Bt, A_cat, offsets, scales = _stack_factors(deltas, device)
    ip, in_range = _lowrank_inner_products(Bt, A_cat, offsets)
    mant = _host(scales)
    if in_range:  # every factor of ordinary size: the products as they are
        with np.errstate(over="ignore", under="ignore"):  # checked next
            ip = _host(ip * (np.outer(scales, scales) if device is None else _torch().outer(scales, scales)))
        if _out_of_range(ip) is None:
            return ip, one, zero, None
    Bt, A_cat, exp = _unit_factors(Bt, A_cat, offsets)
    ip = _host(_lowrank_inner_products(Bt, A_cat, offsets)[0])
    return ip, mant, exp, _out_of_range(ip)


def _host(x) -> np.ndarray:
    """``x`` as a numpy array: itself, or a torch tensor's copy on the CPU."""
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


#: the squared norms of the factors' rows taken as they are (above: unit
#: factors, :func:`_unit_factors`): products and sums of such numbers (up to
#: ``R^2`` terms) stay inside float64's normal range
GRAM_RANGE = (2.0**-480, 2.0**480)


def _in_gram_range(d) -> bool:
    """Whether the squared norms ``d`` (a vector) all lie in :data:`GRAM_RANGE`.
    A 0 does not: it may be a nonzero row whose square underflowed (1e-200),
    told from a zero row only on unit factors."""
    d = _host(d)
    return bool(((GRAM_RANGE[0] <= d) & (d <= GRAM_RANGE[1])).all())


#: a squared norm below this (float64's smallest normal number over its epsilon) has lost digits
SQ_MIN = np.finfo(np.float64).tiny / np.finfo(np.float64).eps


def _out_of_range(ip: np.ndarray) -> int | None:
    """The first delta whose squared norm ``ip[k, k]`` is not finite or is
    nonzero below :data:`SQ_MIN`, or None. With unit factors
    (:func:`_unit_factors`) no stored factor gets there; a factor that
    overflows once its scale is folded in (D2) or an effective delta against
    a base of such weights can."""
    d = np.diag(ip)
    bad = ~np.isfinite(d) | ((d != 0) & (np.abs(d) < SQ_MIN))
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def _unit_factors(Bt, A_cat, offsets: list[int]):
    """``(Bt', A', exp)``: each delta's block of ``Bt`` (R, out) and of
    ``A_cat`` (R, in) divided by the power of two ``2^e`` just above its
    largest magnitude, ``exp_k = eB_k + eA_k`` (new arrays or tensors).

    Exact (a power of two only moves the exponent), and it keeps the Gram
    products inside float64's normal range: factors stored in float64 reach
    ``1e+-300``, and the squares of ``||dW||_F`` formed as they are overflow
    beyond ``1e154`` (a NaN cosine, the module taken for a zero delta) and
    lose digits below ``1e-154`` (subnormal) until they are 0 (a nonzero
    delta reported as zero). Unit blocks give products of ordinary size
    whatever the deltas' sizes."""
    n = len(offsets) - 1
    eB, eA = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    fB, fA = np.ones(offsets[-1]), np.ones(offsets[-1])
    for k in range(n):
        r0, r1 = offsets[k], offsets[k + 1]
        if r1 > r0:
            for e, f, X in ((eB, fB, Bt), (eA, fA, A_cat)):
                e[k] = math.frexp(float(abs(X[r0:r1]).max()))[1]  # 0 for a zero block
                f[r0:r1] = math.ldexp(1.0, -int(e[k]))
    if not isinstance(Bt, np.ndarray):
        fB, fA = (_torch().from_numpy(f).to(Bt.device) for f in (fB, fA))
    return Bt * fB[:, None], A_cat * fA[:, None], eB + eA


def _effective_inner_products(deltas: list, W0):
    """``IP`` (n x n) of one module's effective deltas without forming any of
    them (``docs/adapters.md``, "Similarity against the base").

    Each delta is ``E_t = g0_t * W0 + Bg_t Ag_t``: a kind that ``needs_base``
    scales the rows (``norm_axis`` 1) or the columns (0) of ``W0`` by ``g0_t``
    and of its residual ``Bf_t Af_t`` by ``g1_t`` (:meth:`AdapterKind.gains`,
    from ``||W0||_n^2`` and ``||W0 + dW_t||_n^2 = ||W0||_n^2 + 2 <W0, dW_t>_n
    + ||dW_t||_n^2``), folded into ``Bg_t = g1_t * Bf_t`` or ``Ag_t = Af_t *
    g1_t``; any other delta is its residual (``g0_t = 0``). Then::

        <E_i, E_j> = <g0_i W0, g0_j W0> + <g0_i W0, Bg_j Ag_j> + <Bg_i Ag_i, g0_j W0> + <Bg_i Ag_i, Bg_j Ag_j>

    the last term the stacked Gram product; with row gains ``<g0_i W0, g0_j
    W0> = sum_r g0_i g0_j ||W0_r||^2`` and ``<g0_i W0, Bg Ag> = sum_r g0_i
    <W0_r, (Bg Ag)_r>``, the per-row products ``<W0_r, (Bf Af)_r>`` being the
    row sums of ``Bf * (W0 Af^T)`` (out, r) that the norms need too (columns:
    the transpose, ``(Bf^T W0) * Af`` (r, in)). Cost ``O(out in R)`` for
    ``W0 A_cat^T``, as forming the deltas would, but ``out x R`` memory
    instead of ``n`` dense deltas and no ``O(n^2 out in)`` pairwise products.
    ``W0`` (out, in) float64; torch tensors on its device.
    """
    torch = _torch()
    dev, f64, n = W0.device, torch.float64, len(deltas)
    # (out, r_t), (r_t, in): the residuals, or the deltas a kind makes low rank given W0 (PiSSA)
    Bs, As = zip(*(d.kind.based_factors(d, W0, dtype=f64, device=dev) for d in deltas))
    axes = [d.kind.norm_axis(d) if d.kind.needs_base else None for d in deltas]
    offsets = np.concatenate([[0], np.cumsum([B.shape[1] for B in Bs])]).tolist()
    onehot = _one_hot(offsets, dev)  # (R, n)
    B_cat, A_cat = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    sq = W0 * W0
    w0_sq = {ax: sq.sum(dim=ax) for ax in set(axes) - {None}}  # ||W0||_n^2 per row (1) / column (0)
    mixed = len(w0_sq) == 2  # rows and columns scaled in one module (D2 norm_dim 0 beside DoRA)
    if not mixed:
        del sq
    # x[ax][t]: <W0, dW_t> per row (ax 1, (out,)) or per column (ax 0, (in,)), every t at once
    x = {}
    if 1 in w0_sq:
        x[1] = ((B_cat * (W0 @ A_cat.T)) @ onehot).T  # (n, out)
    if 0 in w0_sq:
        x[0] = onehot.T @ ((B_cat.T @ W0) * A_cat)  # (n, in)
    g0, g1 = [None] * n, [None] * n
    Bg, Ag = list(Bs), list(As)
    near = {ax: torch.zeros_like(w) for ax, w in w0_sq.items()}  # 1: a row (column) that nearly cancels
    for t, (d, ax) in enumerate(zip(deltas, axes, strict=True)):
        if ax is None:
            continue
        B, A = Bs[t], As[t]
        if ax == 1:
            own = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||dW_t||^2 per row
        else:
            own = ((A.T @ (B.T @ B)) * A.T).sum(dim=1)  # per column
        v_sq = w0_sq[ax] + 2 * x[ax][t] + own
        # the three terms' rounding, u (||W0_n||^2 + ||dW_n||^2), over ||V_n||^2 = rho^2 ||W0_n||^2:
        # where rho^2 < 2^-10 the norm of V = W0 + dW is formed from those rows densely
        close = torch.nonzero(v_sq < (w0_sq[ax] + own) * NEAR_CANCEL).flatten()
        if close.numel():
            near[ax][close] = 1.0
            V = W0[close] + B[close] @ A if ax == 1 else W0[:, close] + B @ A[:, close]
            v_sq = v_sq.index_put((close,), (V * V).sum(dim=ax))
        g0[t], g1[t] = d.kind.gains(d, w0_sq[ax], v_sq)
        if ax == 1:
            Bg[t] = B * g1[t].unsqueeze(1)
        else:
            Ag[t] = A * g1[t].unsqueeze(0)
    parts = dict(W0=W0, Bg=Bg, Ag=Ag, g0=g0, g1=g1, x=x, w0_sq=w0_sq, sq=sq if mixed else None)
    if not any(bool(v.any()) for v in near.values()):
        return _assembled(parts, axes, offsets, onehot)
    if mixed:  # rows and columns gained in one module, one of them nearly cancelling: the dense deltas
        E = torch.stack([_dense_effective(parts, t, axes[t], None) for t in range(n)]).flatten(1)
        return _symmetric(E @ E.T)
    # rows (columns) are independent under row (column) gains: the others from the factors, these dense
    (ax,) = w0_sq
    keep, close = (torch.nonzero(near[ax] == v).flatten() for v in (0.0, 1.0))
    E = torch.stack([_dense_effective(parts, t, ax, close) for t in range(n)]).flatten(1)
    return _symmetric(_assembled(_restricted(parts, ax, keep), axes, offsets, onehot) + E @ E.T)


#: a row (or column) of ``V = W0 + dW`` whose squared norm is below this
#: fraction of ``||W0_n||^2 + ||dW_n||^2`` nearly cancels its base row
#: (``rho^2 < 2^-10``): its norm and its share of the inner products are formed
#: densely (:func:`_effective_inner_products`)
NEAR_CANCEL = 2.0**-10


def _restricted(parts: dict, ax: int, keep) -> dict:
    """:func:`_effective_inner_products`' ``parts`` restricted to the rows
    (``ax`` 1) or columns (0) ``keep`` (an index tensor), where every gain
    runs along ``ax``."""
    W0 = parts["W0"][keep] if ax == 1 else parts["W0"][:, keep]
    Bg = [B[keep] for B in parts["Bg"]] if ax == 1 else parts["Bg"]
    Ag = parts["Ag"] if ax == 1 else [A[:, keep] for A in parts["Ag"]]
    g0 = [None if g is None else g[keep] for g in parts["g0"]]
    g1 = [None if g is None else g[keep] for g in parts["g1"]]
    return dict(W0=W0, Bg=Bg, Ag=Ag, g0=g0, g1=g1, x={ax: parts["x"][ax][:, keep]},
                w0_sq={ax: parts["w0_sq"][ax][keep]}, sq=None)  # fmt: skip


def _dense_effective(parts: dict, t: int, ax: int | None, idx):
    """Delta ``t``'s effective delta ``g0 * W0 + Bg Ag``, formed densely: whole
    (``idx`` None), or its rows (``ax`` 1) or columns (0) ``idx``."""
    W0, B, A, g0 = parts["W0"], parts["Bg"][t], parts["Ag"][t], parts["g0"][t]
    if idx is not None:
        W0, B, A = (W0[idx], B[idx], A) if ax == 1 else (W0[:, idx], B, A[:, idx])
        g0 = None if g0 is None else g0[idx]
    E = B @ A
    if g0 is not None:
        E += W0 * (g0.unsqueeze(1) if ax == 1 else g0.unsqueeze(0))
    return E


def _symmetric(ip):
    """``ip`` with its lower triangle the mirror of its upper one (to the bit, as the Gram product)."""
    i, j = np.tril_indices(ip.shape[0], -1)
    ip[i, j] = ip[j, i]
    return ip


def _assembled(parts: dict, axes: list, offsets: list[int], onehot):
    """``IP`` of the effective deltas ``g0_t W0 + Bg_t Ag_t`` from their parts
    (:func:`_effective_inner_products`, the four terms of its docstring)."""
    torch = _torch()
    W0, Bg, Ag, g0, g1, x, w0_sq, sq = (parts[k] for k in ("W0", "Bg", "Ag", "g0", "g1", "x", "w0_sq", "sq"))
    dev, f64, n = W0.device, torch.float64, len(Bg)
    ip = torch.zeros(n, n, dtype=f64, device=dev)
    # <Bg_i Ag_i, Bg_j Ag_j>: the stacked Gram product of the gained factors
    Bt = torch.cat([B.T for B in Bg], dim=0)  # (R, out)
    ip += _lowrank_inner_products(Bt, torch.cat(Ag, dim=0), offsets)[0].to(dev)
    # m[i, t] = <g0_i W0, Bg_t Ag_t>; per axis, h[t] = <W0, Bg_t Ag_t> per row / column
    m = torch.zeros(n, n, dtype=f64, device=dev)
    for ax in w0_sq:
        h = []
        for t in range(n):
            if axes[t] in (None, ax):  # gains along ax factor out of <W0, .>_ax
                h.append(x[ax][t] if g1[t] is None else g1[t] * x[ax][t])
            elif ax == 1:  # column gains inside the row products: one more (out, r) product
                h.append((Bg[t] * (W0 @ Ag[t].T)).sum(dim=1))
            else:
                h.append(((Bg[t].T @ W0) * Ag[t]).sum(dim=0))
        own_ax = [t for t in range(n) if axes[t] == ax]
        G = torch.stack([g0[t] for t in own_ax])  # (n_ax, len)
        m[own_ax] = G @ torch.stack(h).T
        # <g0_i W0, g0_j W0> within the axis: sum g0_i g0_j ||W0||_n^2
        ip[np.ix_(own_ax, own_ax)] += (G * w0_sq[ax]) @ G.T
    if sq is not None:  # row gains g against column gains k: g^T (W0 * W0) k
        rows, cols = [t for t in range(n) if axes[t] == 1], [t for t in range(n) if axes[t] == 0]
        Gr, Gc = torch.stack([g0[t] for t in rows]), torch.stack([g0[t] for t in cols])
        v = Gr @ sq @ Gc.T
        ip[np.ix_(rows, cols)] += v
        ip[np.ix_(cols, rows)] += v.T
    ip += m + m.T
    return _symmetric(ip)


def _one_hot(offsets: list[int], device=None):
    """``P`` (R, n) float64: column ``k`` of the stacked factors -> its delta.
    A numpy array, or with ``device`` a torch tensor made there (for 1,000
    adapters of rank 8, 64 MB a module that need not cross to a GPU)."""
    n, R = len(offsets) - 1, offsets[-1]
    owner = np.repeat(np.arange(n), np.diff(offsets))
    if device is None:
        P = np.zeros((R, n))
        P[np.arange(R), owner] = 1.0
        return P
    torch = _torch()
    P = torch.zeros(R, n, dtype=torch.float64, device=device)
    return P.scatter_(1, torch.from_numpy(owner).to(device).unsqueeze(1), 1.0)


def _load_all(items: list, numpy_load: bool, progress: bool) -> list:
    """The adapters: numpy factors, read lazily, unless they are to be compared
    against a base (whose effective deltas torch forms)."""
    if numpy_load:
        from .io import np_factors

        # lazy: each module's factors are read when the module is compared
        load, convert = partial(np_factors.load_np_adapter, lazy=True), np_factors.np_adapter
    else:
        from .io import adapter_files

        load, convert = adapter_files.load_adapter, (lambda a: a)
    adapters: list = []
    for a in _progress(items, len(items), "loading", progress and len(items) > 4, unit="adapter"):
        if not isinstance(a, (str, os.PathLike)) and not is_loaded_adapter(a):
            raise not_an_adapter(a)
        adapters.append(load(a) if isinstance(a, (str, os.PathLike)) else convert(a))
    check_compatible(adapters)
    check_one_base(adapters)  # as merging does: a GPT-2 and a Llama adapter gave an all-n/a table
    return adapters


def _base_weight(base_folder, adapters: list, owners: list[int], mname: str, deltas: list, dev):
    """``W0`` (out, in) float64 on ``dev`` when some delta's kind needs the base, else None;
    the adapter's shape and fan_in_fan_out tell the layout (no model skeleton)."""
    if base_folder is None or not any(d.kind.needs_base for d in deltas):
        return None
    ffo = adapters[owners[0]].config.get("fan_in_fan_out")
    key, transposed = base_folder.module_weight_key(mname, deltas[0].shape, ffo)
    W0 = base_folder.read_tensor(key).to(device=dev, dtype=_torch().float64)
    return W0.T if transposed else W0


class _Totals:
    """Running sums over modules of the per-pair cosines (N x N each), the
    norms (N x modules) and, with ``per_module``, the long table's rows."""

    def __init__(self, names: list[str], n_modules: int, per_module: bool):
        N = len(names)
        self.names, self.per_module = names, per_module
        self.sum_c, self.sum_c2 = np.zeros((N, N)), np.zeros((N, N))
        self.n_cos = np.zeros((N, N), dtype=np.int64)
        self.shared = np.zeros((N, N), dtype=np.int64)
        self.norms = np.full((N, n_modules), np.nan)
        self.rows: list[tuple] = []
        self.zero: list[tuple[str, str]] = []

    def add(self, col: int, mname: str, owners: list[int], ip: np.ndarray, mant, exp) -> None:
        """Fold one module's Gram matrix into the sums: ``IP[i, j] = c_i c_j
        ip[i, j]`` (owners x owners), ``c_i = mant_i 2^exp_i``
        (:func:`_module_inner_products`). The cosine takes ``ip`` and the
        signs of the ``c_i`` (their sizes cancel), the norm ``|c_i|
        sqrt(ip[i, i])`` (inf beyond float64, ``1.8e308``)."""
        sq = np.clip(np.diag(ip), 0.0, None)
        root = np.sqrt(sq)
        idx = np.asarray(owners)
        with np.errstate(over="ignore"):
            self.norms[idx, col] = np.ldexp(np.abs(mant) * root, exp)
        ok = (sq > 0.0) & (mant != 0)  # an exactly zero delta has no cosine
        for k in np.flatnonzero(~ok):
            self.zero.append((self.names[owners[k]], mname))
        # The common case (every scale positive, every delta nonzero, every adapter
        # touching the module) skips the multiply by 1, the mask and the gather: the
        # same values, a third of this step's time for 1,000 adapters
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = ip / np.outer(root, root)
            if not (mant > 0).all():
                cos *= np.sign(np.outer(mant, mant))
            np.clip(cos, -1.0, 1.0, out=cos)
        np.fill_diagonal(cos, 1.0)  # exactly: sqrt(x)^2 need not give back x
        valid = np.outer(ok, ok)
        cos_v = cos if ok.all() else np.where(valid, cos, 0.0)
        ix = ... if len(owners) == len(self.names) and (np.diff(idx) == 1).all() else np.ix_(idx, idx)
        self.shared[ix] += 1
        self.n_cos[ix] += 1 if cos_v is cos else valid
        self.sum_c[ix] += cos_v
        self.sum_c2[ix] += cos_v * cos_v
        if self.per_module:
            layer, mtype = module_layer_type(mname)
            iu, ju = np.triu_indices(len(owners), k=1)
            for u, v in zip(iu, ju, strict=True):
                if valid[u, v]:
                    i, j = owners[u], owners[v]
                    self.rows.append(
                        (mname, layer, mtype, i, j, self.names[i], self.names[j], float(cos[u, v]))
                    )

    def result(self, adapters: list, modules: list[str], effective: bool) -> SimilarityResult:
        counts = np.array([len(ad.modules) for ad in adapters])
        union = counts[:, None] + counts[None, :] - self.shared
        with np.errstate(divide="ignore", invalid="ignore"):
            rms = np.sqrt(self.sum_c2 / self.n_cos)
            mean = self.sum_c / self.n_cos
            coverage = np.where(union > 0, self.shared / np.maximum(union, 1), np.nan)
        index = pd.Index(self.names, name="adapter")

        def frame(x):
            return pd.DataFrame(x, index=index, columns=self.names)

        per = pd.DataFrame(self.rows, columns=PER_MODULE_COLUMNS)
        per["layer"] = per["layer"].astype("Int64")
        return SimilarityResult(
            names=self.names,
            rms=frame(rms),
            mean=frame(mean),
            coverage=frame(coverage),
            shared=frame(self.n_cos),
            norms=pd.DataFrame(self.norms, index=index, columns=modules),
            per_module=per,
            zero_norm=pd.DataFrame(self.zero, columns=["adapter", "module"]),
            effective=effective,
            paths=[None if a.path is None else str(a.path) for a in adapters],
            kinds=[str(getattr(a.kind, "name", a.kind)) for a in adapters],
        )


@renamed({"adapters_or_paths": "adapters"})
def similarity(
    adapters: Sequence[Adapter | str | Path],
    *,
    base: str | Path | None = None,
    per_module: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SimilarityResult:
    """Pairwise cosine similarity of the adapters' deltas (module docstring).

    ``adapters``: loaded :class:`Adapter`\\ s or paths (each file is
    read once). Shared modules must have the same shape in every adapter
    (:func:`check_compatible`; else :class:`AdapterError`, exit 2 in the CLI).
    ``base``: a base model folder; DoRA and D2-LoRA modules then use their
    effective delta ``W_hat - W0``, still from the factors (needs
    ``loramix.io.model_folder``). ``per_module``: also fill the
    long ``per_module`` table. ``device``: where the Gram products run.
    ``"cpu"`` by default, where the functions that run a model default to
    ``"auto"``, on purpose: the products of low-rank factors are small, and
    on the CPU without ``base`` they run in numpy float64 without importing
    torch (module docstring), also on a machine with a GPU; ``"cuda"`` or a
    ``torch.device`` runs them in torch float64 there, equal to rounding.
    ``progress``: a bar of the modules compared (on a terminal).

    Returns a :class:`SimilarityResult`: N x N DataFrames indexed by adapter
    name (``rms`` ``sqrt(mean_m cos_m^2)`` over the ``shared`` modules, with
    ``cos_m = <dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F)``; ``mean``,
    ``coverage``), the N x M ``norms`` and the long ``per_module`` table.
    """
    adapters = adapter_list(adapters)
    if len(adapters) == 0:
        raise UsageError("similarity", "needs at least one adapter")
    # as `loramix similarity` sets OPENBLAS_NUM_THREADS before numpy loads: the Gram strips
    # of a few adapters are small GEMMs, which OpenBLAS's spinning second thread slows down
    small = len(adapters) < ONE_THREAD_BELOW
    with openblas_threads(1) if small else contextlib.nullcontext():
        return _similarity(list(adapters), base, per_module, progress, device)


def _similarity(items: list, base, per_module: bool, progress: bool, device) -> SimilarityResult:
    """:func:`similarity` of ``items`` (adapters or paths, at least one)."""
    # A torch.device asks for torch; a base may need D2 effective deltas (torch).
    numpy_path = base is None and (device is None or isinstance(device, str)) and is_cpu(device)
    dev = None if numpy_path else resolve_device(device)
    # Without a base the factors are read by numpy on any device, lazily, one module at a
    # time, and each module's stack is moved to the device whole (_stack_factors): read by
    # torch, a bank of 1,000 adapters sat in host memory (5.45 GiB) and went to a GPU in
    # 96,000 small copies.
    adapters = _load_all(items, base is None, progress)
    names = unique_names(adapters)
    base_folder = None
    if base is None:
        check_base_free(adapters)  # PiSSA, OLoRA: no residual to compare (loramix.kinds.moved_base)
        warn_null_targets(adapters)
    else:
        from .io.model_folder import BaseModelFolder

        base_folder = BaseModelFolder(base)
        check_default_targets(adapters, base_folder.config.get("model_type"))

    # Union of module names, in first-seen order.
    modules: dict[str, list[int]] = {}
    for i, ad in enumerate(adapters):
        for m in ad.modules:
            modules.setdefault(m, []).append(i)
    totals = _Totals(names, len(modules), per_module)
    # The arithmetic runs over the adapters in the order of their names: BLAS rounds an
    # entry of a Gram product by where it sits, and a pair's means add its modules' cosines
    # in the order the modules are visited, so in the order given a pair's cosine changed in
    # the last bit with the order of the command line. (Columns stay in first-seen order.)
    by_name = sorted(range(len(names)), key=names.__getitem__)
    rank = {i: r for r, i in enumerate(by_name)}
    col_of = {m: c for c, m in enumerate(modules)}
    walk = list(dict.fromkeys(m for i in by_name for m in adapters[i].modules))
    big = progress and len(adapters) * len(modules) > 200

    def products(mname: str):
        canon = sorted(modules[mname], key=rank.__getitem__)
        deltas = [adapters[i].modules[mname] for i in canon]
        W0 = _base_weight(base_folder, adapters, canon, mname, deltas, dev)
        return canon, W0 is not None, _module_inner_products(deltas, W0, dev)

    # Each module's torch products on the CPU run on one torch thread: those of a few rows by a
    # long inner dimension (Bt @ Bt.T, W0 @ A_cat.T) split their inner sums between torch's
    # threads and round by their number (two 256-wide LoRA or DoRA adapters' similarity against
    # their base differed in the last bits on 2 threads and on 1), and a study caches the
    # effective similarity under a key with no thread count. They are O(out in R) per module,
    # small beside reading W0 (two rank-16 DoRA deltas of one 4096 x 11008 module: 0.52 s on one
    # thread, 0.52 s on two, on the 2-core development machine). Against a base the modules
    # share the threads instead (_in_order).
    torch_cpu = dev is not None and _torch().device(dev).type == "cpu"
    on_cpu = base_folder is not None and torch_cpu
    # On a GPU a second thread reads and stacks the next module while the GPU works on this one
    on_gpu = dev is not None and not torch_cpu
    workers = _torch().get_num_threads() if on_cpu else 2 if on_gpu else 1
    with (
        torch_threads(1 if torch_cpu else None),
        contextlib.closing(_in_order(products, walk, workers)) as done,
    ):
        for mname in _progress(walk, len(walk), "similarity", big):
            col, owners = col_of[mname], modules[mname]
            canon, based, (ip, mant, exp, bad) = next(done)
            at = {i: k for k, i in enumerate(canon)}
            back = [at[i] for i in owners]  # owners' rows and columns, in their order
            if bad is not None:
                ad = adapters[canon[bad]]
                raise AdapterError(
                    ad.path or ad.name, f"module {mname}: the squared norm of its delta{' against the base' if based else ''} "
                    f"({float(ip[bad, bad]):.3g}) leaves float64's range, so no cosine can be formed from it",
                )  # fmt: skip
            totals.add(col, mname, owners, ip[np.ix_(back, back)], mant[back], exp[back])
    return totals.result(adapters, list(modules), effective=base_folder is not None)


def _in_order(fn, items: list, workers: int):
    """``fn(item)`` of each item, yielded in order: with ``workers > 1`` run
    ahead in that many threads (at most ``workers`` results waiting), each
    ``fn`` on torch's one thread as set by the caller. A module's products
    against the base, on one thread, round as they do alone (the same bits
    on any thread count), and the modules share the cores instead (the
    products release the GIL; 10 DoRA adapters against a GPT-2-small base on
    2 cores: 2.7 s, against 3.8 s with every product on one thread and 2.9 s
    with each product on both threads, which rounded by their split)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import collections
    from concurrent.futures import ThreadPoolExecutor

    torch = _torch()
    with ThreadPoolExecutor(workers, "loramix-similarity", torch.set_num_threads, (1,)) as pool:
        ahead: collections.deque = collections.deque()
        it = iter(items)
        try:
            for item in it:
                ahead.append(pool.submit(fn, item))
                if len(ahead) > workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # an error or a consumer that stopped: nothing more starts
            for f in ahead:
                f.cancel()
