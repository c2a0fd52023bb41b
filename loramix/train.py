"""Train one LoRA or D2-LoRA adapter on question/answer data: the whole loop, in one place.

    records  = load each data source, split each into train/eval (seeded)
    model    = the base, frozen; target projections wrapped (loramix.layers)
    for step in range(steps):                  batches reshuffled every epoch
        lr     = linear warm-up, then cosine decay to lr / 10
        loss   = mean next-token NLL over the supervised tokens of the batch
        clip the gradient norm, AdamW step
    evaluate held-out perplexity, base and adapted (token-weighted)
    write the adapter, train_log.csv and loramix.json into OUT, atomically

Outputs (``OUT/``):

- LoRA: a PEFT adapter (``adapter_config.json`` with the real ``r`` and
  ``lora_alpha``, ``fan_in_fan_out`` true for GPT-2 ``Conv1D`` targets;
  ``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained``.
- D2-LoRA: the loramix D2 format (``docs/d2lora.md``).
- ``train_log.csv``: ``step, loss, lr, tokens, seconds`` per step (``tokens``
  is the running count of supervised tokens, ``seconds`` since the start).
- ``loramix.json``: provenance (base path and sha256, each data source with
  its sha256 and record counts, every setting) and the final metrics.

Reproducible on CPU: the factor init draws from a generator seeded with
``init_seed(seed, the training records)`` (``seed`` alone with ``shared_init``),
the data split and the batch order are seeded with ``seed``, and dropout
draws from ``torch.manual_seed(seed)``. The safetensors metadata carries no clock
time, so two runs with the same inputs write identical adapter bytes.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .api import renamed
from .archs import context_length
from .errors import OutputError, UsageError
from .options import check_numbers, check_seed, lr_problem, steps_problem, whole_numbers
from .results import OutputDict

DEFAULT_EVAL_SIZE = 0.1
"""Per data source: a tenth of the records are held out (at least one)."""

#: version of how a run on several data sources batches their frozen prefix (``top_layers``):
#: 1, each source on its own (:func:`_cache_prefix`); before it, the union as a whole. Part of a
#: study cache's key for a merged-data adapter, so one trained the old way is not reused
PREFIX_PARTS = 1


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from ``lr / warmup`` to ``lr`` over ``warmup`` steps, then a
    cosine from ``lr`` down to ``min_ratio * lr`` at the last step (nanoGPT);
    a single step after the warm-up is both the cosine's first and last, and
    takes ``lr``.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    decay = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / decay)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _load_sources(data, *, eval_size, seed: int, limit, fields: dict):
    """Load every source; return (train records, eval records, provenance per source)."""
    from .data import (
        check_context_field,
        data_list,
        data_name,
        is_synthetic_spec,
        load_records,
        split_records,
    )
    from .io.outputs import normalized_path
    from .io.provenance import records_sha256
    from .io.st_header import file_sha256  # torch-free (safetensors_io re-exports it)

    sources = data_list(data)
    if not sources:
        raise UsageError("--data", "no data given")
    train, held, inputs, read = [], [], [], []
    for src in sources:
        recs = load_records(src, limit=limit, named_by="--{}-field", **fields)
        if not is_synthetic_spec(src):
            read.append((src, recs))
        if eval_size:
            tr, ev = split_records(recs, eval_size=eval_size, seed=seed)
        else:
            tr, ev = recs, []
        train += tr
        held += ev
        is_file = not is_synthetic_spec(src)
        inputs.append(
            {
                "path": normalized_path(src) if is_file else str(src),  # absolute, as every input's
                "kind": "data",
                "name": data_name(src),
                "sha256": file_sha256(src) if is_file else None,
                "records_sha256": records_sha256(recs),
                "n_train": len(tr),
                "n_eval": len(ev),
            }
        )
    check_context_field(read, fields.get("context_field"), "--{}-field")
    return train, held, inputs


def init_seed(seed: int, data_inputs: list[dict]) -> int:
    """The seed of an adapter's initial factors: ``sha256(seed, the training
    records)`` as a 63-bit integer. Adapters trained on different data start
    from independent ``A``s (with one shared seed, the ``A``s of different
    domains stay close after training and similarity mostly compares ``B``s);
    the same seed and data give the same adapter."""
    key = json.dumps([int(seed), sorted(d["records_sha256"] for d in data_inputs)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


class LiveLog:
    """``train_log.csv`` written as training goes, so a long run can be followed:
    ``<out>.train_log.<host hash>.<pid>.<start>.csv`` beside the output (one
    per process, :func:`~loramix.io.outputs.owner_tag`, so two runs racing for
    one ``--out`` never write or move each other's log), one flushed row per
    step, moved into the output folder at the end (:meth:`move_to`). If
    training fails the file is removed (when this object is collected, or at
    exit); a log left by a killed process is removed by the next run to the
    same ``out`` once that process is gone (:func:`_remove_dead_logs`)."""

    HEADER = ("step", "loss", "lr", "tokens", "seconds")

    def __init__(self, out: Path):
        from .io.outputs import make_parents, owner_tag

        self.out = out
        # the folders made for the log are removed with it: a failed run leaves nothing, as
        # atomic_output_dir leaves nothing (it left the empty parents of a new --out)
        made = make_parents(out.parent)
        _remove_dead_logs(out)

        self.path = out.parent / f"{_log_stem(out)}.train_log.{owner_tag()}.csv"
        try:
            self.f = open(self.path, "w", newline="")
        except OSError as e:  # a read-only folder, say: named by the --out asked for, as sum's is
            from .io.outputs import remove_made_parents

            remove_made_parents(out.parent, made)
            raise OutputError(out, f"cannot write beside it: {e.strerror or e}") from None
        self.w = csv.writer(self.f)
        self.w.writerow(self.HEADER)
        self._cleanup = weakref.finalize(self, _remove_file, self.f, self.path, made)

    def row(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        try:
            self.w.writerow([step, f"{loss:.6f}", f"{lr:.6g}", tokens, f"{seconds:.3f}"])
            self.f.flush()
        except OSError as e:
            from .io.outputs import NO_SPACE

            # a full disk (or a file-size limit) is the output's problem, named as every other
            # write names it (loramix.io.outputs); else the log (a failed flush names no file)
            e.filename = str(self.out) if e.errno in NO_SPACE else (e.filename or str(self.path))
            raise

    def discard(self) -> None:
        """Close and remove the log now (a failed run's); nothing once moved."""
        self._cleanup()

    def move_to(self, dest: Path) -> None:
        self.f.close()
        os.replace(self.path, dest)
        self._cleanup.detach()


def _log_stem(out: Path) -> str:
    """``out``'s name, or where the log's name would pass the file system's
    limit (255 bytes), its start and a hash of the whole name."""
    from .io.outputs import NAME_MAX

    # the owner tag: 8 hex, a pid (at most 10 digits), a start time (at most 20)
    room = NAME_MAX - len(".train_log.") - 40 - len(".csv")
    raw = os.fsencode(out.name)
    if len(raw) <= room:
        return out.name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return raw[: room - 9].decode("utf-8", "ignore") + "~" + digest  # a character cut in two is dropped


def _remove_dead_logs(out: Path) -> None:
    """Remove the live logs beside ``out`` whose process is gone (a killed run's).

    A log names its process by host, pid and start time (:class:`LiveLog`),
    so a dead run's log goes even where a later process took its pid, and a
    run on another host (a shared folder), whose pid means nothing here,
    keeps its own. A
    log of an older loramix, ``<out>.train_log.<pid>.csv``, names the pid
    alone: judged by it, on this host, as it was then."""
    from .io.outputs import owner_gone, owner_tag

    stem, here = _log_stem(out), owner_tag().split(".")[0]
    for f in out.parent.glob(f"{glob.escape(stem)}.train_log.*.csv"):
        tag = f.name[len(stem) + len(".train_log.") : -len(".csv")]
        if owner_gone(f"{here}.{tag}.0" if tag.isdigit() else tag):
            f.unlink(missing_ok=True)


def _remove_file(f, path: Path, made: Path | None = None) -> None:
    """Close and remove a failed run's log, and the folders made for it
    (up to ``made``, while empty)."""
    from .io.outputs import remove_made_parents

    try:
        f.close()  # flushes what is buffered, which fails on a full disk
    except OSError:
        pass
    finally:
        path.unlink(missing_ok=True)
        remove_made_parents(path.parent, made)


def _supervised_tokens(batch) -> int:
    # Labels are shifted inside the loss: position 0 is never predicted.
    return int((batch["labels"][:, 1:] != -100).sum())


@renamed(positional=("out",))
def train_adapter(
    base,
    data,
    *,
    out,
    kind: str = "lora",
    rank: int = 8,
    alpha: float = 16,
    tau: float = 0.5,
    norm_dim: int = 1,
    targets=None,
    steps: int | None = None,
    epochs: float = 1,
    lr: float = 2e-3,
    batch: int = 16,
    max_len: int = 128,
    warmup: int | None = None,
    eval_size: int | float | None = DEFAULT_EVAL_SIZE,
    limit: int | None = None,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    seed: int = 0,
    on: str = "answer",
    question_field: str = "question",
    answer_field: str = "answer",
    context_field: str | None = "context",
    method: str | None = None,
    shared_init: bool = False,
    top_layers: int | None = None,
    prefix_cache: str | None = "disk",
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
    bucket: int = 16,
    prompt: str = "raw",
    loaded: tuple | None = None,
    device: str = "auto",
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train an adapter of ``kind`` on ``data`` for the base model folder ``base``; write it to ``out``.

    ``kind``: an adapter kind's name (:mod:`loramix.kinds`; ``method`` is its
    v0.1 name); ``tau`` and ``norm_dim`` are D2-LoRA's options (recorded only
    for kinds that take them). ``targets``: a list or tuple of module names
    or suffixes, ``["q_proj", "layers.29.self_attn.v_proj"]`` (PEFT's rule:
    a module matches a name it equals or ends with after a dot; what
    ``loramix train --targets q_proj,layers.29.self_attn.v_proj`` takes as
    a comma list); a single string, a regex the whole module name must match
    (PEFT's regex form: ``r".*\\.(q_proj|v_proj)"``; so ``"q_proj,v_proj"``
    is a regex, not two names); or None for the architecture's default
    (:func:`loramix.layers.find_targets`; GPT-2 ``c_attn, c_proj, c_fc``,
    Llama ``q/k/v/o/gate/up/down_proj``).

    ``rank`` ``r`` and ``alpha``: the factors ``B`` (out, r) and ``A`` (r, in)
    and the scale ``s = alpha / r`` of ``dW = s B A``. ``lr``: the peak
    AdamW learning rate (``weight_decay`` its decoupled decay, ``clip`` the
    bound on the gradients' global norm). ``batch``: records per optimizer
    step; ``max_len``: tokens per record, in training and the held-out
    perplexity (a longer one is cut, keeping its question; counted in
    ``n_train_truncated`` / ``n_eval_truncated``); ``limit``: the first
    ``limit`` records of each source (None: all). ``on``: the tokens the
    loss and the perplexities count, ``"answer"`` or ``"all"`` (the
    prompt's too). ``question_field``, ``answer_field``, ``context_field``:
    the records' JSON fields (``context_field`` None: no passage).
    ``device``: ``"auto"`` (CUDA where torch sees a GPU, else the CPU),
    ``"cpu"`` or ``"cuda"``; ``force``: replace an existing ``out``;
    ``progress``: a bar of the steps (on a terminal).

    ``data`` is one source or a list (files or ``synthetic:`` specs); each is
    split by ``seed`` into train and eval (``eval_size``: a count or a
    fraction per source; 0 or None holds nothing out and skips the
    evaluation), and the training parts are pooled, so several sources give a
    merged-data adapter. ``prompt``: ``"raw"`` or ``"chat"`` (the base
    tokenizer's chat template, :func:`loramix.data.format_record`).

    The loop is the module docstring's. ``steps`` overrides ``epochs``
    (``round(epochs * batches per epoch)`` steps, at least 1); ``warmup``
    defaults to 5% of the steps (:func:`warmup_steps`). ``bucket``: training
    batches hold similar lengths (:func:`loramix.data.make_batches`; 0 for
    plain shuffled batches). ``shared_init``: the initial factors drawn from
    ``seed`` alone, the same for every adapter of a study, not from
    :func:`init_seed` (``seed`` and the data); recorded as ``settings["init"]``.

    Speed (same result to float rounding unless said): ``top_layers=N`` puts
    the adapters on the targets of the top ``N`` blocks only and runs the
    frozen prefix once per example (:mod:`loramix.prefix`, cached as
    ``prefix_cache`` says; a run of fewer steps than an epoch, only over the
    examples it draws; several sources, source by source, each as its own
    run has it: :func:`_cache_prefix`), so every step and evaluation runs
    ``N`` blocks and the head (Llama family). Without it, targets that all sit in blocks
    ``k > 0`` and up still spare the adapted held-out evaluation blocks
    ``0 .. k-1``: it starts from the states the base's evaluation computed
    there, exactly the full forward (float32). ``dtype="bfloat16"``: the
    forward under bf16 autocast (factors, optimizer and loss stay float32;
    not exact).
    ``grad_accum=m``: ``m`` micro-batches whose gradients add up to the
    batch's (less memory); ``grad_checkpointing`` recomputes block
    activations in the backward. Exact for a base without dropout
    (Llama-family and ``loramix base build`` bases); a base that has it
    (GPT-2's 0.1) keeps it on while training, so ``grad_accum`` draws other
    masks for each micro-batch and ``top_layers`` runs the cached prefix
    without them: the same in expectation, not to rounding
    (``grad_checkpointing`` replays the same masks and stays exact).
    ``loaded``: ``base`` already loaded, ``(model, tokenizer)``, to train
    instead of loading it again (a study's copy of the base it holds); the
    run wraps that model's modules, so pass a copy. ``base`` still names the
    folder the adapter records.

    Returns ``out``, ``kind`` (``method``: its v0.1 name), ``steps``, ``tokens``, ``final_loss`` (last
    10 steps), ``train_seconds`` (``setup_seconds``, ``prefix_seconds`` apart), ``tokens_per_second``,
    ``ppl_base``/``ppl_adapter`` (None without eval data), counts (``n_train``, ``n_eval``,
    ``trainable_parameters``, ...) and ``settings`` (what ``loramix.json`` records).

    As ``loramix.train_adapter``, a SIGTERM left at its default unwinds the
    call (its live log and temporary removed) before it kills the process
    (:mod:`loramix.api`).
    """
    # counts and sizes as ints (a fraction refused naming its keyword), before anything uses them
    rank, steps, batch, max_len, warmup, limit, top_layers, grad_accum, bucket = whole_numbers(
        {"--rank": rank, "--steps": steps, "--batch": batch, "--max-len": max_len, "--warmup": warmup,
         "--limit": limit, "--top-layers": top_layers, "--grad-accum": grad_accum, "bucket": bucket}
    )  # fmt: skip
    kind_name, flag = (kind, "--kind") if method is None else (method, "--method")
    # as asked: the settings loramix.json records are made from these
    given = dict(rank=rank, alpha=alpha, steps=steps, epochs=epochs, lr=lr, batch=batch, eval_size=eval_size,
                 limit=limit, weight_decay=weight_decay, clip=clip, seed=seed, shared_init=shared_init, on=on,
                 top_layers=top_layers, dtype=dtype, grad_accum=grad_accum, grad_checkpointing=grad_checkpointing,
                 bucket=bucket, prompt=prompt)  # fmt: skip
    data_list, file_inputs, out = _checked_arguments(base, data, out, kind_name, flag, given, max_len=max_len,
                                                     tau=tau, norm_dim=norm_dim, warmup=warmup,
                                                     prefix_cache=prefix_cache, force=force)  # fmt: skip
    fields = dict(question_field=question_field, answer_field=answer_field, context_field=context_field)
    run = _prepare(base, data_list, targets=targets, fields=fields, eval_size=eval_size, seed=seed,
                   limit=limit, max_len=max_len, batch=batch, on=on, device=device, top_layers=top_layers,
                   prefix_cache=prefix_cache, autocast=dtype, prompt=prompt, progress=progress, rank=rank,
                   steps=steps, epochs=epochs, bucket=bucket, loaded=loaded)  # fmt: skip
    kind, settings, metrics = _train_and_write(run, kind_name, flag, given, fields=fields, warmup=warmup,
                                               options={"tau": tau, "norm_dim": norm_dim}, out=out, force=force,
                                               file_inputs=file_inputs, progress=progress)  # fmt: skip
    # path-like (its "out"): evaluate(base, adapters=[train_adapter(...)]) takes it
    return OutputDict(
        {"out": str(out), **metrics, "kind": kind.name, "method": kind.name, "settings": settings}
    )


def _checked_arguments(base, data, out, kind_name, flag: str, given: dict, *, max_len, tau, norm_dim, warmup,
                       prefix_cache, force: bool) -> tuple[list, list, Path]:  # fmt: skip
    """``(data sources, those that are files, out)``: :func:`train_adapter`'s
    arguments (``given``: those its settings record) checked before any work,
    and for a file or flag mistyped before torch loads; ``out`` free (or
    ``force``) and no input of the run."""
    from .io.outputs import check_output

    g = SimpleNamespace(**given)
    _check_kind_name(kind_name, flag)
    _check_numbers(rank=g.rank, batch=g.batch, max_len=max_len, steps=g.steps, epochs=g.epochs, lr=g.lr,
                   norm_dim=norm_dim, alpha=g.alpha, tau=tau, warmup=warmup, seed=g.seed,
                   typed={"--eval-size": g.eval_size, "--limit": g.limit, "--weight-decay": g.weight_decay,
                          "--clip": g.clip, "--top-layers": g.top_layers, "--grad-accum": g.grad_accum,
                          "bucket": g.bucket})  # fmt: skip
    _check_speed(dtype=g.dtype, grad_accum=g.grad_accum, batch=g.batch, prefix_cache=prefix_cache,
                 prompt=g.prompt)  # fmt: skip
    from .data import data_list as _data_list

    data_list = _data_list(data)  # a DataFrame refused, not iterated over its column names
    file_inputs = [d for d in data_list if not (isinstance(d, str) and d.startswith("synthetic:"))]
    return data_list, file_inputs, check_output(out, force=force, inputs=[base, *file_inputs])


def _train_and_write(run: _Run, kind_name, flag: str, given: dict, *, fields: dict, warmup, options: dict, out: Path,
                     force: bool, file_inputs: list, progress: bool) -> tuple:  # fmt: skip
    """``(kind, settings, metrics)``: the prepared ``run`` trained
    (:func:`_run_settings`, then :func:`_train` with the caller's random
    state kept) and written to ``out`` (:func:`_write`). Whatever stops it,
    a signal too, its live log is removed before this raises."""
    from .devices import kept_rng

    try:
        kind, options, settings = _run_settings(kind_name, flag, run, given, fields=fields, warmup=warmup,
                                                options=options)  # fmt: skip
        with kept_rng(run.dev):
            metrics = _train(run, kind, settings, options, out=out, progress=progress)
        _write(out, run, kind, settings, options, metrics, force=force, file_inputs=file_inputs)
    except BaseException:
        # its live log goes now, not when the run is collected or at an exit (which a
        # process killed by the signal after sigterm_unwinds never reaches)
        if run.live is not None:
            run.live.discard()
        raise
    return kind, settings, metrics


def _run_settings(kind_name, flag: str, run, given: dict, *, fields: dict, warmup, options: dict):
    """``(kind, its options, settings)`` once the run is prepared: the kind
    object, the options it takes (``tau`` and ``norm_dim``, recorded only for
    kinds that take them), and what ``loramix.json`` records (:func:`_settings`),
    with the warm-up (:func:`warmup_steps`, checked again: ``--epochs`` sets
    the steps only now) and the factors' seed (``seed`` alone with
    ``shared_init``, else :func:`init_seed`)."""
    from .layers import kind_arg

    kind = kind_arg(kind_name, flag)
    warmup = warmup_steps(warmup, run.total)
    options = {k: v for k, v in options.items() if k in kind.options}
    seed = given["seed"]
    factor_seed = seed if given["shared_init"] else init_seed(seed, run.data_inputs)
    settings = _settings(kind, run, options, total=run.total, warmup=warmup, factor_seed=factor_seed,
                         fields=fields, given=given)  # fmt: skip
    return kind, options, settings


def _check_kind_name(kind, flag: str) -> None:
    """The line :func:`loramix.kinds.get_kind` gives for an unknown kind name,
    told from :func:`loramix.discovery.kind_names`: before the kinds are
    imported (they import torch), the names their files declare."""
    import sys

    from .discovery import declared, kind_names

    if isinstance(kind, str) and kind not in (names := kind_names()):
        # the kinds this command trains: a kind loramix only reads (DoRA) listed as known was the next
        # thing tried, and refused in turn
        if (kinds := sys.modules.get("loramix.kinds")) is not None:
            trains = [n for n in names if getattr(kinds.KINDS[n], "trainable", True)]
        else:
            files = declared("loramix.kinds", "AdapterKind")
            trains = [n for n in names if files.get(n, {}).get("trainable", True)]
        read = [n for n in names if n not in trains]
        raise UsageError(flag, f"unknown adapter kind {kind!r}; train takes {', '.join(trains)}"
                               + (f" ({', '.join(read)}: read, not trained)" if read else ""))  # fmt: skip


#: train_adapter's arguments that ``loramix train`` takes as FLOAT
_REALS = frozenset({"alpha", "epochs", "lr", "weight_decay", "clip"})


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _settings(kind, run, options: dict, *, total: int, warmup: int, factor_seed: int, fields: dict,
              given: dict) -> dict:  # fmt: skip
    """What the adapter's provenance records about how it was trained
    (``given``: train_adapter's arguments as passed; the real-valued ones as
    floats, as ``loramix train`` parses them: ``alpha=16`` from Python wrote
    ``16`` where the command wrote ``16.0``, so the same training gave
    weights files that differed in their header)."""
    g = {k: float(v) if k in _REALS and _number(v) else v for k, v in given.items()}
    tau = options.get("tau")
    return {
        "kind": kind.name,
        "rank": g["rank"],
        "alpha": g["alpha"],
        "tau": float(tau) if _number(tau) else tau,
        "norm_dim": options.get("norm_dim"),
        "targets": run.resolved_targets,
        "steps": total,
        "epochs": None if g["steps"] is not None else g["epochs"],
        "lr": g["lr"],
        "warmup": warmup,
        "schedule": "linear warm-up, cosine decay to lr/10",
        "batch": g["batch"],
        "max_len": run.max_len,  # after capping at the model's context
        "eval_size": g["eval_size"],
        "limit": g["limit"],
        "weight_decay": g["weight_decay"],
        "clip": g["clip"],
        "seed": g["seed"],
        "init": {"shared": bool(g["shared_init"]), "seed": factor_seed},
        "on": g["on"],
        "prompt": g["prompt"],
        "fields": fields,
        "top_layers": g["top_layers"],
        "dtype": g["dtype"] or "float32",
        "grad_accum": g["grad_accum"],
        "grad_checkpointing": g["grad_checkpointing"],
        "bucket": g["bucket"],
    }


def _check_speed(*, dtype, grad_accum, batch, prefix_cache, prompt="raw") -> None:
    from .data import check_prompt

    check_prompt(prompt)
    if dtype not in (None, "float32", "bfloat16"):
        raise UsageError("--dtype", f"must be float32 or bfloat16, got {dtype!r}")
    if not 1 <= grad_accum <= batch:
        raise UsageError("--grad-accum", f"must be between 1 and --batch ({batch}), got {grad_accum}")
    if prefix_cache not in ("disk", "memory", None):
        raise UsageError("prefix_cache", f"must be 'disk', 'memory' or None, got {prefix_cache!r}")


def _check_rank(model, names: list[str], rank: int) -> None:
    """Refuse a rank above ``min(out, in)`` of a targeted weight, as a scenario's
    ``adapters.rank`` is refused: ``B A`` cannot have a rank above it, so the
    extra rank only adds parameters (and a scale ``alpha / rank`` that no longer
    means what it says)."""
    dims = {n: min(model.get_submodule(n).weight.shape) for n in names}
    n = min(dims, key=dims.get)
    if rank > dims[n]:
        raise UsageError(
            "--rank", f"{rank} is above {dims[n]}, the smallest dimension of a targeted weight ({n})"
        )


def warmup_steps(warmup: int | None, total: int) -> int:
    """The warm-up of a run of ``total`` steps: 5% of them by default. A given
    one longer than the run is refused: :func:`lr_at` would still be ramping at
    the last step, and ``--lr`` never reached, which no one asks for."""
    if warmup is None:
        return max(1, round(0.05 * total))
    if warmup > total:
        raise UsageError("--warmup", f"{warmup} steps is more than the run's {total} steps: the learning rate "
                         "would never reach --lr")  # fmt: skip
    return int(warmup)


def _check_numbers(
    *, rank, batch, max_len, steps, epochs, lr, norm_dim, alpha, tau, warmup, seed, typed
) -> None:
    """Every numeric argument a number (``typed``: those with no range to
    check here; :func:`~loramix.options.check_numbers`), each in its range,
    and ``seed`` what ``train --seed``'s IntRange bounds, from Python too."""
    from .io.config_schema import FLOAT32_MAX, FLOAT32_TINY

    check_numbers({"--rank": rank, "--alpha": alpha, "--tau": tau, "--norm-dim": norm_dim, "--steps": steps,
                   "--epochs": epochs, "--lr": lr, "--batch": batch, "--max-len": max_len, "--warmup": warmup,
                   **typed})  # fmt: skip
    for flag, v, lo in (("--rank", rank, 1), ("--batch", batch, 1), ("--max-len", max_len, 2)):
        if v < lo:
            raise UsageError(flag, f"must be at least {lo}, got {v}")
    if steps is not None and steps < 1:
        raise UsageError("--steps", f"must be at least 1, got {steps}")
    for flag, v, what in (
        ("--steps", steps, "steps"),
        ("--epochs", epochs, "epochs"),
        ("--warmup", warmup, "steps"),
    ):
        if (why := steps_problem(v if flag != "--epochs" or steps is None else None, what)) is not None:
            raise UsageError(flag, why)
    if warmup is not None and warmup < 0:  # a negative one bent the schedule, silently
        raise UsageError("--warmup", f"must be 0 or more steps, got {warmup}")
    if warmup is not None and steps is not None:
        warmup_steps(warmup, steps)
    if steps is None and not 0 < epochs < math.inf:  # inf: round(inf * batches) raised OverflowError
        raise UsageError("--epochs", f"must be a positive finite number, got {epochs}")
    if (why := lr_problem(lr, typed["--weight-decay"])) is not None:
        raise UsageError({"lr": "--lr", "weight_decay": "--weight-decay"}[why[0]], why[1])
    if not alpha > 0:  # 0 trained an adapter that does nothing; a scenario's adapters.alpha is refused so too
        raise UsageError("--alpha", f"must be above 0, got {alpha}")
    # the scale alpha / rank and tau multiply factors in float32: beyond its range, inf or nan;
    # below its normal range, the adapter written would be refused by every reader (checked_scale)
    if not abs(alpha / max(rank, 1)) <= FLOAT32_MAX:
        raise UsageError(
            "--alpha", f"must be a finite number with --alpha / --rank within float32's range, got {alpha}"
        )
    if abs(alpha / max(rank, 1)) < FLOAT32_TINY:
        raise UsageError(
            "--alpha", f"--alpha / --rank = {alpha / max(rank, 1):.3g} is below float32's range (1.2e-38): "
            "the adapter would be refused when read (by loramix, as PEFT's delta would be 0)",
        )  # fmt: skip
    # a negative tau makes a second positive branch, no D2-LoRA (a scenario's tau is refused so)
    if not 0 <= tau <= FLOAT32_MAX:
        raise UsageError("--tau", f"must be 0 or more and within float32's range, got {tau}")
    if norm_dim not in (0, 1):
        raise UsageError("--norm-dim", f"must be 0 or 1, got {norm_dim}")
    check_seed(seed)


@dataclass
class _Run:
    """What the set-up step hands to the loop and the writer."""

    model: object
    dev: object
    base: str
    base_rec: dict
    data_inputs: list
    train_ex: list
    eval_batches: list | None
    n_eval: int
    pad: int
    n_per_epoch: int
    total: int  # the optimizer steps: --steps, or --epochs times n_per_epoch
    targets: object
    resolved_targets: object
    max_len: int
    prefix_at: int | None = None  # k, the first adapted block, when the prefix is cached
    train_states: list | None = None  # the cached states entering block k, per training example (or None)
    prefix_seconds: float = 0.0
    autocast: object = None  # torch.bfloat16 under --dtype bfloat16, else None
    t_load: float = 0.0
    truncated: dict = field(default_factory=dict)  # {"train": n, "eval": n}: records cut at max_len
    log: list = field(default_factory=list)  # (step, loss, lr, tokens, seconds), filled by _train
    live: LiveLog | None = None  # the same rows as a file, written by _train, moved by _write


def _warn_tied_head(model, names) -> None:
    """Warn (:class:`~loramix.errors.LoramixWarning`) when a target is the
    output head tied to the input embedding: trained and on the fly (PEFT)
    only the head changes, but merged (``eval --merged``) the shared weight
    changes for both, so the two models differ (``sum --into`` refuses it)."""
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if out is None or emb is None or out.weight is not emb.weight:
        return
    head = next((n for n in names if model.get_submodule(n) is out), None)
    if head is not None:
        from .errors import warn

        warn(f"target {head} is tied to the input embedding: the adapter is trained on the head alone "
             "(as PEFT applies it on the fly), but merging it changes the shared weight, so merged "
             "(evaluate merged=True, eval --merged) it is another model, and a sum into the base "
             "(sum_into_base, sum --into) refuses it")  # fmt: skip


def _prepare(base, data_list, *, targets, fields, eval_size, seed, limit, max_len, batch, on, device,
             top_layers=None, prefix_cache="disk", autocast=None, prompt="raw", progress=False,
             rank=None, steps=None, epochs=1, bucket=16, loaded=None) -> _Run:  # fmt: skip
    """Load and split the data, load the base, resolve the targets, encode;
    with ``top_layers``, the targets in those blocks and the cached prefix (of
    the training examples the run's steps draw, :func:`_drawn`)."""
    from .archs import check_top_layers
    from .models import read_model_config

    t_load = time.perf_counter()
    # The data and the base's folder first: a mistyped file is refused before torch loads.
    train_recs, eval_recs, data_inputs = _load_sources(
        data_list, eval_size=eval_size, seed=seed, limit=limit, fields=fields
    )
    check_top_layers(read_model_config(base)[1], top_layers)  # in range of config.json's blocks: before torch
    from .gguf_import import resolve_base
    from .io.filehash import prefetch_inputs

    prefetch_inputs(base=resolve_base(base))  # the provenance's hashes, on another core during torch's import
    t_import = time.perf_counter()
    import torch

    from .data import check_prompt, encode_records, make_batches, pad_id_for
    from .devices import resolve_device
    from .models import base_provenance, load_causal_lm

    t_load += time.perf_counter() - t_import  # torch's import is the process's start-up, not the setup's
    dev = resolve_device(device)
    model, tok = load_causal_lm(base, device=dev) if loaded is None else loaded
    check_prompt(prompt, tok, base)
    targets, resolved_targets, k = _run_targets(model, targets, top_layers=top_layers, rank=rank)
    # Sequences cannot be longer than the model's positions: cap max_len there (recorded).
    n_pos = context_length(model.config)
    if n_pos:
        max_len = min(max_len, int(n_pos))
    base_rec = base_provenance(base)
    pad = pad_id_for(tok)
    ac = getattr(torch, autocast) if autocast not in (None, "float32") else None
    cut_train, cut_eval = {}, {}
    train_ex = encode_records(tok, train_recs, max_len=max_len, on=on, prompt=prompt, stats=cut_train)
    n_per_epoch = math.ceil(len(train_ex) / batch)
    run = _Run(model=model, dev=dev, base=str(Path(base)), base_rec=base_rec, data_inputs=data_inputs,
               train_ex=train_ex, eval_batches=None, n_eval=len(eval_recs), pad=pad, n_per_epoch=n_per_epoch,
               total=steps if steps is not None else max(1, round(epochs * n_per_epoch)), targets=targets,
               resolved_targets=resolved_targets, max_len=max_len, prefix_at=k, autocast=ac,
               t_load=t_load)  # fmt: skip
    eval_ex = encode_records(tok, eval_recs, max_len=max_len, on=on, prompt=prompt, stats=cut_eval)
    run.truncated = {"train": cut_train["truncated"], "eval": cut_eval["truncated"]}
    eval_states = None
    if k is not None:
        eval_states = _cache_prefix(run, eval_ex, batch=batch, seed=seed, bucket=bucket, prefix_cache=prefix_cache,
                                    progress=progress)  # fmt: skip
    if eval_ex:
        run.eval_batches = make_batches(eval_ex, batch_size=batch, pad_id=pad, sort_by_length=True,
                                        embeds=eval_states)  # fmt: skip
    return run


def _run_targets(model, targets, *, top_layers, rank) -> tuple:
    """``(targets, resolved targets, k)``: the targets as the run takes them (a
    list, a regex string, or None for the architecture's default) and as
    ``loramix.json`` records them (the default's names for None), checked
    against ``model`` (a bad ``--targets`` fails before the base evaluation,
    a ``rank`` above a target's size too); with ``top_layers``, both are the
    modules they select in blocks ``k`` and up (``k``: the first adapted
    block, else None)."""
    from .layers import default_targets, find_targets

    names = find_targets(model, targets)  # a bad --targets fails now, not after the base evaluation
    targets = list(targets) if targets is not None and not isinstance(targets, str) else targets
    resolved_targets = default_targets(model) if targets is None else targets
    k = None
    if top_layers is not None:
        from .prefix import split_point, top_targets

        k = split_point(model, top_layers)
        targets = resolved_targets = names = top_targets(model, targets, k)
    _warn_tied_head(model, names)
    if rank is not None:
        _check_rank(model, names, rank)
    return targets, resolved_targets, k


def _cache_prefix(run: _Run, eval_ex: list, *, batch: int, seed: int, bucket: int, prefix_cache,
                  progress: bool) -> list | None:  # fmt: skip
    """The frozen prefix of a ``top_layers`` run (``run.prefix_at = k``,
    :mod:`loramix.prefix`): the states ``h_k`` entering block ``k`` of the
    training examples its steps draw (:func:`_drawn`) or of their whole
    source (below), None for the others, into ``run.train_states``, their
    time into ``run.prefix_seconds``; returns those of the held-out examples
    ``eval_ex`` (None without).

    Each data source's examples are computed and cached as a part of their
    own (``prefix_states``' ``parts``), as a run on that source alone
    computes them: a run on several sources (a study's merged-data adapter,
    ``train --data a --data b``) has each source's own states, bit for bit,
    and reuses them where that source's run cached them. A source that the
    run's steps would pass over whole on its own (``total >= ceil(n / batch)``,
    its adapter trained alone with the same steps: a study's domain adapter)
    is taken whole, all of its records; a larger one gives the records the
    run draws from it. One source: the records the run draws, as before.
    """
    from .prefix import prefix_states

    model, k, ex = run.model, run.prefix_at, run.train_ex
    t0 = time.perf_counter()
    cached = dict(
        batch_size=batch, pad_id=run.pad, cache=prefix_cache, autocast=run.autocast, progress=progress
    )
    drawn = _drawn(run, batch=batch, seed=seed, bucket=bucket)
    take, parts, lo = [], [], 0  # the examples whose states are computed, and how many per source
    for n in (d["n_train"] for d in run.data_inputs):  # train_ex: the sources' examples in turn
        whole = drawn is None or run.total >= math.ceil(n / batch)
        part = range(lo, lo + n) if whole else [i for i in drawn if lo <= i < lo + n]
        take += part
        parts.append(len(part))
        lo += n
    states = prefix_states(model, k, [ex[i] for i in take], parts=parts, **cached)
    run.train_states = [None] * len(ex)  # a run shorter than an epoch: None for the records it never draws
    for i, st in zip(take, states):
        run.train_states[i] = st
    eval_sizes = [d["n_eval"] for d in run.data_inputs]
    eval_states = prefix_states(model, k, eval_ex, parts=eval_sizes, **cached) if eval_ex else None
    run.prefix_seconds = time.perf_counter() - t0
    return eval_states


def _drawn(run: _Run, *, batch: int, seed: int, bucket: int) -> list[int] | None:
    """The indices (ascending) of the training examples that the run's
    ``total`` steps draw, when they stop within the first epoch (the batches
    :func:`_train` makes for it); None when every example is drawn."""
    from .data import batch_indices

    if run.total >= run.n_per_epoch:
        return None
    chunks = batch_indices(run.train_ex, batch_size=batch, shuffle=True, seed=seed, bucket=bucket)
    return sorted({i for idx in chunks[: run.total] for i in idx})


def _runner(run: _Run, grad_checkpointing: bool = False):
    """What the steps call: the model, or its top blocks fed the cached states."""
    if grad_checkpointing:
        # non-reentrant: the inputs (ids, or cached states) need no gradient
        run.model.activation_checkpointing_enable({"use_reentrant": False})
    if run.prefix_at is None:
        return run.model
    from .prefix import top_view

    return top_view(run.model, run.prefix_at)


def _step(runner, b: dict, *, dev, micro: int, autocast) -> tuple[float, int, int]:
    """Forward and backward of one batch as ``micro`` micro-batches, each
    cut to its own longest sequence; the loss is the mean NLL over the
    batch's scored tokens, so the gradients add up to the whole batch's.
    Returns ``(loss, scored tokens, input tokens)``."""
    import torch

    from .perplexity import scored_nll

    n_total = _supervised_tokens(b)
    loss = 0.0
    for part in _micro_batches(b, micro):
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            nll, _ = scored_nll(runner, part, device=dev)
        part_loss = nll / max(1, n_total)
        part_loss.backward()
        loss += float(part_loss.detach())
    return loss, n_total, int(b["attention_mask"].sum())


def _micro_batches(b: dict, micro: int) -> list[dict]:
    """``b`` cut into at most ``micro`` parts of consecutive rows, each cut to
    its own longest sequence. A batch of fewer than ``micro`` rows (an epoch's
    last, partial batch) gives one part per row: ``tensor_split`` would also
    give empty parts, which have no longest sequence."""
    import torch

    if micro == 1:  # the batch is already cut to its longest row: views, not a copy per step
        width = int(b["attention_mask"].sum(1).max())
        return [{k: v[:, :width] for k, v in b.items()}]
    parts = []
    for idx in torch.tensor_split(torch.arange(b["attention_mask"].shape[0]), micro):
        if not len(idx):
            continue
        width = int(b["attention_mask"][idx].sum(1).max())  # right padding: columns past it are pads
        parts.append({k: v[idx, :width] for k, v in b.items()})
    return parts


def _train(run: _Run, kind, settings: dict, options: dict, *, out: Path, progress: bool) -> dict:
    """Base perplexity, inject the kind's layers (initial factors seeded by
    ``settings["init"]``), the AdamW loop (rows logged live beside ``out``),
    adapted perplexity."""
    import torch

    from .layers import inject_trainable

    model = run.model
    runner = _runner(run, settings["grad_checkpointing"])
    k = _held_out_prefix(run)
    ppl_base, states = _base_perplexity(run, runner, k, kind, progress)
    torch.manual_seed(settings["seed"])  # dropout
    params = inject_trainable(model, kind=kind, rank=settings["rank"], alpha=settings["alpha"],
                              targets=run.targets, seed=settings["init"]["seed"], **options)  # fmt: skip
    # foreach: one call per update op for all factors, not one per factor (torch's CPU default);
    # the same ops on each tensor, so the same bits (tests/test_train.py), 0.4 ms less per step
    opt = torch.optim.AdamW(
        params, lr=settings["lr"], weight_decay=settings["weight_decay"], betas=(0.9, 0.999), foreach=True
    )
    setup_seconds = time.perf_counter() - run.t_load

    run.live = LiveLog(out)
    model.train()
    runner.train()
    t0 = time.perf_counter()
    log, tokens, in_tokens = _steps(run, runner, params, opt, settings, t0=t0, desc=f"train {kind.name}",
                                    progress=progress)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    model.eval()
    runner.eval()
    ev = _adapted_perplexity(run, runner, k, states, kind, progress)
    run.log = log
    return {
        "ppl_base": ppl_base,
        "ppl_adapter": ev["ppl"] if ev else None,
        "final_loss": _final_loss(log),
        "steps": settings["steps"],
        "tokens": tokens,
        "input_tokens": in_tokens,
        "train_seconds": round(train_seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "prefix_seconds": round(run.prefix_seconds, 3),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "input_tokens_per_second": round(in_tokens / train_seconds, 1) if train_seconds > 0 else None,
        "n_train": len(run.train_ex),
        "n_eval": run.n_eval,
        "n_train_truncated": run.truncated["train"],
        "n_eval_truncated": run.truncated["eval"],
        "eval_tokens": ev["tokens"] if ev else 0,
        "trainable_parameters": sum(p.numel() for p in params),
        "device": str(run.dev),
    }


def _steps(run: _Run, runner, params: list, opt, settings: dict, *, t0: float, desc: str,
           progress: bool) -> tuple[list, int, int]:  # fmt: skip
    """The AdamW loop of ``settings["steps"]`` steps (module docstring): each
    epoch's batches reshuffled (seed ``settings["seed"]`` plus the epoch), the
    learning rate of :func:`lr_at`, the gradients' global norm clipped to
    ``settings["clip"]``; a loss or factor that is not finite stops the run
    (:func:`_diverged`). Each step's row ``(step, loss, lr, scored tokens so
    far, seconds since t0)`` goes to ``run.live`` as it is made. Returns
    ``(the rows, scored tokens, input tokens)``."""
    import torch

    from .data import make_batches
    from .progress import progress_bar

    seed, total, lr, n_per_epoch = settings["seed"], settings["steps"], settings["lr"], run.n_per_epoch
    log, tokens, in_tokens = [], 0, 0
    epoch, batches = -1, []
    bar = progress_bar(total=total, desc=desc, unit="step", progress=progress, dynamic_ncols=True)
    for step in range(total):
        if step // n_per_epoch != epoch:  # new epoch: reshuffle
            epoch = step // n_per_epoch
            # take: the batches this epoch runs (a short run has the states of theirs alone, _drawn)
            batches = make_batches(run.train_ex, batch_size=settings["batch"], pad_id=run.pad, shuffle=True,
                                   seed=seed + epoch, embeds=run.train_states, bucket=settings["bucket"],
                                   take=total - step)  # fmt: skip
        cur_lr = lr_at(step, lr=lr, warmup=settings["warmup"], total=total)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        opt.zero_grad(set_to_none=True)
        lv, n_scored, n_in = _step(runner, batches[step % n_per_epoch], dev=run.dev,
                                   micro=settings["grad_accum"], autocast=run.autocast)  # fmt: skip
        if settings["clip"] and settings["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, settings["clip"])
        if not math.isfinite(lv):
            raise _diverged(step + 1, total, f"loss {lv}", lr)
        opt.step()
        tokens += n_scored
        in_tokens += n_in
        log.append((step + 1, lv, cur_lr, tokens, time.perf_counter() - t0))
        run.live.row(*log[-1])
        bar.set_postfix(loss=f"{_final_loss(log):.3f}", lr=f"{cur_lr:.1e}", refresh=False)
        bar.update(1)
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in params):  # the last step's update overflowed
        raise _diverged(total, total, "its update left nan or inf in the factors", lr)
    return log, tokens, in_tokens


def _base_perplexity(
    run: _Run, runner, k: int | None, kind, progress: bool
) -> tuple[float | None, list | None]:
    """``(the base's held-out perplexity, the states entering block k)``:
    with ``k`` (:func:`_held_out_prefix`) the forward keeps each batch's
    ``h_k``, which :func:`_adapted_perplexity` feeds the adapted blocks.
    ``(None, None)`` without held-out records."""
    from .perplexity import perplexity

    if not run.eval_batches:
        return None, None
    bar = _eval_lines(run, kind, "base", progress)

    def score() -> float:
        return perplexity(runner, run.eval_batches, device=run.dev, autocast=run.autocast, bar=bar)["ppl"]

    if k is None:
        return score(), None
    from .prefix import states_entering

    with states_entering(run.model, k) as states:
        ppl = score()
    return ppl, states


def _adapted_perplexity(run: _Run, runner, k: int | None, states, kind, progress: bool) -> dict | None:
    """:func:`loramix.perplexity.perplexity` of the adapted model on the held-out
    records (None without any); with ``k``, blocks ``k`` and up on the base's
    own ``h_k`` (``states``): the same computation as the full forward."""
    from .perplexity import perplexity

    if not run.eval_batches:
        return None
    bar = _eval_lines(run, kind, "adapted", progress)
    if k is None:
        return perplexity(runner, run.eval_batches, device=run.dev, autocast=run.autocast, bar=bar)
    from .prefix import top_view

    held = [{**{n: v for n, v in b.items() if n != "input_ids"}, "inputs_embeds": h}
            for b, h in zip(run.eval_batches, states)]  # fmt: skip
    return perplexity(top_view(run.model, k), held, device=run.dev, autocast=run.autocast, bar=bar)


def _eval_lines(run: _Run, kind, which: str, progress: bool):
    """Where stderr is not a terminal, the plain lines of the held-out
    evaluation of the base or the adapted model (minutes on a large
    ``--eval-size``, which said nothing in a log); None elsewhere: no bar on
    a terminal, as before."""
    from .progress import Lines, lines_wanted

    if not lines_wanted(progress):
        return None
    rows = sum(int(b["attention_mask"].shape[0]) for b in run.eval_batches)
    return Lines(total=rows, desc=f"train {kind.name}: held-out perplexity of the {which}", unit="record")


def _held_out_prefix(run: _Run) -> int | None:
    """``k`` when the adapters sit in blocks ``k > 0`` and up (targets named
    there, ``--top-layers`` not given): the base's held-out evaluation then
    keeps the state entering block ``k`` of each batch, and the adapted
    one runs blocks ``k ..`` and the head on it, not the frozen blocks below
    a second time (on SmolLM2 with the README's targets in blocks 28-29, 28 of
    30 blocks of that pass). None under autocast (kept as it was), or when the
    states, ``sum_b B*T*d`` floats, would pass the prefix cache's memory bound."""
    if run.prefix_at is not None or run.autocast is not None or not run.eval_batches:
        return None
    from .layers import find_targets
    from .prefix import MEMORY_BYTES, lowest_block

    k = lowest_block(run.model, find_targets(run.model, run.targets))
    emb = run.model.get_input_embeddings().weight
    size = sum(b["attention_mask"].numel() for b in run.eval_batches) * emb.shape[1] * emb.element_size()
    return k if k is not None and size <= MEMORY_BYTES else None


def _final_loss(log: list[tuple]) -> float:
    """The mean loss of the last 10 steps of ``log`` (rows ``(step, loss, ...)``):
    the summary's final loss, and the bar's loss so far. The bar showed an
    average seeded with the first step's loss instead, which lagged: 3.39 at
    the end of 12 steps on SmolLM2 whose last 10 losses mean 2.58."""
    last = log[-10:]
    return sum(r[1] for r in last) / len(last)


def _diverged(step: int, total: int, what: str, lr: float) -> UsageError:
    """The one-line error of a run whose loss or factors stopped being finite."""
    return UsageError(
        "--lr", f"training diverged at step {step} of {total} ({what}); try a smaller --lr than {lr:g}"
    )


def _write(out, run: _Run, kind, settings, options, metrics, *, force, file_inputs) -> None:
    """The adapter (the kind's format), train_log.csv and loramix.json, atomically."""
    import torch

    from .io.outputs import atomic_output_dir, provenance, write_provenance
    from .io.safetensors_io import file_record
    from .layers import extract_modules

    inputs = [run.base_rec, *run.data_inputs]
    # No clock time or timings in the tensor file's metadata: same inputs, same bytes.
    file_prov = file_record(provenance("train", settings, inputs))
    # nor how a path was typed (the base's "given"): relative or absolute, same bytes
    file_prov["inputs"] = [{k: v for k, v in i.items() if k != "given"} for i in inputs]
    modules = extract_modules(run.model)
    # GPT-2's Conv1D stores W0^T: PEFT must know (fan_in_fan_out) to wrap it.
    fifo = any(not isinstance(run.model.get_submodule(n).base, torch.nn.Linear) for n in modules)
    # target_modules: the last names where the adapter is on every module of those names, else
    # (--top-layers) the full names, so that PEFT wraps only the modules the file has factors for
    last = {n.rsplit(".", 1)[-1] for n in modules}
    named = {n for n, _ in run.model.named_modules() if n.rsplit(".", 1)[-1] in last}
    target_modules = sorted(last) if named == set(modules) else sorted(modules)
    with atomic_output_dir(out, force=force, inputs=[run.base, *file_inputs]) as tmp:
        kind.save(
            tmp,
            modules,
            rank=settings["rank"],
            alpha=settings["alpha"],
            options=options,
            fan_in_fan_out=fifo,
            # absolute: PEFT's AutoPeftModel loads the base from it, from any working folder
            base_model_name_or_path=os.path.abspath(run.base),
            provenance=file_prov,
            extra_config={"target_modules": target_modules},
        )
        run.live.move_to(tmp / "train_log.csv")
        write_provenance(tmp, provenance("train", settings, inputs, metrics=metrics))
