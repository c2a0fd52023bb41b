"""Core-space merging (``core-ties``, ``core-dare-ties``, ``core-dare-linear``;
loramix/methods/core.py) and KnOTS (``knots-ties``, ``knots-dare-ties``;
loramix/methods/knots.py): the method on the deltas written in small bases,
against dense references written from the papers' algorithms, and PEFT
loading the exact adapter it writes."""

from __future__ import annotations

import pytest
import torch

from loramix.cli import main
from loramix.io.model_folder import BaseModelFolder
from loramix.methods import get_method, merge
from loramix.methods.base import ModuleContext
from loramix.methods.core import CoreSpace
from loramix.methods.knots import Knots
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


def flipped(X, start):
    """``X`` with every other column negated, from ``start``: a sign LAPACK may choose either way."""
    X = X.clone()
    X[:, start::2] *= -1
    return X


def ref_core_bases(mds, flip=False):
    """The Core Space paper's reference bases with ``torch.linalg.svd`` of
    the stacked factors: ``U_B`` (out, p) and ``V_A`` (in, q), each vector's
    sign fixed by :func:`canonical` (after :func:`flipped` with ``flip``)."""
    U = torch.linalg.svd(torch.cat([m.scale * m.B.double() for m in mds], 1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat([m.A.double() for m in mds], 0), full_matrices=False)[2].T
    if flip:
        U, V = flipped(U, 0), flipped(V, 1)
    return canonical(U), canonical(V)


def ref_knots_basis(mds, flip=False):
    """KnOTS' basis as its paper's code computes it: the left singular vectors
    of the deltas side by side, above the numerical rank."""
    C = torch.cat([raw_delta(m) for m in mds], dim=1)
    U, S, _ = torch.linalg.svd(C, full_matrices=False)
    U = U[:, : int((S > S[0] * max(C.shape) * torch.finfo(F64).eps).sum())]
    return canonical(flipped(U, 0) if flip else U)


def ref_core_ties(mds, ws, density, sign="mass", divide="count", flip=False):
    U, V = ref_core_bases(mds, flip)
    cores = [U.T @ raw_delta(m) @ V for m in mds]
    return U @ ref_elect([ref_trim(M, density) for M in cores], ws, sign, divide) @ V.T


def ref_knots_ties(mds, ws, density, sign="mass", divide="count", flip=False):
    """TIES on each delta's block ``S V_i^T = U^T dW_i``, then ``U`` times the merged block."""
    U = ref_knots_basis(mds, flip)
    return U @ ref_elect([ref_trim(U.T @ raw_delta(m), density) for m in mds], ws, sign, divide)


REFS = {"core-ties": ref_core_ties, "knots-ties": ref_knots_ties}
SHAPES = [((24, 16), (16, 40)), ((6, 5), (5, 30))]  # the second: R = 9 above out or in


@pytest.mark.parametrize("method", list(REFS))
@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
@pytest.mark.parametrize(("sign", "divide"), [("mass", "count"), ("count", "count"), ("mass", "weight")])
def test_ties_in_a_small_basis_is_the_papers_algorithm(method, shapes, sign, divide):
    """``core-ties``: TIES of the cores in the stacked factors' SVD bases;
    ``knots-ties``: TIES of the blocks ``U^T dW_i`` in the left singular
    basis of the deltas side by side."""
    ads = rand_adapters(shapes=shapes)
    ws = WS if divide == "count" else [1.0, 0.5, 2.0]  # --divide weight refuses a negative weight
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        got = run_method(method, ads, ws, mod, density=0.3, sign=sign, divide=divide, lambda_=0.8)
        ref = 0.8 * REFS[method](mds, ws, 0.3, sign, divide)
        assert ref.abs().max() > 1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        # the merge does not depend on the signs LAPACK gives the singular vectors
        torch.testing.assert_close(0.8 * REFS[method](mds, ws, 0.3, sign, divide, flip=True), ref,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        # and it is not plain TIES on the full deltas
        plain = run_method("ties", ads, ws, mod, density=0.3, sign=sign, divide=divide, lambda_=0.8)
        assert float((plain - got).abs().max()) > 1e-3 * float(ref.abs().max())


class CoreSum(CoreSpace):  # not registered: the sum in the core space
    inner = Sum
    name = "core-sum"
    params = ()


class KnotsSum(Knots):  # not registered: the sum of the KnOTS blocks
    inner = Sum
    name = "knots-sum"
    params = ()


@pytest.mark.parametrize("space", [CoreSum, KnotsSum], ids=["core", "knots"])
@pytest.mark.parametrize("shapes", SHAPES, ids=["R<out,in", "R>out,in"])
def test_the_small_bases_are_lossless_so_a_sum_there_is_the_sum(space, shapes):
    """``U_B M_i V_A^T = dW_i`` (KnOTS: ``U M_i = dW_i``): the sum taken back
    is the sum of the deltas, whatever the ranks against ``out`` and ``in``."""
    ads = rand_adapters(shapes=shapes)
    for mod in ("layers.0.proj", "layers.1.proj"):
        mds = [a.modules[mod] for a in ads]
        ctx = ModuleContext(mod, tuple(range(len(ads))), torch.device("cpu"), F64)
        lr = space().factors(ctx, mds, WS, {})
        want = sum(w * raw_delta(m) for w, m in zip(WS, mds))
        torch.testing.assert_close(lr.B @ lr.A, want, rtol=1e-12, atol=1e-12)
        out, inn = want.shape
        # the written rank: the smaller core basis; KnOTS': the deltas' joint rank, min(out, 9) here
        assert lr.B.shape[1] == (min(out, inn, 9) if space is CoreSum else min(out, 9))


@pytest.mark.parametrize("name", ["core-dare-ties", "core-dare-linear", "knots-dare-ties"])
def test_dare_in_a_small_basis_draws_its_masks_there_by_the_modules_seeds(name):
    """``core-dare-*`` and ``knots-dare-ties`` are the inner method's own math
    (its seeds by module and adapter index) on the cores (KnOTS: the blocks)
    in the reference bases."""
    from loramix.adapter import Adapter, ModuleDelta

    space, _, inner = name.partition("-")
    ads = rand_adapters()
    mds = [a.modules[MOD] for a in ads]
    U, V = ref_core_bases(mds) if space == "core" else (ref_knots_basis(mds), None)
    small = [
        Adapter(name=a.name, kind="lora", modules={MOD: ModuleDelta(
            MOD, U.T @ (m.scale * m.B.double()), m.A.double() if V is None else m.A.double() @ V, 1.0, 1.0)})
        for a, m in zip(ads, mds)
    ]  # fmt: skip
    params = dict(density=0.5, seed=11)
    got = run_method(name, ads, WS, MOD, **params)
    D = run_method(inner, small, WS, MOD, **params)
    torch.testing.assert_close(got, U @ (D if V is None else D @ V.T), rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, run_method(name, ads, WS, MOD, density=0.5, seed=12))


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
    dora = make_peft_adapter(model, root / "dora", seed=5, r=2, use_dora=True, target_modules=["q_proj"])
    return root, base, [str(a) for a in ads], str(dora)


def reference_deltas(ref, ads, ws, *args):
    """module -> ``ref(module_deltas, weights, *args)``, the reference merged
    delta of the adapters' files (a module some adapters leave out merges
    those that touch it)."""
    from loramix.io.adapter_files import load_adapter

    loaded = [load_adapter(a) for a in ads]
    out = {}
    for n in dict.fromkeys(n for ad in loaded for n in ad.modules):
        idx = [i for i, ad in enumerate(loaded) if n in ad.modules]
        out[n] = ref([loaded[i].modules[n] for i in idx], [ws[i] for i in idx], *args)
    return out


def check_written_and_into(root, base, ads, method, flags, ref, **params):
    """``merge -m METHOD FLAGS`` of the three adapters (weights 1, 0.6, -0.8)
    as one adapter: PEFT loads it and its logits are the reference deltas';
    into the base: ``W0`` + the same deltas, to float32's rounding. Returns
    what the command printed."""
    import contextlib
    import io

    ws = [1.0, 0.6, -0.8]
    out = root / method
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert main(["merge", "-m", method, *flags, *ads, "--weights", "1,0.6,-0.8", "--out", str(out)]) == 0
    torch.testing.assert_close(peft_logits(out), reference_logits(ref), rtol=0, atol=2e-5)
    into = root / f"{method}-into"
    res = merge(ads, method, weights=ws, into=base, out=into, progress=False, **params)
    assert res.kind == "model"
    b, m = BaseModelFolder(base), BaseModelFolder(into)
    for n, d in ref.items():
        key = f"{n}.weight"
        got = m.read_tensor(key).double() - b.read_tensor(key).double()
        assert float((got - d).abs().max()) < 1e-6 * max(1.0, float(d.abs().max())), n
    return said.getvalue()


def check_untrained(root, method, flags, capsys):
    """PEFT saves ``B = 0`` before training: adapters saved so merge to a
    zero adapter of rank 1, which PEFT loads (it cannot load rank 0)."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    model, ads = tiny_llama(), []
    for i in range(2):
        folder = root / f"untrained{i}"
        if not folder.exists():
            get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
                folder
            )
        ads.append(str(folder))
    out = root / f"{method}-untrained"
    assert main(["merge", "-m", method, *flags, *ads, "--out", str(out)]) == 0, capsys.readouterr().err
    merged = PeftModel.from_pretrained(tiny_llama(), str(out)).merge_and_unload().state_dict()
    assert all(torch.equal(merged[k], v) for k, v in tiny_llama().state_dict().items())


@pytest.mark.parametrize("method", list(REFS))
def test_it_writes_an_exact_adapter_peft_loads_and_merges_into_a_base(peft_setup, method):
    root, base, ads, _ = peft_setup
    ref = reference_deltas(REFS[method], ads, [1.0, 0.6, -0.8], 0.4)
    check_written_and_into(root, base, ads, method, ["--density", "0.4"], ref, density=0.4)


@pytest.mark.parametrize("method", list(REFS))
def test_they_refuse_a_kind_whose_delta_needs_the_base(peft_setup, capsys, method):
    root, _, ads, dora = peft_setup
    line = run_error(capsys, ["merge", "-m", method, "--density", "0.5", ads[0], dora, "--out",
                              str(root / "never")], f"method {method} needs lora adapters", "dora adapter",
                     "has no factors")  # fmt: skip
    assert dora in line
    assert not (root / "never").exists()


def test_they_take_their_inner_methods_parameters():
    for name in ("core-ties", "core-dare-ties", "core-dare-linear", "knots-ties", "knots-dare-ties"):
        assert get_method(name).params == get_method(name.partition("-")[2]).params
        assert get_method(name).low_rank


def test_knots_cuts_its_basis_at_the_deltas_joint_rank():
    """An adapter given twice adds no direction: KnOTS' basis has the deltas'
    joint rank (5 of the 9 stacked here), as its paper's code keeps only the
    singular values above a threshold, and its TIES trims blocks of that many
    rows (more rows, of rounding noise, would change how many entries it keeps)."""
    ads = rand_adapters()  # ranks 2, 3, 4
    ads[2].modules = ads[0].modules
    mds = [a.modules[MOD] for a in ads]
    got = run_method("knots-ties", ads, WS, MOD, density=0.3)
    torch.testing.assert_close(got, ref_knots_ties(mds, WS, 0.3), rtol=1e-12, atol=1e-12)
    m = get_method("knots-ties")
    ctx = ModuleContext(MOD, (0, 1, 2), torch.device("cpu"), F64)
    assert m.factors(ctx, mds, WS, m.validate({"density": 0.3}, ads)).B.shape[1] == 5


@pytest.mark.parametrize("method", list(REFS))
def test_adapters_saved_untrained_merge_to_a_zero_adapter_peft_loads(peft_setup, capsys, method):
    """The deltas are all zero: KnOTS' basis had rank 0 and was written as a
    rank-0 module, which the writer refused (PEFT cannot load one); now rank
    1, zero."""
    check_untrained(peft_setup[0], method, ["--density", "0.5"], capsys)
