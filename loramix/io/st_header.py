"""Safetensors headers, read and validated without torch.

Every reader of a safetensors file goes through :func:`read_safetensors_header`
(base shards, adapters, the numpy factor reader of the similarity path): the
header is checked at least as strictly as the safetensors library does it
(offsets contiguous from 0, in bounds, non-overlapping, each range exactly
shape x dtype size, no gap, known dtypes only, a regular file) before any
tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path

from ..errors import BaseModelError, LoramixError

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
    """The sha256 of the file at ``path``, as hex. A read that fails (the
    disk's ``EIO``) raises its OSError naming ``path``: a read's error names
    no file, and the CLI's line said only ``Input/output error``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            while block := f.read(chunk):
                h.update(block)
        except OSError as e:
            if e.filename is None:
                e.filename = str(path)
            raise
    return h.hexdigest()
