"""``loramix cache clean``: remove what killed runs left in the caches.

A run killed with ``kill -9`` cannot remove its temporary folders
(``.lmx-<8 hex>`` with an ``owner.json`` naming the process) nor the lock
file of the artifact it was making (``<kind>/.<key>.lock``); this removes
those whose process is gone (a lock no process holds), and nothing else.
Scenario runs remove such temporaries (not the locks) when they start
(:class:`loramix.scenario.cache.Cache`). It also removes the
temporary folders of killed GGUF imports no process holds the lock of
(:func:`loramix.gguf_import.remove_stale_imports`), and the temporary files
of killed writers in the per-user cache's ``sha256/``, ``layouts/``,
``native/``, ``prefix/`` and ``verified/`` (:func:`loramix.io.filehash.remove_stale_cache_temporaries`),
which no later run would remove: each is written under a name of its own.
And it removes the scenario cache's derived entries (validations, figures:
:meth:`loramix.scenario.cache.Cache.derived`) that another loramix source
made, which this code never reads again
(:func:`loramix.scenario.cache.remove_other_code_derived`), and the kind
folders that leaves empty; never an artifact. And the stop flags
(``.stop-<run>``) of Ray runs killed while they stopped, whose process is
gone, or, for a flag that names no process of this host (an older
loramix's, another host's), that is over a day old
(:func:`loramix.scenario.cache.remove_finished_stop_flags`).

``loramix cache verify`` reads and hashes every file of every entry of the
scenario cache against its ``artifact.json``, whatever the lookups' memos
say (:mod:`loramix.scenario.verified`, :mod:`loramix.io.filehash`: a
lookup stats a file it found intact before, and so cannot see bits that
rotted under an unchanged ``stat``), and names each damaged entry; it
forgets their memo rows, so the next run hashes them again, finds them
damaged and makes them again.
"""

from __future__ import annotations

import click


@click.group("cache")
def command():
    """The caches: the scenario cache (artifacts of scenario runs) and
    $LORAMIX_CACHE_DIR (hashes, layouts, kernels, GGUF imports, prefix states)."""


@command.command("clean")
@click.option("--cache", "--dir", "root", type=click.Path(file_okay=False, exists=True), default=None,
              help="The scenario cache folder, as scenario run's --cache (default: $LORAMIX_CACHE, else "
              ".loramix-cache/).")  # fmt: skip
def clean(root):
    """Remove the temporaries of killed runs (their process is gone) and
    their lock files no process holds, those of killed GGUF imports in
    $LORAMIX_CACHE_DIR/bases, and those of killed writers in
    $LORAMIX_CACHE_DIR's sha256/, layouts/, native/, prefix/ and verified/ (their
    process is gone on this host; another host's are kept). Also removes
    the scenario cache's validations, figures and report tables made by
    another version of loramix's source, which this one never reads (that
    version, run again, redoes them in seconds); never an artifact (data, adapters, merges,
    evaluations), which keeps across code changes. And the stop flags of
    Ray runs killed while stopping (their process is gone on this host; a flag
    naming no process here, an older loramix's or another host's: over a day old)."""
    from pathlib import Path

    from ..gguf_import import remove_stale_imports
    from ..io.filehash import cache_dir, remove_stale_cache_temporaries
    from ..scenario.cache import (
        default_cache_dir,
        remove_finished_stop_flags,
        remove_other_code_derived,
        remove_stale,
        remove_stale_locks,
    )

    root = Path(root) if root is not None else default_cache_dir()
    if root.is_dir():
        removed = remove_stale(root)
        click.echo(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} from {root}")
        if locks := remove_stale_locks(root):
            n = len(locks)
            click.echo(f"removed {n} lock file{'' if n == 1 else 's'} of killed runs from {root}")
        if derived := remove_other_code_derived(root):
            n, size = len(derived), sum(b for _, b in derived)
            kinds = sorted({p.parent.name + "/" for p, _ in derived})
            amount = f"({size / 1e6:.1f} MB" if size >= 1e6 else f"({size / 1e3:.0f} kB"
            click.echo(f"removed {n} derived entr{'y' if n == 1 else 'ies'} of another loramix source "
                       f"{amount}; {', '.join(kinds)}) from {root}")  # fmt: skip
        if flags := remove_finished_stop_flags(root):
            n = len(flags)
            click.echo(f"removed {n} stop flag{'' if n == 1 else 's'} of killed Ray runs from {root}")
    else:  # the default folder, before any run made it
        click.echo(f"no scenario cache at {root}: nothing to clean")
    if imports := remove_stale_imports():
        n = len(imports)
        click.echo(f"removed {n} temporary folder{'' if n == 1 else 's'} of killed GGUF imports from "
                   f"{imports[0].parent}")  # fmt: skip
    if files := remove_stale_cache_temporaries():
        n, parts = len(files), sorted({f.parent.name + "/" for f in files})
        click.echo(f"removed {n} temporary file{'' if n == 1 else 's'} of killed writers from {cache_dir()} "
                   f"({', '.join(parts)})")  # fmt: skip


@command.command("verify")
@click.option("--cache", "--dir", "root", type=click.Path(file_okay=False, exists=True), default=None,
              help="The scenario cache folder, as scenario run's --cache (default: $LORAMIX_CACHE, else "
              ".loramix-cache/).")  # fmt: skip
def verify(root):
    """Hash every file of every entry of the scenario cache against the sizes
    and sha256 its artifact.json lists, and name each entry that differs.
    A run's lookups check sizes and, for a file whose stat (inode, size,
    times) changed since a lookup found it intact, its sha256: this also finds
    damage that left the stat as it was (a disk's rotten bits). A damaged
    entry is left in place, its memo forgotten: the next run finds it damaged
    and makes it again. Exit status 1 where any is damaged."""
    from pathlib import Path

    from ..scenario.cache import default_cache_dir, verify_entries

    root = Path(root) if root is not None else default_cache_dir()
    if not root.is_dir():
        click.echo(f"no scenario cache at {root}: nothing to verify")
        return
    n, size, damaged = verify_entries(root)
    for entry, why in damaged:
        click.echo(f"damaged: {entry.parent.name}/{entry.name} ({why})")
    amount = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    click.echo(f"verified {n} entr{'y' if n == 1 else 'ies'} ({amount}) in {root}: "
               + (f"{len(damaged)} damaged, to be made again by the next run" if damaged else "none damaged"))  # fmt: skip
    if damaged:
        raise SystemExit(1)
