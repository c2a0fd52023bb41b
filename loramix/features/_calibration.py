"""Calibration activations, kept only as their projections on the adapters' ``A``.

For domain ``i`` (the data of adapter ``i``) and adapted module ``m``, let
``X_i`` (T x in) be the module's inputs on ``T`` calibration tokens of that
domain, from the *base* model, and ``G_i = X_i^T X_i`` (in x in) their Gram.
Every data-aware feature only needs ``Af_a G_i Af_b^T`` for the adapters
``a, b`` that adapt ``m`` (``||X M^T||_F^2 = tr(M G M^T)``), so per module the
``A`` factors of its ``n`` owners are stacked, ``A_cat`` (R x in, ``R = sum r``),
and what is kept is::

    S_i,m = A_cat G_i A_cat^T = (X_i A_cat^T)^T (X_i A_cat^T)       (R x R, float64)

An embedding module (``extra["layout"] == "embedding"``) keeps its factors in
the weight's ``(vocab, dim)`` layout, ``dW = B A``; its input is a token id,
i.e. a one-hot row of ``X`` (T x vocab), and the output it adds is ``dW[id] =
B[id] A``. In the ``out x in`` orientation every feature here reads, its
factors are therefore ``(A^T, B^T)`` (:func:`input_factors`), and ``X A_cat^T``
is the rows of ``A_cat^T`` the ids select.

Captured with forward hooks as ``Y = X A_cat^T`` (T x R) per batch, ``S += Y^T Y``:
neither a ``T x in`` activation nor an ``in x in`` Gram is stored, only
``R x R`` per module and domain. :func:`from_grams` builds the same object from
given Grams (tests, or activations computed elsewhere).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from ..errors import BaseModelError, UsageError

#: calibration tokens per domain and sequence length where neither the caller
#: nor the study (a predictors file's ``calibration``) says otherwise
DEFAULT_TOKENS, DEFAULT_MAX_LEN = 256, 128


@dataclass
class Calibration:
    """``S[i][m]`` (R_m x R_m) for domain ``i`` and module ``m``; ``owners[m]``:
    the adapters stacked in ``A_cat`` for ``m``, ``offsets[m]`` their row offsets
    (``len(owners) + 1``); ``tokens[i]``: calibration tokens of domain ``i``."""

    owners: dict[str, list[int]]
    offsets: dict[str, list[int]]
    S: list[dict[str, torch.Tensor]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def block(self, domain: int, module: str, a: int, b: int) -> torch.Tensor:
        """``Af_a G_domain Af_b^T`` (r_a x r_b) for adapters ``a, b`` (both owners of ``module``)."""
        own, off = self.owners[module], self.offsets[module]
        pa, pb = own.index(a), own.index(b)
        return self.S[domain][module][off[pa] : off[pa + 1], off[pb] : off[pb + 1]]


def input_factors(m) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Bf, Af)`` (float64) of module delta ``m`` oriented as the module's
    forward applies it, ``out = X Af^T Bf^T`` with ``X`` its input: the
    factors themselves, or ``(A^T, B^T)`` for an embedding, whose input is a
    one-hot row over the vocabulary (module docstring)."""
    from ..kinds.base import is_embedding

    B, A = m.factors()
    return (A.T, B.T) if is_embedding(m) else (B, A)


def stacked_a(adapters) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, torch.Tensor]]:
    """``owners``, ``offsets`` and ``A_cat`` (R x in, float64) per module."""
    owners: dict[str, list[int]] = {}
    for i, ad in enumerate(adapters):
        for m in ad.modules:
            owners.setdefault(m, []).append(i)
    offsets, a_cat = {}, {}
    for m, own in owners.items():
        As = [input_factors(adapters[k].modules[m])[1] for k in own]
        off = [0]
        for A in As:
            off.append(off[-1] + int(A.shape[0]))
        offsets[m], a_cat[m] = off, torch.cat(As, dim=0)
    return owners, offsets, a_cat


def from_grams(adapters, grams: list[dict[str, torch.Tensor]]) -> Calibration:
    """A :class:`Calibration` from Grams ``grams[i][m] = X_i^T X_i`` (in x in), one
    dict per adapter's domain, each covering every adapted module."""
    if len(grams) != len(adapters):
        raise UsageError("calibration", f"{len(grams)} domains for {len(adapters)} adapters (one each)")
    owners, offsets, a_cat = stacked_a(adapters)
    cal = Calibration(owners=owners, offsets=offsets)
    for g in grams:
        missing = sorted(set(owners) - set(g))
        if missing:
            raise UsageError("calibration", f"no activations for module {missing[0]}")
        cal.S.append({m: A @ g[m].to(torch.float64) @ A.T for m, A in a_cat.items()})
        cal.tokens.append(-1)  # unknown from a Gram
    return cal


def calibration_records(path, tokens: int) -> list:
    """The records of ``path`` that can hold ``tokens`` calibration tokens (each
    has at least one): the file read and checked, a :class:`DataError` naming it."""
    from ..data import load_records

    return load_records(path, limit=max(tokens, 1))


def calibration_batches(tokenizer, path, *, tokens: int, max_len: int, batch_size: int = 8,
                        records: list | None = None, prompt: str = "raw") -> list[dict]:  # fmt: skip
    """The first ``tokens`` tokens of ``path``'s records (whole records, the last
    one cut on the right, which leaves earlier activations unchanged in a causal
    model), as padded batches, formatted by ``prompt`` (``raw`` or ``chat``, as
    :func:`loramix.data.encode_records`). ``records``: those of
    :func:`calibration_records`, already read."""
    from ..data import encode_records, make_batches, pad_id_for

    recs = records if records is not None else calibration_records(path, tokens)
    examples, total = [], 0
    for ex in encode_records(tokenizer, recs, max_len=max_len, on="all", prompt=prompt):
        ids = ex["input_ids"][: tokens - total]
        examples.append({"input_ids": ids, "labels": ids})
        total += len(ids)
        if total >= tokens:
            break
    return make_batches(examples, batch_size=batch_size, pad_id=pad_id_for(tokenizer))


def _hook(S: dict, name: str, A: torch.Tensor, state: dict, embedding: bool = False):
    At = A.T.contiguous() if embedding else None

    def hook(module, inputs, output):
        x = inputs[0]
        if embedding:  # token ids: the one-hot X A^T is the rows of A^T they select
            Y = At[x.reshape(-1)[state["mask"]]]
        else:
            rows = x.reshape(-1, x.shape[-1])[state["mask"]].to(torch.float64)  # (T_batch, in)
            Y = rows @ A.T  # (T_batch, R): never an in x in Gram
        S[name] += Y.T @ Y

    return hook


def _trunk(model, owners):
    """What to run for the inputs of the ``owners`` modules: the model without
    its output head (``model.base_model``, e.g. ``model`` of a Llama) when every
    one lies inside it. The head's logits are read by no hook, and on SmolLM2 they
    are a fifth of the forward's FLOPs (49,152 x 576 per token)."""
    trunk, prefix = model.base_model, getattr(model, "base_model_prefix", "")
    if trunk is not model and prefix and all(m.startswith(prefix + ".") for m in owners):
        return trunk
    return model


def capture(adapters, base: str | os.PathLike, data: list, *, tokens: int = DEFAULT_TOKENS, max_len: int = DEFAULT_MAX_LEN,
            device="cpu", progress: bool = False, prompts: list[str] | None = None,
            loaded: tuple | None = None) -> Calibration:  # fmt: skip
    """Run the base model over ``tokens`` calibration tokens of each ``data[i]``
    (adapter ``i``'s domain) and keep ``S_i,m`` for every adapted module.
    ``prompts[i]``: how domain ``i``'s records are formatted (``raw``, the
    default, or ``chat``), as adapter ``i`` saw them in training.
    ``progress``: a bar of the tokens run, on stderr where it is a terminal.
    ``loaded``: ``base`` already loaded on ``device``, ``(model, tokenizer)``,
    to run instead of loading it again (only read: hooks are added and removed)."""
    from ..kinds.base import is_embedding
    from ..models import load_causal_lm

    if len(data) != len(adapters):
        raise UsageError(
            "--data",
            f"{len(data)} data file{'s' * (len(data) != 1)} for {len(adapters)} adapters (give one per "
            "adapter, in order)",
        )
    if tokens < 1:
        raise UsageError("--tokens", f"must be at least 1, got {tokens}")
    # Every file read (and a bad one refused) before the base is loaded and run.
    records = [calibration_records(path, tokens) for path in data]
    model, tok = load_causal_lm(base, device=device) if loaded is None else loaded
    from ..io.peft_layout import check_default_targets

    # the base known: an adapter without target_modules holds PEFT's default for its type, or is refused
    check_default_targets(adapters, getattr(model.config, "model_type", None))
    owners, offsets, a_cat = stacked_a(adapters)
    subs = dict(model.named_modules())
    for m in owners:
        if m not in subs:
            raise BaseModelError(base, f"has no module {m} (adapted by {adapters[owners[m][0]].name})")
    embeddings = {m for m, own in owners.items() if is_embedding(adapters[own[0]].modules[m])}
    run = _trunk(model, owners)
    cal = Calibration(owners=owners, offsets=offsets)
    dev = next(model.parameters()).device
    a_dev = {m: A.to(dev) for m, A in a_cat.items()}
    prompts = prompts or ["raw"] * len(data)
    batches = [calibration_batches(tok, path, tokens=tokens, max_len=max_len, records=recs, prompt=pr)
               for path, recs, pr in zip(data, records, prompts)]  # fmt: skip
    from ..progress import progress_bar

    bar = progress_bar(total=sum(int(b["attention_mask"].sum()) for bs in batches for b in bs), unit="token",
                       desc="calibration", file=sys.stderr, progress=progress, leave=False,
                       dynamic_ncols=True)  # fmt: skip
    for domain in batches:
        S = {
            m: torch.zeros(A.shape[0], A.shape[0], dtype=torch.float64, device=dev) for m, A in a_dev.items()
        }
        state: dict = {}
        handles = [
            subs[m].register_forward_hook(_hook(S, m, A, state, m in embeddings)) for m, A in a_dev.items()
        ]
        n = 0
        try:
            with torch.no_grad():
                for b in domain:
                    state["mask"] = b["attention_mask"].reshape(-1).bool().to(dev)
                    run(
                        input_ids=b["input_ids"].to(dev),
                        attention_mask=b["attention_mask"].to(dev),
                        use_cache=False,
                    )
                    t = int(b["attention_mask"].sum())
                    n += t
                    bar.update(t)
        finally:
            for h in handles:
                h.remove()
        cal.S.append({m: s.cpu() for m, s in S.items()})
        cal.tokens.append(n)
    bar.close()
    return cal
