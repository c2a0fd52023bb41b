"""``loramix inspect PATH``: modules, shapes, ranks, scales and norms of an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import format_option


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@format_option
def command(path: Path, fmt: str) -> None:
    """Show what the adapter at PATH holds, module by module.

    PATH is a PEFT LoRA (or loramix D2-LoRA) folder, or its .safetensors file
    with adapter_config.json beside it. For each module: shape (out x in, the
    nn.Linear layout), rank, alpha, scale, the Frobenius norm of the delta
    s*B@A (computed from the factors, in float64), stored dtype and parameter
    count. LoRA, DoRA and D2-LoRA are read and computed in numpy, without
    torch; embedding LoRA (or DoRA) and modules_to_save by the torch readers,
    as are PEFT AdaLoRA, LoHa and LoKr, read as LoRA (a "format:" line says how).
    For DoRA the norm is that of the residual s*B@A and the range of the
    magnitudes m is shown; for D2-LoRA the norm is that of the signed
    residual s(B+A+ - tau B-A-); the delta merging adds, W_hat - W0, depends
    on the base and differs.
    """
    from ..io.peft_layout import check_adapter_path

    check_adapter_path(path)  # before pandas (or torch) loads: a mistyped path fails fast
    from ..contents import inspect_adapter

    df = inspect_adapter(path)
    if fmt == "json":
        click.echo(_json(df))
    else:
        _print_text(df)


def _json(df) -> str:
    """``inspect --format json``'s document of ``df`` (:func:`~loramix.contents.inspect_adapter`)."""
    meta = df.attrs
    out = {
        k: meta[k]
        for k in (
            "name",
            "path",
            "sha256",
            "kind",
            "method",
            "base_model",
            "totals",
            "saved",
            "base_copies",
        )
    }
    if meta["magnitude"] is not None:  # DoRA's
        out["magnitude"] = meta["magnitude"]
    if meta["read_as"] is not None:  # a tuner read as LoRA (AdaLoRA, LoHa, LoKr)
        out["read_as"] = meta["read_as"]
    # not df.to_json: pandas rounds to 10 decimals (a norm of 7.08e-9 became 7.1e-09)
    out["modules"] = [
        {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
        for row in df.to_dict(orient="records")
    ]
    return json.dumps(out, indent=2)


def _print_text(df) -> None:
    """``inspect``'s table of ``df`` (:func:`~loramix.contents.inspect_adapter`) and the lines under it."""
    meta = df.attrs
    t = meta["totals"]
    click.echo(f"adapter:    {meta['name']} ({meta['kind']})")
    click.echo(f"path:       {meta['path']}")
    click.echo(f"sha256:     {meta['sha256']}")
    click.echo(f"base model: {meta['base_model'] or '(not recorded)'}")
    if meta["read_as"] is not None:
        click.echo(f"format:     {meta['read_as']}")
    click.echo("")
    click.echo(
        df.to_string(
            index=False,
            formatters={
                "alpha": "{:g}".format,
                "scale": "{:.6g}".format,
                "norm": "{:.6g}".format,
                "params": "{:,}".format,
            },
        )
    )
    click.echo("")
    click.echo(
        f"total: {t['modules']} modules, {t['params']:,} parameters, "
        f"norm {t['norm']:.6g} (sqrt of the sum of squared module norms), "
        f"ranks {', '.join(map(str, t['ranks']))}, dtype {', '.join(t['dtypes'])}"
    )
    from ..discovery import declared

    kinds = declared("loramix.kinds", "AdapterKind")  # read from the files: no torch
    based = [kinds[k] for k in dict.fromkeys(df["kind"]) if kinds.get(k, {}).get("needs_base")]
    if based:
        what = " or ".join(k.get("label") or k["id"] for k in based)
        d2 = (
            " (D2-LoRA's: the signed residual s(B+A+ - tau B-A-))"
            if any(k["id"] == "d2lora" for k in based)
            else ""
        )
        click.echo(
            f"norm of a {what} module: its residual{d2}, not the delta "
            "W_hat - W0 that merging adds (that one depends on the base weight)"
        )
    if (mag := meta["magnitude"]) is not None:
        click.echo(
            f"magnitude m (DoRA, one per output row; per column on an embedding): from {mag['min']:.6g} "
            f"to {mag['max']:.6g} over {mag['modules']} modules; params count it"
        )
    for c in meta["saved"]:
        shape = "x".join(map(str, c["shape"]))
        click.echo(
            f"full copy (modules_to_save): {c['tensor']} {shape} {c['dtype']}, {c['params']:,} parameters"
        )
    for c in meta["base_copies"]:
        shape = "x".join(map(str, c["shape"]))
        click.echo(
            f"PEFT's copy of the base's {c['tensor']} ({shape} {c['dtype']}, {c['params']:,} parameters, "
            "save_embedding_layers): not read; merges apply the delta to the base's own tensor"
        )
