"""Build a small base model offline: a byte-level BPE tokenizer and a GPT-2 pre-trained on QA text.

``build_base(data, out=out)`` writes a Hugging Face folder that
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)``
load: ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
``tokenizer_config.json`` (a GPT-2 tokenizer, ``<|endoftext|>`` as BOS/EOS/UNK,
``<|pad|>`` as pad), ``loramix.json`` (provenance and results) and
``train_log.csv`` (one row per step). Written atomically (README, Conventions).

Text and split
    Each record becomes ``prompt + answer`` by :func:`loramix.data.format_record`.
    A seeded split holds out ``heldout`` records (default 5%, at most 256) that
    neither the tokenizer nor the model sees.

Pre-training (nanoGPT style)
    The training texts are tokenised, each followed by EOS, and concatenated
    into one stream of ``T`` tokens. A step samples ``batch`` windows of
    ``ctx + 1`` tokens at offsets drawn from a seeded ``torch.Generator`` and
    minimises the mean next-token cross-entropy over all ``batch * ctx``
    positions. AdamW (``betas=(0.9, 0.95)``, weight decay 0.1 on matrices
    only), learning rate ``lr * step / warmup`` for the warm-up, then cosine
    decay to ``lr / 10``; gradients clipped to norm 1.

Held-out perplexity
    ``exp(sum NLL / tokens)`` over every token of the held-out records
    (``on="all"``), before training (the random initialisation) and after.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .api import renamed
from .data import QARecord, is_synthetic_spec, load_records, record_text, split_records
from .errors import UsageError
from .options import batch_problem, check_numbers, check_seed, lr_problem, steps_problem, whole_numbers
from .results import OutputDict

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class BaseSize:
    """Architecture and default recipe of a named size."""

    n_layer: int
    n_embd: int
    n_head: int
    ctx: int
    vocab: int
    steps: int
    batch: int
    lr: float


# ``tiny`` is sized for the quickstart: about a minute on two CPU cores.
SIZES = {
    "tiny": BaseSize(n_layer=2, n_embd=128, n_head=4, ctx=128, vocab=2048, steps=250, batch=16, lr=3e-3),
    "small": BaseSize(n_layer=4, n_embd=256, n_head=8, ctx=256, vocab=4096, steps=1200, batch=16, lr=1.5e-3),
}


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    """A byte-level BPE (GPT-2 style: no unknown bytes) trained on ``texts``,
    wrapped as a transformers GPT-2 fast tokenizer with EOS and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_len,
    )


def lr_at(step: int, *, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _gather_records(data) -> tuple[list[QARecord], list[dict]]:
    """Records and provenance entries from paths, synthetic specs or records."""
    from .data import data_list
    from .io.outputs import normalized_path
    from .io.st_header import file_sha256  # torch-free (safetensors_io re-exports it)

    data = [data] if isinstance(data, QARecord) else data_list(data)
    records: list[QARecord] = []
    inputs: list[dict] = []
    loose: list[QARecord] = []
    for d in data:
        if isinstance(d, QARecord):
            loose.append(d)
        elif is_synthetic_spec(d):
            records += load_records(d)
            inputs.append({"path": d, "kind": "synthetic", "sha256": None})
        else:
            records += load_records(d)
            # absolute, as every input's: the same file typed either way gives the same bytes
            inputs.append({"path": normalized_path(d), "kind": "data", "sha256": file_sha256(d)})
    if loose:
        records += loose
        inputs.append({"path": None, "kind": "records", "count": len(loose)})
    if not records:
        raise UsageError("--data", "no data given to build the base from")
    return records, inputs


def _recipe(size, steps, batch, lr) -> tuple[BaseSize, str, int, int, float]:
    """``(config, size name, steps, batch, lr)`` with the overrides applied and checked."""
    if isinstance(size, BaseSize):
        cfg, size = size, "custom"
    elif size in SIZES:
        cfg = SIZES[size]
    else:
        raise UsageError("--size", f"unknown size {size!r}; choose {', '.join(SIZES)}")
    steps = cfg.steps if steps is None else int(steps)
    batch = cfg.batch if batch is None else int(batch)
    lr = cfg.lr if lr is None else float(lr)
    if steps < 1:
        raise UsageError("--steps", f"must be at least 1, got {steps}")
    if (why := steps_problem(steps)) is not None:
        raise UsageError("--steps", why)
    if batch < 1:
        raise UsageError("--batch", f"must be at least 1, got {batch}")
    if (why := batch_problem(batch)) is not None:
        raise UsageError("--batch", why)
    if (why := lr_problem(lr)) is not None:
        raise UsageError("--lr", why[1])
    return cfg, size, steps, batch, lr


def _token_stream(tokenizer, train_texts: list[str], ctx: int) -> list[int]:
    """The training texts tokenised and joined, each followed by EOS (one long stream
    that training samples windows of ``ctx + 1`` tokens from)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(train_texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    if len(stream) < ctx + 2:
        raise UsageError("--data", f"only {len(stream)} training tokens; need more than the context {ctx}")
    return stream


def _new_model(cfg: BaseSize, tokenizer, seed: int, dev):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gcfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.ctx,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,  # tiny data, short runs: dropout only slows learning
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(gcfg).to(dev)


def _pretrain(model, stream: list[int], *, ctx, steps, batch, lr, seed, dev, label, progress, t0):
    """AdamW on random windows of the stream (next-token loss on every position).

    Returns ``(log rows, warmup, final running loss)``."""
    import torch

    from .progress import progress_bar

    stream_t = torch.tensor(stream, dtype=torch.long)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, min(50, steps // 10))
    gen = torch.Generator().manual_seed(seed)
    n_windows = len(stream) - ctx - 1
    log, running = [], None
    model.train()
    bar = progress_bar(
        range(steps), desc=f"base build ({label})", unit="step", progress=progress, dynamic_ncols=True
    )
    for step in bar:
        cur_lr = lr_at(step, steps=steps, warmup=warmup, lr=lr)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        off = torch.randint(0, n_windows + 1, (batch,), generator=gen)
        win = torch.stack([stream_t[o : o + ctx + 1] for o in off.tolist()]).to(dev)
        x, y = win[:, :-1], win[:, 1:]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        li = loss.item()
        running = li if running is None else 0.95 * running + 0.05 * li
        log.append({"step": step + 1, "lr": cur_lr, "loss": li, "running_loss": running,
                    "grad_norm": float(gnorm), "tokens": (step + 1) * batch * ctx,
                    "seconds": time.perf_counter() - t0})  # fmt: skip
        opt.step()
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{cur_lr:.1e}")
    bar.close()
    model.eval()
    return log, warmup, running


@renamed(positional=("out",))
def build_base(
    data,
    *,
    out: str | os.PathLike,
    size: str | BaseSize = "tiny",
    steps: int | None = None,
    seed: int = 0,
    heldout: int | float | None = None,
    batch: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train a tokenizer and a small GPT-2 on ``data``; write the folder ``out``.

    ``data``: a path, a synthetic spec (``synthetic:arith?n=2000``), a
    :class:`~loramix.data.QARecord`, or a list of these. ``size``: a key of
    :data:`SIZES` or a :class:`BaseSize`; ``steps``/``batch``/``lr`` override its recipe.
    ``heldout``: the records held out (a count or a fraction; default 5%,
    at most 256); ``seed``: that split, the initial weights and the
    windows drawn. ``device``: ``"auto"`` (CUDA where torch sees a GPU,
    else the CPU), ``"cpu"`` or ``"cuda"``; ``force``: replace an existing
    ``out``; ``progress``: a bar of the steps (on a terminal). Returns a
    summary dict (also stored under ``results`` in ``loramix.json``):
    ``heldout_ppl``, ``untrained_ppl``, ``seconds``, ``params``, ``vocab_size``,
    ``train_tokens`` and the out path.
    """
    from .data import encode_records, make_batches
    from .devices import is_cpu, kept_rng, resolve_device
    from .io.outputs import check_output
    from .perplexity import perplexity

    check_numbers({"--steps": steps, "--heldout": heldout, "--batch": batch, "--lr": lr})
    steps, batch = whole_numbers({"--steps": steps, "--batch": batch})  # steps=1.5 ran 1 step, silently
    cfg, size, steps, batch, lr = _recipe(size, steps, batch, lr)
    check_seed(seed)  # what base build --seed's IntRange bounds, from Python too
    is_cpu(device)  # a bad --device is refused first, told without torch where it can be
    records, inputs = _gather_records(data)
    data_paths = [i["path"] for i in inputs if i["kind"] == "data"]
    check_output(out, force=force, inputs=data_paths)
    dev = resolve_device(device)  # torch: once the data and --out have passed
    t0 = time.perf_counter()

    if len(records) < 2:
        raise UsageError("--data", f"need at least 2 records to hold some out, got {len(records)}")
    if heldout is None:
        heldout = min(256, max(1, round(0.05 * len(records))))
    train_recs, held_recs = split_records(records, eval_size=heldout, seed=seed)

    train_texts = [record_text(r) for r in train_recs]
    tokenizer = train_tokenizer(train_texts, cfg.vocab, cfg.ctx)
    stream = _token_stream(tokenizer, train_texts, cfg.ctx)
    with kept_rng(dev):  # the build seeds torch's global generator: the caller's stream is kept
        model = _new_model(cfg, tokenizer, seed, dev)
        held = encode_records(tokenizer, held_recs, max_len=cfg.ctx, on="all")
        held_batches = make_batches(held, batch_size=32, pad_id=tokenizer.pad_token_id, sort_by_length=True)
        model.eval()
        untrained = perplexity(model, held_batches, device=dev)
        log, warmup, running = _pretrain(model, stream, ctx=cfg.ctx, steps=steps, batch=batch, lr=lr, seed=seed,
                                         dev=dev, label=size, progress=progress, t0=t0)  # fmt: skip
        final = perplexity(model, held_batches, device=dev)

    results = {
        "out": str(out),
        "size": size,
        "steps": steps,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_records": len(train_recs),
        "heldout_records": len(held_recs),
        "train_tokens": len(stream),
        "heldout_ppl": final["ppl"],
        "heldout_tokens": final["tokens"],
        "untrained_ppl": untrained["ppl"],
        "final_running_loss": running,
        "seconds": time.perf_counter() - t0,
        "device": str(dev),
    }
    params = {"size": size, **asdict(cfg), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
              "heldout": heldout, "warmup": warmup}  # fmt: skip
    _write(out, model, tokenizer, log, params, inputs, results, force=force, data_paths=data_paths)
    return OutputDict(results)  # path-like (its "out"): evaluate(build_base(...), ...) takes it


def _write(out, model, tokenizer, log, params, inputs, results, *, force, data_paths) -> None:
    from transformers.utils import logging as hf_logging

    from .io.outputs import atomic_output_dir, provenance, write_provenance

    with atomic_output_dir(out, force=force, inputs=data_paths) as tmp:
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its bar for a one-file model (and under --quiet)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        with open(Path(tmp) / "train_log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
        write_provenance(tmp, provenance("base_build", params, inputs, results=results))
