"""``loramix cache clean``: remove what killed runs left in the caches.

A run killed with ``kill -9`` cannot remove its temporary folders
(``.lmx-<8 hex>`` with an ``owner.json`` naming the process); this removes
those whose process is gone, and nothing else. Scenario runs do the same
when they start (:class:`loramix.scenario.cache.Cache`). It also removes the
temporary folders of killed GGUF imports no process holds the lock of
(:func:`loramix.gguf_import.remove_stale_imports`).
"""

from __future__ import annotations

import click


@click.group("cache")
def command():
    """The scenario cache (artifacts of scenario runs)."""


@command.command("clean")
@click.option("--dir", "root", type=click.Path(file_okay=False, exists=True), default=None,
              help="The cache folder (default: $LORAMIX_CACHE, else .loramix-cache/).")  # fmt: skip
def clean(root):
    """Remove the temporaries of killed runs (their process is gone), and
    those of killed GGUF imports in $LORAMIX_CACHE_DIR/bases."""
    from pathlib import Path

    from ..gguf_import import remove_stale_imports
    from ..scenario.cache import default_cache_dir, remove_stale

    root = Path(root) if root is not None else default_cache_dir()
    if root.is_dir():
        removed = remove_stale(root)
        click.echo(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} from {root}")
    else:  # the default folder, before any run made it
        click.echo(f"no scenario cache at {root}: nothing to clean")
    if imports := remove_stale_imports():
        n = len(imports)
        click.echo(f"removed {n} temporary folder{'' if n == 1 else 's'} of killed GGUF imports from "
                   f"{imports[0].parent}")  # fmt: skip
