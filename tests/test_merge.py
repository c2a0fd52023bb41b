"""Merge methods (issue 6): each against an independent dense float64
reference, TIES/DARE/magnitude against ``peft.utils.merge_utils`` on the same
dense deltas, svd against a dense SVD, then end to end through the CLI."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from loramix.adapter import D2LORA, LORA, Adapter, ModuleDelta
from loramix.errors import UsageError
from loramix.methods import available_methods, get_method
from loramix.methods.base import ModuleContext, dare_mask, kth_largest, module_seed

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
        ads.append(Adapter(name=f"a{i}", kind=D2LORA if d2 else LORA, modules=mods))
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


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", dict(density=0.4, divide="count")),
        ("ties", dict(density=0.4, sign="count", divide="weight")),
        ("dare-ties", dict(density=0.5, divide="count")),
        ("dare-linear", dict(density=0.5)),
        ("della", dict(density=0.5)),
        ("magnitude", dict(density=0.4)),
        ("breadcrumbs", dict(density=0.4, gamma=0.05)),
        ("task-arithmetic", dict(lambda_=0.7)),
        ("sum", {}),
        ("svd", dict(rank=3)),
    ],
)
def test_a_zero_weight_adapter_is_as_if_left_out(method, params):
    """``--weights 1,0.5,0``: the zero-weight delta is 0, which no method keeps,
    elects with or counts (``divide=count`` too, where PEFT's ``ties``, electing
    on unweighted deltas, would count it), so the merge is that of the others
    (docs/merging.md, "Signed and zero weights"). Last in the list, so the
    others' DARE/DELLA masks, seeded by their place, are the same."""
    ads = rand_adapters()
    for mod in ("layers.0.proj", "layers.1.proj"):
        got = run_method(method, ads, [1.0, 0.5, 0.0], mod, **params)
        ref = run_method(method, ads[:2], [1.0, 0.5], mod, **params)
        assert got.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


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


@pytest.mark.parametrize(
    ("method", "params"), [("magnitude", dict(density=0.35)), ("breadcrumbs", dict(density=0.4, gamma=0.05))]
)
def test_running_sum_methods_hold_two_dense_deltas(method, params):
    """magnitude and breadcrumbs trim each delta and add it to a running sum:
    with the run's work tensors, two dense deltas per module (the sum and the
    one being trimmed), not one per adapter, and the same values as without."""
    from loramix.engine import Buffers

    ads = rand_adapters(n=6)
    ws = [1.0, -0.5, 2.0, 0.7, 1.3, -1.1]
    m = get_method(method)
    p = m.validate(params, ads)
    mds = [a.modules[MOD] for a in ads]
    roles = []

    class Counting(Buffers):
        def get(self, role, *a, **kw):
            roles.append(role)
            return super().get(role, *a, **kw)

    ctx = ModuleContext(MOD, tuple(range(6)), torch.device("cpu"), F64, Counting())
    got = m.delta(ctx, mds, ws, None, p).clone()
    assert {r for r in roles if r.startswith("delta")} == {"delta0", "delta1"}
    assert torch.equal(got, run_method(method, ads, ws, MOD, **params))


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
    assert torch.equal(pruned.bool(), dare_mask(shape, 0.3, s).bool())


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


def test_dare_seed_is_the_adapters_place_in_the_users_list():
    """An adapter that does not touch a module does not shift the others'
    masks there: adapter ``i`` draws with ``module_seed(seed, module, i)``,
    ``i`` its place in the user's list (not among the module's owners)."""
    ads = rand_adapters()
    del ads[0].modules[MOD]  # adapters 1 and 2 own MOD; 0 owns only layers.1.proj
    ws, density, seed = [1.0, 0.5, 2.0], 0.4, 7
    got = run_method("dare-linear", ads, ws, MOD, density=density, seed=seed)
    ref = 0
    for i in (1, 2):
        t = raw_delta(ads[i].modules[MOD])
        ref = ref + ws[i] * t * ref_dare_mask(tuple(t.shape), density, module_seed(seed, MOD, i)) / density
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


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


def test_d2_signed_projects_along_the_adapters_norm_dim():
    """Adapters trained with ``norm_dim=0`` (one norm per input column) are
    projected onto the base's column norms, not its row norms."""
    ads = rand_adapters(d2=True)
    for a in ads:
        for m in a.modules.values():
            m.norm_dim = 0
    ws = [1.0, 0.5, 2.0]
    W0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(5), dtype=F64) * 3
    got = run_method("d2-signed", ads, ws, MOD, W0=W0)
    R = sum(w * raw_delta(a.modules[MOD]) for a, w in zip(ads, ws))
    V = W0 + R
    ref = V * (W0.norm(dim=0, keepdim=True) / V.norm(dim=0, keepdim=True)) + R - W0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert (got - ref_d2_signed(ads, ws, MOD, W0)).norm() > 1e-3 * ref.norm()  # not the row-norm result


def test_d2_signed_refuses_adapters_with_different_projections():
    """One projection is applied to the summed residual, so its axis
    (``norm_dim``) and its floor (``eps``) must be every adapter's: it took
    the first adapter's eps silently."""
    for field, value, msg in (("norm_dim", 0, r"different axes \(norm_dim \[0, 1\]\)"),
                              ("eps", 1e-4, r"different eps \(\[1e-08, 0.0001\]\)")):  # fmt: skip
        ads = rand_adapters(d2=True)
        assert get_method("d2-signed").validate({}, ads) == {}
        for m in ads[1].modules.values():
            setattr(m, field, value)
        with pytest.raises(UsageError, match=msg):
            get_method("d2-signed").validate({}, ads)


LAMBDA_METHODS = [
    ("ties", dict(density=0.3)),
    ("magnitude", dict(density=0.35)),
    ("dare-linear", dict(density=0.4, seed=7)),
    ("dare-ties", dict(density=0.4, seed=7)),
    ("breadcrumbs", dict(density=0.4, gamma=0.05)),
    ("della", dict(density=0.5, epsilon=0.2, seed=7)),
    ("task-arithmetic", {}),
    ("core-ties", dict(density=0.3)),
    ("core-dare-ties", dict(density=0.4, seed=7)),
    ("core-dare-linear", dict(density=0.4, seed=7)),
    ("knots-ties", dict(density=0.3)),
    ("knots-dare-ties", dict(density=0.4, seed=7)),
    ("iso-c", {}),
    ("iso-cts", dict(common=0.5)),
    ("tsv", {}),
]


def test_lambda_methods_are_all_listed():
    with_lambda = {n for n in available_methods() if "lambda_" in {p.name for p in get_method(n).params}}
    assert with_lambda == {m for m, _ in LAMBDA_METHODS}


@pytest.mark.parametrize(("method", "params"), LAMBDA_METHODS, ids=[m for m, _ in LAMBDA_METHODS])
def test_lambda_scales_the_merged_delta(method, params):
    """``merged = lambda * (...)`` for every method with ``--lambda`` (the
    reference tests above mostly run at the default ``lambda = 1``)."""
    assert "lambda_" in {p.name for p in get_method(method).params}
    ads = rand_adapters()
    ws = [1.0, -0.5, 2.0]
    one = run_method(method, ads, ws, MOD, **params)
    got = run_method(method, ads, ws, MOD, lambda_=0.6, **params)
    assert one.abs().max() > 0
    torch.testing.assert_close(got, 0.6 * one, rtol=1e-12, atol=1e-12)


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
        get_method("model-stock")  # not a loramix method
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


# ----------------------------------------------------------------------------- end to end through the CLI


from loramix.cli import main  # noqa: E402
from loramix.io.adapter_files import load_adapter, save_d2_adapter  # noqa: E402
from loramix.io.model_folder import BaseModelFolder  # noqa: E402

from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT-2 (Conv1D) and Llama (nn.Linear) base, three PEFT adapters
    each (mixed rank, alpha, rsLoRA, coverage), and two D2-LoRA adapters on GPT-2."""
    root = tmp_path_factory.mktemp("merge")
    out = {}
    for kind, make in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        model = make(seed=0)
        specs = [
            dict(seed=1, r=4, lora_alpha=8),
            dict(seed=2, r=3, lora_alpha=3, use_rslora=True),
            dict(
                seed=3,
                r=2,
                lora_alpha=6,
                target_modules=["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "up_proj"],
            ),
        ]
        out[kind] = dict(
            make=lambda make=make: make(seed=0),
            base=save_base(model, root / f"{kind}_base"),
            adapters=[make_peft_adapter(model, root / f"{kind}_ad{i}", **s) for i, s in enumerate(specs)],
        )
    base = BaseModelFolder(out["gpt2"]["base"])
    d2 = []
    for j in range(2):
        g = torch.Generator().manual_seed(40 + j)
        mods = {}
        for name in (
            "transformer.h.0.attn.c_proj",
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.mlp.c_fc",
        ):
            o, i = base.read_module_weight(name).shape
            mods[name] = ModuleDelta(
                name=name,
                B=torch.randn(o, 3, generator=g) * 0.3,
                A=torch.randn(3, i, generator=g) * 0.3,
                scale=8 / 3,
                alpha=8.0,
                B_neg=torch.randn(o, 3, generator=g) * 0.3,
                A_neg=torch.randn(3, i, generator=g) * 0.3,
                tau=0.5,
            )
        d2.append(save_d2_adapter(root / f"d2_{j}", mods, r=3, lora_alpha=8, tau=0.5))
    out["gpt2"]["d2"] = d2
    return out


def cli(capsys, *args):
    code = main(["merge", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def load_out(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def check_against_reference(base_dir, out_dir, adapter_dirs, ws, method, **params):
    """Every adapted weight of the output equals W0 + the method's float64
    dense reference on the loaded adapters (Conv1D transposes handled by
    BaseModelFolder); every other tensor is the base's, unchanged."""
    ads = [load_adapter(p) for p in adapter_dirs]
    base, out = BaseModelFolder(base_dir), BaseModelFolder(out_dir)
    names = list(dict.fromkeys(n for a in ads for n in a.modules))
    for name in names:
        sub = [(a, w) for a, w in zip(ads, ws) if name in a.modules]
        dense = [raw_delta(a.modules[name]) for a, _ in sub]
        wsub = [w for _, w in sub]
        W0 = base.read_module_weight(name, dtype=F64)
        if method == "ties":
            ref = ref_elect(
                [ref_trim(t, params["density"]) for t, _ in zip(dense, wsub)], wsub, "mass", "count"
            )
        elif method == "magnitude":
            ref = sum(w * ref_trim(t, params["density"]) for t, w in zip(dense, wsub))
        elif method in ("dare-linear", "dare-ties"):
            idx = [ads.index(a) for a, _ in sub]
            d = params["density"]
            ts = [
                t * ref_dare_mask(tuple(t.shape), d, module_seed(params["seed"], name, i)) / d
                for t, i in zip(dense, idx)
            ]
            ref = (
                sum(w * t for t, w in zip(ts, wsub))
                if method == "dare-linear"
                else ref_elect(ts, wsub, "mass", "count")
            )
        elif method == "svd":
            U, S, Vh = torch.linalg.svd(sum(w * t for t, w in zip(dense, wsub)))
            k = params["rank"]
            ref = (U[:, :k] * S[:k]) @ Vh[:k]
        else:
            raise ValueError(method)
        got = out.read_module_weight(name, dtype=F64)
        err = float((got - W0 - ref).norm() / ref.norm())
        assert err < 1e-5, (method, name, err)
    adapted = {base.module_weight_key(n)[0] for n in names}
    for key in base.keys():
        if key not in adapted:
            assert torch.equal(base.read_tensor(key), out.read_tensor(key)), key


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", dict(density=0.3)),
        ("dare-ties", dict(density=0.5, seed=4)),
        ("dare-linear", dict(density=0.7, seed=0)),
        ("magnitude", dict(density=0.4)),
        ("svd", dict(rank=3)),
    ],
)
def test_cli_into_base_matches_reference_and_loads(models, kind, method, params, tmp_path, capsys):
    m = models[kind]
    ws = [1.0, 0.5, 2.0]
    flags = [x for k, v in params.items() for x in (f"--{k}", v)]
    out = tmp_path / "out"
    code, so, err = cli(
        capsys,
        "--method",
        method,
        *m["adapters"],
        "--weights",
        "1,0.5,2",
        "--into",
        m["base"],
        "--out",
        out,
        *flags,
    )
    assert code == 0, err
    assert f"with {method}" in so and "model written" in so
    check_against_reference(m["base"], out, m["adapters"], ws, method, **params)
    model = load_out(out)
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()
    rec = json.loads((out / "loramix.json").read_text())
    assert rec["method"] == method and rec["created"] and rec["parameters"]["weights"] == ws
    assert [i["sha256"] for i in rec["inputs"][:3]] == [load_adapter(p).sha256 for p in m["adapters"]]


@pytest.mark.parametrize(
    "method,params",
    [
        ("sum", {}),
        ("ties", dict(density=0.4)),
        ("dare-linear", dict(density=0.6, seed=3)),
        ("magnitude", dict(density=0.5)),
    ],
)
def test_a_float64_base_gets_float64_deltas(method, params, tmp_path):
    """A float64 weight is added to in float64 (docs/merging.md, Sum), and its
    delta is formed in float64 too: float64 adapters with weights and scales
    that are not powers of two merge into a float64 base to float64's rounding
    of the dense reference. (Before, the delta was formed in float32, from
    factors with w_i s_i folded in float32: 3.6e-8 of the delta for sum.)"""
    from loramix.methods import merge

    model = tiny_llama(seed=0).double()
    base = save_base(model, tmp_path / "base")
    paths = [
        make_peft_adapter(model, tmp_path / f"a{i}", seed=1 + i, r=3, lora_alpha=a)
        for i, a in enumerate((5, 7))
    ]
    ws = [0.3, 0.7]
    merge(
        [str(p) for p in paths], method, weights=ws, into=base, out=tmp_path / "out", progress=False, **params
    )
    ads = [load_adapter(p) for p in paths]
    assert {m.dtype for a in ads for m in a.modules.values()} == {torch.float64}
    before, after = BaseModelFolder(base), BaseModelFolder(tmp_path / "out")
    for name in ads[0].modules:
        dense = [raw_delta(a.modules[name]) for a in ads]
        if method == "sum":
            ref = sum(w * t for t, w in zip(dense, ws))
        elif method == "ties":
            ref = ref_elect(
                [ref_trim(w * t, params["density"]) for t, w in zip(dense, ws)], [1.0, 1.0], "mass", "count"
            )
        elif method == "magnitude":
            ref = sum(w * ref_trim(t, params["density"]) for t, w in zip(dense, ws))
        else:
            d = params["density"]
            ref = sum(
                w * t * ref_dare_mask(tuple(t.shape), d, module_seed(params["seed"], name, i)) / d
                for i, (t, w) in enumerate(zip(dense, ws))
            )
        got = after.read_module_weight(name, dtype=F64) - before.read_module_weight(name, dtype=F64)
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-13, (method, name, err)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "dare-ties", "--density", "0.5", "--seed", "9", "--into", "BASE"],
        ["-m", "ties", "--density", "0.3", "--sign", "count", "--divide", "weight", "--into", "BASE"],
        ["-m", "svd", "--energy", "0.8"],
    ],
)
def test_two_runs_byte_identical(models, args, tmp_path, capsys):
    m = models["gpt2"]
    args = [str(m["base"]) if a == "BASE" else a for a in args]
    ws = "1,0.5,2" if "weight" in args else "1,-0.5,2"  # --divide weight takes no negative weight
    for o in ("r1", "r2"):
        code, _, err = cli(capsys, *args, *m["adapters"], "--weights", ws, "--out", tmp_path / o)
        assert code == 0, err
    f1, f2 = _files(tmp_path / "r1"), _files(tmp_path / "r2")
    assert f1.keys() == f2.keys()
    for name in f1:
        if name.name == "loramix.json":  # only the creation time may differ
            j1, j2 = json.loads(f1[name]), json.loads(f2[name])
            j1.pop("created"), j2.pop("created")
            assert j1 == j2
        else:
            assert f1[name] == f2[name], name


def test_svd_adapter_loads_in_peft_and_matches_dense_recompressed_sum(models, tmp_path, capsys):
    from peft import PeftModel

    m = models["gpt2"]
    ws = [1.0, 0.5, 2.0]
    code, so, err = cli(
        capsys, "-m", "svd", "--rank", "3", *m["adapters"], "--weights", "1,0.5,2", "--out", tmp_path / "ad"
    )
    assert code == 0, err
    assert "discarded energy" in so and "worst module" in so
    rec = json.loads((tmp_path / "ad" / "loramix.json").read_text())
    ads = [load_adapter(p) for p in m["adapters"]]
    ref_model = m["make"]()
    with torch.no_grad():
        for name in dict.fromkeys(n for a in ads for n in a.modules):
            dense = sum(w * raw_delta(a.modules[name]) for a, w in zip(ads, ws) if name in a.modules)
            U, S, Vh = torch.linalg.svd(dense)
            assert rec["modules"][name]["rank"] == 3
            torch.testing.assert_close(
                rec["modules"][name]["energy_discarded"], float((S[3:] ** 2).sum()), rtol=1e-9, atol=1e-12
            )
            lin = ref_model.get_submodule(name)  # Conv1D: weight is (in, out)
            lin.weight += ((U[:, :3] * S[:3]) @ Vh[:3]).T.float()
        want = ref_model(tokens()).logits
        pm = PeftModel.from_pretrained(m["make"](), str(tmp_path / "ad")).eval()
        got = pm(tokens()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_d2_signed_against_dense_reference_and_effective_sum(models, tmp_path, capsys):
    m = models["gpt2"]
    d2 = m["d2"]
    code, so, err = cli(
        capsys, "-m", "d2-signed", *d2, "--weights", "0.7,1.5", "--into", m["base"], "--out", tmp_path / "b"
    )
    assert code == 0, err
    assert "relative difference to adding effective deltas" in so
    assert (
        cli(capsys, "-m", "sum", *d2, "--weights", "0.7,1.5", "--into", m["base"], "--out", tmp_path / "a")[0]
        == 0
    )
    ads = [load_adapter(p) for p in d2]
    base = BaseModelFolder(m["base"])
    outb, outa = BaseModelFolder(tmp_path / "b"), BaseModelFolder(tmp_path / "a")
    rec = json.loads((tmp_path / "b" / "loramix.json").read_text())
    for name in ads[0].modules:
        W0 = base.read_module_weight(name, dtype=F64)
        ref_b = ref_d2_signed(ads, [0.7, 1.5], name, W0)
        got_b = outb.read_module_weight(name, dtype=F64) - W0
        assert float((got_b - ref_b).norm() / ref_b.norm()) < 1e-5, name
        ref_a = 0
        for a, w in zip(ads, [0.7, 1.5]):
            r = raw_delta(a.modules[name])
            V = W0 + r
            ref_a = ref_a + w * (V * (W0.norm(dim=1, keepdim=True) / V.norm(dim=1, keepdim=True)) + r - W0)
        got_a = outa.read_module_weight(name, dtype=F64) - W0
        assert float((got_a - ref_a).norm() / ref_a.norm()) < 1e-5, name
        diff = float((ref_b - ref_a).norm() / ref_a.norm())
        assert diff > 1e-3
        torch.testing.assert_close(
            rec["modules"][name]["rel_diff_vs_effective_sum"], diff, rtol=1e-3, atol=1e-6
        )
    load_out(tmp_path / "b")


def assert_one_line_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error:"), (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def test_bad_input_exit_2(models, tmp_path, capsys):
    m = models["gpt2"]
    a, base, out = m["adapters"], m["base"], tmp_path / "o"
    cases = [
        (["-m", "ties", "--density", "0", *a, "--into", base], ["--density", "outside (0, 1]"]),
        (["-m", "dare-ties", "--density", "1.01", *a, "--into", base], ["--density", "outside (0, 1]"]),
        (["-m", "svd", "--rank", "0", *a], ["--rank", "below 1"]),
        (["-m", "svd", "--rank", "10", *a], ["--rank", "above the stacked rank 9"]),
        (["-m", "svd", "--rank", "2", "--energy", "0.5", *a], ["exactly one of"]),
        (["-m", "svd", *a], ["exactly one of"]),
        (["-m", "svd", "--energy", "1.5", *a], ["--energy", "outside (0, 1]"]),
        (["-m", "d2-signed", *a, "--into", base], [a[0], "d2lora"]),
        (["-m", "svd", "--rank", "2", *m["d2"]], [m["d2"][0], "D2-LoRA"]),
        # not "--out-rank K ... for an adapter truncated by SVD", which would then be refused
        (
            ["-m", "d2-signed", *m["d2"]],
            [m["d2"][0], "D2-LoRA adapter: its effective delta depends on the base"],
        ),
        (
            ["-m", "slerp", *a],
            ["unknown method", ", ".join(available_methods())],
        ),
        (
            ["-m", "ties", "--density", "0.5", *a],
            ["--into", f"only {', '.join(n for n in available_methods() if get_method(n).low_rank)} write"],
        ),
        (["-m", "ties", "--density", "0.5", "--rank", "2", *a, "--into", base], ["--rank", "does not apply"]),
        (["-m", "ties", "--density", "0.5", "--sign", "vote", *a, "--into", base], ["--sign", "mass, count"]),
        (
            ["-m", "ties", "--density", "0.5", *a, "--weights", "1,2", "--into", base],
            ["--weights", "3 adapters"],
        ),
        (["-m", "sum", *a, "--dtype", "int8"], ["--dtype"]),
        (["-m", "sum", a[0], "--out", a[0]], ["overwrite the input"]),
        (["-m", "sum", *m["d2"]], ["--into"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["-m", "sum", *a, "--device", "cuda"], ["--device"]))
    for args, needles in cases:
        if "--out" not in args:
            args = [*args, "--out", out]
        assert_one_line_error(*cli(capsys, *args)[::2], *needles)
        assert not out.exists()
    # an existing output needs --force
    assert cli(capsys, "-m", "svd", "--rank", "2", *a, "--out", out)[0] == 0
    assert_one_line_error(*cli(capsys, "-m", "svd", "--rank", "2", *a, "--out", out)[::2], "--force")
    assert cli(capsys, "-m", "svd", "--rank", "2", *a, "--out", out, "--force")[0] == 0


def test_divide_weight_refuses_a_negative_weight(models, tmp_path, capsys):
    """``--divide weight`` (mergekit's ``normalize``: ``D = sum_i keep_i w_i``)
    with a negative weight is refused in one line before any work, also where
    it is the default (della) and from the API; ``--divide count`` takes the
    same weights. Why: the division cancels a negative weight's sign and
    blows the entry up where ``D`` nears 0 (``1,-0.999``: about 1000-fold)."""
    from loramix.errors import UsageError
    from loramix.methods import merge
    from loramix.methods.base import elect_and_merge

    m = models["gpt2"]
    a, base, out = m["adapters"], m["base"], tmp_path / "o"
    cases = [
        ["-m", "ties", "--density", "0.5", "--divide", "weight", "--weights", "1,-1,1", "--into", base],
        ["-m", "della", "--density", "0.5", "--weights", "1,-0.999,1", "--out-rank", "2"],
        [
            "-m",
            "dare-ties",
            "--density",
            "0.5",
            "--divide",
            "weight",
            "--weights",
            "-1,-1,-1",
            "--into",
            base,
        ],
    ]
    for args in cases:
        code, _, err = cli(capsys, *a, *args, "--out", out)
        assert_one_line_error(code, err, "--weights", "negative", "--divide count")
        assert not out.exists()
        # the refusal said "(della's default)" for ties and dare-ties too, whose default is count
        default = "--divide weight (della's default)" in err
        assert default == (args[1] == "della") and "della's" not in err.replace("(della's default)", ""), err
    with pytest.raises(UsageError, match="negative weight"):
        merge(a, "ties", weights=[1, -0.5, 1], out=out, into=base, density=0.5, divide="weight")
    assert not out.exists()
    code, text, err = cli(capsys, *a, "-m", "ties", "--density", "0.5", "--weights", "1,-1,1", "--into", base,
                          "--out", out)  # fmt: skip
    assert code == 0, err
    # the summary says what `sum --into` says of the same write: tensors, size, dtype, device, time
    n = len(BaseModelFolder(base).tensors)
    assert re.fullmatch(rf"merged 3 adapters with ties \(density=0\.5, [^)]*\): model written to {re.escape(str(out))} "
                        rf"\(\d+ modules, {n} tensors, [\d.]+ MB float32, on (cpu|cuda\S*) in [\d.]+ s\)\n", text), text  # fmt: skip
    check_against_reference(base, out, a, [1.0, -1.0, 1.0], "ties", density=0.5)
    # what the refusal spares: the same kept entries divided by 1 - 0.999
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 64, generator=g, dtype=F64)
    xs = [d.clone(), -0.999 * (0.5 * d + torch.randn(64, 64, generator=g, dtype=F64))]
    got = elect_and_merge([x.clone() for x in xs], [1.0, -0.999], "mass", "weight")
    assert got.abs().max() > 100 * (xs[0] + xs[1]).abs().max()


def test_an_output_that_holds_an_input_is_refused_even_with_force(models, tmp_path, capsys):
    """``--out`` a folder that contains an input adapter (its parent): with
    ``--force`` replacing it would delete the input, so it is refused before
    any work, and the input is left as it was."""
    import shutil

    holder = tmp_path / "holder"
    ad = shutil.copytree(models["gpt2"]["adapters"][0], holder / "ad")
    before = {p.name: p.read_bytes() for p in ad.iterdir()}
    for out in (holder, tmp_path):
        assert_one_line_error(
            *cli(capsys, "-m", "sum", ad, "--out", out, "--force")[::2], "overwrite the input"
        )
    assert {p.name: p.read_bytes() for p in ad.iterdir()} == before
    assert sorted(p.name for p in holder.iterdir()) == ["ad"]


@pytest.mark.parametrize("params", [{"rank": 4}, {"energy": 1.0}])
def test_svd_of_an_adapter_with_itself_keeps_its_rank(params):
    """An adapter merged with itself is ``(w_0 + w_1) dW``, of rank ``r`` (2
    here) of the 4 stacked: the other two singular values come out about
    1e-16 of the largest, and ``--rank 4`` wrote them, their directions
    arbitrary (a rank-4 adapter, its subspace half rounding). Now the rank is
    capped at the numerical rank (singular values above ``S_0 max(out, in)
    eps``): the written rank is 2 and the product is the sum. The same cap
    holds where a dense merge is truncated (``--out-rank``)."""
    from loramix.methods.runner import truncate

    ads = rand_adapters()
    twin = [ads[0], ads[0]]
    dense = 1.5 * raw_delta(ads[0].modules[MOD])
    lr = svd_factors(twin, [1.0, 0.5], MOD, **params)
    S = torch.linalg.svd(lr.B @ lr.A).S
    assert lr.A.shape == (2, 16) and lr.B.shape == (24, 2) and lr.info["rank"] == 2, S
    torch.testing.assert_close(lr.B @ lr.A, dense, rtol=0, atol=1e-12 * float(dense.abs().max()))
    cut = truncate(dense, 4, None)
    assert cut.A.shape[0] == 2 and cut.info["rank"] == 2
    # a full-rank sum keeps every requested rank (rand_adapters' three: 2 + 3 + 4)
    assert svd_factors(ads, [1.0, 1.0, 1.0], MOD, rank=9).A.shape[0] == 9


def test_svd_batched_equals_per_module():
    ads = rand_adapters(shapes=((24, 16), (24, 16), (16, 40)))
    ws = [1.0, -0.5, 2.0]
    m = get_method("svd")
    for params in ({"rank": 4}, {"energy": 0.9}):
        p = m.validate(params, ads)
        jobs = [
            (ModuleContext(n, (0, 1, 2), torch.device("cpu"), F64), [a.modules[n] for a in ads], ws)
            for n in ads[0].modules
        ]
        for (ctx, mds, w), lr in zip(jobs, m.factors_many(jobs, p)):
            one = m.factors(ctx, mds, w, p)
            assert lr.info == pytest.approx(one.info, rel=1e-12)
            torch.testing.assert_close(lr.B @ lr.A, one.B @ one.A, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out, R, inn", [(40, 6, 24), (4, 9, 30), (30, 9, 5), (3, 7, 2)])
def test_lowrank_svd_factors_are_the_dense_svds_leading_vectors(out, R, inn):
    """LowRankSVD applies the QR's reflectors to the leading ``k`` singular
    vectors of the core instead of forming ``Q``: each ``k`` gives orthonormal
    ``P``, ``Qt``, the dense SVD's singular values, its rank-``k`` truncation,
    and the first ``k`` columns of the full factors; a batch gives each
    member's own; ``out`` or ``in`` below ``R`` included."""
    from loramix.methods.svd import LowRankSVD

    g = torch.Generator().manual_seed(out * 100 + R)
    B = torch.randn(2, out, R, dtype=F64, generator=g)
    A = torch.randn(2, R, inn, dtype=F64, generator=g)
    svd = LowRankSVD(B, A)
    n = min(out, R, inn)
    assert svd.S.shape == (2, n)
    P_all, Qt_all = svd.factors(n)
    for j in range(2):
        U, S, Vh = torch.linalg.svd(B[j] @ A[j], full_matrices=False)
        torch.testing.assert_close(svd.S[j], S[:n], rtol=1e-12, atol=1e-12 * float(S[0]))
        for k in range(1, n + 1):
            P, Qt = (m[j] for m in svd.factors(k))
            assert P.shape == (out, k) and Qt.shape == (k, inn)
            eye = torch.eye(k, dtype=F64)
            torch.testing.assert_close(P.mT @ P, eye, rtol=0, atol=1e-13)
            torch.testing.assert_close(Qt @ Qt.mT, eye, rtol=0, atol=1e-13)
            torch.testing.assert_close((P * svd.S[j, :k]) @ Qt, (U[:, :k] * S[:k]) @ Vh[:k],
                                       rtol=0, atol=1e-12 * float(S[0]))  # fmt: skip
            torch.testing.assert_close(P, P_all[j, :, :k], rtol=0, atol=1e-14)
            torch.testing.assert_close(Qt, Qt_all[j, :k], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- the streaming pieces


def _bits(t):
    return t.view(torch.int64 if t.dtype == F64 else torch.int32)


@pytest.mark.parametrize("miss", [False, True])
def test_kth_largest_bracket_exact(monkeypatch, miss):
    """Large tensors take the sampled bracket; a bracket that misses falls
    back to the histogram; both exact, zeros and ties included."""
    import loramix.methods.base as mb

    if miss:
        monkeypatch.setattr(
            mb, "_bracket", lambda sample, k, n: (sample.dtype.type(5.0), sample.dtype.type(6.0))
        )
    g = torch.Generator().manual_seed(1)
    for dt in (torch.float32, F64):
        x = (torch.randn(200_000, generator=g, dtype=dt) * 1e-3).abs()
        x[:3000] = 0.0
        x[5000:6000] = x[7000]
        ref = torch.sort(x, descending=True).values
        for k in (1, 999, 40_000, 100_000, 197_000, 200_000):
            assert kth_largest(x, k) == ref[k - 1]


@pytest.mark.parametrize(
    ("sign", "divide", "weights"),
    [
        ("mass", "count", [1.0, 1.0, 1.0]),
        ("count", "weight", [1.0, 0.5, -2.0]),
        ("mass", "count", [1.0, -1.0, 0.0]),
        ("mass", "weight", [1.0, -1.0, -0.999]),  # D = 0 (taken as 1) and near it
    ],
)
@pytest.mark.parametrize("miss", [False, True])
def test_streaming_trim_and_elect_same_bits(monkeypatch, sign, divide, weights, miss):
    """What a streaming merge runs (work buffers, blocks of rows shared out
    with a helper thread, the bracket) gives the bits of
    ``elect_and_merge([trim_(x) ...])`` on whole fresh tensors, signed zeros
    included."""
    import loramix.engine as engine
    import loramix.methods.base as mb
    from loramix.engine import Buffers, cpu_threads

    if miss:
        monkeypatch.setattr(
            mb, "_bracket", lambda sample, k, n, *stride: (sample.dtype.type(5.0), sample.dtype.type(6.0))
        )
    monkeypatch.setattr(mb, "ROW_BLOCK_ELEMENTS", 3000)  # many blocks, a short last one
    monkeypatch.setattr(engine, "MAX_BLOCK_ELEMENTS", 3000)

    class Run:
        device = torch.device("cpu")
        helpers = None

    g = torch.Generator().manual_seed(2)
    for dt in (torch.float32, F64):
        xs = [torch.randn(401, 307, generator=g, dtype=dt) * (i + 1) * w for i, w in enumerate(weights)]
        xs[0][:5] = 0.0
        xs[1][7:9] = xs[1][10, 0]
        ref = mb.elect_and_merge([mb.trim_(x.clone(), 0.2) for x in xs], weights, sign, divide)
        old = torch.get_num_threads()
        torch.set_num_threads(2)  # a helper thread in the run
        try:
            with cpu_threads(Run):
                got = mb.trim_and_elect([x.clone() for x in xs], weights, 0.2, sign, divide, Buffers())
        finally:
            torch.set_num_threads(old)
        assert torch.equal(_bits(got), _bits(ref))


def _factor_deltas(out_f, in_f, rank, n, seed, zero_rows=0):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(n):
        B = torch.randn(out_f, rank, generator=g) * 0.02
        B[:zero_rows] = 0.0  # whole rows of exact zeros: ties at the bottom
        mods.append(ModuleDelta(name="m", B=B, A=torch.randn(rank, in_f, generator=g) / in_f**0.5,
                                scale=1.5, alpha=1.5 * rank))  # fmt: skip
    return mods


class _Run:  # what engine.cpu_threads needs of an executor
    device = torch.device("cpu")
    helpers = None


@pytest.mark.parametrize(
    ("shape", "rank", "weights", "density", "sign", "divide", "dtype"),
    [
        ((1001, 770), 8, [1.0, -0.5, 2.0], 0.05, "mass", "weight", torch.float32),
        ((1001, 770), 8, [1.0, -1.0], 0.05, "mass", "count", torch.float32),  # task negation
        ((517, 301), 4, [1.0, -0.999, 0.0], 0.2, "count", "weight", F64),  # D near and at 0; a zero weight
        ((517, 301), 16, [1.0, 1.0, 1.0, 1.0], 0.9, "count", "count", F64),
        ((77, 1024), 2, [1.0, 1.0], 0.5, "mass", "count", torch.float32),
        ((4097, 64), 8, [1.0, 2.0, 3.0], 0.2, "count", "weight", torch.float32),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_ties_from_factors_gives_the_dense_ways_bits(monkeypatch, shape, rank, weights, density, sign, divide,
                                                     dtype, threads):  # fmt: skip
    """TIES of LoRA deltas from their factors (blocks of rows formed twice,
    no delta whole) gives the bits of the dense way (``dense_deltas`` then
    ``trim_and_elect``), with many blocks (of other sizes than the dense
    way's), a last one shorter than ``engine.MIN_ROWS`` (joined), zero rows,
    negative weights, one thread or a helper beside it."""
    import loramix.engine as engine
    import loramix.methods.base as mb
    from loramix.engine import Buffers, cpu_threads

    # blocks of 24 rows (25, rounded down to a multiple of MIN_ROWS), and of 16 where they are
    # formed from factors, so the two ways block differently; 517 rows leave a last block of 5
    # from factors, 4097 one of 1, each joined to the one before
    monkeypatch.setattr(mb, "ROW_BLOCK_ELEMENTS", 25 * shape[1])
    monkeypatch.setattr(engine, "MAX_BLOCK_ELEMENTS", 25 * shape[1])
    monkeypatch.setattr(mb, "FACTOR_BLOCK_ELEMENTS", 19 * shape[1])
    mods = _factor_deltas(*shape, rank, len(weights), seed=shape[0], zero_rows=5)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_threads(_Run):
            ctx = ModuleContext("m", tuple(range(len(mods))), dtype=dtype, scratch=Buffers())
            got = mb.ties_from_factors(ctx, mods, weights, density, sign, divide)
            assert got is not None
            got = got.clone()
            ctx = ModuleContext("m", tuple(range(len(mods))), dtype=dtype, scratch=Buffers())
            ref = mb.trim_and_elect(mb.dense_deltas(ctx, mods, None, weights), weights, density, sign, divide,
                                    ctx.scratch)  # fmt: skip
    finally:
        torch.set_num_threads(old)
    assert torch.equal(_bits(got), _bits(ref))
    assert ref.count_nonzero() > 0


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("case", ["normal", "ties", "edges", "nan", "misled"])
def test_select_ranks_gives_the_ranks_values(case, native, monkeypatch):
    """_bracket's selection of the sample's ranks i_lo .. i_hi without a
    whole partition (_select_ranks) leaves at sample[i_lo:i_hi+1] those
    ranks' values, sorted, and _bracket's lo and hi are the values of ranks
    i_lo and i_hi; a sample with a NaN, or a subsample that misleads, is left
    untouched for the partitions. Counted by the fused kernels (where built)
    and by numpy."""
    import numpy as np

    import loramix.methods.base as mb
    from loramix.native import ties

    if native and ties.kernels() is None:
        pytest.skip("the fused TIES kernels are not built here")
    if not native:
        monkeypatch.setattr(ties, "kernels", lambda: None)

    rng = np.random.default_rng(len(case))
    took = []
    for m, k, n in ((40_000, 8_000, 1_240_000), (1_452_000, 9_000_000, 45_088_768), (70_000, 1, 2_170_000),
                    (70_000, 2_169_999, 2_170_000), (70_000, 700_000, 2_170_000)):  # fmt: skip
        x = np.abs(rng.standard_normal(m)).astype(np.float32)
        if case == "ties":
            x = np.round(x * 4) / 4  # a few distinct values, each many times
        if case == "edges":
            x[rng.integers(0, m, m // 10)] = np.float32(np.inf)
            x[rng.integers(0, m, m // 10)] = 0.0
        if case == "nan":
            x[rng.integers(0, m)] = np.nan
        if case == "misled":  # the subsample sees only zeros, the sample has few
            x[:: mb.SUBSAMPLE] = 0.0
        _, i_lo, i_hi = mb._bracket_ranks(m, k, n, mb.SAMPLE_STRIDE)
        got = x.copy()
        took.append(mb._select_ranks(got, i_lo, i_hi))
        if not took[-1]:
            assert np.array_equal(got, x, equal_nan=True)  # untouched
            continue
        ranked = np.sort(x)
        assert np.array_equal(got[i_lo : i_hi + 1], ranked[i_lo : i_hi + 1])
        want = (ranked[i_lo] if i_lo else -np.inf, ranked[i_hi] if i_hi < m - 1 else np.inf)
        assert tuple(map(float, mb._bracket(x.copy(), k, n))) == tuple(map(float, want))
    assert (not any(took)) if case == "nan" else (not all(took)) if case == "misled" else all(took), took


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("case", ["normal", "ties", "edges", "misled"])
def test_pick_is_the_kth_largest_of_all(case, native, monkeypatch):
    """_pick: the k-th largest of everything, from the count above a window
    and the window's values, by selection in a bracket of a subsample
    (_select_ranks) from SELECT_MIN values, else by a partition; None where
    the answer lies outside the window."""
    import numpy as np

    import loramix.methods.base as mb
    from loramix.native import ties

    if native and ties.kernels() is None:
        pytest.skip("the fused TIES kernels are not built here")
    if not native:
        monkeypatch.setattr(ties, "kernels", lambda: None)
    rng = np.random.default_rng(7 + len(case))
    for m in (1, 1_000, mb.SELECT_MIN, 250_000):
        x = (0.5 + rng.random(m)).astype(np.float32)
        if case == "ties":
            x = np.round(x * 8) / 8
        if case == "edges":
            x[rng.integers(0, m, m // 10)] = np.float32(0.5)
            x[rng.integers(0, m, m // 10)] = np.float32(1.5)
        if case == "misled":
            x[:: mb.SUBSAMPLE] = np.float32(0.5)
        ranked = np.sort(x)
        for above in (0, 12_345):
            for r in sorted({1, max(1, m // 3), max(1, m - 7), m}):
                got = mb._pick(above, x.copy(), above + r, torch.float32)
                assert got.dtype == torch.float32 and float(got) == float(ranked[m - r]), (m, above, r)
            assert mb._pick(above, x.copy(), above + m + 1, torch.float32) is None
        assert mb._pick(5, x.copy(), 5, torch.float32) is None


def test_factor_rows_sample_is_the_dense_sample():
    """The bracket's sample from the factors holds the entries the dense
    delta's strided sample holds (every 31st of the flattened delta)."""
    import loramix.methods.base as mb

    for out_f, in_f in ((1003, 770), (77, 1024), (4097, 64), (40, 31), (33, 20)):
        (m,) = _factor_deltas(out_f, in_f, 4, 1, seed=out_f)
        B, A = m.factors(F64)
        dense = mb._DeltaRows(B @ A).abs_sample()
        ours = mb._FactorRows(B, A, None, "r").abs_sample()
        assert ours.size == dense.size
        torch.testing.assert_close(torch.from_numpy(ours).sort().values, torch.from_numpy(dense).sort().values,
                                   rtol=1e-12, atol=0)  # fmt: skip


def test_ties_from_factors_declines_what_it_cannot_do(monkeypatch):
    """None (the caller takes the dense way) for nothing trimmed, nothing
    kept, a delta that needs the base, a small module, no work buffers, and
    a sample whose bracket misses; TIES then still gives the dense way's
    result."""
    import loramix.methods.base as mb
    from loramix.engine import Buffers

    mods = _factor_deltas(300, 400, 4, 2, seed=3)
    ctx = ModuleContext("m", (0, 1), scratch=Buffers())
    assert mb.ties_from_factors(ctx, mods, [1, 1], 1.0, "mass", "count") is None
    assert mb.ties_from_factors(ctx, mods, [1, 1], 1e-9, "mass", "count") is None
    assert mb.ties_from_factors(ModuleContext("m", (0, 1)), mods, [1, 1], 0.2, "mass", "count") is None
    small = _factor_deltas(30, 40, 4, 2, seed=3)
    assert mb.ties_from_factors(ctx, small, [1, 1], 0.2, "mass", "count") is None
    g = torch.Generator().manual_seed(0)
    d2 = ModuleDelta(name="m", B=torch.randn(300, 4, generator=g), A=torch.randn(4, 400, generator=g), scale=1.0,
                     alpha=4.0, B_neg=torch.randn(300, 4, generator=g), A_neg=torch.randn(4, 400, generator=g),
                     tau=0.5)  # fmt: skip
    assert mb.ties_from_factors(ctx, [mods[0], d2], [1, 1], 0.2, "mass", "count") is None
    params = dict(density=0.2, sign="mass", divide="count", lambda_=1.0)
    ref = get_method("ties").delta(ModuleContext("m", (0, 1)), mods, [1.0, 1.0], None, params).clone()
    assert mb.ties_from_factors(ctx, mods, [1, 1], 0.2, "mass", "count") is not None
    monkeypatch.setattr(
        mb, "_bracket", lambda sample, k, n, *stride: (sample.dtype.type(5.0), sample.dtype.type(6.0))
    )
    assert mb.ties_from_factors(ctx, mods, [1, 1], 0.2, "mass", "count") is None
    got = get_method("ties").delta(
        ModuleContext("m", (0, 1), scratch=Buffers()), mods, [1.0, 1.0], None, params
    )
    assert torch.equal(_bits(got), _bits(ref))


# ----------------------------------------------------------------------------- DoRA inputs, every method


def _full_rank_lora(deltas: dict, folder, conv1d: bool):
    """The dense deltas ``{module: (out, in)}`` (``(in, out)`` on a ``Conv1D``)
    as a PEFT LoRA folder holding them exactly: ``B = dW`` (float64), ``A = I``,
    scale 1; every merge method then acts on these very deltas."""
    from safetensors.torch import save_file

    folder.mkdir()
    ts, ranks = {}, {}
    for name, d in deltas.items():
        E = (d.T if conv1d else d).contiguous()
        ts[f"base_model.model.{name}.lora_B.weight"] = E
        ts[f"base_model.model.{name}.lora_A.weight"] = torch.eye(E.shape[1], dtype=F64)
        ranks[name] = E.shape[1]
    cfg = dict(peft_type="LORA", r=1, lora_alpha=1, target_modules=sorted(ranks), rank_pattern=ranks,
               alpha_pattern=ranks, fan_in_fan_out=conv1d, task_type="CAUSAL_LM")  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(ts, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def dora_mix(models, tmp_path_factory):
    """Per architecture: two PEFT DoRA adapters (trained-looking magnitudes) and
    a plain LoRA one, and the same three as full-rank LoRA folders holding the
    deltas PEFT's ``merge_and_unload`` adds to a float64 copy of the base."""
    from peft import PeftModel

    from .test_formats import _train_magnitudes

    root = tmp_path_factory.mktemp("dora_mix")
    out = {}
    for kind in ("gpt2", "llama"):
        m = models[kind]
        model = m["make"]()
        two = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj"]
        ins = [
            _train_magnitudes(make_peft_adapter(model, root / f"{kind}_d1", seed=7, use_dora=True, r=3,
                                                lora_alpha=24), 3),
            m["adapters"][0],
            _train_magnitudes(make_peft_adapter(model, root / f"{kind}_d2", seed=8, use_dora=True, r=2,
                                                lora_alpha=16, target_modules=two), 4),
        ]  # fmt: skip
        sd0 = {k: v.double() for k, v in model.state_dict().items()}
        eq = []
        for j, p in enumerate(ins):
            merged = PeftModel.from_pretrained(m["make"]().double(), str(p)).merge_and_unload().state_dict()
            d = {k[: -len(".weight")]: merged[k] - sd0[k] for k in sd0 if not torch.equal(merged[k], sd0[k])}
            eq.append(_full_rank_lora(d, root / f"{kind}_eq{j}", conv1d=kind == "gpt2"))
        out[kind] = (ins, eq)
    return out


@pytest.mark.parametrize(
    "kind,method,params",
    [
        ("llama", "sum", []),
        ("llama", "task-arithmetic", ["--lambda", "0.7"]),
        ("gpt2", "task-arithmetic", ["--lambda", "1.3"]),
        ("llama", "ties", ["--density", "0.5"]),
        ("gpt2", "ties", ["--density", "0.4", "--sign", "count"]),
        ("llama", "dare-linear", ["--density", "0.6", "--seed", "2"]),
        ("llama", "dare-ties", ["--density", "0.6"]),
        ("llama", "magnitude", ["--density", "0.5", "--lambda", "0.8"]),
        ("llama", "breadcrumbs", ["--density", "0.6"]),
        ("llama", "della", ["--density", "0.6", "--divide", "count"]),
    ],
)
def test_every_method_into_a_base_acts_on_peft_dora_effective_deltas(dora_mix, models, kind, method, params,
                                                                    tmp_path, capsys):  # fmt: skip
    """DoRA adapters mixed with a LoRA one, weighted (a negative weight too),
    merged ``--into`` a base by every dense method, give the bits' worth of the
    same merge of the deltas PEFT's ``merge_and_unload`` adds (each DoRA
    delta ``W_hat - W0`` against the same ``W0``; docs/adapters.md), written
    as full-rank LoRA. (task-arithmetic applied its lambda twice to DoRA and
    D2-LoRA inputs: 30 % off at lambda 0.7.)"""
    ins, eq = dora_mix[kind]
    for tag, srcs in (("real", ins), ("eq", eq)):
        args = ["-m", method, *params, *srcs, "--weights", "1,0.5,-0.7", "--into", models[kind]["base"]]
        code, _, err = cli(capsys, *args, "--out", tmp_path / tag, "--no-progress")
        assert code == 0, err
    base, got, want = (BaseModelFolder(p) for p in (models[kind]["base"], tmp_path / "real", tmp_path / "eq"))
    for key in base.keys():
        W0, x, y = (f.read_tensor(key).double() for f in (base, got, want))
        if torch.equal(y, W0):
            assert torch.equal(x, W0), key
        else:  # float32 working dtype: the deltas are rounded to float32 before they merge
            assert float((x - y).norm() / (y - W0).norm()) < 1e-6, (key, method)


def test_task_arithmetic_scales_d2_effective_deltas_once(models, tmp_path, capsys):
    """``lambda * sum_i w_i (W_hat_i - W0)`` for D2-LoRA into a base (lambda
    was applied twice to kinds that need the base)."""
    m = models["gpt2"]
    code, _, err = cli(capsys, "-m", "task-arithmetic", "--lambda", "0.6", *m["d2"], "--weights", "1,-0.5",
                       "--into", m["base"], "--out", tmp_path / "o", "--no-progress")  # fmt: skip
    assert code == 0, err
    ads = [load_adapter(p) for p in m["d2"]]
    base, out = BaseModelFolder(m["base"]), BaseModelFolder(tmp_path / "o")
    for name in ads[0].modules:
        W0 = base.read_module_weight(name, dtype=F64)
        ref = 0.6 * (ads[0].modules[name].delta(W0) - 0.5 * ads[1].modules[name].delta(W0))
        got = out.read_module_weight(name, dtype=F64) - W0
        assert float((got - ref).norm() / ref.norm()) < 1e-6, name


def test_svd_refuses_dora_pointing_to_what_takes_it(dora_mix, tmp_path, capsys):
    """svd takes LoRA only; the refusal of a DoRA adapter names the way that
    merges it (sum --into), not d2-signed alone, which refuses DoRA in turn."""
    dora = dora_mix["llama"][0][0]
    code, _, err = cli(capsys, "-m", "svd", "--rank", "2", dora, "--out", tmp_path / "o")
    assert_one_line_error(code, err, dora, "dora adapter", "DoRA", "sum --into BASE")
