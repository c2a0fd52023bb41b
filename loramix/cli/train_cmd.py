"""``loramix train``: train one LoRA or D2-LoRA adapter (see :mod:`loramix.train`)."""

from __future__ import annotations

import math

import click

from . import data_options, device_opt, field_options, progress_option, prompt_option
from .threads import threads_option


def _eval_size(value: str) -> int | float:
    """A count (1 and more, or 0: none held out) or a fraction in (0, 1);
    ValueError for anything else (nan, inf, negative, 2.5)."""
    v = float(value)
    if 0 < v < 1:
        return v
    if v == 0 or (v >= 1 and v.is_integer() and v < 2**63):
        return int(v)
    raise ValueError(value)


@click.command("train")
@click.option("--base", required=True, type=click.Path(), help="Base model folder (Hugging Face causal LM).")
@data_options("Data file (.jsonl/.json/.csv/.txt) or synthetic:NAME spec; several are pooled.")
@click.option("--out", required=True, type=click.Path(), help="Output adapter folder.")
@click.option(
    "--kind",
    default="lora",
    show_default=True,
    help="Adapter kind, one that loramix.kinds trains (docs/adapters.md): e.g. lora (a PEFT folder) or d2lora "
    "(loramix's D2-LoRA format).",
)
@click.option("--method", default=None, hidden=True, help="Deprecated name of --kind.")
@click.option("--rank", type=int, default=8, show_default=True, help="Rank r of the factors.")
@click.option(
    "--alpha", type=float, default=16, show_default=True, help="LoRA alpha; the scale is s = alpha / rank."
)
@click.option("--tau", type=float, default=0.5, show_default=True, help="D2-LoRA negative-branch weight.")
@click.option(
    "--norm-dim",
    type=click.IntRange(0, 1),
    default=1,
    show_default=True,
    help="D2-LoRA norm axis of the out x in weight: 1 per output unit, 0 per input column.",
)
@click.option("--targets", default=None, help="Comma-separated module suffixes (default: per architecture).")
@click.option("--epochs", type=float, default=1, show_default=True, help="Passes over the training records.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=2e-3, show_default=True,
              help="Peak AdamW learning rate. A study's default is 2e-4 with rank 4 and alpha 64: copy all "
                   "three (the delta's step goes with lr x alpha / rank).")  # fmt: skip
@click.option(
    "--warmup", type=int, default=None, help="Warm-up steps, at most the run's (default 5% of the steps)."
)
@click.option(
    "--batch",
    type=int,
    default=16,
    show_default=True,
    help="Records per optimizer step; a batch holds records of similar length (less padding).",
)
@click.option("--max-len", type=int, default=128, show_default=True,
              help="Tokens per record, in training and the held-out perplexity; a longer one is cut, "
                   "keeping its question (the summary counts them).")  # fmt: skip
@click.option(
    "--eval-size",
    type=str,
    default="0.1",
    show_default=True,
    help="Held out per data source: a fraction (<1) or a count; 0 for none.",
)
@click.option("--limit", type=int, default=None, help="Use the first N records of each source.")
@click.option("--on", type=click.Choice(["answer", "all"]), default="answer", show_default=True,
              help="Tokens the loss counts: the answer's, or all (the prompt's too).")  # fmt: skip
@prompt_option
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the held-out split, the initial factors and the batch order.")  # fmt: skip
@click.option(
    "--shared-init",
    is_flag=True,
    help="Initial factors from --seed alone (default: from --seed and the data, so domains start apart).",
)
@device_opt(what="Where the training runs")
@field_options
@click.option(
    "--top-layers",
    type=int,
    default=None,
    help="Adapters on the top N layers only (Llama family); the frozen layers below run once per example "
    "and are cached.",
)
@click.option("--dtype", default=None, help="bfloat16: the forward under bf16 autocast (default float32).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per batch.")
@click.option(
    "--grad-checkpointing", is_flag=True, help="Recompute activations in the backward (less memory)."
)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@threads_option
@progress_option
def command(base, data, more_data, out, targets, eval_size, progress, kind, method, **kw):
    """Train an adapter on question/answer data and write it to --out.

    LoRA adapters are PEFT folders; D2-LoRA adapters use loramix's format
    (docs/d2lora.md). Also writes train_log.csv and loramix.json. Prints
    the held-out perplexity of the base and of the adapted model.
    """
    from ..errors import UsageError
    from ..options import capped_note
    from ..train import train_adapter

    try:
        es = _eval_size(eval_size)
    except ValueError:
        raise UsageError(
            "--eval-size", f"a count of records or a fraction in (0, 1), got {eval_size!r}"
        ) from None
    ctx = click.get_current_context()
    from ..discovery import declared

    # A kind's options given for a kind without them (D2-LoRA's --tau for a LoRA): a mistake, not to be
    # ignored. The kinds' files say which they take (their ``options``); an unknown kind is train's to name.
    kinds = declared("loramix.kinds", "AdapterKind")
    if (mine := kinds.get(method or kind)) is not None:
        for opt in ("tau", "norm_dim"):
            given = ctx.get_parameter_source(opt) == click.core.ParameterSource.COMMANDLINE
            if given and opt not in mine.get("options", {}):
                takes = " or ".join(n for n, d in kinds.items() if opt in d.get("options", {}))
                raise UsageError(
                    "--" + opt.replace("_", "-"),
                    f"applies to --kind {takes} only (a {mine.get('label') or mine['id']} has no such option)",
                )
    tg = [t.strip() for t in targets.split(",") if t.strip()] if targets is not None else None
    if tg == []:  # '' (an unset shell variable) trained on the architecture's defaults, silently
        raise UsageError("--targets", "names no module; give module suffixes, or leave it out for the "
                         "architecture's")  # fmt: skip
    res = train_adapter(
        base,
        [*data, *more_data],
        out=out,
        kind=kind,
        method=method,  # the v0.1 name of --kind, still accepted (errors then name --method)
        targets=tg,
        eval_size=es,
        progress=progress,
        **kw,
    )
    click.echo(
        f"adapter   {res['out']} ({res['kind']}, rank {kw['rank']}, {res['trainable_parameters']:,} parameters, "
        f"{kw['prompt']} prompt)"
    )
    # how much of the data the run saw: a short --steps run passes a fraction of an epoch, which the
    # counts of cut records below (over every training record) do not tell
    epochs = res["steps"] / math.ceil(res["n_train"] / kw["batch"])
    # a batch holds at most the training records there are (3 records and --batch 16: steps of 3)
    per = min(kw["batch"], res["n_train"])
    click.echo(
        f"trained   {res['steps']} step{'' if res['steps'] == 1 else 's'} of {per} record{'' if per == 1 else 's'} "
        f"({epochs:.2g} epochs of the {res['n_train']:,} "
        f"training records) on {res['tokens']:,} scored tokens (those the loss counts), "
        f"{res['train_seconds']:.1f} s ({res['tokens_per_second']:,.0f} scored tokens/s), "
        f"final loss {res['final_loss']:.4f}"
    )
    top = (
        f", top {kw['top_layers']} layers (prefix {res['prefix_seconds']:.1f} s)" if kw["top_layers"] else ""
    )
    click.echo(
        f"processed {res['input_tokens']:,} input tokens (every token run, padding excluded; "
        f"{res['input_tokens_per_second']:,.0f} input tokens/s)"
        f"{top}"
    )
    if note := capped_note(kw["max_len"], res["settings"]["max_len"]):
        click.echo(note)
    if cut := [f"{res[f'n_{p}_truncated']} of {res[f'n_{p}']} {what}" for p, what in
               (("train", "training"), ("eval", "held-out")) if res[f"n_{p}_truncated"]]:  # fmt: skip
        click.echo(
            f"cut       {' and '.join(cut)} records at {res['settings']['max_len']} tokens (--max-len)"
        )
    if res["ppl_base"] is not None:
        change = 100 * (res["ppl_adapter"] - res["ppl_base"]) / res["ppl_base"]
        click.echo(
            f"held-out  perplexity {res['ppl_base']:.3f} (base) -> {res['ppl_adapter']:.3f} (adapter), "
            f"{change:+.1f}% on {res['n_eval']} records"
        )
