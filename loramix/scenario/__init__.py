"""Composition studies from scenario files (``loramix scenario run FILE``).

* :mod:`.config`: the TOML schema (each key declared once), checked before any work starts;
* :mod:`.plan`: the study as steps with dependencies and cache keys (docs/interference.md);
* :mod:`.steps` and :mod:`.executors`: running a step; serial, process and Ray executors;
* :mod:`.cache`: content-addressed artifacts, so a run resumes and reruns are free;
* :mod:`.assemble`: the report's tables from the steps' results (pure);
* :mod:`.runner`: plan, execute, assemble, write; :mod:`.traits`: what the study
  asks of adapter kinds and merge methods;
* :mod:`.report` and :mod:`.plots`: ``report.md``, CSV/JSON, PNG figures; the fit
  itself is :mod:`loramix.fit`.
"""

from __future__ import annotations

from .config import Scenario, load_scenario


def run_scenario(*args, **kwargs):
    """See :func:`loramix.scenario.runner.run_scenario`."""
    from .runner import run_scenario as _run

    return _run(*args, **kwargs)


__all__ = ["Scenario", "load_scenario", "run_scenario"]
