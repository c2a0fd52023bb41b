"""Iso-C (``iso-c``; loramix/methods/iso.py) and TSV-Merge (``tsv``;
loramix/methods/tsv.py): from the factors, against dense references written
from the papers' algorithms (SVDs of the dense deltas), and PEFT loading the
exact adapter each writes."""

from __future__ import annotations

import copy

import pytest
import torch

from loramix.adapter import Adapter, ModuleDelta
from loramix.methods import merge

from .test_cli_errors import run_error
from .test_core_space import (
    SHAPES,
    WS,
    check_untrained,
    check_written_and_into,
    peft_setup,  # noqa: F401  (the fixture: the same adapters, a, b, c and a DoRA)
    reference_deltas,
)
from .test_merge import F64, MOD, rand_adapters, raw_delta, run_method

EPS = torch.finfo(F64).eps


def svd_cut(D):
    """``U, S, V^T`` of ``D`` above its numerical rank."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = int((S > S[0] * max(D.shape) * EPS).sum())
    return U[:, :k], S[:k], Vh[:k]


def ref_iso_c(mds, ws, lam=1.0, flat="mean"):
    """Iso-C: the sum's singular values all set to their mean (over its nonzero
    ones), or with ``flat="rms"`` to their root mean square."""
    U, S, Vh = svd_cut(sum(w * raw_delta(m) for w, m in zip(ws, mds)))
    return lam * (S.mean() if flat == "mean" else S.square().mean().sqrt()) * U @ Vh


def orthonormal(X):
    """The paper's orthogonalisation of full-rank ``X``: ``P Z^T`` of its SVD."""
    P, _, Zt = torch.linalg.svd(X, full_matrices=False)
    return P @ Zt


def ref_tsv(mds, ws, lam=1.0):
    """TSV-Merge: each delta's top ``min(out, in) // N`` singular triplets,
    the stacked left and right vectors orthogonalised, the values kept."""
    out, inn = mds[0].shape
    cut = min(out, inn) // len(mds)
    Us, Ss, Vs = [], [], []
    for w, m in zip(ws, mds):
        U, S, Vh = svd_cut(w * raw_delta(m))
        Us.append(U[:, :cut]), Ss.append(S[:cut]), Vs.append(Vh[:cut].T)
    return lam * orthonormal(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ orthonormal(torch.cat(Vs, 1)).T


REFS = {"iso-c": ref_iso_c, "tsv": ref_tsv}


@pytest.mark.parametrize("method", list(REFS))
@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
def test_from_the_factors_it_is_the_papers_algorithm(method, shapes):
    """Signed weights and a scale; where ``R = 9`` exceeds ``out`` or ``in``,
    TSV keeps ``min(out, in) // 3`` directions of each delta (1 of 2..4 on
    the 6 x 5 module) and Iso-C's sum has rank ``min(out, in)``."""
    ads = rand_adapters(shapes=shapes)
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        got = run_method(method, ads, WS, mod, lambda_=0.8)
        ref = REFS[method](mds, WS, 0.8)
        assert ref.abs().max() > 1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        plain = sum(w * raw_delta(m) for w, m in zip(WS, mds))
        assert float((plain - got).abs().max()) > 1e-3 * float(ref.abs().max())  # not the sum


def test_iso_c_gives_every_direction_of_the_sum_the_mean_singular_value():
    ads = rand_adapters()
    mds = [a.modules[MOD] for a in ads]
    S = torch.linalg.svdvals(sum(w * raw_delta(m) for w, m in zip(WS, mds)))[:9]
    got = torch.linalg.svdvals(run_method("iso-c", ads, WS, MOD))
    torch.testing.assert_close(got[:9], S.mean().expand(9), rtol=1e-12, atol=0)
    assert float(got[9:].max()) < 1e-12 * float(S[0])  # rank 9 = R, nothing else


def test_iso_c_flat_rms_keeps_the_sums_norm_in_every_module():
    """``--flat rms``: every singular value the sum's root mean square one, so
    ``||merged||_F = lambda ||S||_F``, module by module; the paper's mean
    gives less (the mean is at most the RMS)."""
    ads = rand_adapters()
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        plain = sum(w * raw_delta(m) for w, m in zip(WS, mds))
        got = run_method("iso-c", ads, WS, mod, lambda_=0.7, flat="rms")
        torch.testing.assert_close(got, ref_iso_c(mds, WS, 0.7, "rms"), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.linalg.norm(got), 0.7 * torch.linalg.norm(plain), rtol=1e-12, atol=0)
        mean = run_method("iso-c", ads, WS, mod, lambda_=0.7)
        assert float(torch.linalg.norm(mean)) < 0.99 * float(torch.linalg.norm(got))


def _orthogonal_adapters():
    """Three adapters whose deltas use disjoint coordinates in and out: their
    singular vectors are already orthogonal across adapters."""
    g = torch.Generator().manual_seed(4)
    ads, row = [], 0
    for i, r in enumerate((2, 3, 4)):
        B, A = torch.zeros(24, r, dtype=F64), torch.zeros(r, 40, dtype=F64)
        B[row : row + r] = torch.randn(r, r, generator=g, dtype=F64)
        A[:, 2 * row : 2 * row + 2 * r] = torch.randn(r, 2 * r, generator=g, dtype=F64)
        row += r
        ads.append(Adapter(name=f"o{i}", kind="lora", modules={MOD: ModuleDelta(MOD, B, A, 1.5, 1.5 * r)}))
    return ads


def test_tsv_of_adapters_with_orthogonal_directions_is_their_sum():
    """Nothing to decorrelate: the polar factor of orthonormal columns is
    themselves, and TSV keeps each delta whole (``r_i <= 24 // 3``)."""
    ads = _orthogonal_adapters()
    want = sum(w * raw_delta(a.modules[MOD]) for w, a in zip(WS, ads))
    torch.testing.assert_close(run_method("tsv", ads, WS, MOD), want, rtol=1e-12, atol=1e-12)


def test_an_adapter_given_twice_adds_no_direction():
    """TSV's stacked vectors are then dependent; its orthogonalisation is the
    partial isometry over their span, so the pair merges to the adapter once
    (``U U^T`` plus an arbitrary rank-2 term in the paper's code, which
    takes all of ``P Z^T``). Iso-C: twice the sum's mean, same directions."""
    ads = rand_adapters(n=1)
    twice = [ads[0], copy.deepcopy(ads[0])]
    d = raw_delta(ads[0].modules[MOD])
    torch.testing.assert_close(run_method("tsv", twice, [1.0, 1.0], MOD), d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run_method("iso-c", twice, [1.0, 1.0], MOD), 2 * ref_iso_c([ads[0].modules[MOD]], [1.0]),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("method", list(REFS))
def test_it_writes_an_exact_adapter_peft_loads_and_merges_into_a_base(peft_setup, method):  # noqa: F811  (the fixture)
    root, base, ads, _ = peft_setup
    ref = reference_deltas(REFS[method], ads, [1.0, 0.6, -0.8], 1.3)
    said = check_written_and_into(root, base, ads, method, ["--lambda", "1.3"], ref, lambda_=1.3)
    assert ("singular values set to their mean" if method == "iso-c" else "directions decorrelated") in said


@pytest.mark.parametrize("method", list(REFS))
def test_they_refuse_a_kind_whose_delta_needs_the_base(peft_setup, capsys, method):  # noqa: F811  (the fixture)
    root, _, ads, dora = peft_setup
    line = run_error(capsys, ["merge", "-m", method, ads[0], dora, "--out", str(root / "never")],
                     f"method {method} needs lora adapters", "dora adapter", "depend on the base")  # fmt: skip
    assert dora in line
    assert not (root / "never").exists()


@pytest.mark.parametrize("method", list(REFS))
def test_adapters_saved_untrained_merge_to_a_zero_adapter_peft_loads(peft_setup, capsys, method):  # noqa: F811  (the fixture)
    check_untrained(peft_setup[0], method, [], capsys)


def test_iso_c_refuses_a_cut_to_fewer_directions(peft_setup, capsys):  # noqa: F811  (the fixture)
    """Its singular values are all equal: ``--out-rank``/``--energy`` would
    keep whichever directions rounding ranks first (a dense reference and the
    factors picked other ones), so they are refused before any work."""
    root, _, ads, _ = peft_setup
    for flag in (["--out-rank", "2"], ["--energy", "0.5"]):
        run_error(capsys, ["merge", "-m", "iso-c", *ads, *flag, "--out", str(root / "never")],
                  "--out-rank/--energy: method iso-c is not truncated", "all equal")  # fmt: skip
        assert not (root / "never").exists()
    with pytest.raises(Exception, match="method iso-c is not truncated"):
        merge(ads, "iso-c", out_rank=2, out=root / "never")
