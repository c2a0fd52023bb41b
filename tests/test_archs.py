"""The per-architecture table: each entry's facts against a model transformers builds from a config."""

import pytest
import torch
import transformers

from loramix.archs import (
    ARCHS,
    context_length,
    fast_head_classes,
    is_conv1d,
    parameter_names,
    parameter_shapes,
)
from loramix.layers import default_targets, is_adaptable

# what every config below shares; TINY adds what the Llama family names alike
BASE = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64
)
TINY = dict(BASE, intermediate_size=32, num_key_value_heads=2)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=8),
    "olmo2": lambda: transformers.Olmo2Config(**TINY),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**BASE, intermediate_size=32),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
    "opt": lambda: transformers.OPTConfig(**BASE, ffn_dim=32, word_embed_proj_dim=16),
}


@pytest.mark.parametrize("model_type", [a for a in ARCHS if ARCHS[a].targets or ARCHS[a].fast_head])
def test_entry_matches_the_model(model_type):
    entry = ARCHS[model_type]
    cfg = CONFIGS[model_type]()
    assert cfg.model_type == model_type
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)}
    assert set(entry.targets) <= names, set(entry.targets) - names
    assert default_targets(model) == list(entry.targets)
    assert entry.fast_head == type(model).__name__
    assert context_length(model.config) == 64
    # the layout: a Conv1D architecture stores (in, out) projections
    conv = any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert is_conv1d(model_type) == conv
    # the fast head: logits are the head applied to the last hidden state
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        full = model(ids).logits
        h = model.base_model(ids)[0]
        fast = model.get_output_embeddings()(h)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    assert type(model).__name__ in fast_head_classes()


def test_unknown_architecture_has_no_facts():
    assert not is_conv1d("no-such-arch")
    assert context_length({"model_type": "x", "max_position_embeddings": 12}) == 12
    assert context_length({"model_type": "x"}) is None


def test_peft_targets_are_pefts_defaults():
    """:data:`loramix.peft_targets.PEFT_TARGETS` is PEFT's own default
    ``target_modules`` for every model type, entry by entry, and no type more
    or fewer: a peft that changes, adds or drops an entry fails here rather
    than loramix silently applying another rule than PEFT's."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    from loramix.peft_targets import PEFT_TARGETS, peft_default_targets

    def as_loramix(v):  # a list of names, or a regular expression PEFT keeps as a string
        return v if isinstance(v, str) else tuple(v)

    wrong = {t: (PEFT_TARGETS.get(t), PEFT.get(t)) for t in PEFT.keys() | PEFT_TARGETS.keys()
             if t not in PEFT or t not in PEFT_TARGETS or PEFT_TARGETS[t] != as_loramix(PEFT[t])}  # fmt: skip
    assert not wrong, f"model type: (loramix's, peft's): {wrong}"
    for model_type in [*ARCHS, "bloom", "t5", "gemma4", "no-such-arch", None]:
        want = PEFT.get(model_type)
        assert peft_default_targets(model_type) == (None if want is None else as_loramix(want)), model_type


# configs of the Llama-family types the GGUF import writes: tied and untied head, GQA
# (key-value heads 1 or 2 of 4), a head size other than width / heads, biases on and off
_SHAPED = dict(
    vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4
)
BLOCK_CONFIGS = [
    ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=10)),
    ("llama", dict(num_key_value_heads=1, attention_bias=True)),
    ("llama", dict(num_key_value_heads=2, mlp_bias=True, attention_bias=True, tie_word_embeddings=False)),
    ("mistral", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("mistral", dict(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=1, head_dim=10, tie_word_embeddings=False)),
    ("qwen3", dict(num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
    ("qwen3", dict(num_key_value_heads=1, tie_word_embeddings=False)),  # Qwen3Config's head_dim 128
    ("qwen3", dict(num_key_value_heads=4, head_dim=6, attention_bias=True)),
]


@pytest.mark.parametrize("model_type, extra", BLOCK_CONFIGS)
def test_parameter_shapes_are_the_models(model_type, extra):
    """:func:`parameter_shapes` (and :func:`parameter_names`) give the names,
    shapes and order of the ``state_dict()`` of the model transformers builds
    from the config, exactly: the GGUF import reads them instead of building
    that model (its modelling code: a second of the import's CPU)."""
    cfg = transformers.AutoConfig.for_model(model_type, **_SHAPED, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    want = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(parameter_shapes(cfg).items()) == want
    assert parameter_names(cfg) == [k for k, _ in want]
    flags = {k: v for k, v in extra.items() if k.endswith("bias")}
    assert parameter_names({"model_type": model_type, "num_hidden_layers": 2, **flags}) == [
        k for k, _ in want
    ]


def test_every_gguf_architecture_has_its_block():
    """Every model type the GGUF import writes has a ``block`` entry (the
    model skeleton is the import's fallback for none of them); another
    Llama-like type without one (olmo2: norms elsewhere) and GPT-2 give None."""
    from loramix.gguf_import import GGUF_ARCHITECTURES

    for model_type in [*GGUF_ARCHITECTURES, "mistral"]:
        assert ARCHS[model_type].block is not None, model_type
    for cfg in (CONFIGS["olmo2"](), CONFIGS["gpt2"](), {"model_type": "no-such-arch"}):
        assert parameter_shapes(cfg) is None and parameter_names(cfg) is None
    # the import's fallback for such a type: the meta-device model's own
    from loramix.gguf_import import _hf_shapes

    cfg = CONFIGS["olmo2"]()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert _hf_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
