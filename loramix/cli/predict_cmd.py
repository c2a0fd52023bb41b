"""``loramix predict A B [C ...] --fit reports/NAME[/predictors.json]``: interference before merging."""

from __future__ import annotations

import click

from . import calibration_options, format_option


@click.command("predict")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--fit",
    "fit_path",
    required=True,
    type=click.Path(path_type=str),
    help="predictors.json (the best validated predictor) or fit.json (the cosine line), "
    "written by `loramix scenario run` or `loramix fit`, or the folder holding them (its predictors.json, "
    "else its fit.json).",
)
@click.option(
    "--method",
    "merge_method",
    default=None,
    help="Merge method whose fit to use (fit.json: default sum; predictors.json: from its by_method, by "
    "its label there, a study's variant's name or fit's 'ties --density 0.2'; default its primary predictor).",
)
@click.option(
    "--label",
    default=None,
    help="The study whose fit to use where fit.json holds several of the adapters' kind "
    "(e.g. lora:data); default: the one whose initialisation the adapters record.",
)
@click.option(
    "--level",
    type=float,
    default=None,
    help="Prediction-interval level (fit.json; default: the fit's, 0.95).",
)
@calibration_options(
    base_help="Base model folder of the calibration pass (with --data and a predictors file; a fit.json's "
    "cosine line reads no base)."
)
@format_option
def command(adapters, fit_path, merge_method, label, level, data, base, tokens, max_len, fmt):
    """Predict the interference of merging ADAPTERS (at least two), with error bars."""
    from ..interference import predict

    # loramix.predict checks and passes on every option, so a notebook gets what this command prints, and
    # refuses what it refuses (--base, --tokens, --max-len without --data, or with a fit.json), in its words
    r = predict(list(adapters), fit_path, method=merge_method, level=level, label=label,
                data=list(data) or None, base=base, tokens=tokens, max_len=max_len, progress=True)  # fmt: skip
    for n in r["notes"]:
        click.echo(f"loramix: note: {n}", err=True)
    validated = "predictor" in r  # a predictors file's result; the file read, a report folder's too
    read = r["file"] if validated else r["fit"]["file"]
    for w in r["warnings"]:  # another base than the file's, for a fit.json as for a predictors file
        click.echo(f"loramix: warning: {read}: {w}", err=True)
    if validated:
        click.echo(_json(r) if fmt == "json" else _validated_text(r))
        return
    click.echo(_json(r) if fmt == "json" else _line_text(r))


def _json(r: dict) -> str:
    """Standard JSON: a value with none (a pair of adapters sharing no module) is null, as
    in ``similarity --format json``, never the bare ``NaN`` that strict parsers reject."""
    import json

    from ..io.outputs import json_safe

    return json.dumps(json_safe(r), indent=2, allow_nan=False)


#: what a predicted target means, said under the figure: "retention +124" read as a share kept
#: (docs/interference.md defines them; positive is a loss in each)
_MEANS = {
    "retention_pct": "the merge's perplexity on each member's domain, % above that domain's own adapter's, "
                     "mean over the members; 0 is no loss",
    "worst_pct": "the merge's perplexity on each member's domain, % above that domain's own adapter's, "
                 "the largest over the members; 0 is no loss to any member",
    "delta_ppl_pct": "the merge's perplexity on the members' data, % above that of one adapter trained on "
                     "all of it; 0 is as good",
}  # fmt: skip


def _means(target: str) -> list[str]:
    """The line saying what ``target`` (``retention_pct (sum)``) measures; none for an unknown one."""
    name = target.split(" ")[0]
    return [f"  {name}: {_MEANS[name]}"] if name in _MEANS else []


def _validated_text(r: dict) -> str:
    v = r["validated"] or {}
    lines = [f"adapters: {', '.join(r['names'])} ({r['adapter_method']})"]
    lines += [f"  {f}: {x:.4g}" for f, x in r["features"].items()]
    mae = v.get("mae")
    over = f" of its {r['domains']} domains" if r.get("domains") else ""
    lines.append(f"predictor: {r['predictor']} from {r['file']} (best of its predictors under "
                 f"leave-one-domain-out{over}: held-out MAE {mae:.3g} over {v.get('n')} predictions, mean's "
                 f"{r['mean_mae']:.3g})")  # fmt: skip
    line = f"predicted {r['target']}: {r['predicted']:+.2f}"
    if r["interval"] is not None:
        lo, hi = r["interval"]
        line += f"  ({100 * r['level']:g}% prediction interval [{lo:+.2f}, {hi:+.2f}])"
    lines += [line, *_means(r["target"])]
    if not r["beats_mean"]:
        lines.append("note: this predictor is no better than the mean of the study's compositions")
    from ..validation import selection_note

    if (note := selection_note(r.get("selection"))) is not None:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _line_text(r: dict) -> str:
    f = r["fit"]
    lines = [f"adapters: {', '.join(r['names'])} ({r['adapter_method']})"]
    lines += [f"  RMS cosine {pair}: {c:.4f}" for pair, c in r["pairwise"].items()]
    if len(r["names"]) > 2:
        lines.append(f"  composition (quadratic mean over pairs): {r['cosine']:.4f}")
    rr = "n/a" if f["pearson_r"] is None else f"{f['pearson_r']:.3f}"
    of = f" of {f['domains']} domains" if f.get("domains") else ""
    lines.append(f"fit: {f['file']} ({r['label']}, {r['merge_method']}; {f['n']} compositions{of}, r = {rr}; "
                 f"delta = {f['slope']:.3g} * cos {f['intercept']:+.3g})")  # fmt: skip
    line = f"predicted delta_ppl%: {r['predicted_delta_ppl_pct']:+.2f}"
    if r["interval"] is not None:
        lo, hi = r["interval"]
        line += f"  ({100 * r['level']:g}% prediction interval [{lo:+.2f}, {hi:+.2f}])"
    else:
        line += "  (no prediction interval: the fit has fewer than 3 compositions)"
    lines += [line, f"  delta_ppl%: {_MEANS['delta_ppl_pct']}"]
    if r["loo_rmse"] is not None:
        lines.append(f"leave-one-out error of the fit: RMSE {r['loo_rmse']:.2f} points")
    lo, hi = r["fitted_range"]
    if not lo <= r["cosine"] <= hi:
        lines.append(f"note: cosine {r['cosine']:.4f} lies outside the fitted range [{lo:.4f}, {hi:.4f}]: "
                     "the line is extrapolated")  # fmt: skip
    from ..interference import size_note

    if note := size_note(len(r["names"]), r.get("fitted_sizes") or []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
