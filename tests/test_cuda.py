"""The same results on a CUDA device as on the CPU (skipped without a GPU).

Each test runs one operation with ``device="cuda"`` and with ``device="cpu"``
on the same real inputs (tiny transformers models, real PEFT adapters) and
compares: exact float64 similarity, merges to float32 rounding, training and
perplexity to the tolerance of a different kernel order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .factories import forward_taken, make_peft_adapter, save_base, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    out = {}
    for arch, factory in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        model = factory()
        base = save_base(model, root / f"{arch}-base")
        ads = [
            make_peft_adapter(model, root / f"{arch}-a", seed=1, r=4, lora_alpha=8),
            make_peft_adapter(model, root / f"{arch}-b", seed=2, r=2, lora_alpha=5, use_rslora=True),
            make_peft_adapter(model, root / f"{arch}-c", seed=3, r=6, lora_alpha=3),
        ]
        out[arch] = dict(base=base, adapters=ads, root=root)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _assert_same_tensors(a: Path, b: Path, rtol: float):
    ta, tb = _weights(a), _weights(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        x, y = ta[k].double(), tb[k].double()
        err = float((x - y).norm() / y.norm().clamp_min(1e-30))
        assert err <= rtol, (k, err)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_similarity_cuda_matches_cpu(setup, arch):
    from loramix.overlap import similarity

    ads = setup[arch]["adapters"]
    cpu = similarity(ads, device="cpu", progress=False)
    gpu = similarity(ads, device="cuda", progress=False)
    assert (cpu.rms - gpu.rms).abs().to_numpy().max() < 1e-9
    assert (cpu.mean - gpu.mean).abs().to_numpy().max() < 1e-9


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sum_into_base_cuda_matches_cpu(setup, arch, tmp_path):
    from loramix.methods.sum import sum_into_base

    s = setup[arch]
    kw = dict(weights=[1.0, 0.5, -0.25], progress=False)
    sum_into_base(s["adapters"], into=s["base"], out=tmp_path / "cpu", device="cpu", **kw)
    sum_into_base(s["adapters"], into=s["base"], out=tmp_path / "gpu", device="cuda", **kw)
    _assert_same_tensors(tmp_path / "gpu", tmp_path / "cpu", rtol=1e-6)


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", dict(density=0.3)),
        ("dare-ties", dict(density=0.5, seed=7)),
        ("dare-linear", dict(density=0.5, seed=7)),
        ("magnitude", dict(density=0.4)),
        ("svd", dict(rank=4)),
    ],
)
def test_merge_methods_cuda_match_cpu(setup, method, params, tmp_path):
    from loramix.methods import merge

    s = setup["gpt2"]
    into = None if method == "svd" else s["base"]
    merge(s["adapters"], method, into=into, out=tmp_path / "cpu", device="cpu", **params)
    merge(s["adapters"], method, into=into, out=tmp_path / "gpu", device="cuda", **params)
    # svd factors are unique up to sign: compare the products, not the factors.
    if method == "svd":
        from loramix.io.adapter_files import load_adapter

        a, b = load_adapter(tmp_path / "cpu"), load_adapter(tmp_path / "gpu")
        for name, m in a.modules.items():
            x, y = m.residual(), b.modules[name].residual()
            assert float((x - y).norm() / x.norm()) < 1e-5
    else:
        _assert_same_tensors(tmp_path / "gpu", tmp_path / "cpu", rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from loramix.basebuild import build_base

    out = tmp_path_factory.mktemp("built") / "base"
    build_base(
        ["synthetic:arith?n=300"], out=out, size="tiny", steps=20, seed=0, device="cuda", progress=False
    )
    return out


@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_train_and_eval_on_cuda(tiny_base, tmp_path, method):
    from loramix.perplexity import evaluate
    from loramix.train import train_adapter

    data = ["synthetic:arith?n=300"]
    res = train_adapter(
        tiny_base,
        data,
        out=tmp_path / method,
        kind=method,
        steps=30,
        batch=8,
        max_len=64,
        rank=4,
        alpha=8,
        lr=5e-3,
        device="cuda",
        progress=False,
        eval_size=32,
    )
    assert res is not None
    kw = dict(adapters=[tmp_path / method], data=data, max_len=64, limit=64)
    gpu = evaluate(tiny_base, device="cuda", **kw)
    cpu = evaluate(tiny_base, device="cpu", **kw)
    merged = evaluate(tiny_base, device="cuda", merged=True, **kw)
    g, c, m = (float(df["ppl"].iloc[-1]) for df in (gpu, cpu, merged))
    assert abs(g - c) / c < 1e-3
    assert abs(m - g) / g < 1e-3  # merged and unmerged agree on the GPU too


def test_llama_d2_layer_cuda_merged_matches_unmerged():
    """The factored D2 forward on the GPU equals ``F.linear`` with ``W_hat = W* + dW``."""
    from loramix.layers import D2LoraLinear, inject_trainable, wrapped_modules

    model = tiny_llama().cuda()
    inject_trainable(model, kind="d2lora", rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    layers = wrapped_modules(model, D2LoraLinear)
    assert len(layers) == 4
    x = torch.randn(3, 16, layers[next(iter(layers))].in_features, device="cuda")
    with torch.no_grad():
        for layer in layers.values():
            y = layer(x).double()
            ref = x.double() @ layer.merged_weight().T
            if layer.bias is not None:
                ref = ref + layer.bias.double()
            assert float((y - ref).norm() / ref.norm()) < 1e-5


def test_d2_layer_trains_with_the_dense_forward_on_cuda():
    """``dense=None`` takes the dense forward when training on CUDA (measured
    faster there, reports/benchmarks-gpu.md) and the factored one under
    no_grad; both give ``F.linear`` with ``W_hat`` and the same gradients."""
    from loramix.layers import D2LoraLinear

    g = torch.Generator().manual_seed(0)
    layer = D2LoraLinear(torch.nn.Linear(24, 16), 4, 8.0, generator=g).cuda()
    with torch.no_grad():
        for p in (layer.lora_B_pos, layer.lora_B_neg):
            p.normal_(0, 0.05)
    x = torch.randn(3, 24, device="cuda")
    assert forward_taken(layer, x) == "dense"
    with torch.no_grad():
        assert forward_taken(layer, x) == "factored"
    grads = []
    for dense in (None, False):
        layer.dense = dense
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in (layer.lora_A_pos, layer.lora_B_neg)])
    for a, b in zip(*grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-4
