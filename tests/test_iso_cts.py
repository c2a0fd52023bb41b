"""Iso-CTS (``iso-cts``; loramix/methods/iso_cts.py): from the factors,
against a dense reference of its definition and, where the sum has full
rank, the paper's algorithm on the dense deltas; PEFT loading the exact
adapter it writes."""

from __future__ import annotations

import copy

import pytest
import torch

from loramix.cli import main
from loramix.methods.iso_cts import split

from .test_cli_errors import run_error
from .test_core_space import (
    SHAPES,
    WS,
    check_untrained,
    check_written_and_into,
    peft_setup,  # noqa: F401  (the fixture: the same adapters, a, b, c and a DoRA)
    reference_deltas,
)
from .test_iso_tsv import orthonormal, ref_iso_c, svd_cut
from .test_merge import MOD, rand_adapters, raw_delta, run_method

EPS = torch.finfo(torch.float64).eps


def ref_iso_cts(mds, ws, lam=1.0, beta=0.8, flat="mean"):
    """docs/merging.md, "Iso-CTS", on the dense deltas: the sum's top ``k_c``
    directions and each delta's top ``s`` outside them, the stacked vectors
    orthogonalised, every singular value set to the mean of the stacked ones."""
    deltas = [w * raw_delta(m) for w, m in zip(ws, mds)]
    U, S, Vh = svd_cut(sum(deltas))
    K, T = len(S), len(deltas)
    s = min(round((K - int(K * beta)) / T), K // T)
    k_c = K - T * s
    Uc = U[:, :k_c]
    Us, Vs, sig = [Uc], [Vh[:k_c].T], [S[:k_c]]
    for d in deltas:
        P, R, Qh = torch.linalg.svd(d - Uc @ Uc.T @ d, full_matrices=False)
        k = min(s, int((R > S[0] * max(d.shape) * EPS).sum()))
        Us.append(P[:, :k]), Vs.append(Qh[:k].T), sig.append(R[:k])
    sigma = torch.cat(sig)
    value = sigma.mean() if flat == "mean" else sigma.square().mean().sqrt()
    return lam * value * orthonormal(torch.cat(Us, 1)) @ orthonormal(torch.cat(Vs, 1)).T


def paper_iso_cts(deltas, beta):
    """The paper's algorithm on full-rank deltas, its fractions of ``d =
    min(out, in)``: the common size rounded so that the rest splits evenly,
    each task's part projected off the common left vectors, the stacked
    vectors orthogonalised by ``P Z^T`` of their SVD."""
    d, T = min(deltas[0].shape), len(deltas)
    common = int(d * beta)
    each = round((d - common) / T)
    common = d - each * T
    U, S, Vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    Us, Ss, Vs = [U[:, :common]], [S[:common]], [Vh[:common].T]
    for t in deltas:
        P, R, Qh = torch.linalg.svd(t - U[:, :common] @ U[:, :common].T @ t, full_matrices=False)
        Us.append(P[:, :each]), Ss.append(R[:each]), Vs.append(Qh[:each].T)
    return torch.cat(Ss).mean() * orthonormal(torch.cat(Us, 1)) @ orthonormal(torch.cat(Vs, 1)).T


@pytest.mark.parametrize("flat", ["mean", "rms"])
@pytest.mark.parametrize("beta", [0.8, 0.5, 0.0])
@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
def test_from_the_factors_it_is_the_definition(shapes, beta, flat):
    """Signed weights and a scale; ``R = 9`` above ``out`` or ``in`` on the
    second shapes, where the sum has full rank."""
    ads = rand_adapters(shapes=shapes)
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        got = run_method("iso-cts", ads, WS, mod, lambda_=0.8, common=beta, flat=flat)
        ref = ref_iso_cts(mds, WS, 0.8, beta, flat)
        assert ref.abs().max() > 1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_where_the_sum_has_full_rank_it_is_the_papers_algorithm():
    """On a 6 x 5 module three adapters of rank 2-4 sum to rank 5 = min(out,
    in), so the fractions of the sum's rank are the paper's; at 0.5 each
    adapter gets one direction and the common part two, and the merge is
    neither Iso-C nor the sum."""
    ads = rand_adapters(shapes=((6, 5),))
    mds = [a.modules[MOD] for a in ads]
    assert split(5, 3, 0.5) == (2, 1)
    got = run_method("iso-cts", ads, WS, MOD, common=0.5)
    want = paper_iso_cts([w * raw_delta(m) for w, m in zip(WS, mds)], 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float((got - ref_iso_c(mds, WS)).abs().max()) > 1e-3 * float(want.abs().max())
    plain = sum(w * raw_delta(m) for w, m in zip(WS, mds))
    assert float((got - plain).abs().max()) > 1e-3 * float(want.abs().max())


@pytest.mark.parametrize("flat", ["mean", "rms"])
def test_common_one_is_iso_c(flat):
    ads = rand_adapters()
    for mod in ("layers.0.proj", "layers.1.proj"):
        got = run_method("iso-cts", ads, WS, mod, common=1.0, lambda_=1.3, flat=flat)
        want = run_method("iso-c", ads, WS, mod, lambda_=1.3, flat=flat)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("K", "T", "beta", "want"), [
    (24, 3, 0.8, (18, 2)),  # three rank-8 adapters: int(19.2) = 19, round(5 / 3) = 2
    (9, 3, 0.8, (6, 1)),
    (5, 3, 0.8, (5, 0)),  # round(1 / 3) = 0: iso-c
    (5, 3, 0.1, (2, 1)),  # round(5 / 3) = 2 would take 6 of 5: at most K // T
    (8, 4, 0.75, (8, 0)),  # round(0.5) = 0, half to even as the paper's code
    (10, 2, 0.0, (0, 5)),
    (1, 3, 0.0, (1, 0)),
])  # fmt: skip
def test_split_of_the_sums_rank(K, T, beta, want):
    k_c, s = split(K, T, beta)
    assert (k_c, s) == want and k_c + T * s == K and k_c >= 0


def test_an_adapter_inside_the_common_part_adds_no_direction():
    """``b`` is ``a``'s top singular direction, so the sum's common part
    holds it and ``b``'s part outside is rounding (about 1e-16 of the sum):
    counted against the sum's largest singular value it adds nothing, where
    counted against its own it would add an arbitrary direction. Given
    twice, ``a``'s parts outside are the same directions, kept once."""
    from loramix.adapter import Adapter, ModuleDelta

    a = rand_adapters(n=3)[2]  # rank 4
    U, S, Vh = torch.linalg.svd(raw_delta(a.modules[MOD]), full_matrices=False)
    b = Adapter(name="b", kind="lora", modules={MOD: ModuleDelta(MOD, U[:, :1] * S[0], Vh[:1], 1.0, 1.0)})
    Q = torch.linalg.qr(a.modules[MOD].B.double())[0]
    for pair, rank in (([a, b], 3), ([a, copy.deepcopy(a)], 3)):  # 2 common + a's 1 own (b's none)
        got = run_method("iso-cts", pair, [1.0, 1.0], MOD, common=0.5)
        assert float((got - Q @ (Q.T @ got)).abs().max()) < 1e-12 * float(got.abs().max())
        assert int((torch.linalg.svdvals(got) > 1e-10 * float(got.abs().max())).sum()) == rank


def test_it_writes_an_exact_adapter_peft_loads_and_merges_into_a_base(peft_setup, capsys):  # noqa: F811  (the fixture)
    root, base, ads, _ = peft_setup
    ref = reference_deltas(ref_iso_cts, ads, [1.0, 0.6, -0.8], 1.3, 0.5)
    said = check_written_and_into(root, base, ads, "iso-cts", ["--lambda", "1.3", "--common", "0.5"], ref,
                                  lambda_=1.3, common=0.5)  # fmt: skip
    assert "each adapter's own" in said and "singular values set to their mean" in said
    # --flat rms: the squared norm of each module's merge is that of its stacked singular values
    capsys.readouterr()
    assert main(["merge", "-m", "iso-cts", "--flat", "rms", *ads, "--out", str(root / "iso-cts-rms")]) == 0
    assert "singular values set to their root mean square: ||merged||^2 is" in capsys.readouterr().out


def test_it_refuses_a_kind_whose_delta_needs_the_base(peft_setup, capsys):  # noqa: F811  (the fixture)
    root, _, ads, dora = peft_setup
    line = run_error(capsys, ["merge", "-m", "iso-cts", ads[0], dora, "--out", str(root / "never")],
                     "method iso-cts needs lora adapters", "dora adapter", "depend on the base")  # fmt: skip
    assert dora in line
    assert not (root / "never").exists()


def test_adapters_saved_untrained_merge_to_a_zero_adapter_peft_loads(peft_setup, capsys):  # noqa: F811  (the fixture)
    check_untrained(peft_setup[0], "iso-cts", [], capsys)


@pytest.mark.parametrize(("flags", "said"), [
    (["--out-rank", "2"], "method iso-cts is not truncated"),
    (["--common", "1.5"], "--common: 1.5 is outside [0, 1]"),
    (["--common", "nan"], "--common"),
    (["--flat", "median"], "--flat: 'median' is not one of mean, rms"),
])  # fmt: skip
def test_it_refuses_a_cut_and_a_fraction_outside_the_unit_interval(peft_setup, capsys, flags, said):  # noqa: F811  (the fixture)
    root, _, ads, _ = peft_setup
    run_error(capsys, ["merge", "-m", "iso-cts", *ads, *flags, "--out", str(root / "never")], said)
    assert not (root / "never").exists()
