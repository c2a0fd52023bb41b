"""``loramix base build``: a tokenizer and a small GPT-2 pre-trained offline (see :mod:`loramix.basebuild`)."""

from __future__ import annotations

import click

from . import data_options, device_opt, progress_option


@click.group("base")
def command():
    """Base models: build a small one offline from your data, or import a GGUF."""


@command.command("build")
@data_options(
    "Data file (.jsonl/.json/.csv/.txt) or synthetic:NAME[?n=..&seed=..] spec; repeat or list after it."
)
@click.option("--out", required=True, type=click.Path(), help="Output model folder.")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="Model size (loramix.basebuild.SIZES), each with its own steps, batch and learning rate.")  # fmt: skip
@click.option("--steps", type=int, default=None, help="Pre-training steps (default per size).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the initial weights, the held-out split and the training windows.")  # fmt: skip
@device_opt(what="Where the pre-training runs")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@progress_option
def build(data, more_data, out, size, steps, seed, device, force, progress):
    """Train a byte-level BPE tokenizer and pre-train a small GPT-2 on the data.

    The folder loads with AutoModelForCausalLM and AutoTokenizer; it also holds
    loramix.json (provenance, held-out perplexity) and train_log.csv.
    """
    from ..basebuild import build_base

    r = build_base(
        [*data, *more_data],
        out=out,
        size=size,
        steps=steps,
        seed=seed,
        device=device,
        force=force,
        progress=progress,
    )
    click.echo(
        f"built {r['out']}: {r['params'] / 1e6:.2f}M parameters, vocab {r['vocab_size']}, "
        f"{r['steps']} steps in {r['seconds']:.1f}s on {r['device']}; held-out perplexity "
        f"{r['heldout_ppl']:.3f} (untrained {r['untrained_ppl']:.1f}) over {r['heldout_tokens']} tokens"
    )


@command.command("import")
@click.argument("gguf_file", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output model folder.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Data type of every stored weight. float32 keeps the file's values exactly; bfloat16 "
                   "halves the folder and rounds to 8 significant bits what has more (F16's 11, most "
                   "de-quantised values), with a warning.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@progress_option
def import_(gguf_file, out, dtype, force, progress):
    """Import a GGUF model (llama.cpp, Ollama, LM Studio) as a transformers folder.

    The weights are de-quantised (Q4_0/Q4_1/Q5_x/Q8_0, K-quants,
    IQ4_NL/IQ4_XS, F16/BF16/F32) into model.safetensors beside config.json,
    the tokenizer files and loramix.json (provenance with the GGUF's sha256). Llama family only
    (llama, SmolLM, mistral, qwen2, qwen3).
    """
    from ..gguf_import import import_gguf

    r = import_gguf(gguf_file, out=out, dtype=dtype, force=force, progress=progress)
    quants = ", ".join(f"{n} {k}" for k, n in r["quantisation"].items())
    click.echo(
        f"imported {gguf_file} -> {r['out']}: {r['architecture']}, tensors {quants}, "
        f"stored as {dtype}{', tied embeddings' if r['tie_word_embeddings'] else ''} in {r['seconds']:.1f}s"
    )
