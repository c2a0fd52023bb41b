"""``--threads N``: torch's CPU threads for one command, shared by every command that computes.

torch's default is one thread per core; on a machine shared with other jobs a
smaller number is often faster (idle OpenMP workers spin-wait on each other),
and on a quiet one the default uses every core. The option sets
``torch.set_num_threads(N)`` for the command and restores it after, so calling
a command from Python (tests, notebooks) leaves the process as it was.
"""

from __future__ import annotations

import functools

import click


def threads_option(f):
    """Add ``--threads N`` to a click command callback and apply it around the call."""

    @functools.wraps(f)
    def run(*args, threads=None, **kwargs):
        if threads is None:
            return f(*args, **kwargs)
        from ..options import check_workers

        check_workers(threads)
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return f(*args, **kwargs)
        finally:
            torch.set_num_threads(old)

    return click.option(
        "--threads", type=int, default=None, help="CPU threads for the computation (default: one per core)."
    )(run)
