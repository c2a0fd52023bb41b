"""numpy's OpenBLAS on fewer threads for the length of a call, from Python.

The similarity step's Gram strips (:mod:`loramix.overlap`) are small GEMMs;
OpenBLAS's worker threads busy-wait after each one, so on a small, busy
machine a second thread costs far more than it gives (2 cores at load 5:
10 GPT-2-small-shaped rank-8 adapters took 1.5-2.0 s of CPU, 5-8 s of wall,
with two threads; 0.08-0.10 s, 0.4-0.6 s, with one). The commands set
``OPENBLAS_NUM_THREADS=1`` before numpy loads; a notebook has loaded numpy
already, with OpenBLAS's default, so the library calls
(:func:`loramix.similarity`, :func:`loramix.predict`,
:func:`loramix.run_scenario`) lower the loaded library's count with
:func:`openblas_threads` around their work, as threadpoolctl does: its
``*openblas*_set_num_threads*`` symbol through ctypes.

A process-wide setting: two threads of one process calling loramix at once
share it (each restores what it found). Where no OpenBLAS is loaded, or it
has no such symbol (another BLAS, macOS's Accelerate, a non-Linux system,
where ``/proc/self/maps`` cannot tell what is loaded), nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: below this many adapters, one OpenBLAS thread (``loramix similarity``: 100 adapters took
#: 8.6 s with one thread, 42 s with two, on 2 busy cores); a larger bank keeps BLAS's choice
ONE_THREAD_BELOW = 200

#: the symbols' names: ``<prefix>_{get,set}_num_threads<suffix>`` (numpy's bundled
#: ``scipy_openblas`` with 64-bit integers, its 32-bit build, a plain OpenBLAS)
_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "", "_64")


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux), in order."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split(maxsplit=5)[-1].strip() for line in f if "openblas" in line.lower()]
    except OSError:
        return []
    return [p for p in dict.fromkeys(paths) if p.startswith("/") and ".so" in os.path.basename(p)]


def _controls(path: str) -> tuple | None:
    """``(get, set)``: the library's thread-count functions, or None."""
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_NOW", 0))
    except OSError:
        return None
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                return get, put
    return None


@contextmanager
def openblas_threads(n: int = 1, *, libraries: list[str] | None = None) -> Iterator[None]:
    """Within: each OpenBLAS loaded in this process (``libraries``: their paths,
    default those mapped now) runs at most ``n`` threads; after, also after an
    exception, the count each had. Nothing where ``OPENBLAS_NUM_THREADS`` is set
    (the user's choice, which the commands keep too), nor where no library or
    symbol is found."""
    found = []
    if not os.environ.get("OPENBLAS_NUM_THREADS"):
        for path in _loaded_openblas() if libraries is None else libraries:
            if (c := _controls(path)) is not None:
                found.append((c[1], c[0]()))
    try:
        for put, before in found:
            if before > n:
                put(n)
        yield
    finally:
        for put, before in found:
            if before > n:
                put(before)


def one_openblas_thread(f):
    """``f`` run within :func:`openblas_threads` (1): a library call whose numpy
    work is small GEMMs (the similarity of a few adapters)."""

    @functools.wraps(f)
    def call(*args, **kwargs):
        with openblas_threads(1):
            return f(*args, **kwargs)

    return call
