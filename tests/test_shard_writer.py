"""The streaming shard writer: direct (``O_DIRECT``) writes give the same
bytes as writes through the page cache, wherever the tensors' edges fall
against the pages and the buffer, and fail cleanly."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading

import pytest
import torch
from safetensors import safe_open

from loramix.io import shard_writer as sw
from loramix.io.shard_writer import ALIGN, ShardWriter, direct_wanted


def _direct_ok(folder) -> bool:
    probe = folder / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def folder(tmp_path):
    if not _direct_ok(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    return tmp_path


# sizes around the page: tensors that end inside the header's page, span
# pages, fill exactly whole ones, sit wholly inside the last partial page
SIZES = [5, ALIGN, 3 * ALIGN + 7, 70_001, 0, 1, 2 * ALIGN, 123_457, 9, ALIGN - 1, 40_000, 17]


def _write(path, tensors, src_path, direct, copied=frozenset(), meta_pad=0):
    entries = [(f"t{i}", "U8", (t.numel(),), t.numel()) for i, t in enumerate(tensors)]
    w = ShardWriter(path, entries, {"pad": "x" * meta_pad}, direct=direct)
    used = w.direct is not None
    try:
        with open(src_path, "rb") as src:
            for i, t in enumerate(tensors):
                if i in copied:
                    w.copy_bytes(src, 11 * i + 3, t.numel())
                else:
                    w.write_tensor(t)
        w.finish_data()
        w.finish({"pad": "y" * (meta_pad + 40)})
    finally:
        w.close()
    return path.read_bytes(), used


def _case(folder, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in SIZES]
    src_path = folder / f"src{seed}"
    raw = torch.randint(0, 256, (400_000,), dtype=torch.uint8, generator=g).numpy().tobytes()
    src_path.write_bytes(raw)
    copied = {i for i in range(len(SIZES)) if (i + seed) % 3 == 0}
    for i in copied:  # what the copied tensors hold once written
        n = SIZES[i]
        tensors[i] = torch.tensor(list(raw[11 * i + 3 : 11 * i + 3 + n]), dtype=torch.uint8)
    return tensors, src_path, copied


@pytest.mark.parametrize("chunk", [ALIGN, 3 * ALIGN, 16 * ALIGN, 64 << 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_writes_give_the_buffered_bytes(folder, monkeypatch, chunk, seed):
    monkeypatch.setattr(sw, "DIRECT_CHUNK", chunk)
    tensors, src_path, copied = _case(folder, seed)
    pad = 37 * seed  # moves every tensor against the pages
    ref, used = _write(folder / "ref.safetensors", tensors, src_path, False, copied, pad)
    assert not used
    got, used = _write(folder / "direct.safetensors", tensors, src_path, True, copied, pad)
    assert used
    assert hashlib.sha256(got).digest() == hashlib.sha256(ref).digest()
    with safe_open(str(folder / "direct.safetensors"), "pt") as f:
        assert f.metadata() == {"pad": "y" * (pad + 40)}
        for i, t in enumerate(tensors):
            assert torch.equal(f.get_tensor(f"t{i}"), t), i


def test_no_whole_page_means_no_direct_writes(folder):
    t = torch.arange(100, dtype=torch.uint8)
    _, used = _write(folder / "small.safetensors", [t], folder / "small.safetensors", True)
    assert not used


def test_direct_wanted(monkeypatch):
    monkeypatch.delenv("LORAMIX_DIRECT_IO", raising=False)
    assert direct_wanted(sw.DIRECT_MIN_BYTES) and not direct_wanted(sw.DIRECT_MIN_BYTES - 1)
    monkeypatch.setenv("LORAMIX_DIRECT_IO", "0")
    assert not direct_wanted(1 << 40)
    monkeypatch.setenv("LORAMIX_DIRECT_IO", "1")
    assert direct_wanted(1)
    monkeypatch.setenv("LORAMIX_DIRECT_IO", "auto")
    assert not direct_wanted(1)


def _failing_pwrite(monkeypatch, err, after=0):
    """``os.pwrite`` failing with ``err`` on files open with ``O_DIRECT``
    after ``after`` successful writes there."""
    real = os.pwrite
    seen = []

    def pwrite(fd, data, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            seen.append(off)
            if len(seen) > after:
                raise OSError(err, os.strerror(err))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


def test_a_refused_direct_write_falls_back_to_the_page_cache(folder, monkeypatch):
    """A device that wants larger blocks than a page refuses the writes
    (EINVAL): the rest goes through the page cache, the same bytes."""
    monkeypatch.setattr(sw, "DIRECT_CHUNK", 2 * ALIGN)
    tensors, src_path, copied = _case(folder, 4)
    ref, _ = _write(folder / "ref.safetensors", tensors, src_path, False, copied)
    seen = _failing_pwrite(monkeypatch, errno.EINVAL, after=2)
    got, used = _write(folder / "direct.safetensors", tensors, src_path, True, copied)
    assert used and len(seen) == 3  # two written directly, the third refused, none tried after
    assert got == ref


def test_a_failed_direct_write_raises_and_leaves_no_thread(folder, monkeypatch):
    monkeypatch.setattr(sw, "DIRECT_CHUNK", ALIGN)
    tensors, src_path, copied = _case(folder, 5)
    before = {t.name for t in threading.enumerate()}
    _failing_pwrite(monkeypatch, errno.ENOSPC, after=1)
    with pytest.raises(OSError) as e:
        _write(folder / "full.safetensors", tensors, src_path, True, copied)
    assert e.value.errno == errno.ENOSPC
    assert {t.name for t in threading.enumerate()} <= before


def test_a_buffer_at_its_file_place_in_the_page_is_written_without_a_copy(folder, monkeypatch):
    """A tensor whose memory starts as far into a page as its place in the
    file (``ShardWriter.phases``; the engine's read buffers are placed so) is
    written from where it lies, in the caller's thread; the same bytes."""
    from loramix.engine import Buffers

    monkeypatch.setattr(sw, "DIRECT_MIN_BYTES", 0)  # a page-aligned data section
    monkeypatch.setattr(sw, "ZERO_COPY_MIN", 2 * ALIGN)
    monkeypatch.setattr(sw, "DIRECT_CHUNK", 2 * ALIGN)
    tensors, src_path, copied = _case(folder, 6)
    ref, _ = _write(folder / "ref.safetensors", tensors, src_path, False, copied)
    calls = []
    real = sw._DirectWrites._write

    def spy(self, view, fill, at):
        calls.append((threading.current_thread() is threading.main_thread(), fill))
        return real(self, view, fill, at)

    monkeypatch.setattr(sw._DirectWrites, "_write", spy)
    entries = [(f"t{i}", "U8", (t.numel(),), t.numel()) for i, t in enumerate(tensors)]
    path = folder / "direct.safetensors"
    w = ShardWriter(path, entries, {"pad": ""}, direct=True)
    pool = Buffers()
    assert w.data_start % ALIGN == 0
    phases = w.phases()
    assert phases == [(w.data_start + sum(SIZES[:i])) % ALIGN for i in range(len(SIZES))]
    with open(src_path, "rb") as src:
        for i, t in enumerate(tensors):
            if i in copied:
                w.copy_bytes(src, 11 * i + 3, t.numel())
            else:
                buf = pool.get(f"b{i}", t.shape, t.dtype, torch.device("cpu"), phase=phases[i])
                assert not t.numel() or buf.data_ptr() % ALIGN == phases[i]
                w.write_tensor(buf.copy_(t))
    w.finish_data()
    w.finish({"pad": "y" * 40})
    w.close()
    big = [n for i, n in enumerate(SIZES) if i not in copied and n >= 2 * ALIGN]
    assert big and sum(1 for here, _ in calls if here) == len(big)
    # the same data as the buffered file (whose header pads only to 8 bytes)
    with safe_open(str(path), "pt") as f:
        for i, t in enumerate(tensors):
            assert torch.equal(f.get_tensor(f"t{i}"), t), i
    assert path.read_bytes()[w.data_start :] == ref[8 + int.from_bytes(ref[:8], "little") :]
