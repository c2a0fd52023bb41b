"""``loramix sum``: the naive sum of adapters, into a base model or as one adapter.

    loramix sum A B [C ...] [--weights 1,0.5,...] [--into BASE] --out DIR

With ``--into``: ``W = W0 + sum_i w_i dW_i`` streamed into a copy of BASE.
Without: the exact sum as one PEFT adapter (ranks concatenated, scale 1).
Both are ``loramix merge --method sum``.
"""

from __future__ import annotations

import time

import click

from . import merge_options


@click.command("sum")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@merge_options()
@click.option("--out-rank", type=int, default=None, help="Without --into: truncate the sum to rank K (SVD).")
@click.option("--energy", type=float, default=None, help="Without --into: keep this energy fraction (SVD).")
def command(adapters, weights, into, out, dtype, device, force, progress, out_rank, energy):
    """Sum adapters: W0 + sum_i w_i dW_i into BASE (--into), or as one exact adapter."""
    from ..options import parse_weights

    parse_weights(weights, len(adapters))  # torch-free, before torch loads: a bad --weights fails fast
    from ..io.filehash import prefetch_inputs

    prefetch_inputs(adapters, into)  # hashed while torch loads (the output records their sha256)
    from ..methods import merge

    t0 = time.perf_counter()
    res = merge(list(adapters), "sum", weights=weights, into=into, out=out, device=device, dtype=dtype,
                force=force, progress=progress and into is not None, out_rank=out_rank, energy=energy)  # fmt: skip
    dt = time.perf_counter() - t0
    n = f"{len(adapters)} adapter{'' if len(adapters) == 1 else 's'}"
    if res.stream is not None:
        s = res.stream
        click.echo(
            f"summed {n} into {into}: {len(s.modules)} modules merged, "
            f"{s.tensors} tensors ({s.bytes_written / 1e6:.1f} MB, {str(s.dtype).removeprefix('torch.')}) "
            f"on {s.device} in {dt:.2f} s -> {res.out}"
        )
    else:
        click.echo(f"summed {n} into one adapter in {dt:.2f} s -> {res.out}")
        from ..methods.base import describe_energy

        for line in describe_energy(res.summary):  # --out-rank / --energy: what the truncation dropped
            click.echo(line)
