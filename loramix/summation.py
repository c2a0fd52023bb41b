"""Naive LoRA summation (DESIGN.md section 3) and the streaming engine under it.

Into the base::

    W = W0 + sum_i w_i dW_i                       every weight (out, in)

``dW_i`` is ``s_i B_i A_i`` for LoRA and the effective delta ``W_hat - W0`` for
D2-LoRA (DESIGN.md section 4). The sum of the LoRA terms is one matmul of the
concatenated factors, ``[w_1 s_1 B_1 ... w_N s_N B_N] @ [A_1; ...; A_N]``
(out x R times R x in, ``R = sum_i r_i``).

As one exact adapter (no base needed; LoRA only)::

    B = [w_1 s_1 B_1 ... w_N s_N B_N]   (out, R)
    A = [A_1; ...; A_N]                 (R, in)      scale 1 (lora_alpha = R)

The engine, :func:`stream_into_base`, is generic: it streams a Hugging Face
model folder shard by shard, tensor by tensor, calls ``module_fn(name, W0)`` for
each adapted weight and writes ``W0 + delta``; other merges (TIES, DARE, SVD)
are a different ``module_fn``. Peak memory is about one large tensor plus the
adapters: untouched tensors are copied byte for byte from file to file, and
each output shard is written in place through a streaming safetensors writer.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import D2LORA, LORA, Adapter, check_compatible
from .devices import resolve_device
from .errors import AdapterError, BaseModelError, UsageError
from .io.model_folder import INDEX_NAME, ST_DTYPES, TORCH_TO_ST, BaseModelFolder, TensorInfo
from .io.outputs import atomic_output_dir, check_output, write_provenance
from .io.outputs import provenance as make_provenance
from .io.safetensors_io import safetensors_metadata

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# module_fn(module_name, W0) -> the delta to add to W0 (out, in): a dense
# tensor (out, in), or a factor pair (B (out, k), A (k, in)) meaning B @ A.
ModuleFn = Callable[[str, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class StreamResult:
    """What :func:`stream_into_base` wrote."""

    out: Path
    modules: list[str]
    tensors: int
    bytes_written: int
    dtype: torch.dtype | None
    device: str
    seconds: float
    provenance: dict = field(default_factory=dict)


# ---- a streaming safetensors writer ---------------------------------------------


class _ShardWriter:
    """Writes one safetensors file tensor by tensor, never holding it whole.

    The header (shapes, dtypes, offsets) is known up front; it is written with
    some slack so that the final metadata (provenance, whose input hashes are
    computed while streaming) can be rewritten in place at the end. Trailing
    spaces in the header are allowed by the format (safetensors pads the same
    way).
    """

    SLACK = 512

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict):
        self.path = path
        self.entries = entries
        self.header: dict = {}
        off = 0
        for key, code, shape, nbytes in entries:
            self.header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        self.data_size = off
        first = self._encode(metadata)
        self.header_len = (len(first) + self.SLACK + 7) // 8 * 8
        self.f = open(path, "wb")
        self._write_header(first)
        self.f.seek(8 + self.header_len)
        self.pos = 0  # within the data section
        self.i = 0

    def _encode(self, metadata: dict) -> bytes:
        return json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()

    def _write_header(self, raw: bytes) -> None:
        if len(raw) > self.header_len:
            raise RuntimeError(f"{self.path}: final safetensors header outgrew its reserved space")
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.header_len) + raw + b" " * (self.header_len - len(raw)))

    def _next(self, nbytes: int) -> None:
        key, _, _, expected = self.entries[self.i]
        if nbytes != expected:
            raise RuntimeError(f"{self.path}: tensor {key} has {nbytes} bytes, expected {expected}")
        self.i += 1
        self.pos += nbytes

    def write_tensor(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        buf = t.view(torch.uint8).numpy()  # a view: no copy
        self._next(buf.nbytes)
        self.f.write(memoryview(buf))

    def copy_bytes(self, src, start: int, nbytes: int) -> None:
        """Copy ``nbytes`` at ``start`` of the open file ``src`` (in-kernel
        where the OS allows it)."""
        self._next(nbytes)
        self.f.flush()
        dst_fd, src_fd = self.f.fileno(), src.fileno()
        done = 0
        copy_range = getattr(os, "copy_file_range", None)
        while done < nbytes and copy_range is not None:
            try:
                n = copy_range(src_fd, dst_fd, nbytes - done, start + done)
            except OSError:
                break
            if n <= 0:
                break
            done += n
        if done < nbytes:  # no copy_file_range here (or it gave up): plain reads
            src.seek(start + done)
            self.f.seek(8 + self.header_len + self.pos - nbytes + done)
            while done < nbytes:
                block = src.read(min(64 << 20, nbytes - done))
                if not block:
                    raise BaseModelError(Path(src.name), "truncated while copying")
                self.f.write(block)
                done += len(block)
        else:
            # copy_file_range moved the destination offset behind Python's back.
            self.f.seek(8 + self.header_len + self.pos)

    def finish_data(self) -> None:
        if self.i != len(self.entries):
            raise RuntimeError(f"{self.path}: wrote {self.i} of {len(self.entries)} tensors")
        self.f.flush()

    def finish(self, metadata: dict) -> None:
        self._write_header(self._encode(metadata))
        self.f.close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


# ---- the engine ---------------------------------------------------------------------


class _Buffers:
    """Reusable work tensors, one per (role, shape, dtype, device): a model
    repeats a few weight shapes, and fresh allocations of that size cost a
    page fault per 4 KiB page, more than the arithmetic."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, role: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, tuple(shape), dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return buf


def _read_into(src, info: TensorInfo, pool: _Buffers | None) -> torch.Tensor:
    """Read one tensor's bytes with ``readinto`` into a reused buffer: one copy
    from the page cache, and no mmap whose touched pages would count towards
    the process's memory for the rest of the shard."""
    dtype = ST_DTYPES[info.dtype]
    if pool is None:  # a one-off (an embedding converted to another dtype): not kept
        buf = torch.empty(info.shape, dtype=dtype)
    else:
        buf = pool.get("read", info.shape, dtype, torch.device("cpu"))
    view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if info.nbytes else memoryview(b"")
    src.seek(info.start)
    got = src.readinto(view)
    while got < info.nbytes:  # short reads are allowed
        n = src.readinto(view[got:])
        if not n:
            raise BaseModelError(Path(src.name), f"truncated while reading tensor {info.key}")
        got += n
    return buf


def _add_delta(
    stored: torch.Tensor, name: str, transposed: bool, module_fn: ModuleFn, dev: torch.device, pool: _Buffers
) -> torch.Tensor:
    """``W0 + delta`` in the stored layout, in float32 (float64 for a float64
    base), on ``dev``, in a reused buffer."""
    compute = torch.float64 if stored.dtype == torch.float64 else torch.float32
    if stored.dtype == compute and stored.device == dev:
        W = stored
    else:
        W = pool.get("in", stored.shape, compute, dev)
        W.copy_(stored)
    W0 = W.T if transposed else W  # (out, in) view
    res = module_fn(name, W0)
    new = pool.get("out", W.shape, compute, dev)
    if isinstance(res, tuple):
        B, A = (x.to(device=dev, dtype=compute) for x in res)
        if (
            B.ndim != 2
            or A.ndim != 2
            or (B.shape[0], A.shape[1]) != tuple(W0.shape)
            or B.shape[1] != A.shape[0]
        ):
            raise ValueError(
                f"module_fn returned factors {tuple(B.shape)} @ {tuple(A.shape)} for {name}, "
                f"expected (out, k) @ (k, in) with (out, in) = {tuple(W0.shape)}"
            )
        # One fused pass: W0 + B @ A, or for a Conv1D (in, out) tensor W + A^T B^T.
        if transposed:
            torch.addmm(W, A.T, B.T, out=new)
        else:
            torch.addmm(W, B, A, out=new)
    else:
        if tuple(res.shape) != tuple(W0.shape):
            raise ValueError(f"module_fn returned {tuple(res.shape)} for {name}, expected {tuple(W0.shape)}")
        delta = res.to(device=dev, dtype=compute)
        torch.add(W, delta.T if transposed else delta, out=new)
    return new


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def _resolve_targets(
    base: BaseModelFolder, modules: Sequence[str], adapters: Sequence[Adapter]
) -> dict[str, tuple[str, bool]]:
    """base tensor key -> (module name, transposed), checking every module
    exists in the base with a shape that fits; errors name adapter and base."""
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


def stream_into_base(
    base: str | os.PathLike | BaseModelFolder,
    out: str | os.PathLike,
    module_fn: ModuleFn,
    *,
    adapters: Sequence[Adapter] = (),
    modules: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    force: bool = False,
    provenance: dict | None = None,
    progress: bool = True,
) -> StreamResult:
    """Write ``W0 + module_fn(name, W0)`` for each adapted weight of ``base`` into ``out``.

    - ``module_fn(name, W0)`` gets the base weight ``W0`` as ``(out, in)``
      (``nn.Linear`` layout, a ``Conv1D`` weight already transposed), float32
      (float64 for a float64 base) on ``device``, and returns the delta to
      add: a dense ``(out, in)`` tensor, or a factor pair ``(B, A)``, B
      ``(out, k)``, A ``(k, in)``, meaning ``B @ A`` (added in one fused
      ``addmm``, no dense delta formed). It must not modify ``W0``.
    - ``modules``: the module names to apply it to; default the union of the
      ``adapters``' modules. Every one must exist in the base with a fitting
      shape (checked before anything is written). ``adapters`` also supply the
      compatibility check, the refused-output check (``out`` may not be an
      input) and the provenance inputs.
    - The sum is taken in float32 (or the base's wider dtype) and written in
      the base's dtype, or ``dtype`` (all floating tensors then take it).
    - Output: the same shards and index as the base, non-weight files copied,
      provenance in every shard's metadata and in ``loramix.json``; written to
      a temporary folder beside ``out`` and renamed at the end, so an error or
      an interrupt leaves nothing. An existing ``out`` is refused unless
      ``force``.
    - ``provenance``: ``{"method": ..., "parameters": {...}}``, optionally
      ``"inputs"`` (records for the adapters; default
      :meth:`Adapter.provenance`); the base record (sha256 of its files) is
      added here.
    """
    t0 = time.perf_counter()
    base = base if isinstance(base, BaseModelFolder) else BaseModelFolder(base)
    adapters = list(adapters)
    check_compatible(adapters)
    if modules is None:
        modules = list(dict.fromkeys(n for ad in adapters for n in ad.modules))
    targets = _resolve_targets(base, modules, adapters)
    out_dtype = _as_dtype(dtype)
    dev = resolve_device(device)
    inputs = [base.path, *(ad.path for ad in adapters if ad.path is not None)]
    out = check_output(out, force=force, inputs=inputs)

    prov = dict(provenance or {})
    method = prov.pop("method", "stream")
    parameters = prov.pop("parameters", {})
    ad_inputs = prov.pop("inputs", None) or [dict(ad.provenance(), role="adapter") for ad in adapters]
    # The base's hashes are computed in a thread while the data streams
    # (hashlib releases the GIL), and the shard headers are finished after.
    placeholder = {"role": "base", "path": str(base.path), "sha256": "0" * 64}
    placeholder["files"] = {n: "0" * 64 for n in base.weight_files}
    parameters = {**parameters, "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch.")}
    record = make_provenance(method, parameters, [*ad_inputs, placeholder], **prov)

    def out_code(info: TensorInfo) -> str:
        if out_dtype is not None and info.is_float:
            return TORCH_TO_ST[out_dtype]
        return info.dtype

    bar = None
    pool = _Buffers()
    writers: list[_ShardWriter] = []
    total_bytes = 0
    with ThreadPoolExecutor(1) as hasher, atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        stop_hashing = threading.Event()
        hashing = hasher.submit(base.provenance, stop_hashing)
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=sum(t.nbytes for t in base.tensors.values()),
                unit="B",
                unit_scale=True,
                desc=f"writing {out.name}",
                file=sys.stderr,
                disable=not progress,
                leave=False,
            )
            for shard, infos in base.iter_shards():
                entries = []
                for info in infos:
                    code = out_code(info)
                    n = (
                        info.nbytes
                        if code == info.dtype
                        else info.nbytes // ST_DTYPES[info.dtype].itemsize * ST_DTYPES[code].itemsize
                    )
                    entries.append((info.key, code, info.shape, n))
                w = _ShardWriter(tmp / shard, entries, safetensors_metadata(record))
                writers.append(w)
                total_bytes += w.data_size
                with open(base.path / shard, "rb") as src:
                    for info, (_, code, _, _) in zip(infos, entries):
                        if info.key in targets:
                            name, transposed = targets[info.key]
                            stored = _read_into(src, info, pool)
                            new = _add_delta(stored, name, transposed, module_fn, dev, pool)
                            if new.dtype != ST_DTYPES[code] or new.device.type != "cpu":
                                new = pool.get("host", new.shape, ST_DTYPES[code], torch.device("cpu")).copy_(
                                    new
                                )
                            w.write_tensor(new)
                        elif code != info.dtype:
                            w.write_tensor(_read_into(src, info, None).to(ST_DTYPES[code]))
                        else:
                            w.copy_bytes(src, info.start, info.nbytes)
                        bar.update(info.nbytes)
                w.finish_data()
            bar.close()

            if base.sharded:
                index = json.loads((base.path / INDEX_NAME).read_text())
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_bytes}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            for p in base.other_files():
                if p.is_dir():
                    shutil.copytree(p, tmp / p.name)
                else:
                    shutil.copyfile(p, tmp / p.name)
            if out_dtype is not None:
                _set_config_dtype(tmp / "config.json", out_dtype)

            record["inputs"][-1] = hashing.result()
            for w in writers:
                w.finish(safetensors_metadata(record))
            write_provenance(tmp, record)
        except BaseException:
            stop_hashing.set()
            if bar is not None:
                bar.close()
            raise
        finally:
            for w in writers:
                w.close()
    return StreamResult(
        out=out,
        modules=[targets[k][0] for k in targets],
        tensors=len(base.tensors),
        bytes_written=total_bytes,
        dtype=out_dtype or base.dtype,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        provenance=record,
    )


def _set_config_dtype(cfg_path: Path, dtype: torch.dtype) -> None:
    """Make ``config.json`` say the dtype the weights now have, so that
    ``from_pretrained(dtype="auto")`` keeps it."""
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---- summation ------------------------------------------------------------------


def _load_all(adapters_or_paths) -> list[Adapter]:
    from .io.adapter_files import load_adapter

    if isinstance(adapters_or_paths, (str, os.PathLike, Adapter)):
        adapters_or_paths = [adapters_or_paths]
    adapters = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters_or_paths]
    if not adapters:
        raise UsageError("adapters", "nothing to sum: give at least one adapter")
    return adapters


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError("--weights", f"got {len(weights)} weights for {n} adapters; give one per adapter")
    return weights


def _inputs(adapters: list[Adapter], weights: list[float]) -> list[dict]:
    return [dict(ad.provenance(), role="adapter", weight=w) for ad, w in zip(adapters, weights)]


def summed_factors(
    adapters: Sequence[Adapter], weights: Sequence[float], name: str, dtype=torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA adapters' terms of module ``name`` as one factor pair:
    ``B = [w_i s_i B_i ...]`` (out, R), ``A = [A_i; ...]`` (R, in), so that
    ``B @ A = sum_i w_i s_i B_i A_i``. None when no LoRA adapter has it."""
    Bs, As = [], []
    for ad, w in zip(adapters, weights):
        m = ad.modules.get(name)
        if m is None or m.kind != LORA:
            continue
        B, A = m.factors(dtype=dtype, device=device)
        Bs.append(B * w)
        As.append(A)
    if not Bs:
        return None
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def sum_into_base(
    adapters_or_paths,
    base,
    out,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    force: bool = False,
    progress: bool = True,
) -> StreamResult:
    """``W = W0 + sum_i w_i dW_i`` for every adapted weight, written as a model folder.

    LoRA terms are one matmul of the concatenated factors, in float32 on the
    device (``B`` (out, R) @ ``A`` (R, in)); a D2-LoRA adapter adds its
    effective delta ``W_hat - W0`` (needs ``W0``; computed in float64).
    ``weights`` default to 1. See :func:`stream_into_base` for the output.
    """
    adapters = _load_all(adapters_or_paths)
    weights = _weights(weights, len(adapters))
    dev = resolve_device(device)
    has_d2 = any(ad.method == D2LORA for ad in adapters)

    def module_fn(name: str, W0: torch.Tensor):
        pair = summed_factors(adapters, weights, name, dtype=W0.dtype, device=W0.device)
        if not has_d2:
            return pair  # the engine adds B @ A in one fused addmm
        delta = pair[0] @ pair[1] if pair is not None else torch.zeros_like(W0)
        for ad, w in zip(adapters, weights):
            m = ad.modules.get(name)
            if m is not None and m.kind == D2LORA:
                delta += (w * m.delta(W0, dtype=torch.float64, device=W0.device)).to(delta.dtype)
        return delta

    return stream_into_base(
        base,
        out,
        module_fn,
        adapters=adapters,
        dtype=dtype,
        device=dev,
        force=force,
        progress=progress,
        provenance={
            "method": "sum",
            "parameters": {"weights": weights},
            "inputs": _inputs(adapters, weights),
        },
    )


def sum_adapters(
    adapters_or_paths,
    out,
    weights: Sequence[float] | None = None,
    force: bool = False,
    base=None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the exact sum ``sum_i w_i dW_i`` as one PEFT LoRA adapter folder.

    Per module ``B = [w_1 s_1 B_1 ... ]`` (out, R) and ``A = [A_1; ...]``
    (R, in), ``R`` the sum of the ranks of the adapters that have it; scale 1
    (``lora_alpha = R``; ``rank_pattern``/``alpha_pattern`` where modules
    differ). No approximation. Factors are formed in float64 and stored in the
    adapters' common dtype (or ``dtype``). D2-LoRA adapters are refused: their
    effective delta depends on ``W0``, so no LoRA equals their sum. ``base``
    (optional) checks that every module exists in it with a fitting shape.
    """
    adapters = _load_all(adapters_or_paths)
    weights = _weights(weights, len(adapters))
    for ad in adapters:
        if ad.method != LORA:
            raise AdapterError(
                ad.path or ad.name,
                "is a D2-LoRA adapter: its effective delta depends on the base weights, so no LoRA "
                "adapter equals the sum; sum it into the base with --into BASE",
            )
    check_compatible(adapters)
    modules = list(dict.fromkeys(n for ad in adapters for n in ad.modules))
    inputs = [ad.path for ad in adapters if ad.path is not None]
    if base is not None:
        base = base if isinstance(base, BaseModelFolder) else BaseModelFolder(base)
        _resolve_targets(base, modules, adapters)
        inputs.append(base.path)
    out_dtype = _as_dtype(dtype)
    if out_dtype is None:
        out_dtype = adapters[0].modules[modules[0]].dtype if modules else torch.float32
        for ad in adapters:
            for m in ad.modules.values():
                out_dtype = torch.promote_types(out_dtype, m.dtype)
    factors = {}
    for name in modules:
        B, A = summed_factors(adapters, weights, name)
        factors[name] = (B.to(out_dtype), A.to(out_dtype))
    record = make_provenance(
        "sum",
        {"weights": weights, "dtype": str(out_dtype).removeprefix("torch."), "into": "adapter"},
        _inputs(adapters, weights) + ([base.provenance()] if base is not None else []),
    )
    from .io.adapter_files import save_peft_adapter

    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        save_peft_adapter(
            tmp,
            factors,
            base_model_name_or_path=adapters[0].base_model,
            fan_in_fan_out=any(bool(ad.config.get("fan_in_fan_out")) for ad in adapters),
            provenance=record,
            extra_config={"task_type": adapters[0].config.get("task_type", "CAUSAL_LM")},
        )
        write_provenance(tmp, record)
    return Path(out)
