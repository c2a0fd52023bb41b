"""Composition studies from scenario files (``loramix scenario run FILE``).

* :mod:`.config`: the TOML schema, checked before any work starts;
* :mod:`.cache`: content-addressed artifacts, so a run resumes and reruns are free;
* :mod:`.runner`: the protocol of arXiv 2508.11985 (domain adapters, merged-data
  baselines, sums and other merges, perplexities, delta_ppl%);
* :mod:`.fit`: delta_ppl% against RMS cosine, with leave-one-out error;
* :mod:`.report` and :mod:`.plots`: ``report.md``, CSV/JSON, PNG figures.
"""

from __future__ import annotations

from .config import Scenario, load_scenario


def run_scenario(*args, **kwargs):
    """See :func:`loramix.scenario.runner.run_scenario`."""
    from .runner import run_scenario as _run

    return _run(*args, **kwargs)


__all__ = ["Scenario", "load_scenario", "run_scenario"]
