"""Outputs and cache entries are on the disk before they exist (fsync).

A power loss cannot be staged in a test; what can be checked is that the
page cache holds nothing of an output unwritten once it is in place: Linux's
``cachestat`` (6.5 and later) counts a file's dirty pages and those under
write-back, and both are 0 only for a file whose data has reached the disk.
Without the fsync a file written a moment ago through the page cache is
still dirty (write-back starts after 30 s).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.io.outputs import atomic_output_dir, atomic_write
from loramix.scenario.cache import MARKER, Cache

from .factories import make_peft_adapter, save_base, tiny_gpt2

_CACHESTAT = 451  # the syscall's number, the same on every architecture (Linux 6.5)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def unwritten(path: Path) -> int:
    """Pages of ``path`` in the page cache not yet on the disk (dirty or
    being written back); len 0: to the end of the file."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat", str(path))
    finally:
        os.close(fd)
    return st.dirty + st.writeback


@pytest.fixture(autouse=True)
def _cachestat_works(tmp_path):
    """Skip where ``cachestat`` is missing, or where a synced file stays
    dirty (tmpfs, whose pages never reach a disk)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cachestat is Linux's")
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        os.fsync(f.fileno())
    try:
        left = unwritten(probe)
    except OSError as e:
        pytest.skip(f"no cachestat here ({e.strerror})")
    probe.unlink()
    if left:
        pytest.skip("a synced file stays dirty on this file system")


def _all_written(folder: Path) -> dict[str, int]:
    """``{file: unwritten pages}`` of the files under ``folder`` that have any."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    return {str(p.relative_to(folder)): n for p in files if (n := unwritten(p))}


def test_a_merged_model_is_on_the_disk_when_it_exists(tmp_path, capsys):
    """``loramix sum``'s output folder (shards, config, ``loramix.json``)."""
    model = tiny_gpt2(seed=0)
    base = save_base(model, tmp_path / "base", max_shard_size="20KB")
    ad = make_peft_adapter(model, tmp_path / "ad", r=2)
    out = tmp_path / "out"
    assert main(["sum", "--no-progress", str(ad), "--into", str(base), "--out", str(out)]) == 0
    assert _all_written(out) == {}


def test_a_single_file_is_on_the_disk_when_it_exists(tmp_path):
    path = tmp_path / "predictors.json"
    with atomic_write(path) as f:
        f.write("{}" * 5000)
    assert unwritten(path) == 0


def test_an_output_folder_written_by_hand_is_on_the_disk(tmp_path):
    """Whatever wrote the files (here plain ``open``), and in sub-folders."""
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(os.urandom(50000))
        (tmp / "b.txt").write_text("b" * 9000)
    assert _all_written(out) == {}


def test_a_cache_entry_is_on_the_disk_when_it_is_trusted(tmp_path):
    """A scenario cache entry that exists (its ``artifact.json``) is used
    as it is by every later run: its files and marker are synced first."""

    def make(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(os.urandom(200000))
        return {"n": 1}

    folder = Cache(tmp_path / "cache").get_or_make("adapter", {"x": 1}, make)
    assert (folder / MARKER).is_file()
    assert _all_written(folder) == {}


def test_a_gguf_import_in_the_cache_is_on_the_disk_when_it_is_used(tmp_path, monkeypatch):
    """A GGUF given as a base is imported into ``$LORAMIX_CACHE_DIR/bases/``
    and used by every later command once it exists."""
    from loramix.gguf_import import resolve_base

    from .test_realmodel import llama_gguf

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_base(llama_gguf(tmp_path / "tiny.gguf", tokenizer=True))
    assert (folder / "model.safetensors").is_file()
    assert _all_written(folder) == {}


def test_a_file_hash_entry_is_on_the_disk_when_it_is_trusted(tmp_path, monkeypatch):
    """An entry of the file-hash cache (``$LORAMIX_CACHE_DIR/sha256/``) is
    taken as the file's sha256 by every later command: a GGUF import's
    folder and a study's given adapters are keyed by it, so one whose bytes
    never reached the disk could name another file's hash."""
    from loramix.io import filehash

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(filehash, "_PENDING", {})
    p = tmp_path / "w.bin"
    p.write_bytes(os.urandom(100000))
    then = os.stat(p).st_mtime - 60  # older than RACY_NS: its hash is remembered
    os.utime(p, (then, then))
    filehash.cached_file_sha256(p)
    (entry,) = (tmp_path / "cache" / "sha256").iterdir()
    assert unwritten(entry) == 0
