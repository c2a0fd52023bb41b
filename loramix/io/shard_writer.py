"""The streaming safetensors writer: a model folder written tensor by tensor.

:class:`ShardWriter` writes one safetensors file in place, never holding it
whole: the header (shapes, dtypes, offsets) is known before any data, so each
tensor goes straight to its offset, and untouched tensors are copied from
file to file (in-kernel where the OS allows). The final metadata (provenance,
whose input hashes are computed while streaming) is rewritten in place at
the end. Header keys are written in a fixed order with compact separators,
so the same tensors and metadata always give the same bytes.

:func:`finish_model_folder` completes an output folder beside the shards: the
index (with the new total size), the base's other files, and ``config.json``'s
dtype when the weights changed dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import BaseModelError
from .safetensors_io import pread_into


class ShardWriter:
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
        if done < nbytes:  # no copy_file_range here (or it gave up): plain reads, at offsets
            self.f.seek(8 + self.header_len + self.pos - nbytes + done)
            block = bytearray(min(64 << 20, nbytes - done))
            while done < nbytes:
                n = pread_into(src, memoryview(block)[: min(len(block), nbytes - done)], start + done)
                if not n:
                    raise BaseModelError(Path(src.name), "truncated while copying")
                self.f.write(memoryview(block)[:n])
                done += n
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


def finish_model_folder(base, tmp: Path, total_bytes: int, out_dtype: torch.dtype | None) -> None:
    """Write what a model folder holds besides its shards into ``tmp``: the
    index of a sharded ``base`` (a :class:`~loramix.io.model_folder.BaseModelFolder`)
    with ``total_size`` updated, its other files and folders copied as they
    are, and ``config.json``'s dtype set to ``out_dtype`` when given."""
    from .model_folder import INDEX_NAME

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
        set_config_dtype(tmp / "config.json", out_dtype)


def set_config_dtype(cfg_path: Path, dtype: torch.dtype) -> None:
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
