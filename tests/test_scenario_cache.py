"""The scenario cache under damage: an entry changed after it was made is
found, said in one line and made again, never read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loramix.scenario.cache import MARKER, Cache, make_key

ROOT = Path(__file__).resolve().parents[1]


def _make(made: list):
    def make(tmp):
        made.append(1)
        (tmp / "result.json").write_text(json.dumps({"ppl": 12.5, "tokens": 40}))
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(
            b"\x08" + bytes(7) + b'{"a":1}' + bytes(64)
        )
        return {"n": 1}

    return make


def _rewrite_same_size(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-3] ^= 1
    p.write_bytes(bytes(b))


DAMAGE = {
    "truncated": (lambda e: os.truncate(e / "result.json", 5), "result.json is 5 bytes"),
    "zero bytes": (
        lambda e: os.truncate(e / "adapter" / "adapter_model.safetensors", 0),
        "adapter/adapter_model.safetensors is 0 bytes",
    ),
    "same size, other bytes": (
        lambda e: _rewrite_same_size(e / "adapter" / "adapter_model.safetensors"),
        "differs from what was written",
    ),
    "wrong JSON": (lambda e: (e / "result.json").write_text("[1, 2]"), "result.json is 6 bytes"),
    "a file missing": (lambda e: (e / "result.json").unlink(), "result.json is missing"),
    "marker empty": (lambda e: os.truncate(e / MARKER, 0), "artifact.json is empty"),
    "marker not JSON": (
        lambda e: (e / MARKER).write_text('{"kind": "eval", "ke'),
        "artifact.json is not valid JSON",
    ),
    "another entry's marker": (
        lambda e: (e / MARKER).write_text(json.dumps({"kind": "eval", "key": "0" * 64})),
        "artifact.json is another artifact's",
    ),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_entry_is_made_again_in_one_line(tmp_path, capsys, how):
    """Before, an entry was trusted as long as its artifact.json existed: a
    truncated result.json was a JSONDecodeError traceback, a damaged
    adapter file a refusal naming the cache's file (or, of the same size,
    read as it was)."""
    spec, made = {"x": 1}, []
    first = Cache(tmp_path / "c").get_or_make("eval", spec, _make(made), label="lora/0/a")
    damage, words = DAMAGE[how]
    damage(first)
    capsys.readouterr()
    c = Cache(tmp_path / "c")
    again = c.get_or_make("eval", spec, _make(made), label="lora/0/a")
    err = capsys.readouterr().err
    assert again == first and len(made) == 2 and [e.status for e in c.log] == ["miss"]
    assert json.loads((again / "result.json").read_text()) == {"ppl": 12.5, "tokens": 40}
    line = f"the cached eval {make_key('eval', spec)[:24]} (lora/0/a) in {tmp_path / 'c'} is damaged"
    assert err.count("\n") == 1 and line in err and words in err and "made again" in err, err
    # mended: the next lookup is a hit, and nothing else is left beside the entry
    c2 = Cache(tmp_path / "c")
    assert c2.get_or_make("eval", spec, _make(made)) == first and len(made) == 2
    assert [e.status for e in c2.log] == ["hit"] and capsys.readouterr().err == ""
    assert [p.name for p in (tmp_path / "c" / "eval").iterdir()] == [first.name]


def test_a_large_file_rewritten_in_place_is_found_through_the_hash_cache(tmp_path, monkeypatch, capsys):
    """A large file is hashed at a lookup through loramix.io.filehash's cache
    (a warm rerun stats it instead of reading GBs again): rewritten at the
    same size after a hit, it is still found (its times changed)."""
    import loramix.scenario.cache as sc
    from loramix.io import filehash

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "hashes"))
    monkeypatch.setattr(sc, "HASH_CACHED_FROM", 0)  # every file "large"
    monkeypatch.setattr(filehash, "RACY_NS", 0)  # a file just written is cached too
    spec, made = {"x": 1}, []
    first = Cache(tmp_path / "c").get_or_make("eval", spec, _make(made))
    hit = Cache(tmp_path / "c")
    assert hit.get_or_make("eval", spec, _make(made)) == first and [e.status for e in hit.log] == ["hit"]
    assert any((tmp_path / "hashes").rglob("*")), "the hashes were not cached: nothing tested"
    _rewrite_same_size(first / "adapter" / "adapter_model.safetensors")
    c = Cache(tmp_path / "c")
    c.get_or_make("eval", spec, _make(made))
    assert len(made) == 2 and [e.status for e in c.log] == ["miss"]
    assert "differs from what was written" in capsys.readouterr().err


def test_an_entry_that_is_a_file_is_made_again(tmp_path, capsys):
    spec, made = {"x": 1}, []
    c = Cache(tmp_path / "c")
    target = c.path("eval", make_key("eval", spec))
    target.parent.mkdir(parents=True)
    target.write_text("not an entry")
    assert not c.has("eval", make_key("eval", spec))
    assert c.get_or_make("eval", spec, _make(made)) == target and len(made) == 1
    assert "is damaged (it is a file, not a folder)" in capsys.readouterr().err
    assert (target / "result.json").is_file()


def test_an_entry_of_an_earlier_loramix_is_checked_for_json_that_does_not_parse(tmp_path, capsys):
    """An entry whose marker lists no files (made before they were listed)
    is still used as it is, unless one of its JSON files does not parse."""
    spec, made = {"x": 1}, []
    p = Cache(tmp_path / "c").get_or_make("eval", spec, _make(made))
    rec = json.loads((p / MARKER).read_text())
    del rec["files"]
    (p / MARKER).write_text(json.dumps(rec))
    c = Cache(tmp_path / "c")
    assert c.get_or_make("eval", spec, _make(made)) == p and len(made) == 1 and c.log[0].status == "hit"
    os.truncate(p / "result.json", 3)
    c = Cache(tmp_path / "c")
    assert c.get_or_make("eval", spec, _make(made)) == p and len(made) == 2 and c.log[0].status == "miss"
    assert "(result.json is not valid JSON): made again" in capsys.readouterr().err
    assert "files" in json.loads((p / MARKER).read_text())  # the remade one lists them


def test_a_damaged_entry_under_fresh_is_remade_once(tmp_path, capsys):
    spec, made = {"x": 1}, []
    p = Cache(tmp_path / "c").get_or_make("eval", spec, _make(made))
    os.truncate(p / "result.json", 0)
    c = Cache(tmp_path / "c", fresh=True)
    assert c.get_or_make("eval", spec, _make(made)) == p and c.get_or_make("eval", spec, _make(made)) == p
    assert len(made) == 2 and [e.status for e in c.log] == ["fresh", "hit"] and capsys.readouterr().err == ""


TINY = """
name = "tiny"
[base.build]
steps = 4
[domains.a]
data = "synthetic:arith"
train = 16
eval = 8
[domains.b]
data = "synthetic:units"
train = 16
eval = 8
[adapters]
rank = 2
alpha = 8
steps = 2
batch = 8
max_len = 48
"""


def test_a_study_on_a_damaged_cache_remakes_the_entry_and_reports_the_same(tmp_path):
    """A finished study, one evaluation's result.json then truncated (a copy
    cut short, a disk error): the rerun makes that evaluation again and
    writes the same tables. Before: a JSONDecodeError traceback, exit 1."""
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out):
        return subprocess.run([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(out),
                               "--cache", str(tmp_path / "c"), "--jobs", "1", "--quiet"],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip

    assert run(tmp_path / "first").returncode == 0
    evals = sorted((tmp_path / "c" / "eval").iterdir())
    os.truncate(evals[0] / "result.json", 20)
    p = run(tmp_path / "second")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and f"eval {evals[0].name}" in p.stderr and "is damaged" in p.stderr
    for f in ("results.csv", "evaluations.csv", "similarity_per_module.csv", "composability.csv"):
        assert (tmp_path / "first" / f).read_bytes() == (tmp_path / "second" / f).read_bytes(), f
    log = (tmp_path / "second" / "cache_log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in log].count("miss") == 1


def test_a_cache_that_is_a_dangling_symlink_is_one_line_before_anything(monkeypatch, capsys, tmp_path):
    """$LORAMIX_CACHE a symlink to nothing: ``scenario check`` said ok, and
    the run failed with '<link>: File exists' (mkdir of the link's name).
    Both now say what it is, before printing or writing anything."""
    from loramix.cli import main

    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    link = tmp_path / "cache-link"
    link.symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("LORAMIX_CACHE", str(link))
    out = tmp_path / "o"
    for argv in (
        ["scenario", "check", str(scen)],
        ["scenario", "run", str(scen), "--out", str(out), "--quiet"],
    ):
        assert main(argv) == 2
        o, err = capsys.readouterr()
        assert o == "" and err.count("\n") == 1, (o, err)
        assert err.startswith(
            f"loramix: error: {link}: is a symlink to {tmp_path / 'nowhere'}, which does not exist"
        )
    assert not out.exists() and not (tmp_path / "nowhere").exists()


def test_a_kind_folder_that_is_a_file_is_named(tmp_path):
    """``<cache>/eval`` a file (or a dangling link): the run said only
    '<cache>/eval: File exists'."""
    from loramix.errors import UsageError

    c = Cache(tmp_path / "c")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval").write_text("x")
    with pytest.raises(
        UsageError, match=r"eval: is not a folder: the scenario cache keeps its eval entries there"
    ):
        c.get_or_make("eval", {"x": 1}, _make([]))
    assert (tmp_path / "c" / "eval").read_text() == "x"


def _hash_calls(monkeypatch) -> list:
    """The files that loramix.io.st_header.file_sha256 reads from now on (the
    real function, counted)."""
    from loramix.io import st_header

    calls, real = [], st_header.file_sha256
    monkeypatch.setattr(
        st_header, "file_sha256", lambda p, *a, **k: calls.append(Path(p).name) or real(p, *a, **k)
    )
    return calls


def test_a_file_found_intact_is_not_read_again_until_its_stat_changes(tmp_path, monkeypatch, capsys):
    """A lookup hashed every small file of an entry at every lookup (0.7 s
    per GB of them on a warm rerun): one found intact is remembered by its
    inode, size and times (loramix.scenario.verified) and only stat'ed next
    time; a rewrite at the same size changes its times and is found. A file
    changed in the last RACY_NS is not remembered (a rewrite within the
    timestamp tick could keep its stat). New behaviour: on the old code the
    second lookup hashed both files again."""
    from loramix.io import filehash

    spec, made = {"x": 1}, []
    first = Cache(tmp_path / "c").get_or_make("eval", spec, _make(made))
    calls = _hash_calls(monkeypatch)
    racy = Cache(tmp_path / "c")  # just written: hashed, not remembered
    racy.get_or_make("eval", spec, _make(made))
    racy.save_verified()
    assert sorted(calls) == ["adapter_model.safetensors", "result.json"] and not racy.verified.rows
    monkeypatch.setattr(filehash, "RACY_NS", 0)
    for _ in range(2):
        c = Cache(tmp_path / "c")
        assert c.get_or_make("eval", spec, _make(made)) == first and [e.status for e in c.log] == ["hit"]
        c.save_verified()
    assert len(calls) == 4, calls  # hashed by the first of the two, only stat'ed by the second
    _rewrite_same_size(first / "adapter" / "adapter_model.safetensors")
    c = Cache(tmp_path / "c")
    c.get_or_make("eval", spec, _make(made))
    assert len(made) == 2 and [e.status for e in c.log] == ["miss"]
    assert "adapter/adapter_model.safetensors differs from what was written" in capsys.readouterr().err


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_cache_verify_hashes_what_the_memos_vouch_for(tmp_path, monkeypatch, large):
    """Damage that keeps a file's stat (bits rotten under the file system;
    here the memo's row forged to the damaged file's stat) passes a lookup,
    as the memo says. ``loramix cache verify`` hashes every file whatever
    the memos say (the stat-keyed one of small files, loramix.io.filehash's
    of large ones), names the entry, exits 1 and forgets the rows: the next
    run finds the damage and makes the entry again. New command."""
    from click.testing import CliRunner

    import loramix.scenario.cache as sc
    from loramix.cli.cache_cmd import command
    from loramix.io import filehash
    from loramix.io.st_header import file_sha256

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "hashes"))
    monkeypatch.setattr(filehash, "RACY_NS", 0)
    if large:
        monkeypatch.setattr(sc, "HASH_CACHED_FROM", 0)
    spec, made, root = {"x": 1}, [], tmp_path / "c"
    first = Cache(root).get_or_make("eval", spec, _make(made))
    ok = CliRunner().invoke(command, ["verify", "--cache", str(root)])
    assert ok.exit_code == 0 and "verified 1 entry (0.0 MB)" in ok.output and "none damaged" in ok.output
    f = first / "adapter" / "adapter_model.safetensors"
    before = file_sha256(f)
    _rewrite_same_size(f)
    c = Cache(root)  # the rot the memo cannot see: its row forged to the new stat
    if large:
        filehash._store(filehash._identity(f), before)
    else:
        c.verified.learn(f"eval/{first.name}/adapter/adapter_model.safetensors", f.stat(), before)
        c.save_verified()
    assert Cache(root).get_or_make("eval", spec, _make(made)) == first and len(made) == 1
    bad = CliRunner().invoke(command, ["verify", "--cache", str(root)])
    assert bad.exit_code == 1, bad.output
    assert (
        f"damaged: eval/{first.name} (adapter/adapter_model.safetensors differs from what was written"
        in bad.output
    )
    assert "1 damaged, to be made again by the next run" in bad.output
    again = Cache(root)
    again.get_or_make("eval", spec, _make(made))
    assert len(made) == 2 and [e.status for e in again.log] == ["miss"] and file_sha256(f) == before
    assert CliRunner().invoke(command, ["verify", "--cache", str(root)]).exit_code == 0
