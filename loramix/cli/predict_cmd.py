"""``loramix predict A B [C ...] --fit reports/NAME/fit.json``: interference from similarity alone."""

from __future__ import annotations

import click


@click.command("predict")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--fit",
    "fit_path",
    required=True,
    type=click.Path(path_type=str),
    help="fit.json written by `loramix scenario run`.",
)
@click.option(
    "--method", "merge_method", default="sum", show_default=True, help="Merge method whose fit to use."
)
@click.option(
    "--level", type=float, default=None, help="Prediction-interval level (default: the fit's, 0.95)."
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(adapters, fit_path, merge_method, level, fmt):
    """Predict delta_ppl% of merging ADAPTERS (at least two) from their RMS cosine, with error bars."""
    import json

    from ..interference import predict

    r = predict(list(adapters), fit_path, merge_method=merge_method, level=level)
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    f = r["fit"]
    click.echo(f"adapters: {', '.join(r['names'])} ({r['adapter_method']})")
    for pair, c in r["pairwise"].items():
        click.echo(f"  RMS cosine {pair}: {c:.4f}")
    if len(r["names"]) > 2:
        click.echo(f"  composition (quadratic mean over pairs): {r['cosine']:.4f}")
    rr = "n/a" if f["pearson_r"] is None else f"{f['pearson_r']:.3f}"
    click.echo(f"fit: {f['file']} ({r['adapter_method']}, {r['merge_method']}; {f['n']} compositions, r = {rr}; "
               f"delta = {f['slope']:.3g} * cos {f['intercept']:+.3g})")  # fmt: skip
    line = f"predicted delta_ppl%: {r['predicted_delta_ppl_pct']:+.2f}"
    if r["interval"] is not None:
        lo, hi = r["interval"]
        line += f"  ({100 * r['level']:g}% prediction interval [{lo:+.2f}, {hi:+.2f}])"
    else:
        line += "  (no prediction interval: the fit has fewer than 3 compositions)"
    click.echo(line)
    if r["loo_rmse"] is not None:
        click.echo(f"leave-one-out error of the fit: RMSE {r['loo_rmse']:.2f} points")
    if r["extrapolation"]:
        lo, hi = r["fitted_range"]
        click.echo(f"note: cosine {r['cosine']:.4f} lies outside the fitted range [{lo:.4f}, {hi:.4f}]: "
                   "the line is extrapolated")  # fmt: skip
