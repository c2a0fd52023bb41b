"""Small C kernels, compiled on first use with the machine's C compiler and
loaded with ctypes; the eager torch/numpy code is the fallback and the
reference.

A kernel here fuses a chain of elementwise operations that the eager code
runs as one whole pass over a block per operation (each pass reads and
writes the block from the L2 cache or memory); the fused loop keeps a small
chunk in the L1 cache and does every operation on it (``ties.c``; ``bf16.c``,
the last step of a bfloat16 weight: widen, add, round, check). Or it draws
what torch draws without torch's per-entry dispatch (``dare.c``: the
generator's Mersenne Twister, DARE's masks). Each kernel performs
the eager code's operations in the same order with the same rounding (C11,
``-ffp-contract=off``, no fast-math flag), or, in its AVX-512 and AVX2 forms,
a lane-for-lane equivalent that provably gives the same bits (listed in the
source and in docs/merging.md). The portable loops are compiled in three
forms (GCC's ``target_clones``: AVX-512, AVX2, x86-64 baseline) and the CPU
runs the widest it has; ``-DLORAMIX_ONE_FORM`` builds the one form that the
compiler flags give instead, so that ``tests/test_native.py`` checks every
form against the eager code on one machine, edge values included.

The library is built once per source, compiler and machine type into
``<cache>/native/`` (:func:`loramix.io.filehash.cache_dir`), written to a
temporary and renamed, so processes racing to build it each get a whole
file; its sha256 is kept beside it, and a library that does not match it
(cut short or damaged in the cache) is built again rather than loaded.
``LORAMIX_NATIVE=0`` turns the kernels off; where no compiler is found or
the build fails, the eager code runs, with a one-line notice. ``$CC``
names the compiler (default ``cc``). A build takes up to a few seconds
(``ties.c``: about 5); within :func:`announcing` it is announced first, so
that a progress bar that stops for that long says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ("-std=c11", "-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared")

_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}


def enabled() -> bool:
    """Whether kernels may be used (``LORAMIX_NATIVE`` is not ``0``)."""
    return os.environ.get("LORAMIX_NATIVE", "1").strip() != "0"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc.split()[0]) and cc


def _build(name: str) -> Path | None:
    from ..io.filehash import cache_dir

    src = HERE / f"{name}.c"
    cc = _compiler()
    if cc is None:
        return _notice(f"no C compiler ({os.environ.get('CC') or 'cc'}) found")
    try:
        version = subprocess.run(
            [*cc.split(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _notice(f"{cc}: {e}")
    key = hashlib.sha256(
        "\0".join([src.read_text(), cc, version, " ".join(FLAGS), platform.machine(), sys.platform]).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / "native" / f"{name}-{key}.so"
    if _whole(lib):
        return lib
    from ..io.outputs import atomic_write, remove_stale_temporaries, temporary_file

    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(lib.parent, lib.name)  # a build killed before its rename
        tmp = str(temporary_file(lib))  # its name says which process builds it
    except OSError as e:  # a cache that cannot be written: read-only, full, not a folder
        return _notice(f"{lib.parent}: {e.strerror or e}")
    if _SAY is not None:
        _SAY(f"loramix: compiling {src.name} into {lib.parent} (once per machine and compiler)")
    try:
        done = subprocess.run(
            [*cc.split(), *FLAGS, "-o", tmp, str(src)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            return _notice(f"building {src.name} with {cc}: {last}")
        # the digest first: a library is only loaded once it matches (see _whole)
        with atomic_write(_digest_file(lib)) as f:
            f.write(_sha256(Path(tmp)) + "\n")
        os.replace(tmp, lib)
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        return _notice(f"building {src.name} with {cc}: {e}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest_file(lib: Path) -> Path:
    return lib.with_suffix(".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # about 150 KB: well under a millisecond


def _whole(lib: Path) -> bool:
    """Whether ``lib`` is the library its build wrote, as its digest beside it
    says. A truncated library (a disk that filled, a crash before the data
    reached the disk) makes the loader fault on its missing pages (SIGBUS:
    the process dies, in every run after) or refuse it; a damaged one may
    run wrong code. So one that does not match, or has no digest (a cache
    of an older loramix), is built again rather than loaded."""
    try:
        return _digest_file(lib).read_text().strip() == _sha256(lib)
    except OSError:
        return False


_SAID: set[str] = set()
_SAY = None


@contextlib.contextmanager
def announcing(say):
    """Within, a build about to run is first announced by ``say(line)``
    (e.g. ``tqdm.write``, which keeps a progress bar whole); ``say=None``
    builds silently, as outside."""
    global _SAY
    old, _SAY = _SAY, say
    try:
        yield
    finally:
        _SAY = old


def _notice(why: str) -> None:
    if why not in _SAID:  # once per process, whichever library asked
        _SAID.add(why)
        print(f"loramix: native kernels off ({why}); the slower eager code runs", file=sys.stderr)
    return None


_BOUND: dict[str, object] = {}


def bound(name: str, wrap):
    """``wrap(library(name))``, the typed entry points of ``<name>.c``, made
    once per process; None where the kernels are off (checked on every call:
    ``LORAMIX_NATIVE`` may change) or not built here."""
    if not enabled():
        return None
    if name not in _BOUND:
        lib = library(name)
        _BOUND[name] = None if lib is None else wrap(lib)
    return _BOUND[name]


def library(name: str):
    """The ctypes library built from ``<name>.c``, or None (kernels off, or no
    compiler or a failed build: said once per process)."""
    if not enabled():
        return None
    with _LOCK:
        if name not in _LOADED:
            path = _build(name)
            lib = None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as e:
                    _notice(f"loading {path}: {e}")
            _LOADED[name] = lib
        return _LOADED[name]
