"""The operating system's errors, one line each.

A rename the file system refuses (``EXDEV``: a folder of an overlay's lower
layer, as in a container image), a disk that fails a write when it is synced
(``EIO``), a disk that fails a read in loramix's own readers (the same
failure, exit 1, not their refusal), each errno's exit code (the user's to
fix: 2; the machine's: 1), and a sync of the parent folder that fails after
the output is in place. The errors are the kernel's own where a test can make them (a real
overlay mount, as root), else raised by the ``os`` call that the kernel would
fail (``os.fsync``, ``os.rename``) while loramix's code runs unchanged.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.io import outputs
from loramix.io.outputs import TMP_PREFIX

from .factories import make_peft_adapter, mounted, tiny_gpt2

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two real PEFT adapters on a tiny GPT-2."""
    root = tmp_path_factory.mktemp("pair")
    g = tiny_gpt2(seed=0)
    return (
        make_peft_adapter(g, root / "a", seed=1, r=2, lora_alpha=4),
        make_peft_adapter(g, root / "b", seed=2, r=3, lora_alpha=3),
    )


def cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([*map(str, args)])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def fsync_failing(when):
    """``os.fsync`` that raises EIO for a descriptor where ``when(fstat)``
    holds, as a disk does for a write it could not complete."""
    real = os.fsync

    def fsync(fd):
        if when(os.fstat(fd)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    return fsync


def same_file(path: Path):
    st = os.stat(path)
    return lambda s: (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)


# ---- EXDEV: a rename the file system cannot do ---------------------------------------


@pytest.fixture
def overlay(tmp_path):
    """A real overlay mount whose lower layer holds a folder ``out`` with a
    file in it: renaming that folder (or onto it) fails with EXDEV, as in a
    container whose image holds the folder. Skipped where mounting is not
    allowed."""
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower / "out", upper, work, merged):
        d.mkdir(parents=True)
    (lower / "out" / "mine.txt").write_text("the old output\n")
    with mounted(merged, "overlay", f"lowerdir={lower},upperdir={upper},workdir={work}"):
        yield merged


def test_a_forced_output_onto_an_overlay_lower_folder_is_one_line(pair, overlay, capsys):
    """``sum --force`` onto a folder of an overlay's lower layer: the kernel
    refuses the exchange with EXDEV. One line naming the output, exit 2, the
    old output as it was, no temporary. It was a traceback, exit 1."""
    out = overlay / "out"
    code, lines = cli(capsys, "sum", *pair, "--out", out, "--force")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error: "), (code, lines)
    assert str(out) in lines[0] and "cross-device" in lines[0] and "overlay" in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert temporaries(overlay) == []


def _sum_with_the_rename_failing(pair, out: Path, capsys, monkeypatch, err: int):
    """``loramix sum PAIR --out OUT`` where the system has no ``renameat2``
    and ``os.rename`` onto ``out`` raises ``err``: ``(exit code, stderr lines)``."""
    real = os.rename

    def rename(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    monkeypatch.setattr(os, "rename", rename)
    try:
        return cli(capsys, "sum", *pair, "--out", out)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EBUSY], ids=errno.errorcode.get)
def test_a_refused_rename_in_the_locked_rename_is_one_line(pair, tmp_path, capsys, monkeypatch, err):
    """Where the system has no ``renameat2`` the output is renamed by
    ``os.rename`` under a lock; that rename refused by the file system
    (EXDEV; EBUSY, a mount point made there during the run), here raised by
    ``os.rename`` itself, is one line naming the output, exit 2, nothing
    left. It was a traceback, exit 1."""
    out = tmp_path / "out"
    code, lines = _sum_with_the_rename_failing(pair, out, capsys, monkeypatch, err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"loramix: error: {out}: "), (code, lines)
    assert os.strerror(err) in lines[0], lines[0]
    assert not out.exists() and temporaries(tmp_path) == []


def test_an_output_that_is_a_mount_point_is_refused_before_the_work(pair, tmp_path, capsys):
    """``--out`` a mount point (a container's volume, say), with ``--force``:
    a rename cannot replace it (EBUSY). Refused in one line before the work,
    exit 2, the mount as it was. It was a traceback, exit 1, after the work."""
    out = tmp_path / "out"
    out.mkdir()
    with mounted(out, "tmpfs", "size=1m"):
        (out / "theirs").write_text("x")
        code, lines = cli(capsys, "sum", *pair, "--out", out, "--force")
        assert code == 2 and len(lines) == 1, (code, lines)
        assert lines[0].startswith(f"loramix: error: {out}: is a mount point"), lines[0]
        assert [p.name for p in out.iterdir()] == ["theirs"] and temporaries(tmp_path) == []


# ---- EIO: the disk fails a write -----------------------------------------------------


@pytest.mark.parametrize("what", ["folder", "plot"])
def test_an_io_error_when_the_output_is_synced_is_one_line_exit_1(pair, tmp_path, capsys, monkeypatch, what):
    """The disk failing a write that shows only when it is synced (EIO from
    ``fsync`` of a file, before the rename): one line naming the output,
    exit 1 (the machine failed, not the user's input), nothing at the
    target and no temporary. It was a traceback, exit 1."""
    out = tmp_path / ("out" if what == "folder" else "sim.png")
    args = ("sum", *pair, "--out", out) if what == "folder" else ("similarity", *pair, "--plot", out)
    monkeypatch.setattr(os, "fsync", fsync_failing(lambda s: stat.S_ISREG(s.st_mode)))
    code, lines = cli(capsys, *args)
    monkeypatch.undo()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"loramix: error: {out}: "), (code, lines)
    assert "Input/output error" in lines[0] and "disk" in lines[0], lines[0]
    assert not os.path.lexists(out) and temporaries(tmp_path) == []


def test_an_io_error_reading_an_input_names_it(pair, tmp_path, capsys):
    """An adapter whose weights cannot be read (a real EIO: a link to
    ``/proc/self/mem``, whose first page is never mapped) fails as it is
    hashed: one line naming the weights file, exit 1, nothing written. The
    line named no file (``loramix: error: Input/output error``), after a
    traceback on the code before this one."""
    import shutil

    bad = Path(shutil.copytree(pair[0], tmp_path / "bad"))
    (bad / WEIGHTS).unlink()
    (bad / WEIGHTS).symlink_to("/proc/self/mem")
    out = tmp_path / "out"
    code, lines = cli(capsys, "sum", bad, pair[1], "--out", out)
    assert code == 1 and len(lines) == 1, (code, lines)
    assert lines[0].startswith(f"loramix: error: {bad / WEIGHTS}: Input/output error"), lines[0]
    assert not out.exists() and temporaries(tmp_path) == []


def unreadable_copy(pair, tmp_path, name: str) -> Path:
    """The first adapter of ``pair`` copied, its file ``name`` a link to
    ``/proc/self/mem``: reading it is a real EIO (the first page is never
    mapped), and ``stat`` sees a regular file, as a failing disk's file."""
    import shutil

    bad = Path(shutil.copytree(pair[0], tmp_path / "bad"))
    (bad / name).unlink()
    (bad / name).symlink_to("/proc/self/mem")
    return bad


@pytest.mark.parametrize(
    "what", ["weights-similarity", "weights-inspect", "config-sum", "config-similarity", "data-eval"]
)
def test_an_io_error_in_a_reader_is_the_machine_fault(pair, tmp_path, capsys, what):
    """EIO reading an input in loramix's own readers (the safetensors
    header's, the JSON config's, the data file's), which catch the OSError
    and refuse the file: the same line and exit code as the raw EIO that
    reaches the command (above), one line naming the file, exit 1, nothing
    written. The readers said ``<file>: cannot read: Input/output error``,
    exit 2, as for input the user can fix: ``similarity`` so and ``sum``
    exit 1 on the same weights file."""
    file, command = what.split("-")
    out = tmp_path / "out"
    if file == "data":
        from .factories import save_base, tiny_gpt2

        bad = tmp_path / "d.jsonl"
        bad.symlink_to("/proc/self/mem")
        args = (
            "eval",
            "--base",
            save_base(tiny_gpt2(seed=0), tmp_path / "base"),
            "--data",
            bad,
            "--no-progress",
        )
    else:
        name = WEIGHTS if file == "weights" else "adapter_config.json"
        adapter = unreadable_copy(pair, tmp_path, name)
        bad = adapter / name
        args = {"similarity": ("similarity", adapter, pair[1]), "inspect": ("inspect", adapter),
                "sum": ("sum", adapter, pair[1], "--out", out)}[command]  # fmt: skip
    code, lines = cli(capsys, *args)
    assert code == 1 and len(lines) == 1, (code, lines)
    assert lines[0] == (
        f"loramix: error: {bad}: Input/output error; the disk or its file system failed (see the system log: dmesg)"
    ), lines[0]
    assert not out.exists() and temporaries(tmp_path) == []


def test_an_io_error_in_a_reader_is_the_oserror_from_python(pair, tmp_path):
    """From Python the same failure is the OSError (EIO) naming the file, as
    a raw one is; bad input stays :class:`loramix.LoramixError`. It was an
    ``AdapterError`` (``cannot read: Input/output error``)."""
    import loramix

    bad = unreadable_copy(pair, tmp_path, WEIGHTS)
    with pytest.raises(OSError) as e:
        loramix.similarity([bad, pair[1]])
    assert not isinstance(e.value, loramix.LoramixError), repr(e.value)
    assert e.value.errno == errno.EIO and e.value.filename == str(bad / WEIGHTS), repr(e.value)


def test_a_reader_s_refusal_made_on_an_io_error_keeps_it_across_processes(tmp_path):
    """A study's worker sends its error to the parent pickled: an error made
    on the machine's failure arrives with it (``fault``), so the parent's
    command exits 1 too."""
    import pickle

    from loramix.errors import AdapterError

    try:
        Path("/proc/self/mem").read_bytes()
    except OSError as e:
        refusal = AdapterError(tmp_path / "x", f"cannot read: {e.strerror}")
    back = pickle.loads(pickle.dumps(refusal))
    assert back.message == refusal.message and back.fault.errno == errno.EIO, vars(back)
    assert back.fault.filename == str(tmp_path / "x")


# ---- whose each errno is: the user's (exit 2) or the machine's (exit 1) -----------------------

#: errno -> the exit code and the words after the system's own on the line (None: none)
WHOSE = {
    "ENOSPC": (2, "nothing was written"), "EDQUOT": (2, "nothing was written"),
    "EFBIG": (2, "nothing was written"), "EROFS": (2, None), "EACCES": (2, None), "EPERM": (2, None),
    "ENAMETOOLONG": (2, None), "ELOOP": (2, None), "ENOTDIR": (2, None), "EISDIR": (2, None),
    "ENXIO": (2, "a socket, or a device file with no device behind it"),
    "ETXTBSY": (2, "a program runs from it: write elsewhere"),
    "EIO": (1, "the disk or its file system failed"), "EUCLEAN": (1, "the disk or its file system failed"),
    "ESTALE": (1, "the network file system lost track of it"), "ENOTCONN": (1, "mount it again"),
    "ENOMEM": (1, "the machine ran out of memory"), "EMFILE": (1, "ulimit -n"),
    "ENFILE": (1, "the system's table of open files is full"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(WHOSE))
def test_each_errno_on_an_output_is_one_line_with_its_exit_code(pair, tmp_path, capsys, monkeypatch, name):
    """The output's rename failing with each errno (raised by ``os.rename``,
    as in the locked rename above: most have no real way to be provoked
    here): one line naming the output, exit 2 where the user can fix it,
    1 where the machine failed; nothing left. ESTALE, ENOTCONN, EUCLEAN,
    ENOMEM, EMFILE, ENFILE, ENXIO and ETXTBSY were tracebacks."""
    if not hasattr(errno, name):
        pytest.skip(f"no {name} on this system")
    err, (code_wanted, said) = getattr(errno, name), WHOSE[name]
    out = tmp_path / "out"
    code, lines = _sum_with_the_rename_failing(pair, out, capsys, monkeypatch, err)
    assert code == code_wanted and len(lines) == 1, (code, lines)
    line = f"loramix: error: {out}: {os.strerror(err)}"
    if said is None:
        assert lines[0] == line, lines[0]
    else:
        assert lines[0].startswith(f"{line}; ") and said in lines[0], lines[0]
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("name", ["ESTALE", "ENXIO"])
def test_a_reader_s_refusal_goes_by_the_errno(pair, tmp_path, capsys, monkeypatch, name):
    """The config's reader failing with the machine's ESTALE is that failure
    (exit 1), with ENXIO (a socket, a device with none behind it) the
    reader's refusal, exit 2. ESTALE was the refusal, exit 2."""
    import pathlib
    import shutil

    err = getattr(errno, name)
    bad = Path(shutil.copytree(pair[0], tmp_path / "bad"))
    cfg = bad / "adapter_config.json"
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self == cfg:
            raise OSError(err, os.strerror(err))  # a read's error: no file named
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    code, lines = cli(capsys, "similarity", bad, pair[1])
    monkeypatch.undo()
    wanted, said = {"ESTALE": (1, f"{cfg}: Stale file handle; the network file system lost track of it"),
                    "ENXIO": (2, f"{cfg}: cannot read: No such device or address")}[name]  # fmt: skip
    assert code == wanted and len(lines) == 1, (code, lines)
    assert lines[0].startswith(f"loramix: error: {said}"), lines[0]


# ---- the parent folder's fsync, after the rename ------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["new", "replacing"])
def test_a_failed_sync_of_the_folder_after_the_rename_is_a_warning(
    pair, tmp_path, capsys, monkeypatch, force
):
    """The output is renamed into place, then the ``fsync`` of its parent
    folder fails (EIO): the output is whole (every byte synced before the
    rename) and in place, so the command succeeds with one warning line
    naming it. It said ``error`` (and traced back, exit 1) about an output
    that was there, and with ``--force`` the old one already gone."""
    import loramix

    out = tmp_path / "runs" / "out"
    if force:
        assert main(["sum", *map(str, pair), "--out", str(out)]) == 0
    (tmp_path / "runs").mkdir(exist_ok=True)
    monkeypatch.setattr(os, "fsync", fsync_failing(same_file(tmp_path / "runs")))
    code, lines = cli(capsys, "sum", *pair, "--out", out, *(["--force"] if force else []))
    monkeypatch.undo()
    assert code == 0, (code, lines)
    warned = [ln for ln in lines if ln.startswith("loramix: warning: ")]
    assert len(warned) == 1 and str(out) in warned[0] and "Input/output error" in warned[0], lines
    assert not [ln for ln in lines if "error:" in ln or "Traceback" in ln], lines
    assert len(loramix.load_adapter(out).modules) > 0
    assert temporaries(out.parent) == []


def test_a_failed_sync_of_the_folder_after_a_single_file_is_a_warning(pair, tmp_path, capsys, monkeypatch):
    """The same for a single file (``similarity --plot``, written by
    ``atomic_write``): the figure is in place, one warning line, exit 0."""
    out = tmp_path / "sim.png"
    monkeypatch.setattr(os, "fsync", fsync_failing(same_file(tmp_path)))
    code, lines = cli(capsys, "similarity", *pair, "--plot", out)
    monkeypatch.undo()
    assert code == 0, (code, lines)
    warned = [ln for ln in lines if ln.startswith("loramix: warning: ")]
    assert len(warned) == 1 and str(out) in warned[0], lines
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temporaries(tmp_path) == []


def test_a_failed_sync_of_the_folder_after_a_cache_entry_is_a_warning(tmp_path, monkeypatch):
    """A scenario cache entry renamed into place whose kind's folder then
    fails its ``fsync``: the entry is whole, used, and said in a warning; it
    failed the study."""
    from loramix.errors import LoramixWarning
    from loramix.scenario.cache import Cache

    c = Cache(tmp_path / "c")

    def make(tmp):
        (tmp / "v").write_text("1")

    c.get_or_make("thing", {"x": 0}, make)  # makes the kind's folder
    monkeypatch.setattr(os, "fsync", fsync_failing(same_file(tmp_path / "c" / "thing")))
    with pytest.warns(LoramixWarning, match="Input/output error"):
        folder = c.get_or_make("thing", {"x": 1}, make)
    monkeypatch.undo()
    assert (folder / "v").read_text() == "1"
    assert Cache(tmp_path / "c").get_or_make("thing", {"x": 1}, make) == folder


def test_a_failed_sync_of_the_folder_after_a_gguf_import_is_a_warning(tmp_path, monkeypatch):
    """A GGUF given as a base is imported into ``$LORAMIX_CACHE_DIR/bases/``;
    that folder's ``fsync`` failing after the rename: the import is whole,
    used, and said in a warning. It failed the command using the base."""
    from loramix.errors import LoramixWarning
    from loramix.gguf_import import resolve_base

    from .test_realmodel import llama_gguf

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    gguf = llama_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    (tmp_path / "cache" / "bases").mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync_failing(same_file(tmp_path / "cache" / "bases")))
        with pytest.warns(LoramixWarning, match="Input/output error"):
            folder = resolve_base(gguf)
    assert (folder / "model.safetensors").is_file()
    assert resolve_base(gguf) == folder


# ---- a plot under a file -----------------------------------------------------------------


def test_a_plot_under_a_file_names_the_file(pair, tmp_path, capsys):
    """``--plot`` under a file: one line saying that file is not a folder,
    exit 2, before the work. It said ``<file>: File exists`` (mkdir's
    error), after the similarity was computed."""
    (tmp_path / "notes").write_text("x")
    out = tmp_path / "notes" / "sim.png"
    code, lines = cli(capsys, "similarity", *pair, "--plot", out)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert (
        lines[0]
        == f"loramix: error: {tmp_path / 'notes'}: is a file, not a folder: {out} cannot be written inside it"
    )
    assert (tmp_path / "notes").read_text() == "x" and temporaries(tmp_path) == []


# ---- EIO on a factor read lazily, after the header ---------------------------------------


def _lazily_loaded_then_failing(pair, tmp_path):
    """The first adapter of ``pair`` copied and read lazily (its header and
    config only: :func:`~loramix.io.np_factors.load_np_adapter`, as
    ``similarity`` and ``inspect`` read), then its weights file made a link
    to ``/proc/self/mem``: each factor read from then on is a real EIO, as
    from a disk that fails under the data after giving the header."""
    import shutil

    from loramix.io.np_factors import load_np_adapter

    good = Path(shutil.copytree(pair[0], tmp_path / "lazy"))
    ad = load_np_adapter(good, lazy=True)
    (good / WEIGHTS).unlink()
    (good / WEIGHTS).symlink_to("/proc/self/mem")
    return ad, good / WEIGHTS


def test_an_io_error_on_a_lazily_read_factor_is_the_oserror(pair, tmp_path):
    """A factor read lazily whose read fails with EIO raises that OSError,
    naming the weights file, as the header's read at load time does; from
    ``loramix.similarity`` too. ``np.fromfile`` stopped short on the EIO
    without a word: ``cannot read tensor ... (corrupt or truncated file):
    0 of 192 values present``, an AdapterError (exit 2) with no fault."""
    import numpy as np

    import loramix

    ad, weights = _lazily_loaded_then_failing(pair, tmp_path)
    factor = next(iter(ad.modules.values())).B
    with pytest.raises(OSError) as e:
        np.asarray(factor)
    assert not isinstance(e.value, loramix.LoramixError), repr(e.value)
    assert e.value.errno == errno.EIO and e.value.filename == str(weights), repr(e.value)
    with pytest.raises(OSError) as e:
        loramix.similarity([ad, pair[1]])
    assert not isinstance(e.value, loramix.LoramixError), repr(e.value)
    assert e.value.errno == errno.EIO and e.value.filename == str(weights), repr(e.value)


def test_a_lazily_read_factor_the_user_can_fix_is_refused_as_at_load_time(pair, tmp_path):
    """A lazily read factor whose file is now a folder (EISDIR, the user's
    to fix) is the refusal the header's reader makes for an OSError,
    ``cannot read: Is a directory``, an AdapterError with no fault. Guards
    the new read: the old one said ``corrupt or truncated file: [Errno 21]
    ...`` here."""
    import shutil

    import numpy as np

    from loramix.errors import AdapterError
    from loramix.io.np_factors import load_np_adapter

    good = Path(shutil.copytree(pair[0], tmp_path / "lazy"))
    ad = load_np_adapter(good, lazy=True)
    (good / WEIGHTS).unlink()
    (good / WEIGHTS).mkdir()
    with pytest.raises(AdapterError) as e:
        np.asarray(next(iter(ad.modules.values())).B)
    assert e.value.message == f"{good / WEIGHTS}: cannot read: Is a directory", e.value.message
    assert e.value.fault is None


def test_an_io_error_on_a_factor_read_during_similarity_is_one_line_exit_1(
    pair, tmp_path, capsys, monkeypatch
):
    """``loramix similarity`` whose adapter's factors fail with EIO after its
    header and config were read (the file made a link to ``/proc/self/mem``
    once every adapter is loaded, at ``check_one_base``, which runs
    unchanged: no real disk here fails under the data alone): one line
    naming the weights file, exit 1. It was ``cannot read tensor ...
    (corrupt or truncated file): 0 of 192 values present``, exit 2."""
    import shutil

    from loramix import overlap

    good = Path(shutil.copytree(pair[0], tmp_path / "lazy"))
    real = overlap.check_one_base

    def then_failing(adapters):
        (good / WEIGHTS).unlink()
        (good / WEIGHTS).symlink_to("/proc/self/mem")
        return real(adapters)

    monkeypatch.setattr(overlap, "check_one_base", then_failing)
    code, lines = cli(capsys, "similarity", good, pair[1])
    monkeypatch.undo()
    assert code == 1 and len(lines) == 1, (code, lines)
    assert lines[0] == (
        f"loramix: error: {good / WEIGHTS}: Input/output error; the disk or its file system failed "
        "(see the system log: dmesg)"
    ), lines[0]
