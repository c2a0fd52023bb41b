"""Frozen-prefix cache: run only the adapted top layers of a decoder.

A decoder-only causal LM of the Llama family with ``L`` blocks computes, for
token ids ``x`` of shape ``(B, T)`` and an attention mask ``m`` ``(B, T)``::

    h_0     = E[x]                                          (B, T, d)  no scale, no position term
    h_{i+1} = block_i(h_i; causal mask from m, rope(positions))         i = 0 .. L-1
    logits  = head(norm(h_L))                               (B, T, vocab)

When adapters sit only in blocks ``k .. L-1`` (the top ``N = L - k``), the
state entering block ``k``, ``h_k``, depends on the frozen embedding and
blocks ``0 .. k-1`` alone: it is the same for every adapter, every training
step and every merge. :func:`prefix_states` computes it once per example
(``(T_i, d)``, unpadded) and caches it; :func:`top_view` runs blocks
``k .. L-1``, the final norm and the head on it, by passing ``h_k`` as
``inputs_embeds`` to a view of the model whose block list is cut to
``blocks[k:]``. The rotary embedding and the causal mask are built from the
positions and ``m`` exactly as in the full forward, so the cached path is the
same computation (tests check logits and loss against the full forward to
1e-5). Right padding keeps it exact per example: a real position never
attends to a later one, so the cached states of padded positions (zeros
here) never reach a scored token.

Only architectures whose table entry says ``prefix_cache``
(:mod:`loramix.archs`) qualify: GPT-2 adds position embeddings to
``inputs_embeds`` inside the model, and Gemma scales them.

Cache: in this process (a bounded dictionary) and on disk under
``cache_dir()/prefix/<key>.safetensors`` (written atomically), keyed by
sha256 of the prefix's own weights (embedding and blocks ``0 .. k-1``, so a
folder with merged top layers shares its base's entries), the token ids and
labels of the examples (hence the data, tokenizer and ``max_len``), the
batching (batch size, cap on positions, order: a state's bits can depend on
its batch), ``k``, the dtype and the
torch/transformers versions. A file holds ``states``
``(sum_i T_i, d)`` and ``lengths`` ``(n,)``.

A union of data sets (``parts``: a training on several sources, a study's
merged-data adapter) is computed and cached part by part, each part batched
on its own as when it is passed alone: a state's bits can depend on the batch
it ran in (its padding, the matmul's row count; on a Zen 4 they did, on an
Intel Xeon with AMX not at the tests' shapes), so the union's states are then
the concatenation of its parts', bit for bit, and a union over parts already
cached runs no prefix at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

from .errors import UsageError

_MEMORY: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
#: the in-process cache (``prefix_cache="memory"``) keeps at most about 2 GiB of states; train's
#: held-out evaluation keeps its prefix states in memory only below it
MEMORY_BYTES = 2 << 30
# the digests of prefix weights, by the ids of their tensors (prefix_identity), used
# while a caller that owns its model says so (remembering_digests)
_DIGESTS: OrderedDict[tuple, tuple] = OrderedDict()
_REMEMBER = [0]


def supports_prefix(model) -> bool:
    """Whether ``model``'s architecture allows the cached path (``archs`` table)."""
    from .archs import arch

    a = arch(getattr(getattr(model, "config", None), "model_type", None))
    return bool(a and a.prefix_cache)


def blocks(model) -> nn.ModuleList:
    """The decoder's blocks, ``model.model.layers`` (Llama family), in order."""
    return model.base_model.layers


def split_point(model, top_layers: int, flag: str = "--top-layers") -> int:
    """``k = L - top_layers``: the first adapted block; checks the architecture and range
    (:func:`loramix.archs.top_layers_split`, which train and eval ask first of config.json)."""
    from .archs import top_layers_split

    return top_layers_split(
        getattr(model.config, "model_type", None), lambda: len(blocks(model)), top_layers, flag
    )


def _blocks_path(model) -> str:
    stack = blocks(model)
    return next(n for n, m in model.named_modules() if m is stack)


def layer_of(model, name: str) -> int | None:
    """The block index of module ``name`` (``model.layers.12.mlp.up_proj`` -> 12), or None."""
    m = re.match(re.escape(_blocks_path(model)) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def top_targets(model, targets, k: int) -> list[str]:
    """Full names of the modules ``targets`` selects (PEFT's rule) in blocks ``k`` and up.
    An entry of a target list that selects nothing there (``lm_head``, outside
    the blocks; a module of a lower block named in full) is refused, naming it,
    as ``eval --top-layers`` refuses an adapter on such a module."""
    from .layers import find_targets, unmatched_targets

    # layer_of is None outside the blocks and 0 in the first one: compare with None, not by truth
    names = [n for n in find_targets(model, targets) if (i := layer_of(model, n)) is not None and i >= k]
    if not names:
        raise UsageError("--top-layers", f"no target module in layers {k} and up")
    if targets is not None and not isinstance(targets, str):
        missing = unmatched_targets(names, targets)
        if missing:
            raise UsageError(
                "--top-layers",
                f"target {', '.join(map(repr, missing))} selects no module in the top layers ({k} and up), "
                "so it would be left out; drop it from --targets",
            )
    return names


def check_top_only(model, names, k: int, where) -> None:
    """Refuse an adapter that changes a module below block ``k`` or outside the
    blocks (the input embedding, say): the prefix ``h_k`` would not be frozen,
    and a cached one would be wrong."""
    for n in names:
        i = layer_of(model, n)
        if i is None or i < k:
            raise UsageError(
                "--top-layers",
                f"{where}: module {n} is not in the top layers ({k} and up): the cached prefix depends on it",
            )


def lowest_block(model, names) -> int | None:
    """``k``, the lowest block holding a module of ``names``, when every one of
    them is in a block, ``k > 0`` and the architecture has the cached path
    (:func:`supports_prefix`); else None. Adapters on those modules leave the
    state entering block ``k``, ``h_k``, as the base computes it."""
    if not names or not supports_prefix(model):
        return None
    at = [layer_of(model, n) for n in names]
    if any(i is None for i in at) or min(at) == 0:
        return None
    return min(at)


@contextmanager
def states_entering(model, k: int):
    """Within it, each forward of ``model`` appends ``h_k``, the hidden state
    entering block ``k`` ``(B, T, d)`` (padded positions included), to the
    list it yields: the full forward's own tensor, so :func:`top_view` fed it
    as ``inputs_embeds`` with the same mask repeats the full forward's
    computation of blocks ``k ..`` exactly."""
    got: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        got.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = blocks(model)[k].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()


def _view(module: nn.Module, **children) -> nn.Module:
    """A shallow copy of ``module`` with some children replaced; parameters are shared."""
    v = copy.copy(module)
    v._modules = dict(module._modules)
    v._modules.update(children)
    return v


def _config_for(config, lo: int, hi: int):
    """The config as blocks ``lo .. hi-1`` see it: a per-layer ``layer_types`` list is cut
    too (Qwen indexes it by position in the block list), and no key/value cache
    (its layer indices are those of the full model)."""
    c = copy.copy(config)
    c.use_cache = False
    types = getattr(config, "layer_types", None)
    if types:
        c.layer_types = list(types)[lo:hi]
    return c


def prefix_view(model, k: int) -> nn.Module:
    """The base model (no head) running blocks ``0 .. k-1`` and no final norm:
    ``prefix_view(model, k)(input_ids, attention_mask).last_hidden_state`` is ``h_k``."""
    body = model.base_model
    v = _view(body, layers=nn.ModuleList(list(body.layers)[:k]), norm=nn.Identity())
    v.config = _config_for(body.config, 0, k)
    return v


def top_view(model, k: int) -> nn.Module:
    """The causal LM running blocks ``k .. L-1``, the norm and the head on
    ``inputs_embeds = h_k``; same class as ``model`` (so the fast head applies)."""
    body = model.base_model
    n = len(body.layers)
    top_body = _view(body, layers=nn.ModuleList(list(body.layers)[k:]))
    top_body.config = _config_for(body.config, k, n)
    name = next(n for n, m in model.named_children() if m is body)
    v = _view(model, **{name: top_body})
    v.train(model.training)
    return v


# --------------------------------------------------------------------------- the cache


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


def _prefix_tensors(model, k: int) -> list[tuple[str, torch.Tensor]]:
    """The named parameters and buffers ``h_k`` depends on: the input
    embedding's and blocks ``0 .. k-1``'s, in a fixed order."""
    body = model.base_model
    parts = [("embed", body.get_input_embeddings())] + [(f"block{i}", body.layers[i]) for i in range(k)]
    return [(f"{prefix}.{name}", t) for prefix, mod in parts
            for name, t in [*mod.named_parameters(), *mod.named_buffers()]]  # fmt: skip


def copy_sharing_prefix(model, k: int) -> nn.Module:
    """``copy.deepcopy(model)`` whose input embedding and blocks ``0 .. k-1``
    hold ``model``'s own parameter and buffer tensors (a tied head shares the
    embedding's, as in ``model``); every other tensor is copied. ``h_k``
    depends on those tensors alone, and an adapter on blocks ``k`` and up
    never writes them (:func:`check_top_only`), so a training of the copy
    leaves them as they are: the copy costs the memory of the blocks from
    ``k`` up only, and :func:`prefix_identity` of the copy is the held
    model's remembered digest (the same tensor objects), not a second hash."""
    memo = {id(t): t for _, t in _prefix_tensors(model, k)}
    return copy.deepcopy(model, memo)


def _tensor_stamp(t: torch.Tensor) -> tuple | None:
    """What says ``t`` still holds the bytes it held: its version counter (bumped
    by every in-place write through it), storage address, shape, strides and
    dtype. None for a tensor without a version counter (an inference tensor)."""
    try:
        return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
    except RuntimeError:
        return None


def prefix_identity(model, k: int) -> str:
    """sha256 of what ``h_k`` depends on: the config (less its ``_`` keys, such
    as the folder's path) and the embedding's and blocks ``0 .. k-1``'s
    parameters and buffers (names, dtypes, shapes, bytes).

    Hashing those bytes (about 0.5 GB on SmolLM2) takes about 0.4 s, and a
    study asks for the same model's identity once per evaluation and data
    set: inside :func:`remembering_digests` the weights' digest is
    remembered for the very tensor objects it was taken of (weak references),
    and reused while each one's version counter, storage, shape, strides and
    dtype are unchanged, which every in-place write through the tensor or a
    view of it, a ``load_state_dict``, a ``.to()`` or a new parameter
    changes. A write through ``.data`` bypasses the version counter, so only
    a caller that owns its model (a study's base, which nothing writes)
    turns this on; any other call hashes the bytes."""
    import transformers

    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    # not "_name_or_path" and the like: a merged copy of the base elsewhere shares the entries
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    head = (
        json.dumps(cfg, sort_keys=True, default=str)
        + f"torch {torch.__version__} transformers {transformers.__version__}"
    )
    named = _prefix_tensors(model, k)
    stamps = [(name, _tensor_stamp(t)) for name, t in named]
    memo_key = (head, tuple(id(t) for _, t in named))
    got = _DIGESTS.get(memo_key) if _REMEMBER[0] else None
    if got is not None and got[1] == stamps and all(r() is t for r, (_, t) in zip(got[0], named)):
        _DIGESTS.move_to_end(memo_key)
        return got[2]
    h = hashlib.sha256(head.encode())
    for name, t in named:
        h.update(name.encode())
        _hash_tensor(h, t)
    digest = h.hexdigest()
    if _REMEMBER[0] and all(s is not None for _, s in stamps):
        _DIGESTS[memo_key] = ([weakref.ref(t) for _, t in named], stamps, digest)
        while len(_DIGESTS) > 8:
            _DIGESTS.popitem(last=False)
    return digest


@contextmanager
def remembering_digests():
    """Within it, :func:`prefix_identity` reuses a digest while the weights'
    stamps hold. For a caller whose models no one writes through ``.data``."""
    _REMEMBER[0] += 1
    try:
        yield
    finally:
        _REMEMBER[0] -= 1


#: examples per batch of the prefix's forward where the caller names none
BATCH_SIZE = 16

#: the order :func:`compute_states` cuts its batches in, part of the cache key: entries
#: cached when it cut them shortest first (other batches, maybe other bits) are not served
ORDER = "longest-first"


def examples_sha256(examples: list[dict]) -> str:
    """sha256 of the encoded examples' ``input_ids`` and ``labels``."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(model, k: int, examples: list[dict], *, dtype=None, identity: str | None = None,
              batch_size: int = BATCH_SIZE, max_tokens: int | None = None) -> str:  # fmt: skip
    """The key of one cache entry (module docstring); ``identity``: :func:`prefix_identity`
    of ``model`` and ``k`` where the caller has it (the parts of a union share one).
    ``batch_size`` is in it: a state's bits can depend on the batch it ran in, and
    without it states batched one way were served to a run batching another,
    whose own computation gives other bits; so are ``max_tokens`` and the
    order the batches are cut in (:data:`ORDER`)."""
    parts = {
        "prefix": identity or prefix_identity(model, k),
        "data": examples_sha256(examples),
        "batch_size": int(batch_size),
        "k": k,
        "dtype": str(dtype or next(model.parameters()).dtype),
        "device": next(model.parameters()).device.type,
        "max_tokens": int(max_tokens) if max_tokens else None,
        "order": ORDER,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@torch.inference_mode()
def compute_states(model, k: int, examples: list[dict], *, batch_size: int = BATCH_SIZE, pad_id: int = 0,
                   autocast=None, progress: bool = False, max_tokens: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """``h_k`` per example, ``(T_i, d)``, on the CPU; batches sorted by length,
    longest first (little padding, and a batch too large for the memory fails
    at once) of at most ``batch_size`` examples and ``max_tokens``
    positions (:func:`loramix.data.make_batches`), ``autocast`` a dtype to
    compute in (or None); ``progress``:
    a bar of the examples run, on stderr where it is a terminal."""
    import sys

    from .data import make_batches
    from .progress import progress_bar

    dev = next(model.parameters()).device
    pre = prefix_view(model, k)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    ordered = [examples[i] for i in order]
    batches = make_batches(ordered, batch_size=batch_size, pad_id=pad_id, max_tokens=max_tokens)
    out: list[torch.Tensor | None] = [None] * len(examples)
    j = 0
    bar = progress_bar(total=len(examples), unit="record", desc=f"prefix (layers 0-{k - 1}, once)",
                       file=sys.stderr, progress=progress, leave=False, dynamic_ncols=True)  # fmt: skip
    for b in batches:
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            h = pre(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        h = h.float().cpu() if autocast is not None else h.cpu()
        for row in range(h.shape[0]):
            n = int(mask[row].sum())
            out[order[j]] = h[row, :n].clone()
            j += 1
        bar.update(h.shape[0])
    bar.close()
    return out  # type: ignore[return-value]


def prefix_states(model, k: int, examples: list[dict], *, batch_size: int = BATCH_SIZE, pad_id: int = 0,
                  cache: str | None = "disk", autocast=None, progress: bool = False,
                  parts: list[int] | None = None, max_tokens: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Cached :func:`compute_states`: ``cache`` is ``"disk"`` (this process's
    memory, then ``cache_dir()/prefix``), ``"memory"`` or None (compute).

    ``parts``: the sizes ``n_1 .. n_p`` (summing to ``len(examples)``) of
    consecutive runs of ``examples``, a union's sources in the order it
    concatenates them; each run is computed (batched among its own examples
    alone) and cached on its own, so the result is the concatenation of
    ``prefix_states(model, k, run_j)`` for each ``j``, bit for bit, whatever
    ``cache`` (module docstring). None: one part, the whole list."""
    sizes = [len(examples)] if parts is None else [int(n) for n in parts]
    if any(n < 0 for n in sizes) or sum(sizes) != len(examples):
        raise ValueError(f"parts {sizes} do not cut {len(examples)} examples")
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    runs = [examples[s : s + n] for s, n in zip(starts, sizes) if n]
    kw = dict(
        batch_size=batch_size, pad_id=pad_id, autocast=autocast, progress=progress, max_tokens=max_tokens
    )
    if cache is None:
        return [h for run in runs for h in compute_states(model, k, run, **kw)]
    # one hash of the prefix's weights for every part (0.4 s each on SmolLM2)
    identity = prefix_identity(model, k) if runs else None
    return [h for run in runs for h in _cached_states(model, k, run, cache=cache, identity=identity, **kw)]


def _cached_states(
    model, k: int, examples: list[dict], *, cache: str, identity: str, **kw
) -> list[torch.Tensor]:
    """:func:`compute_states` of ``examples`` (one part), from the memory or disk cache where it is there."""
    key = cache_key(model, k, examples, dtype=kw["autocast"], identity=identity, batch_size=kw["batch_size"],
                    max_tokens=kw["max_tokens"])  # fmt: skip
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    states = _read(key) if cache == "disk" else None
    if states is None:
        states = compute_states(model, k, examples, **kw)
        if cache == "disk":
            _write(key, states)
    _remember(key, states)
    return states


def _remember(key: str, states: list[torch.Tensor]) -> None:
    _MEMORY[key] = states
    size = lambda v: sum(t.numel() * t.element_size() for t in v)  # noqa: E731
    while len(_MEMORY) > 1 and sum(size(v) for v in _MEMORY.values()) > MEMORY_BYTES:
        _MEMORY.popitem(last=False)


def _path(key: str):
    from .io.model_folder import cache_dir

    return cache_dir() / "prefix" / f"{key}.safetensors"


def _read(key: str) -> list[torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _path(key)
    if not path.is_file():
        return None
    try:
        d = load_file(str(path))
        states, lengths = d["states"], d["lengths"].tolist()
    except (OSError, KeyError, SafetensorError):
        return None  # a damaged entry is recomputed (and rewritten)
    if sum(lengths) != states.shape[0]:
        return None
    return list(torch.split(states, lengths))


def _write(key: str, states: list[torch.Tensor]) -> None:
    from safetensors.torch import save

    from .io.outputs import atomic_write

    blob = save({"states": torch.cat(states).contiguous(),
                 "lengths": torch.tensor([s.shape[0] for s in states], dtype=torch.long)})  # fmt: skip
    try:
        with atomic_write(_path(key), "wb") as f:
            f.write(blob)
    except OSError:
        pass  # a read-only cache only costs the recomputation


def clear_memory() -> None:
    """Forget the in-process entries and weight digests (tests; a caller short of
    memory, or one that wrote a model's weights through ``.data``)."""
    _MEMORY.clear()
    _DIGESTS.clear()
