"""``loramix eval``: perplexity of a base, alone or with a sum of adapters (see :mod:`loramix.evaluate`)."""

from __future__ import annotations

import click

from . import data_options, device_opt, field_options, format_option, progress_option, prompt_option
from .threads import threads_option


@click.command("eval")
@click.option("--base", required=True, type=click.Path(), help="Base model folder (Hugging Face causal LM).")
@click.option(
    "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter folder; repeat to sum."
)
@click.option("--weights", default=None, help="One weight per adapter, e.g. 1,0.5 (default: all 1).")
@click.option("--merged", is_flag=True, help="Merge the adapters into the weights first (else on the fly).")
@data_options("Data file (.jsonl/.json/.csv/.txt) or synthetic:NAME spec; repeat or list after it.")
@click.option("--on", type=click.Choice(["answer", "all"]), default="answer", show_default=True,
              help="Tokens scored: the answer's, or all (the prompt's too).")  # fmt: skip
@prompt_option
@click.option(
    "--max-len",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens per sequence (default: the model's context).",
)
@click.option("--batch", type=int, default=16, show_default=True, help="Records per forward pass, at most.")
@click.option("--batch-tokens", type=int, default=None,
              help="Positions (records x their longest) per forward pass, at most; a longer record goes alone "
                   "[default: --batch times the data set's mean record length; 0: no limit but --batch].")  # fmt: skip
@click.option("--limit", type=int, default=None, help="Use the first N records of each file.")
@click.option("--held-out", is_flag=True,
              help="Leave out every record an adapter evaluated (given, or merged into --base by loramix) was "
                   "trained on, as its loramix.json says (--limit: the first N of the others; a split that cannot be "
                   "rebuilt, from a damaged record or a changed file, is refused); without it, eval warns of them.")  # fmt: skip
@device_opt(what="Where the model runs")
@field_options
@threads_option
@click.option(
    "--top-layers",
    type=int,
    default=None,
    help="The adapters change only the top N layers (Llama family): run the layers below once per data set "
    "(cached).",
)
@click.option(
    "--dtype",
    default=None,
    help="Load the base in this dtype (float32, bfloat16, float16, auto: the checkpoint's; default float32). "
    "bfloat16/float16 halve memory; they are faster only on a GPU or a CPU with bf16/fp16 arithmetic.",
)
@format_option
@progress_option
def command(base, adapters, weights, merged, data, more_data, on, prompt, max_len, batch, batch_tokens, limit,
            held_out, device, question_field, answer_field, context_field, top_layers, dtype, fmt,
            progress):  # fmt: skip
    """Perplexity per data file and over their union (token-weighted), with token
    counts and tokens per second. Scored tokens: the answers (--on answer) or all."""
    import json

    from ..options import capped_note, parse_weights
    from ..perplexity import evaluate

    w = None if weights is None else parse_weights(weights, len(adapters))
    df = evaluate(
        base,
        adapters=list(adapters),
        weights=w,
        merged=merged,
        data=[*data, *more_data],
        on=on,
        prompt=prompt,
        max_len=max_len,
        batch=batch,
        batch_tokens=batch_tokens,
        limit=limit,
        device=device,
        question_field=question_field,
        answer_field=answer_field,
        context_field=context_field,
        top_layers=top_layers,
        dtype=dtype,
        held_out=held_out,
        progress=progress,
    )
    left_out = df.attrs.get("held_out")
    made = merge_made(base)
    if fmt == "json":
        from ..io.filehash import adapter_identity_or_none, adapter_sha256

        # each adapter's content identity (config and weights) beside its path as typed: fit pairs a
        # merge with its members by it (a copy elsewhere is the same adapter, one rewritten in place or
        # with another lora_alpha another); adapter_sha256 (the weights alone) as older loramix wrote
        click.echo(json.dumps({"base": base, **({"merge": made} if made else {}), "adapters": list(adapters),
                               "adapter_sha256": [adapter_sha256(a) for a in adapters],
                               "adapter_identity": [adapter_identity_or_none(a) for a in adapters],
                               "weights": w, "merged": merged, "on": on, "prompt": prompt,
                               **({"held_out": left_out} if held_out else {}),
                               "results": df.to_dict(orient="records")}, indent=2))  # fmt: skip
        return
    scored = _scored(made, adapters, merged, w)
    lines = [f"{scored}: {base}",
             "| data | records | tokens | ppl | tokens/s | input tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    # one data set: its row is the union's
    for r in df.iloc[:-1].itertuples() if len(df) == 2 else df.itertuples():
        lines.append(f"| {r.data} | {r.records} | {r.tokens} | {r.ppl:.4f} | {r.tokens_per_s:,.0f} "
                     f"| {r.input_tokens_per_s:,.0f} |")  # fmt: skip
    union = df.iloc[-1]
    if note := capped_note(max_len, int(union["max_len"])):
        lines.append(note)
    if union["truncated"]:
        lines.append(
            f"{union['truncated']} of {union['records']} records cut at {union['max_len']} tokens (--max-len)"
        )
    if held_out:
        lines.append("held out: left out " + ", ".join(f"{n} {d}" for d, n in left_out.items())
                     + " records the adapters were trained on")  # fmt: skip
    lines.append(f"prompt: {prompt}" + (" (the base's chat template)" if prompt == "chat" else ""))
    click.echo("\n".join(lines))


def _weights(w) -> str:
    return "" if w is None or set(w) <= {1} else f" (weights {', '.join(f'{x:g}' for x in w)})"


def _scored(made: dict | None, adapters, merged: bool, w) -> str:
    """What the table scores: "the base", or the loramix merge the folder is
    (:func:`merge_made`), with the adapters given merged in or on the fly."""
    text = "the base"
    if made is not None:
        text = f"the merge ({made['method']}) of {', '.join(made['adapters'])} into {made['base']}"
        text += _weights(made["weights"])
    if adapters:
        text += f" with {', '.join(adapters)} {'merged in' if merged else 'on the fly'}{_weights(w)}"
    return text


def merge_made(base) -> dict | None:
    """What a model folder written by ``loramix sum``/``merge --into`` was made
    of, from its ``loramix.json``: ``{method, adapters, weights, base,
    sha256, identity, params}`` (``params``: the method's parameters as it
    merged by them, where the record holds them; the paths as recorded,
    absolute; ``sha256`` each adapter's
    weights digest, ``identity`` its config and weights together
    (:func:`loramix.io.filehash.adapter_identity_of`), as recorded, None where
    not: a merge by an older loramix recorded no identity), or None for any other folder (a base, an
    import, a GGUF file), which ``eval`` calls "the base"."""
    from pathlib import Path

    from ..io.provenance import read_record, recorded_inputs

    rec = (
        read_record(base) if Path(base).is_dir() else None
    ) or {}  # a .gguf file's folder is not its record
    inputs = recorded_inputs(rec)
    ads = [i for i in inputs if i.get("role") == "adapter" and isinstance(i.get("path"), str)]
    into = next((i.get("path") for i in inputs if i.get("role") == "base"), None)
    if (
        rec.get("output") != "model"
        or not ads
        or not isinstance(into, str)
        or not isinstance(rec.get("method"), str)
    ):
        return None
    weights = [w if isinstance(w := i.get("weight", 1), (int, float)) else 1 for i in ads]
    sha = [i.get("sha256") if isinstance(i.get("sha256"), str) else None for i in ads]
    ident = [i.get("identity") if isinstance(i.get("identity"), str) else None for i in ads]
    made = {"method": rec["method"], "adapters": [i["path"] for i in ads], "weights": weights, "base": into,
            "sha256": sha, "identity": ident}  # fmt: skip
    if (params := _method_params(rec)) is not None:
        made["params"] = params
    return made


def _method_params(rec: dict) -> dict | None:
    """The merge's parameters from its record, the method's own (``density``,
    ``lambda``; not ``weights`` or ``dtype``) as ``loramix merge`` filled them
    in, defaults included; None for a method this loramix does not know or
    a record without them."""
    from ..methods import available_methods, params_of

    recorded = rec.get("parameters")
    if rec["method"] not in available_methods() or not isinstance(recorded, dict):
        return None
    return {k: recorded[k] for k in params_of(rec["method"]) if k in recorded}
