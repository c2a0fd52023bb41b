"""Property-based checks of the core math against short dense float64
references (hypothesis): sums, similarity, merge methods, SVD truncation and
D2-LoRA, over random small shapes (1-row/1-column modules, rank 1 up to
min(out, in)), ranks, scales (alpha / r or alpha / sqrt(r)), weights (0 and
negative included), factor dtypes, zero and identical adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix import similarity
from loramix.adapter import Adapter, ModuleDelta
from loramix.d2lora import d2_effective_delta, d2_norm_scale
from loramix.methods.runner import truncate

from .test_merge import run_method, svd_factors

F64 = torch.float64
MOD = "model.layers.0.proj"
SET = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# tests that take a pytest fixture (the same one for every example)
FIX = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
HALF_AND_FULL = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
WEIGHTS = st.sampled_from([1.0, 0.0, -1.0, 0.5, -2.5, 3.0])


@st.composite
def module_sets(draw, n_min=1, n_max=5, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    """``n`` LoRA adapters of one module ``(out, in)``; each: rank 1..min(out, in)
    (+1: a rank above min is legal), scale alpha/r or alpha/sqrt(r), a factor
    dtype, sometimes all-zero B, sometimes an identical copy of the one before."""
    o, i = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    n = draw(st.integers(n_min, n_max))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ads = []
    for t in range(n):
        if ads and draw(st.integers(0, 5)) == 0:  # identical to the previous adapter
            ads.append(Adapter(name=f"a{t}", kind="lora", modules=dict(ads[-1].modules)))
            continue
        r = draw(st.integers(1, min(o, i) + 1))
        dtype = draw(st.sampled_from(dtypes))
        alpha = draw(st.sampled_from([1.0, 8.0, 16.0, 3.0]))
        scale = alpha / (math.sqrt(r) if draw(st.booleans()) else r)
        B = torch.randn(o, r, generator=g)
        if draw(st.integers(0, 5)) == 0:
            B = torch.zeros(o, r)  # a zero adapter (PEFT's initial B)
        md = ModuleDelta(
            name=MOD, B=B.to(dtype), A=torch.randn(r, i, generator=g).to(dtype), scale=scale, alpha=alpha
        )
        ads.append(Adapter(name=f"a{t}", kind="lora", modules={MOD: md}))
    ws = [draw(WEIGHTS) for _ in range(n)]
    return ads, ws


def dense(md: ModuleDelta) -> torch.Tensor:
    """The textbook delta s B A (D2-LoRA: the signed residual
    s (B+ A+ - tau B- A-)), in float64 from the stored factors."""
    d = md.scale * (md.B.double() @ md.A.double())
    if md.B_neg is not None:
        d = d - md.scale * md.tau * (md.B_neg.double() @ md.A_neg.double())
    return d


def ref_sum(ads, ws):
    return sum(w * dense(a.modules[MOD]) for a, w in zip(ads, ws))


def close(got, ref, rtol=1e-10):
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=rtol * scale)


# ----------------------------------------------------------------------------- sum


@SET
@given(module_sets())
def test_sum_factors_and_dense_equal_the_weighted_sum(case):
    ads, ws = case
    ref = ref_sum(ads, ws)
    close(run_method("sum", ads, ws, MOD), ref)
    close(run_method("task-arithmetic", ads, ws, MOD, lambda_=0.7), 0.7 * ref)
    lr = svd_factors(ads, ws, MOD, rank=sum(a.modules[MOD].rank for a in ads))  # the stacked rank: exact
    close(lr.B @ lr.A, ref, rtol=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=FIX)
@given(case=module_sets())
def test_sum_adapter_written_and_loaded_is_the_sum(tmp_path_factory, case):
    from loramix import load_adapter, sum_adapters

    ads, ws = case
    out = sum_adapters(ads, out=tmp_path_factory.mktemp("s") / "out", weights=ws)
    assert_written_sum(load_adapter(out).modules[MOD], ads, ws, MOD)


def assert_written_sum(md, ads, ws, m):
    """A written sum is stored in the factors' dtype: the rounding of
    ``w s B`` and ``A`` to it, entrywise within a few ulps of
    ``sum_i |w_i s_i| |B_i| |A_i|``."""
    pairs = [(a.modules[m], w) for a, w in zip(ads, ws) if m in a.modules]
    eps = torch.finfo(md.B.dtype).eps
    bound = sum(abs(w) * abs(d.scale) * (d.B.double().abs() @ d.A.double().abs()) for d, w in pairs)
    err = (md.residual() - sum(w * dense(d) for d, w in pairs)).abs()
    assert bool((err <= 4 * eps * bound + 1e-30).all()), (md.B.dtype, float((err - 4 * eps * bound).max()))


# ----------------------------------------------------------------------------- similarity


@st.composite
def multi_module_sets(draw):
    """2-4 adapters over up to 3 modules, each adapter a random non-empty subset."""
    n_mod = draw(st.integers(1, 3))
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(n_mod)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ads = []
    for t in range(draw(st.integers(1, 4))):
        if ads and draw(st.integers(0, 4)) == 0:  # the same adapter again, under another name
            ads.append(Adapter(name=f"a{t}", kind=ads[-1].kind, modules=dict(ads[-1].modules)))
            continue
        d2 = draw(st.integers(0, 3)) == 0  # a D2-LoRA adapter: its signed residual
        subset = draw(st.lists(st.integers(0, n_mod - 1), min_size=1, max_size=n_mod, unique=True))
        mods = {}
        for k in sorted(subset):
            o, i = shapes[k]
            r = draw(st.integers(1, min(o, i)))
            B = torch.randn(o, r, generator=g) * draw(st.sampled_from([1.0, 1.0, 0.0, -1.0]))
            name = f"model.layers.{k}.proj"
            dt = draw(st.sampled_from(HALF_AND_FULL))
            kw = {}
            if d2:
                kw = dict(B_neg=torch.randn(o, r, generator=g).to(dt), A_neg=torch.randn(r, i, generator=g).to(dt),
                          tau=draw(st.sampled_from([0.0, 0.5, 1.0])))  # fmt: skip
            mods[name] = ModuleDelta(name=name, B=B.to(dt), A=torch.randn(r, i, generator=g).to(dt),
                                     scale=draw(st.sampled_from([0.5, 2.0, 1e-3])), alpha=1.0, **kw)  # fmt: skip
        ads.append(Adapter(name=f"a{t}", kind="d2lora" if d2 else "lora", modules=mods))
    return ads


def ref_similarity(ads):
    N = len(ads)
    rms, mean, cov = np.full((N, N), np.nan), np.full((N, N), np.nan), np.zeros((N, N))
    shared = np.zeros((N, N), dtype=int)
    for i, a in enumerate(ads):
        for j, b in enumerate(ads):
            both = [m for m in a.modules if m in b.modules]
            cov[i, j] = len(both) / len(set(a.modules) | set(b.modules))
            cs = []
            for m in both:
                X, Y = dense(a.modules[m]), dense(b.modules[m])
                nx, ny = float(X.norm()), float(Y.norm())
                if nx == 0 or ny == 0:
                    continue
                cs.append(float((X * Y).sum()) / (nx * ny))
            shared[i, j] = len(cs)
            if cs:
                rms[i, j] = math.sqrt(np.mean(np.square(cs)))
                mean[i, j] = np.mean(cs)
    return rms, mean, cov, shared


@SET
@given(multi_module_sets(), st.sampled_from(["numpy", "torch"]))
def test_similarity_equals_dense_frobenius(ads, path):
    res = similarity(ads, progress=False, device="cpu" if path == "numpy" else torch.device("cpu"))
    rms, mean, cov, shared = ref_similarity(ads)
    np.testing.assert_allclose(res.rms.to_numpy(), rms, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(res.mean.to_numpy(), mean, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(res.coverage.to_numpy(), cov, atol=0)
    np.testing.assert_array_equal(res.shared.to_numpy(), shared)
    zero = {(r.adapter, r.module) for r in res.zero_norm.itertuples()}
    for i, a in enumerate(ads):
        for m, md in a.modules.items():
            ref = float(dense(md).norm())
            assert res.norms.loc[res.names[i], m] == pytest.approx(ref, rel=1e-9, abs=1e-12)
            assert ((res.names[i], m) in zero) == (ref == 0.0)
        for m in {m for b in ads for m in b.modules} - set(a.modules):
            assert math.isnan(res.norms.loc[res.names[i], m])


# ----------------------------------------------------------------------------- merge methods


def topmask(x, density):
    k = int(density * x.numel())
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat)
    if k:
        keep[torch.topk(flat.abs(), k).indices] = 1
    return (flat * keep).reshape(x.shape)


def ref_elect(xs, ws, sign, divide):
    score = sum(xs) if sign == "mass" else sum(torch.sign(x) for x in xs)
    g = torch.where(score < 0, -1.0, 1.0).double()
    num, den = torch.zeros_like(g), torch.zeros_like(g)
    for x, w in zip(xs, ws):
        agree = (torch.sign(x) == g).double()
        num += agree * x
        den += agree * (1.0 if divide == "count" else w)
    den[den == 0] = 1
    return num / den


F64_SETS = module_sets(dtypes=(torch.float64,))
# distinct magnitudes: the top-k of ties is any of them, so exact comparison
# needs no ties (float64 random factors have none but at exact zeros)
DENS = st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])


def no_ties(xs):
    """No two equal nonzero magnitudes in any delta (ties among zeros change
    nothing: a zero adds nothing and is never elected)."""
    for x in xs:
        a = x.abs().reshape(-1)
        a = a[a != 0]
        if len(torch.unique(a)) != a.numel():
            return False
    return True


@SET
@given(
    F64_SETS,
    DENS,
    st.sampled_from(["mass", "count"]),
    st.sampled_from(["count", "weight"]),
    st.sampled_from([1.0, 0.6]),
)
def test_ties_exact(case, density, sign, divide, lam):
    ads, ws = case
    xs = [w * dense(a.modules[MOD]) for a, w in zip(ads, ws)]
    if not no_ties(xs):
        return
    got = run_method("ties", ads, ws, MOD, density=density, sign=sign, divide=divide, lambda_=lam)
    ref = lam * ref_elect([topmask(x, density) if density < 1 else x for x in xs], ws, sign, divide)
    close(got, ref)


@SET
@given(F64_SETS, DENS)
def test_magnitude_exact(case, density):
    ads, ws = case
    xs = [w * dense(a.modules[MOD]) for a, w in zip(ads, ws)]
    if not no_ties(xs):
        return
    got = run_method("magnitude", ads, ws, MOD, density=density, lambda_=1.0)
    close(got, sum(topmask(x, density) if density < 1 else x for x in xs))


@SET
@given(F64_SETS, st.sampled_from([0.2, 0.5, 0.9]), st.sampled_from([0.0, 0.05, 0.2]))
def test_breadcrumbs_exact(case, density, gamma):
    ads, ws = case
    ref = 0
    for a, w in zip(ads, ws):
        d = dense(a.modules[MOD])
        n = d.numel()
        n_keep, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - n_keep - n_top)
        order = torch.sort(d.abs().reshape(-1), stable=True).indices
        keep = torch.zeros(n, dtype=F64)
        keep[order[n_bot : n_bot + n_keep]] = 1
        ref = ref + w * d * keep.reshape(d.shape)
    got = run_method("breadcrumbs", ads, ws, MOD, density=density, gamma=gamma, lambda_=1.0)
    close(got, ref if isinstance(ref, torch.Tensor) else torch.zeros_like(got.double()))


@SET
@given(F64_SETS, st.sampled_from(["dare-linear", "dare-ties", "della"]), st.integers(0, 2**20))
def test_random_methods_deterministic_and_density_one(case, method, seed):
    ads, ws = case
    kw = dict(density=0.5, seed=seed)
    if method == "della":
        kw["epsilon"] = 0.1
    a = run_method(method, ads, ws, MOD, **kw)
    b = run_method(method, ads, ws, MOD, **kw)
    assert torch.equal(a, b)
    if method == "dare-linear":
        # density 1 keeps everything: the weighted sum
        close(run_method(method, ads, ws, MOD, density=1.0, seed=seed), ref_sum(ads, ws))
        # each kept entry is x / density, each dropped one 0 (one adapter)
        x = ws[0] * dense(ads[0].modules[MOD])
        got = run_method(method, ads[:1], ws[:1], MOD, density=0.25, seed=seed)
        kept = got != 0
        close(got[kept], x[kept] / 0.25)


def test_dare_mask_density_in_expectation():
    from loramix.methods.base import dare_mask

    for d in (0.1, 0.5, 0.9):
        m = dare_mask((200, 100), d, 123)
        assert abs(float(m.float().mean()) - d) < 4 * math.sqrt(d * (1 - d) / 20000)


# ----------------------------------------------------------------------------- svd / --out-rank


@SET
@given(module_sets(dtypes=(torch.float64, torch.float32)), st.integers(1, 6))
def test_truncation_is_eckart_young(case, k):
    ads, ws = case
    ref = ref_sum(ads, ws)
    S = torch.linalg.svdvals(ref)
    tail = float((S[k:] ** 2).sum())
    tot = float((S**2).sum())
    k = min(k, sum(a.modules[MOD].rank for a in ads))  # --rank above the stacked rank is refused
    for lr in (svd_factors(ads, ws, MOD, rank=k), truncate(ref, k, None)):
        kk = lr.A.shape[0]
        assert kk <= max(1, min(k, len(S)))
        err = float(((lr.B @ lr.A).double() - ref).pow(2).sum())
        want = float((S[kk:] ** 2).sum())
        assert err == pytest.approx(want, rel=1e-6, abs=1e-9 * max(tot, 1.0))
        assert lr.info["energy_discarded"] == pytest.approx(want, rel=1e-6, abs=1e-9 * max(tot, 1.0))
    assert tail >= 0


# ----------------------------------------------------------------------------- D2-LoRA


@SET
@given(
    st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.floats(0.0, 2.0), st.sampled_from([0, 1]),
    st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2**20),
)  # fmt: skip
def test_d2_norm_scale_and_effective_delta(o, i, r, tau, norm_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(o, i, generator=g, dtype=F64)
    Bp, Bn = torch.randn(o, r, generator=g, dtype=F64), torch.randn(o, r, generator=g, dtype=F64)
    Ap, An = torch.randn(r, i, generator=g, dtype=F64), torch.randn(r, i, generator=g, dtype=F64)
    s = 0.7
    dW = s * (Bp @ Ap - tau * Bn @ An)
    V = W0 + dW
    c_ref = W0.norm(dim=norm_dim) / V.norm(dim=norm_dim).clamp_min(1e-8)
    Bf, Af = s * torch.cat([Bp, -tau * Bn], 1), torch.cat([Ap, An], 0)
    Bd, Ad = Bf.to(dtype), Af.to(dtype)
    c = d2_norm_scale(W0.to(dtype), Bd, Ad, norm_dim=norm_dim)
    # against the formula on the factors as given to it (rounded to dtype)
    Vd = W0.to(dtype).double() + Bd.double() @ Ad.double()
    c_in = W0.to(dtype).double().norm(dim=norm_dim) / Vd.norm(dim=norm_dim).clamp_min(1e-8)
    rel = ((c.double() - c_in) / c_in).abs()
    bound = fast_norm_bound(W0.to(dtype).double(), Bd, Ad, norm_dim, torch.finfo(dtype).eps)
    ok = bound < 0.5  # where the bound is near 1 the fast formula has no digit left (left alone)
    assert bool((rel[ok] <= bound[ok] + 1e-12).all()), (rel, bound)
    shape = (-1, 1) if norm_dim == 1 else (1, -1)
    eff_ref = V * c_ref.reshape(shape) + dW - W0
    close(d2_effective_delta(W0, dW, norm_dim=norm_dim), eff_ref)
    md = ModuleDelta(
        name=MOD, B=Bp, A=Ap, B_neg=Bn, A_neg=An, tau=tau, scale=s, alpha=s * r, norm_dim=norm_dim
    )
    close(md.delta(W0), eff_ref)


# ----------------------------------------------------------------------------- scales from a PEFT config


@st.composite
def peft_folders(draw):
    """A PEFT LoRA config and factors written by hand (not by loramix): per
    module a rank (rank_pattern where it differs from r), an alpha
    (alpha_pattern), use_rslora, fan_in_fan_out (GPT-2 Conv1D: the factors are
    stored as for nn.Linear all the same), a dtype."""
    n_mod = draw(st.integers(1, 3))
    r0, a0 = draw(st.integers(1, 4)), draw(st.sampled_from([1.0, 8.0, 16.0]))
    rslora, fifo = draw(st.booleans()), draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mods, rank_pattern, alpha_pattern, scales = {}, {}, {}, {}
    for k in range(n_mod):
        name = f"transformer.h.{k}.attn.c_attn"
        o, i = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        r = draw(st.sampled_from([r0, 1, min(o, i)]))
        a = draw(st.sampled_from([a0, 2.0, 0.5]))
        if r != r0:
            rank_pattern[name] = r
        if a != a0:
            alpha_pattern[name] = a
        mods[name] = (torch.randn(o, r, generator=g).to(dtype), torch.randn(r, i, generator=g).to(dtype))
        scales[name] = a / (math.sqrt(r) if rslora else r)
    config = dict(peft_type="LORA", r=r0, lora_alpha=a0, use_rslora=rslora, fan_in_fan_out=fifo,
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, target_modules=["c_attn"],
                  base_model_name_or_path=None, task_type="CAUSAL_LM", bias="none")  # fmt: skip
    return config, mods, scales


def write_peft(folder, config, mods):
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    t = {}
    for name, (B, A) in mods.items():
        t[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        t[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
    save_file(t, str(folder / "adapter_model.safetensors"))
    return folder


@settings(max_examples=30, deadline=None, suppress_health_check=FIX)
@given(cases=st.lists(peft_folders(), min_size=1, max_size=3))
def test_scales_from_config_and_similarity_from_files(tmp_path_factory, cases):
    from loramix import load_adapter
    from loramix.io.np_factors import load_np_adapter

    root = tmp_path_factory.mktemp("p")
    paths = [write_peft(root / f"a{n}", *c[:2]) for n, c in enumerate(cases)]
    dense_of = []
    for p, (_cfg, mods, scales) in zip(paths, cases):
        ad, npad = load_adapter(p), load_np_adapter(p)
        assert set(ad.modules) == set(mods) == set(npad.modules)
        d = {}
        for name, (B, A) in mods.items():
            d[name] = scales[name] * (B.double() @ A.double())
            assert ad.modules[name].scale == pytest.approx(scales[name], rel=1e-12)
            close(ad.modules[name].residual(), d[name], rtol=1e-12)
            Bf, Af = npad.modules[name].factors()
            close(torch.from_numpy(Bf @ Af), d[name], rtol=1e-12)
        dense_of.append(d)
    if len(shapes := {n: tuple(m.shape) for d in dense_of for n, m in d.items()}) != len(
        {(n, s) for d in dense_of for n, s in ((n, tuple(m.shape)) for n, m in d.items())}
    ):
        return  # the same module name with two shapes: refused, not compared
    assert shapes
    res = similarity([str(p) for p in paths], progress=False)
    for i, di in enumerate(dense_of):
        for j, dj in enumerate(dense_of):
            cs = [float((di[m] * dj[m]).sum() / (di[m].norm() * dj[m].norm())) for m in di if m in dj]
            want = math.sqrt(np.mean(np.square(cs))) if cs else float("nan")
            got = res.rms.to_numpy()[i, j]
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)


# ----------------------------------------------------------------------------- streaming merges (work buffers)


class _Run:  # what engine.cpu_threads needs of an executor
    device = torch.device("cpu")
    helpers = None


@st.composite
def large_module_sets(draw):
    """1-4 float32 LoRA adapters of one module with at least BRACKET_MIN
    entries (so a streaming merge takes its blocked paths), 1-row and
    1-column modules included; some adapters zero, some identical."""
    from loramix.methods.base import BRACKET_MIN

    o = draw(st.sampled_from([1, 3, 40, 257, 1024, BRACKET_MIN]))
    i = -(-BRACKET_MIN // o) + draw(st.sampled_from([0, 1, 37]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mods = []
    for _ in range(draw(st.integers(1, 4))):
        if mods and draw(st.integers(0, 4)) == 0:
            mods.append(mods[-1])
            continue
        r = draw(st.integers(1, min(o, i, 4)))
        B = torch.randn(o, r, generator=g) * (0.0 if draw(st.integers(0, 6)) == 0 else 1.0)
        mods.append(ModuleDelta(name="m", B=B, A=torch.randn(r, i, generator=g), scale=draw(st.sampled_from([0.5, 2.0])),
                                alpha=1.0))  # fmt: skip
    ws = [draw(WEIGHTS) for _ in mods]
    return mods, ws


def _stream(method, mods, ws, dtype, **params):
    from loramix.engine import Buffers, cpu_threads
    from loramix.methods import get_method
    from loramix.methods.base import ModuleContext

    m = get_method(method)
    ads = [Adapter(name=f"a{n}", kind="lora", modules={"m": md}) for n, md in enumerate(mods)]
    p = m.validate(params, ads)
    with cpu_threads(_Run):
        ctx = ModuleContext("m", tuple(range(len(mods))), torch.device("cpu"), dtype, scratch=Buffers())
        return m.delta(ctx, list(mods), list(ws), None, p).clone()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(large_module_sets(), st.sampled_from([0.01, 0.2, 0.7]), st.sampled_from(["mass", "count"]),
       st.sampled_from(["count", "weight"]))  # fmt: skip
def test_streaming_ties_equals_reference(case, density, sign, divide):
    mods, ws = case
    xs = [w * dense(m) for m, w in zip(mods, ws)]
    got = _stream("ties", mods, ws, F64, density=density, sign=sign, divide=divide, lambda_=1.0)
    ref = ref_elect([topmask(x, density) for x in xs], ws, sign, divide)
    bad = (got.double() - ref).abs() > 1e-9 * max(1.0, float(ref.abs().max()))
    # an entry at the threshold with a tied magnitude (identical adapters with
    # equal |w|) may be kept by either; anywhere else the result is exact
    assert int(bad.sum()) == 0 or not no_ties(xs), int(bad.sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    large_module_sets(),
    st.sampled_from([0.1, 0.5, 0.9]),
    st.integers(0, 2**20),
    st.sampled_from(["dare-linear", "dare-ties"]),
)
def test_streaming_dare_equals_reference(case, density, seed, method):
    from loramix.methods.base import dare_mask, module_seed

    mods, ws = case
    ts = [w * dense(m) * dare_mask(tuple(m.shape), density, module_seed(seed, "m", n)).double() / density
          for n, (m, w) in enumerate(zip(mods, ws))]  # fmt: skip
    ref = sum(ts) if method == "dare-linear" else ref_elect(ts, ws, "mass", "count")
    got = _stream(method, mods, ws, F64, density=density, seed=seed, lambda_=1.0)
    close(got, ref, rtol=1e-9)


# ----------------------------------------------------------------------------- DELLA, D2 in merges


def ref_della(x, density, epsilon, seed):
    out_f, in_f = x.shape
    ranks = torch.empty(out_f, in_f, dtype=torch.float64)
    for r in range(out_f):
        for k, c in enumerate(sorted(range(in_f), key=lambda c: float(x[r, c].abs()))):
            ranks[r, c] = k
    rel = ranks / (in_f - 1) if in_f > 1 else torch.full_like(ranks, 0.5)
    p = ((density - epsilon) + rel * (2 * epsilon)).float()
    m = x * torch.bernoulli(p, generator=torch.Generator().manual_seed(seed)).double()
    before, after = float(x.abs().sum()), float(m.abs().sum())
    return m * (before / after) if before >= 1e-7 and after >= 1e-7 else m


@SET
@given(F64_SETS, st.sampled_from([0.3, 0.5, 0.8]), st.sampled_from([0.0, 0.1]), st.integers(0, 2**20),
       st.sampled_from(["weight", "count"]))  # fmt: skip
def test_della_equals_reference(case, density, epsilon, seed, divide):
    from loramix.methods.base import module_seed

    ads, ws = case
    xs = [w * dense(a.modules[MOD]) for a, w in zip(ads, ws)]
    if not no_ties(xs):
        return
    ts = [ref_della(x, density, epsilon, module_seed(seed, MOD, n)) for n, x in enumerate(xs)]
    got = run_method(
        "della", ads, ws, MOD, density=density, epsilon=epsilon, seed=seed, divide=divide, lambda_=1.0
    )
    close(got, ref_elect(ts, ws, "mass", divide), rtol=1e-9)


@SET
@given(module_sets(dtypes=(torch.float64, torch.float32)), st.integers(0, 3), st.floats(0.0, 1.5),
       st.sampled_from([0, 1]), st.integers(0, 2**20))  # fmt: skip
def test_sum_with_d2_adapters_into_a_base(case, n_d2, tau, norm_dim, seed):
    """LoRA and D2-LoRA together: sum_i w_i (effective delta_i), d2 ones W_hat - W0."""
    ads, ws = case
    o, i = ads[0].modules[MOD].shape
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(o, i, generator=g, dtype=F64)
    ref = ref_sum(ads, ws)
    for _ in range(n_d2):
        r = 2
        Bp, Bn = torch.randn(o, r, generator=g, dtype=F64), torch.randn(o, r, generator=g, dtype=F64)
        Ap, An = torch.randn(r, i, generator=g, dtype=F64), torch.randn(r, i, generator=g, dtype=F64)
        md = ModuleDelta(
            name=MOD, B=Bp, A=Ap, B_neg=Bn, A_neg=An, tau=tau, scale=0.3, alpha=0.6, norm_dim=norm_dim
        )
        ads = [*ads, Adapter(name=f"d{len(ads)}", kind="d2lora", modules={MOD: md})]
        ws = [*ws, 0.8]
        dW = 0.3 * (Bp @ Ap - tau * Bn @ An)
        V = W0 + dW
        c = W0.norm(dim=norm_dim, keepdim=True) / V.norm(dim=norm_dim, keepdim=True).clamp_min(1e-8)
        ref = ref + 0.8 * (V * c + dW - W0)
    close(run_method("sum", ads, ws, MOD, W0=W0), ref, rtol=1e-9)


def fast_norm_bound(W, Bf, Af, norm_dim, eps):
    """How far ``d2_norm_scale`` may be from the dense formula, relative: it
    forms ``||V||^2 = ||W0||^2 + 2 <W0, dW> + ||dW||^2`` (no ``V``), so each
    term's rounding (``eps`` of the dtype it is multiplied in) counts relative
    to ``(||W0|| + || |Bf| |Af| ||)^2``, and is divided by ``||V||^2``: a row
    (column) where ``W0 + dW`` nearly cancels is ill-conditioned for it."""
    absd = Bf.double().abs() @ Af.double().abs()
    scale = (W.norm(dim=norm_dim) + absd.norm(dim=norm_dim)) ** 2
    V = W + Bf.double() @ Af.double()
    return 8 * eps * (Bf.shape[1] + 1) * scale / V.norm(dim=norm_dim).pow(2).clamp_min(1e-16)


@SET
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.sampled_from([0, 1]),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 2**20))  # fmt: skip
def test_d2_norm_scale_low_precision_base(o, i, k, norm_dim, dtype, seed):
    """A 16-bit W0 is multiplied in its dtype (fp32 accumulation, the result
    rounded to it): c within that dtype's rounding of the float64 formula on
    the rounded W0, the conditioning of the fast formula included."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(o, i, generator=g).to(dtype)
    Bf, Af = 0.1 * torch.randn(o, k, generator=g), torch.randn(k, i, generator=g)
    W = W0.double()
    c_ref = W.norm(dim=norm_dim) / (W + Bf.double() @ Af.double()).norm(dim=norm_dim).clamp_min(1e-8)
    c = d2_norm_scale(W0, Bf, Af, norm_dim=norm_dim)
    rel = ((c.double() - c_ref) / c_ref).abs()
    bound = fast_norm_bound(W, Bf, Af, norm_dim, torch.finfo(dtype).eps)
    ok = bound < 0.5  # where the bound is near 1 the fast formula has no digit left (left alone)
    assert bool((rel[ok] <= bound[ok] + 1e-12).all()), (rel, bound)


@settings(max_examples=20, deadline=None, suppress_health_check=FIX)
@given(ads=multi_module_sets(), data=st.data())
def test_sum_adapter_over_modules_only_some_adapters_have(tmp_path_factory, ads, data):
    """Each module's stacked rank differs (rank_pattern/alpha_pattern in the
    written config); a module is the sum over the adapters that have it."""
    from loramix import load_adapter, sum_adapters
    from loramix.errors import AdapterError

    ws = [data.draw(WEIGHTS) for _ in ads]
    if any(a.kind.name == "d2lora" for a in ads):  # documented: no LoRA adapter holds their sum
        with pytest.raises(AdapterError, match="D2-LoRA"):
            sum_adapters(ads, out=tmp_path_factory.mktemp("s") / "out", weights=ws)
        return
    out = sum_adapters(ads, out=tmp_path_factory.mktemp("s") / "out", weights=ws)
    got = load_adapter(out)
    names = {m for a in ads for m in a.modules}
    assert set(got.modules) == names
    for m in names:
        assert got.modules[m].rank == sum(a.modules[m].rank for a in ads if m in a.modules)
        assert_written_sum(got.modules[m], ads, ws, m)


@SET
@given(multi_module_sets())
def test_similarity_per_module_table(ads):
    res = similarity(ads, per_module=True, progress=False)
    want = {}
    for i, a in enumerate(ads):
        for j, b in enumerate(ads):
            if i >= j:
                continue
            for m in a.modules:
                if m in b.modules:
                    X, Y = dense(a.modules[m]), dense(b.modules[m])
                    if X.norm() > 0 and Y.norm() > 0:
                        want[(m, i, j)] = float((X * Y).sum() / (X.norm() * Y.norm()))
    got = {(r.module, r.i, r.j): r.cosine for r in res.per_module.itertuples()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9)


@SET
@given(module_sets(dtypes=(torch.float64, torch.float32)), st.sampled_from([0.3, 0.9, 0.99, 1.0]))
def test_energy_picks_the_smallest_rank(case, energy):
    ads, ws = case
    ref = ref_sum(ads, ws)
    S = torch.linalg.svdvals(ref)
    tot = float((S**2).sum())
    for lr in (svd_factors(ads, ws, MOD, energy=energy), truncate(ref, None, energy)):
        k = lr.A.shape[0]
        assert k >= 1
        size = sum(abs(w) * abs(a.modules[MOD].scale) * float(a.modules[MOD].B.double().norm() * a.modules[MOD].A.double().norm())
                   for a, w in zip(ads, ws))  # fmt: skip
        if tot <= (1e-14 * size) ** 2:
            # the sum cancels (a - a): its singular values are rounding, and
            # which rank reaches a fraction of them is arbitrary (left alone)
            assert float((lr.B @ lr.A).double().abs().max()) <= 1e-14 * max(size, 1e-300)
            continue
        cum = torch.cumsum(S**2, 0) / tot
        assert float(cum[min(k, len(S)) - 1]) >= energy - 1e-9
        if k > 1:
            assert float(cum[k - 2]) < energy + 1e-9


# ----------------------------------------------------------------------------- end to end: GPT-2 Conv1D


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    from .factories import save_base, tiny_gpt2

    folder = tmp_path_factory.mktemp("gpt2") / "base"
    save_base(tiny_gpt2(n_layer=1, n_embd=16), folder)
    return folder


def _gpt2_adapters(draw, root, magnitudes: list | None = None):
    """1-3 hand-written PEFT adapters on a 1-layer GPT-2 (Conv1D,
    fan_in_fan_out): modules c_attn (48 x 16), c_proj (16 x 16), mlp.c_fc
    (64 x 16), random subsets, ranks (rank_pattern), alphas (alpha_pattern),
    rsLoRA, dtypes. ``magnitudes``, if given, gets per adapter
    ``{module: |s| |B| @ |A|}`` (float64, (out, in)): the sizes of the terms
    each delta entry sums, which bound its rounding error."""
    shapes = {"transformer.h.0.attn.c_attn": (48, 16), "transformer.h.0.attn.c_proj": (16, 16),
              "transformer.h.0.mlp.c_fc": (64, 16)}  # fmt: skip
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for n in range(draw(st.integers(1, 3))):
        names = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=3, unique=True))
        r0, a0, rs = draw(st.integers(1, 4)), draw(st.sampled_from([4.0, 16.0])), draw(st.booleans())
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        mods, rp, ap, dense_of, mag_of = {}, {}, {}, {}, {}
        for name in names:
            o, i = shapes[name]
            r, a = draw(st.sampled_from([r0, 1, 16])), draw(st.sampled_from([a0, 2.0]))
            rp.update({name: r} if r != r0 else {})
            ap.update({name: a} if a != a0 else {})
            B, A = (0.05 * torch.randn(o, r, generator=g)).to(dtype), torch.randn(r, i, generator=g).to(dtype)
            mods[name] = (B, A)
            dense_of[name] = a / (math.sqrt(r) if rs else r) * (B.double() @ A.double())
            mag_of[name] = a / (math.sqrt(r) if rs else r) * (B.double().abs() @ A.double().abs())
        cfg = dict(peft_type="LORA", r=r0, lora_alpha=a0, use_rslora=rs, fan_in_fan_out=True, rank_pattern=rp,
                   alpha_pattern=ap, target_modules=sorted({k.rsplit(".", 1)[1] for k in names}),
                   base_model_name_or_path=None, task_type="CAUSAL_LM", bias="none")  # fmt: skip
        out.append((write_peft(root / f"a{n}", cfg, mods), dense_of))
        if magnitudes is not None:
            magnitudes.append(mag_of)
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=FIX)
@given(data=st.data(), method=st.sampled_from(["sum", "task-arithmetic", "ties", "magnitude"]))
def test_merge_into_gpt2_base_equals_reference(gpt2_base, tmp_path_factory, data, method):
    """W - W0 of the written model (Conv1D stores (in, out): transposed back)
    is the method's delta of the dense float64 deltas, within float32."""
    from safetensors.torch import load_file

    from loramix import merge

    root = tmp_path_factory.mktemp("m")
    ads = _gpt2_adapters(data.draw, root)
    ws = [data.draw(WEIGHTS) for _ in ads]
    params = {"density": 0.4} if method in ("ties", "magnitude") else {}
    merge([str(p) for p, _ in ads], method, weights=ws, into=gpt2_base, out=root / "out", device="cpu",
          dtype="float32", **params)  # fmt: skip
    W0s, Ws = (
        load_file(str(gpt2_base / "model.safetensors")),
        load_file(str(root / "out" / "model.safetensors")),
    )
    compared = 0
    for name in sorted({m for _, d in ads for m in d}):
        key = f"{name}.weight"
        got = (Ws[key].double() - W0s[key].double()).T  # Conv1D: (in, out)
        xs = [w * d[name] for (_, d), w in zip(ads, ws) if name in d]
        wn = [w for (_, d), w in zip(ads, ws) if name in d]
        if method in ("sum", "task-arithmetic"):
            ref = sum(xs)
        elif method == "magnitude":
            if not no_ties(xs):
                continue
            ref = sum(topmask(x, 0.4) for x in xs)
        else:
            if not no_ties(xs):
                continue
            ref = ref_elect([topmask(x, 0.4) for x in xs], wn, "mass", "count")
        tol = 1e-6 * (float(W0s[key].abs().max()) + float(ref.abs().max()))
        torch.testing.assert_close(got, ref, rtol=0, atol=tol)
        compared += 1
    assert compared or method in ("ties", "magnitude")


@SET
@given(
    st.integers(1, 8),
    st.integers(1, 8),
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 1.5), WEIGHTS), min_size=1, max_size=4),
    st.sampled_from([0, 1]),
    st.integers(0, 2**20),
)
def test_d2_signed_equals_reference(o, i, specs, norm_dim, seed):
    """d2-signed: R = sum_i w_i dW_i, W* = (W0 + R) ||W0||_n / ||W0 + R||_n,
    delta W* + R - W0; its reported difference to the effective sum."""
    from loramix.methods import get_method
    from loramix.methods.base import ModuleContext

    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(o, i, generator=g, dtype=F64)
    ads, ws, R, eff = [], [], 0, 0
    for n, (r, tau, w) in enumerate(specs):
        Bp, Bn = torch.randn(o, r, generator=g, dtype=F64), torch.randn(o, r, generator=g, dtype=F64)
        Ap, An = torch.randn(r, i, generator=g, dtype=F64), torch.randn(r, i, generator=g, dtype=F64)
        md = ModuleDelta(
            name=MOD, B=Bp, A=Ap, B_neg=Bn, A_neg=An, tau=tau, scale=0.4, alpha=0.4 * r, norm_dim=norm_dim
        )
        ads.append(Adapter(name=f"d{n}", kind="d2lora", modules={MOD: md}))
        ws.append(w)
        dW = 0.4 * (Bp @ Ap - tau * Bn @ An)
        R = R + w * dW
        V = W0 + dW
        eff = eff + w * (
            V * (W0.norm(dim=norm_dim, keepdim=True) / V.norm(dim=norm_dim, keepdim=True)) + dW - W0
        )
    V = W0 + R
    ref = (
        V * (W0.norm(dim=norm_dim, keepdim=True) / V.norm(dim=norm_dim, keepdim=True).clamp_min(1e-8))
        + R
        - W0
    )
    close(run_method("d2-signed", ads, ws, MOD, W0=W0), ref, rtol=1e-9)
    m = get_method("d2-signed")
    ctx = ModuleContext(MOD, tuple(range(len(ads))), torch.device("cpu"), F64)
    d, facts = m.merged(ctx, [a.modules[MOD] for a in ads], ws, W0, m.validate({}, ads))
    ne = float(eff.norm())
    want = float((ref - eff).norm()) / ne if ne > 0 else float((ref - eff).norm())
    assert facts["rel_diff_vs_effective_sum"] == pytest.approx(want, rel=1e-6, abs=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=FIX)
@given(case=module_sets(dtypes=(torch.float64, torch.float32)), k=st.integers(1, 4),
       method=st.sampled_from(["magnitude", "ties", "breadcrumbs"]))  # fmt: skip
def test_out_rank_adapter_is_the_best_rank_k_of_the_merged_delta(tmp_path_factory, case, k, method):
    """--out-rank K without --into: the written adapter is the rank-K SVD
    truncation of the method's dense merged delta (computed in float32 by
    the run), its recorded discarded energy the tail of S^2."""
    import json

    from loramix import load_adapter, merge

    ads, ws = case
    params = {"density": 0.5} if method != "breadcrumbs" else {"density": 0.5, "gamma": 0.1}
    out = tmp_path_factory.mktemp("r") / "out"
    k = min(k, *ads[0].modules[MOD].shape)  # --out-rank above min(out, in) is refused
    merge(ads, method, weights=ws, out=out, out_rank=k, device="cpu", **params)
    D = run_method(method, ads, ws, MOD, dtype=torch.float32, **params).double()
    S = torch.linalg.svdvals(D)
    kk = max(1, min(k, len(S)))
    md = load_adapter(out).modules[MOD]
    assert md.rank == kk
    err = float((md.residual() - D).pow(2).sum())
    tot = float((S**2).sum())
    assert err == pytest.approx(float((S[kk:] ** 2).sum()), rel=1e-3, abs=1e-6 * max(tot, 1e-30))
    facts = json.loads((out / "loramix.json").read_text())["modules"][MOD]
    assert facts["rank"] == kk
    assert facts["energy_total"] == pytest.approx(tot, rel=1e-5, abs=1e-12)
    assert facts["energy_discarded"] == pytest.approx(
        float((S[kk:] ** 2).sum()), rel=1e-4, abs=1e-6 * max(tot, 1e-30)
    )


@pytest.fixture(scope="module")
def gpt2_bases_16(tmp_path_factory):
    from .factories import save_base, tiny_gpt2

    out = {}
    for dt in (torch.bfloat16, torch.float16):
        folder = tmp_path_factory.mktemp("gpt2") / str(dt).split(".")[1]
        save_base(tiny_gpt2(n_layer=1, n_embd=16).to(dt), folder)
        out[dt] = folder
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=FIX)
@given(data=st.data(), dt=st.sampled_from([torch.bfloat16, torch.float16]))
def test_sum_into_a_16_bit_base_is_the_rounded_sum(gpt2_bases_16, tmp_path_factory, data, dt):
    """A 16-bit base written in its dtype: each weight is x = W0 + sum_i w_i dW_i
    (float32) rounded once to the dtype, within one ulp of the exact sum plus
    x's own float32 error.

    That error is Higham's bound for sums and inner products,
    ``|x - exact| <= gamma_k (|W0| + sum_i |w_i| |s_i| (|B_i| @ |A_i|))`` with
    ``gamma_k = k u / (1 - k u)``, ``u = 2^-24`` and ``k = r + n + 2`` (an
    inner product of rank r <= 16, the scale and the weight, n adapters and
    W0 added). It is far below the dtype's ulp unless the terms cancel to a
    weight much smaller than themselves: W0 = 0.0039 with deltas -0.0072 and
    +0.0033 (rank-16 products) left -5.37e-7, where one bfloat16 ulp is
    3.7e-9, and the float32 sum rounded to 2 ulps away, which one ulp alone
    refused."""
    from safetensors.torch import load_file

    from loramix import merge

    root = tmp_path_factory.mktemp("m")
    mags: list[dict] = []
    ads = _gpt2_adapters(data.draw, root, mags)
    ws = [data.draw(WEIGHTS) for _ in ads]
    base = gpt2_bases_16[dt]
    merge([str(p) for p, _ in ads], "sum", weights=ws, into=base, out=root / "out", device="cpu")
    W0s, Ws = load_file(str(base / "model.safetensors")), load_file(str(root / "out" / "model.safetensors"))
    u, k = 2.0**-24, 16 + len(ads) + 2
    for name in sorted({m for _, d in ads for m in d}):
        key = f"{name}.weight"
        assert Ws[key].dtype == dt
        ref = W0s[key].double() + sum(w * d[name] for (_, d), w in zip(ads, ws) if name in d).T
        mag = W0s[key].double().abs() + sum(abs(w) * m[name] for m, w in zip(mags, ws) if name in m).T
        f32 = k * u / (1 - k * u) * mag
        ulp = torch.finfo(dt).eps * (ref.abs() + f32).clamp_min(torch.finfo(dt).tiny)
        assert bool(((Ws[key].double() - ref).abs() <= ulp + f32).all())
    for key in W0s:  # untouched tensors are copied
        if not any(key == f"{n}.weight" for _, d in ads for n in d):
            assert torch.equal(Ws[key], W0s[key])
