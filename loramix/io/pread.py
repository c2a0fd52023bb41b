"""Reads at an offset of an open file, without torch (the numpy readers use
them too) and without moving the file's position, so that threads can
read one file at their own offsets."""

from __future__ import annotations

import os


def pread_into(f, view: memoryview, offset: int) -> int:
    """Read into ``view`` from the open file ``f`` at ``offset``, leaving its
    position alone (``os.preadv``); bytes read, which may be fewer than
    asked (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    f.seek(offset)  # pragma: no cover  (no preadv: one reader at a time)
    return f.readinto(view)


def read_at(f, view: memoryview, offset: int) -> int:
    """Bytes read from ``f`` at ``offset`` into ``view``, up to its length:
    short reads are read on, and fewer come back only at the end of the
    file. A read's OSError is raised, never taken for the end of the file
    (``np.fromfile``'s ``fread`` stopped short on a disk's EIO without a
    word, and a failing disk was said as a truncated file)."""
    got = 0
    while got < len(view):
        n = pread_into(f, view[got:], offset + got)
        if not n:
            break
        got += n
    return got
