"""Safetensors in one place: header reading and validation, the checked
reader, reading one tensor into a reused buffer, and the metadata loramix
writes. The streaming writer is :mod:`loramix.io.shard_writer`.

Every error names the file and the problem in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import BaseModelError, LoramixError, OutputError
from .pread import read_at
from .st_header import (  # noqa: F401  (the torch-free header layer; re-exported)
    FLOAT_CODES,
    file_sha256,
    read_safetensors_header,
)

# safetensors dtype codes -> torch dtypes (those torch has).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):
        ST_DTYPES[_code] = getattr(torch, _name)
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


#: bytes per element of every dtype the safetensors format defines (and loramix knows)
class CheckedSafetensors:
    """``safe_open`` behind the header check, with errors turned into
    one-line :class:`LoramixError`\\ s.

    Use as a context manager. ``error`` is the error class to raise (for
    instance ``AdapterError`` or ``BaseModelError``); ``dtypes``, when given,
    are the only dtype codes accepted (a tensor of another is refused,
    naming it and its dtype). The header is validated first
    (:func:`read_safetensors_header`), so the library never sees a file
    loramix would not accept. A path that is not valid UTF-8 (which the
    library refuses) is opened through its file descriptor.
    """

    def __init__(
        self,
        path: str | Path,
        error: type[LoramixError] = LoramixError,
        device: str = "cpu",
        dtypes: tuple[str, ...] | None = None,
    ):
        self.path = Path(path)
        self.error = error
        self.device = device
        self.dtypes = dtypes
        self._f = None
        self._fd = None

    def __enter__(self) -> CheckedSafetensors:
        if not os.path.lexists(self.path):
            raise self.error(self.path, "no such file")
        header, _ = read_safetensors_header(self.path, self.error)
        for key, info in header.items():
            if key != "__metadata__" and self.dtypes is not None and info["dtype"] not in self.dtypes:
                raise self.error(
                    self.path,
                    f"tensor {key} has dtype {info['dtype']}; loramix reads {', '.join(self.dtypes)}",
                )
        name = str(self.path)
        try:
            name.encode()
        except UnicodeEncodeError:
            self._fd = os.open(self.path, os.O_RDONLY)
            name = f"/proc/self/fd/{self._fd}"
        try:
            self._f = safe_open(name, framework="pt", device=self.device)
            self._f.__enter__()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            self._close_fd()
            raise self.error(self.path, f"not a valid safetensors file (corrupt or truncated): {e}") from e
        return self

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.__exit__(*exc)
        self._close_fd()

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def metadata(self) -> dict:
        return self._f.metadata() or {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str, check_finite: bool = False) -> torch.Tensor:
        try:
            t = self._f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(self.path, f"cannot read tensor {key} (corrupt or truncated file): {e}") from e
        if check_finite and not all_finite(t):
            raise self.error(self.path, f"tensor {key} has non-finite values (nan or inf)")
        return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, exactly. The sum is one
    reduction with no tensor-sized allocation and is non-finite whenever an
    entry is (nan and inf propagate); only when it is not finite (a nan or
    inf, or finite values whose sum overflows) is the elementwise check run."""
    if not t.is_floating_point():
        return True
    if t.device.type == "cpu" and t.numel() <= SMALL_ELEMENTS:
        return _all_finite_small(t)
    # float32 accumulation for half types (their own range would overflow on large tensors)
    s = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


#: up to this many elements (an adapter's factors), :func:`all_finite` checks
#: on one thread, in numpy: torch would split the few microseconds of work
#: over its threads, and on a machine shared with other jobs each such
#: operation waits milliseconds for a thread that is not running
SMALL_ELEMENTS = 1 << 20


def _all_finite_small(t: torch.Tensor) -> bool:
    import numpy as np

    t = t.detach()
    if t.dtype == torch.bfloat16:  # no numpy bfloat16: all exponent bits set is inf or nan
        bits = t.contiguous().view(torch.int16).numpy()
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        return bool(torch.isfinite(t).all())
    return bool(np.isfinite(t.numpy()).all())


def check_output_finite(t: torch.Tensor, key: str) -> torch.Tensor:
    """``t`` (an output tensor about to be written) when it is all finite;
    else an :class:`OutputError` naming the tensor. Called on each computed
    tensor as it is written, so the check costs no extra pass over a file."""
    if not all_finite(t):
        raise OutputError(
            key,
            f"the output tensor would hold nan or inf ({str(t.dtype).removeprefix('torch.')}): an input "
            "holds them or the result overflows its dtype; nothing was written",
        )
    return t


#: provenance that says when and where a run was made, not what it made: in
#: ``loramix.json`` only. In a weight file's metadata the time would make the
#: same inputs never give the same bytes, and the software versions would make a
#: base's identity (its weight files' hash, the scenario cache's key) change with
#: the installed packages although its tensors do not.
RUN_FACTS = ("created", "software")


def file_record(provenance: dict) -> dict:
    """``provenance`` less :data:`RUN_FACTS`: what a weight file carries."""
    return {k: v for k, v in provenance.items() if k not in RUN_FACTS}


def safetensors_metadata(provenance: dict | None = None) -> dict[str, str]:
    """Metadata for a file we write: ``format: pt`` (transformers requires it)
    plus the provenance, less :data:`RUN_FACTS`, as one JSON string."""
    meta = {"format": "pt"}
    if provenance is not None:
        meta["loramix"] = json.dumps(file_record(provenance), sort_keys=True)
    return meta


def canonicalize_header(path: str | Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place.

    ``safetensors`` serialises ``__metadata__`` from a Rust ``HashMap``, whose
    order is random per call: two writes of the same tensors and metadata can
    differ in bytes. Sorting the header's JSON keys (same compact separators,
    padded with spaces to the original length, as the format allows) makes
    the file a function of its content. Offsets are relative to the end of
    the header, so the data is untouched.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" in header and isinstance(header["__metadata__"], dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for headers safetensors wrote; leave such a file alone
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_into(
    src, info, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """One tensor's bytes from the open file ``src`` into ``out`` (a tensor
    of ``info``'s shape and dtype, typically reused across tensors; a fresh
    one when None) with ``readinto``: one copy from the page cache, and no
    mmap whose touched pages would count towards the process's memory for
    the rest of the file; at its offset, never moving ``src``'s position, so
    threads may read parts of one tensor at once. ``rows = (r0, r1)`` reads
    only those rows (the first dimension) into ``out[r0:r1]``. ``info`` is a
    :class:`~loramix.io.model_folder.TensorInfo` (absolute ``start``,
    ``nbytes``, ``shape``, safetensors ``dtype`` code)."""
    buf = torch.empty(info.shape, dtype=ST_DTYPES[info.dtype]) if out is None else out
    start, nbytes = info.start, info.nbytes
    part = buf
    if rows is not None and info.shape:
        row_bytes = nbytes // info.shape[0] if info.shape[0] else 0
        start, nbytes, part = (
            start + rows[0] * row_bytes,
            (rows[1] - rows[0]) * row_bytes,
            buf[rows[0] : rows[1]],
        )
    view = memoryview(part.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
    if read_at(src, view, start) < nbytes:
        raise BaseModelError(Path(src.name), f"truncated while reading tensor {info.key}")
    return buf
