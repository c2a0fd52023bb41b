"""``loramix cache clean``: remove what killed runs left in the scenario cache.

A run killed with ``kill -9`` cannot remove its temporary folders
(``.lmx-<8 hex>`` with an ``owner.json`` naming the process); this removes
those whose process is gone, and nothing else. Scenario runs do the same
when they start (:class:`loramix.scenario.cache.Cache`).
"""

from __future__ import annotations

import click


@click.group("cache")
def command():
    """The scenario cache (artifacts of scenario runs)."""


@command.command("clean")
@click.option("--dir", "root", type=click.Path(file_okay=False), default=None,
              help="The cache folder (default: $LORAMIX_CACHE, else .loramix-cache/).")  # fmt: skip
def clean(root):
    """Remove the temporaries of killed runs (their process is gone)."""
    from ..scenario.cache import default_cache_dir, remove_stale

    root = root or default_cache_dir()
    removed = remove_stale(root)
    click.echo(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} from {root}")
