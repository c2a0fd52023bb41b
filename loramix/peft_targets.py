"""PEFT's default LoRA ``target_modules`` per ``model_type``: a table of facts.

PEFT (``peft/utils/constants.py``, ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``,
PEFT 0.21.2) puts its entry for the base's ``config.model_type`` in place of
a null (or absent) ``target_modules`` when it injects or loads a LoRA adapter
(``BaseTuner._prepare_adapter_config``), and then wraps only those modules:
the factors of any other module in the file are never applied. A type it has
no entry for raises ``ValueError("Please specify `target_modules` in
`peft_config`")``. An entry is a tuple of names (PEFT matches a module whose
full name is one of them or ends in ``"." + name``) or a string (a regular
expression PEFT matches against the whole module name, ``re.fullmatch``).

peft is a test dependency only, so the table is copied here, not imported;
``tests/test_archs.py`` checks it entry by entry against the installed peft,
so a peft that changes its table fails that test instead of disagreeing.
"""

from __future__ import annotations

_QV = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")

PEFT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV,
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": _QV,
    "gptj": _QV,
    "gpt_neox": ("query_key_value",),
    "gpt_neo": _QV,
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": _QUERY_VALUE,
    "llama": _QV,
    "llama4": _QV,
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


def peft_default_targets(model_type: str | None) -> tuple[str, ...] | str | None:
    """PEFT's default ``target_modules`` for ``model_type`` (:data:`PEFT_TARGETS`):
    a tuple of names, a regular expression, or None where PEFT has none (and
    refuses an adapter without ``target_modules`` on such a base)."""
    return PEFT_TARGETS.get(model_type or "")
