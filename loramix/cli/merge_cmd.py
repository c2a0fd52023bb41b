"""``loramix merge --method NAME A B [...] --out DIR``: a thin layer over :func:`loramix.methods.merge`.

The method options (``--density``, ``--rank``, ...) are not written here:
they are generated from the registered methods' ``Param`` declarations when
the command is used, so a new method brings its own options. The methods
(and torch) are imported only then, never for ``loramix --help``. Only the
options the user gives reach the method; one that does not apply to it
(``--rank`` with ``ties``) is an error, exit 2.
"""

from __future__ import annotations

import time

import click

from . import merge_options

_CLICK_TYPES = {int: click.INT, float: click.FLOAT}


def _default_text(by_method: dict[str, object]) -> str:
    """``; default X`` for a parameter's defaults over the methods taking it,
    naming the methods whose default differs from the most common one."""
    given = {m: d for m, d in by_method.items() if d is not None}
    if not given:
        return ""
    values = list(given.values())
    common = max(values, key=values.count)
    others = ", ".join(f"{m}: {d}" for m, d in given.items() if d != common)
    return f"; default {common}" + (f" ({others})" if others else "")


def method_options() -> list[click.Option]:
    """One option per parameter name over all registered methods; its help
    names the methods that take it. Values are checked by the method."""
    from ..methods import method_classes

    users: dict[str, list[str]] = {}
    first: dict[str, object] = {}
    defaults: dict[str, dict[str, object]] = {}  # parameter -> method -> its default there
    required: dict[str, list[str]] = {}  # parameter -> the methods that need it
    for name, cls in method_classes().items():
        for p in cls.params:
            users.setdefault(p.name, []).append(name)
            first.setdefault(p.name, p)
            defaults.setdefault(p.name, {})[name] = p.default
            if p.required:
                required.setdefault(p.name, []).append(name)
    opts = []
    trunc_help = "any method without --into: write an adapter truncated by SVD to"
    for pname, p in first.items():
        extra = f" ({', '.join(p.choices)})" if p.choices else ""
        default = _default_text(defaults[pname])
        if pname in required:  # no default to show: say that it must be given
            needs = required[pname]
            default += "; required" + ("" if needs == users[pname] else f" by {'/'.join(needs)}")
        also = f"; {trunc_help} this energy fraction" if pname == "energy" else ""
        opts.append(
            click.Option(
                [p.flag, pname],
                type=_CLICK_TYPES.get(p.type, click.STRING),
                default=None,
                help=f"{'/'.join(users[pname])}: {p.help}{extra}{default}{also}.",
            )
        )
    if "energy" not in first:
        opts.append(click.Option(["--energy", "energy"], type=click.FLOAT, default=None,
                                 help=f"{trunc_help} the smallest rank keeping this energy fraction."))  # fmt: skip
    opts.append(
        click.Option(["--out-rank", "out_rank"], type=click.INT, default=None, help=f"{trunc_help} rank K.")
    )
    return opts


class MergeCommand(click.Command):
    """A command whose method options come from the registry, on first use."""

    def get_params(self, ctx):
        from ..methods import available_methods

        help_opt = self.get_help_option(ctx)
        params = [p for p in super().get_params(ctx) if p is not help_opt]
        for p in params:
            if p.name == "method":
                p.help = f"Merge method: {', '.join(available_methods())}."
        return [*params, *method_options(), *([help_opt] if help_opt is not None else [])]


@click.command(name="merge", cls=MergeCommand)
@click.option("--method", "-m", required=True, help="Merge method (loramix merge --help lists them).")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@merge_options()
def command(adapters, method, weights, into, out, device, dtype, force, progress, **params):
    """Merge adapters A B ... with a registered method.

    \b
    Low-rank methods (sum, svd, task-arithmetic, core-ties, core-dare-ties,
    core-dare-linear, knots-ties, knots-dare-ties, iso-c, iso-cts, tsv) write
    a PEFT adapter without --into; any method (but iso-c and iso-cts) writes
    an adapter truncated by SVD with --out-rank K or --energy F, and a full
    model with --into BASE.
    """
    from ..io.filehash import prefetch_inputs

    prefetch_inputs(adapters, into)  # hashed while torch loads (the output records their sha256)
    from ..methods import get_method, merge

    t0 = time.perf_counter()
    res = merge(list(adapters), method, weights=weights, into=into, out=out, device=device, dtype=dtype,
                force=force, progress=progress and into is not None, **params)  # fmt: skip
    dt = time.perf_counter() - t0
    shown = ", ".join(f"{k}={v}" for k, v in res.params.items())
    # into a base: what `sum --into` says of the same write (tensors, size, dtype, device, time)
    s = res.stream
    wrote = (f", {s.tensors} tensors, {s.bytes_written / 1e6:.1f} MB {str(s.dtype).removeprefix('torch.')}, on "
             f"{s.device} in {dt:.2f} s" if s is not None else f" in {dt:.2f} s")  # fmt: skip
    click.echo(
        f"merged {len(adapters)} adapter{'' if len(adapters) == 1 else 's'} with {res.method}"
        + (f" ({shown})" if shown else "")
        + f": {res.kind} written to {res.out} ({res.summary.get('modules', 0)} modules{wrote})"
    )
    from ..methods.base import describe_energy

    for line in get_method(res.method).describe(res.summary) or describe_energy(res.summary):
        click.echo(line)
    if res.modules:
        click.echo(f"per-module figures in {res.out}/loramix.json")
