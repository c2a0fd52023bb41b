"""``loramix convert``: an adapter whose delta needs its base, written as a plain LoRA.

    loramix convert ADAPTER --base BASE --out DIR

PEFT VeRA (each module's in-features from BASE) and PiSSA/OLoRA saved
unconverted (``B0 A0`` from BASE's weights): :mod:`loramix.convert`.
"""

from __future__ import annotations

import time

import click


@click.command("convert")
@click.argument("adapter", type=click.Path())
@click.option(
    "--base", required=True, type=click.Path(), help="The base model folder the adapter was trained on."
)
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Output folder (refused if it exists, unless --force).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def command(adapter, base, out, force):
    """Write a PEFT VeRA or PiSSA/OLoRA ADAPTER as the PEFT LoRA of the same delta on BASE.

    VeRA shares one pair of random projections across its modules and cuts
    them to each module's in-features, which only the base knows, so the
    other commands refuse a VeRA folder. The LoRA written here (rank r,
    B = lambda_b * vera_B[:out], A = lambda_d * vera_A[:, :in], scale 1)
    is the same delta, and every command (and PEFT) reads it; only the base's
    safetensors headers are read, not its weights. A PiSSA or OLoRA adapter
    saved unconverted (its init took s B0 A0 out of the base) is written as
    the rank-2r LoRA s [B, -B0], [A; A0], B0 A0 from the base's weights, as
    PEFT's own conversion writes it: then the commands without a base
    (similarity, adapter outputs) take it too."""
    from ..convert import convert_adapter

    t0 = time.perf_counter()
    res = convert_adapter(adapter, base, out, force=force)
    what = {"vera": "VeRA", "pissa": "PiSSA", "olora": "OLoRA"}[res["kind"]]
    click.echo(f"converted {what} ({res['modules']} modules, rank {res['rank']}) to LoRA in "
               f"{time.perf_counter() - t0:.2f} s -> {res['out']}")  # fmt: skip
