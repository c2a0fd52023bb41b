"""Similarity in numpy on the CPU (issue 12, item 3): the numpy reader gives
the factors torch's reader gives (bf16 included, bit for bit) and the same
errors, numpy and torch similarity agree to 1e-12 on LoRA and D2-LoRA
adapters, and a ``loramix similarity`` run imports no torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix import load_adapter, similarity
from loramix.errors import AdapterError
from loramix.io.adapter_files import save_d2_adapter
from loramix.io.np_factors import load_np_adapter, np_adapter

from .factories import make_peft_adapter, tiny_gpt2, tiny_llama
from .test_similarity import random_d2_like
from .test_startup import heavy, imported_modules

TORCH_CPU = torch.device("cpu")  # a torch.device asks for the torch path


def _recast(src, dst, dtype):
    """A copy of adapter folder ``src`` with its factors stored in ``dtype``."""
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    tensors = {k: v.to(dtype) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("np")
    gpt2, llama = tiny_gpt2(), tiny_llama()
    g0 = make_peft_adapter(gpt2, d / "g0", seed=0, r=4, rank_pattern={"c_fc": 2}, alpha_pattern={"c_proj": 3})
    g1 = make_peft_adapter(gpt2, d / "g1", seed=1, r=3, lora_alpha=5, use_rslora=True)
    g2 = _recast(make_peft_adapter(gpt2, d / "g2f", seed=2, r=2), d / "g2", torch.bfloat16)
    g3 = _recast(make_peft_adapter(gpt2, d / "g3f", seed=3, r=2), d / "g3", torch.float16)
    lora = load_adapter(g0)
    d0 = save_d2_adapter(d / "d0", random_d2_like(lora, 1), r=2, lora_alpha=4, tau=0.5)
    d1 = save_d2_adapter(
        d / "d1", random_d2_like(lora, 2, keep=lambda n: ".1." not in n, tau=0.3), r=2, lora_alpha=4, tau=0.3
    )
    l0 = make_peft_adapter(llama, d / "l0", seed=0, r=4, lora_alpha=16)
    l1 = _recast(make_peft_adapter(llama, d / "l1f", seed=1, r=2), d / "l1", torch.bfloat16)
    return {"gpt2": [g0, g1, g2, g3, d0, d1], "llama": [l0, l1]}


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_numpy_reader_gives_torchs_factors(adapter_paths, which):
    for p in adapter_paths[which]:
        ta, na = load_adapter(p), load_np_adapter(p)
        assert (na.name, na.method, na.config, list(na.modules)) == (
            ta.name,
            ta.method,
            ta.config,
            list(ta.modules),
        )
        for name, m in ta.modules.items():
            n = na.modules[name]
            assert (n.kind, n.shape, n.scale, n.alpha, n.tau) == (m.kind, m.shape, m.scale, m.alpha, m.tau)
            for f in ("B", "A", "B_neg", "A_neg"):
                t = getattr(m, f)
                if t is not None:
                    np.testing.assert_array_equal(getattr(n, f), t.float().numpy())
            Bf, Af = m.factors()
            nB, nA = n.factors()
            np.testing.assert_array_equal(nB, Bf.numpy())
            np.testing.assert_array_equal(nA, Af.numpy())
        assert np_adapter(ta).modules.keys() == na.modules.keys()


@pytest.mark.parametrize("which,block", [("gpt2", None), ("llama", None), ("gpt2", 5)])
def test_numpy_and_torch_similarity_agree(adapter_paths, which, block, monkeypatch):
    import sys

    if block is not None:  # strips of a few deltas: the block sums and their mirror
        monkeypatch.setattr(sys.modules["loramix.overlap"], "GRAM_BLOCK", block)
    paths = adapter_paths[which]
    res_np = similarity(paths, per_module=True, progress=False, device="cpu")
    res_t = similarity(paths, per_module=True, progress=False, device=TORCH_CPU)
    assert res_np.names == res_t.names
    for field in ("rms", "mean", "coverage", "norms"):
        a, b = getattr(res_np, field).to_numpy(), getattr(res_t, field).to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), field
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, equal_nan=True, err_msg=field)
    np.testing.assert_array_equal(res_np.shared.to_numpy(), res_t.shared.to_numpy())
    np.testing.assert_allclose(res_np.per_module["cosine"], res_t.per_module["cosine"], rtol=0, atol=1e-12)
    # loaded adapters are computed in numpy too, identically
    loaded = similarity([load_adapter(p) for p in paths], progress=False)
    np.testing.assert_array_equal(loaded.rms.to_numpy(), res_np.rms.to_numpy())
    if which == "gpt2":  # the D2 adapters took part (d1 lacks layer 1)
        assert np.isfinite(res_np.rms.iloc[4, 5]) and res_np.coverage.iloc[4, 5] == pytest.approx(0.5)


def _bad_adapters(src, tmp_path):
    """Folders each wrong in one way, from a good adapter folder ``src``."""
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    cases = {
        "missing_B": ({k: v for k, v in tensors.items() if "h.0.attn.c_attn.lora_B" not in k}, config),
        "rank": (tensors, {**config, "r": 7, "rank_pattern": {}}),
        "dora": (tensors, {**config, "use_dora": True}),
        "nan": (
            {k: v.clone().fill_(float("nan")) if "lora_A" in k else v for k, v in tensors.items()},
            config,
        ),
        "three_d": ({k: v[None] if "lora_A" in k else v for k, v in tensors.items()}, config),
        "peft_type": (tensors, {**config, "peft_type": "IA3"}),
        "embedding": ({**tensors, "base_model.model.wte.lora_embedding_A": torch.zeros(2, 3)}, config),
    }
    for case, (ts, cfg) in cases.items():
        d = tmp_path / case
        d.mkdir()
        save_file(ts, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        yield d
    d = tmp_path / "truncated"
    shutil.copytree(src, d)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    yield d


def test_numpy_reader_refuses_what_torchs_refuses(adapter_paths, tmp_path):
    for bad in _bad_adapters(adapter_paths["gpt2"][0], tmp_path):
        with pytest.raises(AdapterError) as t_err:
            load_adapter(bad)
        with pytest.raises(AdapterError) as n_err:
            load_np_adapter(bad)
        if bad.name == "truncated":  # the safetensors library's own words differ between frameworks
            assert n_err.value.message.startswith(t_err.value.message.split(":")[0])
        else:
            assert n_err.value.message == t_err.value.message, bad.name
        # the lazy reader of a similarity run: the same error, when it reads the factor
        with pytest.raises(AdapterError) as s_err:
            similarity([adapter_paths["gpt2"][0], bad], progress=False)
        assert s_err.value.message == n_err.value.message, bad.name


def _bad_dora(src, tmp_path):
    """DoRA folders from the good one ``src``, each wrong in one way."""
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    mag = sorted(k for k in tensors if k.endswith("lora_magnitude_vector"))[1]
    cases = {
        "no_magnitude": {k: v for k, v in tensors.items() if k != mag},
        "magnitude_shape": {**tensors, mag: tensors[mag][:-1]},
        "magnitude_nan": {**tensors, mag: tensors[mag].clone().fill_(float("nan"))},
        "magnitude_2d": {**tensors, mag: tensors[mag][None]},
        "lora_A_missing": {
            k: v for k, v in tensors.items() if k != mag.replace("lora_magnitude_vector", "lora_A.weight")
        },
    }
    for case, ts in cases.items():
        d = tmp_path / case
        d.mkdir()
        save_file(ts, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(config))
        yield d
    d = tmp_path / "not_dora"  # a magnitude in a file whose config has no use_dora
    d.mkdir()
    save_file(tensors, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    yield d


def test_numpy_reader_reads_dora_as_torchs_and_refuses_what_torchs_refuses(tmp_path):
    """A PEFT DoRA adapter (GPT-2 Conv1D) read in numpy: the modules, residual
    factors, scales and magnitudes of the torch reader; the same similarity;
    each broken variant the same one-line error from both readers, eager,
    lazy, and through a similarity run."""
    from .test_formats import _train_magnitudes

    model = tiny_gpt2()
    good = _train_magnitudes(make_peft_adapter(model, tmp_path / "good", seed=1, use_dora=True, r=3), 2)
    other = make_peft_adapter(
        model, tmp_path / "other", seed=2, use_dora=True, r=2, target_modules=["c_attn"]
    )
    n, t = load_np_adapter(good), load_adapter(good)
    assert n.kind == "dora" == str(t.kind.name) and set(n.modules) == set(t.modules)
    for name, m in n.modules.items():
        tm = t.modules[name]
        assert m.kind == "dora" and m.scale == tm.scale and m.num_parameters == tm.kind.num_parameters(tm)
        for f, want in (("B", tm.B), ("A", tm.A), ("magnitude", tm.extra["magnitude"])):
            np.testing.assert_array_equal(np.asarray(getattr(m, f)), want.numpy(), err_msg=f)
    res_np = similarity([good, other], per_module=True, progress=False, device="cpu")
    res_t = similarity([good, other], per_module=True, progress=False, device=TORCH_CPU)
    np.testing.assert_allclose(res_np.per_module["cosine"], res_t.per_module["cosine"], rtol=0, atol=1e-12)
    for bad in _bad_dora(good, tmp_path):
        with pytest.raises(AdapterError) as t_err:
            load_adapter(bad)
        for lazy in (False, True):
            with pytest.raises(AdapterError) as n_err:
                load_np_adapter(bad, lazy=lazy)
            assert n_err.value.message == t_err.value.message, (bad.name, lazy)
        with pytest.raises(AdapterError) as s_err:
            similarity([other, bad], progress=False)
        assert s_err.value.message == t_err.value.message, bad.name


def test_lazy_factors_equal_eager(adapter_paths):
    for p in adapter_paths["gpt2"]:
        eager, lazy = load_np_adapter(p), load_np_adapter(p, lazy=True)
        for name, m in eager.modules.items():
            for f in ("B", "A", "B_neg", "A_neg"):
                if getattr(m, f) is not None:
                    np.testing.assert_array_equal(np.asarray(getattr(lazy.modules[name], f)), getattr(m, f))


def test_similarity_command_imports_no_torch(adapter_paths, tmp_path):
    paths = [str(p) for p in adapter_paths["gpt2"]]
    rc, mods, err = imported_modules("similarity", *paths, "--format", "json", cwd=tmp_path)
    assert rc == 0, err
    assert not any(m.split(".")[0] in ("torch", "transformers") for m in mods), heavy(mods)[:5]
    assert "loramix.io.np_factors" in mods
    rc, mods, err = imported_modules("similarity", *paths[:2], "--per-module", cwd=tmp_path)
    assert rc == 0, err
    assert not any(m.split(".")[0] == "torch" for m in mods)


def test_is_cpu_agrees_with_resolve_device():
    from loramix.devices import is_cpu, resolve_device
    from loramix.errors import UsageError

    assert is_cpu("cpu") and is_cpu("CPU")
    assert is_cpu("auto") == (resolve_device("auto").type == "cpu") == (not torch.cuda.is_available())
    assert is_cpu(None) == is_cpu("auto")
    assert is_cpu(torch.device("cpu"))
    with pytest.raises(UsageError):
        is_cpu("tpu")
    for f in (is_cpu, resolve_device):  # an unset shell variable, `--device "$DEV"`, is not auto
        with pytest.raises(UsageError, match="unknown device ''"):
            f("")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="cuda"):
            is_cpu("cuda")


def test_peft_features_the_numpy_reader_leaves_to_torch(tmp_path):
    """Embedding LoRA and ``modules_to_save`` are read by the torch readers
    and viewed as numpy (DoRA, which they left to torch too, is read in numpy
    now): the same modules, and a similarity by path (numpy) equal to the
    torch path's."""
    model = tiny_llama()
    a = make_peft_adapter(model, tmp_path / "a", seed=1, target_modules=["embed_tokens", "q_proj"], r=3)
    b = make_peft_adapter(
        model, tmp_path / "b", seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"], r=2
    )
    c = make_peft_adapter(model, tmp_path / "c", seed=3, target_modules=["q_proj"], use_dora=True, r=2)
    for p in (a, b, c):
        n, t = load_np_adapter(p), load_adapter(p)
        assert n.kind == str(t.kind.name) and set(n.modules) == set(t.modules), p.name
    assert "model.embed_tokens" in load_np_adapter(a).modules
    res_np = similarity([a, b], per_module=True, progress=False, device="cpu")
    res_t = similarity([a, b], per_module=True, progress=False, device=TORCH_CPU)
    np.testing.assert_allclose(
        res_np.rms.to_numpy(), res_t.rms.to_numpy(), rtol=0, atol=1e-12, equal_nan=True
    )
    np.testing.assert_allclose(res_np.per_module["cosine"], res_t.per_module["cosine"], rtol=0, atol=1e-12)


def test_a_torch_device_reads_the_factors_with_numpy(adapter_paths, monkeypatch):
    """Without a base, a torch device (a GPU's path) reads no adapter with the
    torch readers: each module's numpy stack is moved to the device whole, so
    a bank of adapters never sits in host memory at once."""
    import loramix.io.adapter_files as af
    from loramix.overlap import _one_hot

    def refuse(*a, **k):
        raise AssertionError("read by torch")

    monkeypatch.setattr(af, "load_adapter", refuse)
    paths = adapter_paths["gpt2"]
    res_t = similarity(paths, progress=False, device=TORCH_CPU)
    res_np = similarity(paths, progress=False, device="cpu")
    np.testing.assert_allclose(res_t.rms.to_numpy(), res_np.rms.to_numpy(), rtol=0, atol=1e-12)
    offsets = [0, 2, 3, 7]
    np.testing.assert_array_equal(_one_hot(offsets, TORCH_CPU).numpy(), _one_hot(offsets))
    assert _one_hot(offsets).sum(0).tolist() == [2, 1, 4]


def _old_add(t, col, owners, ip, mant, exp):
    """``_Totals.add`` as it was before its common-case path (the reference)."""
    sq = np.clip(np.diag(ip), 0.0, None)
    root = np.sqrt(sq)
    idx = np.asarray(owners)
    t.norms[idx, col] = np.ldexp(np.abs(mant) * root, exp)
    ok = (sq > 0.0) & (mant != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(ip / np.outer(root, root) * np.sign(np.outer(mant, mant)), -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    valid = np.outer(ok, ok)
    cos_v = np.where(valid, cos, 0.0)
    ix = np.ix_(idx, idx)
    t.shared[ix] += 1
    t.n_cos[ix] += valid
    t.sum_c[ix] += cos_v
    t.sum_c2[ix] += cos_v**2


def test_totals_common_case_has_the_general_bits():
    """Folding a module in by the common case (every adapter, positive scales,
    no zero delta) and by the general one gives the same sums to the bit, and
    so do negative scales, a zero delta and a module some adapters lack."""
    from loramix.overlap import _Totals

    rng = np.random.default_rng(7)
    n = 9
    names = [f"a{i}" for i in range(n)]
    new, ref = _Totals(names, 4, False), _Totals(names, 4, False)
    X = rng.standard_normal((n, 5))
    cases = [
        (list(range(n)), np.ones(n)),
        (list(range(n)), np.where(np.arange(n) == 3, -0.5, 2.0)),
        (list(range(n)), np.where(np.arange(n) == 5, 0.0, 1.0)),
        ([0, 2, 3, 7], np.ones(4)),
    ]
    for col, (owners, mant) in enumerate(cases):
        Y = X[owners] * rng.uniform(0.5, 2.0, size=(len(owners), 1))
        ip = Y @ Y.T
        exp = rng.integers(-3, 3, size=len(owners))
        new.add(col, f"m{col}", owners, ip, mant, exp)
        _old_add(ref, col, owners, ip, mant, exp)
        for f in ("sum_c", "sum_c2", "n_cos", "shared", "norms"):
            a, b = getattr(new, f), getattr(ref, f)
            assert np.array_equal(a, b, equal_nan=True), (col, f)
