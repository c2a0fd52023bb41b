"""``loramix similarity A B [C ...]``: exact pairwise RMS cosine of adapter deltas.

Never imports transformers: adapters are read with safetensors and the math is
the factored Gram product of docs/adapters.md (``loramix.similarity``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import device_opt


def _pairs_table(long, by: str):
    """Pivot a :func:`loramix.similarity.breakdown` table: one row per pair,
    one column per ``by`` value, RMS cosine in the cells."""
    if long.empty:
        return long
    wide = long.assign(pair=long["a"] + " ~ " + long["b"]).pivot(index="pair", columns=by, values="rms")
    wide.columns.name = by
    return wide


def _note_residuals(res) -> None:
    """One note line where DoRA or D2-LoRA adapters were compared without the
    base (:func:`loramix.overlap.residual_note`)."""
    from ..overlap import residual_note

    if note := residual_note(res.names, res.kinds, res.effective):
        click.echo(f"loramix: note: {note}", err=True)


@click.command("similarity")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table: the RMS and signed mean matrices (and coverage where not 1); csv: the RMS matrix (with --per-module: the per-module "
    "cosines, one row per module and pair); json: names, rms, signed mean, coverage.",
)
@click.option(
    "--per-module", is_flag=True, help="Also break the RMS cosine down by module type and by layer."
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a heatmap of the RMS matrix (e.g. sim.png).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Base model folder: DoRA and D2-LoRA adapters are compared on their effective delta "
    "W_hat - W0 instead of the residual (still from the factors, docs/adapters.md).",
)
@device_opt("cpu", "Where the Gram products run")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
def command(adapters, fmt, per_module, plot, base, device, force) -> None:
    """Pairwise similarity of the deltas of adapters A, B, C, ...

    Per module, cos = <dW_i, dW_j>_F / (||dW_i|| ||dW_j||), computed exactly in
    float64 from the low-rank factors (no dense delta); reported: the RMS
    cosine sqrt(mean cos^2) over the modules both adapters touch, the signed
    mean cosine and the coverage (shared / union modules). Adapters made for
    different base models (a shared module with different shapes) are refused.
    """
    import os

    # Before torch loads OpenMP: idle worker threads sleep instead of spinning.
    # On a busy shared machine spinning threads starve each other (measured:
    # 100 adapters took 60 s instead of 26 s with 2 threads under load 9 on
    # 2 cores); on an idle one it costs nothing measurable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Before numpy loads OpenBLAS: below a few hundred adapters each Gram strip
    # is a small GEMM and OpenBLAS's second thread, which spins while it waits,
    # costs more than it gives (measured on 2 busy cores: 10 adapters 1.6 s with
    # one thread, 3.9-9 s with two; 100 adapters 8.6 s against 42 s). Larger
    # banks keep BLAS's own choice; OPENBLAS_NUM_THREADS overrides either way.
    from ..blas import ONE_THREAD_BELOW

    if len(adapters) < ONE_THREAD_BELOW:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..errors import OutputError, UsageError
    from ..io.outputs import check_parents, resolved

    if len(adapters) < 2:
        raise UsageError("similarity", "needs at least two adapters to compare")
    if plot is not None:
        if plot.exists() and not force:
            raise OutputError(plot, "already exists; pass --force to replace it")
        if any(resolved(plot) == resolved(a) for a in adapters):
            raise OutputError(plot, "--plot would overwrite an input")
        check_parents(plot)  # before the work, as --out's check: a plot under a file
        from ..plots import check_figure_path

        check_figure_path(plot)
    from ..io.peft_layout import check_adapter_paths

    check_adapter_paths(adapters)  # what loading one would say, before pandas (and torch) load
    from ..overlap import breakdown, similarity

    res = similarity(list(adapters), base=base, per_module=per_module, progress=True, device=device)

    if len(res.zero_norm):
        z = [f"{r.adapter}:{r.module}" for r in res.zero_norm.itertuples()]
        more = f" and {len(z) - 5} more" if len(z) > 5 else ""
        click.echo(
            f"loramix: note: {len(z)} module delta(s) are zero and have no cosine: {', '.join(z[:5])}{more}",
            err=True,
        )

    _note_residuals(res)
    if plot is not None:  # first: a plot that cannot be written is the one line, not a table and then it
        from ..plots import similarity_heatmap

        # the table's heading: "RMS cosine similarity" alone did not say of what
        kind = "effective deltas" if res.effective else "deltas"
        title = f"RMS cosine similarity of {kind} ({len(res.names)} adapters)"
        similarity_heatmap(res.rms, plot, title=title, replace=force)  # a file made meanwhile is not replaced
        click.echo(f"loramix: wrote {plot}", err=True)
    if fmt == "json":
        click.echo(json.dumps(res.to_json_dict(per_module=per_module), indent=2, allow_nan=False))
    elif fmt == "csv":
        if per_module:
            click.echo(res.per_module.to_csv(index=False), nl=False)
        else:
            click.echo(res.rms.to_csv(float_format="%.10g"), nl=False)
    else:
        kind = "effective deltas" if res.effective else "deltas"
        click.echo(f"RMS cosine similarity of {kind} ({len(res.names)} adapters)")
        click.echo(res.rms.rename_axis(None).to_string(float_format=lambda x: f"{x:.4f}", na_rep="n/a"))
        click.echo("\nsigned mean cosine")
        click.echo(res.mean.rename_axis(None).to_string(float_format=lambda x: f"{x:+.4f}", na_rep="n/a"))
        if not (res.coverage.to_numpy() == 1.0).all():
            click.echo("\ncoverage (shared / union modules)")
            click.echo(res.coverage.rename_axis(None).to_string(float_format=lambda x: f"{x:.3f}"))
        if per_module:
            for by, label in (("type", "module type"), ("layer", "layer")):
                wide = _pairs_table(breakdown(res.per_module, by), by)
                click.echo(f"\nRMS cosine by {label}")
                click.echo(wide.to_string(float_format=lambda x: f"{x:.4f}", na_rep="n/a"))
