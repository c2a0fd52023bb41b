"""The streaming engine: a plan of jobs over a base's tensors, an executor that
runs them, and the shard writer that stores their results.

Into a base (see docs/merging.md)::

    W = W0 + delta(module, W0)          every adapted weight, (out, in)

1. **Plan** (:func:`plan_into_base`): for every tensor of the base, in file
   order, one job: a :class:`CopyJob` (the bytes as they are, or converted to
   the output dtype) or a :class:`ModuleJob` (an adapted weight: which module,
   whether it is stored transposed, its output dtype). Every module is checked
   to exist in the base with a fitting shape before anything is written.
2. **Execute** (an executor's ``results``): each job gives a
   :class:`JobResult`: nothing to compute for a copy; for a module job
   ``W0 + delta`` in the stored layout and the module's *facts* (the
   per-module data a method reports, e.g. SVD's discarded energy), returned
   rather than written into shared state. :class:`SerialExecutor` runs the
   jobs one by one as the writer reaches them, sharing out each tensor's
   elementwise passes with helper threads (:func:`cpu_threads`). This is the
   seam for others: a threaded, multi-GPU or distributed executor runs module
   jobs ahead of the writer (each worker with its own :class:`Buffers`) and
   yields the results in plan order; the writer needs nothing else.
3. **Write** (:class:`~loramix.io.shard_writer.ShardWriter`, in a thread of
   its own while the next job runs): results go to their offsets in the
   output shards, copies from file to file.

A module's computation, ``compute(name, W0) -> ModuleOutput``, gets ``W0`` as
``(out, in)`` (``nn.Linear`` layout; a ``Conv1D`` weight already transposed)
in float32 (float64 for a weight read or written in float64) on the device, or None for a module
it says it does not read ``W0`` for (``compute.needs_base``); its delta is a
dense ``(out, in)`` tensor or a factor pair ``(B (out, k), A (k, in))``
meaning ``B @ A``, added in one fused ``addmm`` without forming a dense
delta. Peak memory is about two large tensors in the base's dtype and one in
float32, plus the adapters (docs/merging.md, "The engine").
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import inspect
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import native
from .adapter import Adapter, saved_tensors
from .devices import resolve_device, torch_threads
from .errors import AdapterError, BaseModelError, OutputError
from .io.model_folder import BaseModelFolder, TensorInfo
from .io.outputs import atomic_output_dir, normalized_path, write_provenance
from .io.peft_layout import check_copies_held, check_default_targets
from .io.safetensors_io import (
    FLOAT_CODES,
    ST_DTYPES,
    TORCH_TO_ST,
    all_finite,
    check_output_finite,
    read_into,
    safetensors_metadata,
)
from .io.shard_writer import ALIGN as PAGE
from .io.shard_writer import ShardWriter, finish_model_folder
from .results import WrittenFolder
from .rounding import copy_narrowed, narrow

Delta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModuleOutput:
    """What one module's computation returns: its ``delta`` (dense
    ``(out, in)``, ``(B, A)`` meaning ``B @ A``, or one not yet formed, with
    ``shape``, ``materialize()`` and ``add_bf16(...)``: TIES or DARE from
    factors, :class:`loramix.methods.base.OnePassTies` and
    :class:`loramix.methods.dare.FactorDrops`, which :func:`add_delta` lets add
    themselves to a bfloat16 ``W0``) and its ``facts`` for the report (empty
    when the method has none)."""

    delta: Delta
    facts: dict = field(default_factory=dict)


# compute(module name, W0 (out, in)) -> ModuleOutput; must not modify W0. A compute
# may say which modules it needs W0 for (an attribute ``needs_base(module) -> bool``);
# for the others it gets None and the engine never forms W0 in float32 whole. It runs
# on torch's threads as set before the run, unless it says one thread changes no bit
# for a module (``one_thread(module) -> bool``).
ModuleCompute = Callable[[str, torch.Tensor | None], ModuleOutput]


# ---- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyJob:
    """A base tensor written unchanged, or only converted to ``out_code``."""

    info: TensorInfo
    out_code: str

    @property
    def converts(self) -> bool:
        return self.out_code != self.info.dtype


@dataclass(frozen=True)
class ModuleJob:
    """An adapted weight: ``W0 + delta`` of adapter module ``module``;
    ``transposed`` when the base stores it ``(in, out)`` (``Conv1D``)."""

    info: TensorInfo
    out_code: str
    module: str
    transposed: bool


@dataclass(frozen=True, eq=False)
class ReplaceJob:
    """A base tensor replaced by an adapter's full copy (PEFT ``modules_to_save``),
    written in ``out_code``."""

    info: TensorInfo
    out_code: str
    tensor: torch.Tensor


Job = CopyJob | ModuleJob | ReplaceJob


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name and its jobs, in file order."""

    name: str
    jobs: tuple[Job, ...]

    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """``(key, dtype code, shape, nbytes)`` per tensor, for the writer."""
        out = []
        for job in self.jobs:
            info, code = job.info, job.out_code
            n = info.nbytes
            if code != info.dtype:
                n = n // ST_DTYPES[info.dtype].itemsize * ST_DTYPES[code].itemsize
            out.append((info.key, code, info.shape, n))
        return out


@dataclass(frozen=True)
class Plan:
    """Every tensor of ``base`` with its job, shard by shard."""

    base: BaseModelFolder
    shards: tuple[ShardPlan, ...]
    out_dtype: torch.dtype | None

    @property
    def module_jobs(self) -> list[ModuleJob]:
        return [j for s in self.shards for j in s.jobs if isinstance(j, ModuleJob)]


def resolve_targets(
    base: BaseModelFolder, modules: Sequence[str], adapters: Sequence[Adapter] = ()
) -> dict[str, tuple[str, bool]]:
    """base tensor key -> (module name, transposed), checking every module
    exists in the base with a shape that fits; errors name adapter and base.
    An adapter with no ``target_modules`` takes PEFT's default for the base's
    type (:func:`~loramix.io.peft_layout.check_default_targets`)."""
    check_default_targets(adapters, base.config.get("model_type"))
    owner: dict[str, Adapter] = {}
    for ad in adapters:
        for name in ad.modules:
            owner.setdefault(name, ad)
    targets: dict[str, tuple[str, bool]] = {}
    for name in modules:
        ad = owner.get(name)
        shape = ad.modules[name].shape if ad is not None else None
        try:
            fan_in_fan_out = ad.config.get("fan_in_fan_out") if ad is not None else None
            key, transposed = base.module_weight_key(name, shape, fan_in_fan_out)
        except BaseModelError as e:
            if ad is None:
                raise
            raise AdapterError(ad.path or ad.name, f"does not fit the base: {e.message}") from None
        if key in targets:
            raise BaseModelError(base.path, f"modules {targets[key][0]} and {name} both map to {key}")
        targets[key] = (name, transposed)
    return targets


def resolve_saved(
    base: BaseModelFolder, adapters: Sequence[Adapter], targets: dict[str, tuple[str, bool]]
) -> dict[str, torch.Tensor]:
    """base tensor key -> replacement, for every ``modules_to_save`` tensor of
    the adapters: found under the base's naming, with the base's shape, and
    not also adapted by a LoRA module."""
    for ad in adapters:
        held = {base.tensor_key(*n.rsplit(".", 1)) for n in ad.saved}
        check_copies_held(ad.path or ad.name, ad.config.get("modules_to_save"), base.tensors, held)
    out = {}
    for name, t in saved_tensors(adapters).items():
        module, param = name.rsplit(".", 1)
        key = base.tensor_key(module, param)
        if key is None:
            tied = base.tied_to(module)
            why = (
                f" (it is tied to {tied}: a full copy of it cannot be merged without untying them)"
                if tied
                else ""
            )
            raise BaseModelError(base.path, f"has no tensor for the adapters' modules_to_save {name}{why}")
        if tuple(base.tensors[key].shape) != tuple(t.shape):
            raise BaseModelError(
                base.path,
                f"tensor {key} is {list(base.tensors[key].shape)} but modules_to_save {name} is {list(t.shape)}",
            )
        if key in targets:
            raise AdapterError(
                targets[key][0], f"is both a LoRA module and a modules_to_save copy ({name}) in the adapters"
            )
        out[key] = t
    return out


def plan_into_base(
    base: BaseModelFolder,
    modules: Sequence[str],
    adapters: Sequence[Adapter] = (),
    out_dtype: torch.dtype | None = None,
) -> Plan:
    """The jobs that write ``base`` with ``modules`` changed and the adapters'
    ``modules_to_save`` copies in place of the base's tensors, in
    ``out_dtype`` (floating tensors only; None keeps each tensor's dtype)."""
    targets = resolve_targets(base, modules, adapters)
    replaced = resolve_saved(base, adapters, targets)
    shards = []
    for shard, infos in base.iter_shards():
        jobs: list[Job] = []
        for info in infos:
            # Only the float types loramix computes with are converted; the
            # rest (int8, float8, ...) is copied byte for byte.
            convert = out_dtype is not None and info.dtype in FLOAT_CODES
            code = TORCH_TO_ST[out_dtype] if convert else info.dtype
            if info.key in targets:
                if info.dtype not in FLOAT_CODES:
                    raise BaseModelError(base.path / shard, f"tensor {info.key} is {info.dtype}: loramix merges "
                                         f"into {', '.join(FLOAT_CODES)} weights only")  # fmt: skip
                name, transposed = targets[info.key]
                jobs.append(ModuleJob(info, code, name, transposed))
            elif info.key in replaced:
                jobs.append(ReplaceJob(info, code, replaced[info.key]))
            else:
                jobs.append(CopyJob(info, code))
        shards.append(ShardPlan(shard, tuple(jobs)))
    return Plan(base, tuple(shards), out_dtype)


# ---- running jobs ----------------------------------------------------------------------


class Buffers:
    """Reusable work tensors, one per (role, dtype, device), handed out as a
    view of the requested shape: a model repeats a few weight sizes, and
    fresh allocations of that size cost a page fault per 4 KiB page, more
    than the arithmetic. A role's buffer grows to the largest size asked for
    and is shared by every shape (Llama's ``(11008, 4096)`` and
    ``(4096, 11008)`` take one buffer, not two). One per worker; a tensor
    from :meth:`get` is valid until the next :meth:`get` of its role."""

    def __init__(self):
        self._bufs: dict = {}

    def get(
        self, role: str, shape, dtype: torch.dtype, device: torch.device, phase: int | None = None
    ) -> torch.Tensor:
        """With ``phase`` (CPU only), the view starts ``phase`` bytes into a
        page where ``phase`` is a multiple of the item size (the shard
        writer writes such a tensor to a file offset as far into its page
        without copying it)."""
        shape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        extra = PAGE if phase is not None and torch.device(device).type == "cpu" else 0
        key = (role, dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n + extra:
            self._bufs.pop(key, None)  # the smaller one goes before the larger one comes
            buf = self._bufs[key] = torch.empty(n + extra, dtype=dtype, device=device)
        start = 0
        if extra and phase % buf.element_size() == 0:
            start = (phase - buf.data_ptr()) % PAGE // buf.element_size()
        return buf[start : start + n].view(shape)


@dataclass
class JobResult:
    """A job done: ``tensor`` to write (None: copy the base's bytes) and,
    for a module job, its ``facts``."""

    job: Job
    tensor: torch.Tensor | None = None
    facts: dict = field(default_factory=dict)


def _check_delta(delta: Delta, name: str, shape: tuple[int, int]) -> None:
    if isinstance(delta, tuple):
        B, A = delta
        if B.ndim != 2 or A.ndim != 2 or (B.shape[0], A.shape[1]) != shape or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"module {name}: delta factors {tuple(B.shape)} @ {tuple(A.shape)}, "
                f"expected (out, k) @ (k, in) with (out, in) = {shape}"
            )
    elif tuple(delta.shape) != shape:
        raise ValueError(f"module {name}: delta {tuple(delta.shape)}, expected {shape}")


#: elements per block of rows at least (1 MiB of float32: a block stays in
#: the CPU's cache from its read through its product to its check) ...
BLOCK_ELEMENTS = 1 << 18
#: ... and at most (16 MiB): a large tensor takes the largest blocks that still
#: leave each thread BLOCKS_PER_THREAD of them (:func:`block_rows`). Each block
#: costs calls and Python work; on the 7B benchmark, blocks of up to 4M entries
#: made ``ties`` 15-20% faster and ``sum`` about 8% (reports/benchmarks.md),
#: cache or not, while a small model's modules keep their 1 MiB blocks
MAX_BLOCK_ELEMENTS = 1 << 22
BLOCKS_PER_THREAD = 4
#: rows per block at least, and every block starts at a multiple of it: BLAS
#: forms a product of very few rows with other kernels than the whole tensor's,
#: which sum the rank in another order (MKL: one row by its matrix-vector path
#: on an Intel Xeon, one to three rows on an AMD EPYC), and works on tiles of
#: rows (MKL's float64 product on an AMD EPYC: 4 rows), a tile cut short taking
#: an edge kernel of another order; from four rows on, a block had the whole
#: product's bits on both in float32, and in float64 a block that starts and
#: ends on a multiple of 4 rows (or ends at the last row) on the EPYC
#: (tests/test_engine.py checks such blocks on the machine it runs on)
MIN_ROWS = 8


def aligned_rows(rows: int) -> int:
    """``rows`` rounded down to a multiple of :data:`MIN_ROWS`, at least
    ``MIN_ROWS``: a step of blocks that start on tile boundaries."""
    return max(MIN_ROWS, rows // MIN_ROWS * MIN_ROWS)


def block_rows(rows: int, cols: int, threads: int, least: int | None = None) -> int:
    """Rows per block of a ``(rows, cols)`` tensor worked on by ``threads``
    threads: ``least`` entries (default :data:`BLOCK_ELEMENTS`), or more, up
    to :data:`MAX_BLOCK_ELEMENTS`, while each thread still gets
    :data:`BLOCKS_PER_THREAD` blocks; a multiple of :data:`MIN_ROWS`
    (:func:`aligned_rows`)."""
    least = BLOCK_ELEMENTS if least is None else least
    entries = max(least, min(MAX_BLOCK_ELEMENTS, rows * cols // (BLOCKS_PER_THREAD * max(threads, 1))))
    return aligned_rows(entries // max(cols, 1))


def needs_base(compute: ModuleCompute, module: str) -> bool:
    """Whether ``compute`` reads ``W0`` for ``module``: its ``needs_base(module)``
    when it has one, else True (then it always gets ``W0``)."""
    fn = getattr(compute, "needs_base", None)
    return True if fn is None else bool(fn(module))


def _run_compute(compute: ModuleCompute, module: str, W0, helpers) -> ModuleOutput:
    """``compute(module, W0)`` on the threads torch had before the run (its
    reductions round as they always did), unless it says that one thread
    gives the same bits (``compute.one_thread(module)``)."""
    fn = getattr(compute, "one_thread", None)
    with contextlib.nullcontext() if fn is not None and fn(module) else _all_threads(helpers):
        return compute(module, W0)


def compute_dtype(stored: torch.dtype, out: torch.dtype) -> torch.dtype:
    """The dtype a weight's ``W0 + delta`` is formed in: float64 where the
    weight is read or written in float64, else float32. A float64 output
    computed in float32 (``--dtype float64`` on a float32 or bfloat16 base)
    carried float32's rounding, 1.3e-7 relative, in a float64 file."""
    return torch.float64 if torch.float64 in (stored, out) else torch.float32


def add_delta(
    stored: torch.Tensor,
    job: ModuleJob,
    compute: ModuleCompute,
    dev,
    pool: Buffers,
    helpers=None,
    scratch: Buffers | None = None,
    read=None,
    first=None,
) -> JobResult:
    """``W0 + delta`` in the stored layout, computed in float32 (float64 for
    a float64 weight read or written, :func:`compute_dtype`) on ``dev`` in
    reused buffers, returned on the CPU in the job's output dtype. ``compute`` gets ``W0`` only where it reads it
    (:func:`needs_base`), else None.

    On the CPU each block of rows (:func:`block_rows`; ``helpers``, a
    :class:`Helpers`, take shares) runs in one thread while it is in the
    cache: read (``read(r0, r1)``, when given, fills those rows of
    ``stored`` from the file; else ``stored`` holds them), converted to
    float32, given its rows of the delta (a factor pair ``B @ A`` by
    ``addmm_`` of the block's rows of ``B``: the bits of one product over
    the whole tensor, see ``MIN_ROWS``; a dense delta by an add), converted
    back and summed. A sum propagates nan and inf; only a sum that is not
    finite (an overflow can also make one) sends the tensor to the exact
    check, :func:`check_output_finite`. A bfloat16 weight read and written
    as bfloat16 takes the delta's rows apart and one fused kernel for the
    rest, the same bits (:func:`_fused_bf16`). On a GPU the tensor is one
    block.
    A compute that reads ``W0`` gets it whole first. A delta not yet formed
    (:class:`ModuleOutput`) adds itself where the fused kernel would add it
    (its blocks read here, shared out as these are; ``first`` runs then),
    else it is formed and added as a dense one.

    The result goes into ``stored`` (the caller's read buffer) when the
    output dtype is the stored one, else into a buffer of ``pool``; work
    buffers that do not outlive the call come from ``scratch`` (default
    ``pool``). ``first()``, when given, runs in this thread while the
    helpers start on the blocks (:func:`_by_blocks`)."""
    code_dtype = ST_DTYPES[job.out_code]
    cdt = compute_dtype(stored.dtype, code_dtype)
    rows, cols = stored.shape
    shape = (cols, rows) if job.transposed else (rows, cols)  # (out, in)
    on_cpu = torch.device(dev).type == "cpu"
    helpers = helpers if on_cpu else None
    threads = 1 + (helpers.threads if helpers is not None else 0)
    step = block_rows(rows, cols, threads) if on_cpu else max(rows, 1)
    in_place = stored.dtype == cdt and stored.device == dev  # the stored tensor is the compute buffer
    W = stored if in_place else None  # the whole W0 in the compute dtype, when one is needed
    scratch = pool if scratch is None else scratch
    if needs_base(compute, job.module):
        # a copy of W0 is the result when the output dtype is the compute dtype: it must outlive the call
        W = _whole_w0(stored, W, read, step, helpers, pool if code_dtype == cdt else scratch, cdt, dev)
        read = None  # every row is read
        res = _run_compute(compute, job.module, W.T if job.transposed else W, helpers)
    else:
        res = _run_compute(compute, job.module, None, helpers)
    _check_delta(res.delta, job.module, shape)
    out = _output_buffer(W, stored, code_dtype, pool)
    if hasattr(res.delta, "add_bf16"):  # a delta not yet formed (OnePassTies, FactorDrops)
        fused = _fused_bf16(stored, out, W, None, cdt, on_cpu)
        added, first = _add_unformed(res.delta, stored, out, job, fused, read, helpers, first)
        if added:
            return JobResult(job, out, res.facts)
        res = ModuleOutput(res.delta.materialize(), res.facts)  # each block of W0 is read (again) below
    dense, left, right = _operands(res.delta, dev, cdt, job.transposed)
    wide = code_dtype if code_dtype != torch.float16 else torch.float32
    fused = _fused_bf16(stored, out, W, dense, cdt, on_cpu)

    def block(r0: int, r1: int, k: int) -> list[torch.Tensor]:
        if read is not None:
            read(r0, r1)
        if fused is not None:  # bfloat16 in and out: the delta's rows, then one fused pass
            if left is None:
                finite = fused.add(stored[r0:r1], dense[r0:r1], out[r0:r1])
            else:
                finite = _fused_product(fused, stored, left, right, out, r0, r1, scratch, f"delta{k}")
            return [] if finite else [torch.tensor(math.inf)]
        if W is not None:
            blk = W[r0:r1]
        else:
            blk = scratch.get(f"block{k}", (r1 - r0, cols), cdt, dev).copy_(stored[r0:r1])
        if left is not None:
            blk.addmm_(left[r0:r1], right)
        if dense is not None:
            blk.add_(dense[r0:r1])
        if out is not W:
            copy_narrowed(out[r0:r1], blk)
        if not blk.numel():
            return []
        written = out[r0:r1] if on_cpu else narrow(blk, code_dtype)  # on a GPU: summed there
        return [written.sum(dtype=wide)]

    sums = [e for part in _by_blocks(rows, step, helpers, block, MIN_ROWS, first) for e in part]
    if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
        check_output_finite(out, job.info.key)  # raises, naming the tensor, unless a sum overflowed
    return JobResult(job, out, res.facts)


def _add_unformed(delta, stored, out, job: ModuleJob, fused, read, helpers, first) -> tuple:
    """``out = bf16(f32(W0) + delta)`` by a delta not yet formed
    (:class:`ModuleOutput`) where the fused kernel (``fused``) would add it:
    a bfloat16 weight whose blocks ``read`` fills, in the stored layout.
    ``(True, None)`` once written (raising, naming the tensor, where some
    result is not finite, unless a sum overflowed); else ``(False, first)``,
    ``first`` still to run where the blocks did not run it: the caller forms
    the delta and adds it, reading ``W0`` again."""
    if fused is None or read is None or job.transposed:
        return False, first
    rows = stored.shape[0]
    finite = delta.add_bf16(
        stored, out, read, lambda step, taper, fn: _by_blocks(rows, step, helpers, fn, MIN_ROWS, first, taper)
    )
    if finite is None:
        return False, None
    if not finite:
        check_output_finite(out, job.info.key)
    return True, None


def _whole_w0(stored: torch.Tensor, W, read, step: int, helpers, keep: Buffers, cdt, dev) -> torch.Tensor:
    """``W0`` whole in the compute dtype ``cdt`` on ``dev``: ``W`` (the stored
    tensor itself, in place) once its rows are read (``read(r0, r1)``, when
    given, fills them), else a copy of ``stored`` into a buffer of ``keep``."""
    buf = W if W is not None else keep.get("in", stored.shape, cdt, dev)
    if buf is stored and read is None:  # in place and already read: nothing to do
        return buf

    def load(r0: int, r1: int, k: int) -> None:
        if read is not None:
            read(r0, r1)
        if buf is not stored:
            buf[r0:r1].copy_(stored[r0:r1])

    _by_blocks(stored.shape[0], step, helpers, load)
    return buf


def _operands(delta, dev, cdt: torch.dtype, transposed: bool) -> tuple:
    """``(dense, left, right)`` of a module's delta in the stored layout, on
    ``dev`` in ``cdt``: a factor pair ``(B, A)`` gives the stored rows'
    factors ``left @ right`` (``B @ A``, or for a Conv1D ``(in, out)`` tensor
    ``A^T @ B^T``) and ``dense = None``; a dense delta gives itself (viewed
    transposed for a Conv1D) and no factors."""
    if isinstance(delta, tuple):
        B, A = (x.to(device=dev, dtype=cdt) for x in delta)
        return (None, A.T.contiguous(), B.T) if transposed else (None, B, A)
    dense = delta.to(device=dev, dtype=cdt)
    return (dense.T if transposed else dense), None, None


#: entries per piece of a block's product in the fused bfloat16 step (2 MiB
#: of float32): each piece is formed and added while it is still in the
#: core's L2 cache, instead of a whole block's product going out to memory
#: and back: 20-25% less time for the product and the add of a 4M-entry
#: block in a microbenchmark (one thread, 4096 and 11008 columns); on the 7B
#: benchmark's sum, 2 CPU-s of 20 less, the same wall time (its writes to
#: the disk bound it there)
FUSED_PIECE_ELEMENTS = 1 << 19


def _fused_product(fused, stored, left, right, out, r0: int, r1: int, scratch: Buffers, name: str) -> bool:
    """``out[r0:r1] = bf16(f32(stored[r0:r1]) + left[r0:r1] @ right)`` by
    pieces of rows (:data:`FUSED_PIECE_ELEMENTS`, as blocks are: a multiple
    of ``MIN_ROWS`` rows from ``r0``, a block's start, a short last piece
    joined to the one before, so each piece's product has the bits of the
    whole one), each formed into ``scratch``'s buffer ``name`` and added at
    once; True when every result is finite."""
    cols = right.shape[1]
    step = aligned_rows(FUSED_PIECE_ELEMENTS // max(cols, 1))
    bounds = [*range(r0, r1, step), r1]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_ROWS:
        del bounds[-2]
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    d = scratch.get(name, (longest, cols), torch.float32, torch.device("cpu"))
    finite = True
    for a, b in zip(bounds, bounds[1:]):
        piece = torch.mm(left[a:b], right, out=d[: b - a])
        finite &= fused.add(stored[a:b], piece, out[a:b])
    return finite


def _fused_bf16(stored: torch.Tensor, out: torch.Tensor, W, dense, cdt: torch.dtype, on_cpu: bool):
    """The fused ``bf16(f32(W0) + delta)`` kernel (:mod:`loramix.native.bf16`)
    where :func:`add_delta` may take it: on the CPU, a bfloat16 weight read
    and written as bfloat16, computed in float32, ``W0`` not needed whole, a
    dense delta (if any) contiguous (the kernel reads its rows as they lie);
    else None. Its bits are those of ``W0.float().addmm_(B, A)`` (the product
    added once, rounded once: ``addmm_`` adds ``C`` to the finished product,
    tests/test_native.py) and of ``W0.float() + dense``, narrowed as torch
    narrows."""
    if (
        not on_cpu
        or W is not None
        or cdt != torch.float32
        or (dense is not None and not dense.is_contiguous())
    ):
        return None
    if stored.dtype != torch.bfloat16 or out.dtype != torch.bfloat16:
        return None
    from .native import bf16

    return bf16.kernels()


def _output_buffer(W, stored: torch.Tensor, code_dtype: torch.dtype, pool: Buffers) -> torch.Tensor:
    """Where :func:`add_delta` writes its result (on the CPU, in the output
    dtype): the float32 ``W`` itself when that is the output dtype, else the
    read buffer ``stored`` when it is (each block goes back where it was
    read from), else a buffer of ``pool``."""
    if W is not None and W.dtype == code_dtype and W.device.type == "cpu":
        return W
    if stored.dtype == code_dtype and stored.device.type == "cpu" and W is not stored:
        return stored
    return pool.get("host", stored.shape, code_dtype, torch.device("cpu"))


def _by_blocks(rows: int, step: int, helpers, fn, min_rows: int = 1, first=None, taper: int = 0) -> list:
    """``fn(r0, r1, k)`` for every block of ``step`` rows (a last block of
    fewer than ``min_rows`` rows joins the one before; with ``taper``, the
    blocks shrink towards the end, :func:`_block_bounds`), shared out between
    this thread (``k = 0``) and the ``helpers`` (``k`` = 1, 2, ...): each
    takes the next block not yet taken, so a thread that gets less of the
    CPU (a machine shared with other jobs) does fewer. The results, in block
    order. ``first()``, when given, runs in this thread once the helpers
    have their shares, before it joins them (other work of its own: the
    next module's delta, :class:`SerialExecutor`). A helper's share that
    has not started when this thread finds no block left is cancelled, not
    waited for (its helper may be busy with another caller's blocks)."""
    threads = 1 + (helpers.threads if helpers is not None else 0)
    bounds = _block_bounds(rows, step, min_rows, taper if threads > 1 else 0, threads)
    parts = min(len(bounds), threads)
    if parts <= 1:
        if first is not None:
            first()
        return [fn(r0, r1, 0) for r0, r1 in bounds]
    done: list = [None] * len(bounds)
    taken = itertools.count()  # next() is atomic under the GIL

    def run(k: int) -> None:
        while (i := next(taken)) < len(bounds):
            done[i] = fn(*bounds[i], k)

    others = [helpers.submit(run, k) for k in range(1, parts)]
    try:
        if first is not None:
            first()
        run(0)
    finally:
        for f in others:
            if not f.cancel():
                f.result()
    return done


def _block_bounds(rows: int, step: int, min_rows: int, taper: int, threads: int) -> list[list[int]]:
    """``[r0, r1]`` of each block of :func:`_by_blocks`: ``step`` rows, a last
    block of fewer than ``min_rows`` joined to the one before. With ``taper``
    (a multiple of ``min_rows``, as ``step`` is), a block takes at most half
    of the rows left shared by the ``threads``, rounded down to ``taper``
    times a power of two, and at least ``taper``: large blocks, few calls,
    and at the end small ones, so that no thread waits long for another's
    last block (the powers of two: few distinct heights)."""
    bounds, r0 = [], 0
    while r0 < rows:
        size = step
        if taper:
            share = (rows - r0) // (2 * threads) // taper
            size = min(step, taper << max(0, share.bit_length() - 1))
        bounds.append([r0, min(rows, r0 + size)])
        r0 += size
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_rows:
        last = bounds.pop()
        bounds[-1][1] = last[1]
    return bounds


def _all_threads(helpers):
    """torch on all the run's threads (this one and the helpers') for large
    operations (see :func:`cpu_threads`)."""
    return torch_threads(None if helpers is None else helpers.threads + 1)


# The helpers of the streaming run in progress in this thread (None outside one),
# for the methods' own blocked work (parallel_rows, large_op).
_RUN_HELPERS: contextvars.ContextVar[Helpers | None] = contextvars.ContextVar("loramix_helpers", default=None)


def parallel_rows(rows: int, step: int, fn, min_rows: int = 1, taper: int = 0) -> list:
    """``fn(r0, r1, k)`` over blocks of ``step`` rows (a last block of fewer
    than ``min_rows`` joins the one before; see :func:`_by_blocks`), shared
    out with the helpers of the streaming run in progress (torch on one
    thread in each, this one included), or all in this thread outside one;
    ``k`` tells the threads apart (for their own work buffers). The results,
    block by block."""
    helpers = _RUN_HELPERS.get()
    with torch_threads(1 if helpers is not None else None):
        return _by_blocks(rows, step, helpers, fn, min_rows, taper=taper)


def run_threads() -> int:
    """Threads of the streaming run in progress in this thread (this one and
    its helpers); 1 outside one."""
    helpers = _RUN_HELPERS.get()
    return 1 + (helpers.threads if helpers is not None else 0)


def large_op():
    """A context for large torch operations (whole tensors): all the run's
    threads during a streaming run (where torch otherwise runs on one),
    nothing outside one."""
    return _all_threads(_RUN_HELPERS.get())


@contextlib.contextmanager
def cpu_threads(executor):
    """For a run of ``executor`` on the CPU: torch on one thread, and the
    executor's ``helpers``, a pool of the other threads torch had (each
    running torch on one thread), sharing out the blocks of each tensor.

    The work per operation is small (a block of a tensor, an adapter's
    factors), and torch's own OpenMP threads wait for each other at the end
    of every operation: on a machine shared with other jobs that wait is a
    scheduler time slice, milliseconds, whenever one of them is not running.
    Threads of our own each take a share of the blocks and never wait on
    each other; the writer's thread (:func:`_write_shards`) runs beside them."""
    n = torch.get_num_threads()
    device = getattr(executor, "device", None)
    if device is None or torch.device(device).type != "cpu" or not hasattr(executor, "helpers"):
        yield
        return
    torch.set_num_threads(1)
    helpers = Helpers(n - 1) if n > 1 else None
    executor.helpers = helpers
    token = _RUN_HELPERS.set(helpers)
    try:
        yield
    finally:
        _RUN_HELPERS.reset(token)
        executor.helpers = None
        if helpers is not None:
            helpers.pool.shutdown(wait=True)
        torch.set_num_threads(n)


class Helpers:
    """``threads`` worker threads, each running torch on one thread."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, "loramix-compute", torch.set_num_threads, (1,))

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)


class _Computed:
    """A module compute whose result is already known (computed ahead): it
    needs no ``W0`` and no threads, and gives that result, or raises its error."""

    def __init__(self, result: ModuleOutput | Exception):
        self.result = result

    def __call__(self, module: str, W0) -> ModuleOutput:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def needs_base(self, module: str) -> bool:
        return False

    def one_thread(self, module: str) -> bool:
        return True


class SerialExecutor:
    """Runs each job when the writer asks for it, in plan order, on one
    device with three sets of buffers, used in turn by the module jobs:
    memory stays at about three large tensors.

    An executor is anything with ``results(plan, shard, src, compute)``
    yielding one :class:`JobResult` per job of ``shard`` in order; ``src`` is
    the shard's base file, open for reading (read it at explicit offsets,
    :func:`~loramix.io.safetensors_io.read_into`: the writer copies from it
    in another thread). The writer stores results in order while the next
    ones are computed (:func:`_write_shards`): a result's tensor must stay as
    it is until the executor has yielded ``in_flight`` (default 1) more
    results. ``results`` may also take ``phases=``: where in its page each
    tensor starts in the output file."""

    #: results that may wait to be stored: a store that waits for the disk does
    #: not hold up the arithmetic (one set of buffers per result, and one more)
    in_flight = 2

    def __init__(self, device: str | torch.device = "auto"):
        self.device = resolve_device(device)
        self.pool = Buffers()
        self._spares = collections.deque(Buffers() for _ in range(self.in_flight))
        self.scratch = Buffers()  # what does not outlive a job: shared by all sets
        self.helpers = None  # threads sharing out each tensor's blocks (set by cpu_threads)

    def results(
        self, plan: Plan, shard: ShardPlan, src, compute: ModuleCompute, phases: Sequence[int] | None = None
    ) -> Iterator[JobResult]:
        """``phases``: where in its page each job's tensor starts in the
        output file (:meth:`ShardWriter.phases`), for its read buffer.

        Ahead (on the CPU with helper threads): while the helpers start
        adding a module's delta, this thread computes the next module's
        (:func:`_by_blocks`' ``first``), then joins them; the helpers join
        that computation's blocks when they are free. The arithmetic of a
        merge whose deltas take long (TIES: forming, trimming and electing)
        then fills the time the additions leave idle, on the same threads.
        Only for a compute that says its result stays intact while it
        computes the next one (``compute.ahead``, true: its work buffers in
        two sets, used in turn, :mod:`loramix.methods.runner`), and for
        modules whose compute needs no ``W0`` and runs on one thread
        (``compute.one_thread``: torch's thread count is not touched while
        the helpers add). The modules' deltas are still computed in module
        order, each once. An error in a delta computed ahead is raised when
        its module's turn comes, as it would have been."""
        ahead: dict[int, ModuleOutput | Exception] = {}
        jobs = shard.jobs
        modules = [i for i, job in enumerate(jobs) if isinstance(job, ModuleJob)]
        after = dict(zip(modules, modules[1:]))  # each module job's next module job
        for i, job in enumerate(jobs):
            use = _Computed(ahead.pop(i)) if i in ahead else compute
            first, nxt = None, after.get(i)
            if nxt is not None and self._ahead_ok(job, compute) and self._ahead_ok(jobs[nxt], compute):
                first = functools.partial(self._compute_ahead, ahead, nxt, jobs[nxt], compute)
            yield self.run_job(job, src, use, None if phases is None else phases[i], first)

    def _ahead_ok(self, job: ModuleJob, compute: ModuleCompute) -> bool:
        """Whether ``job``'s delta may be computed ahead (see :meth:`results`)."""
        one = getattr(compute, "one_thread", None)
        return (
            getattr(compute, "ahead", False) is True
            and getattr(self, "helpers", None) is not None
            and torch.device(self.device).type == "cpu"
            and one is not None
            and bool(one(job.module))
            and not needs_base(compute, job.module)
        )

    @staticmethod
    def _compute_ahead(ahead: dict, i: int, job: ModuleJob, compute: ModuleCompute) -> None:
        try:
            ahead[i] = compute(job.module, None)
        except Exception as e:  # raised in its own turn, after the modules before it
            ahead[i] = e

    def run_job(
        self, job: Job, src, compute: ModuleCompute, phase: int | None = None, first=None
    ) -> JobResult:
        if isinstance(job, ModuleJob):
            pool = self.pool
            # the next module jobs work in the other sets: this result may still be being written
            self._spares.append(pool)
            self.pool = self._spares.popleft()
            # where the result is the read buffer (in place), it is written from it without a copy
            stored = pool.get("read", job.info.shape, ST_DTYPES[job.info.dtype], "cpu", phase)
            return add_delta(
                stored,
                job,
                compute,
                self.device,
                pool,
                getattr(self, "helpers", None),
                getattr(self, "scratch", None),
                read=lambda r0, r1: read_into(src, job.info, stored, (r0, r1)),
                first=first,
            )
        if isinstance(job, ReplaceJob):
            return JobResult(job, narrow(job.tensor, ST_DTYPES[job.out_code]).contiguous())
        if job.converts:  # a one-off (say an embedding to bfloat16): no buffer kept
            t = narrow(read_into(src, job.info), ST_DTYPES[job.out_code])
            return JobResult(job, check_output_finite(t, job.info.key))
        return JobResult(job)


# ---- the whole run ------------------------------------------------------------------------


@dataclass
class StreamResult(WrittenFolder):
    """What :func:`execute_into_base` wrote; ``facts`` per module that has some.
    Path-like: ``os.fspath(res)`` is ``out``, ``res / name`` a path inside it
    (:mod:`loramix.results`).

    Its repr leaves out the per-module lists and the provenance, which a
    notebook echoing the result showed as a wall of text."""

    out: Path
    modules: list[str] = field(repr=False)
    tensors: int
    bytes_written: int
    dtype: torch.dtype | None
    device: str
    seconds: float
    provenance: dict = field(default_factory=dict, repr=False)
    facts: dict[str, dict] = field(default_factory=dict, repr=False)


def _progress_bar(plan: Plan, out: Path, progress: bool):
    from .progress import progress_bar

    total = sum(t.nbytes for t in plan.base.tensors.values())
    return progress_bar(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", file=sys.stderr,
                        progress=progress, leave=False)  # fmt: skip


def _write_shards(
    plan: Plan, tmp: Path, executor, compute: ModuleCompute, record: dict, bar, writers
) -> tuple:
    """Every shard of ``plan`` into ``tmp`` (each writer appended to
    ``writers``, which the caller closes); returns ``(bytes, facts)``."""
    facts: dict[str, dict] = {}
    total = 0
    # One thread stores the results, in order, while the executor computes the
    # next ones: the writes (to the disk, or a copy into the page cache) overlap
    # the arithmetic. An executor says how many of its results may be waiting
    # to be stored (``in_flight``, default 1) before it reuses their buffers:
    # before a result is handed over, the stores that many results back are done.
    depth = max(1, int(getattr(executor, "in_flight", 1)))
    # an executor that takes them is told where each tensor starts within a page of the
    # output file, so that its result buffers can be written to the disk without a copy
    phased = "phases" in inspect.signature(executor.results).parameters

    def results(shard: ShardPlan, src, w: ShardWriter):
        if not phased:
            return executor.results(plan, shard, src, compute)
        return executor.results(plan, shard, src, compute, phases=w.phases())

    with ThreadPoolExecutor(1, thread_name_prefix="loramix-writer") as io:
        for shard in plan.shards:
            w = ShardWriter(tmp / shard.name, shard.entries(), safetensors_metadata(record))
            writers.append(w)
            total += w.data_size
            with open(plan.base.path / shard.name, "rb") as src:
                pending: collections.deque = collections.deque()
                try:
                    for res in results(shard, src, w):
                        while len(pending) >= depth:
                            pending.popleft().result()
                        pending.append(io.submit(_store, w, src, res))
                        if res.facts:
                            facts[res.job.module] = res.facts
                        bar.update(res.job.info.nbytes)
                    while pending:
                        pending.popleft().result()
                except OutputError as e:
                    _blame_the_base(plan.base, shard, src, e)
                    raise
                finally:
                    futures_wait(pending)  # no write left running on a closed file
            w.finish_data()
    return total, facts


def _blame_the_base(base: BaseModelFolder, shard: ShardPlan, src, err: OutputError) -> None:
    """For an output tensor that would hold nan or inf (``err`` names it):
    raise :class:`BaseModelError` naming the base's file and tensor when the
    base's own tensor holds them, as an adapter's is named; else return (the
    sum overflowed). Read again from ``src``: the result may have replaced
    the read buffer."""
    info = base.tensors.get(err.where or "")
    if info is not None and info.shard == shard.name and not all_finite(read_into(src, info)):
        raise BaseModelError(base.path / shard.name, f"tensor {info.key} holds nan or inf") from None


def _store(w: ShardWriter, src, res: JobResult) -> None:
    if res.tensor is None:
        w.copy_bytes(src, res.job.info.start, res.job.info.nbytes)
    else:
        w.write_tensor(res.tensor)


def execute_into_base(
    plan: Plan,
    out: str | os.PathLike,
    compute: ModuleCompute,
    *,
    record: dict,
    executor=None,
    force: bool = False,
    inputs: Iterable = (),
    progress: bool = True,
    finish: Callable[[dict, dict], dict] | None = None,
) -> StreamResult:
    """Run ``plan`` with ``executor`` (default :class:`SerialExecutor` on the
    CPU) and write the result to ``out`` atomically: the same shards and
    index as the base, its other files copied, ``record`` (a provenance
    record whose last input is a placeholder for the base) completed with the
    base's hashes (computed in a thread while the data streams) and written
    into every shard's metadata, and into ``loramix.json`` as
    ``finish(record, facts)`` when given (what the facts add). An error or
    an interrupt leaves nothing; an existing ``out`` is refused unless
    ``force``."""
    t0 = time.perf_counter()
    executor = executor or SerialExecutor("cpu")
    base, out = plan.base, Path(out)
    writers: list[ShardWriter] = []
    with ThreadPoolExecutor(1) as hasher, atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        stop_hashing = threading.Event()
        hashing = hasher.submit(base.provenance, stop_hashing)
        bar = _progress_bar(plan, out, progress)
        try:
            with (
                cpu_threads(executor),
                native.announcing(functools.partial(bar.write, file=sys.stderr) if progress else None),
            ):
                total, facts = _write_shards(plan, tmp, executor, compute, record, bar, writers)
            finish_model_folder(base, tmp, total, plan.out_dtype)
            record["inputs"][-1] = hashing.result()
            for w in writers:
                w.finish(safetensors_metadata(record))
            if finish is not None:
                record = finish(record, facts)
            write_provenance(tmp, record)
        except BaseException:
            stop_hashing.set()
            raise
        finally:
            bar.close()
            for w in writers:
                w.close()
    return StreamResult(
        out=out,
        modules=[j.module for j in plan.module_jobs],
        tensors=len(base.tensors),
        bytes_written=total,
        dtype=plan.out_dtype or base.dtype,
        device=str(getattr(executor, "device", "cpu")),
        seconds=time.perf_counter() - t0,
        provenance=record,
        facts=facts,
    )


def base_placeholder(base: BaseModelFolder) -> dict:
    """The base's provenance record with zero hashes, the same length as the
    real one (which :func:`execute_into_base` fills in once hashed)."""
    zero = "0" * 64
    return {"role": "base", "path": normalized_path(base.path), "sha256": zero, "identity": zero,
            "files": {n: zero for n in base.weight_files}}  # fmt: skip
