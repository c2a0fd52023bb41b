"""Run a scenario: the composition study of arXiv 2508.11985, cached and resumable.

The study (docs/interference.md) is a plan of steps
(:func:`loramix.scenario.plan.plan`): the data splits, the base, one adapter
per domain, a merged-data adapter per composition, the similarity of the
domain adapters, the merges and every evaluation. An executor
(:mod:`loramix.scenario.executors`: serial, local processes or Ray) runs the
steps, each an artifact of the content-addressed cache
(:class:`loramix.scenario.cache.Cache`); :func:`loramix.scenario.assemble.assemble`
builds the report's tables from their results. Dense merged models (as large
as the base) are evaluated and then deleted, keeping their evaluation and
merge record; low-rank merges (``svd``) are kept as adapters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..api import renamed
from ..blas import one_openblas_thread
from ..environment import environment
from ..errors import OutputError, UsageError, raise_machine_fault
from ..options import check_workers
from ..trained_base import base_identity
from .cache import Cache, default_cache_dir
from .config import Scenario, load_scenario, scenario_summary
from .evaluations import KEY, compact
from .plan import plan, prepare_data


def merges_for(sc: Scenario, adapter_method: str):
    return sc.merges_for(adapter_method)


def check_report_dir(out: Path, name: str, force: bool, *, late: bool = False, inputs=()) -> None:
    """A report folder may be replaced when it holds an earlier report of the
    same scenario (or with ``force``); anything else is refused, and so is a
    folder that cannot be written at all (under a file, a symlink loop, the
    current folder: :func:`~loramix.io.outputs.check_output`) or that is,
    holds or lies inside one of ``inputs`` (the scenario's files and its
    cache, which replacing the folder would delete, even with ``force``),
    before the study runs rather than after it; and again at the end
    (``late``), for a folder that appeared meanwhile."""
    from ..io.outputs import check_output

    check_output(out, force=True, inputs=inputs)
    if not out.exists() or force:
        return
    rj = out / "report.json"
    if rj.is_file():
        try:
            if json.loads(rj.read_text()).get("scenario", {}).get("name") == name:
                return
        except (OSError, json.JSONDecodeError) as e:
            raise_machine_fault(e, rj)  # a failing disk: said, not "not a report of this scenario"
    if late:
        raise OutputError(out, "appeared during the study and is not a report of this scenario: left as it is; "
                               "the study is cached, so a rerun with another --out (or --force) is quick")  # fmt: skip
    raise OutputError(out, "exists and is not a report of this scenario; pass --force to replace it")


@dataclass
class _Progress:
    """One bar over the plan's steps, and the seconds and cache hits per
    timing group (train, evaluate, merge, ...) of this run. Where stderr is
    not a terminal (a run in the background, its output in a file) the bar
    is off and a plain line says how far the run is, once a minute
    (:func:`loramix.progress.line_every`, as every command's): when a step
    ends, or, while one step runs for minutes (a base build, a long
    training), from a thread that names the step under way."""

    total: int
    enabled: bool = True
    bar: object = None
    timings: dict = field(default_factory=dict)  # group -> {seconds, made, reused} (this run)

    def __post_init__(self):
        import threading

        from tqdm.auto import tqdm

        from ..options import bar_disabled
        from ..progress import line_every, lines_wanted

        self.bar = tqdm(total=self.total, desc="scenario", unit="step", disable=bar_disabled(self.enabled),
                        dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        self.lines = lines_wanted(self.enabled)
        self.every = line_every()
        self.count = self.made = self.cached = 0
        self.t0 = self.last = time.monotonic()
        self.under_way: dict = {}  # step id -> (step, when it was started or queued)
        self.lock = threading.Lock()  # the thread's line and a step's line
        self.stop = threading.Event()
        self.thread = None
        if self.lines:
            self.thread = threading.Thread(target=self._beat, name="loramix-progress", daemon=True)
            self.thread.start()

    def start(self, step) -> None:
        with self.lock:
            self.under_way[step.id] = (step, time.monotonic())

    def done(self, step, outcome) -> None:
        t = self.timings.setdefault(step.group, {"seconds": 0.0, "made": 0, "reused": 0})
        t["seconds"] += outcome.seconds
        for e in outcome.events:
            t["reused" if e.status == "hit" else "made"] += 1
        self.made += any(e.status != "hit" for e in outcome.events)
        # a step with no cache entry (the base given as a folder, a LoRA similarity) is neither
        self.cached += bool(outcome.events) and all(e.status == "hit" for e in outcome.events)
        self.count += 1
        self.bar.set_postfix_str(f"{step.kind}: {step.label}", refresh=False)
        self.bar.update(1)
        with self.lock:
            self.under_way.pop(step.id, None)
            if self.lines and time.monotonic() - self.last >= self.every:
                self.last = time.monotonic()
                rest = self.count - self.made - self.cached
                print(f"scenario: {self.count}/{self.bar.total} steps ({self.made} made, {self.cached} from the cache"
                      f"{f', {rest} not cached' if rest else ''}), {self._minutes():.1f} min; last {step.kind}: "
                      f"{step.label}", file=sys.stderr, flush=True)  # fmt: skip

    def _minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60

    def _beat(self) -> None:
        # Polled each second; a line only after self.every without one, and
        # only once the oldest step under way has itself run that long.
        while not self.stop.wait(1.0):
            with self.lock:
                now = time.monotonic()
                if not self.under_way or now - self.last < max(self.every, 1.0):
                    continue
                step, since = min(self.under_way.values(), key=lambda v: v[1])
                if now - since < max(self.every, 1.0):
                    continue
                self.last = now
                more = len(self.under_way) - 1
                print(f"scenario: {self._minutes():.1f} min, {self.count}/{self.bar.total} steps done; "
                      f"{step.kind}: {step.label} under way for {(now - since) / 60:.1f} min"
                      + (f" (and {more} more)" if more else ""), file=sys.stderr, flush=True)  # fmt: skip

    def close(self):
        self.stop.set()
        if self.thread is not None:  # no line after the bar's last (or after "interrupted")
            self.thread.join(5.0)
        if self.count >= self.bar.total:  # an interrupted or failed run keeps its last step, not "done"
            self.bar.set_postfix_str("done")
        self.bar.close()


class Runner:
    def __init__(self, sc: Scenario, *, cache: Cache, device, progress: bool = True, executor=None,
                 threads: int = 1):  # fmt: skip
        from .executors import SerialExecutor

        self.sc = sc
        self.threads = threads  # torch threads of a serial run (an executor says its own per job)
        self.cache = cache
        self.device = device
        self.progress_enabled = progress
        self.executor = executor or SerialExecutor()
        self.steps: list = []
        self.per_module = None
        self._saved = None  # (torch threads, transformers' bars) of the caller while the run computes

    def run(self) -> dict:
        from .assemble import assemble
        from .steps import StepContext

        t_start = time.perf_counter()
        data = prepare_data(self.sc)
        self.steps = plan(self.sc, data)
        ctx = StepContext(self.sc, data, self.cache, self.device)
        prog = _Progress(len(self.steps), enabled=self.progress_enabled)
        rec = self._recorder()

        def on_done(st, outcome):
            prog.done(st, outcome)
            if rec is not None:
                rec.add(st, outcome)

        try:
            self._computing(ctx, self.steps)
            outcomes = self.executor.run(self.steps, ctx, on_done, on_start=prog.start)
            study = assemble(self.sc, {k: o.result for k, o in outcomes.items()}, cache=self.cache)
            if self.sc.plan is not None:  # planned now: the groups depend on the validated predictors
                outcomes, study["plan_validation"] = self._plan_validation(study, data, outcomes, ctx, prog,
                                                                           on_done, rec)  # fmt: skip
        finally:
            prog.close()
            if rec is not None:
                rec.flush()
            self._computed()
            self.cache.save_verified()  # what the lookups found intact: the next run stats it, reads none
        # The cache log in plan order, whichever process made each artifact.
        self.cache.log[:] = [e for st in self.steps for e in outcomes[st.id].events]
        self.outcomes = outcomes
        self.per_module = study["per_module"]
        return self._report(study, data, outcomes["base"].result, prog.timings, t_start)

    def _plan_validation(
        self, study: dict, data, outcomes: dict, ctx, prog, on_done, rec
    ) -> tuple[dict, dict]:
        """``loramix plan``'s groups and the random groupings (:mod:`.planval`):
        their merge and evaluation steps, run by the same executor after the
        study's; returns all outcomes and the section's data."""
        from . import planval

        results = {k: o.result for k, o in outcomes.items()}
        proposal = planval.propose(self.sc, results, study["validations"])
        more = planval.steps(self.sc, data, self.steps, proposal)
        if more:
            self._computing(ctx, more, outcomes)
            prog.bar.total += len(more)
            prog.bar.refresh()
            if rec is not None:
                rec.by_id.update((st.id, st) for st in more)
            outcomes = self.executor.run(more, ctx, on_done, done=outcomes, on_start=prog.start)
            self.steps = [*self.steps, *more]
        return outcomes, planval.assemble(proposal, {k: o.result for k, o in outcomes.items()})

    def _computing(self, ctx, steps: list, done: dict | None = None) -> None:
        """Before ``steps`` run (``done``: the outcomes of those run before):
        unless each only reads back what is in the cache
        (:func:`~loramix.scenario.steps.reads_back`; a rerun of a finished
        study) or worker processes compute them, torch on the run's threads and
        transformers' progress bars off
        (one overall bar, no per-load or per-save bars), both as they were
        again after the run (:meth:`_computed`), so that a library caller's
        process is left as it was. A study read back from the cache imports
        neither torch nor transformers (seconds of a rerun's start), and nor
        does the parent of workers: its import (2-3 s of CPU) came before the
        first worker's start, which the base build waited for."""
        from .steps import reads_back

        here = getattr(self.executor, "computes_here", None)
        if self._saved is not None or all(reads_back(ctx, st) for st in steps):
            return
        if here is not None and not here(steps, done):
            return
        import torch
        from transformers.utils import logging as hf_logging

        self._saved = (torch.get_num_threads(), hf_logging.is_progress_bar_enabled())
        torch.set_num_threads(self.threads)
        hf_logging.disable_progress_bar()

    def _computed(self) -> None:
        """torch's threads and transformers' progress bars as :meth:`_computing` found them."""
        if self._saved is None:
            return
        import torch
        from transformers.utils import logging as hf_logging

        threads, bars = self._saved
        self._saved = None
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()

    def _recorder(self):
        """What measures this run's throughput for later estimates
        (:mod:`loramix.scenario.estimate`); None on a Ray cluster given by
        address, whose steps ran on other machines."""
        from .estimate import Recorder, machine

        ex = self.executor.describe()
        if ex.get("address", "local") != "local":
            return None
        return Recorder(self.cache.root, machine(self.device), self.sc, self.steps,
                        threads=ex.get("threads_per_job", self.threads))  # fmt: skip

    def _made_seconds(self) -> dict[str, float]:
        """What each reused artifact cost when it was made (from its cache record)."""
        made: dict[str, float] = {}
        for e in self.cache.log:
            if e.status == "hit":
                rec = self.cache.record(e.kind, e.key)
                made[e.kind] = made.get(e.kind, 0.0) + float(rec.get("seconds", 0.0))
        return made

    def _report(self, study: dict, data, base: dict, timings: dict, t_start: float) -> dict:
        from . import compose
        from .report import records

        sc, ev_base = self.sc, study["ev_base"]
        base_info, params = dict(base["info"]), None
        try:
            cfg = json.loads((Path(base["path"]) / "config.json").read_text())
            if base_info.get("params"):
                params = int(base_info["params"])
            base_info["config"] = {k: cfg.get(k) for k in ("model_type", "n_layer", "n_embd", "vocab_size",
                                                            "num_hidden_layers", "hidden_size") if k in cfg}  # fmt: skip
        except (OSError, ValueError):
            pass
        base_key = next(st.folder_name for st in self.steps if st.id == "base")
        domains = {n: {"data": sc.domains[n].data, "train": len(d.train), "eval": len(d.eval),
                       "eval_tokens": ev_base[n]["tokens"], "sha256_train": d.sha256_train,
                       "sha256_eval": d.sha256_eval, "source_sha256": d.source_sha256,
                       **({"trained_on": sc.domains[n].trained_on, "left_out": d.left_out,
                           "left_out_ngram": d.left_out_ngram, "trained_on_ngram": d.ngram}
                          if sc.domains[n].trained_on else {})}
                   for n, d in data.items()}  # fmt: skip
        summary = records(study["summary"])
        rows, base_rows = compact(study["evaluations"])
        return {
            "loramix_version": __version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "scenario_file": str(sc.path),
            "scenario": scenario_summary(sc),
            "environment": environment(self.device, torch_threads=self.threads),
            "base": {
                "key": base_key,
                "identity": base_identity(base["path"]),
                "parameters": params,
                **base_info,
            },
            "domains": domains,
            "similarity": study["similarity"],
            "similarity_mean": study["similarity_mean"],
            "cosine_by_layer": study["cosine_by_layer"],
            # the base's evaluation once: the same in every label and seed (.evaluations)
            KEY: base_rows,
            "evaluations": rows,
            # once per domain: every evaluation on a domain scores the same records' tokens
            "record_tokens": study["record_tokens"],
            "results": records(study["results"]),
            "summary": summary,
            "fits": study["fits"],
            "validations": study["validations"],
            "plan_validation": study.get("plan_validation"),
            "best_methods": study["best_methods"],
            "composability": compose.compute(
                {
                    "evaluations": study["evaluations"],
                    "record_tokens": study["record_tokens"],
                    "summary": summary,
                    "scenario": {"seeds": list(sc.seeds)},
                }
            ),
            "merge_summaries": study["merge_summaries"],
            "adapters": study["adapters"],
            "cache": {"root": str(self.cache.root), "counts": self.cache.counts()},
            "executor": self.executor.describe(),
            "timings": {
                "total_seconds": time.perf_counter() - t_start,
                # in plan order, not in the order the groups first finished (which differs with --jobs)
                "by_kind": {
                    g: timings[g] for g in dict.fromkeys(st.group for st in self.steps) if g in timings
                },
                "made_seconds": self._made_seconds(),
            },  # fmt: skip
        }


@one_openblas_thread
@renamed(positional=("out",))
def run_scenario(
    scenario,
    *,
    out: str | os.PathLike | None = None,
    fresh: bool = False,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    jobs: int | str | None = None,
    executor: str | None = None,
    address: str | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Run a scenario file (or a loaded :class:`Scenario`) and write its report.

    ``scenario``: a TOML file's path (docs/scenarios.md) or a loaded
    :class:`Scenario`. ``fresh``: remake every artifact instead of reusing
    the cache's. ``device``: ``"auto"`` (CUDA where torch sees a GPU, else
    the CPU), ``"cpu"`` or ``"cuda"``; ``force``: replace an ``out`` that
    exists and is not a report of this scenario; ``progress``: a bar of the
    plan's steps (on a terminal).
    ``out`` defaults to ``reports/<name>``; ``cache_dir`` to ``$LORAMIX_CACHE``
    or ``.loramix-cache``. Everything is checked before any work starts.
    ``threads``: torch's CPU threads during the run (restored after). The
    default is 1: the study's models are small, and on a small CPU shared
    with other processes several OpenMP threads spin-wait on each other
    (measured here: a tiny-GPT-2 training step 30-60x slower with 2 threads
    than with 1 while other jobs ran). Raise it on a dedicated machine.
    ``executor`` (serial, processes, ray; default processes when ``jobs`` > 1,
    else serial), ``jobs`` and ``address``: see
    :mod:`loramix.scenario.executors`; the threads are split across the jobs.
    Without ``jobs`` the run is serial here; ``loramix scenario run`` passes
    ``jobs="auto"``: :func:`~loramix.scenario.executors.default_jobs` workers
    (one per core on the CPU) where the plan has at least
    :data:`~loramix.scenario.executors.AUTO_MIN_TRAININGS` trainings per
    worker, else serial. A script that passes ``jobs`` > 1 (or ``"auto"``)
    needs the usual ``if __name__ == "__main__":`` guard: workers are
    spawned, and re-import the script's main module.
    Returns the report dict (also written as ``report.json``), with ``out``:
    path-like for the report folder (:mod:`loramix.results`).
    Its ``evaluations`` hold the base's rows once, apart, in
    ``base_evaluation``; :func:`loramix.scenario.evaluations.evaluations`
    gives every row as ``evaluations.csv`` lists them (the base's in each
    adapter label and seed).
    """
    from ..devices import is_cpu, resolve_device
    from ..io.outputs import atomic_output_dir

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    out = Path(out) if out is not None else Path("reports") / sc.name
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    inputs = [*sc.inputs(), cache_dir]
    check_report_dir(out, sc.name, force, inputs=inputs)
    # the CPU told without torch (no GPU driver): a rerun read back from the cache never imports it
    dev = "cpu" if is_cpu(device) else resolve_device(device)
    check_workers(threads, "--threads")
    from .executors import ProcessExecutor, default_jobs, make_executor

    if jobs == "auto":  # the command's default: workers per core where the plan has enough to spread
        if executor is not None or threads is not None:
            raise UsageError("jobs", '"auto" stands for no --jobs, --threads and --executor')
        n = default_jobs(dev)
        ex = ProcessExecutor(n, 1, auto=True) if n > 1 and not address else make_executor(address=address)
    else:
        ex = make_executor(executor, jobs=jobs, threads=threads or 1, address=address)
    cache = Cache(cache_dir, fresh=fresh)
    runner = Runner(sc, cache=cache, device=dev, progress=progress, executor=ex, threads=threads or 1)
    report = runner.run()  # torch's threads set for the run's computing, restored after
    report["out_hint"] = str(out / "fit.json")
    from .report import write_report  # pandas: not for a file refused above

    with atomic_output_dir(out, force=True) as tmp:
        cache.write_log(tmp / "cache_log.csv")
        write_report(tmp, report, per_module=runner.per_module, cache=cache)
        # again at the last moment: a folder that appeared during the study (not a report
        # of this scenario) is refused as one there at the start was, not replaced
        check_report_dir(out, sc.name, force, late=True, inputs=inputs)
    report["out"] = str(out)
    from ..results import OutputDict

    return OutputDict(report)  # path-like for the report folder (loramix.results)
