"""task-arithmetic, breadcrumbs and della (issue 13, item 7): each against a
dense float64 reference written here from mergekit's documented formula, and
against mergekit's own sparsification and consensus code where mergekit is
importable (a test-only oracle: ``pip install mergekit --no-deps``; it does
not touch torch)."""

from __future__ import annotations

import pytest
import torch

from loramix.errors import UsageError
from loramix.methods import get_method
from loramix.methods.base import module_seed

from .test_merge import MOD, rand_adapters, raw_delta, run_method

WS = [1.0, 0.6, -0.4]


def _deltas(ads, module=MOD):
    return [raw_delta(a.modules[module]) for a in ads]


def test_task_arithmetic_is_lambda_times_the_weighted_sum():
    ads = rand_adapters()
    got = run_method("task-arithmetic", ads, WS, MOD, lambda_=0.7)
    ref = 0.7 * sum(w * d for w, d in zip(WS, _deltas(ads)))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_adapter_is_exact(tmp_path):
    from loramix.methods import merge

    ads = rand_adapters()
    res = merge(ads, "task-arithmetic", weights=WS, out=tmp_path / "ta", lambda_=0.5)
    from loramix.io.adapter_files import load_adapter

    out = load_adapter(res.out).modules[MOD].residual()
    torch.testing.assert_close(out, 0.5 * sum(w * d for w, d in zip(WS, _deltas(ads))), rtol=1e-5, atol=1e-6)


def ref_breadcrumbs(d, density, gamma):
    """mergekit's magnitude_outliers, written out: sort |d| ascending, keep [n_bot, n_bot + n_keep)."""
    n = d.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    order = sorted(range(n), key=lambda j: abs(float(d.reshape(-1)[j])))
    keep = torch.zeros(n, dtype=d.dtype)
    for j in order[n_bot : n_bot + n_keep]:
        keep[j] = 1
    return d * keep.reshape(d.shape)


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.05), (0.5, 0.0), (0.9, 0.2)])
def test_breadcrumbs_matches_the_formula(density, gamma):
    ads = rand_adapters()
    got = run_method("breadcrumbs", ads, WS, MOD, density=density, gamma=gamma, lambda_=1.3)
    ref = 1.3 * sum(w * ref_breadcrumbs(d, density, gamma) for w, d in zip(WS, _deltas(ads)))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_breadcrumbs_sparsify_breaks_ties_like_the_stable_sort(dtype):
    """Heavy ties at both cut points (a few distinct magnitudes, signs mixed,
    zeros), every cut fraction: the threshold selection keeps exactly the
    entries a stable ascending sort keeps."""
    from loramix.methods.breadcrumbs import breadcrumbs_

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        levels = 1 + trial % 6
        d = (torch.randint(-levels, levels + 1, (7, 9), generator=g) * 0.25).to(dtype)
        density = float(torch.rand((), generator=g))
        gamma = float(torch.rand((), generator=g)) * 0.5
        got = breadcrumbs_(d.clone(), density, gamma)
        assert torch.equal(got, ref_breadcrumbs(d, density, gamma)), (trial, density, gamma)


def ref_della_sparsify(d, density, epsilon, seed):
    """mergekit's della_magprune with L1 rescale, written out (rows ranked by magnitude)."""
    out_f, in_f = d.shape
    probs = torch.empty(out_f, in_f, dtype=torch.float32)
    for r in range(out_f):
        order = sorted(range(in_f), key=lambda c: float(d[r, c].abs()))
        for rank, c in enumerate(order):
            probs[r, c] = (density - epsilon) + rank / (in_f - 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed)).double()
    m = d * mask
    if d.abs().sum() < 1e-7 or m.abs().sum() < 1e-7:  # mergekit's rescaled_masked_tensor guard
        return m
    return m * (d.abs().sum() / m.abs().sum())


def ref_consensus(deltas, ws, normalize=True):
    """mergekit's GeneralizedTaskArithmeticMerge with consensus 'sum' on weighted deltas."""
    x = torch.stack([w * d for w, d in zip(ws, deltas)])
    wt = torch.tensor(ws, dtype=x.dtype)[:, None, None]
    majority = (x.sum(0) >= 0).double() * 2 - 1
    mask = (x.sign() == majority).double()
    mixed = (x * mask).sum(0)
    div = (wt * mask).sum(0)
    div[div == 0] = 1
    return mixed / div if normalize else mixed


def test_della_matches_the_formula():
    ads = rand_adapters()
    density, eps, seed = 0.5, 0.2, 7
    got = run_method("della", ads, WS, MOD, density=density, epsilon=eps, seed=seed, lambda_=0.9)
    sp = [ref_della_sparsify(d, density, eps, module_seed(seed, MOD, i)) for i, d in enumerate(_deltas(ads))]
    ref = 0.9 * ref_consensus(sp, WS)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    # the same seed gives the same draws; another seed others
    torch.testing.assert_close(
        run_method("della", ads, WS, MOD, density=density, epsilon=eps, seed=seed), got / 0.9
    )
    assert not torch.equal(run_method("della", ads, WS, MOD, density=density, epsilon=eps, seed=8), got / 0.9)


@pytest.mark.parametrize(("delta_size", "weight_size"), [(1.0, 1e-11), (1e-12, 1e9)])
def test_della_rescales_as_mergekit_whatever_the_size_of_the_weights(delta_size, weight_size):
    """mergekit sparsifies each delta before it weights it, so the L1 rescale's
    guard (no rescale where a norm is below 1e-7) sees the unweighted delta:
    weights of 1e-11 (which --divide weight normalises away) rescale deltas of
    ordinary size, and weights of 1e9 do not rescale deltas of 1e-12. Before,
    the guard saw the weighted delta: the first merge came out unrescaled
    (about 1/density too small), the second rescaled."""
    ads = rand_adapters()
    for a in ads:
        a.modules[MOD].scale *= delta_size
    density, eps, seed = 0.5, 0.2, 7
    ws = [weight_size * w for w in (1.0, 0.6, 0.4)]
    got = run_method("della", ads, ws, MOD, density=density, epsilon=eps, seed=seed)
    sp = [ref_della_sparsify(d, density, eps, module_seed(seed, MOD, i)) for i, d in enumerate(_deltas(ads))]
    ref = ref_consensus(sp, ws)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))


def test_della_ranks_are_the_inverse_of_the_row_sort():
    """The keep probabilities' ranks, scattered from one argsort, are the
    ranks a second argsort gives (the former code), ties included (values
    rounded to bfloat16 repeat): the same bits, so the same masks."""
    from loramix.methods.della import della_keep_probs

    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    # zeros of both signs and small integers: long runs of equal magnitudes (the
    # int32 sort must order them as the float sort does), float64 as merges pass them
    x[:5, ::3], x[5:9] = -0.0, torch.randint(-3, 4, (4, 300), generator=torch.Generator().manual_seed(4))
    x[9:12, 1::2] = 0.0
    for t in (x, x.double()):
        ranks = t.float().abs().argsort(dim=1).argsort(dim=1).float()
        assert torch.equal(della_keep_probs(t, 0.5, 0.2), (0.5 - 0.2) + ranks / 299 * (2 * 0.2))
    one = torch.randn(4, 1, dtype=torch.float64)  # a single column: every rank is the middle
    assert torch.equal(della_keep_probs(one, 0.5, 0.2), torch.full((4, 1), 0.3 + 0.5 * 0.4))


def test_della_refuses_probabilities_outside_0_1():
    with pytest.raises(UsageError, match="density"):
        get_method("della").validate({"density": 0.1, "epsilon": 0.2}, rand_adapters())


# ---------------------------------------------------------------- mergekit itself


def test_against_mergekit_itself():
    sp = pytest.importorskip(
        "mergekit.sparsify", reason="mergekit not installed (pip install mergekit --no-deps)"
    )
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    ads = rand_adapters()
    ds = [d.float() for d in _deltas(ads)]

    def mk_merge(sparsified, consensus, normalize, lam):
        x = torch.stack(sparsified) * torch.tensor(WS)[:, None, None]
        wt = torch.tensor(WS)[:, None, None]
        if consensus:
            mask = gta.get_mask(x, method="sum", mask_dtype=x.dtype)
            mixed, div = (x * mask).sum(0), (wt * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = x.sum(0), wt.sum(0)
        return (mixed / div if normalize else mixed) * lam

    bc = [sp.magnitude_outliers(d, density=0.4, gamma=0.05) for d in ds]
    got = run_method("breadcrumbs", ads, WS, MOD, dtype=torch.float32, density=0.4, gamma=0.05, lambda_=1.1)
    torch.testing.assert_close(got, mk_merge(bc, False, False, 1.1), rtol=1e-5, atol=1e-6)

    dl = []
    for i, d in enumerate(ds):
        torch.manual_seed(module_seed(3, MOD, i))  # mergekit draws from the global generator
        dl.append(sp.della_magprune(d, density=0.5, epsilon=0.15, rescale_norm=sp.RescaleNorm.l1))
    got = run_method("della", ads, WS, MOD, dtype=torch.float32, density=0.5, epsilon=0.15, seed=3)
    torch.testing.assert_close(got, mk_merge(dl, True, True, 1.0), rtol=1e-5, atol=1e-6)
