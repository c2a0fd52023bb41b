"""D2-LoRA end to end: trained adapters on disk, their format, merged against unmerged."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from loramix.d2lora import d2_merged_weight
from loramix.data import encode_records, load_records, make_batches, pad_id_for
from loramix.io.adapter_files import load_adapter
from loramix.layers import D2LoraLinear, attach_adapters, inject_trainable, merge_into_model, wrapped_modules
from loramix.models import load_causal_lm
from loramix.perplexity import perplexity
from loramix.train import train_adapter

from .factories import forward_taken
from .test_train import ARITH, UNITS, make_tiny_base

D2 = dict(kind="d2lora", steps=8, batch=8, max_len=48, rank=4, alpha=8, tau=0.4, lr=2e-2, progress=False)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2bases")
    return {a: make_tiny_base(root / a, a) for a in ("gpt2", "llama")}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _eval_batches(tok, spec=ARITH, n=24):
    recs = load_records(spec)[:n]
    return make_batches(encode_records(tok, recs, max_len=48), batch_size=8, pad_id=pad_id_for(tok))


def _w0(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().double()
    return w if isinstance(mod, nn.Linear) else w.T


@pytest.mark.parametrize("arch,norm_dim", [("gpt2", 1), ("llama", 1), ("gpt2", 0)])
def test_trained_d2_adapter_round_trip_and_merge(bases, tmp_path, arch, norm_dim):
    base = bases[arch]
    out = tmp_path / "d2"
    train_adapter(base, ARITH, out=out, norm_dim=norm_dim, eval_size=16, **D2)

    # The documented format (docs/d2lora.md).
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "D2LORA" and cfg["loramix_format"] == "d2lora/1"
    assert (cfg["r"], cfg["lora_alpha"], cfg["tau"], cfg["norm_dim"]) == (4, 8, 0.4, norm_dim)
    assert cfg["eps"] == 1e-8 and cfg["base_model_name_or_path"] == str(base)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        k = next(k for k in keys if k.endswith("lora_B_neg.weight"))
        assert k.startswith("base_model.model.") and f.get_tensor(k).shape[1] == 4
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg"}

    ad = load_adapter(out)
    assert ad.kind == "d2lora" and len(ad) * 4 == len(keys)

    # The training layers, rebuilt from the file: ModuleDelta.delta(W0) == W_hat - W0.
    model, tok = load_causal_lm(base)
    inject_trainable(model, kind="d2lora", rank=4, alpha=8, tau=0.4, norm_dim=norm_dim)
    layers = wrapped_modules(model)
    assert set(layers) == set(ad.modules)
    with torch.no_grad():
        for name, m in ad.modules.items():
            layer: D2LoraLinear = layers[name]
            for p, t in ((layer.lora_A_pos, m.A), (layer.lora_B_pos, m.B), (layer.lora_A_neg, m.A_neg),
                         (layer.lora_B_neg, m.B_neg)):  # fmt: skip
                p.copy_(t)
            W0 = _w0(layer.base)
            assert float(m.B_neg.abs().max()) > 0
            assert _rel(m.delta(W0), layer.merged_weight() - W0) < 1e-9
            assert _rel(m.residual(), layer.residual()) < 1e-12

    # Unmerged (training layers and loaded adapter on the fly) against merged.
    batches = _eval_batches(tok)
    ids = batches[0]["input_ids"]
    unmerged, _ = load_causal_lm(base)
    attach_adapters(unmerged, [ad])
    merged, _ = load_causal_lm(base)
    merge_into_model(merged, [ad])
    with torch.no_grad():
        y_layer, y_on, y_merged = (m(ids).logits for m in (model.eval(), unmerged, merged))
    assert _rel(y_layer, y_merged) < 1e-5
    assert _rel(y_on, y_merged) < 1e-5
    p_layer, p_on, p_merged = (perplexity(m, batches)["ppl"] for m in (model, unmerged, merged))
    assert abs(p_on - p_merged) / p_merged < 1e-3
    assert abs(p_layer - p_merged) / p_merged < 1e-3


def test_several_d2_adapters_effective_vs_signed(bases, tmp_path):
    """DESIGN.md 4, merging two D2 adapters: (a) sum of effective deltas (what
    attach/merge do) against (b) the summed residual projected once."""
    base = bases["gpt2"]
    ads = [
        load_adapter(train_adapter(base, spec, out=tmp_path / n, eval_size=0, **D2)["out"])
        for n, spec in (("a", ARITH), ("u", UNITS))
    ]
    unmerged, tok = load_causal_lm(base)
    attach_adapters(unmerged, ads, [0.6, 0.9])
    merged, _ = load_causal_lm(base)
    merge_into_model(merged, ads, [0.6, 0.9])
    batches = _eval_batches(tok, UNITS)
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        assert _rel(unmerged(ids).logits, merged(ids).logits) < 1e-5
    pu, pm = perplexity(unmerged, batches)["ppl"], perplexity(merged, batches)["ppl"]
    assert abs(pu - pm) / pm < 1e-3

    # (a) and (b) are different merges: their weights differ, by more than rounding.
    name = next(iter(ads[0].modules))
    W0 = _w0(load_causal_lm(base)[0].get_submodule(name))
    a = W0 + sum(w * ad.modules[name].delta(W0) for w, ad in zip((0.6, 0.9), ads))
    dW = sum(w * ad.modules[name].residual() for w, ad in zip((0.6, 0.9), ads))
    b = d2_merged_weight(W0, dW)
    assert _rel(_w0(merged.get_submodule(name)), a) < 1e-6
    assert _rel(a, b) > 1e-6


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 12),
    rank=st.integers(1, 4),
    tau=st.floats(0.0, 2.0),
    norm_dim=st.sampled_from([0, 1]),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factored_forward_equals_dense_definition(out_f, in_f, rank, tau, norm_dim, conv, seed):
    """Property: the factored D2 forward is y = (W* + dW) x + b for any shape (float64)."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    base = (Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)).double()
    layer = D2LoraLinear(base, rank, 2.0 * rank, tau=tau, norm_dim=norm_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for p in (layer.lora_B_pos, layer.lora_B_neg):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(5, in_f, generator=g, dtype=torch.float64)
    W_hat = layer.merged_weight()
    expect = x @ W_hat.T + base.bias.detach()
    assert torch.allclose(layer(x), expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm_dim", [1, 0])
def test_effective_delta_in_place_has_the_bits_of_the_formula(norm_dim):
    """A merge forms the effective delta in place (three (out, in) tensors
    alive, not five): the same bits as d2_effective_delta, which autograd
    still gets."""
    from loramix.adapter import D2LORA, ModuleDelta
    from loramix.d2lora import d2_effective_delta

    g = torch.Generator().manual_seed(5)
    o, i, r = 48, 40, 3
    m = ModuleDelta(name="p", B=torch.randn(o, r, generator=g), A=torch.randn(r, i, generator=g), scale=1.5,
                    alpha=4.5, B_neg=torch.randn(o, r, generator=g), A_neg=torch.randn(r, i, generator=g),
                    tau=0.4, norm_dim=norm_dim, eps=1e-8, kind=D2LORA)  # fmt: skip
    W0 = torch.randn(o, i, generator=g)
    Bf, Af = m.factors(dtype=torch.float64)
    ref = d2_effective_delta(W0.double(), Bf @ Af, norm_dim=norm_dim, eps=1e-8)
    assert torch.equal(m.delta(W0), ref)
    W0g = W0.double().requires_grad_()
    m.delta(W0g).sum().backward()
    assert W0g.grad is not None


def test_a_d2_module_built_by_hand_takes_the_tau_of_a_file_without_one(tmp_path):
    """``ModuleDelta`` and ``NpModule`` defaulted ``tau`` to 0.0, where a D2
    file whose config has no ``tau``, the kind and training use 0.5: a D2
    module built in Python without ``tau`` dropped its negative branch. Now all
    take the kind's 0.5 (``D2_TAU``); a LoRA module keeps 0.0, unused."""
    import numpy as np

    from loramix.adapter import ModuleDelta
    from loramix.io.formats.d2 import save_d2_adapter
    from loramix.io.np_factors import NpModule, load_np_adapter
    from loramix.kinds import D2LORA as KIND

    g = torch.Generator().manual_seed(9)
    o, i, r = 12, 10, 2
    t = [torch.randn(o, r, generator=g), torch.randn(r, i, generator=g)] * 2
    t[2], t[3] = torch.randn(o, r, generator=g), torch.randn(r, i, generator=g)
    name = "model.layers.0.self_attn.q_proj"
    m = ModuleDelta(name=name, B=t[0], A=t[1], B_neg=t[2], A_neg=t[3], scale=2.0, alpha=4.0)
    npm = NpModule(name, *(x.numpy() for x in t[:2]), 2.0, 4.0, *(x.numpy() for x in t[2:]))
    assert m.tau == npm.tau == KIND.options["tau"] == 0.5
    from loramix.io.peft_layout import D2_TAU  # the one default, new

    assert D2_TAU == 0.5
    lora = ModuleDelta(name=name, B=t[0], A=t[1], scale=2.0, alpha=4.0)
    assert lora.tau == 0.0 and NpModule(name, t[0].numpy(), t[1].numpy(), 2.0, 4.0).tau == 0.0
    out = save_d2_adapter(tmp_path / "d2", {name: m}, r=r, lora_alpha=4.0, tau=0.5)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["tau"]
    cfg_path.write_text(json.dumps(cfg))
    by_file, by_np = load_adapter(out).modules[name], load_np_adapter(out).modules[name]
    assert by_file.tau == by_np.tau == 0.5
    ref = by_file.residual()
    assert torch.equal(m.residual(), ref)
    Bf, Af = npm.factors()
    np.testing.assert_allclose(Bf @ Af, ref.numpy(), rtol=1e-12, atol=1e-12)


def test_forward_is_chosen_by_device_unless_given():
    """``dense=None`` trains with the factored forward on the CPU (the dense one
    on CUDA: tests/test_cuda.py); True and False are obeyed everywhere."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    auto, dense, factored = (
        D2LoraLinear(nn.Linear(6, 5), 2, 4.0, generator=g, dense=d) for d in (None, True, False)
    )
    assert forward_taken(auto, x) == "factored"
    with torch.no_grad():
        assert forward_taken(auto, x) == "factored"
        assert forward_taken(dense, x) == "dense"
    assert forward_taken(dense, x) == "dense"
    assert forward_taken(factored, x) == "factored"
