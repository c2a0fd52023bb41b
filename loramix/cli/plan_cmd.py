"""``loramix plan A B [C ...]``: which adapters to merge together, and with which method."""

from __future__ import annotations

import click
from click.core import ParameterSource

from . import calibration_options, check_calibration_args, device_opt, format_option, progress_option


@click.command("plan")
@click.argument("adapters", nargs=-1, type=click.Path(path_type=str))
@click.option(
    "--fit",
    "fit_path",
    type=click.Path(path_type=str),
    default=None,
    help="predictors.json (the best validated predictor), written by `loramix scenario run` or `loramix fit`, "
    "or the folder holding it; without it the cost is the RMS cosine.",
)
@calibration_options(
    base_help="Base model folder: with --data, the calibration pass's; without --fit, DoRA and D2-LoRA "
    "adapters are costed on their effective deltas W_hat - W0 (as similarity --base), not their residuals."
)
@click.option(
    "--max-group", "max_group", type=int, default=4, show_default=True, help="Largest group size K."
)
@click.option(
    "--budget",
    type=float,
    default=None,
    help="Largest predicted cost of a group (default: 0 with --fit, the zero-interference point; 0.1 cosine).",
)
@device_opt("cpu", "Where the calibration forward passes run (with --data)")
@format_option
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as --format json.")
@progress_option
def command(
    adapters, fit_path, data, base, tokens, max_len, max_group, budget, device, fmt, as_json, progress
):
    """Propose groups of ADAPTERS to merge, with each group's predicted cost and a method."""
    import json
    import os

    if base is not None and fit_path is None:
        # effective deltas: the Gram products run in torch; before it loads OpenMP, idle worker
        # threads sleep instead of spinning, as in `loramix similarity` (measured: 4 SmolLM2 DoRA
        # adapters, 14-22 s of CPU against 3.2-3.8 s with 2 threads on 2 busy cores)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ..grouping import check_device_arg, plan

    # without --fit, --base alone sets the deltas the cosines compare (effective, not residual)
    check_calibration_args(data, base if fit_path is not None else None, tokens, max_len)
    # --device given at all, --device cpu too (the library tells only another device from its default)
    check_device_arg(data, device,
                     given=click.get_current_context().get_parameter_source("device") != ParameterSource.DEFAULT)  # fmt: skip
    p = plan(list(adapters), fit=fit_path, data=list(data) or None, base=base, max_group=max_group,
             budget=budget, tokens=tokens, device=device, max_len=max_len, progress=progress)  # fmt: skip
    for w in p.warnings:
        click.echo(f"loramix: warning: {fit_path}: {w}", err=True)
    for n in p.notes:
        click.echo(f"loramix: note: {n}", err=True)
    if as_json or fmt == "json":
        click.echo(json.dumps(p.to_json_dict(), indent=2))
        return
    for line in p.table():
        click.echo(line)
    for line in _commands(p.groups, base):
        click.echo(line)


def _commands(groups, base) -> list[str]:
    """The command that merges each group of two or more as proposed: by the
    method and parameters its study merged by (the group's ``merge``, from
    the predictors file: ``iso-c-rms`` is ``merge -m iso-c --flat rms``).
    A name alone (a file written before it said them, or no file): ties gets
    the shipped studies' --density 0.5, another method that needs an option
    (dare-ties' --density) a pointer to it, one whose options all have
    defaults (tsv, iso-c) nothing."""
    import shlex

    from ..methods import get_method, params_of

    into = shlex.quote(str(base)) if base else "BASE"
    lines = []
    for g in (g for g in groups if len(g["paths"]) > 1):
        paths = " ".join(shlex.quote(str(x)) for x in g["paths"])
        if "merge" in g:
            m, params = g["merge"]["method"], g["merge"]["params"]
            declared = params_of(m)
            opts = "".join(f" {declared[k].flag} {shlex.quote(_value(v))}" for k, v in params.items())
            verb, note = ("sum" if m == "sum" and not opts else f"merge -m {m}{opts}"), ""
            if g["method"] != m and not g["method"].startswith(f"{m} --"):  # a variant's name: say it
                note = f"  # {g['method']}"
        else:
            m = g["method"]
            verb = "sum" if m == "sum" else f"merge -m {m}" + (" --density 0.5" if m == "ties" else "")
            needs = [q.flag for q in get_method(m).params if q.required]
            if m == "ties":
                note = "  # --density: the shipped studies'"
            else:
                note = f"  # and {m}'s {', '.join(needs)}: merge --help" if needs else ""
        lines.append(f"  group {g['group']}: loramix {verb} {paths} --into {into} --out OUT{note}")
    return (
        ["to merge (without --into: one adapter, --out-rank K for a dense method):", *lines] if lines else []
    )


def _value(v) -> str:
    """A parameter's value as its flag takes it (``0.5``, ``rms``; a float's shortest repr)."""
    return repr(v) if isinstance(v, float) else str(v)
