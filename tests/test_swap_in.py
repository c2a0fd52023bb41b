"""Replacing a folder in two renames (where ``renameat2``'s exchange is not
to be had; a scenario cache entry made again) is all or nothing: the second
rename failing puts the old folder back (:func:`loramix.io.outputs.swap_in`).

The failure is injected (``os.rename`` / ``os.replace`` raise on the second
call): the code under test is loramix's own rollback, run for real.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loramix.io import outputs
from loramix.io.outputs import PAYLOAD, TMP_PREFIX, atomic_output_dir, new_temporary


def _second_rename_fails(monkeypatch, err: int = errno.EACCES) -> list:
    """From now on, the second call of ``os.rename`` or ``os.replace`` (the two
    count together) raises ``err`` naming its target; returns the calls."""
    calls: list = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def fails(src, dst, *a, _real=real, **k):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(err, os.strerror(err), str(dst))
            return _real(src, dst, *a, **k)

        monkeypatch.setattr(os, name, fails)
    return calls


def _contents(folder: Path) -> dict:
    return {q.name: q.read_text() for q in folder.iterdir()}


def test_a_forced_output_whose_second_rename_fails_keeps_the_old_one(tmp_path, monkeypatch):
    """``--force`` over an existing output on a system without ``renameat2``
    (:func:`~loramix.io.outputs._locked_rename`): the old output is renamed
    into the temporary, then the new one into place; that second rename
    failing (EACCES) must leave the old output as it was, and no temporary.
    The old code left no output at all: the old one lay in the temporary
    and was removed with it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)  # the system lacks it: the locked check and rename
    with pytest.raises(OSError) as e:
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
            calls = _second_rename_fails(monkeypatch)
    assert e.value.errno == errno.EACCES and str(out) in str(e.value), e.value
    assert len(calls) >= 2
    monkeypatch.undo()
    assert _contents(out) == {"model.safetensors": "old"}
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(TMP_PREFIX)] == []
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    with atomic_output_dir(out, force=True) as tmp:  # let through: the new one replaces it
        (tmp / "model.safetensors").write_text("new")
    assert _contents(out) == {"model.safetensors": "new"}
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(TMP_PREFIX)] == []


def test_a_cache_entry_made_again_whose_second_rename_fails_is_kept(tmp_path, monkeypatch):
    """A scenario cache entry made again (``redo``, or a stale folder without
    its marker) is swapped in by two renames (``Cache._swap``); the second
    failing must leave the old entry in place. The old code left none: the
    old one lay in the temporary, removed with it."""
    from loramix.scenario.cache import Cache

    target = tmp_path / "entry"
    target.mkdir()
    (target / "artifact.json").write_text("old")
    owned = new_temporary(tmp_path, target.name)
    new = owned / PAYLOAD
    new.mkdir()
    (new / "artifact.json").write_text("new")
    _second_rename_fails(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError) as e:
        Cache._swap(new, target)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert _contents(target) == {"artifact.json": "old"}
    assert _contents(new) == {"artifact.json": "new"}  # still in its temporary, removed with it
