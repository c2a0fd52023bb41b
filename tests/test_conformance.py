"""Conformance across architectures (issue 13): for each one a tiny model built
from a config, two real PEFT adapters, and loramix's inspect, similarity,
``sum`` into the base, the summed adapter and ``ties`` against PEFT: the
similarity against cosines of PEFT's own ``get_delta_weight``, the sum
against PEFT's ``cat`` combination + ``merge_and_unload``, the adapter by
loading it with PEFT, ``ties`` against a dense float64 reference of one
module. Architectures this transformers cannot build are skipped, named."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from .factories import save_base

H = 32  # hidden size of every tiny model


def _cfg(name: str, **kw):
    import transformers

    return getattr(transformers, name)(**kw)


_DEC = dict(vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_LLAMA = dict(hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, **_DEC)  # fmt: skip
_QKV_DOWN = ["q_proj", "v_proj", "down_proj"]

# name -> (config class, config kwargs, model class, targets, save options)
ARCHS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=H, n_head=2, vocab_size=128, n_positions=64),
             "GPT2LMHeadModel", ["c_attn", "c_fc"], {}),
    "llama": ("LlamaConfig", _LLAMA, "LlamaForCausalLM", _QKV_DOWN, {}),
    "mistral": ("MistralConfig", _LLAMA, "MistralForCausalLM", _QKV_DOWN, {}),
    "qwen2-bias": ("Qwen2Config", _LLAMA, "Qwen2ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj"], {}),
    "qwen3": ("Qwen3Config", dict(_LLAMA, head_dim=8), "Qwen3ForCausalLM", _QKV_DOWN, {}),
    "gemma2-tied": ("Gemma2Config", dict(_LLAMA, head_dim=8, tie_word_embeddings=True), "Gemma2ForCausalLM",
                    ["q_proj", "o_proj", "up_proj"], {}),
    "gemma3-tied": ("Gemma3TextConfig", dict(_LLAMA, head_dim=8, tie_word_embeddings=True), "Gemma3ForCausalLM",
                    ["q_proj", "o_proj", "up_proj"], {}),
    "phi3-fused": ("Phi3Config", dict(_LLAMA, num_key_value_heads=4), "Phi3ForCausalLM",
                   ["qkv_proj", "gate_up_proj"], {}),
    "gpt-neox": ("GPTNeoXConfig", dict(hidden_size=H, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, **_DEC), "GPTNeoXForCausalLM", ["query_key_value", "dense_4h_to_h"], {}),
    "falcon": ("FalconConfig", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
               bos_token_id=0, eos_token_id=0), "FalconForCausalLM", ["query_key_value", "dense_h_to_4h"], {}),
    "opt": ("OPTConfig", dict(hidden_size=H, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=H, **_DEC), "OPTForCausalLM", ["q_proj", "fc1"], {}),
    "bloom": ("BloomConfig", dict(hidden_size=H, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0,
              eos_token_id=0), "BloomForCausalLM", ["query_key_value", "dense_4h_to_h"], {}),
    "gpt-bigcode": ("GPTBigCodeConfig", dict(n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
                    "GPTBigCodeForCausalLM", ["c_attn", "c_fc"], {}),
    "bert": ("BertConfig", dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=48, max_position_embeddings=64), "BertForMaskedLM", ["query", "value"], {}),
    "t5": ("T5Config", dict(vocab_size=128, d_model=H, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
           decoder_start_token_id=0), "T5ForConditionalGeneration", ["q", "v", "wo"], {}),
    "bart": ("BartConfig", dict(vocab_size=128, d_model=H, encoder_layers=1, decoder_layers=1,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
             max_position_embeddings=64), "BartForConditionalGeneration", ["q_proj", "fc1"], {}),
    "llama-sharded": ("LlamaConfig", _LLAMA, "LlamaForCausalLM", _QKV_DOWN, {"max_shard_size": "20KB"}),
    "llama-bf16": ("LlamaConfig", _LLAMA, "LlamaForCausalLM", _QKV_DOWN, {"bf16": True}),
}  # fmt: skip


def _model_class(name):
    import transformers

    return getattr(transformers, name)


def _build(arch, root):
    cfg_name, kw, cls_name, targets, opts = ARCHS[arch]
    try:
        cfg = _cfg(cfg_name, **kw)
        if arch == "qwen2-bias":
            pass  # Qwen2 has q/k/v biases by construction
        torch.manual_seed(0)
        model = _model_class(cls_name)(cfg).eval()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        pytest.skip(f"{arch}: this transformers cannot build it ({type(e).__name__}: {e})")
    if opts.get("bf16"):
        model = model.to(torch.bfloat16)
    base = root / "base"
    if opts.get("max_shard_size"):
        save_base(model, base, max_shard_size=opts["max_shard_size"])
    else:
        save_base(model, base)
    return model, base, targets


def _peft_adapter(model, folder, seed, targets):
    from peft import LoraConfig, get_peft_model

    fan = model.config.model_type == "gpt2"
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan)
    torch.manual_seed(seed)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(str(folder))
    return folder


def _inputs(model):
    ids = torch.arange(1, 17).reshape(2, 8)
    kw = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


def _logits(model):
    with torch.no_grad():
        return model(**_inputs(model)).logits.double()


def _load(cls_name, folder):
    return _model_class(cls_name).from_pretrained(str(folder)).eval()


def _peft_cat(cls_name, base, ads):
    """PEFT's exact sum: ``add_weighted_adapter(..., "cat")`` + ``merge_and_unload``."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_load(cls_name, base), str(ads[0]), adapter_name="a0")
    pm.load_adapter(str(ads[1]), adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "cat", combination_type="cat")
    pm.set_adapter("cat")
    return pm, pm.merge_and_unload().eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model, base, targets = _build(request.param, root)
    ads = [_peft_adapter(model, root / f"ad{i}", 10 + i, targets) for i in range(2)]
    return dict(name=request.param, cls=ARCHS[request.param][2], model=model, base=base, ads=ads, root=root)


def _tol(fx):
    return 5e-2 if ARCHS[fx["name"]][4].get("bf16") else 2e-4


def test_inspect_and_similarity(arch):
    from peft import PeftModel

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.overlap import similarity

    assert main(["inspect", str(arch["ads"][0])]) == 0
    ads = [load_adapter(a) for a in arch["ads"]]
    sim = similarity(ads, progress=False)
    # reference: cosines of PEFT's own deltas, float64
    deltas = []
    for a in arch["ads"]:
        pm = PeftModel.from_pretrained(_load(arch["cls"], arch["base"]), str(a))
        deltas.append({n.removeprefix("base_model.model."): mod.get_delta_weight("default").double()
                       for n, mod in pm.named_modules() if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})})  # fmt: skip
    cos2 = []
    for n, d0 in deltas[0].items():
        d1 = deltas[1][n]
        cos2.append(float((d0 * d1).sum() / (d0.norm() * d1.norm())) ** 2)
    ref = math.sqrt(sum(cos2) / len(cos2))
    names = list(sim.names)
    assert float(sim.rms.loc[names[0], names[1]]) == pytest.approx(ref, abs=1e-5)
    assert set(deltas[0]) == set(ads[0].modules)


def test_sum_into_base_equals_peft_cat(arch):
    from loramix.cli import main

    out = arch["root"] / "summed"
    assert (
        main(["sum", *map(str, arch["ads"]), "--into", str(arch["base"]), "--out", str(out), "--no-progress"])
        == 0
    )
    _, ref = _peft_cat(arch["cls"], arch["base"], arch["ads"])
    torch.testing.assert_close(_logits(_load(arch["cls"], out)), _logits(ref), rtol=0, atol=_tol(arch))


def test_sum_adapter_loads_in_peft(arch):
    from peft import PeftModel

    from loramix.cli import main

    out = arch["root"] / "summed-adapter"
    assert main(["sum", *map(str, arch["ads"]), "--out", str(out)]) == 0
    ours = PeftModel.from_pretrained(_load(arch["cls"], arch["base"]), str(out)).merge_and_unload().eval()
    _, ref = _peft_cat(arch["cls"], arch["base"], arch["ads"])
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=0, atol=_tol(arch))


def test_ties_into_base(arch):
    from loramix.io.adapter_files import load_adapter
    from loramix.io.model_folder import BaseModelFolder
    from loramix.methods import merge
    from loramix.methods.base import trim_

    out = arch["root"] / "ties"
    merge([str(a) for a in arch["ads"]], "ties", into=str(arch["base"]), out=out, density=0.5)
    ads = [load_adapter(a) for a in arch["ads"]]
    name = next(iter(ads[0].modules))
    t = [trim_(ad.modules[name].residual(), 0.5) for ad in ads]
    g = torch.where(t[0] + t[1] >= 0, 1.0, -1.0).double()
    keep = [(x * g > 0).double() for x in t]
    ref = (t[0] * keep[0] + t[1] * keep[1]) / (keep[0] + keep[1]).clamp(min=1)
    before, after = BaseModelFolder(arch["base"]), BaseModelFolder(out)
    W0 = before.read_module_weight(name, dtype=torch.float64)
    W = after.read_module_weight(name, dtype=torch.float64)
    tol = 2e-2 if ARCHS[arch["name"]][4].get("bf16") else 1e-6
    torch.testing.assert_close(W - W0, ref, rtol=0, atol=tol)
    assert torch.isfinite(_logits(_load(arch["cls"], out))).all()
