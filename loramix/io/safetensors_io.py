"""Safetensors in one place: header reading and validation, the checked
reader, reading one tensor into a reused buffer, and the metadata loramix
writes. The streaming writer is :mod:`loramix.io.shard_writer`.

Every error names the file and the problem in one line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import BaseModelError, LoramixError, OutputError

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
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
#: the float dtypes loramix computes with: adapter factors, and base weights it changes or converts
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _regular_size(path: Path, error) -> int:
    """The size of ``path``, refusing anything but a regular file (a FIFO
    would block the reader forever, a device would never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(path, "not a regular file (a FIFO, device or socket?); give a safetensors file")
    return st.st_size


def _bad(error, path: Path, detail: str) -> LoramixError:
    return error(path, f"not a valid safetensors file (corrupt or truncated): {detail}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(key: str, info, path: Path, error) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking its fields, its
    dtype and that its byte length is ``prod(shape) * itemsize``."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _bad(error, path, f"bad header entry for {key}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise _bad(error, path, f"tensor {key} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(error, path, f"tensor {key} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _bad(error, path, f"tensor {key} has invalid data_offsets {offsets!r}")
    b, e = offsets
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if e - b != need:
        raise _bad(
            error, path, f"tensor {key}: {dtype} {shape} needs {need} bytes but its data_offsets span {e - b}"
        )
    return b, e


def check_header(header: dict, data_size: int, path: Path, error=BaseModelError) -> None:
    """Validate a parsed safetensors header against a data section of
    ``data_size`` bytes, at least as strictly as the safetensors library:
    ``__metadata__`` a map of strings; every entry exactly ``dtype`` (a known
    code), ``shape`` (non-negative ints) and ``data_offsets`` ``[b, e]`` with
    ``e - b = prod(shape) * itemsize``; sorted by offset the tensors tile
    ``[0, data_size)`` exactly: contiguous, no gap, no overlap, in bounds."""
    meta = header.get("__metadata__", {})
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad(error, path, "__metadata__ is not a map of strings")
    spans = sorted(
        (*_check_entry(key, info, path, error), key) for key, info in header.items() if key != "__metadata__"
    )
    # Overlaps first (two tensors sharing bytes is the worse news), then gaps.
    for (_, e0, k0), (b, _, key) in zip(spans, spans[1:]):
        if b < e0:
            raise _bad(error, path, f"tensor {key} overlaps tensor {k0} (bytes {b}..{e0})")
    pos = 0
    for b, e, key in spans:
        if b != pos:
            raise _bad(error, path, f"tensor {key} starts at byte {b}, leaving a gap of {b - pos} bytes")
        pos = e
    if pos != data_size:
        if pos > data_size:
            raise _bad(
                error, path, f"truncated: the header needs {pos} bytes of data, the file has {data_size}"
            )
        raise _bad(error, path, f"{data_size - pos} bytes after the last tensor")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_safetensors_header(path: Path, error=BaseModelError) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file, validated (:func:`check_header`).

    Every reader goes through this: base shards and adapter files alike. A
    file shorter than its header says (a truncated download or copy), a
    malformed or inconsistent header, a non-regular file: an error naming the
    file, of class ``error``.
    """
    path = Path(path)
    size = _regular_size(path, error)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(error, path, f"truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise _bad(error, path, f"header length {n} but file has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror or e}") from None
    try:
        if not raw.startswith(b"{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(raw, parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(error, path, f"bad header ({type(e).__name__})") from None
    check_header(header, size - 8 - n, path, error)
    return header, 8 + n


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def dtype_str(self, key: str) -> str:
        return self._f.get_slice(key).get_dtype()

    def get(self, key: str, check_finite: bool = False) -> torch.Tensor:
        try:
            t = self._f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.error(self.path, f"cannot read tensor {key} (corrupt or truncated file): {e}") from e
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self.error(self.path, f"tensor {key} has non-finite values (nan or inf)")
        return t


def check_output_finite(t: torch.Tensor, key: str) -> torch.Tensor:
    """``t`` (an output tensor about to be written) when it is all finite;
    else an :class:`OutputError` naming the tensor. Called on each computed
    tensor as it is written, so the check costs no extra pass over a file."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise OutputError(
            key,
            f"the output tensor would hold nan or inf ({str(t.dtype).removeprefix('torch.')}): an input "
            "holds them or the result overflows its dtype; nothing was written",
        )
    return t


def safetensors_metadata(provenance: dict | None = None) -> dict[str, str]:
    """Metadata for a file we write: ``format: pt`` (transformers requires it)
    plus the provenance, less its timestamp, as one JSON string."""
    meta = {"format": "pt"}
    if provenance is not None:
        # The wall-clock time lives in loramix.json only: with it here, the same
        # inputs could never give byte-identical weight files.
        record = {k: v for k, v in provenance.items() if k != "created"}
        meta["loramix"] = json.dumps(record, sort_keys=True)
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


def read_into(src, info, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's bytes from the open file ``src`` into ``out`` (a tensor
    of ``info``'s shape and dtype, typically reused across tensors; a fresh
    one when None) with ``readinto``: one copy from the page cache, and no
    mmap whose touched pages would count towards the process's memory for
    the rest of the file. ``info`` is a :class:`~loramix.io.model_folder.TensorInfo`
    (absolute ``start``, ``nbytes``, ``shape``, safetensors ``dtype`` code)."""
    buf = torch.empty(info.shape, dtype=ST_DTYPES[info.dtype]) if out is None else out
    view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if info.nbytes else memoryview(b"")
    src.seek(info.start)
    got = src.readinto(view)
    while got < info.nbytes:  # short reads are allowed
        n = src.readinto(view[got:])
        if not n:
            raise BaseModelError(Path(src.name), f"truncated while reading tensor {info.key}")
        got += n
    return buf
