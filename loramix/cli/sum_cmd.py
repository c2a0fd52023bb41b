"""``loramix sum``: the naive sum of adapters, into a base model or as one adapter.

    loramix sum A B [C ...] [--weights 1,0.5,...] [--into BASE] --out DIR

With ``--into``: ``W = W0 + sum_i w_i dW_i`` streamed into a copy of BASE.
Without: the exact sum as one PEFT adapter (ranks concatenated, scale 1).
"""

from __future__ import annotations

import time

import click

from ..errors import UsageError
from .threads import threads_option


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """``"1,0.5"`` -> ``[1.0, 0.5]``; a count other than ``n`` is a usage error."""
    if text is None:
        return None
    try:
        weights = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError("--weights", f"{text!r} is not a comma-separated list of numbers") from None
    if len(weights) != n:
        raise UsageError("--weights", f"got {len(weights)} weights for {n} adapters; give one per adapter")
    return weights


@click.command("sum")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", default=None, help="Comma-separated weights, one per adapter (default all 1).")
@click.option(
    "--into",
    "base",
    default=None,
    help="Base model folder to sum into; without it, write one merged adapter.",
)
@click.option("--out", required=True, help="Output folder (refused if it exists, unless --force).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Output dtype (default: the base's, or the adapters').",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@threads_option
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(adapters, weights, base, out, dtype, device, force, progress):
    """Sum adapters: W0 + sum_i w_i dW_i into BASE (--into), or as one exact adapter."""
    from ..summation import sum_adapters, sum_into_base

    w = parse_weights(weights, len(adapters))
    t0 = time.perf_counter()
    if base is not None:
        res = sum_into_base(
            list(adapters), base, out, weights=w, dtype=dtype, device=device, force=force, progress=progress
        )
        dt = str(res.dtype).removeprefix("torch.")
        click.echo(
            f"summed {len(adapters)} adapters into {base}: {len(res.modules)} modules merged, "
            f"{res.tensors} tensors ({res.bytes_written / 1e6:.1f} MB, {dt}) on {res.device} "
            f"in {time.perf_counter() - t0:.2f} s -> {res.out}"
        )
    else:
        if device not in ("auto", "cpu"):
            from ..devices import resolve_device

            resolve_device(device)  # a missing GPU is still an error; the sum itself is tiny
        path = sum_adapters(list(adapters), out, weights=w, force=force, dtype=dtype)
        click.echo(
            f"summed {len(adapters)} adapters into one adapter in {time.perf_counter() - t0:.2f} s -> {path}"
        )
