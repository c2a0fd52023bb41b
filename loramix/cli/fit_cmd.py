"""``loramix fit EVAL.json ... --out DIR``: a validated predictor from the user's own evaluations
(:func:`loramix.evalfit.fit_evaluations`)."""

from __future__ import annotations

import click

from . import format_option


@click.command("fit")
@click.argument("evaluations", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--merged-data", "merged_data", multiple=True, type=click.Path(path_type=str),
              help="Evaluation of an adapter trained on a composition's pooled data, on its domains' data: its "
                   "merges get delta_ppl% too, and fit.json its line on the RMS cosine. Repeat.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Folder to write (predictors.json, fit.json with --merged-data, validation.csv, "
                   "predictions.csv, points.csv), for predict --fit and plan --fit.")  # fmt: skip
@click.option("--level", type=float, default=0.9, show_default=True,
              help="Level of the prediction intervals, whose coverage is validated.")  # fmt: skip
@click.option("--target", type=click.Choice(["retention", "worst"]), default="retention", show_default=True,
              help="What is fitted: each merge's members' mean loss against their own adapters (retention %), or "
                   "the largest (worst member %), which plan --fit then keeps under --budget for every member.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@format_option
def command(evaluations, merged_data, out, level, target, force, fmt):
    """Fit and validate interference predictors from EVALUATIONS: the JSON files of `loramix eval
    --format json` for single adapters (each on its own domain's data) and for merges of them."""
    import json

    from ..evalfit import fit_evaluations
    from ..grouping import figure as _fmt
    from ..validation import selection_note

    r = fit_evaluations(list(evaluations), merged_data=list(merged_data), out=out, level=level, target=target,
                        force=force)  # fmt: skip
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    n = len({d for p in r["points"] for d in p["composition"]})
    words = "worst member %" if target == "worst" else "retention %"
    click.echo(f"fitted from {len(evaluations) + len(merged_data)} evaluations: {len(r['points'])} merges of {n} "
               f"{r['adapter_kind']} adapters; {words}: the merge's perplexity on each member's data, % above "
               f"the member's own{', the largest over the members' if target == 'worst' else ''}")  # fmt: skip
    click.echo(f"| composition | method | RMS cosine | {words} | delta_ppl % | file |")
    click.echo("| --- | --- | ---: | ---: | ---: | --- |")
    for p in r["points"]:
        delta = "" if p["delta_ppl_pct"] is None else f"{p['delta_ppl_pct']:+.2f}"
        click.echo(f"| {'+'.join(p['composition'])} | {p['merge_method']} | {p['rms_cosine']:.4f} | "
                   f"{p['y']:+.2f} | {delta} | {p['file']} |")  # fmt: skip
    for m, e in r["methods"].items():
        best = next(s for s in e["summary"] if s["predictor"] == e["best"])
        click.echo(f"{m}: {e['headline']}")
        click.echo(f"  {e['best']} held out: MAE {_fmt(best['mae'])}, r {_fmt(best['r'])}, interval coverage "
                   f"{_fmt(best['coverage'])} over {best['n']} predictions")  # fmt: skip
        if (sel := e.get("selection")) and sel.get("mae") is not None:
            beats = "" if selection_note(sel) is None else ": choosing this way does not beat the mean"
            click.echo(f"  the choice validated too (nested leave-one-domain-out): MAE {_fmt(sel['mae'])} against "
                       f"{_fmt(sel['mean_mae'])} for the mean{beats}")  # fmt: skip
    for f in r["lines"]:
        click.echo(f"{f['merge_method']}: delta_ppl% = {f['slope']:.4g} * cos {f['intercept']:+.4g} over {f['n']} "
                   f"compositions, r {_fmt(f['pearson_r'])}, leave-one-out RMSE {_fmt(f['loo_rmse'])}")  # fmt: skip
    click.echo(f"wrote {r['out']}: loramix predict A B --fit {r['out']}; loramix plan ... --fit {r['out']}")
