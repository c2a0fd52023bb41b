"""The layout of each base module (``nn.Linear`` ``(out, in)`` or ``Conv1D``
``(in, out)``) decided without a model skeleton (issue 12, item 1), against
the real models transformers builds from configs: every architecture the
suite builds (tests/test_archs.py CONFIGS), a bare GPT-2 checkpoint, a GPT-2
with a square classification head, and square modules throughout."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from loramix.errors import BaseModelError
from loramix.io.model_folder import CONV1D, LINEAR, BaseModelFolder, build_skeleton

from .factories import tiny_gpt2
from .test_archs import CONFIGS


def _gpt2_square_head():
    # num_labels == n_embd: the Linear score head of a Conv1D architecture is square.
    cfg = CONFIGS["gpt2"]()
    cfg.num_labels = cfg.n_embd
    cfg.pad_token_id = 0
    return transformers.GPT2ForSequenceClassification(cfg)


MODELS = {
    **{t: (lambda t=t: transformers.AutoModelForCausalLM.from_config(CONFIGS[t]())) for t in CONFIGS},
    "gpt2-bare": lambda: transformers.GPT2Model(CONFIGS["gpt2"]()),
    "gpt2-square-head": _gpt2_square_head,
    "openai-gpt": lambda: transformers.OpenAIGPTLMHeadModel(
        transformers.OpenAIGPTConfig(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    ),
}


def _saved(name, folder):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _weight_modules(model, base):
    """``(checkpoint module name, module)`` of each Linear / Conv1D whose weight the checkpoint stores."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (Conv1D, torch.nn.Linear)) and name + ".weight" in base.tensors:
            out.append((name, mod))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layout_agrees_with_the_model_and_the_skeleton(name, tmp_path):
    model = _saved(name, tmp_path)
    base = BaseModelFolder(tmp_path)
    mods = _weight_modules(model, base)
    assert mods
    skeleton = build_skeleton(tmp_path)
    n_square = 0
    for mname, mod in mods:
        conv = isinstance(mod, Conv1D)
        W = mod.weight
        shape = (W.shape[1], W.shape[0]) if conv else tuple(W.shape)  # the adapter's (out, in)
        n_square += shape[0] == shape[1]
        truth = CONV1D if conv else LINEAR
        assert base.module_layout(mname) == truth, mname
        for ffo in (None, True, False):  # a known architecture: the table decides, whatever the adapter says
            assert base.module_weight_key(mname, shape, ffo) == (mname + ".weight", conv), mname
        sk = skeleton["layouts"]
        sk_name = mname if mname in sk else f"{skeleton['prefix']}.{mname}"
        if sk_name in sk:  # the skeleton (a causal LM) may lack a head this model has
            assert sk[sk_name] == truth, mname
    assert n_square > 0, "the model has no square module: the test would not test the table"
    assert base._skeleton is None  # decided without building the model


def test_gpt2_tied_head_found_without_skeleton(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path, safe_serialization=True)
    base = BaseModelFolder(tmp_path)
    assert "lm_head.weight" not in base.tensors
    with pytest.raises(BaseModelError) as e:
        base.module_weight_key("lm_head", (128, 32))
    # the tie first, the tensor the folder lacks after it
    assert e.value.problem.startswith(
        "adapter module lm_head is the output head, tied to transformer.wte.weight"
    )
    with pytest.raises(BaseModelError) as e:
        base.module_weight_key("transformer.h.0.attn.nope", (32, 32))
    assert "tied to" not in e.value.message
    assert base._skeleton is None


def _bloom(tmp_path):
    # Bloom is not in loramix's table: its layout comes from the adapter or the skeleton.
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model, BaseModelFolder(tmp_path)


def test_unknown_architecture_uses_the_adapters_fan_in_fan_out(tmp_path, capsys):
    model, base = _bloom(tmp_path)
    capsys.readouterr()  # transformers' own progress bar
    key = "transformer.h.0.self_attention.dense"
    assert base.module_weight_key(key, (16, 16), False) == (key + ".weight", False)
    assert base.module_weight_key(key, (16, 16), True) == (key + ".weight", True)
    assert base._skeleton is None
    assert capsys.readouterr().err == ""


def test_unknown_architecture_falls_back_on_the_skeleton_with_a_notice(tmp_path, capsys):
    model, base = _bloom(tmp_path)
    capsys.readouterr()
    key = "transformer.h.0.self_attention.dense"
    assert base.module_weight_key(key, (16, 16)) == (key + ".weight", False)
    assert base.module_weight_key("transformer.h.0.mlp.dense_4h_to_h", (16, 64)) == (
        "transformer.h.0.mlp.dense_4h_to_h.weight",
        False,
    )
    assert base._skeleton is not None and base._skeleton["built"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "bloom" in err[0] and "skeleton" in err[0] and key in err[0]
    base.module_layout("transformer.h.0.self_attention.query_key_value")
    assert capsys.readouterr().err == ""  # once per folder


@pytest.mark.parametrize(
    "entry", ["", "\0" * 8, "[]", "{}", '{"built": true, "prefix": null, "layouts": [], "tied": {}}']
)
def test_a_damaged_layout_in_the_cache_is_built_again(entry, tmp_path, monkeypatch):
    """``$LORAMIX_CACHE_DIR/layouts``: an entry that is not the JSON a build
    writes (empty, zeros, or JSON of another form, which failed with a bare
    KeyError or TypeError in every run) is built again and rewritten."""
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    _bloom(tmp_path / "bloom")
    key = "transformer.h.0.self_attention.dense"
    assert BaseModelFolder(tmp_path / "bloom").module_weight_key(key, (16, 16)) == (key + ".weight", False)
    (cached,) = (tmp_path / "cache" / "layouts").iterdir()
    good = cached.read_text()
    cached.write_text(entry)
    assert BaseModelFolder(tmp_path / "bloom").module_weight_key(key, (16, 16)) == (key + ".weight", False)
    assert cached.read_text() == good
