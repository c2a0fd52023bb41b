"""``loramix.similarity`` equals a dense float64 reference (form every s B A).

The reference below is deliberately the obvious computation: one dense delta
per adapter and module, ``<X, Y> / (||X|| ||Y||)``, then the means of
DESIGN.md section 2. The library never forms a dense delta for LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix import load_adapter, save_peft_adapter, similarity
from loramix.adapter import Adapter, ModuleDelta
from loramix.errors import AdapterError
from loramix.overlap import breakdown, module_layer_type

from .factories import make_peft_adapter, tiny_gpt2, tiny_llama

TOL = 1e-9


def dense_reference(adapters: list[Adapter], W0: dict | None = None):
    """rms, mean, coverage (N x N) and per-module cosines, all from dense
    float64 deltas. ``W0``: module -> base weight, for D2 effective deltas."""
    N = len(adapters)
    rms, mean, cov = np.full((N, N), np.nan), np.full((N, N), np.nan), np.zeros((N, N))
    per = {}
    for i, a in enumerate(adapters):
        for j, b in enumerate(adapters):
            shared = [m for m in a.modules if m in b.modules]
            union = set(a.modules) | set(b.modules)
            cov[i, j] = len(shared) / len(union)
            cs = []
            for m in shared:
                w = None if W0 is None else W0.get(m)
                X = a.modules[m].delta(w) if w is not None else a.modules[m].residual()
                Y = b.modules[m].delta(w) if w is not None else b.modules[m].residual()
                nx, ny = torch.linalg.matrix_norm(X), torch.linalg.matrix_norm(Y)
                if nx == 0 or ny == 0:
                    continue
                c = float((X * Y).sum() / (nx * ny))
                cs.append(c)
                per[(m, i, j)] = c
            if cs:
                rms[i, j] = math.sqrt(np.mean(np.square(cs)))
                mean[i, j] = np.mean(cs)
    return rms, mean, cov, per


def assert_equals_reference(res, adapters, W0=None):
    rms, mean, cov, per = dense_reference(adapters, W0)
    np.testing.assert_allclose(res.rms.to_numpy(), rms, rtol=0, atol=TOL, equal_nan=True)
    np.testing.assert_allclose(res.mean.to_numpy(), mean, rtol=0, atol=TOL, equal_nan=True)
    np.testing.assert_allclose(res.coverage.to_numpy(), cov, rtol=0, atol=TOL)
    for i, a in enumerate(adapters):
        for m, d in a.modules.items():
            X = d.delta(W0[m]) if W0 is not None and m in W0 else d.residual()
            ref = float(torch.linalg.matrix_norm(X))
            assert res.norms.loc[res.names[i], m] == pytest.approx(ref, rel=TOL, abs=TOL)
    if not res.per_module.empty:
        got = {(r.module, r.i, r.j): r.cosine for r in res.per_module.itertuples()}
        want = {k: v for k, v in per.items() if k[1] < k[2]}
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=TOL)


def perturbed_copy(ad: Adapter, folder, seed: int, noise: float, sign: float = 1.0, alpha_scale: float = 1.0):
    """A related adapter: the same factors plus noise, written as PEFT."""
    g = torch.Generator().manual_seed(seed)
    factors, alphas = {}, {}
    for name, m in ad.modules.items():
        B = sign * m.B + noise * torch.randn(m.B.shape, generator=g)
        A = m.A + noise * torch.randn(m.A.shape, generator=g)
        factors[name] = (B, A)
        alphas[name] = m.alpha * alpha_scale
    return save_peft_adapter(
        folder, factors, alphas=alphas, fan_in_fan_out=bool(ad.config.get("fan_in_fan_out"))
    )


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    model = tiny_gpt2()
    p0 = make_peft_adapter(
        model,
        d / "g0",
        seed=0,
        r=4,
        lora_alpha=8,
        rank_pattern={"c_fc": 2},
        alpha_pattern={"h.1.attn.c_proj": 3},
    )
    p1 = make_peft_adapter(model, d / "g1", seed=1, r=3, lora_alpha=5, use_rslora=True)
    p2 = make_peft_adapter(model, d / "g2", seed=2, r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"])
    p3 = perturbed_copy(load_adapter(p0), d / "g3", seed=3, noise=0.05, alpha_scale=0.5)
    p4 = perturbed_copy(load_adapter(p1), d / "g4", seed=4, noise=0.05, sign=-1.0)
    return [p0, p1, p2, p3, p4]


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("l")
    model = tiny_llama()
    p0 = make_peft_adapter(model, d / "l0", seed=0, r=4, lora_alpha=16, rank_pattern={r"layers\.1\..*": 2})
    p1 = make_peft_adapter(
        model,
        d / "l1",
        seed=1,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    p2 = perturbed_copy(load_adapter(p0), d / "l2", seed=2, noise=0.1)
    return [p0, p1, p2]


@pytest.mark.parametrize("which", ["gpt2_adapters", "llama_adapters"])
def test_equals_dense_reference(request, which):
    paths = request.getfixturevalue(which)
    res = similarity(paths, per_module=True, progress=False)
    ads = [load_adapter(p) for p in paths]
    assert res.names == [a.name for a in ads]
    assert_equals_reference(res, ads)
    # related adapters are found related, negated ones anti-correlated
    rms = res.rms.to_numpy()
    assert np.allclose(np.diag(rms), 1.0)
    if which == "gpt2_adapters":
        assert rms[0, 3] > 0.5 and res.mean.iloc[1, 4] < -0.5 and rms[1, 4] > 0.5
        assert res.coverage.iloc[0, 2] == pytest.approx(4 / 8)


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_matrices_are_symmetric_with_ones_on_the_diagonal_to_the_bit(gpt2_adapters, device):
    """cos(i, j) and cos(j, i) are one number, and an adapter's cosine with
    itself is exactly 1 (they differed in the last bit: BLAS sums a strip's
    X X^T in other orders on the two sides, and sqrt(x)^2 is not x)."""
    res = similarity(
        gpt2_adapters, progress=False, device="cpu" if device == "numpy" else torch.device(device)
    )
    for m in (res.rms, res.mean):
        a = m.to_numpy()
        assert np.array_equal(a, a.T, equal_nan=True) and (np.diag(a) == 1.0).all()


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_a_pair_gets_the_same_bits_in_any_order_of_the_adapters(gpt2_adapters, device):
    """A pair's cosines do not depend on the order the adapters are given in
    (they differed in the last bit, so that `loramix predict B A` called the
    cosine of a composition the fit was made on "outside the fitted range"
    where `predict A B` did not, and `plan`'s costs changed with the order)."""
    import itertools

    dev = "cpu" if device == "numpy" else torch.device(device)
    paths = gpt2_adapters[:3]
    ref = similarity(paths, per_module=True, progress=False, device=dev)
    key = ["module", "a", "b"]
    for perm in itertools.permutations(range(3)):
        res = similarity([paths[i] for i in perm], per_module=True, progress=False, device=dev)
        for got, want in ((res.rms, ref.rms), (res.mean, ref.mean)):
            assert np.array_equal(got.loc[ref.names, ref.names].to_numpy(), want.to_numpy()), perm
        # the per-module table names each pair in the order given: compare it pair by pair
        per = res.per_module.copy()
        flip = per["a"].map(ref.names.index) > per["b"].map(ref.names.index)
        per.loc[flip, ["a", "b"]] = per.loc[flip, ["b", "a"]].to_numpy()
        merged = per.merge(ref.per_module, on=key, suffixes=("", "_ref"))
        assert len(merged) == len(ref.per_module) and (merged["cosine"] == merged["cosine_ref"]).all(), perm


def test_cli_table_shows_rms_signed_mean_and_coverage(gpt2_adapters, capsys):
    """The table gives the three matrices the README names (the signed mean
    was in the JSON only), headed by the adapters' names alone."""
    from loramix.cli import main

    assert main(["similarity", *map(str, gpt2_adapters[:3])]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        "RMS cosine similarity of deltas (3 adapters)", "signed mean cosine", "coverage (shared / union modules)"
    ]  # fmt: skip
    assert all(b.splitlines()[1].split() == ["g0", "g1", "g2"] for b in blocks)
    assert "+1.0000" in blocks[1] and not any(line.strip() == "adapter" for line in out.splitlines())


def test_cli_plot_title_says_what_the_heatmap_shows(gpt2_adapters, tmp_path, monkeypatch, capsys):
    """``similarity --plot``: the figure was titled "RMS cosine similarity",
    not of what nor of how many adapters; it now heads it as the table does."""
    import matplotlib.figure

    from loramix.cli import main

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        seen["title"] = fig.axes[0].get_title()
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert main(["similarity", *map(str, gpt2_adapters[:3]), "--plot", str(tmp_path / "s.png")]) == 0
    assert (
        seen["title"]
        == capsys.readouterr().out.splitlines()[0]
        == "RMS cosine similarity of deltas (3 adapters)"
    )


@pytest.mark.parametrize("block", [1, 5])
def test_blocked_gram_equals_reference(gpt2_adapters, monkeypatch, block):
    """Small Gram blocks: the upper-triangular block pass and its mirror."""
    import sys

    monkeypatch.setattr(sys.modules["loramix.overlap"], "GRAM_BLOCK", block)
    ads = [load_adapter(p) for p in gpt2_adapters]
    assert_equals_reference(similarity(ads, per_module=True, progress=False), ads)


def test_accepts_loaded_adapters_and_reads_each_file_once(gpt2_adapters, monkeypatch):
    import loramix.io.np_factors as npf  # the reader of paths on the CPU

    calls = []
    real = npf.load_np_adapter

    def counting(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(npf, "load_np_adapter", counting)
    res = similarity(gpt2_adapters, progress=False)
    assert len(calls) == len(gpt2_adapters)
    ads = [load_adapter(p) for p in gpt2_adapters]
    res2 = similarity(ads, progress=False)
    assert len(calls) == len(gpt2_adapters)
    np.testing.assert_array_equal(res.rms.to_numpy(), res2.rms.to_numpy())


def test_zero_norm_modules_excluded_and_reported(gpt2_adapters):
    a, b = load_adapter(gpt2_adapters[0]), load_adapter(gpt2_adapters[3])
    zeroed = "transformer.h.0.mlp.c_fc"
    b.modules[zeroed].B = torch.zeros_like(b.modules[zeroed].B)
    res = similarity([a, b], per_module=True, progress=False)
    assert res.zero_norm.to_dict(orient="records") == [{"adapter": b.name, "module": zeroed}]
    assert res.norms.loc[b.name, zeroed] == 0.0
    assert res.shared.iloc[0, 1] == len(a) - 1 and res.coverage.iloc[0, 1] == 1.0
    assert zeroed not in set(res.per_module["module"])
    assert_equals_reference(res, [a, b])
    # an adapter that is zero everywhere has no cosine with anything
    for m in b.modules.values():
        m.B = torch.zeros_like(m.B)
    res = similarity([a, b], progress=False)
    assert math.isnan(res.rms.iloc[0, 1]) and math.isnan(res.rms.iloc[1, 1])


def test_disjoint_modules_give_nan(llama_adapters):
    a = load_adapter(llama_adapters[0])
    b = load_adapter(llama_adapters[1])
    b.modules = {k: v for k, v in b.modules.items() if "q_proj" in k}
    a.modules = {k: v for k, v in a.modules.items() if "q_proj" not in k}
    res = similarity([a, b], progress=False)
    assert math.isnan(res.rms.iloc[0, 1]) and res.coverage.iloc[0, 1] == 0.0


def test_different_bases_refused(gpt2_adapters, tmp_path):
    big = make_peft_adapter(tiny_gpt2(n_embd=48), tmp_path / "big", r=2)
    with pytest.raises(AdapterError, match="different base models"):
        similarity([gpt2_adapters[0], big], progress=False)


def test_duplicate_names_made_unique(gpt2_adapters, tmp_path):
    a = load_adapter(gpt2_adapters[0], name="task")
    b = load_adapter(gpt2_adapters[1], name="task")
    res = similarity([a, b, a], progress=False)
    assert len(set(res.names)) == 3 and list(res.rms.index) == res.names


def test_d2_residual_is_used_without_base():
    g = torch.Generator().manual_seed(0)

    def d2(seed_shift):
        mods = {}
        for k, (o, i) in enumerate([(6, 5), (4, 7)]):
            r = 2
            mods[f"model.layers.{k}.mlp.up_proj"] = ModuleDelta(
                name=f"model.layers.{k}.mlp.up_proj",
                B=torch.randn(o, r, generator=g),
                A=torch.randn(r, i, generator=g),
                B_neg=torch.randn(o, r, generator=g),
                A_neg=torch.randn(r, i, generator=g),
                scale=1.5 + seed_shift,
                alpha=3.0,
                tau=0.5,
            )
        return Adapter(name=f"d2_{seed_shift}", kind="d2lora", modules=mods)

    ads = [d2(0), d2(1)]
    res = similarity(ads, per_module=True, progress=False)
    assert not res.effective
    assert_equals_reference(res, ads)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])  # numpy, torch
@pytest.mark.parametrize(
    "factors",
    [
        [(1e200, 1.0), (1e-80, 1e-80), (1e80, 1e80)],
        [
            (1.0, 1.0),
            (1e-200, 1.0),
            (1.0, 2.0),
        ],  # one adapter whose squares underflow to 0, among ordinary ones
    ],
)
def test_float64_factors_far_from_one_give_the_same_cosines(gpt2_adapters, tmp_path, device, factors):
    """Float64 adapter files can hold factors of 1e+-200, whose squared norms
    leave float64 (before: NaN cosines and every module listed as a zero
    delta at 1e160 and 1e-200, 0.6% off at 1e-160): the cosines are those of
    the same adapters at unit size, and the norms are scaled."""
    from safetensors.torch import load_file, save_file

    def scaled(src, name, fb, fa):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        t = load_file(dst / "adapter_model.safetensors")
        t = {k: v.double() * (fb if "lora_B" in k else fa) for k, v in t.items()}
        save_file(t, dst / "adapter_model.safetensors", metadata={"format": "pt"})
        return dst

    srcs = gpt2_adapters[:3]
    ref = similarity(srcs, per_module=True, progress=False, device=device)
    got = similarity([scaled(p, f"s{k}", *f) for k, (p, f) in enumerate(zip(srcs, factors))],
                     per_module=True, progress=False, device=device)  # fmt: skip
    assert got.zero_norm.empty and np.isfinite(got.rms.to_numpy()).all()
    for a, b in ((got.rms, ref.rms), (got.mean, ref.mean)):
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.per_module["cosine"], ref.per_module["cosine"], rtol=0, atol=1e-12)
    for k, (fb, fa) in enumerate(factors):
        np.testing.assert_allclose(got.norms.iloc[k], ref.norms.iloc[k] * fb * fa, rtol=1e-12)


def test_json_with_modules_without_layer_index():
    import json

    g = torch.Generator().manual_seed(0)
    ads = []
    for t in range(2):
        mods = {
            n: ModuleDelta(
                name=n,
                B=torch.randn(4, 2, generator=g),
                A=torch.randn(2, 3, generator=g),
                scale=1.0,
                alpha=2.0,
            )
            for n in ("lm_head", "model.layers.0.q_proj")
        }
        ads.append(Adapter(name=f"a{t}", kind="lora", modules=mods))
    res = similarity(ads, per_module=True, progress=False)
    data = json.loads(json.dumps(res.to_json_dict(per_module=True), allow_nan=False))
    assert {r["layer"] for r in data["by_layer"]} == {None, 0}
    assert {r["type"] for r in data["by_type"]} == {"lm_head", "q_proj"}


def test_layer_and_type_parsing():
    assert module_layer_type("transformer.h.3.attn.c_attn") == (3, "attn.c_attn")
    assert module_layer_type("transformer.h.11.mlp.c_proj") == (11, "mlp.c_proj")
    assert module_layer_type("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert module_layer_type("lm_head") == (None, "lm_head")


def test_breakdown_by_type_and_layer(llama_adapters):
    res = similarity(llama_adapters, per_module=True, progress=False)
    ads = [load_adapter(p) for p in llama_adapters]
    _, _, _, per = dense_reference(ads)
    by_layer = breakdown(res.per_module, "layer")
    for row in by_layer.itertuples():
        i, j = res.names.index(row.a), res.names.index(row.b)
        cs = [c for (m, a, b), c in per.items() if (a, b) == (i, j) and module_layer_type(m)[0] == row.layer]
        assert row.rms == pytest.approx(math.sqrt(np.mean(np.square(cs))), abs=TOL)
        assert row.mean == pytest.approx(np.mean(cs), abs=TOL) and row.modules == len(cs)
    by_type = breakdown(res.per_module, "type")
    # l0 and l2 share all seven projections, l1 only three
    assert len(by_type) == 7 + 3 + 3
    assert set(by_type[by_type["a"] == res.names[1]]["type"]) == {
        "self_attn.q_proj",
        "self_attn.v_proj",
        "mlp.up_proj",
    }


# ---------------------------------------------------------------- properties


@st.composite
def adapter_sets(draw):
    """2-4 adapters over up to 4 modules of random tiny shapes; each adapter
    takes a random non-empty subset of modules, random rank 1-4 and scale."""
    n_mod = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(n_mod)]
    n = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ads = []
    for t in range(n):
        subset = draw(st.lists(st.integers(0, n_mod - 1), min_size=1, max_size=n_mod, unique=True))
        mods = {}
        for k in sorted(subset):
            o, i = shapes[k]
            r = draw(st.integers(1, 4))
            dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
            name = f"model.layers.{k}.proj"
            mods[name] = ModuleDelta(
                name=name,
                B=torch.randn(o, r, generator=g).to(dtype),
                A=torch.randn(r, i, generator=g).to(dtype),
                scale=draw(st.floats(0.01, 10.0)) * draw(st.sampled_from([1.0, -1.0])),
                alpha=1.0,
            )
        ads.append(Adapter(name=f"a{t}", kind="lora", modules=mods))
    return ads


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter_sets())
def test_property_equals_dense_reference(ads):
    res = similarity(ads, per_module=True, progress=False)
    assert_equals_reference(res, ads)
    rms = res.rms.to_numpy()
    ok = ~np.isnan(rms)
    assert np.all(rms[ok] <= 1.0 + 1e-12) and np.all(rms[ok] >= 0.0)
    np.testing.assert_allclose(rms, rms.T, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(adapter_sets(), st.floats(0.1, 10.0))
def test_property_scale_invariance(ads, c):
    """Scaling one adapter changes its norms by |c| and no cosine (sign flips
    the signed mean only)."""
    res = similarity(ads, progress=False)
    for m in ads[0].modules.values():
        m.scale *= -c
    res2 = similarity(ads, progress=False)
    np.testing.assert_allclose(res2.rms.to_numpy(), res.rms.to_numpy(), atol=TOL, equal_nan=True)
    np.testing.assert_allclose(
        res2.mean.to_numpy()[0, 1:], -res.mean.to_numpy()[0, 1:], atol=TOL, equal_nan=True
    )
    np.testing.assert_allclose(
        res2.norms.to_numpy()[0], c * res.norms.to_numpy()[0], rtol=1e-12, equal_nan=True
    )


# ---------------------------------------------------------- D2 with a base


def random_d2_like(lora: Adapter, seed: int, keep=lambda name: True, tau: float = 0.5) -> dict:
    """D2-LoRA modules with the names and shapes of a real PEFT adapter."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, m in lora.modules.items():
        if not keep(name):
            continue
        (o, i), r = m.shape, 2
        mods[name] = ModuleDelta(
            name=name,
            B=0.3 * torch.randn(o, r, generator=g),
            A=0.3 * torch.randn(r, i, generator=g),
            B_neg=0.3 * torch.randn(o, r, generator=g),
            A_neg=0.3 * torch.randn(r, i, generator=g),
            scale=2.0,
            alpha=4.0,
            tau=tau,
        )
    return mods


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_d2_effective_deltas_with_base(tmp_path, arch, capsys):
    import json

    from loramix.cli import main
    from loramix.io.adapter_files import save_d2_adapter

    from .factories import save_base

    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    base = save_base(model, tmp_path / "base")
    lora_path = make_peft_adapter(model, tmp_path / "lora", r=2, lora_alpha=4)
    lora = load_adapter(lora_path)
    d2a = save_d2_adapter(tmp_path / "d2a", random_d2_like(lora, 1), r=2, lora_alpha=4, tau=0.5)
    d2b = save_d2_adapter(
        tmp_path / "d2b",
        random_d2_like(lora, 2, keep=lambda n: ".1." not in n, tau=0.3),
        r=2,
        lora_alpha=4,
        tau=0.3,
    )
    paths = [d2a, d2b, lora_path]
    ads = [load_adapter(p) for p in paths]
    # W0 in (out, in): GPT-2's Conv1D stores (in, out)
    sd = model.state_dict()
    W0 = {}
    for name in lora.modules:
        w = sd[name + ".weight"].double()
        W0[name] = w.T if arch == "gpt2" else w

    res = similarity(paths, base=base, per_module=True, progress=False)
    assert res.effective
    assert_equals_reference(res, ads, W0)
    # the effective delta is not the residual: the numbers must move
    res0 = similarity(paths, progress=False)
    assert_equals_reference(res0, ads)
    assert np.abs(res0.rms.to_numpy() - res.rms.to_numpy()).max() > 1e-5

    assert main(["similarity", str(d2a), str(d2b), "--base", str(base), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["delta"] == "effective"
    assert data["rms"][0][1] == pytest.approx(res.rms.iloc[0, 1], abs=TOL)


def test_an_effective_delta_beyond_float64_is_refused_in_one_line(tmp_path, capsys):
    """A float64 D2 file with ``B+`` and ``B-`` of 1e200: its residual has cosines (the
    factors are brought to unit size), but against a base its effective
    delta's squared norm overflows float64 (formed from ``W0``, the gains and
    the factors as they are): one line naming the file and the module, exit 2."""
    from loramix.io.adapter_files import save_d2_adapter

    from .factories import one_line_error, save_base

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    lora = load_adapter(make_peft_adapter(model, tmp_path / "lora", r=2, lora_alpha=4))
    d2a = save_d2_adapter(tmp_path / "d2a", random_d2_like(lora, 1), r=2, lora_alpha=4, tau=0.5)
    mods = random_d2_like(lora, 2)
    for m in mods.values():
        m.B, m.A, m.B_neg, m.A_neg = (
            m.B.double() * 1e200,
            m.A.double(),
            m.B_neg.double() * 1e200,
            m.A_neg.double(),
        )
    big = save_d2_adapter(tmp_path / "big", mods, r=2, lora_alpha=4, tau=0.5)
    res = similarity([d2a, big], progress=False)
    ref = similarity([d2a, save_d2_adapter(tmp_path / "unit", random_d2_like(lora, 2), r=2, lora_alpha=4, tau=0.5)],
                     progress=False)  # fmt: skip
    np.testing.assert_allclose(res.rms.to_numpy(), ref.rms.to_numpy(), rtol=0, atol=1e-12)
    capsys.readouterr()  # save_base's progress bar
    one_line_error(
        capsys, ["similarity", d2a, big, "--base", base], str(big), "module model.layers.0.", "float64"
    )


@pytest.mark.cuda
def test_cuda_equals_cpu(gpt2_adapters):
    ads = [load_adapter(p) for p in gpt2_adapters]
    cpu = similarity(ads, per_module=True, progress=False, device="cpu")
    gpu = similarity(ads, per_module=True, progress=False, device="cuda")
    np.testing.assert_allclose(gpu.rms.to_numpy(), cpu.rms.to_numpy(), atol=TOL, equal_nan=True)
    np.testing.assert_allclose(gpu.norms.to_numpy(), cpu.norms.to_numpy(), rtol=1e-12, equal_nan=True)


def test_heatmap_scale_follows_the_off_diagonal_values(tmp_path, monkeypatch):
    """Real adapters' cosines are often below 0.1: the heatmap's colour scale
    ends at the largest off-diagonal value rounded up (1, 2 or 5 times a power
    of ten), the diagonal is drawn apart in grey, cells get 3 decimals, and the
    colour bar is labelled."""
    import matplotlib.figure
    import pandas as pd

    from loramix.plots import nice_ceiling, similarity_heatmap

    assert [nice_ceiling(x) for x in (0.057, 0.05, 0.3, 1.0, 0.0, 0.0011, 7.0)] == [
        0.1, 0.05, 0.5, 1.0, 0.001, 0.002, 10.0]  # fmt: skip
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        seen["clims"] = [im.get_clim() for im in fig.axes[0].images]
        seen["texts"] = [t.get_text() for t in fig.axes[0].texts]
        seen["label"] = fig.axes[1].get_ylabel()
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    names = ["a", "b", "c"]
    m = pd.DataFrame(
        [[1.0, 0.057, 0.01], [0.057, 1.0, float("nan")], [0.01, float("nan"), 1.0]], names, names
    )
    assert similarity_heatmap(m, tmp_path / "s.png").stat().st_size > 0
    assert seen["clims"][-1] == (0.0, 0.1)  # the cosines' scale; the diagonal's grey layer is apart
    assert seen["texts"][:3] == ["1.000", "0.057", "0.010"] and "n/a" in seen["texts"]
    assert seen["label"] == "RMS cosine (diagonal: grey)"
    similarity_heatmap(m.mul(3), tmp_path / "t.png", vmin=-1, vmax=1, label="mean cosine")
    assert (
        seen["clims"][-1] == (-1, 1)
        and seen["texts"][1] == "0.17"
        and seen["label"].startswith("mean cosine")
    )
    # above 25 adapters cells are bare: a pair with no cosine is white, and the colour bar says so
    big = pd.DataFrame(np.eye(30) + 0.01 * (1 - np.eye(30)), range(30), range(30))
    similarity_heatmap(big, tmp_path / "u.png")
    assert seen["texts"] == [] and seen["label"] == "RMS cosine (diagonal: grey)"
    big.iloc[3, 7] = big.iloc[7, 3] = float("nan")
    similarity_heatmap(big, tmp_path / "v.png")
    assert seen["label"] == "RMS cosine (diagonal: grey; white: n/a)"


def test_heatmap_of_long_adapter_names_keeps_its_matrix(tmp_path, monkeypatch):
    """Adapters whose names collide are named by their full paths: labels of
    60+ characters took the whole figure and squeezed the matrix to a line.
    Tick labels are shortened in the middle, still unique, and the matrix
    keeps most of the figure."""
    import matplotlib.figure
    import pandas as pd

    from loramix.plots import LABEL_CHARS, short_labels, similarity_heatmap

    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        ax = fig.axes[0]
        seen["x"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["y"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["box"] = ax.get_position()
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    names = [
        f"/very/long/path/to/adapters/run-2024-11-30/domain_{i}_lora_r16_alpha32/adapter" for i in range(5)
    ]
    m = pd.DataFrame(np.eye(5) + 0.01 * (1 - np.eye(5)), names, names)
    similarity_heatmap(m, tmp_path / "s.png")
    for labels in (seen["x"], seen["y"]):
        assert len(set(labels)) == 5 and max(map(len, labels)) <= LABEL_CHARS, labels
    assert seen["box"].width > 0.3 and seen["box"].height > 0.3, seen["box"]
    # short names stay as they are; ends that collide keep their start too
    assert short_labels(["a", "b"]) == ["a", "b"]
    alike = ["x" * 40 + "/one/" + "z" * 40, "x" * 40 + "/two/" + "z" * 40]
    assert short_labels(alike) == alike  # alike at both ends: whole
    ends = ["first-" + "y" * 40, "second-" + "y" * 40]
    assert len(set(short_labels(ends))) == 2 and max(map(len, short_labels(ends))) <= LABEL_CHARS


# ---------------------------------------------------------- effective deltas from the factors


def _random_module(kind: str, o: int, i: int, g: torch.Generator) -> ModuleDelta:
    """``lora``, ``dora`` (rows), ``dora-emb`` (an embedding's columns), ``d2``
    (rows) or ``d2-col`` (``norm_dim`` 0), rank 1 to 4, trained-looking magnitudes."""
    r = int(torch.randint(1, 5, (1,), generator=g))
    B, A = 0.3 * torch.randn(o, r, generator=g), 0.3 * torch.randn(r, i, generator=g)
    if kind == "lora":
        return ModuleDelta(name="m", B=B, A=A, scale=2.0, alpha=2.0 * r)
    if kind.startswith("dora"):
        emb = kind == "dora-emb"
        extra = {"magnitude": 1 + torch.rand(i if emb else o, generator=g)}
        return ModuleDelta(
            name="m", B=B, A=A, scale=2.0, alpha=2.0 * r, kind="dora",
            extra={**extra, "layout": "embedding"} if emb else extra,
        )  # fmt: skip
    Bn, An = 0.3 * torch.randn(o, r, generator=g), 0.3 * torch.randn(r, i, generator=g)
    nd = 0 if kind == "d2-col" else 1
    return ModuleDelta(
        name="m", B=B, A=A, B_neg=Bn, A_neg=An, scale=2.0, alpha=2.0 * r, kind="d2lora", tau=0.4, norm_dim=nd
    )


@pytest.mark.parametrize(
    "kinds",
    [
        ["dora", "dora", "lora"],
        ["d2", "d2-col", "lora"],
        ["dora", "d2-col", "d2", "lora"],
        ["dora-emb", "d2-col", "lora", "lora"],
        ["dora"],
        ["d2-col", "d2-col"],
    ],
)
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 33)])
def test_effective_inner_products_equal_the_dense_deltas(kinds, shape):
    """With a base, the inner products of effective deltas come from the factors,
    ``W0`` and per-row or per-column gains (docs/adapters.md): equal to those of
    the dense ``W_hat - W0`` (:meth:`ModuleDelta.delta`) to 1e-13 of the norms,
    row gains (DoRA, D2), column gains (D2 ``norm_dim`` 0, DoRA on an
    embedding), LoRA residuals and both kinds of gain in one module."""
    from loramix.overlap import _effective_inner_products

    # crc32, not hash(): a str's hash() changes with each process (PYTHONHASHSEED), so each run drew
    # other modules and a failing draw could not be run again
    g = torch.Generator().manual_seed(zlib.crc32(repr((kinds, shape)).encode()))
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    ds = [_random_module(k, *shape, g) for k in kinds]
    dense = [d.delta(W0) for d in ds]
    ref = torch.tensor([[float((x * y).sum()) for y in dense] for x in dense], dtype=torch.float64)
    got = _effective_inner_products(ds, W0)
    scale = torch.sqrt(torch.outer(ref.diag(), ref.diag()))
    assert float(((got - ref).abs() / scale).max()) < 1e-13
    assert torch.equal(got, got.T)


def _cancelling(d: ModuleDelta, W0: torch.Tensor, rho: float) -> ModuleDelta:
    """``d`` with row 0 (column 0 for gains along columns) of its residual
    ``dW`` set to ``-(1 - rho)`` times ``W0``'s: ``V = W0 + dW`` keeps ``rho`` of it."""
    B, A = d.B.double().clone(), d.A.double().clone()
    f = -(1 - rho) / d.scale
    if d.kind.norm_axis(d) == 0:
        B[:, 0], A[:, 0], A[0, 0] = W0[:, 0], 0.0, f
    else:
        A[0], B[0], B[0, 0] = W0[0], 0.0, f
    extra = {}
    if d.B_neg is not None:  # the negative branch left out of that row / column
        Bn, An = d.B_neg.double().clone(), d.A_neg.double().clone()
        if d.norm_dim == 0:
            An[:, 0] = 0.0
        else:
            Bn[0] = 0.0
        extra = dict(B_neg=Bn, A_neg=An)
    return dataclasses.replace(d, B=B, A=A, **extra)


def _long_double_delta(d: ModuleDelta, W0: torch.Tensor) -> np.ndarray:
    """``W_hat - W0`` of a DoRA (rows) or D2 module in numpy long double."""
    L = np.longdouble
    W = W0.numpy().astype(L)
    dW = L(d.scale) * (d.B.double().numpy().astype(L) @ d.A.double().numpy().astype(L))
    if d.B_neg is not None:
        dW -= (
            L(d.scale) * L(d.tau) * (d.B_neg.double().numpy().astype(L) @ d.A_neg.double().numpy().astype(L))
        )
    ax = d.kind.norm_axis(d)
    V = W + dW
    nV = np.sqrt((V * V).sum(axis=ax, keepdims=True))
    if d.kind.name == "dora":
        c = d.extra["magnitude"].double().numpy().astype(L)[:, None] / nV
        return (c - 1) * W + c * dW
    c = np.sqrt((W * W).sum(axis=ax, keepdims=True)) / np.maximum(nV, L(d.eps))
    return (c - 1) * W + (c + 1) * dW


@pytest.mark.parametrize(
    "kinds", [["d2", "lora"], ["d2-col", "lora"], ["dora", "lora", "d2"], ["d2", "d2-col"]]
)
def test_effective_inner_products_where_a_row_nearly_cancels(kinds):
    """A row (column) of ``V = W0 + dW`` with ``rho = ||V_n|| / ||W0_n|| =
    1e-7``: the three-term ``||V_n||^2`` and the four-term inner products
    cancel (error about ``u / rho^2``: the cosine was off by 1e-5 and a
    squared norm by 1e-3 against long double); that row is now formed
    densely, as :meth:`ModuleDelta.delta` forms it (error about ``u / rho``).
    Both deltas of ``d2, d2-col`` cancel, one along rows and one along columns."""
    from loramix.overlap import _effective_inner_products

    g = torch.Generator().manual_seed(7)
    W0 = torch.randn(24, 40, generator=g, dtype=torch.float64)
    ds = [_random_module(k, 24, 40, g) for k in kinds]
    ds = [_cancelling(d, W0, 1e-7) if d.kind.needs_base else d for d in ds]
    E = [
        _long_double_delta(d, W0) if d.kind.needs_base else d.delta(W0).numpy().astype(np.longdouble)
        for d in ds
    ]
    ref = np.array([[(x * y).sum() for y in E] for x in E])
    got = _effective_inner_products(ds, W0).numpy()
    norms = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    err = np.abs(got - ref) / norms
    assert float(err.max()) < 1e-10, err
    assert np.array_equal(got, got.T)


def test_dora_similarity_with_base_equals_peft_merged_deltas(tmp_path, monkeypatch):
    """``similarity --base`` on PEFT DoRA adapters (trained magnitudes) equals the
    cosines and norms of the deltas PEFT's ``merge_and_unload`` writes into a
    float64 model, to 1e-12, without forming any dense effective delta
    (``DoraKind.delta`` refused: the former code formed one per adapter and
    module, ``n`` dense ``(out, in)`` float64 matrices at once)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from loramix.kinds.dora import DoraKind

    from .factories import save_base

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    paths = []
    for k, (r, tm) in enumerate([(3, targets), (2, targets), (4, ["q_proj", "down_proj"])]):
        p = make_peft_adapter(model, tmp_path / f"a{k}", seed=k + 1, target_modules=tm, use_dora=True, r=r)
        f = p / "adapter_model.safetensors"
        ts = load_file(str(f))
        gm = torch.Generator().manual_seed(10 + k)
        for key in sorted(ts):  # PEFT saves the magnitude as its init ||W0 + s B A||_row: move it
            if key.endswith("lora_magnitude_vector"):
                ts[key] = ts[key] * (1 + 0.3 * torch.rand(ts[key].shape, generator=gm))
        save_file(ts, str(f))
        paths.append(p)

    sd0 = {k: v.double() for k, v in model.state_dict().items()}
    deltas = []
    for p in paths:
        merged = PeftModel.from_pretrained(tiny_llama().double(), str(p)).merge_and_unload().state_dict()
        deltas.append(
            {
                k[: -len(".weight")]: merged[k].double() - sd0[k]
                for k in sd0
                if not torch.equal(merged[k].double(), sd0[k])
            }
        )

    def refused(self, m, W0, dtype=torch.float64, device=None):
        raise AssertionError("a dense DoRA effective delta was formed")

    monkeypatch.setattr(DoraKind, "delta", refused)
    res = similarity(paths, base=base, per_module=True, progress=False)
    assert res.effective and len(res.per_module) == 6 + 4 + 4  # a2 lacks v_proj
    for row in res.per_module.itertuples():
        x, y = deltas[row.i][row.module], deltas[row.j][row.module]
        assert row.cosine == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), rel=1e-12, abs=1e-14)
    for i, d in enumerate(deltas):
        for mod, x in d.items():
            assert res.norms.loc[res.names[i], mod] == pytest.approx(float(x.norm()), rel=1e-12)


@pytest.mark.cuda
def test_effective_inner_products_cuda_equal_cpu():
    """The same factored effective inner products on the GPU (``--device cuda --base``)."""
    from loramix.overlap import _effective_inner_products

    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(48, 40, generator=g, dtype=torch.float64)
    ds = [_random_module(k, 48, 40, g) for k in ["dora", "d2-col", "d2", "lora"]]
    cpu = _effective_inner_products(ds, W0)
    gpu = _effective_inner_products(ds, W0.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=0)


def test_similarity_of_dora_lora_and_d2_on_gpt2_equals_the_dense_merged_deltas(tmp_path, capsys):
    """A PEFT DoRA, a PEFT LoRA and two D2-LoRA adapters (row and column
    projections) on GPT-2's ``Conv1D``: with the base, every per-module cosine
    and norm equals that of the dense ``W_hat - W0`` (DoRA and LoRA: what
    PEFT's ``merge_and_unload`` adds to a float64 copy; D2-LoRA: the formula of
    docs/d2lora.md) to 1e-9. Without the base, one note line names the
    adapters compared on their residuals (before: nothing said so)."""
    import json

    from peft import PeftModel

    from loramix.cli import main
    from loramix.io.adapter_files import save_d2_adapter
    from loramix.io.model_folder import BaseModelFolder

    from .factories import save_base
    from .test_formats import _train_magnitudes

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    dora = _train_magnitudes(make_peft_adapter(model, tmp_path / "dora", seed=1, use_dora=True, r=3), 2)
    lora = make_peft_adapter(model, tmp_path / "lora", seed=3, r=2, target_modules=["c_attn", "c_proj"])
    sd0 = {k: v.double() for k, v in model.state_dict().items()}
    dense = {}
    for p in (dora, lora):
        merged = PeftModel.from_pretrained(tiny_gpt2().double(), str(p)).merge_and_unload().state_dict()
        # Conv1D weights are (in, out): transposed to the (out, in) of the D2 deltas below
        dense[p.name] = {k[:-7]: (merged[k] - sd0[k]).T for k in sd0 if not torch.equal(merged[k], sd0[k])}
    bf, g = BaseModelFolder(base), torch.Generator().manual_seed(9)
    for nd in (1, 0):
        mods, dense[f"d2_{nd}"] = {}, {}
        for name in (
            "transformer.h.0.attn.c_attn",
            "transformer.h.1.attn.c_proj",
            "transformer.h.1.mlp.c_fc",
        ):
            W0 = bf.read_module_weight(name, dtype=torch.float64)
            (o, i), r = W0.shape, 2
            f = [
                0.3 * torch.randn(*s, generator=g, dtype=torch.float64)
                for s in ((o, r), (r, i), (o, r), (r, i))
            ]
            mods[name] = ModuleDelta(name=name, B=f[0], A=f[1], B_neg=f[2], A_neg=f[3], scale=2.0, alpha=4.0,
                                     tau=0.4, norm_dim=nd, kind="d2lora")  # fmt: skip
            dW = 2.0 * (f[0] @ f[1] - 0.4 * f[2] @ f[3])
            V = W0 + dW
            c = W0.norm(dim=nd, keepdim=True) / V.norm(dim=nd, keepdim=True).clamp(min=1e-8)
            dense[f"d2_{nd}"][name] = c * V + dW - W0
        save_d2_adapter(tmp_path / f"d2_{nd}", mods, r=2, lora_alpha=4.0, tau=0.4, norm_dim=nd)
    paths = [dora, lora, tmp_path / "d2_1", tmp_path / "d2_0"]
    res = similarity(paths, base=base, per_module=True, progress=False)
    # modules shared: dora-lora 6, dora-d2 3 + 3, lora-d2 2 + 2, d2-d2 3
    assert res.effective and len(res.per_module) == 19
    for row in res.per_module.itertuples():
        x, y = dense[row.a][row.module], dense[row.b][row.module]
        want = float((x * y).sum() / (x.norm() * y.norm()))
        assert row.cosine == pytest.approx(want, rel=1e-9, abs=1e-12), (row.a, row.b, row.module)
    for a in res.names:
        for mod, x in dense[a].items():
            assert res.norms.loc[a, mod] == pytest.approx(float(x.norm()), rel=1e-9)

    args = ["similarity", *map(str, paths), "--format", "json"]
    capsys.readouterr()  # transformers' shard bar of save_base
    assert main(args + ["--base", str(base)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["delta"] == "effective" and out.err == ""
    assert main(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["delta"] == "residual"
    note = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(note) == 1 and note[0].startswith("loramix: note: dora, d2_1, d2_0 (DoRA and D2-LoRA)"), note
    assert "--base" in note[0] and "lora," not in note[0]
