"""What loramix knows about each architecture, in one table keyed by ``model_type``.

A new architecture is one entry here (plus its test in ``tests/test_archs.py``):

* ``targets``: the default LoRA target modules (PEFT's defaults plus the MLP:
  every projection in a block);
* ``conv1d``: whether the checkpoint stores projections as GPT-2 ``Conv1D``
  (``in x out``) rather than ``nn.Linear`` (``out x in``); decides the layout
  of a square module without building a model;
* ``fast_head``: the causal-LM class whose logits are exactly
  ``get_output_embeddings()(base_model(...)[0])`` (nothing between the last
  hidden state and the head), so evaluation can project only the scored
  positions;
* ``context``: the config key holding the number of positions;
* ``prefix_cache``: whether the hidden state entering block ``k`` can be fed
  back as ``inputs_embeds`` to the model cut to blocks ``k..L-1`` with the
  same result (:mod:`loramix.prefix`): true for the Llama family, whose
  embedding is neither scaled nor given position terms; GPT-2 adds position
  embeddings to ``inputs_embeds``, so it may not;
* ``block``: for a Llama-family decoder (:class:`LlamaBlock`), what varies in
  its parameters, so that :func:`parameter_shapes` gives the model's
  ``state_dict()`` names and shapes from the config without transformers'
  modelling code (the GGUF import: :mod:`loramix.gguf_import`).

Architectures missing here still work: targets fall back to any known name
present in the model, the layout to the model skeleton, evaluation to the
full forward. PEFT's own default ``target_modules`` (what it puts in place of
a null one) are PEFT's facts, for every type it knows: :mod:`loramix.peft_targets`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError

_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaBlock:
    """What varies in a Llama-family decoder block's parameters. A bias is
    ``True``/``False`` where the architecture fixes it, or the name of the
    config flag that decides it (absent: False, every such config's default).
    ``qk_norm``: a per-head RMSNorm weight (``head_dim``) on queries and keys."""

    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    qk_norm: bool = False


@dataclass(frozen=True)
class Arch:
    model_type: str
    targets: tuple[str, ...] = ()
    conv1d: bool = False
    fast_head: str | None = None
    context: str = "max_position_embeddings"
    prefix_cache: bool = False
    block: LlamaBlock | None = None


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch(
            "gpt2",
            ("c_attn", "c_proj", "c_fc"),
            conv1d=True,
            fast_head="GPT2LMHeadModel",
            context="n_positions",
        ),
        Arch("openai-gpt", conv1d=True, context="n_positions"),
        Arch("imagegpt", conv1d=True, context="n_positions"),
        Arch("decision_transformer", conv1d=True, context="n_positions"),
        Arch(
            "llama",
            _LLAMA_TARGETS,
            fast_head="LlamaForCausalLM",
            prefix_cache=True,
            block=LlamaBlock("attention_bias", "attention_bias", "mlp_bias"),
        ),
        Arch(
            "mistral", _LLAMA_TARGETS, fast_head="MistralForCausalLM", prefix_cache=True, block=LlamaBlock()
        ),
        Arch(
            "qwen2",
            _LLAMA_TARGETS,
            fast_head="Qwen2ForCausalLM",
            prefix_cache=True,
            block=LlamaBlock(qkv_bias=True),
        ),
        Arch(
            "qwen3",
            _LLAMA_TARGETS,
            fast_head="Qwen3ForCausalLM",
            prefix_cache=True,
            block=LlamaBlock("attention_bias", "attention_bias", qk_norm=True),
        ),
        Arch("olmo2", _LLAMA_TARGETS, fast_head="Olmo2ForCausalLM", prefix_cache=True),
        Arch(
            "gpt_neox",
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            fast_head="GPTNeoXForCausalLM",
        ),
        Arch("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), fast_head="Phi3ForCausalLM"),
        Arch("opt", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), fast_head="OPTForCausalLM"),
    ]
}


def arch(model_type: str | None) -> Arch | None:
    """The table entry for ``model_type``, or None for an architecture loramix has no facts on."""
    return ARCHS.get(model_type or "")


def is_conv1d(model_type: str | None) -> bool:
    a = arch(model_type)
    return bool(a and a.conv1d)


def fast_head_classes() -> frozenset[str]:
    return frozenset(a.fast_head for a in ARCHS.values() if a.fast_head)


def context_length(config) -> int | None:
    """Number of positions of a transformers config (object or dict), or None if it has none."""
    get = _getter(config)
    a = arch(get("model_type"))
    for key in ([a.context] if a else []) + ["max_position_embeddings", "n_positions", "n_ctx"]:
        n = get(key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _getter(config) -> Callable:
    """``get(key, default)`` of a transformers config object or a dict."""
    return config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))


def _llama_layout(config) -> list[tuple[str, str]] | None:
    """``(parameter name, shape kind)`` of a Llama-family causal LM in its
    ``state_dict()`` order, or None for a model type without a ``block``
    entry. Needs only ``model_type``, ``num_hidden_layers`` and the bias flags."""
    get = _getter(config)
    a = arch(get("model_type"))
    if a is None or a.block is None:
        return None
    b = a.block

    def on(flag: bool | str) -> bool:
        return bool(get(flag, False)) if isinstance(flag, str) else flag

    def linear(name: str, kind: str, bias: bool) -> list[tuple[str, str]]:
        return [(f"{name}.weight", kind)] + ([(f"{name}.bias", kind)] if bias else [])

    block = [
        *linear("self_attn.q_proj", "q", on(b.qkv_bias)),
        *linear("self_attn.k_proj", "kv", on(b.qkv_bias)),
        *linear("self_attn.v_proj", "kv", on(b.qkv_bias)),
        *linear("self_attn.o_proj", "o", on(b.o_bias)),
    ]
    block += [("self_attn.q_norm.weight", "head"), ("self_attn.k_norm.weight", "head")] if b.qk_norm else []
    for part, kind in (("gate_proj", "up"), ("up_proj", "up"), ("down_proj", "down")):
        block += linear(f"mlp.{part}", kind, on(b.mlp_bias))
    block += [("input_layernorm.weight", "norm"), ("post_attention_layernorm.weight", "norm")]
    layers = [(f"model.layers.{i}.{n}", k) for i in range(int(get("num_hidden_layers"))) for n, k in block]
    return [("model.embed_tokens.weight", "embed"), *layers, ("model.norm.weight", "norm"),
            ("lm_head.weight", "embed")]  # fmt: skip


def parameter_names(config) -> list[str] | None:
    """The ``state_dict()`` names of the causal LM a config (object or dict)
    makes, for a model type with a ``block`` entry (the Llama family), else
    None: from ``model_type``, ``num_hidden_layers`` and the bias flags
    alone. ``lm_head.weight`` is listed tied or not, as ``state_dict()``
    lists the tied head (one tensor under two names)."""
    layout = _llama_layout(config)
    return None if layout is None else [name for name, _ in layout]


def parameter_shapes(config) -> dict[str, tuple[int, ...]] | None:
    """``{state_dict() name: shape}`` of the causal LM a config (object or
    dict) makes, in its order, for a model type with a ``block`` entry, else
    None (the caller builds the model skeleton instead). With width ``h``,
    heads ``n``, key-value heads ``g`` (GQA; default ``n``), head size ``d =
    head_dim`` (where given; else ``h / n``), MLP width ``f`` and vocabulary
    ``V``: ``q_proj`` ``(n d, h)``, ``k_proj``/``v_proj`` ``(g d, h)``,
    ``o_proj`` ``(h, n d)``, ``gate_proj``/``up_proj`` ``(f, h)``,
    ``down_proj`` ``(h, f)``, a bias the rows of its weight, the norms
    ``(h,)``, ``q_norm``/``k_norm`` ``(d,)``, the embedding and head ``(V, h)``."""
    layout = _llama_layout(config)
    if layout is None:
        return None
    get = _getter(config)
    h, n, f, v = (
        int(get(k)) for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    )
    g, d = int(get("num_key_value_heads", None) or n), int(get("head_dim", None) or h // n)
    kinds = {"q": (n * d, h), "kv": (g * d, h), "o": (h, n * d), "up": (f, h), "down": (h, f), "norm": (h,),
             "head": (d,), "embed": (v, h)}  # fmt: skip
    return {name: kinds[kind][:1] if name.endswith(".bias") else kinds[kind] for name, kind in layout}


def top_layers_split(model_type: str | None, n_layers: Callable[[], int], top_layers: int,
                     flag: str = "--top-layers") -> int:  # fmt: skip
    """``k = L - top_layers``: the first block a run on the top ``top_layers``
    blocks of a model of ``L`` blocks adapts. ``n_layers()`` gives ``L``,
    asked for only once the architecture allows the frozen-prefix cache
    (``prefix_cache``). One line for another architecture or a ``top_layers``
    outside ``[1, L]``."""
    a = arch(model_type)
    if not (a and a.prefix_cache):
        raise UsageError(
            flag, f"model type {model_type!r} does not allow the frozen-prefix cache (loramix.archs)"
        )
    n = n_layers()
    if not 1 <= int(top_layers) <= n:
        raise UsageError(flag, f"must be between 1 and the model's {n} layers, got {top_layers}")
    return n - int(top_layers)


def check_top_layers(config: dict, top_layers: int | None, flag: str = "--top-layers") -> None:
    """:func:`top_layers_split`'s checks from a base's ``config.json``, before
    the model (and torch) loads, where the config decides them: a model type
    in the table (transformers builds it) and, for the frozen-prefix cache,
    the block count in ``num_hidden_layers`` (the Llama family's; the model
    has that many). Otherwise they wait for the model (``prefix.split_point``)."""
    a, n = arch(config.get("model_type")), config.get("num_hidden_layers")
    known = isinstance(n, int) and not isinstance(n, bool) and n > 0
    if top_layers is None or a is None or (a.prefix_cache and not known):
        return
    top_layers_split(a.model_type, lambda: n, top_layers, flag)
