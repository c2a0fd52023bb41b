"""The machine failing under a file that loramix falls back on when it cannot
read it (a record taken as absent, an identity as unknown): the failure is
said (its OSError: exit 1 from the CLI), not taken for a missing file, where
the fallback changes what the user sees (a held-out check that passes, a
trained-base check skipped, a null identity). Each EIO is the kernel's: the
file made a link to ``/proc/self/mem``, whose first page is never mapped.
The user's own errors (a missing file) still fall back, as their tests pin.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from .factories import make_peft_adapter, save_base, tiny_gpt2

MEM = "/proc/self/mem"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real PEFT adapter on a tiny GPT-2 and that model saved as a base folder."""
    root = tmp_path_factory.mktemp("faults")
    g = tiny_gpt2(seed=0)
    return make_peft_adapter(g, root / "a", seed=1, r=2, lora_alpha=4), save_base(g, root / "base")


def failing(folder: Path, name: str, tmp_path: Path, text: str | None = None) -> tuple[Path, Path]:
    """``folder`` copied into ``tmp_path`` with its file ``name`` (written
    with ``text`` first where given) a link to ``/proc/self/mem``: the copy
    and that file."""
    copy = Path(shutil.copytree(folder, tmp_path / folder.name))
    f = copy / name
    f.unlink(missing_ok=True)
    f.symlink_to(MEM)
    return copy, f


def assert_eio(e: pytest.ExceptionInfo, file: Path) -> None:
    import loramix

    assert not isinstance(e.value, loramix.LoramixError), repr(e.value)
    assert e.value.errno == errno.EIO and e.value.filename == str(file), (repr(e.value), e.value.filename)


def test_a_record_the_disk_fails_is_the_fault_not_no_record(made, tmp_path):
    """An adapter's ``loramix.json`` whose read fails (EIO): its OSError,
    from the record's one reader and so from the held-out check's split and
    the trained-base check. It was read as no record: no training split
    (``{}``, the held-out check passing) and no recorded base."""
    from loramix.heldout import training_split
    from loramix.io.provenance import read_record

    adapter, rec = failing(made[0], "loramix.json", tmp_path)
    for read in (read_record, training_split):
        with pytest.raises(OSError) as e:
            read(adapter)
        assert_eio(e, rec)


def test_a_training_file_the_disk_fails_is_the_fault_not_an_unknown_split(made, tmp_path):
    """The file an adapter's record says it was trained on fails its read
    (EIO): the held-out check's split raises that OSError. It was an
    unknown split (``it cannot be read as it was for training
    (DataError)``: under ``held_out`` a refusal, exit 2; else a note)."""
    from loramix.heldout import training_split

    data = tmp_path / "train.jsonl"
    data.symlink_to(MEM)
    adapter = Path(shutil.copytree(made[0], tmp_path / "a"))
    record = {"method": "train", "parameters": {"seed": 0}, "inputs": [{"kind": "data", "path": str(data)}]}
    (adapter / "loramix.json").write_text(json.dumps(record))
    unknown: dict = {}
    with pytest.raises(OSError) as e:
        training_split(adapter, unknown)
    assert_eio(e, data)
    assert unknown == {}


def test_a_config_the_disk_fails_is_the_fault_not_no_trained_base(made, tmp_path):
    """The trained-base check reading an adapter's ``adapter_config.json``
    (its ``base_model_name_or_path``, where it has no record) that fails
    (EIO): its OSError. It was read as no name: the check skipped."""
    from loramix.trained_base import other_base

    adapter, cfg = failing(made[0], "adapter_config.json", tmp_path)
    with pytest.raises(OSError) as e:
        other_base(adapter, made[1])
    assert_eio(e, cfg)


@pytest.mark.parametrize("what", ["base_identity", "base_keys"])
def test_a_base_the_disk_fails_is_the_fault_not_no_identity(made, tmp_path, what):
    """A base folder whose ``config.json`` fails its read (EIO): its
    identity and keys (what the trained-base check compares) raise the
    OSError. They were None and an empty set: another base not told."""
    from loramix import trained_base

    base, cfg = failing(made[1], "config.json", tmp_path)
    with pytest.raises(OSError) as e:
        getattr(trained_base, what)(base)
    assert_eio(e, cfg)


@pytest.mark.parametrize("what", ["adapter_sha256", "adapter_identity_or_none"])
def test_weights_the_disk_fails_are_the_fault_not_no_adapter(made, tmp_path, what, monkeypatch):
    """An adapter's weights file failing its read (EIO) as it is hashed:
    the OSError, from the two readers that say None where no adapter is
    there (``eval --format json``'s ``adapter_sha256`` and
    ``adapter_identity``, ``fit``'s "has changed since it was evaluated").
    They said None: a null in the JSON, "evaluate it again" in fit."""
    from loramix.io import filehash

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    adapter, weights = failing(made[0], "adapter_model.safetensors", tmp_path)
    with pytest.raises(OSError) as e:
        getattr(filehash, what)(adapter)
    assert_eio(e, weights)


def test_the_user_s_missing_files_still_fall_back(made, tmp_path):
    """A missing record, config or base config still reads as none, as
    before (the fallbacks' own tests pin the rest)."""
    from loramix.heldout import training_split
    from loramix.io.provenance import read_record
    from loramix.trained_base import base_identity, base_keys, other_base

    adapter = Path(shutil.copytree(made[0], tmp_path / "a"))
    assert read_record(adapter) is None and training_split(adapter) == {}
    (adapter / "adapter_config.json").unlink()
    assert other_base(adapter, made[1]) is None
    assert base_identity(tmp_path / "nothing") is None and base_keys(tmp_path / "nothing") == set()


def test_eval_held_out_over_a_record_the_disk_fails_is_one_line_exit_1(made, tmp_path, capsys):
    """``loramix eval --held-out`` of an adapter whose ``loramix.json``
    fails its read (EIO): one line naming that file, exit 1. It was
    ``--held-out: <file>: not a readable record, ...``, exit 2, as for a
    damaged record the user can replace."""
    from loramix.cli import main

    from .factories import write_jsonl

    adapter, rec = failing(made[0], "loramix.json", tmp_path)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    capsys.readouterr()
    args = ["eval", "--base", made[1], "--adapter", adapter, "--data", data, "--held-out", "--no-progress"]
    code = main([str(a) for a in args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, (code, lines)
    assert lines[0] == (
        f"loramix: error: {rec}: Input/output error; the disk or its file system failed (see the system log: dmesg)"
    ), lines[0]


# ---- the scenario cache and report folder --------------------------------------------------


def _entry(tmp_path):
    """A real scenario cache entry (``thing``, ``{"x": 0}``) holding ``v.json``:
    ``(cache, its folder, make)``."""
    from loramix.scenario.cache import Cache

    def make(tmp):
        (tmp / "v.json").write_text('{"v": 1}')

    c = Cache(tmp_path / "c")
    return c, c.get_or_make("thing", {"x": 0}, make), make


@pytest.mark.parametrize("what", ["marker", "old-json", "hashed"])
def test_a_cache_entry_the_disk_fails_is_the_fault_not_damage(tmp_path, what):
    """A cache entry whose file fails its read (EIO): its marker
    (``artifact.json``), a JSON file of an entry an earlier loramix made (its
    marker lists no files), or a file hashed against the marker (its size
    recorded as 0, /proc/self/mem's, so the hash is what reads it). The
    OSError naming that file, and the entry left as it is. Each was damage,
    "damaged (... cannot be read: Input/output error / is not valid JSON):
    made again", written anew into the disk that failed."""
    from loramix.scenario.cache import MARKER, Cache

    c, folder, make = _entry(tmp_path)
    marker = json.loads((folder / MARKER).read_text())
    if what == "marker":
        bad = folder / MARKER
    else:
        bad = folder / "v.json"
        if what == "old-json":
            del marker["files"]
        else:
            marker["files"]["v.json"]["size"] = 0
        (folder / MARKER).write_text(json.dumps(marker))
    bad.unlink()
    bad.symlink_to(MEM)
    with pytest.raises(OSError) as e:
        Cache(tmp_path / "c").get_or_make("thing", {"x": 0}, make)
    assert_eio(e, bad)
    assert bad.is_symlink() and sorted(p.name for p in folder.iterdir()) == [MARKER, "v.json"]


def test_a_report_folder_the_disk_fails_is_the_fault_not_another_report(tmp_path):
    """``scenario run --out`` onto a folder whose ``report.json`` fails its
    read (EIO): the OSError naming it. It was "exists and is not a report of
    this scenario; pass --force to replace it", exit 2."""
    from loramix.scenario.runner import check_report_dir

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").symlink_to(MEM)
    with pytest.raises(OSError) as e:
        check_report_dir(out, "study", force=False)
    assert_eio(e, out / "report.json")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_gguf_import_the_disk_fails_is_the_fault_not_imported_again(tmp_path, monkeypatch, name):
    """A GGUF's import in the user cache whose config or weights fail their
    read (EIO) when it is looked up: the OSError naming that file, the
    import left as it is. It was taken for a cut-short import and imported
    again (the link replaced), into the disk that failed."""
    from loramix.gguf_import import resolve_base

    from .test_realmodel import llama_gguf

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    gguf = llama_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    folder = resolve_base(gguf)
    bad = folder / name
    bad.unlink()
    bad.symlink_to(MEM)
    with pytest.raises(OSError) as e:
        resolve_base(gguf)
    assert_eio(e, bad)
    assert bad.is_symlink()


def _mem_link(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.symlink_to(MEM)
    return path


def test_a_base_file_the_disk_fails_is_the_fault_not_no_gguf(tmp_path):
    """A base given as a file whose first read fails (EIO): its OSError from
    the GGUF sniff, where it was "not a GGUF file" and the base then refused
    as no model folder (or, named ``.gguf``, read again further on)."""
    from loramix.gguf_import import is_gguf, means_gguf

    for name in ("base", "base.gguf"):
        f = _mem_link(tmp_path / name)
        for sniff in (is_gguf, means_gguf):
            with pytest.raises(OSError) as e:
                sniff(f)
            assert_eio(e, f)


def test_a_fit_file_the_disk_fails_is_the_fault_not_no_predictors(tmp_path):
    """``--fit FILE`` whose read fails (EIO): its OSError from the sniff
    between a predictors file and a fit.json, where it was "not a predictors
    file"; and a ``report.json`` beside a fit that fails: its OSError, where
    the study's recipe was taken as unknown (no warning that the adapters
    differ from the study's)."""
    from loramix.interference import is_predictors_file, study_recipe

    f = _mem_link(tmp_path / "fit.json")
    with pytest.raises(OSError) as e:
        is_predictors_file(f)
    assert_eio(e, f)
    fit = tmp_path / "other" / "fit.json"
    fit.parent.mkdir()
    report = _mem_link(fit.parent / "report.json")
    with pytest.raises(OSError) as e:
        study_recipe({"scenario": "s"}, fit, "lora")
    assert_eio(e, report)
    report.unlink()  # the user's own absence still falls back
    assert study_recipe({"scenario": "s"}, fit, "lora") is None


def test_a_layout_cache_entry_the_disk_fails_is_the_fault_not_a_miss(made, tmp_path, monkeypatch):
    """The cached layout of a base's modules (``$LORAMIX_CACHE_DIR/layouts``)
    whose read fails (EIO): its OSError, where it was a miss, the model's
    skeleton built again and its answer written into the disk that failed.
    A missing entry is still built again."""
    from loramix.io.model_folder import _cached_skeleton

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = (made[1] / "config.json").read_bytes()
    built = _cached_skeleton(made[1], config)
    (entry,) = (tmp_path / "cache" / "layouts").glob("*.json")
    _mem_link(entry)
    with pytest.raises(OSError) as e:
        _cached_skeleton(made[1], config)
    assert_eio(e, entry)
    entry.unlink()
    assert _cached_skeleton(made[1], config) == built
