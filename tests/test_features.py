"""Pairwise features against dense float64 references that form ``B A`` (and
``B A X^T``) explicitly; the registry; activation capture on a real tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loramix.adapter import Adapter, ModuleDelta
from loramix.features import Feature, composition_value, compute_features, register, registry
from loramix.features._calibration import calibration_batches, capture, from_grams

# A bank on a 2-layer "Llama" (3 layers of q/down): modules of different shapes,
# one adapter missing a module, one D2-LoRA adapter (signed rank-2r residual).
SHAPES = {"q_proj": (12, 10), "mlp.down_proj": (10, 14)}
LAYERS = 3


def _module(name, shape, r, gen, d2=False):
    out, inn = shape
    B = torch.randn(out, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, inn, generator=gen, dtype=torch.float64)
    kw = {}
    if d2:
        kw = dict(B_neg=torch.randn(out, r, generator=gen, dtype=torch.float64),
                  A_neg=torch.randn(r, inn, generator=gen, dtype=torch.float64), tau=0.7)  # fmt: skip
    return ModuleDelta(name=name, B=B, A=A, scale=2.0 / r, alpha=2.0, **kw)


def _bank(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for k in range(n):
        mods = {}
        for layer in range(LAYERS):
            for t, shape in SHAPES.items():
                name = f"model.layers.{layer}.{'self_attn.' if t == 'q_proj' else ''}{t}"
                if k == 1 and layer == 0 and t == "q_proj":
                    continue  # coverage < 1 for adapter 1
                mods[name] = _module(name, shape, r=2 + k % 2, gen=gen, d2=(k == 3))
        adapters.append(Adapter(name=f"a{k}", kind="d2lora" if k == 3 else "lora", modules=mods))
    return adapters


def _grams(adapters, tokens=9, seed=1):
    """Random calibration inputs X_i (tokens x in) per domain and module, and their Grams."""
    gen = torch.Generator().manual_seed(seed)
    mods = {m: d.shape[1] for ad in adapters for m, d in ad.modules.items()}
    X = [
        {m: torch.randn(tokens, inn, generator=gen, dtype=torch.float64) for m, inn in mods.items()}
        for _ in adapters
    ]
    return X, [{m: x.T @ x for m, x in Xi.items()} for Xi in X]


def _dense(ad, m):
    return ad.modules[m].residual(dtype=torch.float64)


def _shared(adapters, i, j):
    return [m for m in adapters[i].modules if m in adapters[j].modules]


# ----------------------------------------------------------------------------- registry


def test_registry_discovers_every_feature_module_and_refuses_duplicates():
    feats = registry()
    for name in ("rms_cosine", "mean_cosine", "max_cosine", "type_rms_cosine", "band_rms_cosine", "norm_ratio", "coverage",
                 "subspace_overlap", "functional_interference", "weighted_subspace_overlap"):  # fmt: skip
        assert name in feats
    with pytest.raises(ValueError, match="registered twice"):
        register(Feature("coverage", lambda ctx: {}))
    assert registry()["coverage"] is feats["coverage"]


def test_composition_value_rms_and_mean():
    M = np.array([[1, 0.3, -0.4], [0.3, 1, 0.5], [-0.4, 0.5, 1.0]])
    assert composition_value(M, [0, 1]) == pytest.approx(0.3)
    assert composition_value(M, [0, 1, 2]) == pytest.approx(math.sqrt((0.09 + 0.16 + 0.25) / 3))
    assert composition_value(M, [0, 1, 2], "mean") == pytest.approx((0.3 - 0.4 + 0.5) / 3)
    assert composition_value(M, [0, 1, 2], "max") == 0.5
    assert composition_value(M, [0, 2], "max") == -0.4


def test_max_cosine_is_the_worst_pair_where_the_rms_dilutes_it():
    """A 0.3 pair among members orthogonal to it: the RMS over the group's 28
    pairs is 0.3 / sqrt(28); the worst pair stays 0.3. For a pair both are the
    pair's RMS cosine."""
    from loramix.features import FeatureSet

    M = np.zeros((8, 8))
    M[0, 1] = M[1, 0] = 0.3
    fs = FeatureSet([f"a{i}" for i in range(8)], {"rms_cosine": M, "max_cosine": M},
                    {"rms_cosine": "rms", "max_cosine": "max"})  # fmt: skip
    group = list(range(8))
    assert fs.composition("rms_cosine", group) == pytest.approx(0.3 / math.sqrt(28))
    assert fs.composition("max_cosine", group) == 0.3
    assert fs.composition("max_cosine", [0, 1]) == fs.composition("rms_cosine", [0, 1]) == 0.3
    assert registry()["max_cosine"].aggregate == "max"


# ----------------------------------------------------------------------------- weight space


def _dense_cos(adapters, i, j, m):
    a, b = _dense(adapters[i], m), _dense(adapters[j], m)
    return float((a * b).sum() / (a.norm() * b.norm()))


def _four_layer_pair():
    """Two adapters on the q_proj of four layers, layers 0-2 and 1-3: neither
    one's modules contain the other's."""
    gen = torch.Generator().manual_seed(3)
    ads = []
    for k, layers in enumerate(((0, 1, 2), (1, 2, 3))):
        names = [f"model.layers.{layer}.self_attn.q_proj" for layer in layers]
        mods = {name: _module(name, SHAPES["q_proj"], r=2, gen=gen) for name in names}
        ads.append(Adapter(name=f"a{k}", kind="lora", modules=mods))
    return ads


def test_bands_on_four_layers():
    """Bands ``min(2, floor(3 l / L))`` with ``L = 4``: bottom {0, 1}, middle
    {2}, top {3}. (With the bank's three layers every band is one layer, and a
    wrong ``L``, say 3 - 1, gives the same bands.)"""
    ads = _four_layer_pair()
    fs = compute_features(ads)
    cos = {layer: _dense_cos(ads, 0, 1, f"model.layers.{layer}.self_attn.q_proj") for layer in (1, 2)}
    assert fs.matrices["band_rms_cosine:bottom"][0, 1] == pytest.approx(abs(cos[1]), rel=1e-9)
    assert fs.matrices["band_rms_cosine:middle"][0, 1] == pytest.approx(abs(cos[2]), rel=1e-9)
    top = fs.matrices.get("band_rms_cosine:top")  # layer 3 is adapter 1's only: no shared module
    assert top is None or math.isnan(top[0, 1])


def test_coverage_of_module_sets_that_are_not_nested():
    """Coverage is shared / union modules: 2 / 4 here, not shared / the larger
    set (2 / 3), which the bank, whose module sets are nested, cannot tell apart."""
    assert compute_features(_four_layer_pair()).matrices["coverage"][0, 1] == pytest.approx(2 / 4)


def test_weight_space_features_equal_dense_reference():
    ads = _bank()
    fs = compute_features(ads)
    assert "functional_interference" not in fs.matrices  # data-aware: needs a calibration
    n = len(ads)
    for i in range(n):
        for j in range(i + 1, n):
            sh = _shared(ads, i, j)
            cos = {m: _dense_cos(ads, i, j, m) for m in sh}
            assert fs.matrices["rms_cosine"][i, j] == pytest.approx(
                math.sqrt(np.mean([c * c for c in cos.values()])), rel=1e-9
            )
            assert fs.matrices["mean_cosine"][i, j] == pytest.approx(
                np.mean(list(cos.values())), rel=1e-9, abs=1e-12
            )
            for t in ("self_attn.q_proj", "mlp.down_proj"):
                sel = [c for m, c in cos.items() if m.endswith(t)]
                assert fs.matrices[f"type_rms_cosine:{t}"][i, j] == pytest.approx(
                    math.sqrt(np.mean(np.square(sel))), rel=1e-9
                )
                assert fs.matrices[f"type_mean_cosine:{t}"][j, i] == pytest.approx(
                    np.mean(sel), rel=1e-9, abs=1e-12
                )
            for layer, band in enumerate(("bottom", "middle", "top")):  # 3 layers: one per third
                sel = [c for m, c in cos.items() if f".{layer}." in m]
                assert fs.matrices[f"band_rms_cosine:{band}"][i, j] == pytest.approx(
                    math.sqrt(np.mean(np.square(sel))), rel=1e-9
                )
            tot = [
                math.sqrt(sum(float(_dense(ads[k], m).square().sum()) for m in ads[k].modules))
                for k in (i, j)
            ]
            assert fs.matrices["norm_ratio"][i, j] == pytest.approx(max(tot) / min(tot), rel=1e-9)
            union = set(ads[i].modules) | set(ads[j].modules)
            assert fs.matrices["coverage"][i, j] == pytest.approx(len(sh) / len(union))
            # principal angles from an SVD basis of the row space (not the QR the feature uses)
            ov = []
            for m in sh:
                Ai, Aj = (ads[k].modules[m].factors()[1] for k in (i, j))
                Ui = torch.linalg.svd(Ai, full_matrices=False).Vh.T
                Uj = torch.linalg.svd(Aj, full_matrices=False).Vh.T
                s = torch.linalg.svdvals(Ui.T @ Uj)
                ov.append(float((s**2).sum()) / min(Ai.shape[0], Aj.shape[0]))
            assert fs.matrices["subspace_overlap"][i, j] == pytest.approx(np.mean(ov), rel=1e-9)


def test_each_feature_alone_equals_it_among_all_and_the_table_is_made_for_those_that_read_it(monkeypatch):
    """The similarity's per-module table (2M rows for 1,000 adapters on 4 modules, most of a
    plan's time and memory) is made only where a computed feature reads it (``per_module``):
    each feature computed alone gives its matrices bit for bit as among all, and a feature
    that reads the table without saying so still gets it (made again)."""
    import loramix.features._context as context
    import loramix.overlap as overlap

    ads = _bank()
    _, grams = _grams(ads)
    cal = from_grams(ads, grams)
    made = []
    real = overlap.similarity

    def spy(*args, per_module=False, **kw):
        made.append(per_module)
        return real(*args, per_module=per_module, **kw)

    monkeypatch.setattr(overlap, "similarity", spy)
    every = compute_features(ads, calibration=cal)
    assert made == [True]
    for name, f in registry().items():
        made.clear()
        alone = compute_features(ads, calibration=cal, only=[name])
        assert made in ([], [f.per_module]), (name, made)
        for k, m in alone.matrices.items():
            np.testing.assert_array_equal(m, every.matrices[k], err_msg=k)
        assert set(alone.matrices) == {k for k in every.matrices if k == name or k.startswith(name + ":")}
    made.clear()
    ctx = context.FeatureContext(ads, with_per_module=False)
    assert not ctx.similarity.per_module.shape[0] and ctx.per_module.shape[0] > 0 and made == [False, True]


def test_shared_initial_a_gives_full_subspace_overlap():
    ads = _bank(n=3)  # adapters 0 and 2 have rank 2 everywhere
    for m, d in ads[2].modules.items():
        d.A = ads[0].modules[m].A.clone()
    fs = compute_features(ads, only=["subspace_overlap"])
    assert fs.matrices["subspace_overlap"][0, 2] == pytest.approx(1.0, rel=1e-12)
    assert fs.matrices["subspace_overlap"][0, 1] < 0.9


# ----------------------------------------------------------------------------- data aware


def test_functional_interference_equals_dense_reference():
    ads = _bank()
    X, grams = _grams(ads)
    fs = compute_features(ads, calibration=from_grams(ads, grams))
    D = fs.matrices["functional_interference:directional"]
    n = len(ads)
    for i in range(n):
        for j in range(n):
            ratios = []
            for m in _shared(ads, i, j):
                Xi = X[i][m]
                num = torch.linalg.norm(_dense(ads[j], m) @ Xi.T)  # B_j A_j X_i^T, formed densely
                den = torch.linalg.norm(_dense(ads[i], m) @ Xi.T)
                ratios.append(float(num / den) ** 2)
            assert D[i, j] == pytest.approx(math.sqrt(np.mean(ratios)), rel=1e-9)
    sym = fs.matrices["functional_interference"]
    assert np.allclose(sym, (D + D.T) / 2, rtol=1e-12)
    assert "functional_interference:directional" not in fs.predictors()
    assert "functional_interference" in fs.predictors()


def test_weighted_subspace_overlap_equals_dense_reference():
    ads = _bank()
    X, grams = _grams(ads, tokens=11)
    fs = compute_features(ads, calibration=from_grams(ads, grams), only=["weighted_subspace_overlap"])
    n = len(ads)
    for i in range(n):
        for j in range(i + 1, n):
            ov = []
            for m in _shared(ads, i, j):
                Xp = torch.cat([X[i][m], X[j][m]])  # pooled tokens of both domains
                Ui = torch.linalg.qr(Xp @ ads[i].modules[m].factors()[1].T).Q
                Uj = torch.linalg.qr(Xp @ ads[j].modules[m].factors()[1].T).Q
                s = torch.linalg.svdvals(Ui.T @ Uj)
                ov.append(float((s**2).sum()) / min(Ui.shape[1], Uj.shape[1]))
            assert fs.matrices["weighted_subspace_overlap"][i, j] == pytest.approx(np.mean(ov), rel=1e-9)


def test_a_module_no_calibration_input_reached_is_left_out_of_the_mean():
    """Where neither domain's tokens reach a module (a zero Gram), it has no
    subspace to compare: the weighted overlap's mean over the pair's modules
    was NaN for the whole pair; it now leaves that module out, as the
    functional interference does."""
    ads = _bank()
    _, grams = _grams(ads, tokens=11)
    fs = compute_features(ads, calibration=from_grams(ads, grams))
    shared = _shared(ads, 0, 1)
    assert len(shared) >= 2
    dead = shared[0]
    for g in grams:
        g[dead] = torch.zeros_like(g[dead])
    cut = compute_features(ads, calibration=from_grams(ads, grams))
    from loramix.features.subspace_weighted import pair_overlap

    cal = from_grams(ads, grams)
    want = np.mean([pair_overlap(cal, m, 0, 1) for m in shared[1:]])
    assert cut.matrices["weighted_subspace_overlap"][0, 1] == pytest.approx(want, rel=1e-12)
    assert np.isfinite(cut.matrices["functional_interference"][0, 1])
    assert fs.matrices["weighted_subspace_overlap"][0, 1] != pytest.approx(want, rel=1e-12)


def test_calibration_refuses_mismatched_domains():
    from loramix.errors import UsageError

    ads = _bank(n=2)
    _, grams = _grams(ads)
    with pytest.raises(UsageError, match="2 adapters"):
        from_grams(ads, grams[:1])
    del grams[0]["model.layers.0.self_attn.q_proj"]
    with pytest.raises(UsageError, match="no activations"):
        from_grams(ads, grams)


@pytest.fixture(scope="module")
def llama_bank(tmp_path_factory):
    from loramix.io.adapter_files import load_adapter
    from loramix.models import load_causal_lm

    from .factories import make_peft_adapter
    from .test_train import make_tiny_base

    root = tmp_path_factory.mktemp("featbank")
    base = make_tiny_base(root / "base", "llama")
    model, _ = load_causal_lm(base)
    paths = [
        make_peft_adapter(model, root / f"ad{k}", seed=k, r=2, target_modules=["q_proj", "down_proj"])
        for k in range(2)
    ]
    return base, [load_adapter(p) for p in paths]


def test_capture_on_a_real_model_equals_dense_activations(llama_bank):
    """Hooks keep only ``A_cat G A_cat^T``; the reference keeps raw ``X`` from the
    same batches (of the whole model) and forms ``B_j A_j X_i^T`` densely."""
    _capture_equals_dense(*llama_bank)


def test_capture_of_an_output_head_adapter(llama_bank, tmp_path):
    """The capture runs the model without its head where no adapter reaches
    the head (a fifth of SmolLM2's FLOPs), and the whole model where one does:
    the head's inputs are captured all the same."""
    from loramix.features._calibration import _trunk
    from loramix.io.adapter_files import load_adapter
    from loramix.models import load_causal_lm

    from .factories import make_peft_adapter

    base, ads = llama_bank
    model, _ = load_causal_lm(base)
    assert _trunk(model, ads[0].modules) is model.model
    paths = [make_peft_adapter(model, tmp_path / f"h{k}", seed=k, r=2, target_modules=["q_proj", "lm_head"])
             for k in range(2)]  # fmt: skip
    heads = [load_adapter(p) for p in paths]
    assert "lm_head" in heads[0].modules and _trunk(model, heads[0].modules) is model
    _capture_equals_dense(base, heads)


def _capture_equals_dense(base, ads):
    from loramix.models import load_causal_lm

    data = ["synthetic:arith?n=20&seed=3", "synthetic:units?n=20&seed=4"]
    cal = capture(ads, base, data, tokens=50, max_len=32)
    assert cal.tokens == [50, 50]
    fs = compute_features(ads, calibration=cal, only=["functional_interference"])

    model, tok = load_causal_lm(base)
    mods = list(ads[0].modules)
    X = []
    for path in data:
        got = {m: [] for m in mods}
        hs = [model.get_submodule(m).register_forward_hook(
            lambda mod, inp, out, m=m, got=got: got[m].append(inp[0].reshape(-1, inp[0].shape[-1]))) for m in mods]  # fmt: skip
        masks = []
        with torch.no_grad():
            for b in calibration_batches(tok, path, tokens=50, max_len=32):
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                masks.append(b["attention_mask"].reshape(-1).bool())
        for h in hs:
            h.remove()
        X.append({m: torch.cat([x[k] for x, k in zip(got[m], masks)]).double() for m in mods})
    assert X[0][mods[0]].shape[0] == 50
    for i in range(2):
        j = 1 - i
        r = [float(torch.linalg.norm(_dense(ads[j], m) @ X[i][m].T) / torch.linalg.norm(_dense(ads[i], m) @ X[i][m].T)) ** 2
             for m in mods]  # fmt: skip
        assert fs.matrices["functional_interference:directional"][i, j] == pytest.approx(
            math.sqrt(np.mean(r)), rel=1e-9
        )


def test_capture_refuses_bad_input(llama_bank, tmp_path):
    from loramix.errors import BaseModelError, UsageError

    base, ads = llama_bank
    with pytest.raises(UsageError, match="one per adapter"):
        capture(ads, base, ["synthetic:arith?n=5"])
    other = Adapter("x", "lora", {"model.layers.0.nonexistent": ads[0].modules[next(iter(ads[0].modules))]})
    with pytest.raises(BaseModelError, match="no module model.layers.0.nonexistent"):
        capture([ads[0], other], base, ["synthetic:arith?n=5"] * 2)


def test_capture_reads_every_data_file_before_the_base(llama_bank, tmp_path):
    """A typo in the last ``--data`` was found only after the base was loaded
    and every earlier domain had run through it (18 s on SmolLM2 for three
    domains; minutes on a large base). Every file is read first: with a bad
    data file and a bad base, the data file is the error."""
    from loramix.errors import DataError

    _, ads = llama_bank
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(DataError, match="no such file"):
        capture(ads, not_a_model, ["synthetic:arith?n=5", str(tmp_path / "typo.jsonl")])


def test_features_depend_on_the_delta_not_on_its_factorisation():
    """``B A = (B M^-1)(M A)`` for any invertible ``M``: every feature of the
    delta (and of its input subspace) is unchanged, while ``A`` itself changes."""
    ads = _bank(n=3)
    _, grams = _grams(ads)
    before = compute_features(ads, calibration=from_grams(ads, grams))
    gen = torch.Generator().manual_seed(9)
    for d in ads[1].modules.values():
        M = torch.randn(d.rank, d.rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(
            d.rank, dtype=torch.float64
        )
        d.A, d.B = M @ d.A, d.B @ torch.linalg.inv(M)
    after = compute_features(ads, calibration=from_grams(ads, grams))
    for k, m in before.matrices.items():
        assert np.allclose(after.matrices[k], m, rtol=1e-9, atol=1e-12, equal_nan=True), k


def test_subspace_overlap_of_dependent_rows_uses_the_row_space():
    """An ``A`` with dependent rows (the exact sum of an adapter with itself:
    ``[A; A]``) reads the same subspace as ``A``: a reduced QR of ``A^T`` gave
    its basis arbitrary extra directions (overlap 0.58 instead of 1)."""
    ads = _bank(n=3)
    twice = {}
    for m, d in ads[0].modules.items():
        twice[m] = ModuleDelta(name=m, B=torch.cat([d.B, d.B], 1), A=torch.cat([d.A, d.A], 0),
                               scale=d.scale, alpha=d.alpha)  # fmt: skip
    ads.append(Adapter(name="twice", kind="lora", modules=twice))
    fs = compute_features(ads, only=["subspace_overlap"])
    ov = fs.matrices["subspace_overlap"]
    assert ov[0, 3] == pytest.approx(1.0, rel=1e-12)
    assert ov[2, 3] == pytest.approx(ov[2, 0], rel=1e-9)


def test_capture_on_an_embedding_adapter_uses_the_token_rows(tmp_path):
    """An embedding's input is token ids, not a hidden state: the hook took
    ``ids.reshape(-1, seq)`` for ``X`` and failed with an IndexError. The delta
    an embedding adapter adds on domain ``i`` is the rows ``dW[ids_i]``, so
    ``F[i, j] = ||dW_j[ids_i]|| / ||dW_i[ids_i]||`` (with ``dW`` in the
    weight's ``(vocab, dim)`` layout), and the other module still counts."""
    from loramix.io.adapter_files import load_adapter
    from loramix.models import load_causal_lm

    from .factories import make_peft_adapter
    from .test_train import make_tiny_base

    base = make_tiny_base(tmp_path / "base", "llama")
    model, tok = load_causal_lm(base)
    ads = [load_adapter(make_peft_adapter(model, tmp_path / f"ad{k}", seed=k, r=2,
                                          target_modules=["embed_tokens", "q_proj"])) for k in range(2)]  # fmt: skip
    emb = "model.embed_tokens"
    assert emb in ads[0].modules
    data = ["synthetic:arith?n=20&seed=3", "synthetic:units?n=20&seed=4"]
    cal = capture(ads, base, data, tokens=40, max_len=16)
    D = compute_features(ads, calibration=cal).matrices["functional_interference:directional"]

    mods = list(ads[0].modules)
    q = [m for m in mods if m != emb]
    got = {m: [] for m in q}
    hs = [model.get_submodule(m).register_forward_hook(
        lambda mod, inp, out, m=m: got[m].append(inp[0].reshape(-1, inp[0].shape[-1]))) for m in q]  # fmt: skip
    ids, X = [], []
    for path in data:
        for v in got.values():
            v.clear()
        batches = calibration_batches(tok, path, tokens=40, max_len=16)
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        masks = [b["attention_mask"].reshape(-1).bool() for b in batches]
        ids.append(torch.cat([b["input_ids"].reshape(-1)[k] for b, k in zip(batches, masks)]))
        X.append({m: torch.cat([x[k] for x, k in zip(got[m], masks)]).double() for m in q})
    for h in hs:
        h.remove()
    assert ids[0].numel() == 40
    for i in range(2):
        j = 1 - i
        r = [
            float(
                torch.linalg.norm(_dense(ads[j], emb)[ids[i]])
                / torch.linalg.norm(_dense(ads[i], emb)[ids[i]])
            )
            ** 2
        ]
        r += [float(torch.linalg.norm(_dense(ads[j], m) @ X[i][m].T) / torch.linalg.norm(_dense(ads[i], m) @ X[i][m].T)) ** 2
              for m in q]  # fmt: skip
        assert D[i, j] == pytest.approx(math.sqrt(np.mean(r)), rel=1e-8)
