"""Any merge as one adapter (issue 13, item 6): ``--out-rank K`` / ``--energy F``
without ``--into``. PEFT loads what loramix writes, and its merged model's
logits equal the base plus the SVD truncation of the merged dense delta,
computed here in float64 with ``torch.linalg.svd``; the discarded energy per
module in ``loramix.json`` is the sum of the dropped squared singular values."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.io.adapter_files import load_adapter
from loramix.methods import get_method, merge
from loramix.methods.base import ModuleContext

from .factories import make_peft_adapter, tiny_llama
from .test_cli_errors import run_error

METHOD_PARAMS = {
    "sum": {},
    "svd": {"rank": 5},
    "ties": {"density": 0.5},
    "dare-linear": {"density": 0.6, "seed": 3},
    "dare-ties": {"density": 0.6, "seed": 3},
    "magnitude": {"density": 0.4},
    "core-ties": {"density": 0.5},
    "knots-ties": {"density": 0.5},
    "iso-c": {},
    "iso-cts": {"common": 0.5},
    "tsv": {},
}
WEIGHTS = [1.0, 0.7]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adout")
    model = tiny_llama()
    ads = [
        make_peft_adapter(model, root / "a", seed=1, r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]),
        make_peft_adapter(model, root / "b", seed=2, r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    ]  # fmt: skip
    return root, ads


def dense_reference(method, ads, params):
    """module -> the method's merged dense delta, float64 (loramix's per-module math)."""
    loaded = [load_adapter(a) for a in ads]
    m = get_method(method)
    p = m.validate(dict(params), loaded)
    names = list(dict.fromkeys(n for ad in loaded for n in ad.modules))
    out = {}
    for n in names:
        idx = tuple(i for i, ad in enumerate(loaded) if n in ad.modules)
        ctx = ModuleContext(n, idx, "cpu", torch.float64)
        mds, ws = [loaded[i].modules[n] for i in idx], [WEIGHTS[i] for i in idx]
        out[n] = m.delta(ctx, mds, ws, None, p).double()
    return out


def truncated(D, out_rank=None, energy=None):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    if out_rank is not None:
        k = min(out_rank, S.numel())
    else:
        cum = torch.cumsum(S**2, 0) / (S**2).sum()
        k = int((cum < energy - 1e-12).sum()) + 1
    return (U[:, :k] * S[:k]) @ Vh[:k], k, float((S[k:] ** 2).sum())


def peft_logits(folder):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload().eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(16).reshape(2, 8)).logits.double()


def reference_logits(deltas):
    model = tiny_llama().double()
    with torch.no_grad():
        for n, d in deltas.items():
            model.get_submodule(n).weight += d
        return model(input_ids=torch.arange(16).reshape(2, 8)).logits


# svd's own --energy is its recompression (tested in test_merge.py); here it takes --out-rank
CASES = [
    (m, t)
    for m in METHOD_PARAMS
    for t in ({"out_rank": 3}, {"energy": 0.9})
    if (m, *t) != ("svd", "energy") and get_method(m).no_truncation is None
]


@pytest.mark.parametrize(("method", "trunc"), CASES)
def test_any_merge_as_a_truncated_adapter(setup, method, trunc):
    root, ads = setup
    out = root / f"{method}-{'-'.join(map(str, trunc.values()))}"
    res = merge([str(a) for a in ads], method, weights=WEIGHTS, out=out, **METHOD_PARAMS[method], **trunc)
    assert res.kind == "adapter"
    ref, dropped = {}, {}
    for n, D in dense_reference(method, ads, METHOD_PARAMS[method]).items():
        ref[n], k, dropped[n] = truncated(D, **trunc)
        # exact factors hold no more than their stacked rank (what lies beyond is exactly 0), nor more than
        # the delta's numerical rank (core-ties' trimmed cores have less than the rank they are written at)
        S = torch.linalg.svdvals(D)
        numerical = int((S > S[0] * max(D.shape) * torch.finfo(torch.float64).eps).sum())
        assert res.modules[n]["rank"] == min(k, res.modules[n]["stacked_rank"], numerical)
        if not get_method(method).low_rank:
            assert res.modules[n]["stacked_rank"] == min(D.shape)
    torch.testing.assert_close(peft_logits(out), reference_logits(ref), rtol=0, atol=2e-5)
    rec = json.loads((out / "loramix.json").read_text())
    for n, e in dropped.items():
        assert rec["modules"][n]["energy_discarded"] == pytest.approx(e, rel=1e-6, abs=1e-12)
    assert rec["summary"]["energy_discarded"] == pytest.approx(sum(dropped.values()), rel=1e-6, abs=1e-12)
    assert rec["parameters"][next(iter(trunc))] == next(iter(trunc.values()))


def test_truncated_adapter_holds_one_dense_delta_at_a_time(setup, monkeypatch):
    """A dense method's merged delta is truncated before the next module's is
    formed: when the method forms a module's delta, no earlier one is alive
    (they all were, one per module: 4.4 GiB on a 0.3B-parameter base)."""
    import gc
    import weakref

    root, ads = setup
    m = get_method("ties")
    alive: list[weakref.ref] = []
    formed = type(m).delta

    def delta(self, *args, **kw):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier module's dense delta is still held"
        d = formed(self, *args, **kw)
        alive.append(weakref.ref(d))
        return d

    monkeypatch.setattr(type(m), "delta", delta)
    merge([str(a) for a in ads], "ties", weights=WEIGHTS, out=root / "one-at-a-time", density=0.5, out_rank=3)
    assert len(alive) == 8  # q, v, up and down of both layers


def test_sum_adapter_converts_each_module_as_it_comes(setup, monkeypatch):
    """An adapter output takes each module's float64 factors as the method
    forms them and keeps only their copy in the output dtype: when a module's
    are formed, at most the previous module's float64 ones are still alive
    (all of them were, twice the output's size)."""
    import gc
    import weakref

    root, ads = setup
    m = get_method("sum")
    alive: list[weakref.ref] = []
    formed = type(m).factors

    def factors(self, *args, **kw):
        gc.collect()
        assert not [r for r in alive[:-1] if r() is not None], (
            "earlier modules' float64 factors are still held"
        )
        lr = formed(self, *args, **kw)
        assert lr.B.dtype == torch.float64
        alive.append(weakref.ref(lr.B))
        return lr

    monkeypatch.setattr(type(m), "factors", factors)
    merge([str(a) for a in ads], "sum", weights=WEIGHTS, out=root / "as-it-comes")
    assert len(alive) == 8


def test_exact_sum_adapter_is_untruncated(setup):
    root, ads = setup
    res = merge([str(a) for a in ads], "sum", weights=WEIGHTS, out=root / "exact")
    ref = dense_reference("sum", ads, {})
    torch.testing.assert_close(peft_logits(root / "exact"), reference_logits(ref), rtol=0, atol=2e-5)
    assert "energy_discarded" not in res.summary


@pytest.mark.parametrize("covering", ["layers_to_transform", "regex"])
def test_output_of_an_adapter_on_some_layers_names_its_modules(tmp_path, covering):
    """An input on some layers only (PEFT's layers_to_transform, or a regex
    target_modules): the output lists its modules by full name, so PEFT
    wraps just those (the last names alone made it wrap every layer and warn
    of missing keys), and it loads to the input's logits; an input on every
    layer keeps the last names."""
    import warnings

    model = tiny_llama()
    kw = {"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]}
    if covering == "regex":
        kw = {"target_modules": r".*layers\.1\.self_attn\.(q_proj|v_proj)"}
    some = make_peft_adapter(model, tmp_path / "some", seed=1, r=2, lora_alpha=4, **kw)
    every = make_peft_adapter(model, tmp_path / "every", seed=2, r=2, lora_alpha=4, target_modules=["q_proj"])
    merge([str(some)], "sum", out=tmp_path / "out")
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == names
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = peft_logits(tmp_path / "out")
    assert not [w for w in seen if "missing adapter keys" in str(w.message)], [str(w.message) for w in seen]
    torch.testing.assert_close(got, peft_logits(some), rtol=0, atol=1e-5)
    merge([str(every)], "sum", out=tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


def test_output_names_the_base_and_task_of_any_input_that_names_them(tmp_path):
    """The first input names neither its base nor its task (both null), the
    second does: the output adapter takes them from the second, so PEFT's
    ``AutoPeftModelForCausalLM`` finds the base and loads the merge."""
    from peft import AutoPeftModelForCausalLM

    from .factories import save_base

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    ads = [
        make_peft_adapter(model, tmp_path / f"a{i}", seed=i + 1, r=2, target_modules=["q_proj"])
        for i in (0, 1)
    ]
    for a, (name, task) in zip(ads, [(None, None), (str(base), "CAUSAL_LM")]):
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg.update(base_model_name_or_path=name, task_type=task)
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    merge([str(a) for a in ads], "sum", out=tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == (str(base), "CAUSAL_LM")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out")).merge_and_unload().eval()
    with torch.no_grad():
        got = auto(input_ids=torch.arange(16).reshape(2, 8)).logits.double()
    torch.testing.assert_close(got, peft_logits(tmp_path / "out"), rtol=0, atol=0)


def test_dense_method_without_truncation_or_base_is_one_line(setup, tmp_path, capsys):
    _, ads = setup
    run_error(capsys, ["merge", "-m", "ties", "--density", "0.5", *map(str, ads), "--out", str(tmp_path / "o")],
              "--out-rank", "--into")  # fmt: skip
    run_error(capsys, ["merge", "-m", "ties", "--density", "0.5", "--out-rank", "2", "--energy", "0.5",
                       *map(str, ads), "--out", str(tmp_path / "o")], "not both")  # fmt: skip
    run_error(capsys, ["merge", "-m", "magnitude", "--density", "0.5", "--out-rank", "0", *map(str, ads),
                       "--out", str(tmp_path / "o")], "--out-rank")  # fmt: skip


def test_cli_truncated_ties_prints_the_discarded_energy(setup, tmp_path, capsys):
    from loramix.cli import main

    _, ads = setup
    capsys.readouterr()
    rc = main(
        [
            "merge",
            "-m",
            "ties",
            "--density",
            "0.5",
            "--energy",
            "0.8",
            *map(str, ads),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    out, _ = capsys.readouterr()
    assert rc == 0 and "discarded energy" in out and "adapter written" in out
    rc = main(["sum", *map(str, ads), "--out-rank", "2", "--out", str(tmp_path / "s")])
    assert rc == 0 and json.loads((tmp_path / "s" / "loramix.json").read_text())["summary"]["ranks"] == [2]
    out, _ = capsys.readouterr()  # sum says what its truncation discarded, as merge does (it said nothing)
    assert "summed 2 adapters into one adapter" in out and "rank 2; discarded energy" in out
    rc = main(["sum", str(ads[0]), "--out", str(tmp_path / "one")])
    out, _ = capsys.readouterr()
    assert rc == 0 and "summed 1 adapter into one adapter" in out and "discarded" not in out
