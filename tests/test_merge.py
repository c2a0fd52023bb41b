"""Merge methods (issue 6): each against an independent dense float64
reference, TIES/DARE/magnitude against ``peft.utils.merge_utils`` on the same
dense deltas, svd against a dense SVD, then end to end through the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

from loramix.adapter import D2LORA, LORA, Adapter, ModuleDelta
from loramix.errors import UsageError
from loramix.merge import available_methods, get_method
from loramix.merge.base import ModuleContext, dare_mask, kth_largest, module_seed

F64 = torch.float64


# ----------------------------------------------------------------------------- in-memory deltas


def rand_module(name, out_f, in_f, r, seed, d2=False, scale=None):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if d2:
        kw = dict(
            B_neg=torch.randn(out_f, r, generator=g, dtype=F64),
            A_neg=torch.randn(r, in_f, generator=g, dtype=F64),
            tau=0.5,
        )
    s = scale if scale is not None else 0.5 + seed % 3
    return ModuleDelta(
        name=name,
        B=torch.randn(out_f, r, generator=g, dtype=F64),
        A=torch.randn(r, in_f, generator=g, dtype=F64),
        scale=s,
        alpha=s * r,
        **kw,
    )


def rand_adapters(n=3, shapes=((24, 16), (16, 40)), ranks=(2, 3, 4), d2=False, seed=0):
    ads = []
    for i in range(n):
        mods = {}
        for j, (o, k) in enumerate(shapes):
            name = f"layers.{j}.proj"
            mods[name] = rand_module(name, o, k, ranks[i % len(ranks)], seed=100 * seed + 10 * i + j, d2=d2)
        ads.append(Adapter(name=f"a{i}", method=D2LORA if d2 else LORA, modules=mods))
    return ads


def run_method(method, ads, weights, module, W0=None, dtype=F64, **params):
    m = get_method(method)
    p = m.validate(params, ads)
    items = [(i, a.modules[module]) for i, a in enumerate(ads) if module in a.modules]
    ctx = ModuleContext(module, tuple(i for i, _ in items), torch.device("cpu"), dtype)
    return m.delta(ctx, [md for _, md in items], [weights[i] for i, _ in items], W0, p)


def raw_delta(md: ModuleDelta):
    """Independent of ModuleDelta.factors: the textbook formula."""
    d = md.scale * (md.B.double() @ md.A.double())
    if md.B_neg is not None:
        d = d - md.scale * md.tau * (md.B_neg.double() @ md.A_neg.double())
    return d


# ----------------------------------------------------------------------------- dense references


def ref_trim(t, density):
    if density >= 1:
        return t.clone()
    k = int(density * t.numel())
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k).indices] = 1
    return (flat * keep).reshape(t.shape)


def ref_elect(ts, ws, sign, divide):
    """Entry by entry, in plain Python-ish loops over adapters."""
    xs = [t * w for t, w in zip(ts, ws)]
    if sign == "mass":
        score = sum(xs)
    else:
        score = sum(torch.sign(x) for x in xs)
    g = torch.ones_like(score)
    g[score < 0] = -1
    num = torch.zeros_like(score)
    den = torch.zeros_like(score)
    for x, w in zip(xs, ws):
        agree = (torch.sign(x) == g).to(F64)
        num += agree * x
        den += agree * (1.0 if divide == "count" else w)
    if divide == "count":
        den[den == 0] = 1
    else:
        den[den == 0] = 1
    return num / den


def ref_dare_mask(shape, density, seed):
    # Bernoulli via torch.bernoulli (PEFT's call), not the rand< comparison the code uses.
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=g).bool()


MOD = "layers.0.proj"


@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("divide", ["count", "weight"])
def test_ties_matches_dense_reference(sign, divide):
    ads = rand_adapters()
    ws = [1.0, 0.5, 2.0]
    got = run_method("ties", ads, ws, MOD, density=0.3, sign=sign, divide=divide, lambda_=0.8)
    ts = [ref_trim(raw_delta(a.modules[MOD]), 0.3) for a in ads]
    ref = 0.8 * ref_elect(ts, ws, sign, divide)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_ties_matches_peft():
    from peft.utils import merge_utils as mu

    ads = rand_adapters()
    dense = [raw_delta(a.modules[MOD]) for a in ads]
    # mass with equal weights: PEFT elects on unweighted deltas, loramix on weighted ones; equal here.
    ws = [0.7, 0.7, 0.7]
    got = run_method("ties", ads, ws, MOD, density=0.4, sign="mass", divide="count")
    ref = mu.ties(dense, torch.tensor(ws, dtype=F64), density=0.4, majority_sign_method="total")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # count with unequal positive weights: the same elected sign either way.
    ws = [1.0, 0.3, 2.0]
    got = run_method("ties", ads, ws, MOD, density=0.25, sign="count", divide="count")
    ref = mu.ties(dense, torch.tensor(ws, dtype=F64), density=0.25, majority_sign_method="frequency")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_magnitude_matches_reference_and_peft():
    from peft.utils import merge_utils as mu

    ads = rand_adapters()
    ws = [1.0, -0.5, 2.0]
    got = run_method("magnitude", ads, ws, MOD, density=0.35)
    dense = [raw_delta(a.modules[MOD]) for a in ads]
    ref = sum(w * ref_trim(t, 0.35) for t, w in zip(dense, ws))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    peft_ref = mu.magnitude_prune(dense, torch.tensor(ws, dtype=F64), density=0.35)
    torch.testing.assert_close(got, peft_ref, rtol=1e-12, atol=1e-12)
    # density 1 keeps everything: the plain weighted sum.
    got1 = run_method("magnitude", ads, ws, MOD, density=1.0)
    torch.testing.assert_close(got1, sum(w * t for t, w in zip(dense, ws)), rtol=1e-12, atol=1e-12)


def test_kth_largest_exact():
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float64):
        x = (torch.randn(5000, generator=g, dtype=dt) * 1e-3).abs()
        x[:100] = 0.0  # exact zeros and ties
        x[100:150] = x[200]
        for k in (1, 7, 100, 2500, 4900, 4950, 5000):
            assert kth_largest(x, k) == torch.sort(x, descending=True).values[k - 1]


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_matches_dense_reference(method):
    ads = rand_adapters()
    ws = [1.0, 0.5, 2.0]
    density, seed = 0.4, 7
    got = run_method(method, ads, ws, MOD, density=density, seed=seed)
    dropped = []
    for i, a in enumerate(ads):
        t = raw_delta(a.modules[MOD])
        m = ref_dare_mask(tuple(t.shape), density, module_seed(seed, MOD, i))
        dropped.append(t * m / density)
    ref = (
        sum(w * t for t, w in zip(dropped, ws))
        if method == "dare-linear"
        else ref_elect(dropped, ws, "mass", "count")
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (64, 48), (300, 129)])
def test_dare_masks_are_peft_masks(shape):
    """PEFT's random_pruning draws ``torch.bernoulli(full_like(x, density))``
    from the global generator; seeded with our per-(seed, module, adapter)
    seed and given a float32 tensor it draws the very mask loramix uses."""
    from peft.utils import merge_utils as mu

    s = module_seed(3, "m", 1)
    torch.manual_seed(s)
    pruned = mu.random_pruning(torch.ones(shape, dtype=torch.float32), 0.3, rescale=False)
    assert torch.equal(pruned.bool(), dare_mask(shape, 0.3, s))


def test_dare_matches_peft():
    """Same masks by construction: PEFT draws all task tensors' masks in
    sequence from one global generator, loramix one generator per (seed,
    module, adapter) so the result does not depend on order. So each
    adapter's mask is drawn by PEFT's own ``prune(..., "random")`` after
    seeding the global generator with that adapter's seed; dare_linear is
    linear, so it is the sum of PEFT's dare_linear of each adapter alone;
    dare_ties gets the dropped tensors with density 1 (PEFT then prunes
    nothing and runs its sign election and disjoint merge on them)."""
    from peft.utils import merge_utils as mu

    ads = rand_adapters()
    ws = [1.0, 0.5, 2.0]
    density, seed = 0.6, 11
    f32 = [raw_delta(a.modules[MOD]).float() for a in ads]
    seeds = [module_seed(seed, MOD, i) for i in range(len(ads))]

    lin = 0
    for t, w, s in zip(f32, ws, seeds):
        torch.manual_seed(s)
        lin = lin + mu.dare_linear([t], torch.tensor([w]), density)
    got = run_method("dare-linear", ads, ws, MOD, dtype=torch.float32, density=density, seed=seed)
    torch.testing.assert_close(got, lin, rtol=1e-5, atol=1e-5)

    dropped = []
    for t, s in zip(f32, seeds):
        torch.manual_seed(s)
        dropped.append(mu.prune(t, density, method="random", rescale=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ties = mu.dare_ties(dropped, torch.tensor(ws), 1.0, majority_sign_method="frequency")
    got = run_method("dare-ties", ads, ws, MOD, dtype=torch.float32, density=density, seed=seed, sign="count")
    torch.testing.assert_close(got, ties, rtol=1e-5, atol=1e-5)


def test_dare_seed_depends_on_module_adapter_not_order():
    ads = rand_adapters()
    a = run_method("dare-linear", ads, [1, 1, 1], MOD, density=0.5, seed=1)
    b = run_method("dare-linear", ads, [1, 1, 1], MOD, density=0.5, seed=1)
    c = run_method("dare-linear", ads, [1, 1, 1], MOD, density=0.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the other module first, then this one: the same result
    run_method("dare-linear", ads, [1, 1, 1], "layers.1.proj", density=0.5, seed=1)
    assert torch.equal(run_method("dare-linear", ads, [1, 1, 1], MOD, density=0.5, seed=1), a)
    assert len({module_seed(1, MOD, i) for i in range(3)} | {module_seed(1, "layers.1.proj", 0)}) == 4


# ----------------------------------------------------------------------------- svd


def svd_factors(ads, ws, module, **params):
    m = get_method("svd")
    p = m.validate(params, ads)
    items = [(i, a.modules[module]) for i, a in enumerate(ads) if module in a.modules]
    ctx = ModuleContext(module, tuple(i for i, _ in items), torch.device("cpu"), F64)
    return m.factors(ctx, [md for _, md in items], [ws[i] for i, _ in items], p)


@pytest.mark.parametrize("module", ["layers.0.proj", "layers.1.proj"])
def test_svd_full_rank_is_the_sum(module):
    ads = rand_adapters()
    ws = [1.0, -0.5, 2.0]
    dense = sum(w * raw_delta(a.modules[module]) for a, w in zip(ads, ws))
    lr = svd_factors(ads, ws, module, rank=9)  # stacked rank 2+3+4
    torch.testing.assert_close(lr.B @ lr.A, dense, rtol=0, atol=1e-6 * float(dense.abs().max()))
    assert lr.info["energy_discarded"] < 1e-20 * lr.info["energy_total"] + 1e-24


@pytest.mark.parametrize("k", [1, 3, 5])
def test_svd_rank_k_singular_values_and_energy(k):
    ads = rand_adapters()
    ws = [1.0, 0.5, 2.0]
    dense = sum(w * raw_delta(a.modules[MOD]) for a, w in zip(ads, ws))
    U, S, Vh = torch.linalg.svd(dense)
    lr = svd_factors(ads, ws, MOD, rank=k)
    assert lr.B.shape == (24, k) and lr.A.shape == (k, 16)
    got_S = torch.linalg.svd(lr.B @ lr.A).S[:k]
    torch.testing.assert_close(got_S, S[:k], rtol=1e-10, atol=1e-10)
    # the best rank-k approximation (Eckart-Young), and the energy it drops
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    torch.testing.assert_close(lr.B @ lr.A, best, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lr.info["energy_discarded"], float((S[k:] ** 2).sum()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lr.info["energy_total"], float((dense**2).sum()), rtol=1e-10, atol=0)


def test_svd_energy_picks_smallest_rank():
    ads = rand_adapters()
    ws = [1.0, 0.5, 2.0]
    S = torch.linalg.svd(sum(w * raw_delta(a.modules[MOD]) for a, w in zip(ads, ws))).S
    frac = torch.cumsum(S**2, 0) / (S**2).sum()
    for e in (0.5, 0.9, 0.99, 1.0):
        k = get_method("svd")  # noqa: F841
        lr = svd_factors(ads, ws, MOD, energy=e)
        want = int((frac < e - 1e-12).sum()) + 1
        assert lr.A.shape[0] == min(want, 9)
        assert frac[lr.A.shape[0] - 1] >= e - 1e-12
        if lr.A.shape[0] > 1:
            assert frac[lr.A.shape[0] - 2] < e


# ----------------------------------------------------------------------------- sum and d2-signed


def test_sum_dense_and_factors():
    ads = rand_adapters()
    ws = [1.0, -0.5, 2.0]
    dense = sum(w * raw_delta(a.modules[MOD]) for a, w in zip(ads, ws))
    torch.testing.assert_close(run_method("sum", ads, ws, MOD), dense, rtol=1e-12, atol=1e-12)


def ref_d2_signed(ads, ws, module, W0):
    R = sum(w * raw_delta(a.modules[module]) for a, w in zip(ads, ws))
    V = W0 + R
    Ws = V * (W0.norm(dim=1, keepdim=True) / V.norm(dim=1, keepdim=True))
    return Ws + R - W0


def test_d2_signed_matches_reference_and_differs_from_effective_sum():
    ads = rand_adapters(d2=True)
    ws = [1.0, 0.5, 2.0]
    W0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(5), dtype=F64) * 3
    got = run_method("d2-signed", ads, ws, MOD, W0=W0)
    torch.testing.assert_close(got, ref_d2_signed(ads, ws, MOD, W0), rtol=1e-12, atol=1e-12)
    # way (a): sum of effective deltas W_hat_i - W0, i.e. `sum` on D2 adapters
    eff = run_method("sum", ads, ws, MOD, W0=W0)
    ref_eff = 0
    for a, w in zip(ads, ws):
        r = raw_delta(a.modules[MOD])
        V = W0 + r
        ref_eff = ref_eff + w * (V * (W0.norm(dim=1, keepdim=True) / V.norm(dim=1, keepdim=True)) + r - W0)
    torch.testing.assert_close(eff, ref_eff, rtol=1e-12, atol=1e-12)
    assert (got - eff).norm() > 1e-3 * eff.norm()


# ----------------------------------------------------------------------------- parameter checks


def test_registry_and_bad_params():
    assert set(available_methods()) >= {
        "sum",
        "svd",
        "ties",
        "dare-linear",
        "dare-ties",
        "magnitude",
        "d2-signed",
    }
    with pytest.raises(UsageError, match="known methods: .*dare-linear.*ties"):
        get_method("task-arithmetic")
    ads = rand_adapters()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError, match=r"--density.*outside \(0, 1\]"):
            get_method("ties").validate({"density": bad}, ads)
    with pytest.raises(UsageError, match="needs --density"):
        get_method("dare-ties").validate({}, ads)
    with pytest.raises(UsageError, match="--sign"):
        get_method("ties").validate({"density": 0.5, "sign": "vote"}, ads)
    with pytest.raises(UsageError, match="--rank.*does not apply to method ties"):
        get_method("ties").validate({"density": 0.5, "rank": 3}, ads)
    with pytest.raises(UsageError, match="below 1"):
        get_method("svd").validate({"rank": 0}, ads)
    with pytest.raises(UsageError, match="above the stacked rank 9"):
        get_method("svd").validate({"rank": 10}, ads)
    with pytest.raises(UsageError, match="exactly one of"):
        get_method("svd").validate({"rank": 2, "energy": 0.9}, ads)
    with pytest.raises(UsageError, match="exactly one of"):
        get_method("svd").validate({}, ads)
    with pytest.raises(UsageError, match="d2lora adapters"):
        get_method("d2-signed").validate({}, ads)
    assert get_method("ties").validate({"density": 0.5, "lambda": 2}, ads)["lambda_"] == 2.0
