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
  embeddings to ``inputs_embeds``, so it may not.

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
class Arch:
    model_type: str
    targets: tuple[str, ...] = ()
    conv1d: bool = False
    fast_head: str | None = None
    context: str = "max_position_embeddings"
    prefix_cache: bool = False


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
        Arch("llama", _LLAMA_TARGETS, fast_head="LlamaForCausalLM", prefix_cache=True),
        Arch("mistral", _LLAMA_TARGETS, fast_head="MistralForCausalLM", prefix_cache=True),
        Arch("qwen2", _LLAMA_TARGETS, fast_head="Qwen2ForCausalLM", prefix_cache=True),
        Arch("qwen3", _LLAMA_TARGETS, fast_head="Qwen3ForCausalLM", prefix_cache=True),
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
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    a = arch(get("model_type"))
    for key in ([a.context] if a else []) + ["max_position_embeddings", "n_positions", "n_ctx"]:
        n = get(key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


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
