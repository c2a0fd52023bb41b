"""A GGUF file's layout checked against its size, before a reader trusts it.

``gguf.GGUFReader`` takes every count and offset in the header at its word:
an array length of 2**40 past the end of a 50 kB file made it loop, adding
an empty view per element, until it held gigabytes; tensors that overlap
or share bytes were accepted. :func:`check_layout` walks the header with
every read bounded by the file's size (so its work and memory are at most
linear in the file), and refuses in one line what llama.cpp's loader refuses:

* a header, key, value or tensor entry that runs past the end of the file;
* a GGUF version other than 2 or 3 (the reader's), a big-endian file, an
  unknown value type, an array of arrays, a key that is not UTF-8;
* a tensor with 0 or more than 4 dimensions (``GGML_MAX_DIMS``), a zero
  dimension, an unknown ggml type, rows that are not whole blocks;
* a tensor whose data (``n_elements * type_size / block_size`` bytes at
  ``data_start + offset``) runs past the end, or overlaps another's.

GGUF layout (v2/v3, little-endian): ``magic u32, version u32, n_tensors u64,
n_kv u64``; ``n_kv`` times ``key: string, type: u32, value``; ``n_tensors``
times ``name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset:
u64``; the data at the next multiple of ``general.alignment`` (default 32).
A string is ``length: u64, bytes``; an array ``elem_type: u32, count: u64,
elements``.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import NamedTuple

from .errors import BaseModelError

VERSIONS = (2, 3)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
TRUNCATED = "not a valid GGUF file (corrupt or truncated)"
# GGUFValueType: fixed-width scalars by id -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
              7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}  # fmt: skip


class Layout(NamedTuple):
    """What the walk learnt: ``kv_types`` maps each key to its value type id
    (an array's as ``(9, element type id)``); ``data_start`` is where the
    tensor data begin."""

    kv_types: dict
    data_start: int


class _Walk:
    """A cursor over the file's bytes; every read checks it stays inside."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise BaseModelError(self.path, f"{TRUNCATED}: past the end of the file ({self.size} bytes) "
                                 f"reading {what} from byte {self.pos}")  # fmt: skip

    def read(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def skip_string(self, what: str) -> int:
        """Move past a string; its start."""
        n = self.read("Q", f"the length of {what}")
        self.need(n, what)
        self.pos += n
        return self.pos - n

    def text(self, what: str) -> str:
        start = self.skip_string(what)
        try:
            return bytes(self.buf[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise BaseModelError(
                self.path, f"not a valid GGUF file: {what} at byte {start} is not UTF-8 text"
            ) from None

    def skip_strings(self, n: int, what: str) -> None:
        """Move past ``n`` strings (a vocabulary: 100,000 of them, so inlined)."""
        buf, pos, size, length = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        for _ in range(n):  # each takes 8 bytes at least: the loop ends within the file
            if pos + 8 > size:
                pos = size + 1
                break
            pos += 8 + length(buf, pos)[0]
        if pos > size:
            self.need(size - self.pos + 1, what)  # raises, at the first string's byte
        self.pos = pos


def check_layout(path: str | os.PathLike) -> Layout:
    """Walk the GGUF at ``path`` (a regular file that starts with the magic)
    and refuse a damaged one in one line, naming it; see the module doc."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise BaseModelError(path, f"truncated GGUF: {size} bytes, fewer than its 24-byte header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return _walk(_Walk(view, path))
            finally:
                view.release()


def _walk(w: _Walk) -> Layout:
    w.pos = 4
    version = w.read("I", "the version")
    if version & 0xFFFF == 0:  # as the reader tells: 2 or 3 written big-endian
        raise BaseModelError(w.path, "is a big-endian GGUF, which loramix cannot import")
    if version not in VERSIONS:
        raise BaseModelError(w.path, f"is GGUF version {version}; loramix reads versions 2 and 3")
    n_tensors, n_kv = w.read("QQ", "the counts")
    kv_types, alignment = {}, DEFAULT_ALIGNMENT
    for i in range(n_kv):  # each key takes 12 bytes at least: a bad count ends in 'runs past the end'
        key = w.text(f"metadata key {i} of {n_kv}")
        kind = w.read("I", f"the type of {key}")
        kv_types[key] = _skip_value(w, key, kind)
        if key == "general.alignment":
            alignment = _alignment(w, kind)
    tensors = [_tensor_entry(w, i, n_tensors) for i in range(n_tensors)]
    data_start = -(-w.pos // alignment) * alignment
    _check_extents(w, tensors, data_start)
    return Layout(kv_types, data_start)


def _skip_value(w: _Walk, key: str, kind: int):
    """Move past one value of type ``kind``; its type id (an array's as a pair)."""
    if kind in _SCALARS:
        w.read(_SCALARS[kind], f"the value of {key}")
        return kind
    if kind == STRING:
        w.skip_string(f"the value of {key}")
        return kind
    if kind != ARRAY:
        raise BaseModelError(w.path, f"not a valid GGUF file: metadata key {key} has value type {kind}, which GGUF "
                             "does not define")  # fmt: skip
    elem, n = w.read("IQ", f"the array header of {key}")
    if elem in _SCALARS:  # fixed width: one bounds check, however long
        w.need(n * struct.calcsize(_SCALARS[elem]), f"the {n} values of {key}")
        w.pos += n * struct.calcsize(_SCALARS[elem])
    elif elem == STRING:
        w.skip_strings(n, f"the {n} strings of {key}")
    elif elem == ARRAY:
        raise BaseModelError(
            w.path, f"metadata key {key} is an array of arrays, which llama.cpp does not read"
        )
    else:
        raise BaseModelError(w.path, f"not a valid GGUF file: metadata key {key} is an array of type {elem}, "
                             "which GGUF does not define")  # fmt: skip
    return (ARRAY, elem)


def _alignment(w: _Walk, kind: int) -> int:
    if kind != 4:
        raise BaseModelError(w.path, f"general.alignment has type {TYPE_NAMES.get(kind)}; GGUF says UINT32")
    a = struct.unpack_from("<I", w.buf, w.pos - 4)[0]
    if a == 0 or a & (a - 1):
        raise BaseModelError(w.path, f"general.alignment {a} is not a power of two")
    return a


def _tensor_entry(w: _Walk, i: int, n: int) -> tuple:
    """``(name, n_bytes, offset)`` of the tensor entry at the cursor."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    name = w.text(f"the name of tensor {i} of {n}") or f"#{i} (no name)"
    n_dims = w.read("I", f"the dimension count of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise BaseModelError(w.path, f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = w.read(f"{n_dims}Q", f"the shape of tensor {name}")
    dims = (dims,) if n_dims == 1 else dims
    kind, offset = w.read("IQ", f"the type and offset of tensor {name}")
    if 0 in dims:
        raise BaseModelError(w.path, f"tensor {name} has a zero dimension (shape {list(dims)})")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise BaseModelError(
            w.path, f"tensor {name} has ggml type {kind}, which gguf does not know"
        ) from None
    if dims[0] % block:
        raise BaseModelError(w.path, f"tensor {name}: rows of {dims[0]} values are not whole blocks of "
                             f"{block} ({GGMLQuantizationType(kind).name})")  # fmt: skip
    elements = 1
    for d in dims:  # Python integers: a product past 2**64 cannot wrap round to a small size
        elements *= d
    return name, elements // block * type_size, offset


def _check_extents(w: _Walk, tensors: list, data_start: int) -> None:
    """Each tensor's bytes lie inside the file, and no two overlap."""
    end_prev, name_prev = data_start, None
    for name, n_bytes, offset in sorted(tensors, key=lambda t: t[2]):
        start, end = data_start + offset, data_start + offset + n_bytes
        if end > w.size:
            raise BaseModelError(w.path, f"{TRUNCATED}: past the end of the file ({w.size} bytes) "
                                 f"in tensor {name}'s data (bytes {start} to {end})")  # fmt: skip
        if name_prev is not None and start < end_prev:
            raise BaseModelError(w.path, f"not a valid GGUF file: tensors {name_prev} and {name} overlap in the file "
                                 f"(bytes {start} to {end_prev})")  # fmt: skip
        end_prev, name_prev = max(end, end_prev), name
