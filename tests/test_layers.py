"""loramix.layers: the LoRA and D2-LoRA layers, injection, extraction, attach/merge/detach."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.adapter import Adapter
from loramix.d2lora import d2_merged_weight
from loramix.errors import AdapterError, UsageError
from loramix.io.adapter_files import load_adapter
from loramix.layers import (
    AttachedLinear,
    D2LoraLinear,
    LoraLinear,
    attach_adapters,
    d2_norm_scale,
    detach,
    extract_modules,
    find_targets,
    inject_trainable,
    merge_into_model,
    restore_weights,
    wrapped_modules,
)

from .factories import GPT2_TARGETS, LLAMA_TARGETS, make_peft_adapter, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _base(kind: str, out_f=24, in_f=16) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(in_f, out_f)
    m = Conv1D(out_f, in_f)  # weight (in, out)
    nn.init.normal_(m.bias, std=0.1)
    return m


def _perturb(params, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _trained(model_fn, method, seed=0, **kw):
    """A model with trainable layers whose B factors are non-zero."""
    m = model_fn()
    params = inject_trainable(m, kind=method, rank=4, alpha=8, seed=seed, **kw)
    _perturb(params, seed=seed)
    return m


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_layer_math(kind):
    base = _base(kind)
    layer = LoraLinear(base, rank=3, alpha=6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 16)
    # B = 0 at init: the layer is the base.
    assert torch.equal(layer(x), base(x))
    _perturb([layer.lora_B])
    W0 = layer.base_weight()
    assert W0.shape == (24, 16)
    expect = x @ W0.T + base.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert rel(layer(x), expect) < 1e-6
    assert (
        rel(layer.merged_weight(), W0.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()) < 1e-12
    )


def test_init_matches_peft_rule():
    base = _base("linear", in_f=64)
    layer = D2LoraLinear(base, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
    for A in (layer.lora_A_pos, layer.lora_A_neg):
        assert float(A.detach().abs().max()) <= bound
        assert float(A.detach().abs().max()) > 0.8 * bound
    assert not torch.equal(layer.lora_A_pos, layer.lora_A_neg)  # independent draws
    assert not layer.lora_B_pos.any() and not layer.lora_B_neg.any()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("norm_dim", [1, 0])
def test_d2_factored_forward_equals_definition(kind, norm_dim):
    """y = W* x + dW x + b, with W* the norm projection of W0 + dW (DESIGN.md 4)."""
    base = _base(kind)
    layer = D2LoraLinear(
        base, rank=3, alpha=6, tau=0.7, norm_dim=norm_dim, generator=torch.Generator().manual_seed(0)
    )
    x = torch.randn(7, 16, dtype=torch.float32)
    assert rel(layer(x), base(x)) < 1e-6  # dW = 0 and c = 1 at init (Conv1D's addmm rounds apart)
    _perturb([layer.lora_B_pos, layer.lora_B_neg, layer.lora_A_pos, layer.lora_A_neg])

    W0 = layer.base_weight().double()
    s = 2.0
    dW = s * (
        layer.lora_B_pos.double() @ layer.lora_A_pos.double()
        - 0.7 * layer.lora_B_neg.double() @ layer.lora_A_neg.double()
    )
    V = W0 + dW
    Wstar = V * (W0.norm(dim=norm_dim, keepdim=True) / V.norm(dim=norm_dim, keepdim=True))
    expect = x.double() @ (Wstar + dW).T + base.bias.double()
    assert rel(layer(x).double(), expect) < 1e-5
    assert rel(layer.merged_weight(), Wstar + dW) < 1e-12
    assert rel(layer.residual(), dW) < 1e-12

    # The dense reference forward and its gradients agree with the factored one.
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [layer.lora_B_pos, layer.lora_A_neg])
    layer.dense = True
    yd = layer(x)
    grads_d = torch.autograd.grad((yd * g).sum(), [layer.lora_B_pos, layer.lora_A_neg])
    assert rel(y, yd) < 1e-5
    for a, b in zip(grads, grads_d):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("norm_dim", [1, 0])
def test_d2_norm_scale_is_exact(norm_dim):
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(20, 12, generator=g, dtype=torch.float64)
    Bf = torch.randn(20, 6, generator=g, dtype=torch.float64)
    Af = torch.randn(6, 12, generator=g, dtype=torch.float64)
    c = d2_norm_scale(W0, Bf, Af, norm_dim=norm_dim)
    V = W0 + Bf @ Af
    expect = W0.norm(dim=norm_dim) / V.norm(dim=norm_dim)
    assert rel(c, expect) < 1e-12
    # eps guard: V = 0 in a row gives ||W0|| / eps, not a division by zero.
    Bz = torch.zeros(20, 1, dtype=torch.float64)
    Az = torch.zeros(1, 12, dtype=torch.float64)
    Bz[0, 0], Az[0] = 1.0, -W0[0]
    c = d2_norm_scale(W0, Bz, Az, norm_dim=1, eps=1e-3)
    assert torch.isfinite(c).all()
    assert abs(float(c[0]) - float(W0[0].norm()) / 1e-3) / (float(W0[0].norm()) / 1e-3) < 1e-6
    # W* row is 0 (V row is 0), so W_hat = W* + dW = -W0 there.
    assert torch.allclose(d2_merged_weight(W0, Bz @ Az, eps=1e-3)[0], -W0[0])


@pytest.mark.parametrize(
    ("dtype", "rhos"), [(torch.float64, [1e-2, 1e-4, 1e-5, 1e-6]), (torch.float32, [1e-1, 3e-2, 1e-2])]
)
def test_d2_norm_scale_near_cancellation_keeps_the_documented_bound(dtype, rhos):
    """A row of ``V = W0 + dW`` at ``rho = ||V_i|| / ||W0_i||``: the fast
    norm formula's ``c_i`` is within ``8 u / rho^2`` of a float64 dense
    reference on the same inputs (docs/d2lora.md, "Near cancellation"), and
    the other rows are exact to rounding."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 64, 256, 8
    W0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    Bf = torch.randn(out_f, r, generator=g, dtype=torch.float64) * 0.1
    Af = torch.randn(r, in_f, generator=g, dtype=torch.float64) * 0.1
    d0 = (Bf @ Af)[0]
    u = torch.finfo(dtype).eps / 2
    for rho in rhos:
        W = W0.clone()
        v = torch.randn(in_f, generator=g, dtype=torch.float64)
        W[0] = -d0 + rho * float(d0.norm()) * v / v.norm()
        Wd, Bd, Ad = W.to(dtype), Bf.to(dtype), Af.to(dtype)
        c = d2_norm_scale(Wd, Bd, Ad).double()
        Wr = Wd.double()
        V = Wr + Bd.double() @ Ad.double()
        ref = Wr.norm(dim=1) / V.norm(dim=1)
        rho_got = float(V[0].norm() / Wr[0].norm())
        err = ((c - ref).abs() / ref).tolist()
        assert err[0] <= 8 * u / rho_got**2, (dtype, rho, err[0])
        assert max(err[1:]) < 1e3 * u, (dtype, rho, max(err[1:]))


@pytest.mark.parametrize("model_fn,targets", [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)])
@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_inject_freezes_and_names_like_peft(model_fn, targets, method):
    from peft import LoraConfig, get_peft_model

    m = model_fn()
    ref = m(IDS).logits
    params = inject_trainable(m, kind=method, rank=4, alpha=8, seed=0)
    per = 2 if method == "lora" else 4
    n_mods = len(wrapped_modules(m))
    assert n_mods == (8 if model_fn is tiny_gpt2 else 14)  # 2 blocks; GPT-2's c_proj is in attn and mlp
    assert len(params) == per * n_mods
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert rel(m(IDS).logits, ref) < 1e-6  # dW = 0 at init

    # Module names are PEFT's.
    kw = {"fan_in_fan_out": True} if model_fn is tiny_gpt2 else {}
    pm = get_peft_model(model_fn(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    peft_names = {
        n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")
    }
    assert set(extract_modules(m)) == peft_names


def test_inject_seed_and_targets():
    a = extract_modules(_trained(tiny_gpt2, "d2lora", seed=5))
    b = extract_modules(_trained(tiny_gpt2, "d2lora", seed=5))
    c = extract_modules(_trained(tiny_gpt2, "d2lora", seed=6))
    k = "transformer.h.1.mlp.c_fc"
    assert torch.equal(a[k].A, b[k].A) and torch.equal(a[k].B_neg, b[k].B_neg)
    assert not torch.equal(a[k].A, c[k].A)

    m = tiny_gpt2()
    assert find_targets(m, ["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert find_targets(m, r".*\.0\..*c_attn") == ["transformer.h.0.attn.c_attn"]
    with pytest.raises(UsageError, match="no module"):
        find_targets(m, ["q_proj"])
    with pytest.raises(UsageError, match="LayerNorm"):
        find_targets(m, ["ln_1"])
    with pytest.raises(UsageError, match="method"):
        inject_trainable(m, method="vera", rank=2, alpha=2)
    with pytest.raises(UsageError, match="does not train"):  # DoRA is a kind now, read-only
        inject_trainable(m, method="dora", rank=2, alpha=2)


@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama])
def test_attach_equals_merge_for_mixed_adapters(model_fn):
    """LoRA + D2 (row norm) + D2 (column norm), weighted: on the fly == merged (1e-5)."""
    ads = [
        Adapter("l", "lora", extract_modules(_trained(model_fn, "lora", seed=1))),
        Adapter("d", "d2lora", extract_modules(_trained(model_fn, "d2lora", seed=2, tau=0.3))),
        Adapter("c", "d2lora", extract_modules(_trained(model_fn, "d2lora", seed=3, norm_dim=0))),
    ]
    w = [0.5, 1.0, 0.7]
    m1 = attach_adapters(model_fn(), ads, w)
    assert all(isinstance(x, AttachedLinear) for x in wrapped_modules(m1).values())
    m2 = model_fn()
    originals = merge_into_model(m2, ads, w, keep_original=True)
    y1, y2 = m1(IDS).logits, m2(IDS).logits
    assert rel(y1, y2) < 1e-5

    # The merged weight is exactly W0 + sum_i w_i * delta_i(W0), per module.
    name = next(iter(ads[0].modules))
    W0 = originals[name].double()
    W0 = W0.T if model_fn is tiny_gpt2 else W0
    expect = W0 + sum(wi * a.modules[name].delta(W0) for wi, a in zip(w, ads))
    got = m2.get_submodule(name).weight.double()
    got = got.T if model_fn is tiny_gpt2 else got
    assert rel(got, expect) < 1e-6

    restore_weights(m2, originals)
    assert torch.equal(m2(IDS).logits, model_fn()(IDS).logits)
    detach(m1)
    assert not wrapped_modules(m1)
    assert torch.equal(m1(IDS).logits, model_fn()(IDS).logits)


@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_training_layer_equals_attached_and_detach_merge(method):
    m = _trained(tiny_llama, method, seed=4)
    y = m(IDS).logits
    ad = Adapter("a", method, extract_modules(m))
    assert rel(attach_adapters(tiny_llama(), [ad])(IDS).logits, y) < 1e-5
    detach(m, merge=True)
    assert not wrapped_modules(m)
    assert rel(m(IDS).logits, y) < 1e-5


@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama])
def test_attach_peft_adapter_matches_peft(tmp_path, model_fn):
    """A LoRA made by PEFT, loaded by loramix and attached, gives PEFT's logits."""
    from peft import PeftModel

    folder = make_peft_adapter(model_fn(), tmp_path / "a", r=4, lora_alpha=12)
    pm = PeftModel.from_pretrained(model_fn(), str(folder)).eval()
    ours = attach_adapters(model_fn(), [load_adapter(folder)])
    with torch.no_grad():
        assert rel(ours(IDS).logits, pm(IDS).logits) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama])
def test_merge_into_a_float64_model_is_peft_float64_merge(tmp_path, model_fn, dora):
    """On a float64 model the merge accumulates in float64, as the streaming
    engine does: PEFT's float64 ``merge_and_unload`` to 1e-12. In float32
    every merged weight was rounded, 2.9e-8 off PEFT's."""
    from peft import PeftModel

    folder = make_peft_adapter(model_fn(), tmp_path / "a", seed=3, r=4, lora_alpha=12, use_dora=dora)
    want = PeftModel.from_pretrained(model_fn().double(), str(folder)).merge_and_unload().state_dict()
    model = model_fn().double()
    merge_into_model(model, [load_adapter(folder)])
    got = model.state_dict()
    assert got["lm_head.weight"].dtype == torch.float64
    assert max(rel(got[k], want[k]) for k in want) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama])
def test_attached_layer_on_a_half_base_rounds_as_peft(tmp_path, model_fn, dtype):
    """On a bfloat16/float16 base an attached LoRA adds its float32 term to
    the base's output and rounds the sum once, as PEFT's layer does (its
    factors kept in float32): each adapted module's output has PEFT's bits
    but where the two float32 terms fall on either side of a rounding
    boundary. Its factors and the term were rounded to the base's dtype and
    the term again after the add: about 60% of the outputs differed from
    PEFT's, a perplexity 1.1e-4 off float32's where PEFT's was 1.5e-5 off."""
    from peft import PeftModel

    folder = make_peft_adapter(model_fn(), tmp_path / "a", r=8, lora_alpha=16)
    pm = PeftModel.from_pretrained(model_fn().to(dtype), str(folder)).eval()
    ours = attach_adapters(model_fn().to(dtype), [load_adapter(folder)])
    g = torch.Generator().manual_seed(0)
    ulp = torch.finfo(dtype).eps
    names = [n for n, mod in ours.named_modules() if isinstance(mod, AttachedLinear)]
    assert names
    for name in names:
        mod = ours.get_submodule(name)
        x = torch.randn(64, mod.in_features, generator=g).to(dtype)
        with torch.no_grad():
            got, want = mod(x), pm.base_model.model.get_submodule(name)(x)
        assert got.dtype == want.dtype == dtype
        assert (got != want).float().mean() < 0.02, name
        assert ((got - want).abs() <= ulp * want.abs()).all(), name


def test_adapter_for_another_base_is_refused():
    ad = Adapter("big", "lora", extract_modules(_trained(lambda: tiny_gpt2(n_embd=48), "lora")))
    with pytest.raises(AdapterError, match="shape 144x48 but the base model's is 96x32") as e:
        attach_adapters(tiny_gpt2(), [ad])
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="not in the base model"):
        merge_into_model(tiny_llama(), [ad])
    with pytest.raises(UsageError, match="weights"):
        attach_adapters(tiny_gpt2(n_embd=48), [ad], [1.0, 2.0])
