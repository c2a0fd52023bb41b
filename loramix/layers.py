"""Adapter layers applied to a model: trainable layers in, loaded adapters on, merges.

Every layer here wraps one frozen base projection ``base``: a ``torch.nn.Linear``
(weight ``W0`` stored ``(out, in)``) or a transformers GPT-2 ``Conv1D`` (weight
stored ``(in, out)``, i.e. ``W0.T``; PEFT's ``fan_in_fan_out``). The math is
written in ``nn.Linear`` layout throughout; ``Wrapped.base_weight`` gives
``W0`` as an ``(out, in)`` view either way, and the only place the Conv1D
transpose matters is ``Wrapped.base_matmul`` and the in-place merge.

Shapes: ``x`` is ``(..., in)``, ``y`` is ``(..., out)``, ``r`` the rank.

The trainable layers belong to their adapter kinds (:mod:`loramix.kinds`:
:class:`LoraLinear` in ``kinds/lora.py``, :class:`D2LoraLinear` in
``kinds/d2lora.py``, D2 math in :mod:`loramix.d2lora`); this module finds
targets, swaps layers in and out and applies loaded adapters.

Init (``inject_trainable``): every kind starts at ``dW = 0`` (the model
starts as the base), its ``A`` factors drawn Kaiming-uniform (PEFT's LoRA
init) from one generator seeded by ``seed``, module by module in model order.

Loaded adapters (:func:`attach_adapters`, :func:`merge_into_model`) apply a
weighted sum of *effective* deltas (LoRA ``s B A``; D2 ``W_hat - W0``). On the
fly, each module's kind says how it folds into one concatenated low-rank pair
plus one per-row gain on ``W0 x`` (:meth:`AdapterKind.attach_terms`):

    y = (1 + sum_i gain_i) * (W0 x) + b + [B_1 | B_2 | ...] [A_1; A_2; ...] x + sum_i extra_i(x)

one dense product per module whatever the number of adapters (LoRA: ``gain = 0``,
``B = w s B``; row-norm D2: ``gain = w (c - 1)``, ``B = w (c + 1) Bf``).

Loaded adapters may also adapt an ``nn.Embedding`` (PEFT's embedding LoRA,
and DoRA on an embedding): the module is kept in the weight's own layout
``(vocab, dim)`` and applied on the fly by :class:`AttachedEmbedding`, a
lookup of the concatenated ``B`` rows, or merged into the weight as it is
stored. Kinds not defined on an embedding (D2-LoRA) are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, ModuleDelta, warn_unscaled_copies
from .d2lora import d2_norm_scale
from .errors import AdapterError, UsageError
from .io.peft_layout import check_default_targets
from .io.safetensors_io import check_output_finite
from .kinds import LORA, AttachTerms, TrainableLayer, Wrapped, get_kind, is_adaptable
from .kinds.base import is_embedding
from .kinds.d2lora import D2LoraLinear
from .kinds.lora import LoraLinear
from .options import parse_weights
from .rounding import narrow

__all__ = [
    "LoraLinear",
    "D2LoraLinear",
    "AttachedLinear",
    "AttachedEmbedding",
    "weight_view",
    "default_targets",
    "find_targets",
    "inject_trainable",
    "extract_modules",
    "attach_adapters",
    "merge_into_model",
    "detach",
    "restore_weights",
    "wrapped_modules",
    "d2_norm_scale",
    "is_adaptable",
]

# --------------------------------------------------------------------------- loaded adapters


class AttachedLinear(Wrapped):
    """A weighted sum of loaded adapters' effective deltas, applied on the fly.

    Built from ``(weight, ModuleDelta)`` pairs; each module's kind gives its
    :class:`~loramix.kinds.base.AttachTerms` (computed once here, in float64,
    since nothing trains), folded into one low-rank pair ``(B_cat, A_cat)``
    and one per-output gain ``gamma = sum_i gain_i``:

        y = (1 + gamma) * (W0 x) + b + B_cat (A_cat x) + sum_i extra_i(x)

    On a bfloat16/float16 base the terms are kept and computed in float32,
    added to the base's output and the sum rounded once to its dtype, as
    PEFT's layer does with its float32 factors (``autocast_adapter_dtype``).
    Frozen buffers only.
    """

    def __init__(self, base: nn.Module, entries: Sequence[tuple[float, ModuleDelta]]):
        super().__init__(base)
        W0 = self.base_weight().detach().double()
        dt, ft = _buffer_dtypes(self.base.weight)
        terms: list[AttachTerms] = [m.kind.attach_terms(W0, w, m, ft) for w, m in entries]
        _fold_terms(self, terms, (self.out_features, self.in_features), self.out_features, W0.device, dt, ft)
        self._extras = [t.extra for t in terms if t.extra is not None]
        self.n_adapters = len(entries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_gain:
            y = self.base_matmul(x) * self.gain
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self.base(x)
        # on a half-precision base: widened (exactly), the terms added, rounded once at the end
        z = y.to(self.A_cat.dtype)
        if self.A_cat.shape[0]:
            z = z + (x.to(self.A_cat.dtype) @ self.A_cat.T) @ self.B_cat.T
        for extra in self._extras:
            z = z + extra(x, self)
        return z.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={self.n_adapters}, rank={self.A_cat.shape[0]}"


def _buffer_dtypes(w: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``(dt, ft)``: the dtype of an attached layer's gain, the base weight's if
    floating (else float32), and of its adapters' terms: float32 on a
    bfloat16/float16 base, as PEFT keeps its factors
    (``autocast_adapter_dtype``; rounded to the base's dtype they took 8 or
    11 bits), else ``dt``."""
    half = (torch.float16, torch.bfloat16)
    dt = w.dtype if w.dtype in (*half, torch.float32, torch.float64) else torch.float32
    return dt, torch.float32 if dt in half else dt


def _fold_terms(layer: nn.Module, terms: Sequence[AttachTerms], shape: tuple[int, int], n_gain: int, dev,
                dt: torch.dtype, ft: torch.dtype) -> None:  # fmt: skip
    """The adapters' ``terms`` folded into ``layer``'s frozen buffers: ``gain =
    1 + sum_i gain_i`` ``(n_gain,)`` in ``dt`` (and ``has_gain``: whether any
    is nonzero), ``B_cat = [B_1 | ...]`` ``(rows, R)`` and ``A_cat = [A_1;
    ...]`` ``(R, cols)`` in ``ft``, ``shape = (rows, cols)`` (``R = 0`` without
    terms); summed and joined in float64 on ``dev``."""
    rows, cols = shape
    gamma = torch.zeros(n_gain, dtype=torch.float64, device=dev)
    for t in terms:
        if t.gain is not None:
            gamma += t.gain
    layer.has_gain = bool(gamma.abs().max() > 0) if gamma.numel() else False
    layer.register_buffer("gain", (1 + gamma).to(dt), persistent=False)
    Bs = [t.B.to(dev, torch.float64) for t in terms] or [torch.zeros(rows, 0, device=dev)]
    As = [t.A.to(dev, torch.float64) for t in terms] or [torch.zeros(0, cols, device=dev)]
    layer.register_buffer("B_cat", torch.cat(Bs, dim=1).to(ft).contiguous(), persistent=False)
    layer.register_buffer("A_cat", torch.cat(As, dim=0).to(ft), persistent=False)


class AttachedEmbedding(nn.Module):
    """A weighted sum of loaded adapters' effective deltas on an embedding, applied on the fly.

    ``base`` is an ``nn.Embedding`` (or a subclass such as Gemma's scaled
    one) with weight ``E0`` ``(vocab, dim)``; each module is in that layout,
    ``B'_i`` ``(vocab, r_i)`` ``= lora_embedding_A^T`` and ``A'_i``
    ``(r_i, dim)`` ``= lora_embedding_B^T`` (:mod:`loramix.kinds.lora`).
    For token ids ``ids`` ``(...)`` the output is ``(..., dim)``:

        y = E0[ids] + sum_i w_i * s_i * (B'_i[ids] @ A'_i)                  (LoRA)
          = (1 + gamma) * base(ids) + g * (B_cat[ids] @ A_cat)              (in general)

    ``B_cat = [w_1 s_1 B'_1 | ...]`` ``(vocab, R)`` is stored row-major so
    that a lookup reads ``R`` numbers per token, ``A_cat = [A'_1; ...]``
    ``(R, dim)``; ``gamma`` ``(dim,)`` is the kinds' per-feature gain (zero
    for LoRA; ``w (c - 1)`` for DoRA, whose ``A`` is then scaled by ``c``,
    :mod:`loramix.kinds.dora`); ``g`` is the base's ``embed_scale`` where its
    lookup is scaled (Gemma), applied to the adapters' term as PEFT's
    ``lora.Embedding`` does. Terms computed once in float64 and stored in the
    base weight's dtype, or in float32 on a bfloat16/float16 base, whose
    output is then widened, the term added and the sum rounded once, as
    PEFT's layer does with its float32 factors; frozen buffers only.

    Tied weights: ``base`` is kept as it is, so an output head sharing
    ``E0`` (GPT-2, SmolLM2) still multiplies by ``E0``: on the fly only the
    input lookup changes, exactly as with PEFT's ``lora.Embedding``.
    :func:`merge_into_model` writes the shared weight instead, so a merged
    tied model changes both, as PEFT's ``merge_and_unload`` does.
    """

    def __init__(self, base: nn.Embedding, entries: Sequence[tuple[float, ModuleDelta]]):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"cannot attach to {type(base).__name__}: not an nn.Embedding")
        self.base = base
        E0 = base.weight.detach().double()
        dt, ft = _buffer_dtypes(base.weight)
        terms: list[AttachTerms] = [m.kind.attach_terms(E0, w, m, ft) for w, m in entries]
        for t, (_, m) in zip(terms, entries):
            if t.extra is not None:  # pragma: no cover - no embedding kind has one
                raise TypeError(
                    f"module {m.name}: {m.kind.label} needs an extra term, not defined on an embedding"
                )
        # the gain is per output feature (dim), B_cat is looked up by token id: row-major (vocab, R)
        _fold_terms(self, terms, tuple(E0.shape), E0.shape[1], E0.device, dt, ft)
        self.n_adapters = len(entries)

    # What model code reads from its embedding module: the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base.padding_idx

    def embed_scale(self) -> torch.Tensor | None:
        """The base's scalar ``embed_scale`` (Gemma), or None; a non-scalar one
        is not applied (as PEFT's ``_get_embed_scale``)."""
        g = getattr(self.base, "embed_scale", None)
        if isinstance(g, (int, float)):
            return torch.tensor(float(g), dtype=self.base.weight.dtype, device=self.base.weight.device)
        return g if isinstance(g, torch.Tensor) and g.numel() == 1 else None

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(ids, *args, **kwargs)
        if self.has_gain:
            y = y * self.gain
        if self.A_cat.shape[0]:
            d = F.embedding(ids, self.B_cat) @ self.A_cat
            g = self.embed_scale()
            if g is not None:
                d = d * g.to(d.dtype)
            # on a half-precision base: widened (exactly), the term added, rounded once
            y = (y.to(d.dtype) + d).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"vocab={self.num_embeddings}, dim={self.embedding_dim}, adapters={self.n_adapters}, "
            f"rank={self.A_cat.shape[0]}"
        )


#: every loramix layer that holds a ``base`` module in its place
LAYERS = (Wrapped, AttachedEmbedding)


def weight_view(mod: nn.Module) -> torch.Tensor:
    """``mod``'s weight in its adapter modules' layout (no copy): ``(out, in)``
    for an ``nn.Linear``, the transpose of a ``Conv1D``'s ``(in, out)``, an
    embedding's own ``(vocab, dim)``."""
    w = mod.weight
    return w.T if is_adaptable(mod) and not isinstance(mod, nn.Linear) else w


# --------------------------------------------------------------------------- model surgery


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrapped_modules(model: nn.Module, kind: type | tuple = LAYERS) -> dict[str, nn.Module]:
    """``{name: wrapper}`` of loramix layers in ``model``, in model order
    (by default every kind: :class:`Wrapped` and :class:`AttachedEmbedding`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def holds_loramix(model: nn.Module) -> bool:
    """Whether ``model`` holds what :func:`attach_adapters` puts on it, which
    :func:`detach` removes: loramix layers (:func:`wrapped_modules`), or the
    ``modules_to_save`` copies standing in for its own parameters."""
    return bool(wrapped_modules(model)) or _SWAPPED in model.__dict__


def default_targets(model: nn.Module) -> list[str]:
    """Target suffixes for ``model``'s architecture (``config.model_type``)."""
    from .archs import ARCHS, arch

    mt = getattr(getattr(model, "config", None), "model_type", None)
    a = arch(mt)
    if a and a.targets:
        return list(a.targets)
    # Unknown architecture: the first known architecture's projections present in the model.
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)}
    for cand in (x.targets for x in ARCHS.values() if x.targets):
        if names & set(cand):
            return [t for t in cand if t in names]
    raise UsageError("--targets", f"no default target modules for model type {mt!r}; pass --targets")


def find_targets(model: nn.Module, targets: str | Iterable[str] | None) -> list[str]:
    """Names of the modules ``targets`` selects, by PEFT's rule.

    A list: a module ``m`` matches ``t`` when ``m == t`` or ``m`` ends with
    ``"." + t``. A single string: ``re.fullmatch`` on the module name (PEFT's
    regex form). ``None``: :func:`default_targets`. Only ``nn.Linear`` and
    ``Conv1D`` may be targeted; anything else matched is an error, as is no
    match at all, or an entry of a list given here that matches nothing (a
    misspelt name, which PEFT would skip without a word).
    """
    import re

    given = targets is not None
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str):
        pattern = targets

        def match(n: str) -> bool:
            return re.fullmatch(pattern, n) is not None
    else:
        tl = list(targets)

        def match(n: str) -> bool:
            return any(n == t or n.endswith("." + t) for t in tl)

    names = []
    for n, m in model.named_modules():
        if not n or isinstance(m, LAYERS) or not match(n):
            continue
        if isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model, LAYERS):
            continue  # the .base inside one of our wrappers
        if not is_adaptable(m):
            raise UsageError(
                "--targets", f"module {n} is a {type(m).__name__}; only Linear/Conv1D can be adapted"
            )
        names.append(n)
    if not names:
        # Say what there is to target: the adaptable modules' short names, and one full name.
        full = [n for n, m in model.named_modules() if n and is_adaptable(m)]
        short = sorted({n.rpartition(".")[2] for n in full})
        # one string is a regex (the command splits its comma list first): "q_proj,v_proj" from Python
        # matched nothing and the line did not say why
        names_it = isinstance(targets, str) and "," in targets
        raise UsageError(
            "--targets",
            f"no module of the model matches {targets}; its Linear/Conv1D modules are "
            f"{', '.join(short) or 'none'}" + (f" (full names like {full[0]})" if full else "")
            + (f"; a string is one regex the whole name must match: name modules in a list, "
               f"{[t.strip() for t in targets.split(',') if t.strip()]!r}" if names_it else ""),
        )  # fmt: skip
    if given and not isinstance(targets, str):
        missing = unmatched_targets(names, tl)
        if missing:
            short = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if n and is_adaptable(m)})
            raise UsageError(
                "--targets",
                f"{', '.join(map(repr, missing))} matches no module of the model (the other targets do); "
                f"its Linear/Conv1D modules are {', '.join(short)}",
            )
    return names


def unmatched_targets(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """The entries of a target list that select none of ``names`` (PEFT's rule:
    ``n == t`` or ``n`` ends with ``"." + t``)."""
    names = list(names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def inject_trainable(
    model: nn.Module,
    *,
    kind: str = LORA,
    rank: int = 8,
    alpha: float = 16,
    targets: str | Iterable[str] | None = None,
    seed: int = 0,
    dense: bool | None = None,
    method: str | None = None,
    **options,
) -> list[nn.Parameter]:
    """Wrap the target modules with trainable layers of adapter ``kind``, in place.

    ``options`` are the kind's own (D2-LoRA: ``tau``, ``norm_dim``, ``eps``);
    ``dense`` picks D2-LoRA's forward (None: by device, see
    :class:`loramix.kinds.d2lora.D2LoraLinear`; other kinds ignore it);
    ``method`` is the v0.1 name of ``kind``. Every existing parameter of
    ``model`` is frozen; the new factors are the only trainable ones and are
    returned (in model order: for each module ``A, B`` or ``A+, A-, B+, B-``).
    Initialisation is drawn from a generator seeded with ``seed`` (see the
    module docstring), independent of the global RNG, so the same call gives
    the same factors.
    """
    kind = kind_arg(kind) if method is None else kind_arg(method, "--method")
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    params: list[nn.Parameter] = []
    for n in names:
        base = model.get_submodule(n)
        layer = kind.layer(base, rank, alpha, generator=gen, dense=dense, **options)
        _set_submodule(model, n, layer)
        params.extend(p for p in layer.parameters() if p.requires_grad)
        for p in layer.base.parameters():
            p.requires_grad_(False)
    return params


def kind_arg(kind, flag: str = "--kind"):
    """The kind object for a ``--kind`` value, or a one-line usage error naming ``flag``."""
    try:
        return get_kind(kind)
    except ValueError as e:
        raise UsageError(flag, str(e)) from None


def extract_modules(model: nn.Module) -> dict[str, ModuleDelta]:
    """``{name: ModuleDelta}`` of the trainable layers, named as PEFT names them.

    ``name`` is the wrapper's path in the Hugging Face model (for instance
    ``transformer.h.0.attn.c_attn``), i.e. the original module's path.
    Factors are detached CPU copies.
    """
    return {n: m.module_delta(n) for n, m in wrapped_modules(model, TrainableLayer).items()}


def _entries_per_module(
    model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float] | None
) -> dict[str, list[tuple[float, ModuleDelta]]]:
    """Validate adapters against ``model``; group ``(weight, module)`` by module name.

    A module adapts a linear layer (``nn.Linear`` / ``Conv1D``), or an
    ``nn.Embedding`` when it holds embedding factors (``extra["layout"]``)
    of a kind defined there; anything else is refused in one line naming
    the module."""
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    adapters = list(adapters)
    weights = parse_weights(weights, len(adapters))
    check_default_targets(adapters, getattr(getattr(model, "config", None), "model_type", None))
    warn_unscaled_copies(adapters, weights)
    per: dict[str, list[tuple[float, ModuleDelta]]] = {}
    for ad, w in zip(adapters, weights):
        where = ad.path or ad.name
        for name, m in ad.modules.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(
                    where, f"module {name} is not in the base model: the adapter was made for another base"
                ) from None
            if isinstance(mod, LAYERS):
                mod = mod.base
            _check_module_type(where, name, mod, m)
            shape = tuple(weight_view(mod).shape)
            if tuple(m.shape) != tuple(shape):
                raise AdapterError(
                    where,
                    f"module {name} has shape {m.shape[0]}x{m.shape[1]} but the base model's is "
                    f"{shape[0]}x{shape[1]}: the adapter was made for another base",
                )
            per.setdefault(name, []).append((w, m))
    return per


def _check_module_type(where, name: str, mod: nn.Module, m: ModuleDelta) -> None:
    """``m`` must fit the base's module ``mod``: linear factors a linear layer,
    embedding factors an embedding (of a kind defined there)."""
    kind = type(mod).__name__
    if isinstance(mod, nn.Embedding):
        if not is_embedding(m):
            raise AdapterError(
                where, f"module {name} is a {kind} in the base model but the adapter holds linear-layer "
                "factors (lora_A/lora_B) for it, not lora_embedding_A/B",
            )  # fmt: skip
        if not m.kind.embedding:
            raise AdapterError(
                where, f"module {name} is a {kind} in the base model: {m.kind.label} on an embedding is "
                "not supported (loramix defines it on linear layers only)",
            )  # fmt: skip
        if mod.max_norm is not None:
            raise AdapterError(
                where, f"module {name}: an embedding with max_norm (renormalised lookups) is not supported"
            )
    elif not is_adaptable(mod):
        raise AdapterError(
            where, f"module {name} is a {kind} in the base model, not a linear layer or an embedding"
        )
    elif is_embedding(m):
        raise AdapterError(
            where,
            f"module {name} holds embedding factors (lora_embedding_A/B) but is a {kind} in the base model",
        )


def attach_adapters(
    model: nn.Module, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None
) -> nn.Module:
    """Apply loaded adapters on the fly: ``W0 + sum_i w_i * effective delta_i``.

    LoRA contributes ``s B A``; a D2 adapter ``W_hat - W0`` as its own
    definition gives it (each D2 adapter projects its own ``W0 + dW``). Linear
    modules get an :class:`AttachedLinear`, embeddings an
    :class:`AttachedEmbedding` (the input lookup only: a tied output head is
    left as it is, as PEFT does). Any loramix layers already in ``model`` are
    removed first (:func:`detach`, without merging). ``weights`` default to
    1. An adapter's ``modules_to_save`` copies stand in for their base
    parameters (a tied head is untied), as in PEFT; they are full copies,
    so weights do not scale them. Raises :class:`AdapterError` when a
    module is missing, its shape differs or its kind is not defined on its
    type of layer, or a ``modules_to_save`` entry has no copy. Returns
    ``model``; undo with :func:`detach`.
    """
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    per = _entries_per_module(model, adapters, weights)
    copies = _saved_per_param(model, adapters, per)
    detach(model)
    for name, entries in per.items():
        base = model.get_submodule(name)
        layer = AttachedEmbedding if isinstance(base, nn.Embedding) else AttachedLinear
        _set_submodule(model, name, layer(base, entries))
    model.__dict__[_SWAPPED] = _swap_in(model, copies)
    return model


@torch.no_grad()
def merge_into_model(
    model: nn.Module,
    adapters: Adapter | Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    keep_original: bool = False,
    stored=None,
) -> dict[str, torch.Tensor]:
    """Merge in memory: ``W = W0 + sum_i w_i * effective delta_i`` per module.

    Each effective delta is formed densely, one module at a time, in float64
    (:meth:`ModuleDelta.delta`), accumulated in float32 (float64 on a float64
    base, as the streaming engine does) and written back in the base weight's dtype, in place (transposed for ``Conv1D``; an
    embedding's ``(vocab, dim)`` as stored). A weight shared by two modules
    changes for both: merging an embedding LoRA into a model whose output
    head is tied to it changes the head too, as PEFT's ``merge_and_unload``
    does (on the fly, :func:`attach_adapters` changes the lookup only). With
    ``keep_original`` the returned dict holds CPU copies of the replaced
    weights, for :func:`restore_weights`; otherwise it is empty. The
    adapters' ``modules_to_save`` copies replace their parameters as in
    :func:`attach_adapters` (with ``keep_original`` the dict holds the
    replaced parameters themselves, under their names). A merged weight that
    would hold nan or inf in the model's dtype (a float16 model overflows
    beyond 65504) raises :class:`~loramix.errors.OutputError` naming it; the
    modules merged before it stay merged (discard the model).

    ``stored``: ``stored(name)`` gives module ``name``'s ``W0`` as its
    checkpoint stores it, ``(out, in)``, or None (then the model's own). A
    model loaded narrower than its checkpoint (bfloat16 from float32) holds
    ``round(W0)``; merging into that rounds twice, ``round(round(W0) +
    delta)``, which differs from the checkpoint merged and rounded once,
    ``round(W0 + delta)`` (what ``sum --into --dtype`` writes), in about one
    weight in ten by one bfloat16 step. With ``stored`` the sum starts from
    the checkpoint's ``W0`` (and a kind that reads ``W0``, DoRA's norms,
    reads that one) and is rounded once.

    Modules sharing one weight (an output head tied to the input embedding,
    both adapted) are merged one after the other in the model's module order,
    as PEFT's ``merge_and_unload`` does, into one sum ``W0 + delta_emb +
    delta_head`` (a kind that reads ``W0`` reads, for the later module, the
    sum so far, as PEFT's reads the weight the earlier merge wrote), rounded
    once: a bfloat16 model loaded from float32 holds the float32 merge
    rounded, not ``round(round(W0 + delta_emb) + delta_head)``.
    """
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    per = _entries_per_module(model, adapters, weights)
    copies = _saved_per_param(model, adapters, per)
    detach(model)
    originals: dict[str, torch.Tensor] = {}
    for names in _by_shared_weight(model, per):
        mod = model.get_submodule(names[0])
        W0 = weight_view(mod)  # (out, in) view; an embedding's (vocab, dim)
        if keep_original:
            originals.update((n, mod.weight.detach().cpu().clone()) for n in names)
        src = stored(names[0]) if stored is not None else None
        src = W0 if src is None else src.to(W0.device)
        # float32 rounded a float64 model's every merged weight (3e-8 from PEFT's float64 merge)
        cdt = torch.float64 if torch.float64 in (W0.dtype, src.dtype) else torch.float32
        acc = src.to(cdt).clone()
        for i, name in enumerate(names):
            # the W0 a tied module's later merge reads is the earlier one's result, as in PEFT
            seen = src if i == 0 else acc.clone()
            for w, m in per[name]:
                acc += (w * m.delta(seen, dtype=torch.float64, device=W0.device)).to(cdt)
        # a float16 model holds |x| <= 65504 only: an inf here gave a perplexity of nan, silently
        W0.copy_(check_output_finite(acc.to(W0.dtype), f"{names[0]}.weight"))
    swapped = _swap_in(model, copies)
    if keep_original:
        originals.update(swapped)
    return originals


def _by_shared_weight(model: nn.Module, per: dict) -> list[list[str]]:
    """The adapted module names of ``per`` grouped by the weight they hold:
    one name each, except modules sharing one parameter (a tied head and
    input embedding), which come together in the model's module order (the
    order of PEFT's ``merge_and_unload``)."""
    groups: dict[int, list[str]] = {}
    for name in per:
        groups.setdefault(id(model.get_submodule(name).weight), []).append(name)
    if all(len(g) == 1 for g in groups.values()):
        return list(groups.values())
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return [sorted(g, key=lambda n: order.get(n, len(order))) for g in groups.values()]


@torch.no_grad()
def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the weights :func:`merge_into_model` kept (``keep_original``)."""
    for name, w in originals.items():
        if isinstance(w, nn.Parameter):  # a modules_to_save copy's place: the parameter itself goes back
            _put_param(model, name, w)
            continue
        mod = model.get_submodule(name)
        if isinstance(mod, LAYERS):
            mod = mod.base
        mod.weight.copy_(w.to(device=mod.weight.device, dtype=mod.weight.dtype))


def detach(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove every loramix layer, putting the original modules back in place.

    With ``merge`` the trainable layers (LoRA, D2-LoRA) are folded into the
    base weight first (``W0 + s B A``, or ``W_hat``, computed in float64) and
    the model is left with plain modules that reproduce the adapted forward.
    Attached (loaded) adapters are simply removed; merge those with
    :func:`merge_into_model`. The base parameters keep ``requires_grad=False``.
    """
    for name, layer in wrapped_modules(model).items():
        if merge and isinstance(layer, TrainableLayer):
            with torch.no_grad():
                W = layer.merged_weight()
                layer.base_weight().copy_(narrow(W, layer.base.weight.dtype))
        _set_submodule(model, name, layer.base)
    for name, p in model.__dict__.pop(_SWAPPED, {}).items():
        _put_param(model, name, p)
    return model


#: where :func:`attach_adapters` keeps the parameters its ``modules_to_save``
#: copies stand in for, for :func:`detach` to put back
_SWAPPED = "_loramix_swapped_params"


def _saved_per_param(model: nn.Module, adapters, per: dict) -> dict[str, torch.Tensor]:
    """The adapters' ``modules_to_save`` copies, by the parameter of ``model``
    each replaces (``lm_head.weight``): the parameter must exist with the
    copy's shape, and its module must not be adapted too (PEFT wraps a module
    one way or the other)."""
    from .adapter import saved_copies
    from .io.peft_layout import check_copies_held

    if any(ad.config.get("modules_to_save") for ad in adapters):
        params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        for ad in adapters:
            check_copies_held(ad.path or ad.name, ad.config.get("modules_to_save"), params, ad.saved)
    out = {}
    for name, (t, ad) in saved_copies(adapters).items():
        where = ad.path or ad.name
        module, param = name.rsplit(".", 1)
        try:
            p = model.get_submodule(module).get_parameter(param)
        except AttributeError:
            raise AdapterError(
                where,
                f"modules_to_save tensor {name} is not in the base model: the adapter was made for another base",
            ) from None
        if tuple(p.shape) != tuple(t.shape):
            raise AdapterError(
                where,
                f"modules_to_save tensor {name} is {list(t.shape)} but the base model's is {list(p.shape)}",
            )
        if module in per:
            raise AdapterError(where, f"module {module} is both a LoRA module and a modules_to_save copy")
        out[name] = t
    return out


def _put_param(model: nn.Module, name: str, p: nn.Parameter) -> None:
    module, param = name.rsplit(".", 1)
    setattr(model.get_submodule(module), param, p)


def _swap_in(model: nn.Module, copies: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Put each copy in place of its parameter, as a new frozen parameter (so
    a head tied to the input embedding is untied, as PEFT's copy is its own);
    returns the parameters replaced."""
    old = {}
    for name, t in copies.items():
        module, param = name.rsplit(".", 1)
        p = model.get_submodule(module).get_parameter(param)
        old[name] = p
        _put_param(model, name, nn.Parameter(t.to(device=p.device, dtype=p.dtype), requires_grad=False))
    return old
