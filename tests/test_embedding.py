"""Embedding LoRA in memory (``attach_adapters``, ``merge_into_model``, ``loramix eval``)
against real PEFT: on the fly equal to PEFT's ``lora.Embedding`` forward, merged
equal to PEFT's ``merge_and_unload``, tied heads as PEFT treats them (the lookup
only on the fly, the shared weight when merged), several adapters weighted, DoRA
on an embedding, what is refused, and the frozen-prefix cache never reused for
an adapted embedding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix.adapter import Adapter, ModuleDelta
from loramix.errors import AdapterError, UsageError
from loramix.io.adapter_files import load_adapter
from loramix.layers import (
    AttachedEmbedding,
    attach_adapters,
    detach,
    merge_into_model,
    restore_weights,
    wrapped_modules,
)

from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
# an embedding (tied to the head in GPT-2) and one linear module per architecture
TARGETS = {tiny_gpt2: ["wte", "c_attn"], tiny_llama: ["embed_tokens", "q_proj"]}
EMB = {tiny_gpt2: "transformer.wte", tiny_llama: "model.embed_tokens"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def edit_tensors(folder: Path, edit) -> Path:
    """Rewrite a saved adapter's tensors, ``edit(key, t) -> t``."""
    f = folder / "adapter_model.safetensors"
    ts = load_file(str(f))
    save_file({k: edit(k, v).contiguous() for k, v in ts.items()}, str(f))
    return folder


def emb_adapter(model_fn, folder, seed, targets=None, dora=False, **kw) -> Path:
    """A PEFT adapter on the embedding (and a linear module) with random
    non-zero factors. PEFT draws the embedding factors from N(0, 1) with
    ``init_lora_weights=False``; they are shrunk (the delta by 1e-2) so the
    adapted embedding stays the size of the base's. DoRA magnitudes are
    moved off their init (``||W0 + dW||``, which would make DoRA a LoRA)."""
    g = torch.Generator().manual_seed(seed + 100)

    def edit(k, t):
        if "lora_embedding" in k:
            return t * 0.1
        if k.endswith("lora_magnitude_vector"):
            return t * (1 + 0.3 * torch.rand(t.shape, generator=g))
        return t

    a = make_peft_adapter(
        model_fn(), folder, seed=seed, target_modules=targets or TARGETS[model_fn], use_dora=dora, **kw
    )
    return edit_tensors(a, edit)


def peft_model(model_fn, adapters, weights=None):
    """PEFT's own model with ``adapters`` active together, adapter ``i``'s
    scale multiplied by ``weights[i]`` (so its forward is ``sum_i w_i s_i B_i A_i``)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model_fn(), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    if len(adapters) > 1:
        pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for i, w in enumerate(weights or []):
        for mod in pm.modules():
            if isinstance(getattr(mod, "scaling", None), dict) and f"a{i}" in mod.scaling:
                mod.scaling[f"a{i}"] *= w
    return pm.eval()


def assert_same_weights(ours, ref, tol=1e-6):
    sd = ref.state_dict()
    for n, p in ours.state_dict().items():
        assert rel(p, sd[n]) < tol, n


# ---------------------------------------------------------------- LoRA on an embedding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama], ids=["gpt2-tied", "llama"])
def test_embedding_lora_on_a_half_base_rounds_as_peft(tmp_path, model_fn, dtype):
    """On a bfloat16/float16 base the adapted lookup adds the float32 term to
    the base's row and rounds once, as PEFT's ``lora.Embedding`` does with
    its float32 factors (and as loramix's linear layers do): PEFT's bits but
    where the two float32 sums fall on either side of a rounding boundary.
    The factors and the term were rounded to the base's dtype, and the sum
    again."""
    from peft import PeftModel

    folder = emb_adapter(model_fn, tmp_path / "a", seed=1, targets=TARGETS[model_fn][:1], r=8, lora_alpha=16)
    pm = PeftModel.from_pretrained(model_fn().to(dtype), str(folder)).eval()
    ours = attach_adapters(model_fn().to(dtype), [load_adapter(folder)])
    ids = torch.arange(128).reshape(4, 32)
    with torch.no_grad():
        got = ours.get_submodule(EMB[model_fn])(ids)
        want = pm.base_model.model.get_submodule(EMB[model_fn])(ids)
    assert got.dtype == want.dtype == dtype
    assert (got != want).float().mean() < 0.02
    assert ((got - want).abs() <= torch.finfo(dtype).eps * want.abs()).all()


@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama], ids=["gpt2-tied", "llama"])
@pytest.mark.parametrize("weights", [None, [0.7, -0.4]], ids=["one", "two-weighted"])
def test_embedding_lora_on_the_fly_and_merged_equal_peft(tmp_path, model_fn, weights):
    """(a) ``attach_adapters`` gives PEFT's on-the-fly logits; (b)
    ``merge_into_model`` gives PEFT's ``merge_and_unload`` weights; (d) two
    adapters with weights compose as ``sum_i w_i s_i B_i A_i`` (PEFT with both
    active, each scale times its weight). GPT-2 ties ``lm_head`` to ``wte``:
    on the fly only the lookup changes, merged the shared weight (both), as in PEFT."""
    folders = [emb_adapter(model_fn, tmp_path / "a", seed=1, r=3, lora_alpha=5)]
    if weights:  # a second one on the embedding only, another rank
        folders.append(emb_adapter(model_fn, tmp_path / "b", seed=2, targets=TARGETS[model_fn][:1], r=2))
    ads = [load_adapter(f) for f in folders]
    assert ads[0].modules[EMB[model_fn]].extra["layout"] == "embedding"

    ours = attach_adapters(model_fn(), ads, weights)
    emb = ours.get_submodule(EMB[model_fn])
    assert isinstance(emb, AttachedEmbedding) and ours.get_input_embeddings() is emb
    pm = peft_model(model_fn, folders, weights)
    base_logits = logits(model_fn())
    assert rel(logits(ours), base_logits) > 1e-2  # the adapters do change the model
    assert rel(logits(ours), logits(pm)) < 1e-6

    # the lookup itself: E0[ids] + sum_i w_i dE_i[ids], from PEFT's get_delta_weight
    # (which holds w_i already: each adapter's scale was multiplied by it)
    ref = model_fn().get_submodule(EMB[model_fn]).weight.double().clone()
    for i in range(len(folders)):
        ref += pm.base_model.model.get_submodule(EMB[model_fn]).get_delta_weight(f"a{i}").double()
    with torch.no_grad():
        assert rel(emb(IDS), ref[IDS]) < 1e-6
    if model_fn is tiny_gpt2:  # tied: the head still reads E0 on the fly (as PEFT's)
        assert ours.lm_head.weight is emb.base.weight
        assert torch.equal(ours.lm_head.weight, model_fn().lm_head.weight)

    detach(ours)
    assert not wrapped_modules(ours)
    assert type(ours.get_submodule(EMB[model_fn])) is type(model_fn().get_submodule(EMB[model_fn]))
    assert torch.equal(logits(ours), base_logits)

    merged = model_fn()
    originals = merge_into_model(merged, ads, weights, keep_original=True)
    ref_merged = pm.merge_and_unload()
    assert_same_weights(merged, ref_merged)
    assert rel(logits(merged), logits(ref_merged)) < 1e-5
    if model_fn is tiny_gpt2:  # tied: the head changed with the embedding, as in PEFT's merge
        assert merged.lm_head.weight is merged.transformer.wte.weight
        assert rel(merged.lm_head.weight, model_fn().lm_head.weight) > 1e-2
    else:  # untied: merged == on the fly
        assert rel(logits(merged), logits(attach_adapters(model_fn(), ads, weights))) < 1e-5
    restore_weights(merged, originals)
    assert torch.equal(logits(merged), base_logits)


def test_lora_on_a_tied_head_in_memory_equals_peft(tmp_path):
    """The other side of GPT-2's tie, a LoRA on ``lm_head``: on the fly only the
    head changes, merged the shared weight (the lookup too), as in PEFT."""
    a = make_peft_adapter(tiny_gpt2(), tmp_path / "a", seed=1, target_modules=["c_attn", "lm_head"])
    pm = peft_model(tiny_gpt2, [a])
    ours = attach_adapters(tiny_gpt2(), [load_adapter(a)])
    assert rel(logits(ours), logits(pm)) < 1e-6
    assert torch.equal(ours.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)
    merged = tiny_gpt2()
    merge_into_model(merged, [load_adapter(a)])
    ref = pm.merge_and_unload()
    assert_same_weights(merged, ref)
    assert rel(logits(merged), logits(ref)) < 1e-5
    assert not torch.equal(merged.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)


def test_scaled_embedding_gemma3_equals_peft(tmp_path):
    """Gemma scales its lookup (``embed_scale = sqrt(hidden)``): PEFT scales the
    adapters' term too, and so does :class:`AttachedEmbedding`."""
    from .test_conformance import ARCHS, _cfg, _model_class

    cfg_name, kw, cls_name, *_ = ARCHS["gemma3-tied"]

    def gemma():
        try:
            cfg = _cfg(cfg_name, **kw)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            pytest.skip(f"this transformers cannot build Gemma3 ({e})")
        torch.manual_seed(0)
        return _model_class(cls_name)(cfg).eval()

    assert float(gemma().model.embed_tokens.embed_scale) > 1
    a = emb_adapter(gemma, tmp_path / "a", seed=1, targets=["embed_tokens", "q_proj"], r=2)
    ids = torch.arange(1, 17).reshape(2, 8)
    pm = peft_model(gemma, [a])
    assert rel(logits(attach_adapters(gemma(), [load_adapter(a)]), ids), logits(pm, ids)) < 1e-6
    merged = gemma()
    merge_into_model(merged, [load_adapter(a)])
    assert_same_weights(merged, pm.merge_and_unload())


# ---------------------------------------------------------------- DoRA on an embedding


def test_dora_embedding_equals_peft(tmp_path, capsys):
    """PEFT's DoRA on an embedding keeps one magnitude per embedding feature
    (the columns of ``E0``): read, on the fly, merged in memory and streamed
    into a base (``sum --into``), each equal to PEFT."""
    from transformers import LlamaForCausalLM

    from loramix.cli import main

    a = emb_adapter(tiny_llama, tmp_path / "a", seed=1, dora=True, r=3, lora_alpha=6)
    ad = load_adapter(a)
    md = ad.modules["model.embed_tokens"]
    assert ad.kind == "dora" and md.extra["magnitude"].shape == (32,) and md.shape == (128, 32)
    pm = peft_model(tiny_llama, [a])
    assert rel(logits(attach_adapters(tiny_llama(), [ad])), logits(pm)) < 1e-6
    merged = tiny_llama()
    merge_into_model(merged, [ad])
    ref = pm.merge_and_unload()
    assert_same_weights(merged, ref)
    base = save_base(tiny_llama(), tmp_path / "base")
    assert main(["sum", str(a), "--into", str(base), "--out", str(tmp_path / "m")]) == 0
    assert_same_weights(LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval(), ref)


# ---------------------------------------------------------------- refused in one line


def _one_line(e) -> str:
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    return str(e.value)


def test_what_an_embedding_refuses(tmp_path):
    """D2-LoRA is not defined on an embedding (PEFT has no D2-LoRA; loramix
    trains it on linear layers only); linear factors on an embedding and
    embedding factors on a linear layer are refused, naming the module."""
    from loramix.kinds import get_kind

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(128, 2, generator=g), torch.randn(2, 32, generator=g)
    with pytest.raises(ValueError, match="D2-LoRA on an embedding is not supported"):
        get_kind("d2lora").from_tensors(
            "model.embed_tokens", {("A", "pos"): A, ("B", "pos"): B, ("A", "neg"): A, ("B", "neg"): B},
            {}, scale=1.0, alpha=2.0, embedding=True,
        )  # fmt: skip
    d2 = ModuleDelta("model.embed_tokens", B, A, 1.0, 2.0, B_neg=B, A_neg=A, tau=0.5,
                     extra={"layout": "embedding"})  # fmt: skip
    for fn in (attach_adapters, merge_into_model):
        with pytest.raises(AdapterError) as e:
            fn(tiny_llama(), [Adapter("d2", "d2lora", {d2.name: d2})])
        assert "D2-LoRA on an embedding is not supported" in _one_line(e)
    linear = ModuleDelta("model.embed_tokens", B, A, 1.0, 2.0)
    with pytest.raises(AdapterError) as e:
        attach_adapters(tiny_llama(), [Adapter("l", "lora", {linear.name: linear})])
    assert "model.embed_tokens is a Embedding" in _one_line(e) and "lora_embedding_A/B" in str(e.value)
    lm = ModuleDelta("lm_head", B, A, 1.0, 2.0, extra={"layout": "embedding"})
    with pytest.raises(AdapterError) as e:
        merge_into_model(tiny_llama(), [Adapter("l", "lora", {lm.name: lm})])
    assert "lm_head holds embedding factors" in _one_line(e)
    capped = torch.nn.Module()
    capped.emb = torch.nn.Embedding(128, 32, max_norm=1.0)  # renormalises the rows it looks up
    md = ModuleDelta("emb", B, A, 1.0, 2.0, extra={"layout": "embedding"})
    with pytest.raises(AdapterError) as e:
        attach_adapters(capped, [Adapter("l", "lora", {md.name: md})])
    assert "max_norm" in _one_line(e)
    ln = ModuleDelta("model.norm", B, A, 1.0, 2.0)
    with pytest.raises(AdapterError) as e:
        attach_adapters(tiny_llama(), [Adapter("l", "lora", {ln.name: ln})])
    assert "not a linear layer or an embedding" in _one_line(e)


# ---------------------------------------------------------------- loramix eval, and the prefix cache


@pytest.fixture(scope="module")
def eval_bases(tmp_path_factory):
    from .test_eval import _make_base

    root = tmp_path_factory.mktemp("embbases")
    return {a: _make_base(root / a, a) for a in ("gpt2", "llama")}


def test_eval_cli_with_an_embedding_adapter_equals_peft(eval_bases, tmp_path):
    """(c) ``loramix eval --adapter`` as a whole CLI call (``python -m
    loramix``) on a tied GPT-2 whose adapter changes ``wte``: PEFT's perplexity
    on the fly, and with ``--merged`` PEFT's merged perplexity (the tied head
    changes too)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramix.data import encode_records, load_records, make_batches
    from loramix.models import load_causal_lm

    from .test_eval import ARITH, _hf_token_weighted_ppl

    base = eval_bases["gpt2"]
    model, tok = load_causal_lm(base)
    a = emb_adapter(lambda: model, tmp_path / "a", seed=1, targets=["wte", "c_attn"], lora_alpha=32)

    def cli(*extra):
        args = ["eval", "--base", base, "--adapter", a, "--data", ARITH, "--format", "json", *extra]
        r = subprocess.run([sys.executable, "-m", "loramix", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # merged, the tied head changes too: said (it was not), and only then
        assert ("wte is tied to the output head: merged, its delta changes both" in r.stderr) == bool(extra)
        return json.loads(r.stdout)["results"][0]["ppl"]

    fly, merged = cli(), cli("--merged")
    batches = make_batches(
        encode_records(tok, load_records(ARITH), max_len=64), batch_size=16, pad_id=tok.pad_token_id
    )
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(a)).eval()
    assert fly == pytest.approx(_hf_token_weighted_ppl(pm, batches), rel=1e-5)
    assert merged == pytest.approx(_hf_token_weighted_ppl(pm.merge_and_unload(), batches), rel=1e-5)
    plain = _hf_token_weighted_ppl(AutoModelForCausalLM.from_pretrained(str(base)).eval(), batches)
    assert abs(fly - plain) > 1e-3 * plain and abs(merged - fly) > 1e-3 * fly


def test_prefix_cache_is_never_used_for_an_adapted_embedding(eval_bases, tmp_path, monkeypatch, capsys):
    """The cached prefix ``h_k`` starts at the embedding: ``--top-layers`` with
    an adapter on it is refused in one line, and should one reach the cache
    anyway (attached, or merged into the weights), its key differs from the
    base's, so a base entry is never served for it."""
    from loramix import prefix
    from loramix.cli import main
    from loramix.models import load_causal_lm
    from loramix.perplexity import evaluate

    from .test_eval import ARITH
    from .test_prefix import _examples

    base = eval_bases["llama"]
    model, _ = load_causal_lm(base)
    top = r"model\.embed_tokens|model\.layers\.1\.self_attn\.q_proj"
    a = emb_adapter(lambda: model, tmp_path / "a", seed=1, targets=top, lora_alpha=32)
    for merged in (False, True):
        with pytest.raises(UsageError, match=r"model\.embed_tokens is not in the top layers.*cached prefix"):
            evaluate(base, adapters=[a], top_layers=1, merged=merged, data=[ARITH], device="cpu")
    capsys.readouterr()
    assert main(["eval", "--base", str(base), "--adapter", str(a), "--data", ARITH, "--top-layers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.embed_tokens" in err and "--top-layers" in err

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    prefix.clear_memory()
    ex = _examples(model.config.vocab_size)
    plain = prefix.prefix_states(model, 1, ex)  # cached for the base, in memory and on disk
    attach_adapters(model, [load_adapter(a)])
    got = prefix.prefix_states(model, 1, ex)
    want = prefix.compute_states(model, 1, ex)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(not torch.allclose(g, p, atol=1e-4) for g, p in zip(got, plain))
    detach(model)
    merge_into_model(model, [load_adapter(a)])
    got = prefix.prefix_states(model, 1, ex)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    prefix.clear_memory()


def test_scenario_dense_merge_in_memory_on_an_embedding(tmp_path):
    """The scenario's in-memory merge (a dense method's deltas added to the base
    held in memory) takes an embedding's weight as stored, a ``Conv1D``'s
    transposed: equal to ``merge_into_model``, and restored exactly."""
    from loramix.scenario.steps import _restore, merged_in_memory

    ads = [load_adapter(emb_adapter(tiny_gpt2, tmp_path / "a", seed=1, r=3))]
    model = tiny_gpt2()
    saved, summary = merged_in_memory(model, ads, "sum", {})
    assert summary["modules"] == len(ads[0].modules) == 3
    ref = tiny_gpt2()
    merge_into_model(ref, ads)
    assert_same_weights(model, ref)
    _restore(model, saved)
    assert torch.equal(logits(model), logits(tiny_gpt2()))
