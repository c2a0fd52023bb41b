"""``loramix scenario run FILE`` (and ``check``): composition studies from a scenario file."""

from __future__ import annotations

import click

from . import device_opt, progress_option


@click.group("scenario")
def command():
    """Run a composition study described by a scenario file (docs/scenarios.md)."""


def _jobs(jobs, threads, executor):
    """The run's jobs as ``scenario run`` picks them: as given, or without
    ``--jobs``, ``--threads`` and ``--executor`` ``"auto"``: workers per
    core on the CPU where the plan has enough trainings to spread
    (:func:`loramix.scenario.executors.default_jobs`, ``worth_workers``).
    That is the command's default; the library's ``run_scenario`` stays
    serial."""
    if jobs is not None or threads is not None or executor is not None:
        return jobs
    return "auto"


@command.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="The cache the run would use (default $LORAMIX_CACHE or .loramix-cache): its artifacts "
              "are not counted, and its measured throughput prices the rest.")  # fmt: skip
@click.option("--jobs", type=int, default=None, help="The run's --jobs (default: as the run would pick).")
@click.option("--threads", type=int, default=None, help="The run's --threads (default 1).")
@device_opt(what="The run's --device (priced by its throughput there)")
@click.option("--fresh", is_flag=True, help="Estimate a --fresh run (every artifact remade).")
def check_cmd(file, cache_dir, jobs, threads, device, fresh):
    """Check FILE and print what a run would do, and roughly how long it would
    take on this machine, without doing it (a GGUF base not imported yet is
    read from its header, not imported)."""
    from ..options import check_workers
    from ..scenario.config import load_scenario
    from ..scenario.runner import merges_for

    for name, v in (("--jobs", jobs), ("--threads", threads)):
        check_workers(v, name)
    sc = load_scenario(file, import_gguf=False)  # check reads: a GGUF's import is the run's
    from collections import Counter

    from ..scenario.plan import merged_data_compositions, plan, prepare_data

    # the data files are read (and refused: empty, too few records, a missing
    # field) before anything is printed, so a failed check never says "ok" first
    data = prepare_data(sc)
    from ..devices import is_cpu, resolve_device
    from ..scenario.executors import default_jobs, worth_workers

    # the device, $LORAMIX_JOBS and the cache: refused before "ok" too (the CPU told without torch)
    dev = "cpu" if is_cpu(device) else resolve_device(device)
    from ..scenario.cache import check_cache_root, default_cache_dir

    root = check_cache_root(cache_dir if cache_dir is not None else default_cache_dir())
    jobs = _jobs(jobs, threads, None)
    auto = default_jobs(dev) if jobs == "auto" else None
    click.echo(f"{file}: ok — scenario {sc.name!r}")
    for n, d in sc.domains.items():
        if d.adapter is not None:  # given: nothing trained (train: [predictors]' calibration records only)
            near, by = data[n].left_out_ngram, data[n].ngram
            copies = f" ({near} near copies by {by}-grams)" if near else ""
            left = f", {data[n].left_out} left out as trained on{copies}" if d.trained_on else ""
            click.echo(f"  domain {n}: {d.data} (eval {d.eval}{f', calibration {d.train}' if d.train else ''}"
                       f"{left}); adapter {d.adapter}")  # fmt: skip
        else:
            click.echo(f"  domain {n}: {d.data} (train {d.train}, eval {d.eval})")
    comps = ", ".join("+".join(c) for c in sc.compositions)
    click.echo(f"  compositions ({len(sc.compositions)}): {comps}")
    md = merged_data_compositions(sc, data)
    if len(md) < len(sc.compositions) and not sc.given:  # given: the adapter line below says none
        click.echo(f"  merged-data adapters ({len(md)}): {', '.join('+'.join(c) for c in md)}")
    n_dom = len(sc.domains)
    for am in sc.adapters.methods:
        ms = [m.label for m in merges_for(sc, am)]
        if sc.given:
            click.echo(
                f"  {am}: {n_dom} given adapters (not trained, no merged-data adapters); merges {', '.join(ms)}"
            )
            continue
        click.echo(f"  {am}: {len(sc.seeds)} seed(s) x ({n_dom} domain + {len(md)} merged-data adapters); "
                   f"merges {', '.join(ms)}")  # fmt: skip
    if sc.predictors is not None:
        from ..scenario.predictors import MIN_COMPOSITIONS

        n_target = len(md) if sc.predictors.target == "delta_ppl" else len(sc.compositions)
        if n_target < MIN_COMPOSITIONS:
            click.echo(f"  note: [predictors] needs at least {MIN_COMPOSITIONS} compositions with the "
                       f"{sc.predictors.target} target to validate a predictor; this study has {n_target}, so the "
                       "report will have no predictors section and no predictors.json")  # fmt: skip
    steps = plan(sc, data, import_gguf=False)
    # a given adapter (domains.NAME.adapter) is read where it is: not one to train
    kinds = Counter(
        "given adapter" if st.kind == "adapter" and st.cache_kind is None else st.kind for st in steps
    )
    click.echo(f"  plan: {len(steps)} steps ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
    from ..scenario.estimate import estimate
    from ..scenario.executors import threads_per_job

    if jobs == "auto":  # as the run decides, from the plan
        jobs = auto if auto > 1 and worth_workers(steps, auto) else 1
    jobs = jobs or 1
    per_job = threads_per_job(threads or 1, jobs)
    est = estimate(sc, steps, root, device=device,
                   threads=per_job, jobs=jobs, fresh=fresh)  # fmt: skip
    for line in est.lines():
        click.echo(line)
    base = next(st for st in steps if st.id == "base")
    if "import_bytes" in base.args:
        from ..io.filehash import cache_dir

        click.echo(f"  base: {sc.base.path} is not imported yet: the run first imports it into "
                   f"{cache_dir() / 'bases'} ({base.args['import_bytes'] / 1e6:,.0f} MB of float32 weights, "
                   "not in the estimate), and finds no step cached until then")  # fmt: skip
    if sc.plan is not None:
        p = sc.plan
        cost = (
            "the worst member's predicted loss"
            if sc.predictors.target == "worst"
            else "predicted interference"
        )
        click.echo(f"  plan validation: the {p.adapters} adapters of seed {p.seed} grouped by `loramix plan` on {cost} "
                   f"(groups of at most {p.max_size}; merged: {', '.join(p.methods)}) and {p.random} random groupings of the "
                   f"same sizes: at most {len(p.methods) * (p.random + 1) * (n_dom // 2)} merge evaluations, planned after the "
                   "predictors step (cached like the others; not in the estimate)")  # fmt: skip


@command.command("run")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Report folder (default reports/NAME).",
)
@device_opt(what="Where the study trains, merges and evaluates")
@click.option("--fresh", is_flag=True, help="Redo every artifact instead of reusing the cache.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Cache folder (default $LORAMIX_CACHE or .loramix-cache).",
)
@click.option("--force", is_flag=True, help="Replace --out even if it is not a report of this scenario.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch CPU threads, split across --jobs (default 1: small models on a shared CPU run fastest that way).",
)
@click.option("--jobs", type=int, default=None,
              help="Steps run at once (>1 means --executor processes). Default on the CPU: one per core, at "
                   "most 4, where the plan has at least 4 trainings per worker, same results as --jobs 1 "
                   "($LORAMIX_JOBS overrides); 1 on a GPU or with --threads; 2 with --executor "
                   "processes or ray.")  # fmt: skip
@click.option("--executor", type=click.Choice(["serial", "processes", "ray"]), default=None,
              help="Where steps run: this process, local worker processes, or a Ray cluster (default: processes "
                   "where --jobs is above 1, else serial).")  # fmt: skip
@click.option(
    "--address", default=None, help="Ray cluster address (--executor ray; default: a local instance)."
)
@progress_option
def run_cmd(file, out, device, fresh, cache_dir, force, threads, jobs, executor, address, progress):
    """Run the scenario FILE and write its report (report.md, results.csv, report.json, fit.json, plots)."""
    import os

    # Before numpy loads OpenBLAS (as `loramix similarity` does below 200 adapters): the
    # similarity step's Gram strips are small GEMMs, which a second, spinning OpenBLAS
    # thread slows down on a busy machine (the 14-domain study's cached rerun, 2 cores at
    # load 10: 1.2-3.1 s instead of 0.1-0.2 s, most of that rerun); OPENBLAS_NUM_THREADS overrides.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..scenario.runner import run_scenario

    jobs = _jobs(jobs, threads, executor)
    # a kill (SIGTERM) unwinds like Ctrl-C (loramix.cli.main), so half-made artifacts are removed
    rep = run_scenario(file, out=out, device=device, fresh=fresh, cache_dir=cache_dir, force=force,
                       progress=progress, threads=threads, jobs=jobs, executor=executor,
                       address=address)  # fmt: skip
    t = rep["timings"]["total_seconds"]
    # what was made and what read back: a rerun says here that it made nothing
    kinds = rep["timings"]["by_kind"].values()
    made, reused = sum(k["made"] for k in kinds), sum(k["reused"] for k in kinds)
    click.echo(f"report: {rep['out']}/report.md ({t:.1f} s; {made} artifacts made, {reused} from the cache)")
    for m in (rep.get("plan_validation") or {}).get("by_method", []):
        click.echo(f"  plan vs random groupings: {m['verdict'].replace('**', '')}")
    for am, verdicts in _verdict_counts(rep.get("composability") or []).items():
        click.echo(f"  {am}: {verdicts} (Which adapters compose?)")
    for f in rep["fits"]:
        if f["merge_method"] != "sum" or not f["n"]:  # none: no merged-data adapter (given adapters)
            continue
        click.echo(fit_line(f))


def fit_line(f: dict) -> str:
    """The run's closing line for one label's fit of the sum's Δppl % on the
    RMS cosine (a ``report.json`` ``fits`` row): its size, r and
    leave-one-out RMSE, each "n/a" where too few compositions give none."""
    n, r, loo = f["n"], f["pearson_r"], f["loo_rmse"]
    return (f"  {f['adapter_method']}: delta_ppl% ~ RMS cosine over {n} composition{'' if n == 1 else 's'}: "
            f"r = {'n/a' if r is None else f'{r:.3f}'}, "
            f"LOO RMSE = {'n/a' if loo is None else f'{loo:.2f} points'}")  # fmt: skip


def _verdict_counts(rows: list[dict]) -> dict[str, str]:
    """``{adapter label: "2 compose, 4 partly, 0 do not"}`` of the report's
    composability rows (the counts of the report's "Which adapters compose?")."""
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["adapter_method"], []).append(r["verdict"])
    return {am: f"{v.count('composes')} compose, {v.count('partly')} partly, {v.count('does not compose')} do not"
            + (f", {n} with no gain to keep" if (n := v.count("no gain to keep")) else "")
            for am, v in out.items()}  # fmt: skip
