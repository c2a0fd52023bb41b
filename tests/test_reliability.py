"""The README's promises under bad input, faults and concurrency (issue 11).

Every case drives the CLI as a user would (``loramix.cli.main`` in-process,
or ``python -m loramix`` where a real process is the point: kill -9, two runs
at once, a file-size limit) and asserts exit code 2, ONE line on stderr
naming the file, and nothing left at the target or beside it. Inputs are
real safetensors files written by transformers and PEFT, then damaged the way
a user's file could be.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from loramix.cli import main
from loramix.errors import LoramixError, UsageError
from loramix.io.outputs import PAYLOAD, TMP_PREFIX, atomic_output_dir, remove_stale_temporaries

from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama
from .test_scenario import GOOD

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SHARD = "model.safetensors"
REPO = Path(__file__).resolve().parents[1]


# ---- fixtures and helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny real GPT-2 and Llama bases (one file, and GPT-2 sharded) with
    real PEFT adapters on them."""
    root = tmp_path_factory.mktemp("world")
    gpt2, llama = tiny_gpt2(seed=0), tiny_llama(seed=0)
    return dict(
        gpt2=save_base(gpt2, root / "gpt2"),
        sharded=save_base(gpt2, root / "gpt2_sharded", max_shard_size="20KB"),
        llama=save_base(llama, root / "llama"),
        a=make_peft_adapter(gpt2, root / "a", seed=1, r=2, lora_alpha=4),
        b=make_peft_adapter(gpt2, root / "b", seed=2, r=3, lora_alpha=3),
        la=make_peft_adapter(llama, root / "la", seed=3, r=2, lora_alpha=4),
    )


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def leftovers(out: Path) -> list[str]:
    """Temporaries beside ``out`` (and ``out`` itself if it exists)."""
    names = (
        [p.name for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)] if out.parent.exists() else []
    )
    return names + ([out.name] if os.path.lexists(out) else [])


def assert_refused(code, err, out: Path | None, *names) -> str:
    """Exit 2, one line naming ``names``, no traceback, nothing at or beside ``out``."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error: "), (code, err)
    assert "Traceback" not in err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    if out is not None:
        assert leftovers(out) == [], leftovers(out)
    return lines[0]


def rewrite_header(path: Path, fn) -> None:
    """Apply ``fn`` to the parsed safetensors header of ``path`` and write it
    back (data bytes untouched)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(fields)
    (folder / CONFIG).write_text(json.dumps(cfg))


def sum_into(capsys, base, out, *adapters, extra=()):
    return cli(capsys, "sum", "--no-progress", *adapters, "--into", base, "--out", out, *extra)


# ---- 1. a target that appears meanwhile is never replaced ----------------------------------


def test_target_appearing_during_the_run_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoramixError, match="appeared while loramix was writing"):
        with atomic_output_dir(out) as tmp:
            (tmp / "result").write_text("mine")
            out.mkdir()  # another run finishes first
            (out / "theirs").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_output_dir(out, force=True) as tmp:  # with --force it is replaced
        (tmp / "result").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["result"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _python_m(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "loramix", *map(str, args)], cwd=kw.pop("cwd", None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="surrogateescape", env=env, **kw)  # fmt: skip


def test_two_runs_into_one_out(world, tmp_path):
    """Two ``sum`` processes started together into one ``--out``: exactly one
    succeeds, the other exits 2 naming it, and the survivor is complete
    (byte-identical to a run alone)."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["sum", "--no-progress", world["a"], world["b"], "--into", world["sharded"]]
    p = _python_m(*args, "--out", ref)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    procs = [_python_m(*args, "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert_refused(2, err, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (ref / name).read_bytes()


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    """A GPT-2 base of about 60 MB: a sum into it takes a while to write."""
    root = tmp_path_factory.mktemp("big")
    model = tiny_gpt2(seed=0, n_layer=8, n_embd=256, vocab_size=64)
    return dict(base=save_base(model, root / "base"), adapter=make_peft_adapter(model, root / "ad", r=2))


def test_kill_9_leftovers_are_removed_by_the_next_run(big_base, tmp_path):
    out = tmp_path / "out"
    args = ["sum", "--no-progress", big_base["adapter"], "--into", big_base["base"], "--dtype", "float16"]
    for _ in range(5):  # catch the run while it writes (retry if it was faster than the poll)
        p = _python_m(*args, "--out", out)
        stale = []
        while p.poll() is None and not stale:
            stale = [q for q in tmp_path.glob(f"{TMP_PREFIX}*") if (q / PAYLOAD / SHARD).exists()]
            time.sleep(0.002)
        if stale and _held_while(p, (stale[0] / PAYLOAD / SHARD).exists):
            p.send_signal(signal.SIGKILL)
            p.wait()
            break
        p.wait()
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.skip("the run always finished before it could be killed")
    assert stale[0].exists() and not out.exists()  # kill -9 cannot clean up
    p = _python_m(*args, "--out", out)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert leftovers(out) == ["out"]
    ref = tmp_path / "ref"
    p = _python_m(*args, "--out", ref)
    assert p.wait(timeout=300) == 0
    assert (out / SHARD).read_bytes() == (ref / SHARD).read_bytes()


def test_sigterm_removes_what_the_run_was_writing(big_base, tmp_path):
    """A kill (SIGTERM, as timeout or a scheduler sends) unwinds like Ctrl-C:
    one line, exit 143 (128 + SIGTERM, as a terminated job's; it was 130,
    Ctrl-C's), nothing at the target or beside it."""
    out = tmp_path / "out"
    args = ["sum", "--no-progress", big_base["adapter"], "--into", big_base["base"], "--dtype", "float16"]

    def writing_now() -> bool:
        return any((q / PAYLOAD / SHARD).exists() for q in tmp_path.glob(f"{TMP_PREFIX}*"))

    for _ in range(5):  # catch the run while it writes (retry if it was faster than the poll)
        p = _python_m(*args, "--out", out)
        writing = False
        while p.poll() is None and not writing:
            writing = writing_now()
            time.sleep(0.002)
        if writing and _held_while(p, writing_now):
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGCONT)
            break
        p.wait()
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.skip("the run always finished before it could be stopped")
    assert p.wait(timeout=120) == 143
    err = p.stderr.read()
    assert err.splitlines() == ["loramix: terminated"], err  # no blank line before it either
    assert leftovers(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_sigterm_in_a_library_training_removes_its_log(tmp_path):
    """``train_adapter`` called from a plain Python process (SIGTERM at its
    default) and killed with SIGTERM while it trains: the process dies of the
    signal as before (the caller's next line never runs), but first the call
    unwinds as the command line's does, so its live log (and the folder made
    for it) is removed, not left for the next run to the same ``out``."""
    import loramix

    data = "synthetic:arith?n=80"
    base = loramix.build_base(data, out=tmp_path / "base", steps=2, device="cpu", progress=False)["out"]
    out = tmp_path / "runs" / "a"
    code = ("import sys, loramix; loramix.train_adapter(sys.argv[1], sys.argv[2], out=sys.argv[3], steps=10**6, "
            "batch=4, eval_size=0, device='cpu', progress=False); print('returned')")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", code, base, data, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        logs = list(out.parent.glob("a.train_log.*.csv")) if out.parent.exists() else []
        if logs and logs[0].read_text().count("\n") >= 3:  # training: its header and two steps
            break
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail(f"no training seen: {p.communicate()}")
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGTERM and "returned" not in stdout, (p.returncode, stdout, err)
    assert "Traceback" not in err, err
    assert not out.parent.exists(), sorted(os.listdir(out.parent))


def _library_call_killed(
    code: str, args: list, writing, env: dict | None = None, still=None
) -> tuple[int, str, str] | None:
    """Run ``code`` (a ``loramix.X`` call, then ``print('returned')``) with
    ``args`` in a plain Python process (SIGTERM at its default; ``env`` added
    to its environment) and send it SIGTERM once ``writing(pid)`` is true,
    and still is (``still(pid)``, default ``writing``) with the process held
    (:func:`_held_while`): ``(returncode, stdout, stderr)``; None if the
    call ended before it was seen writing."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline and not writing(p.pid):
        time.sleep(0.002)
    if time.monotonic() >= deadline or not _held_while(p, lambda: (still or writing)(p.pid)):
        p.kill()
        p.communicate()
        return None
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    stdout, err = p.communicate(timeout=120)
    return p.returncode, stdout, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_sigterm_in_a_library_merge_into_a_base_removes_its_temporary(big_base, tmp_path):
    """``loramix.merge(..., into=base)`` killed with SIGTERM while it writes
    the merged model, in a plain Python process: the process dies of the
    signal (the caller's next line unrun), and the output's temporary and the
    folder made for it are gone. The process died at once, leaving both."""
    out = tmp_path / "runs" / "m"
    code = ("import sys, loramix; loramix.merge([sys.argv[1]], 'sum', into=sys.argv[2], out=sys.argv[3], "
            "dtype='float16', progress=False); print('returned')")  # fmt: skip

    def writing(pid):
        return out.parent.exists() and any(
            (q / PAYLOAD / SHARD).exists() for q in out.parent.glob(f"{TMP_PREFIX}*")
        )

    for _ in range(5):  # catch the call while it writes (retry if it was faster than the poll)
        got = _library_call_killed(code, [big_base["adapter"], big_base["base"], out], writing)
        if got is not None:
            break
        shutil.rmtree(out.parent, ignore_errors=True)
    else:
        pytest.skip("the merge always finished before it could be killed")
    rc, stdout, err = got
    assert rc == -signal.SIGTERM and "returned" not in stdout, got
    assert "Traceback" not in err, err
    assert not out.parent.exists(), sorted(os.listdir(out.parent))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_in_a_library_scenario_run_removes_its_temporaries(tmp_path, jobs):
    """``loramix.run_scenario`` killed with SIGTERM while it trains an adapter
    into the cache: the process dies of the signal, and no temporary is left
    in the cache, no report (the steps finished stay cached, as after the
    command's). Serial, the process died at once, leaving the adapter's
    temporary for the next run. With workers (their own SIGTERM handler, not
    the library call's) the run stops them first, and none outlives it."""
    scen, cache, report = tmp_path / "s.toml", tmp_path / "cache", tmp_path / "reports" / "r"
    scen.write_text(LONG_ADAPTERS)
    code = ("import sys, loramix; loramix.run_scenario(sys.argv[1], out=sys.argv[2], cache_dir=sys.argv[3], "
            f"jobs={jobs}, progress=False); print('returned')")  # fmt: skip
    workers = []

    def making(pid):
        return bool(list(cache.glob(f"adapter/{TMP_PREFIX}*/{PAYLOAD}")))

    def writing(pid):
        if making(pid):
            workers.extend(q for q in _children(pid) if b"spawn_main" in _cmdline(q))
            time.sleep(0.5)  # in the training loop
            return True
        return False

    got = _library_call_killed(code, [scen, report, cache], writing, still=making)  # writing() sleeps
    if got is None:
        pytest.skip("the study ended (or never got going) before an adapter was being made")
    rc, stdout, err = got
    assert rc == -signal.SIGTERM and "returned" not in stdout, got
    assert "Traceback" not in err, err
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not report.parent.exists()
    assert bool(workers) == (jobs > 1) and _gone(workers, 10), workers


#: a library call that writes an output, as a plain Python caller makes it (argv: the output, the
#: adapter, the base); its parent folder is made for it
_WRITERS = {
    "build_base": "loramix.build_base('synthetic:arith?n=20', out=sys.argv[1], steps=1, batch=2, device='cpu', "
                  "progress=False)",
    "sum_adapters": "loramix.sum_adapters([sys.argv[2]] * 8, out=sys.argv[1])",
    "sum_into_base": "loramix.sum_into_base([sys.argv[2]], into=sys.argv[3], out=sys.argv[1], dtype='float16', "
                     "progress=False)",
    "save_peft_adapter": "import torch; loramix.save_peft_adapter(sys.argv[1], "
                         "{f'm.{i}.q_proj': (torch.ones(1024, 16), torch.ones(16, 1024)) for i in range(128)})",
    "save_d2_adapter": "import torch; one = lambda *s: torch.ones(*s); loramix.save_d2_adapter(sys.argv[1], "
                       "{f'm.{i}.q_proj': loramix.ModuleDelta(f'm.{i}.q_proj', one(1024, 16), one(16, 1024), 1.0, "
                       "16.0, B_neg=one(1024, 16), A_neg=one(16, 1024)) for i in range(64)}, r=16, lora_alpha=16, "
                       "tau=0.5)",
}  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
@pytest.mark.parametrize("call", list(_WRITERS))
def test_sigterm_in_a_library_call_leaves_no_output(call, big_base, tmp_path):
    """Each ``loramix.X`` that writes an output, killed with SIGTERM in a plain
    Python process once its output is being written (a temporary, or a file
    of it, beside or in ``out``): the process dies of the signal (the
    caller's next line unrun), with no traceback, and nothing is left: no
    temporary, no half-written ``out``, not the folder made for it."""
    out = tmp_path / "runs" / "o"
    code = f"import sys, loramix; {_WRITERS[call]}; print('returned')"

    def writing(pid):
        return out.parent.exists() and any(  # a temporary beside out, or a file in it
            q.name.startswith(TMP_PREFIX) or q == out and any(out.iterdir()) for q in out.parent.iterdir()
        )

    for _ in range(5):  # catch the call while it writes (retry if it was faster than the poll)
        got = _library_call_killed(code, [out, big_base["adapter"], big_base["base"]], writing)
        if got is not None and "returned" not in got[1]:
            break
        shutil.rmtree(out.parent, ignore_errors=True)
    else:
        pytest.skip(f"{call} always finished before it could be killed")
    rc, stdout, err = got
    assert rc == -signal.SIGTERM, got
    assert "Traceback" not in err, err
    assert not out.parent.exists(), sorted(os.listdir(out.parent))


#: a library call that replaces an existing output (argv: the output, the adapter): the save_*
#: functions write into it as it is, files of the same names replaced; sum_adapters with force
_REPLACERS = {
    "save_peft_adapter": _WRITERS["save_peft_adapter"],
    "save_d2_adapter": _WRITERS["save_d2_adapter"],
    "sum_adapters": "loramix.sum_adapters([sys.argv[2]] * 8, out=sys.argv[1], force=True)",
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
@pytest.mark.parametrize("call", list(_REPLACERS))
def test_sigterm_in_a_library_call_keeps_the_old_output(call, big_base, tmp_path):
    """A ``loramix.X`` that replaces an existing output (a folder holding an
    older adapter and a file of the user's), killed with SIGTERM while it
    writes the new one (a temporary beside or in it): the folder is byte for
    byte as it was (or, killed as the renames ran, byte for byte what the
    call writes), and no temporary is left. The save functions wrote in
    place: their old weights were cut short, or new weights left beside
    the old config."""
    out = tmp_path / "runs" / "o"

    def old() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(big_base["adapter"], out)
        (out / "README.md").write_text("mine\n")
        return {q.name: q.read_bytes() for q in out.iterdir()}

    before = old()
    code = f"import sys, loramix; {_REPLACERS[call]}; print('returned')"

    def writing(pid):
        return any(
            q.name.startswith(TMP_PREFIX) for d in (out.parent, out) if d.is_dir() for q in d.iterdir()
        )

    for _ in range(5):  # catch the call while it writes (retry if it was faster than the poll)
        got = _library_call_killed(code, [out, big_base["adapter"]], writing)
        if got is not None and "returned" not in got[1]:
            break
        old()
    else:
        pytest.skip(f"{call} always finished before it could be killed")
    rc, stdout, err = got
    assert rc == -signal.SIGTERM and "Traceback" not in err, got
    assert sorted(q.name for q in out.parent.iterdir()) == ["o"]
    after = {q.name: q.read_bytes() for q in out.iterdir()}
    if after != before:
        # the kill came as the renames ran: the signal is held until all are done
        # (stopping.cleanup), so the folder is wholly what the call writes, never a mix
        old()
        done = subprocess.run([sys.executable, "-c", code, str(out), str(big_base["adapter"])], text=True,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        assert done.returncode == 0 and "returned" in done.stdout, done
        assert after == {q.name: q.read_bytes() for q in out.iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_sigterm_in_a_library_evaluate_leaves_no_half_imported_base(tmp_path):
    """``loramix.evaluate`` of a GGUF base, killed with SIGTERM while it
    imports the base into the cache (the one output an evaluation writes):
    the process dies of the signal, and ``bases/`` holds no temporary and no
    half-made import; one whole import at most (the signal came after it)."""
    from loramix.gguf_import import _whole_import

    from .test_realmodel import llama_gguf

    gguf = llama_gguf(tmp_path / "big.gguf", tokenizer=True, feed_forward_length=65536)  # 25 MB
    cache = tmp_path / "cache"
    code = ("import sys, loramix; loramix.evaluate(sys.argv[1], data='synthetic:arith?n=4', device='cpu', "
            "progress=False); print('returned')")  # fmt: skip

    def writing(pid):
        return any(cache.glob("bases/.*.tmp-*/*"))

    for _ in range(5):  # catch the import while it writes (retry if it was faster than the poll)
        got = _library_call_killed(code, [gguf], writing, env={"LORAMIX_CACHE_DIR": str(cache)})
        if got is not None:
            break
        shutil.rmtree(cache, ignore_errors=True)
    else:
        pytest.skip("the import always finished before it could be killed")
    rc, stdout, err = got
    assert rc == -signal.SIGTERM and "returned" not in stdout, got
    assert "Traceback" not in err, err
    bases = cache / "bases"
    assert list(bases.glob(".*")) == [] and all(_whole_import(d) for d in bases.iterdir() if d.is_dir())


def test_a_library_call_keeps_the_callers_sigterm_handler():
    """:func:`~loramix.stopping.sigterm_unwinds` sets its handler only over a
    SIGTERM at its default, and only for the call; one the caller set (a
    job runner's, a notebook's) is kept as it is."""
    from loramix.stopping import sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with sigterm_unwinds():
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def mine(signum, frame):
            pass

        for callers in (mine, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, callers)
            with sigterm_unwinds():
                assert signal.getsignal(signal.SIGTERM) is callers
            assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)


def _sleeper(pipe: int) -> None:
    """A forked child's work: say it is ready on ``pipe`` (a byte), sleep; and
    say so if anything unwinds it."""
    try:
        os.write(pipe, b"r")
        time.sleep(60)
    finally:
        os.write(pipe, b"unwound")


def _forked_sleeper(fork: str, pipe: int) -> Callable[[], int]:
    """Fork a :func:`_sleeper` child (``os.fork``, or multiprocessing's fork
    start method); ``kill()``: SIGTERM it, and its exit code."""
    if fork == "os.fork":
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest, whatever happens
            try:
                _sleeper(pipe)
            finally:
                os._exit(3)

        def kill() -> int:
            os.kill(pid, signal.SIGTERM)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        return kill
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=_sleeper, args=(pipe,))
    p.start()

    def terminate() -> int:
        p.terminate()
        p.join(30)
        return p.exitcode

    return terminate


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork")
@pytest.mark.parametrize("fork", ["os.fork", "multiprocessing"])
def test_a_process_forked_in_a_library_call_dies_of_sigterm(fork):
    """A child forked during a library call (a caller's callback, a data
    loader's fork worker) that receives SIGTERM dies of it at once, as
    without loramix: it inherits no handler of :func:`sigterm_unwinds`'s,
    which raised into the parent's unwinding there instead (the os.fork
    child was unwound and exited 3; multiprocessing's printed a traceback
    and exited 1)."""
    from loramix.stopping import sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    r, w = os.pipe()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with sigterm_unwinds():
            kill = _forked_sleeper(fork, w)
            assert os.read(r, 1) == b"r"  # the child sleeps
            code = kill()
        os.close(w)
        assert code == -signal.SIGTERM and os.read(r, 100) == b"", code
    finally:
        signal.signal(signal.SIGTERM, before)
        os.close(r)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork")
def test_a_forked_child_signalled_before_its_hook_dies_of_sigterm():
    """A SIGTERM that reaches a child forked during a library call before
    its fork hook has put SIGTERM's default back runs the parent's handler
    there (as Python would, at the hook's first line): it kills the child
    with the signal, unwinding nothing."""
    from loramix.stopping import sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with sigterm_unwinds():
            handler = signal.getsignal(signal.SIGTERM)
            pid = os.fork()
            if pid == 0:  # the child: never back into pytest, whatever happens
                try:
                    handler(signal.SIGTERM, sys._getframe())
                finally:
                    os._exit(3)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert code == -signal.SIGTERM, code
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_ctrl_c_held_by_a_commands_last_clean_up_stops_it(tmp_path):
    """Ctrl-C while the last thing a command does is a clean-up (here
    ``cache clean`` removing a killed writer's temporary of 20000 files): the
    clean-up ends, then the run stops with its line, exit 130. The held
    signal was sent again 10 ms after the clean-up, by when ``main`` had
    handed the process back to Python's handlers, or ended it: the Ctrl-C was
    lost (exit 0, 8 runs in 8), and where it landed in an exit handler it
    would raise there (a traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE_DIR": str(tmp_path / "c")}
    dead = subprocess.run([sys.executable, "-c", "from loramix.io.outputs import owner_tag; print(owner_tag())"],
                          env=env, capture_output=True, text=True, check=True, timeout=120).stdout.strip()  # fmt: skip
    stale = tmp_path / "c" / "sha256" / f"{TMP_PREFIX}0000aaaa.12345678.{dead}.tmp"
    stale.mkdir(parents=True)
    for k in range(20000):
        (stale / str(k)).touch()
    (tmp_path / "empty").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "loramix", "cache", "clean", "--dir", str(tmp_path / "empty")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while p.poll() is None and _files(stale) > 15000:  # until it is removing it
        time.sleep(0.002)
    if not _held_while(p, stale.exists):
        pytest.skip("the clean-up ended before it could be interrupted")
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (130, "loramix: interrupted\n"), out
    assert not stale.exists()  # the clean-up was not cut short


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """A GPT-2 base of about 200 small shards: an output of as many files,
    whose removal (the clean-up after Ctrl-C) takes a while."""
    root = tmp_path_factory.mktemp("shards")
    model = tiny_gpt2(seed=0, n_layer=48, n_embd=32)
    return dict(base=save_base(model, root / "base", max_shard_size="4KB"),
                adapter=make_peft_adapter(model, root / "ad", r=2))  # fmt: skip


def _files(folder: Path) -> int:
    try:
        return len(os.listdir(folder))
    except OSError:
        return -1


def _stopped(p: subprocess.Popen) -> bool:
    """Stop ``p`` (SIGSTOP) and wait until it is; False where it ended first."""
    p.send_signal(signal.SIGSTOP)
    while p.poll() is None:
        try:
            state = Path(f"/proc/{p.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return False
        if state in (b"T", b"t"):
            return True
        time.sleep(0.001)
    return False


def _held_while(p: subprocess.Popen, still: Callable[[], bool]) -> bool:
    """True with ``p`` stopped (SIGSTOP) where ``still()`` holds once it is:
    the caller's signal, sent next, lands in the state ``still`` saw (then
    SIGCONT lets ``p`` run into it; SIGKILL needs none). False, ``p`` let
    run on, where it ended or ``still()`` no longer holds. A signal sent
    straight after a poll that saw the run writing landed as late as this
    process next got a core: on a loaded machine (tens of ms, the last
    50-90 ms of a write here) the run could have published its output or
    ended by then, and a correct run failed its test."""
    if not _stopped(p):
        return False
    if still():
        return True
    p.send_signal(signal.SIGCONT)
    return False


def _second_in_clean_up(p: subprocess.Popen, files: Callable[[], int], second: int) -> bool:
    """Ctrl-C to ``p``, which writes a payload of ``files()`` files; then
    ``p`` is let run in slices of about a millisecond (SIGSTOP, SIGCONT)
    until they start to go, and sent ``second`` there. False where the
    clean-up was missed."""
    p.send_signal(signal.SIGINT)
    most = files()
    while _stopped(p):
        n = files()
        if 0 < n < most:  # files only go once the clean-up starts
            p.send_signal(second)
            p.send_signal(signal.SIGCONT)
            return True
        p.send_signal(signal.SIGCONT)
        if n < most:  # all gone between two looks
            return False
        most = n
        time.sleep(0.0005)
    p.send_signal(signal.SIGCONT)
    return False


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_the_clean_up_leaves_nothing(many_shards, tmp_path, second):
    """Ctrl-C while a ``sum`` writes its ~200 shards, and a second signal
    (Ctrl-C again, or a kill) while the clean-up that the first one started
    removes them (:func:`_second_in_clean_up`): the clean-up is not cut
    short (it was, and left the temporary behind for the next run to
    remove), nothing is left at the target or beside it, and the run exits
    at once with the first signal's line."""
    out = tmp_path / "out"
    args = ["sum", "--no-progress", many_shards["adapter"], "--into", many_shards["base"]]

    def payload_files() -> int:
        # wherever the temporary is: outputs.remove_temporary renames it (to a name saying its
        # owner) before it removes it, so its first name was gone at once and the test was
        # skipped in every run ('never caught under way')
        return max((_files(q / PAYLOAD) for q in tmp_path.glob(f"{TMP_PREFIX}*")), default=-1)

    for _ in range(5):  # catch the run while it writes, then its clean-up under way
        p = _python_m(*args, "--out", out)
        writing = False
        while p.poll() is None and not writing:
            writing = payload_files() > 50
            time.sleep(0.002)
        caught = writing and _second_in_clean_up(p, payload_files, second)
        if caught:
            break
        p.wait()
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.skip("the run's clean-up was never caught under way")
    assert p.wait(timeout=60) == 130
    err = p.stderr.read()
    assert err.splitlines() == ["loramix: interrupted"], err
    assert leftovers(out) == []


def test_live_temporaries_are_kept(tmp_path):
    """Only temporaries whose owner is gone are stale: a running one is kept."""
    with atomic_output_dir(tmp_path / "x") as tmp:
        assert remove_stale_temporaries(tmp_path) == []
        assert tmp.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_owner_not_yet_reaped_is_gone(tmp_path):
    """A writer killed with kill -9 whose parent has not reaped it yet (a
    zombie: a worker pool's under load) writes nothing more, so its temporary
    is stale. It counted as alive (the pid answers signal 0 and keeps its
    start time), and a study whose worker was killed left it in the cache."""
    code = "import sys, time; from pathlib import Path; from loramix.io.outputs import new_temporary; "
    code += "print(new_temporary(Path(sys.argv[1]), 'out'), flush=True); time.sleep(600)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        owned = Path(p.stdout.readline().strip())
        assert remove_stale_temporaries(tmp_path) == [] and owned.is_dir()  # alive: kept
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{p.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert remove_stale_temporaries(tmp_path) == [owned] and not owned.exists()
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_writer_killed_before_its_owner_record_leaves_no_nameless_temporary(tmp_path):
    """kill -9 between a temporary folder's mkdir and its owner.json (the
    instant a clean CI run met: a study's worker killed as it began its next
    artifact) left a folder naming no one, kept for ORPHAN_SECONDS after the
    run. The folder is made under a name that says its owner, then renamed,
    so what such a kill leaves is removed as soon as its owner is gone."""
    code = ("import os, signal, sys; from pathlib import Path; import loramix.io.outputs as o; "
            "o.json = type('J', (), {'dumps': staticmethod(lambda rec: os.kill(os.getpid(), signal.SIGKILL))}); "
            "o.new_temporary(Path(sys.argv[1]), 'out')")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(f"{TMP_PREFIX}*"))
    assert len(left) == 1 and not (left[0] / "owner.json").exists()  # killed between the two
    assert remove_stale_temporaries(tmp_path) == left and list(tmp_path.iterdir()) == []


def test_force_replaced_target_lies_in_an_owned_temporary(tmp_path):
    """With --force the old target is swapped into the run's temporary
    folder, which keeps its owner.json: if the run dies before removing it
    (kill -9 right after the swap), the next run removes it."""
    from loramix.io.outputs import publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    owned = _dead_temporary(tmp_path, "out")  # as if its owner was killed after the swap
    (owned / PAYLOAD).mkdir()
    (owned / PAYLOAD / "new").write_text("new")
    publish(owned / PAYLOAD, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert (owned / PAYLOAD / "old").exists() and (owned / "owner.json").exists()
    assert remove_stale_temporaries(tmp_path, "out") == [owned]
    with atomic_output_dir(out, force=True) as tmp:  # a run that finishes leaves nothing beside
        (tmp / "newer").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["newer"]


def test_a_temporary_killed_while_removed_still_names_its_owner(tmp_path, monkeypatch):
    """Removing a temporary (a replaced model: seconds) renames it first to a
    name that says its owner, so a run killed meanwhile leaves one the next
    run can tell is stale, owner.json or not. shutil.rmtree took owner.json
    first about once in 30 kills."""
    from loramix.io import outputs

    owned = outputs.new_temporary(tmp_path, "out")
    (owned / PAYLOAD / "replaced").mkdir(parents=True)
    (owned / PAYLOAD / "replaced" / "model.safetensors").write_text("old model")
    real = shutil.rmtree

    def killed(path, *a, **k):  # the kill lands in the first removal
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.remove_temporary(owned)
    (left,) = tmp_path.iterdir()
    me = outputs.tag_owner(outputs.owner_tag())
    assert outputs._file_owner(left.name) == (outputs._short_hash("out"), me)
    assert remove_stale_temporaries(tmp_path, "out") == []  # its owner (this process) is alive
    monkeypatch.setattr(outputs.shutil, "rmtree", real)
    outputs.remove_temporary(left)
    assert list(tmp_path.iterdir()) == []


#: a child that makes a temporary (a payload inside, as a finished artifact's
#: replaced folder) and is SIGKILLed at the ``n``-th call of os.unlink, os.rmdir
#: or os.rename (shutil.rmtree's calls included) as it removes it
_KILL_IN_REMOVAL = """
import os, signal, sys
from pathlib import Path
from loramix.io.outputs import PAYLOAD, new_temporary, remove_temporary
owned = new_temporary(Path(sys.argv[1]), "out")
(owned / PAYLOAD / "replaced").mkdir(parents=True)
(owned / PAYLOAD / "replaced" / "model.safetensors").write_text("old model")
calls, n = 0, int(sys.argv[2])
def hook(frame, event, fn):
    global calls
    if event == "c_call" and fn in (os.unlink, os.rmdir, os.rename, os.replace):
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
sys.setprofile(hook)
remove_temporary(owned)
sys.setprofile(None)
print(calls)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_killed_anywhere_in_a_removal_leaves_what_the_next_run_removes(tmp_path):
    """kill -9 of a process removing its temporary (the end of every artifact
    and output), at each of the removal's file-system calls in turn: what it
    leaves is removed at once by the next run (its owner is gone). Killed
    between shutil.rmtree's unlink of owner.json and its rmdir, it left an
    empty ``.lmx-<hex>`` naming no one, kept for ORPHAN_SECONDS: the
    temporary a killed worker left in the cache (a CI flake of
    test_a_worker_killed_mid_study_is_one_line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120)
    (tmp_path / "whole").mkdir()
    whole = run([sys.executable, "-c", _KILL_IN_REMOVAL, str(tmp_path / "whole"), "0"])
    assert whole.returncode == 0 and list((tmp_path / "whole").iterdir()) == [], whole.stderr
    for n in range(1, int(whole.stdout) + 1):
        parent = tmp_path / str(n)
        parent.mkdir()
        r = run([sys.executable, "-c", _KILL_IN_REMOVAL, str(parent), str(n)])
        assert r.returncode == -signal.SIGKILL, (n, r.stderr)
        left = sorted(parent.iterdir())
        # the next run to "out" removes it at once
        assert sorted(remove_stale_temporaries(parent, "out")) == left, (n, left)
        assert list(parent.iterdir()) == [], n


def test_an_interrupt_just_after_a_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A KeyboardInterrupt landing just after new_temporary's mkdir (a
    Ctrl-C; ray.cancel of a Ray task that has just started, which is how the
    Ray executor stops its tasks) left the folder without its owner record:
    kept by every run for ORPHAN_SECONDS. Seen once in the Ray bad-input
    test; here the interrupt is raised as the mkdir returns."""
    from loramix.io import outputs

    real = Path.mkdir

    def interrupted(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.new_temporary(tmp_path, "out")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_as_a_temporarys_rename_returns_leaves_nothing(tmp_path, monkeypatch):
    """A SIGTERM or Ctrl-C landing as new_temporary's rename to its final
    name returns: the folder was left under that name, which the caller had
    not received and so did not remove (seen once in
    test_sigterm_in_a_library_call_leaves_no_output[build_base]: a
    ``.lmx-<hex>`` beside out). Here the interrupt is raised as the rename
    returns; another process's temporary of the same name is kept."""
    from loramix.io import outputs

    real = os.rename

    def interrupted(src, dst, *a, **k):
        real(src, dst, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.new_temporary(tmp_path, "out")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    # a name taken by another process's temporary: our rename fails, theirs stays
    theirs = tmp_path / f"{TMP_PREFIX}00000000"
    theirs.mkdir()
    (theirs / "owner.json").write_text(json.dumps({"pid": 1, "host": "elsewhere", "target": "out"}))
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda n: "00000000")
    with pytest.raises(OSError):
        outputs.new_temporary(tmp_path, "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]


def test_a_temporary_without_its_owner_record_is_removed_once_old(tmp_path):
    """A run killed between making its temporary and writing owner.json (or
    between removing owner.json and the empty folder) leaves a folder with
    no owner: removed once older than a live owner could be, kept before."""
    from loramix.io.outputs import ORPHAN_SECONDS

    young, old = tmp_path / f"{TMP_PREFIX}0000aaaa", tmp_path / f"{TMP_PREFIX}0000bbbb"
    for d in (young, old):
        (d / PAYLOAD).mkdir(parents=True)
    t = time.time() - ORPHAN_SECONDS - 5
    os.utime(old, (t, t))
    assert remove_stale_temporaries(tmp_path, "out") == [old]
    assert young.is_dir() and not old.exists()


def test_atomic_write_temporaries_of_dead_writers_are_removed(tmp_path):
    """A file written through atomic_write and killed before its rename
    leaves its temporary; the next write to the same file removes it, not
    those of a live writer or of another file."""
    from loramix.io.outputs import atomic_write, temporary_file

    code = "import sys; from pathlib import Path; from loramix.io.outputs import temporary_file; "
    code += "t = temporary_file(Path(sys.argv[1])); t.write_text('half'); print(t)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dead = [Path(subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                                env=env, check=True, timeout=120).stdout.strip()) for name in ("sim.png", "other.png")]  # fmt: skip
    live = temporary_file(tmp_path / "sim.png")
    live.write_text("being written")
    with atomic_write(tmp_path / "sim.png") as f:
        f.write("done")
    assert (tmp_path / "sim.png").read_text() == "done"
    assert not dead[0].exists() and dead[1].exists() and live.exists()
    assert remove_stale_temporaries(tmp_path) == [dead[1]]  # cache clean: every dead one
    assert live.exists()


def test_full_disk_names_the_output_whatever_file_it_struck(tmp_path):
    """A full disk while copying an input's file into the output names the
    output, not the input; safetensors' error for a failed write becomes
    the OSError it wraps, naming the output."""
    from loramix.cli import _os_error_line

    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        with atomic_output_dir(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "base" / "config.json"))
    assert e.value.filename == str(out) and leftovers(out) == []
    with pytest.raises(OSError) as e:
        with atomic_output_dir(out):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out) and leftovers(out) == []
    assert _os_error_line(e.value) == f"{out}: No space left on device; nothing was written"
    with pytest.raises(OSError) as e:  # a plot: the write names no file
        from loramix.io.outputs import atomic_write

        with atomic_write(tmp_path / "sim.png", "wb"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(tmp_path / "sim.png") and sorted(p.name for p in tmp_path.iterdir()) == []


def test_live_log_is_removed_when_its_close_fails(tmp_path):
    """A failed training run's live log is removed even where closing it
    fails (its buffered rows cannot be written to a full disk)."""
    from loramix.train import _remove_file

    class FullDisk:
        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = tmp_path / "out.train_log.1.csv"
    log.write_text("step,loss\n")
    _remove_file(FullDisk(), log)
    assert not log.exists()


def test_merge_provenance_is_final_when_published(world, tmp_path, capsys, monkeypatch):
    """loramix.json of a merge into a base (its time and the methods' facts)
    is written before the folder is renamed into place: a kill after the
    rename cannot leave a published output with an unfinished record."""
    import loramix.io.outputs as outputs

    seen = []
    publish = outputs.publish

    def check(tmp, out, force):
        seen.append(json.loads((tmp / "loramix.json").read_text()))
        assert not [p.name for p in tmp.iterdir() if p.name.startswith(TMP_PREFIX)]
        publish(tmp, out, force)

    monkeypatch.setattr(outputs, "publish", check)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "merge", "-m", "svd", "--rank", "2", world["a"], world["b"], "--into",
                     world["gpt2"], "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0, err
    assert seen == [json.loads((out / "loramix.json").read_text())]
    assert seen[0]["created"] and seen[0]["summary"] and seen[0]["modules"]


# ---- 2, 3. safetensors headers: as strict as the safetensors library ------------------------


def _overlap_k_on_q(h):
    q, k = h["model.layers.0.self_attn.q_proj.weight"], h["model.layers.0.self_attn.k_proj.weight"]
    b = q["data_offsets"][0]
    k["data_offsets"] = [b, b + k["data_offsets"][1] - k["data_offsets"][0]]


def _first_untouched(h):
    return next(k for k in sorted(h) if "layernorm" in k or "norm" in k)


def _digit(h):
    k = sorted(x for x in h if x != "__metadata__")[3]
    h[k]["data_offsets"][0] += 1


def _set_dtype(code, which=None):
    def fn(h):
        k = which or _first_untouched(h)
        h[k]["dtype"] = code

    return fn


def _shape(value):
    def fn(h):
        h["model.layers.0.self_attn.q_proj.weight"]["shape"] = value

    return fn


@pytest.mark.parametrize(
    "damage, what",
    [
        (_overlap_k_on_q, "overlaps"),
        (_digit, "model.safetensors"),
        (_set_dtype("F33"), "unknown dtype"),
        (_set_dtype("F33", "model.layers.0.self_attn.q_proj.weight"), "unknown dtype"),
        (_set_dtype("F64"), "needs"),
        (_shape([10**12, 10**12]), "needs"),
        (_shape([-32, 32]), "invalid shape"),
        (_shape([32.0, 32]), "invalid shape"),
    ],
    ids=["overlap", "offset-digit", "dtype-typo-untouched", "dtype-typo-read", "f64-f32-bytes", "huge-shape",
         "negative-shape", "float-shape"],
)  # fmt: skip
def test_inconsistent_base_header_refused(world, tmp_path, capsys, damage, what):
    base = copy(world["llama"], tmp_path / "base")
    rewrite_header(base / SHARD, damage)
    with pytest.raises(Exception):  # noqa: B017  the safetensors library refuses it too
        load_file(str(base / SHARD))
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, base, out, world["la"])
    assert_refused(code, err, out, base / SHARD, what)


def test_adapter_header_checked_the_same(world, tmp_path, capsys):
    ad = copy(world["a"], tmp_path / "ad")
    rewrite_header(ad / WEIGHTS, lambda h: h[sorted(h)[1]]["data_offsets"].__setitem__(1, 10**9))
    code, _, err = cli(capsys, "inspect", ad)
    assert_refused(code, err, None, ad / WEIGHTS)


# ---- 4. non-finite values ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e309", "1" + "0" * 400])
def test_non_finite_alpha_refused(world, tmp_path, capsys, text):
    ad = copy(world["a"], tmp_path / "ad")
    raw = (ad / CONFIG).read_text()
    cfg = json.loads(raw)
    (ad / CONFIG).write_text(raw.replace(f'"lora_alpha": {cfg["lora_alpha"]}', f'"lora_alpha": {text}'))
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, world["gpt2"], out, ad)
    assert_refused(code, err, out, ad / CONFIG)


@pytest.mark.parametrize("command", ["similarity", "eval", "sum"])
def test_alpha_whose_scale_overflows_float32_refused(world, tmp_path, capsys, command):
    """A finite lora_alpha whose scale alpha / r does not fit float32 (every
    delta would be inf or nan) is refused naming the config, by every command
    (similarity printed overflow warnings and n/a, eval a perplexity of nan)."""
    ad = copy(world["a"], tmp_path / "ad")
    edit_config(ad, lora_alpha=1e308)
    out = tmp_path / "out"
    args = {"similarity": ["similarity", world["b"], ad],
            "eval": ["eval", "--base", world["gpt2"], "--adapter", ad, "--data", "synthetic:arith", "--limit", "4"],
            "sum": ["sum", world["b"], ad, "--out", out]}[command]  # fmt: skip
    rc, _, err = cli(capsys, *args)
    assert_refused(rc, err, out, ad / CONFIG, "does not fit float32")
    edit_config(ad, lora_alpha=1e30)  # large, but its scale fits: read
    rc, _, err = cli(capsys, "inspect", ad)
    assert rc == 0, err


@pytest.mark.parametrize("command", ["inspect", "similarity", "sum"])
def test_alpha_whose_scale_underflows_float32_refused(world, tmp_path, capsys, command):
    """A lora_alpha so small that alpha / r is below float32's range: PEFT's
    delta is 0 there, loramix's float64 one was not (inspect printed a norm
    of 7.9e-46). Refused naming the config; 0 (an adapter turned off) and a
    small normal scale are read."""
    ad = copy(world["a"], tmp_path / "ad")
    edit_config(ad, lora_alpha=1e-45)
    out = tmp_path / "out"
    args = {"inspect": ["inspect", ad], "similarity": ["similarity", world["b"], ad],
            "sum": ["sum", world["b"], ad, "--out", out]}[command]  # fmt: skip
    rc, _, err = cli(capsys, *args)
    assert_refused(rc, err, out, ad / CONFIG, "below float32's range")
    for alpha in (0, 1e-30):
        edit_config(ad, lora_alpha=alpha)
        rc, _, err = cli(capsys, "inspect", ad)
        assert rc == 0, err


def _d2_adapter(folder: Path) -> Path:
    from loramix.adapter import ModuleDelta
    from loramix.io.adapter_files import save_d2_adapter

    g = torch.Generator().manual_seed(0)
    f = [torch.randn(*s, generator=g) for s in ((8, 2), (2, 6), (8, 2), (2, 6))]
    m = ModuleDelta(name="model.layers.0.mlp.up_proj", B=f[0], A=f[1], B_neg=f[2], A_neg=f[3], scale=2.0,
                    alpha=4.0, tau=0.5)  # fmt: skip
    return save_d2_adapter(folder, {m.name: m}, r=2, lora_alpha=4, tau=0.5)


@pytest.mark.parametrize(
    "field, value, needle",
    [("tau", 1e300, "within float32's range"), ("loramix_format", "d2lora/99", '"d2lora/1"'),
     ("loramix_format", 1, '"d2lora/1"')],
)  # fmt: skip
def test_d2lora_config_refused(tmp_path, capsys, field, value, needle):
    """D2-LoRA: a tau beyond float32, and a format version this loramix does
    not know, are refused naming the file and the field."""
    ad = _d2_adapter(tmp_path / "d2")
    rc, _, err = cli(capsys, "inspect", ad)
    assert rc == 0, err
    edit_config(ad, **{field: value})
    rc, _, err = cli(capsys, "inspect", ad)
    assert_refused(rc, err, None, ad / CONFIG, field, needle)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--alpha", "nan"),
        ("--alpha", "inf"),
        ("--alpha", "1e308"),
        ("--lr", "inf"),
        ("--tau", "1e300"),
        ("--warmup", "-5"),
    ],
)
def test_train_numbers_refused_naming_the_option(world, tmp_path, capsys, flag, value):
    out = tmp_path / "t"
    kind = ["--kind", "d2lora"] if flag == "--tau" else []  # the range check, not "d2lora only"
    rc, _, err = cli(capsys, "train", "--base", world["gpt2"], "--data", "synthetic:arith", "--out", out,
                     "--quiet", *kind, flag, value)  # fmt: skip
    assert_refused(rc, err, out, flag)


def test_eval_max_len_below_two_refused(world, capsys):
    for v in ("0", "1"):
        rc, _, err = cli(capsys, "eval", "--base", world["gpt2"], "--data", "synthetic:arith", "--max-len", v)
        assert_refused(rc, err, None, "--max-len")


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "1,-inf", "1e39,1", "2e6,1", "1,,1", "1,1,"])
def test_bad_weights_refused_by_sum(world, tmp_path, capsys, weights):
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, world["gpt2"], out, world["a"], world["b"], extra=("--weights", weights))
    assert_refused(code, err, out, "--weights")
    code, _, err = cli(capsys, "sum", world["a"], world["b"], "--weights", weights, "--out", out)
    assert_refused(code, err, out, "--weights")


@pytest.mark.parametrize("w", [math.nan, math.inf, 1e39])
def test_bad_weights_refused_by_the_python_api(world, tmp_path, w):
    from loramix.methods.sum import sum_adapters, sum_into_base

    with pytest.raises(UsageError, match="weights"):
        sum_into_base(
            [world["a"], world["b"]], into=world["gpt2"], out=tmp_path / "o", weights=[w, 1], progress=False
        )
    with pytest.raises(UsageError, match="weights"):
        sum_adapters([world["a"], world["b"]], out=tmp_path / "o", weights=[1, w])
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_refused_naming_the_tensor(world, tmp_path, capsys):
    ad = copy(world["a"], tmp_path / "ad")
    t = load_file(str(ad / WEIGHTS))
    for key in [k for k in t if "h.0.mlp.c_fc" in k]:
        t[key] = torch.full_like(t[key], 300.0)  # s B A = 2 * 300 * 300 * 2 > 65504
    save_file(t, str(ad / WEIGHTS))
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, world["gpt2"], out, ad, extra=("--dtype", "float16"))
    assert_refused(code, err, out, "transformer.h.0.mlp.c_fc.weight", "nan or inf")


def test_float16_overflow_in_an_adapter_output_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = cli(
        capsys, "sum", world["a"], world["b"], "--weights", "1e6,1", "--dtype", "float16", "--out", out
    )
    assert_refused(rc, err, out, "lora_B", "nan or inf")


@pytest.mark.parametrize(
    "dtype, key, extra",
    [
        (torch.float32, "transformer.h.1.attn.c_proj.weight", ()),
        (torch.bfloat16, "transformer.h.1.attn.c_proj.weight", ()),  # the fused kernel, in place
        (torch.float16, "transformer.h.1.attn.c_proj.weight", ("--dtype", "bfloat16")),
        (torch.float32, "transformer.ln_f.weight", ("--dtype", "float16")),  # converted, not adapted
    ],
)
def test_nan_in_the_base_refused_naming_the_file_and_tensor(world, tmp_path, capsys, dtype, key, extra):
    """A base tensor that holds nan or inf is named with its file. The
    error named the tensor only, as the output that would hold nan or inf,
    for an input holding them or an overflow, without saying which."""
    base = copy(world["gpt2"], tmp_path / "base")
    t = {k: v.to(dtype) for k, v in load_file(str(base / SHARD)).items()}
    t[key][0] = float("inf")
    save_file(t, str(base / SHARD), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, base, out, world["a"], extra=extra)
    line = assert_refused(code, err, out, base / SHARD, key, "nan or inf")
    assert "overflow" not in line


def test_huge_but_finite_output_is_written(world, tmp_path, capsys):
    """The finite check sums each output block; a sum that overflows while
    every entry is finite (here 3e38 twice in a row) is no error: the exact
    check clears it and the weights are written as computed."""
    base = copy(world["gpt2"], tmp_path / "base")
    t = load_file(str(base / SHARD))
    key = "transformer.h.1.attn.c_proj.weight"
    t[key][0, :2] = 3e38
    save_file(t, str(base / SHARD), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, base, out, world["a"])
    assert code == 0, err
    got = load_file(str(out / SHARD))[key]
    assert torch.isfinite(got).all() and got[0, 0] > 2.9e38


# ---- 5. config types, as PEFT's LoraConfig has them --------------------------------------------


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(use_rslora="no"), "use_rslora"),
        (dict(fan_in_fan_out=1), "fan_in_fan_out"),
        (dict(r=4.5), "r"),
        (dict(r="4"), "r"),
        (dict(r=None), "r"),
        (dict(r=0), "r"),
        (dict(r=True), "r"),
        (dict(lora_alpha="abc"), "lora_alpha"),
        (dict(target_modules=5), "target_modules"),
        (dict(target_modules=["c_attn", 5]), "target_modules"),
        (dict(rank_pattern=[1]), "rank_pattern"),
        (dict(rank_pattern={"c_fc": "x"}), "rank_pattern"),
        (dict(rank_pattern={"c_fc": 2.5}), "rank_pattern"),
        (dict(rank_pattern={"(": 2}), "rank_pattern"),
        (dict(alpha_pattern={"c_fc": "x"}), "alpha_pattern"),
        (dict(alpha_pattern={"c_fc": None}), "alpha_pattern"),
        (dict(peft_type=["LORA"]), "peft_type"),
    ],
)
def test_config_of_the_wrong_type_refused(world, tmp_path, capsys, fields, name):
    ad = copy(world["a"], tmp_path / "ad")
    edit_config(ad, **fields)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "sum", ad, world["b"], "--out", out)
    assert_refused(code, err, out, ad / CONFIG, name)


def test_deeply_nested_config_refused(world, tmp_path, capsys):
    ad = copy(world["a"], tmp_path / "ad")
    cfg = (ad / CONFIG).read_text().rstrip().rstrip("}")
    (ad / CONFIG).write_text(cfg + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = cli(capsys, "inspect", ad)
    assert_refused(code, err, None, ad / CONFIG, "nested too deeply")


def test_deeply_nested_base_config_refused(world, tmp_path, capsys):
    base = copy(world["gpt2"], tmp_path / "base")
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, base, out, world["a"])
    assert_refused(code, err, out, base / "config.json")


# ---- 6. dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, code", [(torch.int8, "I8"), (torch.int64, "I64"), (torch.bool, "BOOL"),
                                         (torch.float8_e4m3fn, "F8_E4M3")])  # fmt: skip
def test_adapter_factor_dtype_refused(world, tmp_path, capsys, dtype, code):
    ad = copy(world["a"], tmp_path / "ad")
    t = load_file(str(ad / WEIGHTS))
    key = sorted(t)[0]
    t[key] = t[key].to(dtype)
    save_file(t, str(ad / WEIGHTS))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "sum", ad, world["b"], "--out", out)
    assert_refused(rc, err, out, ad / WEIGHTS, key, code)


@pytest.mark.parametrize("dtype, code", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_targeted_base_weight_must_be_float(world, tmp_path, capsys, dtype, code):
    base = copy(world["gpt2"], tmp_path / "base")
    t = load_file(str(base / SHARD))
    key = "transformer.h.0.attn.c_attn.weight"
    t[key] = t[key].to(dtype)
    save_file(t, str(base / SHARD), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, base, out, world["a"])
    assert_refused(rc, err, out, base / SHARD, key, code)


def test_modules_to_save_of_a_tied_head_refused_naming_the_tie(world, tmp_path, capsys):
    """GPT-2's lm_head is tied to wte, so the checkpoint has no lm_head
    tensor: a modules_to_save copy of it is refused naming the tie."""
    ad = make_peft_adapter(tiny_gpt2(seed=0), tmp_path / "ad", seed=1, r=2, target_modules=["c_attn"],
                           modules_to_save=["lm_head"])  # fmt: skip
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, world["gpt2"], out, ad)
    assert_refused(rc, err, out, world["gpt2"], "lm_head.weight", "tied to transformer.wte.weight")


def test_untouched_int8_and_float8_copied_byte_for_byte(world, tmp_path, capsys):
    base = copy(world["gpt2"], tmp_path / "base")
    t = load_file(str(base / SHARD))
    t["extra.codes"] = torch.arange(-50, 50, dtype=torch.int8)
    t["extra.scales"] = torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn)
    save_file(t, str(base / SHARD), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, base, out, world["a"], extra=("--dtype", "float16"))
    assert rc == 0, err
    got = load_file(str(out / SHARD))
    assert got["extra.codes"].dtype == torch.int8 and torch.equal(got["extra.codes"], t["extra.codes"])
    assert got["extra.scales"].dtype == torch.float8_e4m3fn
    assert torch.equal(got["extra.scales"].view(torch.uint8), t["extra.scales"].view(torch.uint8))
    assert got["transformer.h.0.attn.c_attn.weight"].dtype == torch.float16


# ---- 7. shard index -----------------------------------------------------------------------------------


def test_index_omitting_a_tensor_refused(world, tmp_path, capsys):
    base = copy(world["sharded"], tmp_path / "base")
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = list(data["weight_map"].values())
    dropped = sorted(k for k, s in data["weight_map"].items() if shards.count(s) > 1)[-1]
    alone = next(k for k, s in data["weight_map"].items() if shards.count(s) == 1)
    for key, what in ((dropped, dropped), (alone, data["weight_map"][alone])):
        index.write_text(
            json.dumps({**data, "weight_map": {k: v for k, v in data["weight_map"].items() if k != key}})
        )
        out = tmp_path / "out"
        rc, _, err = sum_into(capsys, base, out, world["a"])
        assert_refused(rc, err, out, index, what)


@pytest.mark.parametrize("where", ["../outside.safetensors", "sub/inner.safetensors", ".."])
def test_index_naming_a_file_outside_the_base_refused(world, tmp_path, capsys, where):
    """A shard is a file name in the base folder: an index that names one
    elsewhere (``../``, a sub-folder) is refused before anything is read
    (it was opened, wherever it was)."""
    base = copy(world["sharded"], tmp_path / "base")
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"].values())[0]
    target = (base / where).resolve() if where != ".." else None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / first, target)  # a real shard there: only the name is wrong
    data["weight_map"] = {k: (where if v == first else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    (base / first).unlink()
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, base, out, world["a"])
    assert_refused(rc, err, out, index, "not a file name in the base folder")


@pytest.mark.parametrize("value", [5, ["model-00001-of-00008.safetensors"], None])
def test_index_naming_a_shard_by_a_non_string_refused(world, tmp_path, capsys, value):
    """One weight_map value of another JSON type among the shard names is
    refused naming the index, by sum --into and by similarity --base. It was a
    TypeError traceback (the names were sorted as a set before each was checked)."""
    base = copy(world["sharded"], tmp_path / "base")
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][sorted(data["weight_map"])[0]] = value
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, base, out, world["a"])
    assert_refused(rc, err, out, index, f"names the shard {value!r}, which is not a file name")
    rc, _, err = cli(capsys, "similarity", "--base", base, world["a"], world["b"])
    assert_refused(rc, err, None, index, "not a file name")


# ---- 8. adapters of two architectures -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sum", "svd"])
def test_llama_and_gpt2_adapters_refused(world, tmp_path, capsys, method):
    out = tmp_path / "out"
    extra = ("--rank", "2") if method == "svd" else ()
    rc, _, err = cli(capsys, "merge", "-m", method, *extra, world["a"], world["la"], "--out", out)
    assert_refused(rc, err, out, world["la"], "different architectures")
    # and similarity, which gave a table of n/a (no module in common) with exit 0
    rc, _, err = cli(capsys, "similarity", world["a"], world["la"])
    assert_refused(rc, err, None, world["la"], "different architectures")


@pytest.mark.parametrize("adapter, base", [("a", "gpt2"), ("la", "llama")])
@pytest.mark.parametrize("method", ["sum", "ties"])
def test_adapter_with_transposed_factors_refused_by_a_merge_into_a_base(
    world, tmp_path, capsys, adapter, base, method
):
    """lora_A and lora_B swapped and transposed (A' = B^T, B' = A^T: the delta's
    transpose) fit a non-square weight of a known architecture only against its
    layout: PEFT refuses the file, and eval refuses it; a merge into the base
    took it, turning the non-square modules back and leaving the square ones
    (q_proj, c_proj) transposed."""
    ad = copy(world[adapter], tmp_path / "ad")
    t = load_file(ad / WEIGHTS)
    for k in [k for k in t if "lora_A" in k]:
        kb = k.replace("lora_A", "lora_B")
        t[k], t[kb] = t[kb].T.contiguous(), t[k].T.contiguous()
    save_file(t, ad / WEIGHTS)
    out = tmp_path / "out"
    extra = ("--density", "0.5") if method == "ties" else ()
    rc, _, err = cli(
        capsys, "merge", "--no-progress", "-m", method, *extra, ad, "--into", world[base], "--out", out
    )
    assert_refused(rc, err, out, ad, "fits it only transposed", "lora_A and lora_B are transposed")


@pytest.mark.parametrize("name", ["default", "zeta"])
@pytest.mark.parametrize("command", ["inspect", "similarity", "sum"])
def test_a_factor_stored_with_and_without_an_adapter_name_refused(world, tmp_path, capsys, name, command):
    """lora_A.weight and lora_A.<name>.weight of one module: one adapter name
    counted, so not refused as several adapters, and the key read later
    replaced the other unsaid (the named one where its name sorts after
    'weight', the one PEFT ignores)."""
    ad = copy(world["a"], tmp_path / "ad")
    t = load_file(ad / WEIGHTS)
    key = next(k for k in t if "lora_A" in k)
    t[key.replace("lora_A.weight", f"lora_A.{name}.weight")] = 100 * torch.randn_like(t[key])
    save_file(t, ad / WEIGHTS)
    out = tmp_path / "out"
    args = {
        "inspect": [ad],
        "similarity": [ad, world["b"]],
        "sum": ["--no-progress", ad, world["b"], "--out", out],
    }
    rc, _, err = cli(capsys, command, *args[command])
    assert_refused(rc, err, out, ad / WEIGHTS, key, "two copies of one factor")


def test_adapters_on_different_modules_of_one_base_accepted(world, tmp_path, capsys):
    model = tiny_gpt2(seed=0)
    only_fc = make_peft_adapter(model, tmp_path / "fc", r=2, target_modules=["c_fc"])
    only_attn = make_peft_adapter(model, tmp_path / "attn", r=2, target_modules=["c_attn"])
    rc, _, err = cli(capsys, "sum", only_fc, only_attn, "--out", tmp_path / "out")
    assert rc == 0, err


# ---- system errors: one line, exit 2 ---------------------------------------------------------------------


def test_parent_of_out_is_a_file(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", out)
    assert_refused(rc, err, None, tmp_path / "file", "is a file, not a folder")
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", out / "deeper")
    assert_refused(rc, err, None, tmp_path / "file", "is a file, not a folder")


@pytest.mark.parametrize("length", [242, 250, 255])
def test_long_legal_out_name_works(world, tmp_path, capsys, length):
    out = tmp_path / ("o" * length)
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", out)
    assert rc == 0, err
    assert leftovers(out) == [out.name]


def test_too_long_out_name_refused(world, tmp_path, capsys):
    out = tmp_path / ("o" * 256)
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", out)
    assert_refused(rc, err, None, "longer than 255")
    deep = tmp_path / ("d" * 300) / "out"
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", deep)
    assert_refused(rc, err, None, "File name too long")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needles",
    [
        (["sum"], ["Missing argument 'ADAPTERS...'", "'loramix sum --help'"]),
        (["sum", "A", "--outt", "x"], ["No such option '--outt'", "--out"]),
        (["nosuch"], ["No such command 'nosuch'", "'loramix --help'"]),
        (["similarity", "A", "B", "--plot", "DIR"], ["Invalid value for '--plot'", "is a directory"]),
        (["scenario", "check", "DIR"], ["is a directory"]),
        (["merge", "-m", "ties", "A", "--out", "x", "--density", "abc"], ["'--density'", "abc"]),
    ],
)
def test_usage_errors_are_one_line(world, tmp_path, capsys, args, needles):
    """Errors click finds in the arguments (a missing argument, an unknown
    option, a folder given for a file) are one line too, exit 2."""
    names = {"A": world["a"], "B": world["b"], "DIR": tmp_path}
    rc, out, err = cli(capsys, *(names.get(a, a) for a in args))
    line = assert_refused(rc, err, None, *needles)
    assert "Usage:" not in err and not out, line


def test_no_arguments_still_show_the_help(capsys):
    rc, out, err = cli(capsys)
    assert "Commands:" in out + err and "loramix: error" not in err


def test_eval_size_must_be_a_count_or_a_fraction(world, tmp_path, capsys):
    for bad in ("inf", "nan", "-1", "2.5", "1e400"):
        rc, _, err = cli(capsys, "train", "--base", world["gpt2"], "--data", "synthetic:arith", "--out",
                         tmp_path / "t", "--eval-size", bad, "--quiet")  # fmt: skip
        assert_refused(rc, err, tmp_path / "t", "--eval-size", repr(bad))


def test_seeds_and_synthetic_sizes_out_of_range_refused(world, tmp_path, capsys):
    """Negative seeds, as merge and the scenarios refuse them (train and base
    build took them), and a synthetic domain larger than a scenario may ask
    for (a run of 1e8 records went on for minutes)."""
    for cmd in (
        ["train", "--base", world["gpt2"], "--data", "synthetic:arith"],
        ["base", "build", "--data", "synthetic:arith"],
    ):
        rc, _, err = cli(capsys, *cmd, "--out", tmp_path / "o", "--seed", "-1")
        assert_refused(rc, err, tmp_path / "o", "--seed", "-1")
    rc, _, err = cli(
        capsys, "base", "build", "--data", "synthetic:arith?n=100000000", "--out", tmp_path / "o"
    )
    assert_refused(rc, err, tmp_path / "o", "synthetic:arith?n=100000000", "n must lie in [1, 100000]")


def test_plot_format_refused_before_the_work(world, tmp_path, capsys):
    plot = tmp_path / "sim.xyz"
    rc, _, err = cli(capsys, "similarity", world["a"], world["b"], "--plot", plot)
    assert_refused(rc, err, plot, plot, "cannot write a .xyz figure", ".png")


def test_unwritable_out_refused(world, capsys):
    out = Path("/sys/loramix-test-out")
    if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("/sys is writable here")
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", out)
    assert_refused(rc, err, None, out)


def test_file_size_limit_in_a_safetensors_write_is_one_line(world, tmp_path):
    """An adapter output is written by safetensors, whose error for a failed
    write (here RLIMIT_FSIZE, as a full disk) is one line naming the output,
    exit 2, nothing left."""
    import resource

    ref, out = tmp_path / "ref", tmp_path / "out"
    p = _python_m("sum", world["a"], world["b"], "--out", ref)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    size = (ref / WEIGHTS).stat().st_size
    assert max(f.stat().st_size for f in ref.iterdir() if f.name != WEIGHTS) < size // 2

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    p = _python_m("sum", world["a"], world["b"], "--out", out, preexec_fn=limit)
    p.wait(timeout=300)
    assert_refused(p.returncode, p.stderr.read(), out, out)


@pytest.mark.parametrize("direct", ["0", "1"])
def test_file_size_limit_mid_write_is_one_line(world, tmp_path, direct):
    """A write that fails half-way (here RLIMIT_FSIZE, as a full disk would):
    one line naming the output, exit 2, nothing left; also where the data
    bypasses the page cache (``LORAMIX_DIRECT_IO=1``: the write fails in the
    writer's own thread)."""
    import resource

    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    env = {"LORAMIX_CACHE_DIR": str(tmp_path / "cache"), "LORAMIX_DIRECT_IO": direct}
    p = _python_m("sum", "--no-progress", world["a"], "--into", world["gpt2"], "--out", out, preexec_fn=limit,
                  env=env)  # fmt: skip
    p.wait(timeout=300)
    assert_refused(p.returncode, p.stderr.read(), out, out)


def test_file_size_limit_in_the_live_training_log_names_the_output(llama_with_tokenizer, tmp_path):
    """A full disk (here RLIMIT_FSIZE) that strikes the live training log
    beside ``--out`` names the output, as it does whatever file it strikes
    inside it: one line, exit 2, nothing left (the log removed). It named
    the log, ``out.train_log.<pid>.csv``, a file the run had just removed."""
    import resource

    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))

    p = _python_m("train", "--no-progress", "--base", llama_with_tokenizer, "--data", "synthetic:arith", "--steps",
                  "2", "--limit", "8", "--rank", "2", "--out", out, preexec_fn=limit)  # fmt: skip
    p.wait(timeout=300)
    line = assert_refused(p.returncode, p.stderr.read(), out, out)
    assert "train_log" not in line, line


def test_symlink_loop_in_the_base(world, tmp_path, capsys):
    base = copy(world["gpt2"], tmp_path / "base")
    (base / "loop").symlink_to(base / "loop")
    out = tmp_path / "out"
    rc, _, err = sum_into(capsys, base, out, world["a"])
    assert_refused(rc, err, out, base / "loop")


def test_adapter_path_that_is_a_symlink_loop_or_dangling(tmp_path, capsys):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    rc, _, err = cli(capsys, "inspect", tmp_path / "loop1")
    assert_refused(rc, err, None, tmp_path / "loop1", "symbolic link loop")
    rc, _, err = cli(capsys, "inspect", tmp_path / "dangling")
    assert_refused(rc, err, None, tmp_path / "dangling", "does not exist")


def test_none_is_not_an_adapter():
    import loramix

    with pytest.raises(LoramixError):
        loramix.load_adapter(None)
    with pytest.raises(LoramixError):
        loramix.similarity([None], progress=False)


# ---- faults and odd files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", [WEIGHTS, CONFIG])
def test_fifo_refused_not_hung(world, tmp_path, which):
    ad = copy(world["a"], tmp_path / "ad")
    (ad / which).unlink()
    os.mkfifo(ad / which)
    p = _python_m("inspect", ad)
    try:
        p.wait(timeout=120)
    finally:
        p.kill()
    assert_refused(p.returncode, p.stderr.read(), None, ad / which, "regular file")


def test_non_utf8_path_works(world, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    ad = copy(world["a"], odd)
    p = _python_m("inspect", ad)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "c_attn" in out, err
    p = _python_m("sum", ad, world["b"], "--into", world["gpt2"], "--out", tmp_path / "o", "--no-progress")
    assert p.wait(timeout=120) == 0, p.stderr.read()


def test_empty_out_refused(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "sum", world["a"], world["b"], "--out", "")
    line = assert_refused(rc, err, None, "--out", "empty")
    assert "input" not in line
    assert list(tmp_path.iterdir()) == []


def test_relative_and_absolute_inputs_give_identical_bytes(world, tmp_path, capsys, monkeypatch):
    root = tmp_path / "in"
    base, a = copy(world["sharded"], root / "base"), copy(world["a"], root / "a")
    rc, _, err = sum_into(capsys, base, tmp_path / "abs", a)
    assert rc == 0, err
    monkeypatch.chdir(root)
    rc, _, err = sum_into(capsys, "base", "../rel", "./a")
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "abs").glob("*.safetensors"))
    assert len(names) > 1
    for n in names:
        assert (tmp_path / "abs" / n).read_bytes() == (tmp_path / "rel" / n).read_bytes()
    rc, _, err = cli(capsys, "sum", "a", str(world["b"]), "--out", "../rel-ad")
    assert rc == 0, err
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "sum", str(a), str(world["b"]), "--out", "abs-ad")
    assert rc == 0, err
    assert (tmp_path / "abs-ad" / WEIGHTS).read_bytes() == (tmp_path / "rel-ad" / WEIGHTS).read_bytes()


# ---- the fuzz test --------------------------------------------------------------------------------------------


def _header_span(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _library_opens(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return False
    return True


def _check_output_loads(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    with safe_open(str(out / SHARD), "pt") as f:
        assert list(f.keys())
    AutoModelForCausalLM.from_pretrained(str(out))


def test_fuzz_single_byte_header_corruption(world, tmp_path, capsys):
    """Single bytes of an adapter header and of a base header set at random
    (seeded): every run ends in exit 2 with one line, or exit 0 with an
    output that safetensors opens and transformers loads. Never a traceback;
    and whatever the safetensors library refuses, loramix refuses."""
    rng = random.Random(1234)
    seen = {0: 0, 2: 0}
    t0 = time.perf_counter()
    for i in range(400):
        ad = copy(world["a"], tmp_path / f"a{i}")
        base = tmp_path / f"b{i}"
        base.mkdir()
        for p in world["gpt2"].iterdir():
            (base / p.name).symlink_to(p) if p.name != SHARD else shutil.copyfile(p, base / SHARD)
        target = ad / WEIGHTS if i % 2 else base / SHARD
        data = bytearray(target.read_bytes())
        pos = rng.randrange(_header_span(target))
        data[pos] = rng.choice([rng.randrange(256), ord(rng.choice('0123456789{}[]",:FIU '))])
        target.write_bytes(bytes(data))
        out = tmp_path / f"o{i}"
        rc, _, err = sum_into(capsys, base, out, ad)
        assert rc in (0, 2), (rc, err)
        if not _library_opens(target):  # at least as strict as the safetensors library
            assert rc == 2, (pos, err)
        seen[rc] += 1
        if rc == 2:
            assert_refused(rc, err, out)
        else:
            _check_output_loads(out)
        shutil.rmtree(ad)
        shutil.rmtree(base)
        shutil.rmtree(out, ignore_errors=True)
    assert seen[0] > 0 and seen[2] > 0, seen  # both ends are exercised
    assert time.perf_counter() - t0 < 60


def _dead_temporary(parent: Path, target: str) -> Path:
    """A temporary made by a process that then exits without finishing (as
    after kill -9): its owner.json names a pid that is gone."""
    code = "import sys; from pathlib import Path; from loramix.io.outputs import new_temporary; "
    code += "print(new_temporary(Path(sys.argv[1]), sys.argv[2]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, str(parent), target], capture_output=True, text=True,
                       env=env, check=True, timeout=120)  # fmt: skip
    return Path(p.stdout.strip())


def test_cache_clean_removes_stale_cache_temporaries(tmp_path, capsys):
    from loramix.io.outputs import new_temporary
    from loramix.scenario.cache import Cache

    kind = tmp_path / "cache" / "adapter"
    kind.mkdir(parents=True)
    dead = _dead_temporary(kind, "0123abcd")
    live = new_temporary(kind, "4567ef01")
    foreign = kind / ".lmx-notours"
    foreign.mkdir()  # no owner.json: not ours to judge
    rc, out, err = cli(capsys, "cache", "clean", "--dir", tmp_path / "cache")
    assert rc == 0 and "removed 1 stale temporary" in out, err
    assert not dead.exists() and live.exists() and foreign.exists()
    dead = _dead_temporary(kind, "89abcdef")
    Cache(tmp_path / "cache")  # a scenario run sweeps at start too
    assert not dead.exists() and live.exists()


def test_cache_clean_removes_killed_gguf_imports(tmp_path, capsys, monkeypatch):
    """A GGUF import killed mid-write leaves ``bases/.<sha>-...tmp-*``:
    ``cache clean`` removes it unless an import of that file holds its lock
    now. A --dir that does not exist is refused in one line; a default
    cache not made yet is nothing to clean."""
    from loramix.gguf_import import _lock

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bases = tmp_path / "home" / "bases"
    dead = bases / f".{'a' * 64}-float32-r2.tmp-0123abcd"
    busy = bases / f".{'b' * 64}-float32-r2.tmp-4567ef01"
    done = bases / f"{'c' * 64}-float32-r2"
    for d in (dead, busy, done):
        d.mkdir(parents=True)
    with _lock(bases / f"{'b' * 64}.lock"):  # an import of that file under way
        rc, out, err = cli(capsys, "cache", "clean")
    assert rc == 0, err
    assert out.splitlines() == [
        f"no scenario cache at {Path('.loramix-cache')}: nothing to clean",
        f"removed 1 temporary folder of killed GGUF imports from {bases}",
    ], out
    assert not dead.exists() and busy.is_dir() and done.is_dir()
    rc, out, err = cli(capsys, "cache", "clean")
    assert rc == 0 and not busy.exists() and "removed 1 temporary folder" in out
    rc, out, err = cli(capsys, "cache", "clean", "--dir", tmp_path / "typo")
    assert (
        rc == 2 and out == "" and len(err.splitlines()) == 1 and "typo" in err and "does not exist" in err
    ), err


# A writer of the per-user cache stopped just before its rename: os.replace announces the
# temporary it would rename and hangs, so the test kills the process mid-write, as kill -9 does.
_WRITER = r"""
import os, sys, time
from pathlib import Path
def hang(src, dst):
    print(src, flush=True)
    time.sleep(600)
os.replace = hang
if sys.argv[1] == "sha256":
    from loramix.io.filehash import cached_file_sha256
    cached_file_sha256(Path(sys.argv[2]))
elif sys.argv[1] == "layouts":
    from loramix.io import model_folder
    model_folder.build_skeleton = lambda folder: {"built": True, "prefix": None, "layouts": {}, "tied": {}}
    model_folder._cached_skeleton(Path("."), sys.argv[2].encode())
else:
    from loramix.native import library
    library("ties")
"""
# A compiler that writes its output and then takes its time: orphaned when the build is killed.
_SLOW_CC = """#!/bin/sh
[ "$1" = --version ] && { echo slow-cc 1; exit 0; }
while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done
echo half > "$out"
echo "$$ $out" > "$LMX_TEST_SAYS.tmp" && mv "$LMX_TEST_SAYS.tmp" "$LMX_TEST_SAYS"
exec sleep 600
"""


def test_cache_clean_removes_killed_writers_temporaries_in_the_user_cache(tmp_path, capsys, monkeypatch):
    """Real processes write the per-user cache (a file's sha256, a base's
    layouts, a kernel build whose compiler is orphaned) and are killed with
    SIGKILL before their rename: ``cache clean`` removes their temporaries
    and says so; those of live writers stay (the other sha256 writer, the
    other build), as does one of another host and a young one named by the
    pid alone (older loramix), whose old twin goes, as does one whose pid
    now belongs to another process (here: this one, started at another time)."""
    import select
    import socket

    from loramix.io.outputs import ORPHAN_SECONDS, _short_hash

    home = tmp_path / "home"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(home))
    monkeypatch.chdir(tmp_path)
    cc = tmp_path / "slow-cc"
    cc.write_text(_SLOW_CC)
    cc.chmod(0o755)
    hashed = tmp_path / "weights.bin"
    hashed.write_bytes(b"w" * 100)
    os.utime(hashed, (time.time() - 10, time.time() - 10))  # old enough for its hash to be kept
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE_DIR": str(home), "CC": str(cc),
           "LORAMIX_NATIVE": "1"}  # fmt: skip
    procs, orphans = {}, []

    def start(name, *args):
        says = tmp_path / f"{name}.says"
        procs[name] = subprocess.Popen([sys.executable, "-c", _WRITER, *map(str, args)], stdout=subprocess.PIPE,
                                       text=True, env={**env, "LMX_TEST_SAYS": str(says)})  # fmt: skip
        return says

    def temporary(name, says=None) -> Path:
        """The temporary the writer ``name`` made: the one it is about to rename, or its compiler's output."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert procs[name].poll() is None, f"writer {name} exited"
            if says is None and select.select([procs[name].stdout], [], [], 0.2)[0]:
                return Path(procs[name].stdout.readline().strip())
            if says is not None and says.exists():
                pid, path = says.read_text().split()
                orphans.append(int(pid))
                return Path(path)
            time.sleep(0.05)
        raise AssertionError(f"writer {name} made no temporary")

    try:
        names = {n: start(n, *a) for n, *a in [("sha-dead", "sha256", hashed), ("sha-live", "sha256", hashed),
                                              ("layouts-dead", "layouts", "{}"), ("native-dead", "native"),
                                              ("native-live", "native")]}  # fmt: skip
        tmps = {n: temporary(n, says if n.startswith("native") else None) for n, says in names.items()}
        assert len(set(tmps.values())) == len(tmps) and all(t.is_file() for t in tmps.values()), tmps
        for n in ("sha-dead", "layouts-dead", "native-dead"):
            procs[n].kill()  # SIGKILL; native-dead's compiler lives on
            procs[n].wait(timeout=60)
        sha256, layouts = home / "sha256", home / "layouts"
        here, there = _short_hash(socket.gethostname()), _short_hash("another-host")
        reused = sha256 / f"{TMP_PREFIX}0000aaaa.{_short_hash('x.txt')}.{here}.{os.getpid()}.1.tmp"
        foreign = sha256 / f"{TMP_PREFIX}0000bbbb.{_short_hash('x.txt')}.{there}.{os.getpid()}.1.tmp"
        old, young = layouts / f"{'a' * 24}.tmp{os.getpid()}", sha256 / f"{'b' * 32}.tmp{os.getpid()}.1"
        for f in (reused, foreign, old, young):
            f.write_text("half")
        t = time.time() - ORPHAN_SECONDS - 5
        os.utime(old, (t, t))
        rc, out, err = cli(capsys, "cache", "clean")
        assert rc == 0, err
        assert out.splitlines()[1:] == [
            f"removed 5 temporary files of killed writers from {home} (layouts/, native/, sha256/)"
        ], out
        gone = [tmps["sha-dead"], tmps["layouts-dead"], tmps["native-dead"], reused, old]
        assert [p for p in gone if p.exists()] == []
        assert all(p.exists() for p in (tmps["sha-live"], tmps["native-live"], foreign, young))
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=60)
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- scenario check catches what scenario run would fail on -------------------------------------------------

# the smallest valid scenario, shared with tests/test_scenario.py
SCENARIO = GOOD


@pytest.fixture(scope="module")
def llama_with_tokenizer(world, tmp_path_factory):
    """The tiny Llama base with a real tokenizer (a byte-level BPE trained on the spot)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = copy(world["llama"], tmp_path_factory.mktemp("tok") / "llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["1 + 2 = 3", "two plus two is four"], trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(base))
    return base


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (("rank = 4", "rank = 1000000000"), "adapters.rank", "above 128"),
        (('name = "v"', 'name = "v"\nseeds = [99999999999999999999]'), "seeds", "not a seed"),
        (('name = "v"', 'name = "v"\nseeds = [-1]'), "seeds", "not a seed"),
        (('name = "v"', 'name = "v"\ndata_seed = 9223372036854775808'), "data_seed", "not a seed"),
        (("train = 10\neval = 5\n[domains.b]", "train = 1000000000\neval = 5\n[domains.b]"), "domains.a.train",
         "at most 100000"),
        (('"synthetic:units"', '"synthetic:units?seed=99999999999999999999"'), "domains.b.data", "not a seed"),
        (("rank = 4", "rank = 4\ntargets = ['q_proj']"), "adapters.targets", "names no 2-D weight"),
    ],
)  # fmt: skip
def test_scenario_check_bounds_what_run_can_do(tmp_path, capsys, edit, key, words):
    scen = tmp_path / "s.toml"
    scen.write_text(SCENARIO.replace(*edit))
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, "scenario", "check", scen)
    assert_refused(rc, err, None, scen, key, words)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_config_field_of_the_wrong_type_names_config_json(llama_with_tokenizer, tmp_path, capsys, command):
    """transformers reads config.json to load the tokenizer too: a field of the
    wrong type there was said as 'tokenizer does not load', naming the folder."""
    base = copy(llama_with_tokenizer, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "vocab_size": "128"}))
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    out = tmp_path / "out"
    args = [] if command == "eval" else ["--steps", "1", "--out", out]
    rc, _, err = cli(capsys, command, "--quiet", "--base", base, "--data", data, *args)
    line = assert_refused(rc, err, out, base / "config.json", "vocab_size")
    assert "tokenizer" not in line, line


@pytest.fixture(scope="module")
def trained_adapter(llama_with_tokenizer, tmp_path_factory):
    """A LoRA ``loramix train`` made on the tiny Llama, with its data file."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) + "\n" for i in range(20))
    )
    args = ["train", "--quiet", "--base", llama_with_tokenizer, "--data", data, "--steps", "1", "--rank", "2",
            "--out", root / "ad"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return root / "ad", data


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda r: r.update(inputs="x"), "inputs are not a list"),
        (lambda r: r["parameters"].update(seed="0"), "parameters.seed is not an integer"),
        (lambda r: r.update(method=5), "method is not a string"),
        (lambda r: r["inputs"][1].update(path=5), "data input whose path is not a string"),
    ],
)
def test_held_out_refuses_a_training_record_with_fields_of_the_wrong_type(
    llama_with_tokenizer, trained_adapter, tmp_path, capsys, damage, words
):
    """--held-out rebuilds the training split from loramix.json: a record read as
    JSON but with a method, inputs or seed of the wrong type was taken for one
    of no training data, or split by another permutation, and every training
    record (or others) scored as held out with exit 0."""
    src, data = trained_adapter
    ad = copy(src, tmp_path / "ad")
    rec = json.loads((ad / "loramix.json").read_text())
    assert rec["inputs"][1]["kind"] == "data"
    damage(rec)
    (ad / "loramix.json").write_text(json.dumps(rec))
    args = ["eval", "--quiet", "--base", llama_with_tokenizer, "--adapter", ad, "--data", data, "--held-out"]
    rc, _, err = cli(capsys, *args)
    assert_refused(rc, err, None, "--held-out", ad / "loramix.json", words)


@pytest.mark.parametrize("length", [("--steps", "3"), ("--epochs", "1")])
def test_train_warmup_beyond_the_run_refused(llama_with_tokenizer, tmp_path, capsys, length):
    """A warm-up longer than the run never reaches --lr; the run's length is
    --steps, or (with --epochs) the batches of the data, known once it is read."""
    out = tmp_path / "t"
    rc, _, err = cli(capsys, "train", "--base", llama_with_tokenizer, "--data", "synthetic:arith", "--out", out,
                     "--quiet", *length, "--warmup", "100000")  # fmt: skip
    assert_refused(rc, err, out, "--warmup", "100000 steps is more than the run's")
    rc, _, err = cli(capsys, "train", "--base", llama_with_tokenizer, "--data", "synthetic:arith", "--out", out,
                     "--quiet", "--steps", "3", "--warmup", "3")  # fmt: skip
    assert rc == 0, err  # a warm-up as long as the run reaches --lr at its last step


def test_scenario_check_reads_the_base_folder(world, llama_with_tokenizer, tmp_path, capsys):
    def check(base, *edits):
        text = SCENARIO.replace("[base.build]\nsteps = 5", f'[base]\npath = "{base}"')
        for e in edits:
            text = text.replace(*e)
        (tmp_path / "s.toml").write_text(text)
        return cli(capsys, "scenario", "check", tmp_path / "s.toml")

    rc, _, err = check(llama_with_tokenizer)
    assert rc == 0, err
    rc, _, err = check(world["llama"])  # save_pretrained of a model writes no tokenizer
    assert_refused(rc, err, None, "base.path", "no tokenizer")
    rc, _, err = check(llama_with_tokenizer, ("rank = 4", "rank = 17"))  # k_proj is 16 x 32
    assert_refused(rc, err, None, "adapters.rank", "above 16")
    rc, _, err = check(llama_with_tokenizer, ("rank = 4", "rank = 4\ntargets = ['c_attn']"))
    assert_refused(rc, err, None, "adapters.targets", "c_attn")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_take_the_usual_file_modes(world, tmp_path, capsys, umask):
    """Every file of an output has the mode a new file gets (0o666 less the
    umask): safetensors writes its files owner-only, so an adapter output's
    weights were 0o600 whatever the umask, unreadable to the other users of
    a shared folder."""
    import stat

    old = os.umask(umask)
    try:
        assert cli(capsys, "sum", world["a"], world["b"], "--out", tmp_path / "adapter")[0] == 0
        assert sum_into(capsys, world["gpt2"], tmp_path / "model", world["a"], world["b"])[0] == 0
    finally:
        os.umask(old)
    files = [p for out in ("adapter", "model") for p in (tmp_path / out).rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files
    }


def test_symlink_loops_and_the_current_folder_as_outputs_are_one_line(world, tmp_path, capsys, monkeypatch):
    """An output, a plot or a base through a symlink loop, and --out naming
    the current folder or one above it (with --force): one line, exit 2,
    before any work. They gave RuntimeError tracebacks (Path.resolve on a
    loop), and --out . --force an EBUSY traceback after the whole merge."""
    monkeypatch.chdir(tmp_path)
    os.symlink("loop1", "loop2")
    os.symlink("loop2", "loop1")
    a, b = world["a"], world["b"]
    cases = [
        (["sum", a, "--out", "loop1/x"], "loop1/x", "symlink loop"),
        (["sum", a, "--out", "loop1", "--force"], "loop1", "symlink loop"),
        (["sum", a, "--into", "loop1", "--out", "zz"], "loop1", "symlink loop"),
        (["merge", "-m", "ties", "--density", "0.5", a, b, "--into", world["gpt2"], "--out", "loop1/q"], "loop1/q", "symlink loop"),
        (["similarity", a, b, "--plot", "loop1/x.png"], "loop1/x.png", "symlink loop"),
        (["sum", a, "--into", world["gpt2"], "--out", ".", "--force"], ".", "the current folder"),
        (["sum", a, b, "--out", "..", "--force"], "..", "the current folder"),
    ]  # fmt: skip
    for argv, *needles in cases:
        code, _, err = cli(capsys, *argv)
        assert_refused(code, err, None, *needles)
    assert sorted(os.listdir(tmp_path)) == ["loop1", "loop2"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [([0], "model.layers.1.self_attn.q_proj is in layer 1, not in layers_to_transform [0]"),
     (0, "is in layer 1, not in layers_to_transform [0]"),
     ("1", "layers_to_transform"), ([-1], "layers_to_transform")],
)  # fmt: skip
def test_layers_to_transform_must_cover_the_tensors(tmp_path, capsys, value, needle):
    """An adapter whose tensors are on layer 1 and whose config says
    another layer (PEFT would wrap that layer, and find no factors for it)
    is refused naming the module, as target_modules are checked; a value
    of another type is refused naming the field. It was accepted."""
    ad = make_peft_adapter(tiny_llama(), tmp_path / "ad", seed=1, r=2, target_modules=["q_proj"],
                           layers_to_transform=[1])  # fmt: skip
    assert cli(capsys, "inspect", ad)[0] == 0
    edit_config(ad, layers_to_transform=value)
    rc, _, err = cli(capsys, "inspect", ad)
    assert_refused(rc, err, None, needle)


class _Experts(torch.nn.Module):
    """A mixture-of-experts block as PEFT sees one: ``experts.J.w1`` inside a
    numbered layer, so a module's name holds two indices."""

    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj = torch.nn.Linear(8, 8, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Module() for _ in range(3))
        for e in self.experts:
            e.w1 = torch.nn.Linear(8, 8, bias=False)


def _moe():
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList(_Experts() for _ in range(3))
    return net


def _peft_modules(net, folder: Path, **lora) -> set[str]:
    """Save a PEFT LoRA of ``lora`` on a copy of ``net`` to ``folder``, load it
    back onto another copy (``PeftModel.from_pretrained``) and return the
    modules that carry it."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(net), LoraConfig(r=2, init_lora_weights=False, **lora))
    pm.save_pretrained(folder)
    model = PeftModel.from_pretrained(copy.deepcopy(net), str(folder))
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if "default" in getattr(m, "lora_A", {})
    }


@pytest.mark.parametrize(
    "lora",
    [dict(target_modules=["w1"], layers_to_transform=[1]),
     dict(target_modules=["w1", "q_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
     dict(target_modules=["model.layers.2.self_attn.q_proj", "w1"], layers_to_transform=0)],
)  # fmt: skip
def test_layers_to_transform_selects_as_peft_does(tmp_path, capsys, lora):
    """PEFT's layer of a module is its FIRST numbered part (``model.layers.1.
    experts.2.w1`` is in layer 1, not 2), and a module named in full in
    ``target_modules`` is wrapped in whatever layer: loramix reads exactly
    the modules PEFT puts the adapter on. It took the last number (refusing
    ``experts.0`` of layer 1 as "in layer 0") and checked named modules' layers."""
    from loramix.io.adapter_files import load_adapter

    wrapped = _peft_modules(_moe(), tmp_path / "ad", **lora)
    assert wrapped and any(".experts." in n for n in wrapped)
    assert cli(capsys, "inspect", tmp_path / "ad")[0] == 0
    assert set(load_adapter(tmp_path / "ad").modules) == wrapped


@pytest.mark.parametrize(
    ("fields", "needle"),
    [(dict(layers_to_transform=[0, 1]), "layers_to_transform cannot be used when target_modules is a regular"),
     (dict(layers_to_transform=[]), "layers_to_transform cannot be used"),
     (dict(layers_pattern="layers"), "layers_pattern cannot be used"),
     (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern is given without layers_to_transform")],
)  # fmt: skip
def test_layer_fields_peft_refuses_are_refused(world, tmp_path, capsys, fields, needle):
    """PEFT's ``LoraConfig`` refuses ``layers_to_transform`` / ``layers_pattern``
    beside a regular expression ``target_modules`` (its matching ignores the
    layers then) and a ``layers_pattern`` alone: PEFT cannot load such an
    adapter, so loramix refuses it naming the config, where it read every
    factor (the regex covers them all) as if the layers applied."""
    from peft import PeftModel

    from loramix.io.adapter_files import load_adapter

    ad = make_peft_adapter(tiny_llama(), tmp_path / "ad", seed=1, r=2, target_modules=r".*\.q_proj")
    assert len(load_adapter(ad).modules) == 2
    edit_config(ad, **fields)
    with pytest.raises(ValueError, match="layers_"):
        PeftModel.from_pretrained(tiny_llama(), str(ad))
    rc, _, err = cli(capsys, "inspect", ad)
    assert_refused(rc, err, None, ad / CONFIG, needle)


def _peft_wraps(base: Path, adapter: Path) -> set[str]:
    """The modules PEFT's ``PeftModel.from_pretrained`` puts the adapter on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if "default" in getattr(m, "lora_A", {})
    }


@pytest.mark.parametrize(
    ("fields", "needle", "peft"),
    [(dict(target_modules=r".*\.c_attn"), r'transformer.h.0.attn.c_proj does not match target_modules ".*\.c_attn"',
      "some"),
     (dict(target_modules="zzz"), 'does not match target_modules "zzz"', "none"),
     (dict(target_modules=[]), "is not in target_modules []", "none"),
     (dict(exclude_modules=["c_fc"]), "transformer.h.0.mlp.c_fc is in exclude_modules ['c_fc']", "some"),
     (dict(exclude_modules=r".*\.h\.1\..*"), "transformer.h.1.attn.c_attn is in exclude_modules", "some"),
     (dict(target_modules="("), "target_modules must be", None),
     (dict(exclude_modules=7), "exclude_modules must be", None)],
)  # fmt: skip
def test_target_and_exclude_modules_must_select_the_tensors(world, tmp_path, capsys, fields, needle, peft):
    """PEFT wraps only the modules its config selects (``target_modules`` as a
    regular expression matching the whole name, or a list of last names; none
    in ``exclude_modules``) and drops the factors of any other without a word
    (``peft``: "some" of the file's modules are wrapped; "none": PEFT refuses
    to load it): a config selecting fewer modules than the file has factors
    for is refused naming the first such module, as a list of other names
    was. A regular expression, an empty list and exclude_modules were not
    checked (the sum merged deltas PEFT never applies); a bad regular
    expression or an exclude_modules of another type is refused naming the field."""
    ad = copy(world["a"], tmp_path / "ad")
    edit_config(ad, **fields)
    every = {
        f"transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    if peft == "some":
        assert set() < _peft_wraps(world["gpt2"], ad) < every
    elif peft == "none":
        with pytest.raises(ValueError):  # PEFT's NoMatchingPeftModuleError
            _peft_wraps(world["gpt2"], ad)
    out = tmp_path / "out"
    code, _, err = sum_into(capsys, world["gpt2"], out, ad)
    assert_refused(code, err, out, ad, needle)
    code, _, err = cli(capsys, "similarity", ad, world["b"])
    assert_refused(code, err, None, ad, needle)


def test_null_target_modules_take_pefts_default_for_the_base(world, tmp_path, capsys):
    """An adapter whose config has no ``target_modules``: PEFT, loading it onto
    a base, takes its default for the model type (GPT-2: ``c_attn`` only) and
    drops the factors of any other module. Where loramix has the base (``sum
    --into``, ``similarity --base``, ``eval``'s attach and merge) it checks the
    adapter against that default as against a list it names: one on
    ``c_attn`` alone merges to PEFT's ``merge_and_unload``; one with
    ``c_proj`` and ``c_fc`` factors too, or outside
    ``layers_to_transform``, is refused naming the module (all were merged,
    deltas PEFT never applies). Without a base every factor is read, with a
    warning (similarity, an adapter written)."""
    import re

    from peft import PeftModel
    from safetensors.torch import load_file as load_st
    from transformers import AutoModelForCausalLM

    from loramix.errors import AdapterError
    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters, merge_into_model

    every = copy(world["a"], tmp_path / "every")
    edit_config(every, target_modules=None)
    assert _peft_wraps(world["gpt2"], every) == {f"transformer.h.{i}.attn.c_attn" for i in (0, 1)}
    needle = "transformer.h.0.attn.c_proj is not in target_modules ['c_attn'] (target_modules is null: PEFT's default"
    code, _, err = sum_into(capsys, world["gpt2"], tmp_path / "out", every)
    assert_refused(code, err, tmp_path / "out", every, needle)
    code, _, err = cli(capsys, "similarity", every, world["b"], "--base", world["gpt2"])
    assert_refused(code, err, None, every, needle)
    model = AutoModelForCausalLM.from_pretrained(str(world["gpt2"]))
    for apply in (attach_adapters, merge_into_model):  # eval's in-memory paths
        with pytest.raises(AdapterError, match=re.escape(needle)):
            apply(model, [load_adapter(every)])
    for args in (
        ["similarity", every, world["b"]],
        ["sum", "--no-progress", every, "--out", tmp_path / "ad"],
    ):
        code, _, err = cli(capsys, *args)  # no base: every factor, and one line saying so
        assert code == 0 and err.count("loramix: warning: target_modules is null in") == 1, err
        assert f"{every} (8 modules)" in err, err

    attn = make_peft_adapter(tiny_gpt2(), tmp_path / "attn", seed=4, r=2, target_modules=["c_attn"])
    edit_config(attn, target_modules=None)
    assert sum_into(capsys, world["gpt2"], tmp_path / "merged", attn)[0] == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world["gpt2"])), str(attn))
    want = peft.merge_and_unload().state_dict()
    got = load_st(str(tmp_path / "merged" / "model.safetensors"))
    assert "transformer.h.1.attn.c_attn.weight" in got
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=key)

    edit_config(attn, layers_to_transform=[1])
    assert _peft_wraps(world["gpt2"], attn) == {"transformer.h.1.attn.c_attn"}
    code, _, err = sum_into(capsys, world["gpt2"], tmp_path / "out", attn)
    assert_refused(code, err, tmp_path / "out", "transformer.h.0.attn.c_attn is in layer 0", "null")


def test_null_target_modules_on_a_base_peft_has_no_default_for(world, tmp_path):
    """PEFT has no default targets for OLMo 2 and refuses an adapter without
    ``target_modules`` there; so does loramix (it merged every factor)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Olmo2Config

    from loramix.errors import AdapterError
    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters

    ad = copy(world["la"], tmp_path / "ad")
    edit_config(ad, target_modules=None)
    cfg = Olmo2Config(vocab_size=128, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    with pytest.raises(ValueError, match="target_modules"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_config(cfg), str(ad))
    with pytest.raises(AdapterError, match="PEFT has no default targets for model type 'olmo2'"):
        attach_adapters(AutoModelForCausalLM.from_config(cfg), [load_adapter(ad)])


def test_target_modules_selecting_every_tensor_accepted(world, tmp_path, capsys):
    """A regular expression, PEFT's ``all-linear`` and an exclude_modules naming
    modules without factors select every module of the file: read as before."""
    for i, fields in enumerate([dict(target_modules=r".*\.(c_attn|c_proj|c_fc)"), dict(target_modules="all-linear"),
                                dict(exclude_modules=["lm_head"]), dict(exclude_modules=r".*\.wte")]):  # fmt: skip
        ad = copy(world["a"], tmp_path / f"ad{i}")
        edit_config(ad, **fields)
        assert cli(capsys, "similarity", ad, world["a"])[0] == 0, fields
        assert cli(capsys, "sum", "--no-progress", ad, "--out", tmp_path / f"out{i}")[0] == 0, fields


def test_a_full_disk_in_the_study_cache_names_the_artifact(tmp_path):
    """A full disk while an artifact is made names that artifact in the cache,
    not the temporary it was written in (which is gone when the line is read)."""
    from loramix.scenario.cache import Cache, make_key

    cache = Cache(tmp_path / "cache")

    def make(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "a" / "model.safetensors"))

    with pytest.raises(OSError) as e:
        cache.get_or_make("adapter", {"x": 1}, make)
    target = cache.path("adapter", make_key("adapter", {"x": 1}))
    assert e.value.filename == str(target), e.value.filename
    assert [p.name for p in target.parent.iterdir()] == []


def test_a_folder_appearing_at_the_report_path_during_a_study_is_left_alone(tmp_path, capsys, monkeypatch):
    """Not there at the start, made by someone else while the study ran: the
    report is refused at the end in one line (the study stays cached), the
    folder is left as it is, as one there at the start is."""
    from loramix.scenario import report

    scen = tmp_path / "s.toml"
    scen.write_text(GOOD)
    out = tmp_path / "rep"
    real = report.write_report

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(report, "write_report", meanwhile)
    rc, _, err = cli(capsys, "scenario", "run", scen, "--out", out, "--cache", tmp_path / "cache", "--quiet")
    assert_refused(rc, err, None, out, "appeared during the study")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "rep", "s.toml"]


@pytest.mark.parametrize("where", ["the scenario's folder", "inside the cache", "the data's folder"])
def test_a_report_folder_holding_an_input_is_refused_even_with_force(tmp_path, capsys, where):
    """The report folder is replaced whole: one that holds the scenario file or
    a domain's data, or lies inside the cache, is refused before the study,
    --force or not (it replaced them all, deleting the scenario file, the
    data and the cache)."""
    data = tmp_path / "qa"
    data.mkdir()
    rows = "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20))
    (data / "qa.jsonl").write_text(rows)
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD.replace('"synthetic:units"', f'"{data / "qa.jsonl"}"'))
    cache = tmp_path / "cache"
    out, named = {"the scenario's folder": (tmp_path, scen), "inside the cache": (cache / "rep", cache),
                  "the data's folder": (data, data / "qa.jsonl")}[where]  # fmt: skip
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, _, err = cli(capsys, "scenario", "run", scen, "--out", out, "--cache", cache, "--force", "--quiet")
    assert_refused(rc, err, None, out, named, "output would overwrite the input")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (data / "qa.jsonl").read_text() == rows


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_bytes().rsplit(b")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _cmdline(pid: int) -> bytes:
    """``pid``'s command line; empty for a process that has exited meanwhile."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{q}").exists() and b"Z" not in Path(f"/proc/{q}/stat").read_bytes().rsplit(b")", 1)[1][:3]
                   for q in pids):  # fmt: skip
            return True
        time.sleep(0.1)
    return False


def _study_with_workers_making(tmp_path, before: str):
    """``scenario run --jobs 2`` on ``GOOD``, returned once both workers are up
    and a step is being made: ``(process, cache, worker pids)``; the test is
    skipped, saying it ended ``before`` that, if the study never got there."""
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE": str(cache)}
    p = subprocess.Popen([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(tmp_path / "r"),
                          "--quiet", "--jobs", "2"], stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        workers = [q for q in _children(p.pid) if b"multiprocessing" in _cmdline(q)]
        if len(workers) >= 2 and list(cache.glob(f"*/{TMP_PREFIX}*/{PAYLOAD}")):
            return p, cache, workers  # both workers up, a step being made
        time.sleep(0.05)
    p.kill()
    pytest.skip(f"the study ended (or never got going) before {before}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["term", "kill"])
def test_a_study_with_workers_stops_cleanly(tmp_path, how):
    """``scenario run --jobs 2`` stopped while its workers make artifacts.
    SIGTERM: one line and exit 143 as a serial run (workers printed their
    tracebacks, and an idle one could keep the run waiting for ever), no
    temporary left in the cache. kill -9: the workers stop too (they went on
    computing, orphaned)."""
    p, cache, workers = _study_with_workers_making(tmp_path, "it could be stopped")
    if how == "term":
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
        err = p.stderr.read()
        assert err.splitlines() == ["loramix: terminated"], err  # no blank line before it either
        assert _gone(workers, 5)
        assert list(cache.glob(f"*/{TMP_PREFIX}*")) == []
    else:
        p.kill()
        p.wait(timeout=60)
        assert _gone(workers, 60), "workers outlived a killed run"


def _processes_with(env_entry: str) -> list[int]:
    """The live processes (not zombies) whose environment holds ``env_entry``
    (``NAME=value``): a run's workers inherit its environment."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and env_entry.encode() in (d / "environ").read_bytes().split(b"\0"):
                if b"Z" not in (d / "stat").read_bytes().rsplit(b")", 1)[1][:3]:
                    out.append(int(d.name))
        except OSError:
            pass
    return out


def _study_with_a_damaged_training_split(tmp_path, domain="a", text=GOOD):
    """GOOD's scenario (or ``text``) and a cache where ``domain``'s training
    split (a data artifact, checked when the study's data was) is not JSON:
    an error a worker meets only when it trains on it. Returns (scenario,
    cache, damaged file)."""
    from loramix.scenario.cache import Cache
    from loramix.scenario.config import load_scenario
    from loramix.scenario.plan import plan, prepare_data

    scen = tmp_path / "s.toml"
    scen.write_text(text)
    cache = tmp_path / "cache"
    sc = load_scenario(scen)
    st = next(st for st in plan(sc, prepare_data(sc)) if st.id == f"data/{domain}/train")
    # made so (an entry damaged after it was made is remade, not read: tests/test_scenario_cache.py)
    folder = Cache(cache).get_or_make(
        "data", st.spec, lambda tmp: (tmp / "train.jsonl").write_text('{"question": broken\n')
    )
    return scen, cache, folder / "train.jsonl"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_bad_input_met_in_a_worker_is_one_line(tmp_path):
    """A bad input that a worker meets (here a training split that is no
    longer JSON) is the one line a serial run gives, exit 2, the workers
    gone and nothing left in the cache or at --out. It was a traceback of
    BrokenProcessPool, exit 1: the error did not unpickle in the parent."""
    scen, cache, bad = _study_with_a_damaged_training_split(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(tmp_path / "r"),
                        "--quiet", "--jobs", "2"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [
        f"loramix: error: {bad}: line 1: invalid JSON (Expecting value at column 14)"
    ], p.stderr
    assert _gone(_processes_with(f"LORAMIX_CACHE={cache}"), 10), "workers outlived the failed run"
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not (tmp_path / "r").exists()


# GOOD with adapters that train long enough to be stopped mid-step
LONG_ADAPTERS = GOOD.replace("rank = 4", "rank = 4\nsteps = 5000")


def _ray_study(tmp_path, scen, cache):
    """``scenario run --executor ray --jobs 2`` (a local Ray instance) of
    ``scen`` on ``cache``, in its own process group, stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(tmp_path / "r"),
                             "--quiet", "--executor", "ray", "--jobs", "2"], stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how, code, line", [("term", 143, "loramix: terminated"),
                                             ("int", 130, "loramix: interrupted")])  # fmt: skip
def test_a_ray_study_stopped_mid_step_leaves_nothing(tmp_path, how, code, line):
    """``--executor ray`` stopped (a kill; Ctrl-C to the process group) while
    its tasks train adapters: one line and the usual exit, no temporary in
    the cache, no process of the local Ray instance left. The tasks were not
    cancelled: the end of the run force-exited their workers mid-step,
    leaving the half-made adapters' temporaries; and a kill arriving while
    the run waited in ray.wait (Ray runs signal handlers there, and passes on
    only KeyboardInterrupt and SystemExit) was left pending until a step
    finished (here about a minute), then was a SystemError traceback, exit 1."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'loramix[ray]')")
    scen, cache = tmp_path / "s.toml", tmp_path / "cache"
    scen.write_text(LONG_ADAPTERS)
    p = _ray_study(tmp_path, scen, cache)
    deadline = time.monotonic() + 240
    while (
        p.poll() is None
        and time.monotonic() < deadline
        and not list(cache.glob(f"adapter/{TMP_PREFIX}*/{PAYLOAD}"))
    ):
        time.sleep(0.1)
    if p.poll() is not None or time.monotonic() >= deadline:
        p.kill()
        pytest.skip(
            f"the study ended (or never got going) before an adapter was being made: {p.stderr.read()}"
        )
    ray_processes = _processes_with(f"LORAMIX_CACHE={cache}")
    time.sleep(1.5)  # the run waits on its tasks (in ray.wait)
    if how == "term":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGINT)
    rc, err = p.wait(timeout=120), p.stderr.read()
    assert rc == code, err  # the run's stderr says why (a flake once showed only "1 != 143")
    assert [x for x in err.splitlines() if x] == [line], err
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not (tmp_path / "r").exists()
    assert len(ray_processes) > 3 and _gone(ray_processes, 15), "Ray's processes outlived the run"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_bad_input_met_in_a_ray_task_stops_the_others_cleanly(tmp_path):
    """A bad input met in one Ray task (domain b's damaged training split)
    while another trains (domain a's adapter, submitted first): the serial
    run's one line, exit 2, and the other task cancelled, so its half-made
    adapter is removed (its worker was force-exited mid-step, leaving the
    temporary)."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'loramix[ray]')")
    scen, cache, bad = _study_with_a_damaged_training_split(tmp_path, "b", LONG_ADAPTERS)
    p = _ray_study(tmp_path, scen, cache)
    made, deadline = set(), time.monotonic() + 300  # the adapters' temporaries seen being made
    try:
        while p.poll() is None and time.monotonic() < deadline:
            made.update(cache.glob(f"adapter/{TMP_PREFIX}*"))
            time.sleep(0.05)
        err = p.communicate(timeout=30)[1]
    finally:
        p.kill()
    assert p.returncode == 2, err
    assert err.splitlines() == [
        f"loramix: error: {bad}: line 1: invalid JSON (Expecting value at column 14)"
    ], err
    assert _gone(_processes_with(f"LORAMIX_CACHE={cache}"), 15), "Ray's processes outlived the failed run"
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not (tmp_path / "r").exists()
    assert made, "no adapter was being made as the run failed"


def test_a_ray_task_stops_when_its_run_makes_the_stop_flag(tmp_path):
    """A Ray task's step is stopped by its run's flag file (what the run
    makes as it stops, instead of ``ray.cancel``, which crashed the run in
    Ray's own check when it met a task just finishing): one not yet started
    does not run; one running gets a KeyboardInterrupt within a look or two,
    and unwinds; one that ends first is left alone, the watching thread gone."""
    import threading

    from loramix.scenario.executors import STOP_POLL_SECONDS, _stop_flag, _stopped_by

    flag = _stop_flag(tmp_path, "run1")
    with _stopped_by(flag):  # no flag: the step runs to its end
        time.sleep(3 * STOP_POLL_SECONDS)
    assert not [t for t in threading.enumerate() if t.name == "loramix-stop"]
    time.sleep(2 * STOP_POLL_SECONDS)  # no interrupt comes after the step

    unwound, t0 = [], time.monotonic()
    threading.Timer(0.3, flag.touch).start()
    with pytest.raises(KeyboardInterrupt):
        try:
            with _stopped_by(flag):
                while time.monotonic() - t0 < 30:  # a step's Python loop (training), not one long call
                    time.sleep(0.01)
        finally:
            unwound.append(time.monotonic() - t0)
    assert unwound and unwound[0] < 0.3 + 10 * STOP_POLL_SECONDS

    ran = []
    with pytest.raises(KeyboardInterrupt):
        with _stopped_by(flag):
            ran.append(1)
    assert ran == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cache_clean_removes_the_stop_flags_of_killed_runs(tmp_path, capsys):
    """A Ray run killed (kill -9) while it stopped its tasks left its stop flag
    in the cache for ever: its name now says the run's process
    (``_run_key``), and ``cache clean`` removes the flag once that process is
    gone; never a live run's (this process's), another host's, or one that
    names no process (an older loramix's)."""
    from loramix.io.outputs import owner_tag
    from loramix.scenario.executors import _run_key, _stop_flag

    code = "from loramix.scenario.executors import _run_key; print(_run_key())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dead_key = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                              timeout=120).stdout.strip()  # fmt: skip
    root = tmp_path / "cache"
    root.mkdir()
    dead, live = _stop_flag(root, dead_key), _stop_flag(root, _run_key())
    assert live.name.endswith("." + owner_tag()) and dead.name != live.name
    host, pid, start = dead_key.split(".", 1)[1].split(".")
    kept = [live, _stop_flag(root, "0" * 32), _stop_flag(root, f"{'1' * 32}.{'0' * 8}.{pid}.{start}")]
    for f in [dead, *kept]:
        f.touch()
    rc, out, err = cli(capsys, "cache", "clean", "--dir", root)
    assert rc == 0 and f"removed 1 stop flag of killed Ray runs from {root}" in out.splitlines(), (out, err)
    assert not dead.exists() and all(f.exists() for f in kept)


def test_cache_clean_removes_old_stop_flags_that_name_no_process_here(tmp_path, capsys):
    """A stop flag of an older loramix (``.stop-<32 hex>``, no owner tag) or of
    another host's run names no process this host can check: ``cache clean``
    kept it for ever. A run reads its flag only in the seconds it stops, so one
    over a day old is over and goes; a fresh one, this process's (however
    old), and a file that is no run's flag stay."""
    from loramix.scenario.executors import _run_key, _stop_flag

    root = tmp_path / "cache"
    root.mkdir()
    other_host = f"{'1' * 32}.{'0' * 8}.4242.17"
    old = [_stop_flag(root, "a" * 32), _stop_flag(root, other_host)]
    fresh = [_stop_flag(root, "b" * 32), _stop_flag(root, other_host.replace("1", "2", 32))]
    mine, other = _stop_flag(root, _run_key()), root / ".stop-notes"
    then = time.time() - 25 * 3600  # over a day old
    for f in [*old, *fresh, mine, other]:
        f.touch()
    for f in (*old, mine, other):
        os.utime(f, (then, then))
    rc, out, err = cli(capsys, "cache", "clean", "--dir", root)
    assert rc == 0 and f"removed 2 stop flags of killed Ray runs from {root}" in out.splitlines(), (out, err)
    assert not any(f.exists() for f in old) and all(f.exists() for f in (*fresh, mine, other))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum, says", [(signal.SIGKILL, "was killed by SIGKILL"),
                                          (signal.SIGTERM, "was terminated (SIGTERM)")])  # fmt: skip
def test_a_worker_killed_mid_study_is_one_line(tmp_path, signum, says):
    """kill -9 of one worker (what the out-of-memory killer does), or a plain
    kill, while the study makes an artifact: the run says so in one line
    naming the signal, exits 2 at once, stops the other worker, and leaves no
    temporary in the cache (a killed worker's is removed, as its owner is
    gone). It was a traceback of BrokenProcessPool, exit 1, the temporary
    left for the next run; then, for SIGTERM, "died" without the signal."""
    p, cache, workers = _study_with_workers_making(tmp_path, "a worker could be killed")
    # the worker making an artifact: its temporary is what a kill leaves
    os.kill(_a_maker(p, cache), signum)
    assert p.wait(timeout=60) == 2
    err = p.stderr.read()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"loramix: error: a worker process of the study {says}"
    ), err
    assert "a rerun resumes" in err, err
    assert _gone(workers, 10), "a worker outlived the failed run"
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not (tmp_path / "r").exists()


def _a_maker(p, cache: Path) -> int:
    """The pid of a worker making an artifact of the study ``p`` (its
    temporary's owner.json): an artifact can be finished, and its temporary
    renamed away, between the glob and the read, so a vanished one is skipped."""
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        for f in cache.glob(f"*/{TMP_PREFIX}*/owner.json"):
            try:
                return json.loads(f.read_text())["pid"]
            except (OSError, ValueError):  # renamed away, or being written
                continue
        time.sleep(0.01)
    p.kill()
    pytest.skip("the study ended before a worker making an artifact could be killed")


def _sigint_held(pid: int) -> bool:
    """Whether SIGINT is blocked or ignored in process ``pid`` (/proc's masks)."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    return any(int(fields[k], 16) & (1 << (signal.SIGINT - 1)) for k in ("SigBlk", "SigIgn"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_as_workers_start_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) just as
    the workers start: ``loramix: interrupted``, exit 130, and nothing from
    the workers. A worker took SIGINT from its birth until its initializer
    ignored it (its Python starting, importing torch: seconds), printing a
    KeyboardInterrupt traceback, or "Fatal Python error", beside the line;
    now it is born with SIGINT blocked (as multiprocessing's resource
    tracker is), which the test reads in /proc on first sight."""
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE": str(tmp_path / "cache")}
    p = subprocess.Popen([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(tmp_path / "r"),
                          "--quiet", "--jobs", "2"], stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # fmt: skip
    deadline, held = time.monotonic() + 120, None
    while p.poll() is None and time.monotonic() < deadline and held is None:
        for q in _children(p.pid):
            try:
                if b"spawn_main" in Path(f"/proc/{q}/cmdline").read_bytes():
                    held = _sigint_held(q)
                    break
            except (OSError, KeyError):
                pass
        else:
            time.sleep(0.002)
    if held is None:
        p.kill()
        pytest.skip("no worker seen starting")
    os.killpg(p.pid, signal.SIGINT)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a hang: not left running beside the next tests
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail("the study did not stop within 60 s of Ctrl-C")
    assert rc == 130
    err = p.stderr.read()
    assert held, "a worker was born taking SIGINT"
    assert err.splitlines() == ["loramix: interrupted"], err
    assert not (tmp_path / "r").exists()


def _interrupt_a_serial_study(tmp_path, terminal: bool) -> tuple[int, str]:
    """``scenario run --jobs 1`` stopped by Ctrl-C while it trains an adapter:
    ``(exit status, stderr)``. ``terminal``: on a pseudo-terminal, Ctrl-C
    typed (the byte its line discipline turns into SIGINT and echoes as
    ``^C``), stderr as the terminal shows it; else SIGINT to the process
    group and stderr a pipe."""
    import pty
    import select

    tmp_path.mkdir()
    scen, cache = tmp_path / "s.toml", tmp_path / "cache"
    scen.write_text(LONG_ADAPTERS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORAMIX_CACHE": str(cache)}
    argv = [
        sys.executable,
        "-m",
        "loramix",
        "scenario",
        "run",
        str(scen),
        "--out",
        str(tmp_path / "r"),
        "--jobs",
        "1",
    ]
    if terminal:
        pid, fd = pty.fork()
        if pid == 0:  # the child: stdin, stdout and stderr the terminal, its session's controlling one
            os.execve(sys.executable, argv, env)
    else:
        p = subprocess.Popen([*argv, "--quiet"], stderr=subprocess.PIPE, env=env, start_new_session=True)
        pid, fd = p.pid, p.stderr.fileno()
    out, sent, deadline = b"", False, time.monotonic() + 240
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's child ended
                break
            if not data:
                break
            out += data
        if not sent and list(cache.glob(f"adapter/{TMP_PREFIX}*/{PAYLOAD}")):
            time.sleep(0.5)  # in the training loop
            if terminal:
                os.write(fd, b"\x03")
            else:
                os.killpg(pid, signal.SIGINT)
            sent = True
    if not sent:
        os.kill(pid, signal.SIGKILL)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if terminal:
        os.close(fd)
    if not sent:
        pytest.skip(f"the study ended (or never got going) before an adapter was being made: {out!r}")
    assert list(cache.glob(f"*/{TMP_PREFIX}*")) == [] and not (tmp_path / "r").exists()
    return status, out.decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX terminals and process groups")
def test_ctrl_c_is_one_line_and_130(tmp_path):
    """Ctrl-C in a long command: ``loramix: interrupted``, exit 130, no
    traceback and nothing half made. click printed a blank line before it
    (for the terminal's ``^C`` echo, a line of its own in a pipe or a log);
    on a terminal the line now replaces the ``^C`` in place (a carriage
    return and an erase to the end of the line), no blank line between."""
    status, err = _interrupt_a_serial_study(tmp_path / "pipe", terminal=False)
    assert (status, err) == (130, "loramix: interrupted\n")
    status, shown = _interrupt_a_serial_study(tmp_path / "terminal", terminal=True)
    assert status == 130 and "^C" in shown, shown
    assert shown.endswith("\r\x1b[Kloramix: interrupted\r\n") and "\r\n\r\n" not in shown, repr(shown)
    assert "Traceback" not in shown and "Aborted" not in shown, shown


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_waits_while_a_worker_starts(signum):
    """Ctrl-C or a kill arriving while the pool starts a worker is raised
    once the start is done (it interrupted the pool writing the worker its
    start-up data: the worker printed an EOFError traceback), by the handler
    it was meant for; the handlers and the signal mask are as before."""
    from loramix.scenario.executors import _starting_workers

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop

    before = signal.signal(signal.SIGTERM, stop)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Stop):
            with _starting_workers():
                os.kill(os.getpid(), signum)
                time.sleep(0.2)
                reached.append(True)
        assert reached == [True]
        assert (
            signal.getsignal(signal.SIGTERM) is stop
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_worker_unwinding_ignores_a_second_sigterm(monkeypatch):
    """A worker's first SIGTERM within a step unwinds it (KeyboardInterrupt);
    a second one while it unwinds (a SIGTERM to the whole process group
    reaches it twice: itself, then from the parent stopping its workers) is
    ignored. It raised again, interrupting the removal of the half-made
    artifact: a group SIGTERM left a temporary in the cache in about 1 run
    in 6 (scenario run --jobs 2, the study killed mid-training)."""
    from loramix.scenario import executors

    monkeypatch.setitem(executors._WORKER, "in_step", True)
    monkeypatch.setitem(executors._WORKER, "stopping", False)
    before = signal.signal(signal.SIGTERM, executors._worker_terminated)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # while unwinding: nothing raised
            time.sleep(0.2)
        except KeyboardInterrupt:  # caught: one escaping would end the whole pytest session
            pytest.fail("a second SIGTERM interrupted the unwinding")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert executors._WORKER["stopping"]


#: a program running the CLI (argv: the signal's name, then its arguments) whose handler
#: of that signal is called, as Python calls it, in importlib's callback that drops a
#: module's lock, as the first import of the command finishes (no real signal lands
#: there on cue: a few microseconds per import)
_KILL_IN_THE_IMPORT_LOCK = """
import importlib._bootstrap as b, signal, sys, types
from loramix import cli
SIG = signal.Signals[sys.argv[1]]
cb = next(c for c in b._get_module_lock.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == "cb")
def hook(frame, event, arg):
    handler = signal.getsignal(SIG)
    if event == "call" and frame.f_code is cb and handler not in (signal.SIG_DFL, None):
        sys.setprofile(None)
        handler(SIG, frame)
sys.setprofile(hook)
sys.exit(cli.main(sys.argv[2:]))
"""

#: what each signal ends a command with: its exit status and its one line
_STOPPED = {"SIGTERM": (143, ["loramix: terminated"]), "SIGINT": (130, ["loramix: interrupted"])}


def _stopped_sum(world, tmp_path, program: str, sig: str) -> None:
    """``program`` (argv: ``sig``, then a ``sum``'s arguments) stops the sum as
    ``sig`` anywhere else does: its one line, its exit status, nothing written."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["sum", "--no-progress", world["a"], "--into", world["gpt2"], "--out", out]
    p = subprocess.run([sys.executable, "-c", program, sig, *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert (p.returncode, p.stderr.splitlines()) == _STOPPED[sig], p.stderr
    assert leftovers(out) == []


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_kill_landing_in_importlib_still_stops_the_run(world, tmp_path, sig):
    """A kill or a Ctrl-C whose handler runs inside importlib (here the weakref
    callback that drops a module's lock: a command's first import finishing)
    stops the run as anywhere else: one line, 143 or 130, nothing written.
    The exception was swallowed there (``Exception ignored in ...
    _get_module_lock``, the flake of the SIGTERM tests under load) and ``sum``
    went on to write its output and exit 0; for Ctrl-C (Python's own
    handler) until it went through loramix.stopping as a kill does."""
    _stopped_sum(world, tmp_path, _KILL_IN_THE_IMPORT_LOCK, sig)


#: a program running the CLI (argv: the signal's name, then its arguments) whose handler
#: of that signal is called, as Python calls it, in the first numpy code to run: numpy's
#: import, which torch's C start-up (``torch._C``) makes as a command first imports torch
_KILL_IN_NUMPY_UNDER_TORCH = """
import signal, sys
from loramix import cli
SIG = signal.Signals[sys.argv[1]]
def hook(frame, event, arg):
    handler = signal.getsignal(SIG)
    if event == "call" and frame.f_globals.get("__name__", "").startswith("numpy") and callable(handler):
        sys.setprofile(None)
        handler(SIG, frame)
sys.setprofile(hook)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_kill_during_a_c_extensions_start_is_raised_after_it(world, tmp_path, sig):
    """A kill or a Ctrl-C landing in Python code that a C extension runs as it
    starts (numpy's import, under ``torch._C``'s) stops the run once the
    start-up is done: one line, 143 or 130, nothing written. Raised there,
    torch cleared it and went on (``sum`` wrote its output, exit 0, nothing
    on stderr), or numpy was left half made (an ImportError traceback, exit
    1): 15 of 80 kills sent 0.3-1.1 s into a ``sum`` on a loaded machine."""
    _stopped_sum(world, tmp_path, _KILL_IN_NUMPY_UNDER_TORCH, sig)


#: a program running the CLI (argv: the signal's name, then its arguments) in which that
#: signal, sent to itself, lands in a ``__del__`` (an object made and dropped as ``sum``
#: parses its weights)
_KILL_IN_A_FINALIZER = """
import os, signal, sys
import loramix.options as options
from loramix import cli
SIG = signal.Signals[sys.argv[1]]
class Held:
    def __del__(self):
        os.kill(os.getpid(), SIG)
        for _ in range(100000):  # the handler runs here, in the finalizer
            pass
parse_weights = options.parse_weights
def parse(*args, **kw):
    Held()  # collected at once
    return parse_weights(*args, **kw)
options.parse_weights = parse
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_kill_landing_in_a_finalizer_still_stops_the_run(world, tmp_path, sig):
    """A kill or a Ctrl-C that lands in a finalizer (a ``__del__``, a
    ``weakref.finalize`` callback: the live training log's removal, a
    progress bar's close) stops the run once the finalizer is done: one
    line, 143 or 130, nothing written. Raised there, Python swallowed it
    (``Exception ignored in ... __del__``) and ``sum`` wrote its output and
    exited 0."""
    _stopped_sum(world, tmp_path, _KILL_IN_A_FINALIZER, sig)


def _import_then_wait(hook, module: str, seconds: float) -> None:
    """Import the fresh ``module`` under the profile ``hook`` (which sends the
    signal from inside importlib), then go on for ``seconds``: where the
    deferred signal must arrive."""
    import importlib

    sys.setprofile(hook)
    try:
        importlib.import_module(module)
    finally:
        sys.setprofile(None)
        sys.modules.pop(module, None)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_worker_killed_inside_importlib_unwinds_its_step(monkeypatch, tmp_path):
    """A worker's SIGTERM within a step whose handler runs inside importlib
    (the module-lock callback of an import the step makes) unwinds the step
    once importlib is done. The KeyboardInterrupt was swallowed there: the
    worker, already marked stopping, finished its step, a traceback beside
    the run's one line."""
    import importlib._bootstrap as bootstrap
    import types

    from loramix.scenario import executors

    cb = next(c for c in bootstrap._get_module_lock.__code__.co_consts
              if isinstance(c, types.CodeType) and c.co_name == "cb")  # fmt: skip

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is cb:
            sys.setprofile(None)
            executors._worker_terminated(signal.SIGTERM, frame)

    (tmp_path / "lmx_fresh_module.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(executors._WORKER, "in_step", True)
    monkeypatch.setitem(executors._WORKER, "stopping", False)
    before = signal.signal(signal.SIGTERM, executors._worker_terminated)
    try:
        with pytest.raises(KeyboardInterrupt):
            _import_then_wait(hook, "lmx_fresh_module", 30)  # the step goes on: the interrupt arrives then
    finally:
        signal.signal(signal.SIGTERM, before)
    assert executors._WORKER["stopping"]


def test_a_kill_is_deferred_at_most_longest_seconds(monkeypatch):
    """A kill waits while importlib's code runs, but not for ever (a C
    extension whose start-up never ends): after LONGEST_SECONDS the handler
    raises as before."""
    from loramix import stopping

    frames = []

    class Finder:  # a meta path finder: called by importlib, so its caller is importlib's frame
        def find_spec(self, name, path=None, target=None):
            if name == "lmx_not_a_module":
                frames.append(sys._getframe(1))

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    with pytest.raises(ImportError):
        import lmx_not_a_module  # noqa: F401
    sent = []
    monkeypatch.setattr(stopping, "_again", sent.append)  # no signal to this test process
    monkeypatch.setattr(stopping._thread, "start_new_thread", lambda fn, args: fn(*args))
    assert stopping.unsafe(frames[0]) and not stopping.unsafe(sys._getframe())
    monkeypatch.setattr(stopping, "_waiting_since", {})
    assert stopping.deferred(signal.SIGTERM, frames[0]) and sent == [signal.SIGTERM]
    stopping._waiting_since[signal.SIGTERM] -= stopping.LONGEST_SECONDS + 1
    assert not stopping.deferred(signal.SIGTERM, frames[0]) and sent == [signal.SIGTERM]
    assert stopping._waiting_since == {}


def test_a_signal_waits_while_a_lock_is_taken_by_python_code(monkeypatch):
    """A handler's exception raised in Python code that takes a lock and
    returns holding it leaves the lock held for good: a study's Ctrl-C as its
    workers started left a future's lock so (``Condition.__enter__`` under
    ``with future._condition``, or the loops of ``wait()``'s
    ``_AcquireFutures``), and the process pool's manager thread waited on it
    for ever while the run waited on the pool (a hang seen once in CI).
    There the signal is deferred; in a Condition's wait, where a run sits
    until Ctrl-C, it is not."""
    import threading
    from concurrent.futures import _base

    from loramix import stopping

    class Lock:  # a lock that notes the frame of each call made to it, by the call's name
        def __init__(self):
            self.real, self.frames = threading.Lock(), {}

        def __enter__(self):
            self.frames["__enter__"] = sys._getframe(1)
            return self.real.__enter__()

        def __exit__(self, *exc):
            return self.real.__exit__(*exc)

        def acquire(self, *args):
            self.frames.setdefault("acquire", sys._getframe(1))
            return self.real.acquire(*args)

        def release(self):
            self.frames.setdefault("release", sys._getframe(1))
            self.real.release()

    cond = Lock()
    c = threading.Condition(cond)
    with c:
        c.wait(0.001)  # gives the lock back by release(), takes it again by acquire()
    future = type("Future", (), {"_condition": Lock()})()
    with _base._AcquireFutures([future]):
        pass
    taken = {
        "Condition.__enter__": cond.frames["__enter__"],
        "_AcquireFutures.__enter__": future._condition.frames["acquire"],
        "_AcquireFutures.__exit__": future._condition.frames["release"],
    }
    for where, frame in taken.items():
        assert f"{frame.f_globals['__name__']}.{frame.f_code.co_name}".endswith(where.split(".")[-1]), where
        assert stopping.unsafe(frame), where
    waiting = cond.frames["release"].f_back  # Condition.wait, through its _release_save
    assert waiting.f_code.co_name == "wait"
    assert not any(stopping.unsafe(f) for f in (waiting, cond.frames["release"], sys._getframe()))
    sent = []
    monkeypatch.setattr(stopping, "_again", sent.append)  # no signal to this test process
    monkeypatch.setattr(stopping._thread, "start_new_thread", lambda fn, args: fn(*args))
    monkeypatch.setattr(stopping, "_waiting_since", {})
    assert stopping.deferred(signal.SIGINT, taken["Condition.__enter__"]) and sent == [signal.SIGINT]
    assert not stopping.deferred(signal.SIGINT, waiting) and sent == [signal.SIGINT]


@pytest.fixture
def interrupt_as_the_cli_does():
    """SIGINT handled in this process as ``loramix.cli`` handles it:
    ``KeyboardInterrupt``, unless :func:`loramix.stopping.deferred`."""
    from loramix.stopping import deferred

    def handler(signum, frame):
        if not deferred(signum, frame):
            raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupted_clean_up(steps: list) -> None:
    """A clean-up (:func:`loramix.stopping.cleanup`) that gets Ctrl-C midway."""
    from loramix.stopping import cleanup

    @cleanup
    def clean_up():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200):  # calls: where Python runs a handler
            time.sleep(0.001)
        steps.append("cleaned")

    clean_up()


def test_ctrl_c_in_a_clean_up_stops_the_run_once_it_ends(interrupt_as_the_cli_does):
    """A clean-up in a run not stopping (the removal after a published
    output): Ctrl-C there waits until it has ended, then stops the run."""
    steps: list = []
    with pytest.raises(KeyboardInterrupt):
        _interrupted_clean_up(steps)
        steps.append("went on")
        time.sleep(5)
    assert steps == ["cleaned", "went on"]


def test_ctrl_c_in_the_clean_up_of_a_stop_is_dropped(interrupt_as_the_cli_does):
    """A clean-up while a stop is under way (the first Ctrl-C's unwinding):
    a second Ctrl-C there waits until it has ended, and is dropped."""
    steps: list = []
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        _interrupted_clean_up(steps)
        time.sleep(0.5)  # a signal sent again would be handled here
        steps.append("unwound")
    assert steps == ["cleaned", "unwound"]


def test_a_kill_waits_while_a_modules_own_code_is_imported(tmp_path, monkeypatch):
    """A signal whose handler runs while a module's own code is being imported
    waits (its C++ calls may run the handler: torch/distributed/__init__.py's
    ``torch._C._c10d_init()`` did, and the KeyboardInterrupt became a C++
    exception that aborted the process, exit -6, 1 in 30 Ctrl-Cs sent 0.8 s
    into a merge, benchmarks/bench_interrupt.py); the functions that code
    calls, and module code not run by an import (a script's), do not."""
    from loramix import stopping

    code = "import sys\nfrom loramix.stopping import unsafe\nHERE = unsafe(sys._getframe())\n"
    code += "def f():\n    return unsafe(sys._getframe())\nCALLED = f()\n"
    (tmp_path / "lmx_module_code.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import lmx_module_code as m
    finally:
        sys.modules.pop("lmx_module_code", None)
    assert (m.HERE, m.CALLED) == (True, False)
    script: dict = {}
    exec(compile(code, "script.py", "exec"), script)
    assert (script["HERE"], script["CALLED"]) == (False, False)
    assert not stopping.unsafe(sys._getframe())


def test_a_kill_in_a_ray_wait_landing_in_importlib_still_stops_the_run(tmp_path, monkeypatch):
    """A kill while the run waits on Ray (:func:`_ray_blocking`, whose own
    SIGTERM handler ends the wait) that lands inside importlib (the wait
    importing a module, as Ray's client code does lazily) still ends the
    wait, then goes to the handler it was meant for. Its handler raised
    there with no deferral: the interrupt was swallowed, and the wait went
    on as if never killed (to the end of the step: minutes). Ray itself is
    not started: ``wait`` stands for ``ray.wait``, a call that blocks."""
    import importlib._bootstrap as bootstrap
    import types

    from loramix.scenario.executors import _ray_blocking

    cb = next(c for c in bootstrap._get_module_lock.__code__.co_consts
              if isinstance(c, types.CodeType) and c.co_name == "cb")  # fmt: skip

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is cb:
            sys.setprofile(None)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)  # _ray_blocking's, as Python calls it

    def wait():
        _import_then_wait(hook, "lmx_fresh_ray_module", 10)  # the tasks run on: the kill arrives then
        return "waited to the end"

    (tmp_path / "lmx_fresh_ray_module.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            _ray_blocking(wait)
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_live_log_names_its_process_beyond_its_pid(tmp_path):
    """A training run's live log beside its output names its process by host,
    pid and start time; the next run to that output removes only the logs of
    processes that are gone. By the pid alone, a dead run's log whose pid a
    later process took was kept for ever, and a live run's log was removed
    by a run on another host sharing the folder (its pid unknown there). A log
    of an older loramix (the pid alone) is still judged by its pid."""
    from loramix.train import LiveLog

    code = ("import sys, time; from pathlib import Path; from loramix.train import LiveLog; "
            "log = LiveLog(Path(sys.argv[1])); print(log.path, flush=True); time.sleep(600)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        live = Path(p.stdout.readline().strip())
        host, pid, start = live.name.removeprefix("out.train_log.").removesuffix(".csv").split(".")
        assert pid == str(p.pid)
        dead = tmp_path / f"out.train_log.{host}.{pid}.{int(start) - 1}.csv"  # an earlier process's, that pid
        old = tmp_path / f"out.train_log.{pid}.csv"  # an older loramix's: its pid alive
        other = tmp_path / f"out.train_log.{'f' * 8}.{pid}.{start}.csv"  # another host's
        for f in (dead, old, other):
            f.write_text("step,loss\n")
        mine = LiveLog(out)
        assert live.exists() and old.exists() and other.exists() and not dead.exists()
        p.kill()
        p.wait()
        again = LiveLog(out)  # this process's log again
        assert not live.exists() and not old.exists() and other.exists()
        assert {f.name for f in tmp_path.iterdir()} == {other.name, mine.path.name, again.path.name}
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_an_ignored_ctrl_c_stays_ignored(world, tmp_path):
    """A command started with SIGINT ignored (``nohup``, a shell's ``&``
    without job control) is not stopped by one: loramix takes Ctrl-C only
    where Python's own handler had it, and the sum ends as usual."""
    out = tmp_path / "out"
    code = "\n".join([
        "import os, signal, sys", "import loramix.options as options", "from loramix import cli",
        "parse_weights = options.parse_weights",
        "def parse(*args, **kw):", "    os.kill(os.getpid(), signal.SIGINT)  # as sum begins", "    return parse_weights(*args, **kw)",
        "options.parse_weights = parse", "sys.exit(cli.main(sys.argv[1:]))",
    ])  # fmt: skip
    args = ["sum", "--no-progress", world["a"], "--into", world["gpt2"], "--out", out]
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert (out / SHARD).is_file()


def test_errors_survive_pickling():
    """A LoramixError crosses a process boundary (a worker's step, a Ray
    task) as itself: its class, where, problem and one-line message."""
    from loramix import errors

    for cls in (errors.LoramixError, errors.DataError, errors.UsageError, errors.ScenarioError):
        for where in ("a/b.jsonl", None):
            e = cls(where, "two\nlines")
            back = pickle.loads(pickle.dumps(e))
            assert type(back) is cls and (back.where, back.problem, str(back)) == (e.where, e.problem, str(e))


def test_a_plot_appearing_during_the_run_is_left_alone(world, tmp_path, capsys, monkeypatch):
    """``similarity --plot`` without --force: a file made at the path while
    the figure is drawn (a second run's) is not replaced (the rename was
    os.replace); with --force it is."""
    from loramix import plots

    real, plot = plots.similarity_heatmap, tmp_path / "sim.png"

    def meanwhile(*a, **k):
        plot.write_text("theirs")
        return real(*a, **k)

    monkeypatch.setattr(plots, "similarity_heatmap", meanwhile)
    rc, _, err = cli(capsys, "similarity", world["a"], world["b"], "--plot", plot)
    assert_refused(rc, err, None, plot, "appeared while loramix was writing it")
    assert plot.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["sim.png"]
    rc, _, err = cli(capsys, "similarity", world["a"], world["b"], "--plot", plot, "--force")
    assert rc == 0, err
    assert plot.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in tmp_path.iterdir()) == ["sim.png"]


def test_a_plot_into_a_read_only_folder_names_the_plot(world, read_only_folder, capsys):
    """``similarity --plot`` into a read-only folder: one line naming the
    plot. The failed open of the temporary was followed by its unlink, which
    fails there too (EROFS), and that error, naming the temporary
    (``.lmx-....tmp: Read-only file system``), replaced the first. And
    nothing on stdout: the table came first, then the error."""
    plot = read_only_folder / "sim.png"
    rc, out, err = cli(capsys, "similarity", world["a"], world["b"], "--plot", plot)
    line = assert_refused(rc, err, None, f"{plot}: Read-only file system")
    assert ".lmx-" not in line and os.listdir(read_only_folder) == []
    assert out == ""  # the table was printed, then the error: no table where the command failed


def test_a_failed_run_removes_the_folders_it_made_for_its_output(tmp_path):
    """``--out new/deeper/x`` on a run that fails: 'nothing was written'
    holds for the parent folders made for it too; folders that were there
    (or that hold something else) stay."""
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "deeper" / "x", tmp_path / "kept" / "deeper" / "x"):
        with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("the merge failed")
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    )
    with atomic_output_dir(tmp_path / "new" / "deeper" / "x") as tmp:
        (tmp / "done").write_text("done")
    assert (tmp_path / "new" / "deeper" / "x" / "done").is_file()


@pytest.mark.parametrize("damage", ["model.safetensors", "config.json"])
def test_a_damaged_gguf_import_in_the_cache_is_imported_again(damage, tmp_path, monkeypatch, capfd):
    """A GGUF's import in ``$LORAMIX_CACHE_DIR/bases`` with its weights or
    config cut short (a disk that filled, a crash before the unsynced data
    reached the disk) failed every command given the GGUF, until the user
    found and removed the folder; it is imported again, and said so."""
    from loramix.gguf_import import resolve_base
    from loramix.io.model_folder import BaseModelFolder

    from .test_realmodel import llama_gguf

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    gguf = llama_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    target = resolve_base(gguf)
    whole = {f.name: f.read_bytes() for f in target.iterdir()}
    with open(target / damage, "r+b") as f:
        f.truncate(len(whole[damage]) // 2)
    capfd.readouterr()
    assert resolve_base(gguf) == target
    assert "again (the import there is damaged)" in capfd.readouterr().err
    assert (target / damage).read_bytes() == whole[damage]
    BaseModelFolder(gguf)  # reads the import
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_gguf_import_removes_older_rules_only(tmp_path):
    """An import removes the same file's imports by older rules, not a newer
    loramix's import sharing the cache (``-r3`` was removed by a rule-2 import,
    and each version then re-imported the file on every run)."""
    from loramix.gguf_import import IMPORT_RULE, older_imports

    sha = "a" * 64
    names = [
        f"{sha}-float32",
        *(f"{sha}-float32-r{n}" for n in range(1, IMPORT_RULE + 2)),
        f"{'b' * 64}-float32",
    ]
    for n in names:
        (tmp_path / n).mkdir()
    assert [d.name for d in older_imports(tmp_path, sha)] == sorted(
        [f"{sha}-float32", *(f"{sha}-float32-r{n}" for n in range(1, IMPORT_RULE))]
    )


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
def test_an_os_error_on_the_second_rename_of_a_save_leaves_out_as_it_was(
    tmp_path, monkeypatch, existing, links
):
    """``save_peft_adapter`` renames its weights, then its config into
    place; the second rename failing with an OS error (injected: the second
    ``os.replace`` raises EIO; and, for a file system without hard links,
    ``os.link`` raises EPERM) must leave ``out`` as it was: its old files
    byte for byte and a file of the user's kept, or no folder where there was
    none; no temporary left. The old code left the new weights beside the
    old config. Then a save that is let through writes the whole new one."""
    import loramix

    out = tmp_path / "runs" / "o"
    old = {"m.0.q_proj": (torch.ones(8, 2), torch.ones(2, 8))}
    new = {
        "m.0.q_proj": (torch.full((8, 3), 2.0), torch.ones(3, 8)),
        "m.1.q_proj": (torch.ones(8, 1), torch.ones(1, 8)),
    }
    if existing:
        loramix.save_peft_adapter(out, old)
        (out / "README.md").write_text("mine\n")
    before = {q.name: q.read_bytes() for q in out.iterdir()} if existing else None
    real_replace, calls = os.replace, []

    def second_fails(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst, *a, **k)

    def no_link(*a, **k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", second_fails)
        if not links:
            m.setattr(os, "link", no_link)
        with pytest.raises(OSError) as e:
            loramix.save_peft_adapter(out, new)
    assert e.value.errno == errno.EIO and str(out) in str(e.value), e.value
    if existing:
        assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    else:
        assert not out.exists()
    assert [q.name for q in tmp_path.rglob(f"{TMP_PREFIX}*")] == []
    loramix.save_peft_adapter(out, new)
    assert sorted(loramix.load_adapter(out).modules) == sorted(new)
    assert [q.name for q in tmp_path.rglob(f"{TMP_PREFIX}*")] == []
