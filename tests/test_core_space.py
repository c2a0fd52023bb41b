"""Core-space merging (``core-ties``, ``core-dare-ties``, ``core-dare-linear``;
loramix/methods/core.py): the method on the deltas' cores in the SVD bases of
the stacked factors, against a dense reference written from the paper's
algorithm, and PEFT loading the exact adapter it writes."""

from __future__ import annotations

import pytest
import torch

from loramix.cli import main
from loramix.io.model_folder import BaseModelFolder
from loramix.methods import get_method, merge
from loramix.methods.core import CoreSpace
from loramix.methods.sum import Sum

from .factories import make_peft_adapter, save_base, tiny_llama
from .test_adapter_output import peft_logits, reference_logits
from .test_cli_errors import run_error
from .test_merge import F64, MOD, rand_adapters, raw_delta, ref_elect, ref_trim, run_method

WS = [1.0, 0.5, -2.0]


def canonical(X):
    """Each column of ``X`` with its entry of largest magnitude positive."""
    out = X.clone()
    for j in range(X.shape[1]):
        if X[int(X[:, j].abs().argmax()), j] < 0:
            out[:, j] = -X[:, j]
    return out


def ref_bases(mds, flip=False):
    """The paper's reference bases with ``torch.linalg.svd`` of the stacked
    factors: ``U_B`` (out, p) and ``V_A`` (in, q), each vector's sign fixed by
    :func:`canonical`; ``flip`` first negates every other singular vector (a
    sign LAPACK may choose either way)."""
    U = torch.linalg.svd(torch.cat([m.scale * m.B.double() for m in mds], 1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat([m.A.double() for m in mds], 0), full_matrices=False)[2].T
    if flip:
        U, V = U.clone(), V.clone()
        U[:, ::2] *= -1
        V[:, 1::2] *= -1
    return canonical(U), canonical(V)


def ref_core_ties(mds, ws, density, sign="mass", divide="count", flip=False):
    U, V = ref_bases(mds, flip)
    cores = [U.T @ raw_delta(m) @ V for m in mds]
    return U @ ref_elect([ref_trim(M, density) for M in cores], ws, sign, divide) @ V.T


SHAPES = [((24, 16), (16, 40)), ((6, 5), (5, 30))]  # the second: R = 9 above out or in


@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
@pytest.mark.parametrize(("sign", "divide"), [("mass", "count"), ("count", "count"), ("mass", "weight")])
def test_core_ties_is_ties_of_the_cores_in_the_stacked_factors_svd_bases(shapes, sign, divide):
    ads = rand_adapters(shapes=shapes)
    ws = WS if divide == "count" else [1.0, 0.5, 2.0]  # --divide weight refuses a negative weight
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        got = run_method("core-ties", ads, ws, mod, density=0.3, sign=sign, divide=divide, lambda_=0.8)
        ref = 0.8 * ref_core_ties(mds, ws, 0.3, sign, divide)
        assert ref.abs().max() > 1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        # the merge does not depend on the signs LAPACK gives the singular vectors
        flipped = 0.8 * ref_core_ties(mds, ws, 0.3, sign, divide, flip=True)
        torch.testing.assert_close(flipped, ref, rtol=1e-12, atol=1e-12)
        # and it is not plain TIES on the full deltas
        plain = run_method("ties", ads, ws, mod, density=0.3, sign=sign, divide=divide, lambda_=0.8)
        assert float((plain - got).abs().max()) > 1e-3 * float(ref.abs().max())


class CoreSum(CoreSpace):  # not registered: the sum in the core space
    inner = Sum
    name = "core-sum"
    params = ()


@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
def test_the_core_space_is_lossless_so_a_sum_there_is_the_sum(shapes):
    """``U_B M_i V_A^T = dW_i``: the sum of the cores, taken back, is the sum
    of the deltas, whatever the ranks against ``out`` and ``in``."""
    ads = rand_adapters(shapes=shapes)
    for mod in ("layers.0.proj", "layers.1.proj"):
        items = [(i, a.modules[mod]) for i, a in enumerate(ads)]
        from loramix.methods.base import ModuleContext

        ctx = ModuleContext(mod, tuple(range(len(ads))), torch.device("cpu"), F64)
        lr = CoreSum().factors(ctx, [m for _, m in items], WS, {})
        want = sum(w * raw_delta(m) for w, (_, m) in zip(WS, items))
        torch.testing.assert_close(lr.B @ lr.A, want, rtol=1e-12, atol=1e-12)
        out, inn = want.shape
        assert lr.B.shape[1] == min(out, inn, 9)  # the smaller basis: the written rank


@pytest.mark.parametrize("inner", ["dare-ties", "dare-linear"])
def test_core_dare_draws_its_masks_on_the_cores_by_the_modules_seeds(inner):
    """``core-dare-*`` is the inner method's own math (its seeds by module and
    adapter index) on the cores in the reference bases."""
    from loramix.adapter import Adapter, ModuleDelta

    ads = rand_adapters()
    mds = [a.modules[MOD] for a in ads]
    U, V = ref_bases(mds)
    core_ads = [
        Adapter(name=a.name, kind="lora", modules={MOD: ModuleDelta(MOD, U.T @ (m.scale * m.B.double()),
                                                                   m.A.double() @ V, 1.0, 1.0)})
        for a, m in zip(ads, mds)
    ]  # fmt: skip
    params = dict(density=0.5, seed=11)
    got = run_method("core-" + inner, ads, WS, MOD, **params)
    ref = U @ run_method(inner, core_ads, WS, MOD, **params) @ V.T
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, run_method("core-" + inner, ads, WS, MOD, density=0.5, seed=12))


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    model = tiny_llama()
    base = save_base(model, root / "base")
    ads = [
        make_peft_adapter(model, root / "a", seed=1, r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]),
        make_peft_adapter(model, root / "b", seed=2, r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]),
        make_peft_adapter(model, root / "c", seed=3, r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ]  # fmt: skip
    return root, base, [str(a) for a in ads]


def _reference(ads, ws, density):
    """module -> the reference merged delta of the adapters' files (core-ties)."""
    from loramix.io.adapter_files import load_adapter

    loaded = [load_adapter(a) for a in ads]
    names = dict.fromkeys(n for ad in loaded for n in ad.modules)
    out = {}
    for n in names:
        idx = [i for i, ad in enumerate(loaded) if n in ad.modules]
        out[n] = ref_core_ties([loaded[i].modules[n] for i in idx], [ws[i] for i in idx], density)
    return out


def test_core_ties_writes_an_exact_adapter_peft_loads_and_merges_into_a_base(peft_setup, capsys):
    root, base, ads = peft_setup
    ws = [1.0, 0.6, -0.8]
    out = root / "core-ties"
    assert main(["merge", "-m", "core-ties", "--density", "0.4", *ads, "--weights", "1,0.6,-0.8",
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    ref = _reference(ads, ws, 0.4)
    torch.testing.assert_close(peft_logits(out), reference_logits(ref), rtol=0, atol=2e-5)
    # into the base: W0 + the same delta, to float32's rounding of the merge
    into = root / "core-ties-into"
    res = merge(ads, "core-ties", weights=ws, density=0.4, into=base, out=into, progress=False)
    assert res.kind == "model"
    b, m = BaseModelFolder(base), BaseModelFolder(into)
    for n, d in ref.items():
        key = f"{n}.weight"
        got = m.read_tensor(key).double() - b.read_tensor(key).double()
        assert float((got - d).abs().max()) < 1e-6 * max(1.0, float(d.abs().max())), n


def test_core_methods_refuse_a_kind_whose_delta_needs_the_base(peft_setup, capsys):
    root, _, ads = peft_setup
    dora = make_peft_adapter(
        tiny_llama(), root / "dora", seed=5, r=2, use_dora=True, target_modules=["q_proj"]
    )
    line = run_error(capsys, ["merge", "-m", "core-ties", "--density", "0.5", ads[0], str(dora),
                              "--out", str(root / "never")], "method core-ties needs lora adapters",
                     "dora adapter", "has no factors")  # fmt: skip
    assert str(dora) in line
    assert not (root / "never").exists()


def test_the_core_methods_take_their_inner_methods_parameters():
    for name, inner in (
        ("core-ties", "ties"),
        ("core-dare-ties", "dare-ties"),
        ("core-dare-linear", "dare-linear"),
    ):
        assert get_method(name).params == get_method(inner).params
        assert get_method(name).low_rank
