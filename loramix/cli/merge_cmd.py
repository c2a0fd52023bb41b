"""``loramix merge --method NAME A B [...] --out DIR``: a thin layer over :func:`loramix.methods.merge`.

Torch and the methods are imported inside the command, so ``loramix --help``
stays quick. Only the options the user gives reach the method; one that does
not apply to it (``--rank`` with ``ties``) is an error, exit 2.
"""

from __future__ import annotations

import click

from .threads import threads_option

# Kept here (not imported from loramix.methods) so that --help needs no torch.
METHODS_HELP = "sum, svd, ties, dare-linear, dare-ties, magnitude, d2-signed"


@click.command(name="merge")
@click.option("--method", "-m", required=True, help=f"Merge method: {METHODS_HELP}.")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", default=None, help="One weight per adapter, e.g. 1,0.5 (default: all 1).")
@click.option(
    "--into", type=click.Path(), default=None, help="Base model folder to merge into (writes a model)."
)
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option(
    "--density", type=float, default=None, help="ties/dare-*/magnitude: fraction of entries kept, (0, 1]."
)
@click.option("--sign", default=None, help="ties/dare-ties: sign election, mass (default) or count.")
@click.option("--divide", default=None, help="ties/dare-ties: count (PEFT, default) or weight (mergekit).")
@click.option("--lambda", "lambda_", type=float, default=None, help="Scale of the merged delta (default 1).")
@click.option("--seed", type=int, default=None, help="dare-*: seed of the drop masks (default 0).")
@click.option("--rank", type=int, default=None, help="svd: rank of the result.")
@click.option(
    "--energy", type=float, default=None, help="svd: keep the smallest rank holding this energy fraction."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--dtype", default=None, help="Output dtype: float32, float16, bfloat16 (default: the input's)."
)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@threads_option
@click.option("--progress/--no-progress", default=False, help="Show a progress bar.")
def command(
    adapters,
    method,
    weights,
    into,
    out,
    density,
    sign,
    divide,
    lambda_,
    seed,
    rank,
    energy,
    device,
    dtype,
    force,
    progress,
):
    """Merge adapters A B ... with a registered method.

    \b
    Low-rank methods (sum, svd) write a PEFT adapter without --into; every
    method writes a full model with --into BASE.
    """
    from ..methods import merge

    res = merge(
        list(adapters),
        method,
        weights=weights,
        into=into,
        out=out,
        device=device,
        dtype=dtype,
        force=force,
        progress=progress,
        density=density,
        sign=sign,
        divide=divide,
        lambda_=lambda_,
        seed=seed,
        rank=rank,
        energy=energy,
    )
    params = ", ".join(f"{k}={v}" for k, v in res.params.items())
    click.echo(
        f"merged {len(adapters)} adapter(s) with {res.method}"
        + (f" ({params})" if params else "")
        + f": {res.kind} written to {res.out} ({res.summary.get('modules', 0)} modules)"
    )
    s = res.summary
    if "energy_discarded_fraction" in s:
        ranks = s["ranks"]
        rank_txt = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        click.echo(
            f"rank {rank_txt}; discarded energy {s['energy_discarded']:.4g} "
            f"({100 * s['energy_discarded_fraction']:.3g}% of ||sum||^2); worst module "
            f"{s['worst_module']} ({100 * s['worst_module_discarded_fraction']:.3g}%); "
            f"per module in {res.out}/loramix.json"
        )
    if "rel_diff_vs_effective_sum_mean" in s:
        click.echo(
            "relative difference to adding effective deltas (sum --into): "
            f"mean {s['rel_diff_vs_effective_sum_mean']:.4g}, max {s['rel_diff_vs_effective_sum_max']:.4g}"
        )
