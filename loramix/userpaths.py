"""Paths a user writes: ``~`` expanded in one place.

A shell expands an unquoted ``~`` at the start of a word, but not one that
is quoted (``LORAMIX_CACHE='~/x'``, a value from an ``.env`` file or a
service's environment) nor one after ``=`` (``--out=~/x``): loramix then made
a folder literally named ``~`` in the working directory. Every path a user
gives by name goes through :func:`expand_home`: the path-valued environment
variables (``LORAMIX_CACHE``, ``LORAMIX_CACHE_DIR``, ``XDG_CACHE_HOME``,
through :func:`env_path`), every path-valued scenario key (after its
``$VAR``\\ s are substituted, :func:`loramix.scenario.config.expand`), and
every path option and argument of the command line (``click.Path``
parameters, :func:`loramix.cli.expand_home_params`). Paths given to the
Python API are taken as given, as :mod:`pathlib` takes them. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path


def non_path(value) -> str | None:
    """None where ``value`` is a path (a str or an ``os.PathLike``, as
    :mod:`pathlib` takes it), else what a one-line refusal calls it: ``"a
    DataFrame"``. Given from Python where a path was wanted, such a value
    failed in pathlib (``expected str, bytes or os.PathLike object, not
    DataFrame``, naming no argument) or, iterated, gave its column names,
    each refused as a missing file."""
    return None if isinstance(value, (str, os.PathLike)) else f"a {type(value).__name__}"


def is_table(value) -> bool:
    """Whether ``value`` is a pandas DataFrame or a dict: iterable, but over
    its column names or keys, never what a list of paths or records holds.
    pandas is not imported for this (a DataFrame exists only once it is)."""
    import sys

    pd = sys.modules.get("pandas")
    return isinstance(value, dict) or (pd is not None and isinstance(value, pd.DataFrame))


def expand_home(value):
    """``value`` (a str or path) with a leading ``~`` or ``~user`` replaced
    by that home folder (:func:`os.path.expanduser`), of the same type;
    anything else (no leading ``~``, an unknown user, not a path) unchanged."""
    if isinstance(value, (str, Path)) and os.fspath(value).startswith("~"):
        done = os.path.expanduser(os.fspath(value))
        return Path(done) if isinstance(value, Path) else done
    return value


def env_path(name: str) -> Path | None:
    """The path in the environment variable ``name``, ``~`` expanded; None
    where it is unset or empty."""
    value = os.environ.get(name)
    return Path(expand_home(value)) if value else None
