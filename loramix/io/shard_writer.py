"""The streaming safetensors writer: a model folder written tensor by tensor.

:class:`ShardWriter` writes one safetensors file in place, never holding it
whole: the header (shapes, dtypes, offsets) is known before any data, so each
tensor goes straight to its offset, and untouched tensors are copied from
file to file (in-kernel where the OS allows). A large file's data bypasses
the page cache (``O_DIRECT``, through two aligned buffers that a thread
writes out in turn) where the file system allows it. The final metadata (provenance,
whose input hashes are computed while streaming) is rewritten in place at
the end. Header keys are written in a fixed order with compact separators,
so the same tensors and metadata always give the same bytes.

:func:`finish_model_folder` completes an output folder beside the shards: the
index (with the new total size), the base's other files, and ``config.json``'s
dtype when the weights changed dtype.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import BaseModelError
from .pread import pread_into

#: a shard with at least this many bytes of tensor data is written with
#: ``O_DIRECT`` where the file system takes it (:func:`direct_wanted`)
DIRECT_MIN_BYTES = 256 << 20
#: the aligned buffer that direct writes go through, and the size of each write
DIRECT_CHUNK = 16 << 20
#: data of at least this many bytes is written from where it lies when it can be
ZERO_COPY_MIN = 1 << 20
#: file offsets, lengths and the buffer's address of direct writes are multiples
#: of this (a page: every block size Linux file systems use divides it)
ALIGN = 4096


class ShardWriter:
    """Writes one safetensors file tensor by tensor, never holding it whole.

    The header (shapes, dtypes, offsets) is known up front; it is written with
    some slack so that the final metadata (provenance, whose input hashes are
    computed while streaming) can be rewritten in place at the end. Trailing
    spaces in the header are allowed by the format (safetensors pads the same
    way). Every write names its offset (``pwrite``): no file position is
    shared between the ways bytes reach the file.

    A large file's data goes to the disk directly (:class:`_DirectWrites`),
    not through the page cache: on Linux a buffered write copies every byte
    into the page cache, which costs a 7B merge more CPU than its arithmetic
    (reports/benchmarks.md, scale), and leaves gigabytes of dirty pages
    that push the base out of memory. The bytes are the same either way.
    """

    SLACK = 512

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...], int]],
        metadata: dict,
        direct: bool | None = None,
    ):
        self.path = path
        self.entries = entries
        self.header: dict = {}
        off = 0
        for key, code, shape, nbytes in entries:
            self.header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        self.data_size = off
        first = self._encode(metadata)
        # a large file's data starts on a page (spaces pad the header): then a
        # tensor in memory that starts where it will in the file within its
        # page is written from where it lies (:meth:`phases`)
        unit = ALIGN if self.data_size >= DIRECT_MIN_BYTES else 8
        self.header_len = -(-(8 + len(first) + self.SLACK) // unit) * unit - 8
        self.data_start = 8 + self.header_len
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.direct: _DirectWrites | None = None
        try:
            self._write_header(first)
            if direct is None:
                direct = direct_wanted(self.data_size)
            if direct:
                self.direct = _DirectWrites.open(
                    path, self.fd, self.data_start, self.data_start + self.data_size
                )
        except BaseException:
            self.close()
            raise
        self.pos = 0  # within the data section
        self.i = 0

    def _encode(self, metadata: dict) -> bytes:
        return json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()

    def _write_header(self, raw: bytes) -> None:
        if len(raw) > self.header_len:
            raise RuntimeError(f"{self.path}: final safetensors header outgrew its reserved space")
        _pwrite_all(
            self.fd, struct.pack("<Q", self.header_len) + raw + b" " * (self.header_len - len(raw)), 0
        )

    def _next(self, nbytes: int) -> int:
        """The file offset of the next tensor, which has ``nbytes``."""
        key, _, _, expected = self.entries[self.i]
        if nbytes != expected:
            raise RuntimeError(f"{self.path}: tensor {key} has {nbytes} bytes, expected {expected}")
        self.i += 1
        self.pos += nbytes
        return self.data_start + self.pos - nbytes

    def _pieces(self, at: int, nbytes: int):
        """``(offset, length, direct)`` pieces of the ``nbytes`` at file
        offset ``at``: the direct ones lie in the direct range."""
        d = self.direct
        lo, hi = (d.lo, d.hi) if d is not None else (at + nbytes, at + nbytes)
        end = at + nbytes
        for a, b, direct in (
            (at, min(end, lo), False),
            (max(at, lo), min(end, hi), True),
            (max(at, hi), end, False),
        ):
            if a < b:
                yield a, b - a, direct

    def phases(self) -> list[int]:
        """Where in its page each entry's data starts in the file (a buffer
        holding a tensor at that place within a page is written with no
        copy)."""
        return [(self.data_start + self.header[key]["data_offsets"][0]) % ALIGN for key, *_ in self.entries]

    def write_tensor(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        buf = memoryview(t.view(torch.uint8).numpy())  # a view: no copy
        at = self._next(buf.nbytes)
        for off, n, direct in self._pieces(at, buf.nbytes):
            piece = buf[off - at : off - at + n]
            if direct:
                self.direct.put(piece, off, t.data_ptr() + off - at)
            else:
                _pwrite_all(self.fd, piece, off)

    def copy_bytes(self, src, start: int, nbytes: int) -> None:
        """Copy ``nbytes`` at ``start`` of the open file ``src`` (in-kernel
        where the OS allows it, or straight into the direct buffer)."""
        at = self._next(nbytes)
        for off, n, direct in self._pieces(at, nbytes):
            if direct:
                self.direct.read_from(src, start + off - at, n, off)
            else:
                _copy_range(src, start + off - at, self.fd, off, n)

    def finish_data(self) -> None:
        if self.i != len(self.entries):
            raise RuntimeError(f"{self.path}: wrote {self.i} of {len(self.entries)} tensors")
        if self.direct is not None:
            self.direct.finish()
            self.direct = None

    def finish(self, metadata: dict) -> None:
        self._write_header(self._encode(metadata))
        self.close()

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
            self.direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def direct_wanted(nbytes: int) -> bool:
    """Whether a file with ``nbytes`` of tensor data is written with
    ``O_DIRECT``: ``LORAMIX_DIRECT_IO`` says ``0`` (never), ``1`` (always)
    or ``auto`` (the default: from ``DIRECT_MIN_BYTES`` on, where the copy
    into the page cache costs seconds and a small file's write-back would not)."""
    how = os.environ.get("LORAMIX_DIRECT_IO", "auto").strip().lower()
    if how in ("0", "1"):
        return how == "1"
    return nbytes >= DIRECT_MIN_BYTES


class _DirectWrites:
    """The bytes of file offsets ``[lo, hi)`` (both multiples of ``ALIGN``)
    of a file, written with ``O_DIRECT``: gathered in order in an aligned
    buffer of ``DIRECT_CHUNK`` bytes, which a thread writes out while the
    next one fills (two buffers), so that a caller waits for the disk only
    when it falls two buffers behind. The last write may be shorter, still a
    multiple of ``ALIGN``. Data that lies in memory as far into a page as
    it goes in the file is written from where it lies (:meth:`put`). The
    bytes outside the range (the header, the first and last partial pages)
    go through the page cache; the two never share a page, so neither sees
    the other's stale copy."""

    def __init__(self, fd: int, cached_fd: int, lo: int, hi: int):
        self.fd, self.cached_fd, self.lo, self.hi = fd, cached_fd, lo, hi
        self.refused = False
        size = min(DIRECT_CHUNK, hi - lo)
        self.bufs = [mmap.mmap(-1, size) for _ in range(2)]  # page aligned
        self.views = [memoryview(b) for b in self.bufs]
        self.writes: list[Future | None] = [None, None]  # each buffer's write in flight
        self.k = 0  # the buffer being filled
        self.view = self.views[0]
        self.at = lo  # the file offset of its first byte
        self.fill = 0
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="loramix-direct")

    @classmethod
    def open(cls, path: Path, cached_fd: int, data_start: int, data_end: int) -> _DirectWrites | None:
        """Direct writes of the aligned part of ``[data_start, data_end)``
        (``cached_fd``: the file open without ``O_DIRECT``, for a fallback);
        None where there is none, or the file system refuses ``O_DIRECT``
        (tmpfs, some network and FUSE file systems)."""
        lo = -(-data_start // ALIGN) * ALIGN
        hi = data_end // ALIGN * ALIGN
        flag = getattr(os, "O_DIRECT", 0)
        if hi <= lo or not flag:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        try:
            return cls(fd, cached_fd, lo, hi)
        except BaseException:
            os.close(fd)
            raise

    def _room(self, off: int) -> int:
        if off != self.at + self.fill:
            raise RuntimeError(f"direct write at {off}, expected {self.at + self.fill}")
        if self.fill == len(self.view):
            self._hand_over()
        return len(self.view) - self.fill

    def _hand_over(self) -> None:
        """Start writing the full buffer; go on in the other one once its
        last write is done (its error, if any, raised here)."""
        self.writes[self.k] = self.thread.submit(self._write, self.view, self.fill, self.at)
        self.at += self.fill
        self.fill = 0
        self.k ^= 1
        self.view = self.views[self.k]
        if self.writes[self.k] is not None:
            self.writes[self.k].result()
            self.writes[self.k] = None

    def put(self, data: memoryview, off: int, addr: int | None = None) -> None:
        """``data`` for file offset ``off``. Where its address ``addr`` is
        as far into its page as ``off`` is, its whole pages are written from
        where they lie, in this thread (no copy: the caller's memory is
        free again on return); else, and for the partial pages at its ends,
        it is copied into the buffer."""
        if addr is None or len(data) < ZERO_COPY_MIN or (addr - off) % ALIGN:
            return self._copy(data, off)
        head = -off % ALIGN
        self._copy(data[:head], off)
        mid = (len(data) - head) // ALIGN * ALIGN
        if self.fill:  # the buffer now ends on a page: out with it
            self._hand_over()
        self._write(data[head : head + mid], mid, off + head)
        self.at += mid
        self._copy(data[head + mid :], off + head + mid)

    def _copy(self, data: memoryview, off: int) -> None:
        done = 0
        while done < len(data):
            n = min(self._room(off + done), len(data) - done)
            self.view[self.fill : self.fill + n] = data[done : done + n]
            self.fill += n
            done += n

    def read_from(self, src, start: int, nbytes: int, off: int) -> None:
        """``nbytes`` of the open file ``src`` at ``start``, read straight
        into the buffer for file offset ``off``."""
        done = 0
        while done < nbytes:
            n = min(self._room(off + done), nbytes - done)
            got = pread_into(src, self.view[self.fill : self.fill + n], start + done)
            if not got:
                raise BaseModelError(Path(src.name), "truncated while copying")
            self.fill += got
            done += got

    def _write(self, view: memoryview, fill: int, at: int) -> None:
        """``view[:fill]`` at file offset ``at``: in the writing thread for a
        full buffer, in the caller's for :meth:`put`'s whole pages."""
        done = 0
        while done < fill and not self.refused:
            try:
                n = os.pwrite(self.fd, view[done:fill], at + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # a device that wants larger blocks than ALIGN (the descriptor stays
                # open until close(): another thread may be writing through it)
                self.refused = True
                break
            done += n
            if n <= 0 or n % ALIGN:
                break
        if done < fill:  # refused, or cut short off a block boundary: the page cache takes the rest
            _pwrite_all(self.cached_fd, view[done:fill], at + done)

    def finish(self) -> None:
        """Write what is left; every byte of the range must have been given."""
        if self.at + self.fill != self.hi:
            raise RuntimeError(f"direct writes ended at {self.at + self.fill}, expected {self.hi}")
        if self.fill:
            self._hand_over()
        for w in self.writes:
            if w is not None:
                w.result()
        self.close()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Wait for the writes in flight (their buffers and file stay open
        until then; errors are the caller's to have raised), then free
        everything."""
        self.thread.shutdown(wait=True)
        self.writes = [None, None]
        self._close_fd()
        for v, b in zip(self.views, self.bufs):
            try:
                v.release()
                b.close()
            except BufferError:  # a slice still held (by an error's traceback): freed with it
                pass
        self.views, self.bufs = [], []


def _pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


def _copy_range(src, start: int, fd: int, off: int, nbytes: int) -> None:
    """``nbytes`` of the open file ``src`` at ``start`` to ``fd`` at ``off``:
    in-kernel (``copy_file_range``) where the OS allows it, else by reads."""
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    while done < nbytes and copy_range is not None:
        try:
            n = copy_range(src.fileno(), fd, nbytes - done, start + done, off + done)
        except OSError:
            break
        if n <= 0:
            break
        done += n
    block = bytearray(min(64 << 20, nbytes - done)) if done < nbytes else None
    while done < nbytes:
        n = pread_into(src, memoryview(block)[: min(len(block), nbytes - done)], start + done)
        if not n:
            raise BaseModelError(Path(src.name), "truncated while copying")
        _pwrite_all(fd, memoryview(block)[:n], off + done)
        done += n


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
