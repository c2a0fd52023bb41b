"""Perplexity: token-weighted, over the answer tokens by default.

For a batch of ``input_ids`` and ``labels`` (both ``(B, L)``, labels ``-100``
where a token is not scored: prompt and padding), position ``t`` predicts
``labels[t+1]`` (the shift transformers uses). Over every scored token ``k``
of every batch::

    NLL   = sum_k -log p(token_k | tokens before it)
    N     = number of scored tokens (labels[:, 1:] != -100)
    ppl   = exp(NLL / N)

This is the perplexity of the whole set, not a mean of per-batch losses (which
would over-weight short batches).

Precision: each token's ``-log p = logsumexp(z) - z[target]`` is taken from
the float32 logits ``z`` by ``torch.logsumexp`` and the terms are summed in
float64. torch's ``cross_entropy`` (and so transformers' own loss) goes
through its CPU ``log_softmax`` kernel, which is about 1.2e-5 relative low
on SmolLM2's 49k vocabulary; the ``logsumexp`` route is within 1e-7 of a
float64 computation (``tests/test_eval.py``). Training keeps
``cross_entropy``: its gradient is what the optimizer has always seen.

Only scored positions need logits: for the model classes in
:func:`loramix.archs.fast_head_classes` (final hidden state -> ``lm_head``, nothing in between)
loramix runs the decoder, gathers the hidden states of the scored positions
and applies the output layer to those alone. With ``on="answer"`` most prompt
positions are skipped, so the ``(B, L, vocab)`` logits tensor is never built.
Other classes use the full ``model(...).logits``. Both give the same numbers
to float rounding (tests check it against transformers' own loss).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Sequence

from .api import renamed
from .archs import context_length, fast_head_classes
from .errors import BaseModelError, UsageError
from .options import check_numbers, parse_weights, whole_numbers

# The rule by which NLL is computed, in the cache keys of a study's evaluations
# (loramix.scenario.plan), so that numbers made by an earlier rule are made
# again rather than mixed with new ones: 1 was torch's cross_entropy, 2 is
# logsumexp minus the target logit, summed in float64 (module docstring).
NLL_RULE = 2

#: the two columns ``per_record=True`` adds (:func:`evaluate`): each record's
#: NLL sum and its scored tokens, in record order
RECORD_COLUMNS = ("record_nll", "record_tokens")


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def scored_nll(
    model, batch: dict, *, device, fast: bool = True, precise: bool = False, per_row: bool = False
):
    """``(NLL summed over the scored tokens (0-d float32 tensor), their number)``
    for one batch (module docstring), with gradients if enabled.

    ``precise``: the NLL by ``logsumexp`` minus the target logit, summed in
    float64 (a 0-d float64 tensor; module docstring, "Precision"), for
    evaluation; the default ``cross_entropy`` is the training loss.

    A batch holding ``inputs_embeds`` (cached states, :mod:`loramix.prefix`)
    feeds those instead of ``input_ids``. The fast head (module docstring)
    applies the output layer only at the ``N`` scored positions: ``(N, vocab)``
    logits instead of ``(B, L, vocab)``, in the forward and the backward.

    ``per_row`` (with ``precise``): also each row's NLL sum ``(B,)`` float64
    and its scored tokens ``(B,)``, appended to the pair; the total is the
    same tensor sum as without.
    """
    import torch.nn.functional as F

    if "inputs_embeds" in batch:
        inputs = {"inputs_embeds": batch["inputs_embeds"].to(device, non_blocking=True)}
    else:
        inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    mask = batch["attention_mask"].to(device, non_blocking=True)
    target = batch["labels"].to(device, non_blocking=True)[:, 1:]
    keep = target != -100  # (B, L-1): positions whose next token is scored
    if fast and type(model).__name__ in fast_head_classes():
        hidden = model.base_model(
            **inputs, attention_mask=mask, use_cache=False
        ).last_hidden_state  # (B, L, d)
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, vocab)
    else:
        logits = model(**inputs, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    logits, target = logits.float(), target[keep]
    if precise:
        import torch

        picked = logits.gather(1, target[:, None])[:, 0]  # (N,)
        terms = (torch.logsumexp(logits, dim=-1) - picked).double()  # (N,), each token's -log p
        if per_row:
            # the scored tokens are taken row by row (boolean indexing is row-major), so
            # index_add_ sums each row's own terms: (B,) float64, and (B,) token counts
            rows = keep.nonzero()[:, 0]
            per = terms.new_zeros(keep.shape[0]).index_add_(0, rows, terms)
            return terms.sum(), int(keep.sum()), per, keep.sum(dim=1)
        return terms.sum(), int(keep.sum())
    return F.cross_entropy(logits, target, reduction="sum"), int(keep.sum())


def perplexity(
    model,
    batches: Sequence[dict],
    *,
    device=None,
    fast: bool = True,
    autocast=None,
    bar=None,
    per_record: bool = False,
) -> dict:
    """Token-weighted perplexity of ``model`` on ``batches`` (module docstring).

    ``batches``: dicts of ``input_ids`` (or ``inputs_embeds``),
    ``attention_mask``, ``labels`` (``LongTensor (B, L)``) as
    :func:`loramix.data.make_batches` makes them. ``autocast``: a dtype to run
    the forward in (``torch.bfloat16``), or None. Returns ``{"ppl", "nll"
    (mean per token), "nll_sum", "tokens" (scored), "input_tokens" (non-pad
    tokens processed), "seconds", "tokens_per_s" (scored tokens per second),
    "input_tokens_per_s"}``. ``fast=False`` forces the full-logits path.
    ``bar``: a progress bar (tqdm) advanced by each batch's records.
    ``per_record``: also ``"record_nll"`` and ``"record_tokens"``, each
    record's NLL sum and scored tokens, in the order of the batches' rows
    (``nll_sum`` is computed as without them, to the bit).
    """
    import torch

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    nll = 0.0
    n_tok = 0
    n_in = 0
    rec_nll, rec_tok = [], []
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for b in batches:
            s, n, *rows = scored_nll(model, b, device=device, fast=fast, precise=True, per_row=per_record)
            if rows:
                rec_nll += rows[0].tolist()
                rec_tok += rows[1].tolist()
            nll += s.item()
            n_tok += n
            n_in += int(b["attention_mask"].sum())
            if bar is not None:
                bar.update(int(b["attention_mask"].shape[0]))
    _sync(device)
    secs = time.perf_counter() - t0
    mean = nll / n_tok if n_tok else float("nan")
    extra = dict(zip(RECORD_COLUMNS, (rec_nll, rec_tok))) if per_record else {}
    return {
        **extra,
        "ppl": math.exp(mean) if n_tok else float("nan"),
        "nll": mean,
        "nll_sum": nll,
        "tokens": n_tok,
        "input_tokens": n_in,
        "seconds": secs,
        "tokens_per_s": n_tok / secs if secs > 0 else float("nan"),
        "input_tokens_per_s": n_in / secs if secs > 0 else float("nan"),
    }


def _default_max_len(model, tokenizer) -> int:
    """The model's context (:func:`loramix.archs.context_length`; 1024 where the
    config names none), or the tokenizer's limit if smaller."""
    n = context_length(model.config) or 1024
    return int(min(n, tokenizer.model_max_length or n))


@renamed({"batch_size": "batch", "fields": ("question_field", "answer_field", "context_field")})
def evaluate(
    base,
    *,
    adapters=(),
    weights: Sequence[float] | None = None,
    merged: bool = False,
    data=(),
    on: str = "answer",
    max_len: int | None = None,
    batch: int = 16,
    batch_tokens: int | None = None,
    limit: int | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    context_field: str | None = "context",
    top_layers: int | None = None,
    prefix_cache: str | None = "disk",
    prompt: str = "raw",
    per_record: bool = False,
    held_out: bool = False,
    device="auto",
    dtype=None,
    progress: bool = True,
):
    """Perplexity of a base (plus the weighted sum of adapters) on data files.

    ``base``: a model folder, or a ``(model, tokenizer)`` pair, left as it
    was: adapters are merged into a copy of it, or attached on the fly to its
    own modules and detached before this returns (so no other thread may use
    that model meanwhile).
    ``adapters``: paths or loaded :class:`~loramix.adapter.Adapter` s; their
    sum ``W0 + sum_i w_i dW_i`` is applied on the fly
    (:func:`loramix.layers.attach_adapters`) or merged into the weights first
    (``merged=True``, :func:`loramix.layers.merge_into_model`); ``weights``:
    one per adapter (default 1). ``on``: the tokens scored, ``"answer"``
    (the answer's) or ``"all"`` (the prompt's too). ``device``: ``"auto"``
    (CUDA where torch sees a GPU, else the CPU), ``"cpu"`` or ``"cuda"``.
    ``data``:
    paths, synthetic specs (``synthetic:arith?n=200``), or lists of
    :class:`~loramix.data.QARecord`. ``limit`` keeps the first records of each;
    ``batch``: records per forward pass, at most (sorted by length, longest
    first, each padded to its batch's longest); ``batch_tokens``: positions
    (records times their longest) per forward pass, at most, a longer record
    alone;
    None: ``batch`` times the data set's mean record length
    (:func:`loramix.data.position_budget`), so a few long records among
    short ones go in smaller batches and add little padding; 0: no limit but
    ``batch``. An evaluation still mostly of padding is warned of. The
    batching changes the perplexities only by float rounding.
    ``question_field``, ``answer_field``, ``context_field``:
    the records' fields, as :func:`loramix.train_adapter` takes them
    (``context_field`` None: no passage; ``fields={...}`` of the previous
    release still works, warned). ``dtype``: the dtype the base is
    loaded in (float32 by default; ``"bfloat16"`` halves memory, and time on
    a CPU with native bf16 arithmetic (AVX512-BF16, AMX) or a GPU: SmolLM2's
    evaluation took 4.9 s against 12.2 s on an Intel Xeon with AMX, 11.2 s
    against 22.0 s on a Zen 4 with AVX512-BF16, and 146 s against 22 s (6.6x
    slower) on a Zen 3 without it: ``benchmarks/bench_eval.py --smol``).

    ``top_layers=N``: the adapters may change only the top ``N`` blocks; the
    state entering them is computed once per data set and cached
    (:mod:`loramix.prefix`, ``prefix_cache`` ``"disk"``, ``"memory"`` or
    None), then only those blocks and the head run: the same perplexity as
    the full forward, to float rounding. Llama-family models only.

    ``prompt``: ``"raw"`` (``Question: ... Answer:``) or ``"chat"`` (the base
    tokenizer's own chat template, :func:`loramix.data.format_record`; a
    tokenizer without one is refused naming the base). ``progress``: a
    progress bar of the records scored, on stderr.

    Returns a pandas DataFrame, one row per data set and a ``union`` row
    (their pooled, token-weighted perplexity), columns ``data, records,
    tokens, ppl, nll, seconds, tokens_per_s, input_tokens,
    input_tokens_per_s, prefix_seconds, truncated, max_len`` (``tokens``: scored;
    ``nll``: the mean NLL per scored token, ``ppl`` its exponential and ``nll``
    times ``tokens`` the total; ``input_tokens``: every non-pad token run
    through the model; ``seconds`` exclude the cached prefix, whose own time is ``prefix_seconds``;
    ``truncated``: records cut at ``max_len``, which defaults to the model's
    context). A data set's row is named by :func:`loramix.data.data_names`:
    its file's stem, or where two share one, each by the shortest tail of its
    path that tells them apart (``x/a.jsonl``, ``a.csv``).

    ``per_record=True`` adds two columns, ``record_nll`` and
    ``record_tokens``, to each data set's row (None on ``union``): lists of
    each record's NLL sum and scored tokens in the data set's own record
    order, whatever the batching, so two models' lists on one data set pair
    record by record.

    Records an adapter evaluated (given, or one a loramix merge in ``base``
    was made of) was trained on, as its ``loramix.json`` says
    (:mod:`loramix.heldout`), are warned of; ``held_out=True`` leaves them out
    (``limit`` then keeps the first records none was trained on), the count
    left out per data set in the result's ``attrs["held_out"]``.
    """
    from .devices import resolve_device

    # counts and sizes as ints (a fraction refused naming its keyword), before anything uses them
    batch, batch_tokens, max_len, limit, top_layers = whole_numbers(
        {"--batch": batch, "--batch-tokens": batch_tokens, "--max-len": max_len, "--limit": limit,
         "--top-layers": top_layers}
    )  # fmt: skip
    fields = dict(question_field=question_field, answer_field=answer_field, context_field=context_field)
    sets, adapters, data, dropped = _checked_inputs(base, adapters, batch=batch, batch_tokens=batch_tokens,
                                                    merged=merged, data=data, limit=limit, max_len=max_len,
                                                    device=device, fields=fields, dtype=dtype,
                                                    top_layers=top_layers, prompt=prompt, held_out=held_out,
                                                    weights=weights)  # fmt: skip
    dev = resolve_device(device)
    adapted = _adapted(base, adapters, weights, merged=merged, dev=dev, dtype=dtype, top_layers=top_layers)
    with adapted as (model, tok):
        df = _scored(model, tok, base, adapters, data, sets, on=on, max_len=max_len, batch=batch,
                     batch_tokens=batch_tokens, dev=dev, top_layers=top_layers, prefix_cache=prefix_cache,
                     prompt=prompt, held_out=held_out, progress=progress, per_record=per_record)  # fmt: skip
    if dropped is not None:
        df.attrs["held_out"] = dropped
    return df


def _scored(model, tok, base, adapters: list, data: list, sets: list, *, on, max_len, batch, batch_tokens, dev,
            top_layers, prefix_cache, prompt, held_out, progress, per_record):  # fmt: skip
    """:func:`evaluate`'s table (:func:`_score`) of ``sets`` on the adapted
    ``model``, once the prompt's template is found in ``tok`` (a base without
    one refused, named) and with ``top_layers`` the first adapted block ``k``
    (:func:`loramix.prefix.split_point`), after the warnings of a run that
    will be scored (:func:`_warn_of_scoring`)."""
    from .data import check_prompt

    check_prompt(prompt, tok, base if isinstance(base, (str, os.PathLike)) else "base")
    k = None
    if top_layers is not None:
        from .prefix import split_point

        k = split_point(model, top_layers)
    _warn_of_scoring(adapters, base, data, sets, prompt=prompt, held_out=held_out)
    return _score(model, tok, sets, on=on, max_len=max_len, batch_size=batch, batch_tokens=batch_tokens, dev=dev,
                  prefix_at=k, prefix_cache=prefix_cache, prompt=prompt, progress=progress,
                  per_record=per_record)  # fmt: skip


@contextlib.contextmanager
def _adapted(base, adapters: list, weights, *, merged: bool, dev, dtype, top_layers):
    """``(model, tokenizer)``: the base with the adapters, on the fly or merged
    in (:func:`_model_with_adapters`). A caller's own model is given back as
    it came, whatever the evaluation raised: the adapters attached to its
    modules detached, and its train/eval mode restored."""
    was_training = isinstance(base, (tuple, list)) and base[0].training
    model, tok, lent = _model_with_adapters(base, adapters, weights, merged=merged, dev=dev, dtype=dtype,
                                            top_layers=top_layers)  # fmt: skip
    try:
        yield model, tok
    finally:
        if lent:  # the caller's own model: its modules back as they were
            from .layers import detach

            detach(model)
        if isinstance(base, (tuple, list)) and model is base[0]:
            model.train(was_training)  # and its mode


def _checked_inputs(
    base, adapters, *, batch, merged, data, limit, max_len, device, fields, dtype, top_layers, prompt,
    held_out=False, weights=None, batch_tokens=None,
):  # fmt: skip
    """``(sets, adapters, data, left out)``: :func:`evaluate`'s arguments checked (``adapters``
    and ``data`` as lists), and its data read (``held_out``: less the adapters' training records,
    and their count per set; else None),
    before any model loads: a bad file or option fails fast, without
    torch where it can be told without it."""
    data, adapters = _checked_arguments(base, adapters, batch=batch, merged=merged, data=data, limit=limit,
                                        max_len=max_len, device=device, top_layers=top_layers, prompt=prompt,
                                        weights=weights, batch_tokens=batch_tokens)  # fmt: skip
    sets = _read_sets(data, None if held_out else limit, fields or {})
    # the paths in the order they are loaded in; what needs transformers (the base's model type)
    # is checked when it loads
    from .io.peft_layout import check_adapter_paths
    from .models import check_dtype_name, read_model_config

    check_adapter_paths(adapters)
    cfg = read_model_config(base)[1] if isinstance(base, (str, os.PathLike)) else None
    check_dtype_name(dtype)
    if cfg is not None:  # a --top-layers out of config.json's blocks, before torch
        from .archs import check_top_layers

        check_top_layers(cfg, top_layers)
    # after the checks: a mistyped --base is one line without reading the adapters' training data
    from . import heldout

    dropped = None
    if held_out:
        sets, dropped = heldout.held_out(adapters, base, data, sets, limit)
    return sets, adapters, data, dropped


def _checked_arguments(base, adapters, *, batch, merged, data, limit, max_len, device, top_layers, prompt,
                       weights, batch_tokens=None) -> tuple[list, list]:  # fmt: skip
    """``(data, adapters)`` as lists: :func:`evaluate`'s arguments checked
    that need no file read, in the order a user is told of them."""
    from .data import check_prompt
    from .devices import is_cpu

    check_numbers({"--batch": batch})  # batch="8" failed in a comparison, a TypeError
    if not isinstance(base, (str, os.PathLike, tuple, list)):  # else a TypeError from pathlib
        from .io.peft_layout import out_hint

        raise BaseModelError(None, f"a base is a model folder, a .gguf file or (model, tokenizer), "
                                   f"not a {type(base).__name__}{out_hint(base)}")  # fmt: skip
    from .data import data_list

    data = data_list(data)  # a DataFrame refused, not iterated over its column names
    if not data:
        raise UsageError("--data", "no data to evaluate on")
    from .io.peft_layout import adapter_list

    adapters = adapter_list(adapters)
    if merged and not adapters:
        raise UsageError("--merged", "needs at least one --adapter")
    if weights is not None:  # before the data are read and the model loads (a 7B: minutes)
        if not adapters:
            raise UsageError("--weights", "given without --adapter")
        parse_weights(weights, len(adapters), "--weights")
    check_numbers({"--max-len": max_len, "--limit": limit, "--top-layers": top_layers})
    # Python's own falsy 0 and negative slices: max_len=0 scored up to the model's context, and a
    # record list's limit=0 kept every record, limit=-1 all but the last, all silently
    if limit is not None and limit < 1:
        raise UsageError("--limit", f"must be at least 1, got {limit}")
    if max_len is not None and max_len < 2:
        raise UsageError("--max-len", f"must be at least 2, got {max_len}")
    if batch_tokens is not None and batch_tokens < 0:
        raise UsageError("--batch-tokens", f"must be 0 (no limit) or more, got {batch_tokens}")
    check_prompt(prompt)
    is_cpu(device)  # a bad --device is refused first, told without torch where it can be
    return data, adapters


def _warn_of_scoring(adapters, base, data, sets, *, prompt: str, held_out: bool) -> None:
    """The warnings of an evaluation that will be scored, once nothing is left to refuse (the
    model loaded, the adapters attached or merged, the prompt's template found): an adapter
    trained with another prompt format (:func:`warn_other_prompt`), records it was trained on
    (:func:`loramix.heldout.warn_trained_on`; left out instead with ``held_out``), one trained
    on another base (:func:`loramix.trained_base.warn_other_bases`). Said before a refusal,
    they made a refused run two lines or more, and told of a run that never scored."""
    warn_other_prompt(adapters, prompt)
    if not held_out:
        from .heldout import warn_trained_on

        warn_trained_on(adapters, base, data, sets)
    if adapters:  # they fit the base (else refused when attached): trained on another base, one line each
        from .trained_base import warn_other_bases

        warn_other_bases(adapters, base, "evaluated on it")


def warn_other_prompt(adapters, prompt: str) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) of an adapter that ``loramix
    train`` made with another prompt format than ``prompt`` (its ``loramix.json``'s
    ``parameters.prompt``): scored so, its answers follow a format it never saw,
    and its perplexity says so, not how well it learnt. Adapters without such a
    record (PEFT's own) are not guessed at."""
    if not adapters:  # the base alone: nothing to read
        return

    from .errors import warn
    from .io.provenance import recorded_parameters

    other = []
    for a in adapters:
        path = getattr(a, "path", a)  # a loaded adapter's file, or the path given
        trained = recorded_parameters(path).get("prompt")
        if isinstance(trained, str) and trained != prompt:
            other.append(f"{path} ({trained})")
    if other:
        warn(f"scored with prompt {prompt} (prompt=, --prompt), but trained with another format: "
             f"{'; '.join(other)}")  # fmt: skip


def _read_sets(data: list, limit: int | None, fields: dict) -> list[tuple[str, list]]:
    """``[(name, records)]`` for paths, synthetic specs or record lists."""
    from .data import check_context_field, data_names, is_synthetic_spec, load_records

    sets, read = [], []
    for i, (d, name) in enumerate(zip(data, data_names(data))):
        if isinstance(d, (str, os.PathLike)):
            sets.append((name, load_records(d, limit=limit, named_by="--{}-field", **fields)))
            if not is_synthetic_spec(d):
                read.append((d, sets[-1][1]))
        else:
            from .data import TABLE_HINT, QARecord
            from .userpaths import is_table

            if is_table(d):  # iterated: its column names, taken for records (an AttributeError, deep)
                raise UsageError("data", f"data set {i} is a {type(d).__name__}, not a file, a synthetic: "
                                         f"spec or a list of QARecord {TABLE_HINT}")  # fmt: skip
            recs = list(d)[:limit] if limit is not None else list(d)
            if not recs:
                raise UsageError("data", f"record set {i} is empty")
            if (bad := next((r for r in recs if not isinstance(r, QARecord)), None)) is not None:
                raise UsageError("data", f"record set {i} holds a {type(bad).__name__}, not QARecord records")
            sets.append((name, recs))
    check_context_field(read, fields.get("context_field"), "--{}-field")
    return sets


def _model_with_adapters(base, adapters: list, weights, *, merged: bool, dev, dtype, top_layers=None):
    """The base (a folder, or a ``(model, tokenizer)``) with the adapters
    attached on the fly or merged in; ``(model, tokenizer, lent)``. With
    ``top_layers`` every adapter must change only those blocks.

    A caller's model is copied before merging. Attached on the fly, the
    adapters wrap the caller's own modules instead (``lent``: the caller
    :func:`~loramix.layers.detach` es them after), sparing a copy of the
    whole model per evaluation (0.6-0.8 s on SmolLM2, about a third of a
    study's evaluation of an adapter): the same weights, the same numbers.
    A model that holds loramix layers already is copied, as attaching
    removes them, and so is one on another device than ``dev``."""
    from .layers import holds_loramix
    from .models import load_causal_lm

    if adapters:
        from .io.adapter_files import load_adapter

        adapters = [load_adapter(a) if isinstance(a, (str, os.PathLike)) else a for a in adapters]

    lent = False
    if isinstance(base, (tuple, list)):
        model, tok = base
        lent = (
            bool(adapters) and not merged and not holds_loramix(model) and _already_on(model, dev)
        )  # moving the caller's model would be a change it sees
        if adapters and not lent:
            model = copy.deepcopy(model)
        model.to(dev).eval()
    else:
        model, tok = load_causal_lm(base, device=dev, dtype=dtype)

    if adapters and top_layers is not None:
        from .prefix import check_top_only, split_point

        k = split_point(model, top_layers)
        for a in adapters:  # modules_to_save copies change their modules as much as the factors do
            check_top_only(model, [*a.modules, *(n.rpartition(".")[0] for n in a.saved)], k, a.path or a.name)
    if adapters:
        from .layers import attach_adapters, merge_into_model

        if merged:
            _warn_tied_merge(model, adapters)
            stored = None if isinstance(base, (tuple, list)) else _checkpoint_weights(base, model)
            merge_into_model(model, adapters, weights, stored=stored)
        else:
            try:
                attach_adapters(model, adapters, weights)
            except BaseException:
                if lent:  # not half-attached to the caller's model
                    from .layers import detach

                    detach(model)
                raise
    elif weights is not None:
        raise UsageError("--weights", "given without --adapter")
    return model, tok, lent


def _checkpoint_weights(base, model):
    """``stored(name)`` for :func:`~loramix.layers.merge_into_model`: module
    ``name``'s weight as the base folder (or GGUF import) stores it, where
    that is wider than the loaded model's (``--dtype bfloat16`` of a float32
    checkpoint), so that ``--merged`` rounds ``W0 + delta`` once, as ``sum
    --into --dtype`` writes it; None where the loaded weight is the stored
    one. Only the merged modules' tensors are read.

    A head tied to the input embedding (which ``sum --into`` refuses, and
    the folder may not store) reads the input embedding's tensor: the one
    weight both modules hold, ``(vocab, dim)`` in either's layout."""
    from .io.model_folder import BaseModelFolder
    from .layers import weight_view
    from .models import resolve_base

    folder = BaseModelFolder(resolve_base(base))

    def stored(name: str):
        mod = model.get_submodule(name)
        W0 = weight_view(mod)
        try:
            key, tied = folder.module_weight_key(name)[0], False
        except BaseModelError:  # refused for the engine: a tied head or embedding, or no such tensor
            key, tied = _tied_key(folder, model, mod), True
            if key is None:
                return None
        info = folder.tensors[key]
        if info.torch_dtype is None or info.torch_dtype.itemsize <= W0.dtype.itemsize:
            return None  # loaded as stored (or widened, exactly)
        # an embedding's (vocab, dim) is a tied head's (out, in) too: read as stored
        W = folder.read_tensor(key) if tied else folder.read_module_weight(name, dtype=None)
        return W if tuple(W.shape) == tuple(W0.shape) else None

    return stored


def _tied_key(folder, model, mod) -> str | None:
    """The folder's key of the input embedding when ``mod`` holds its weight
    (``mod`` is the embedding, or an output head tied to it), else None."""
    emb = model.get_input_embeddings()
    if emb is None or getattr(mod, "weight", None) is not emb.weight:
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None)
    return None if name is None else folder.tensor_key(name)


def _warn_tied_merge(model, adapters) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) of an adapted module
    whose weight is the one tied head and input embedding share: merged,
    its delta changes both (PEFT's ``merge_and_unload`` too), while on the
    fly only the adapted module changes, so ``--merged`` scores another model
    (on SmolLM2 with an embedding LoRA: perplexity 48.8 merged, 38.3 on the fly)."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or out.weight is not emb.weight:
        return
    for a in adapters:
        for name in a.modules:
            try:
                mod = model.get_submodule(name)
            except AttributeError:  # not in this base: merge_into_model refuses it in one line
                continue
            if mod is out or mod is emb:
                from .errors import warn

                other = "the input embedding" if mod is out else "the output head"
                warn(f"{a.path or a.name}: {name} is tied to {other}: merged, its delta changes both "
                     "(as PEFT's merge_and_unload), on the fly only this module, so the merged "
                     "perplexity is another model's")  # fmt: skip
                return


def _already_on(model, dev) -> bool:
    """Whether every parameter of ``model`` is on the device ``dev``."""
    import torch

    want = torch.device(dev)
    return all(
        p.device.type == want.type and want.index in (None, p.device.index) for p in model.parameters()
    )


def _scored_batches(model, ex, *, batch_size, max_tokens, pad, prefix_at, prefix_cache) -> tuple[list, float]:
    """Batches sorted by length, of at most ``batch_size`` records and
    ``max_tokens`` positions; with ``prefix_at = k`` they carry the cached
    states entering block ``k`` instead of token ids. Returns them and the
    seconds the prefix took (0 when cached). Their rows hold the records
    :func:`batch_order` lists."""
    from .data import make_batches

    if prefix_at is None:
        batches = make_batches(
            ex, batch_size=batch_size, pad_id=pad, sort_by_length=True, max_tokens=max_tokens
        )
        return batches, 0.0
    from .prefix import prefix_states

    t0 = time.perf_counter()
    states = prefix_states(model, prefix_at, ex, batch_size=batch_size, pad_id=pad, cache=prefix_cache,
                           max_tokens=max_tokens)  # fmt: skip
    batches = make_batches(ex, batch_size=batch_size, pad_id=pad, sort_by_length=True, embeds=states,
                           max_tokens=max_tokens)  # fmt: skip
    for b in batches:
        del b["input_ids"]
    return batches, time.perf_counter() - t0


def batch_order(ex, batch_size: int, max_tokens: int | None = None) -> list[int]:
    """The record index of each row of :func:`_scored_batches`' batches, in order."""
    from .data import batch_indices

    chunks = batch_indices(ex, batch_size=batch_size, sort_by_length=True, max_tokens=max_tokens)
    return [i for idx in chunks for i in idx]


def _in_record_order(r: dict, order: list[int]) -> dict:
    """``{"record_nll", "record_tokens"}`` of :func:`perplexity`'s result ``r``
    (rows in batch order ``order``) put back in record order."""
    out = {}
    for key in RECORD_COLUMNS:
        vals = [None] * len(order)
        for i, x in zip(order, r[key], strict=True):
            vals[i] = x
        out[key] = vals
    return out


def _score(model, tok, sets, *, on: str, max_len, batch_size: int, batch_tokens: int | None = None, dev,
           prefix_at=None, prefix_cache="disk", prompt="raw", progress: bool = False,
           per_record: bool = False):  # fmt: skip
    """One row per record set and the pooled ``union`` row (see :func:`evaluate`;
    ``batch_tokens`` as there)."""
    import sys

    import pandas as pd

    from .data import encode_records, pad_id_for, position_budget
    from .progress import progress_bar

    # a sequence cannot be longer than the model's positions: a larger --max-len is capped there
    # (as train does; the row's max_len says so), else its embedding lookup fails mid-run
    max_len = (
        min(max_len, context_length(model.config) or max_len)
        if max_len is not None
        else _default_max_len(model, tok)
    )
    pad = pad_id_for(tok)
    runner = model
    if prefix_at is not None:
        from .prefix import top_view

        runner = top_view(model, prefix_at)
    rows = []
    tot = {"nll_sum": 0.0, "tokens": 0, "seconds": 0.0, "records": 0, "input_tokens": 0, "prefix_seconds": 0.0,
           "truncated": 0}  # fmt: skip
    bar = progress_bar(total=sum(len(recs) for _, recs in sets), unit="record", desc="eval", file=sys.stderr,
                       progress=progress, leave=False, dynamic_ncols=True)  # fmt: skip
    widths = []  # (positions, width) of each batch: how much of what was computed is padding
    for name, recs in sets:
        stats = {"truncated": 0}
        bar.set_description(f"eval {name}")
        ex = encode_records(tok, recs, max_len=max_len, on=on, stats=stats, prompt=prompt)
        cap = position_budget(ex, batch_size) if batch_tokens is None else batch_tokens or None
        batches, pre_s = _scored_batches(model, ex, batch_size=batch_size, max_tokens=cap, pad=pad,
                                         prefix_at=prefix_at, prefix_cache=prefix_cache)  # fmt: skip
        widths += [tuple(b["attention_mask"].shape) for b in batches]
        r = perplexity(runner, batches, device=dev, bar=bar, per_record=per_record)
        rec = _in_record_order(r, batch_order(ex, batch_size, cap)) if per_record else {}
        rows.append(_set_row(name, len(recs), r, prefix_seconds=pre_s, truncated=stats["truncated"],
                             max_len=max_len, per_record=rec))  # fmt: skip
        _add_to_union(tot, r, len(recs), prefix_seconds=pre_s, truncated=stats["truncated"])
    bar.close()
    _warn_padding(widths, tot["input_tokens"], batch_size=batch_size)
    rows.append(_union_row(tot, max_len=max_len, per_record=per_record))
    return pd.DataFrame(rows)


#: padded positions an evaluation computes for nothing before :func:`_warn_padding` says so
#: (with three times as many positions as input tokens): far above a study's 48 records of
#: at most 256 tokens, about a second of SmolLM2-135M's forward on 2 cores
PADDING_SAID = 16384


def _warn_padding(shapes: list[tuple[int, int]], tokens: int, *, batch_size: int) -> None:
    """Warn where most of what an evaluation computed was padding (``shapes``:
    each batch's ``(records, width)``; ``tokens``: the input tokens among
    them, :func:`perplexity`'s count): its
    batches (``batch_size`` records of similar length, :func:`_scored_batches`)
    pad each record to the batch's longest, so a few long records among short
    ones (long-tailed answers, no ``max_len``) multiply the work. The first
    16 medicine records (4,982 input tokens, one record of 1,429) took 81 s
    in one batch of 16 (78% padding) and 24 s in batches of 4 on SmolLM2-135M
    (2 cores). The default cap on a batch's positions (``batch_tokens``,
    :func:`loramix.data.position_budget`) keeps most runs well below this;
    one with ``batch_tokens=0`` or a large cap may not. A smaller batch
    changes the perplexities only by float rounding (about 1e-8 relative
    there)."""
    positions = sum(n * w for n, w in shapes)
    if positions - tokens < PADDING_SAID or positions < 3 * tokens:
        return
    longest = max(w for _, w in shapes)
    from .errors import warn

    warn(f"{1 - tokens / positions:.0%} of the positions evaluated were padding: a batch of up to {batch_size} "
         f"records pads each to its longest (here up to {longest:,} tokens); a smaller --batch-tokens or --batch, "
         "or a --max-len, computes less, with the same perplexities to float rounding")  # fmt: skip


def _set_row(name: str, records: int, r: dict, *, prefix_seconds: float, truncated: int, max_len: int,
             per_record: dict) -> dict:  # fmt: skip
    """A record set's row of :func:`evaluate`'s table, from :func:`perplexity`'s
    result ``r`` (``per_record``: its record columns in record order, or {})."""
    return {
        "data": name,
        "records": records,
        "tokens": r["tokens"],
        "ppl": r["ppl"],
        "nll": r["nll"],
        "seconds": r["seconds"],
        "tokens_per_s": r["tokens_per_s"],
        "input_tokens": r["input_tokens"],
        "input_tokens_per_s": r["input_tokens_per_s"],
        "prefix_seconds": prefix_seconds,
        "truncated": truncated,
        "max_len": max_len,
        **per_record,
    }


def _add_to_union(tot: dict, r: dict, records: int, *, prefix_seconds: float, truncated: int) -> None:
    """Add a record set's sums (:func:`perplexity`'s ``r``) to the pooled
    ``tot``, in place, set by set: the union's NLL is the sum of the sets'
    ``nll_sum``, not of their means."""
    tot["truncated"] += truncated
    tot["nll_sum"] += r["nll_sum"]
    tot["tokens"] += r["tokens"]
    tot["seconds"] += r["seconds"]
    tot["records"] += records
    tot["input_tokens"] += r["input_tokens"]
    tot["prefix_seconds"] += prefix_seconds


def _union_row(tot: dict, *, max_len: int, per_record: bool) -> dict:
    """The ``union`` row: the pooled, token-weighted perplexity of every set,
    ``exp(sum of NLL / sum of scored tokens)`` (None in the record columns)."""
    n = tot["tokens"]
    return {
        "data": "union",
        "records": tot["records"],
        "tokens": n,
        "ppl": math.exp(tot["nll_sum"] / n) if n else float("nan"),
        "nll": tot["nll_sum"] / n if n else float("nan"),
        "seconds": tot["seconds"],
        "tokens_per_s": n / tot["seconds"] if tot["seconds"] > 0 else float("nan"),
        "input_tokens": tot["input_tokens"],
        "input_tokens_per_s": tot["input_tokens"] / tot["seconds"] if tot["seconds"] > 0 else float("nan"),
        "prefix_seconds": tot["prefix_seconds"],
        "truncated": tot["truncated"],
        "max_len": max_len,
        **(dict.fromkeys(RECORD_COLUMNS) if per_record else {}),
    }
