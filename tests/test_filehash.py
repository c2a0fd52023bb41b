"""The base's sha256: cached on disk, prefetched while torch loads (loramix/io/filehash.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from loramix.io import filehash
from loramix.io.filehash import (
    HashingStopped,
    cached_file_sha256,
    model_weight_files,
    prefetch,
    prefetch_inputs,
)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(filehash, "_PENDING", {})


def _file(tmp_path, name="w.bin", size=3 << 20, fill=7, age_s=60):
    """A file last modified ``age_s`` seconds ago (younger than RACY_NS: its hash is not remembered)."""
    p = tmp_path / name
    p.write_bytes(bytes([fill]) * size)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_prefetched_hash_is_the_files_and_is_cached(tmp_path):
    p = _file(tmp_path)
    prefetch([p])
    assert cached_file_sha256(p) == _digest(p)
    entries = list((tmp_path / "cache" / "sha256").iterdir())
    assert [e.read_text().strip() for e in entries] == [_digest(p)]  # no temporaries left beside it


def test_an_in_flight_hash_is_waited_for_not_repeated(tmp_path):
    p = _file(tmp_path)
    fut: Future = Future()
    filehash._PENDING[filehash._identity(p)] = fut
    fake = "ab" * 32  # what the prefetching thread will say: proves the file was not hashed again
    threading.Timer(0.2, fut.set_result, (fake,)).start()
    t0 = time.perf_counter()
    assert cached_file_sha256(p) == fake
    assert time.perf_counter() - t0 >= 0.15


def test_a_failed_prefetch_is_hashed_by_the_caller(tmp_path):
    p = _file(tmp_path)
    fut: Future = Future()
    fut.set_exception(OSError("disk went away"))
    filehash._PENDING[filehash._identity(p)] = fut
    assert cached_file_sha256(p) == _digest(p)


def test_stop_abandons_the_wait(tmp_path):
    p = _file(tmp_path)
    filehash._PENDING[filehash._identity(p)] = Future()  # never finishes
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(HashingStopped):
        cached_file_sha256(p, stop)


def test_a_changed_file_is_rehashed(tmp_path):
    p = _file(tmp_path)
    first = cached_file_sha256(p)
    p.write_bytes(b"other bytes")
    assert cached_file_sha256(p) == _digest(p) != first


def test_a_changed_file_whose_mtime_was_put_back_is_rehashed(tmp_path):
    """Rewritten in place, same size, and its mtime put back (``touch -d``,
    ``touch -r``, a sync tool that keeps times): the cache gave the old hash,
    a wrong sha256 in every output's provenance after. The change time,
    which no one can set back, is part of the identity (as in git's index)."""
    p = _file(tmp_path)
    st = p.stat()
    first = cached_file_sha256(p)
    tick = tmp_path / "tick"  # until the file system's clock (coarse: a few ms) moves on from p's change time
    while tick.touch() or tick.stat().st_ctime_ns <= st.st_ctime_ns:
        pass
    with open(p, "r+b") as f:
        f.write(b"\x00")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    key = lambda s: (s.st_ino, s.st_size, s.st_mtime_ns)  # noqa: E731
    assert key(p.stat()) == key(st)  # the old key: inode, size, mtime
    assert cached_file_sha256(p) == _digest(p) != first


def test_a_damaged_entry_is_rehashed(tmp_path):
    """An entry that is not 64 hex digits (a write the disk lost: zeros, or
    another file's bytes) is no hash: the file is hashed again and the entry
    rewritten. One of the right length was taken as the file's sha256."""
    p = _file(tmp_path)
    first = cached_file_sha256(p)
    (entry,) = (tmp_path / "cache" / "sha256").iterdir()
    for damaged in ("\x00" * 64, "z" * 64, first.upper(), first[:63]):
        entry.write_text(damaged + "\n")
        assert cached_file_sha256(p) == first == _digest(p), repr(damaged)
        assert entry.read_text() == first + "\n"


def test_a_just_written_file_is_hashed_but_not_remembered(tmp_path, monkeypatch):
    """A rewrite within the file system's timestamp tick could keep the
    identity (size, inode, mtime): a file this young is never cached, so
    rewriting it in place, same size, same mtime, gives the new hash."""
    # "This young" is 2 s; a loaded machine could take that long between the write and the
    # hash, and the file was then old enough to be remembered. The rule is the same with 10 min.
    monkeypatch.setattr(filehash, "RACY_NS", 600 * 10**9)
    p = _file(tmp_path, age_s=0)
    st = p.stat()
    assert cached_file_sha256(p) == _digest(p)
    assert not (tmp_path / "cache" / "sha256").exists()
    p.write_bytes(bytes([8]) * st.st_size)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same identity as before
    assert cached_file_sha256(p) == _digest(p)


def test_weight_files_are_those_the_base_hashes(tmp_path):
    from loramix.io.model_folder import BaseModelFolder

    from .factories import save_base, tiny_gpt2

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    save_base(tiny_gpt2(), single)
    save_base(tiny_gpt2(), sharded, max_shard_size="40KB")
    for folder in (single, sharded):
        base = BaseModelFolder(folder)
        assert [p.name for p in model_weight_files(folder)] == sorted(base.weight_files)
        prefetch_inputs(base=folder)
        assert base.file_sha256s() == {n: _digest(folder / n) for n in base.weight_files}
    assert len(BaseModelFolder(sharded).shards) >= 2


@pytest.mark.parametrize("what", ["missing", "file", "bad_index", "index_not_a_map", "gguf"])
def test_prefetch_of_anything_else_does_nothing(tmp_path, what):
    target = tmp_path / "x"
    if what == "file":
        target.write_text("{}")
    elif what in ("bad_index", "index_not_a_map"):
        target.mkdir()
        text = "{not json" if what == "bad_index" else json.dumps({"weight_map": [1, 2]})
        (target / "model.safetensors.index.json").write_text(text)
    elif what == "gguf":
        target = tmp_path / "m.gguf"
        target.write_bytes(b"GGUF" + bytes(64))
    assert model_weight_files(target) == []
    prefetch_inputs([target], target)
    prefetch_inputs()
    assert filehash._PENDING == {}


def test_cli_prefetch_happens_before_torch_loads(tmp_path):
    """The sum command starts hashing the base before it imports torch, and a
    merge that fails on its input (no such adapters) still exits 2 at once."""
    from .factories import save_base, tiny_gpt2

    base = tmp_path / "base"
    save_base(tiny_gpt2(), base)
    code = (
        "import sys, threading, loramix.io.filehash as fh\n"
        "orig = fh.prefetch\n"
        "def spy(paths):\n"
        "    paths = list(paths)\n"
        "    print('prefetch', len(paths), 'torch' in sys.modules, flush=True)\n"
        "    orig(paths)\n"
        "fh.prefetch = spy\n"
        "from loramix.cli import main\n"
        f"sys.exit(main(['sum', 'nope1', 'nope2', '--into', {str(base)!r}, '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    env = {"LORAMIX_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout.splitlines()[0] == "prefetch 1 False"
    assert not (tmp_path / "o").exists()


def test_a_training_base_is_hashed_once_then_never(tmp_path, monkeypatch):
    """The provenance of a base (``loramix train`` records it) hashed its
    weights uncached and then again for its identity: SmolLM2's 538 MB read
    twice on the first training and once on every later one. Now once, then
    from the cache, with the same record."""
    from loramix.io import st_header
    from loramix.models import base_provenance

    from .factories import save_base, tiny_llama

    base = save_base(tiny_llama(), tmp_path / "base")
    t = time.time() - 60  # older than RACY_NS: its hash may be remembered
    os.utime(base / "model.safetensors", (t, t))
    read = []
    real = st_header.file_sha256

    def counted(path, *a, **kw):
        read.append(os.path.basename(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(st_header, "file_sha256", counted)
    monkeypatch.setattr(filehash, "file_sha256", counted)
    first = base_provenance(base)
    assert read == ["model.safetensors"]
    assert base_provenance(base) == first and read == ["model.safetensors"]
    digest = _digest(base / "model.safetensors")
    assert first["sha256"] == hashlib.sha256(b"model.safetensors" + digest.encode()).hexdigest()


def test_train_starts_hashing_its_base_before_torch_loads(tmp_path):
    """``loramix train`` records its base's sha256: the hash starts on another
    thread before torch's import (as ``sum`` and ``merge`` do), once the data
    and the base's config.json have been read."""
    from .factories import save_base, tiny_llama

    base = save_base(tiny_llama(), tmp_path / "base")
    code = (
        "import os, sys, loramix.io.filehash as fh\n"
        "def spy(paths):\n"
        "    print('prefetch', [os.path.basename(p) for p in paths], 'torch' in sys.modules, flush=True)\n"
        "    os._exit(0)\n"
        "fh.prefetch = spy\n"
        "from loramix.cli import main\n"
        f"sys.exit(main(['train', '--base', {str(base)!r}, '--data', 'synthetic:arith?n=20', '--steps', '1',\n"
        f"               '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    env = {"LORAMIX_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.splitlines()[:1] == ["prefetch ['model.safetensors'] False"], (r.stdout, r.stderr)
