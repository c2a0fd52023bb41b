"""Adapter kinds as variants: the registry, the kind objects, one stack_factors,
format readers, and a kind defined outside the package going through the
similarity, attach and merge paths with no other change.

References are dense float64 deltas formed explicitly from the factors.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from loramix.adapter import Adapter, ModuleDelta
from loramix.cli import main
from loramix.io.adapter_files import load_adapter, save_d2_adapter
from loramix.io.formats import FORMATS, find_format
from loramix.kinds import D2LORA, KINDS, LORA, AdapterKind, get_kind, register, stack_factors
from loramix.kinds.lora import LoraKind
from loramix.layers import attach_adapters, detach, merge_into_model, restore_weights
from loramix.overlap import similarity

from .factories import make_peft_adapter, tiny_gpt2, tiny_llama

F64 = torch.float64


def _lora(name, out_f, in_f, r, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return ModuleDelta(
        name=name,
        B=torch.randn(out_f, r, generator=g),
        A=torch.randn(r, in_f, generator=g),
        scale=scale,
        alpha=3.0,
    )


def _d2(name, out_f, in_f, r, seed, tau=0.4, norm_dim=1):
    g = torch.Generator().manual_seed(seed)
    return ModuleDelta(
        name=name,
        B=torch.randn(out_f, r, generator=g),
        A=torch.randn(r, in_f, generator=g),
        scale=0.75,
        alpha=3.0,
        B_neg=torch.randn(out_f, r, generator=g),
        A_neg=torch.randn(r, in_f, generator=g),
        tau=tau,
        norm_dim=norm_dim,
    )


def _dense_residual(m):
    """``dW`` from the stored factors, by the kind's textbook formula."""
    dW = m.scale * (m.B.double() @ m.A.double())
    if m.B_neg is not None:
        dW = dW - m.scale * m.tau * (m.B_neg.double() @ m.A_neg.double())
    return dW


def test_kinds_are_registered_names():
    assert set(KINDS) >= {"lora", "d2lora"}
    assert get_kind("lora") is LORA and get_kind(D2LORA) is D2LORA
    # the kind is its name on disk: equal, same hash, same JSON, pickles to the singleton
    assert LORA == "lora" and {"d2lora": 1}[D2LORA] == 1
    assert json.dumps({"k": D2LORA}) == '{"k": "d2lora"}'
    assert pickle.loads(pickle.dumps(D2LORA)) is D2LORA
    assert not LORA.needs_base and D2LORA.needs_base
    with pytest.raises(ValueError, match="unknown adapter kind 'vera'"):
        get_kind("vera")  # not a loramix kind (dora is one now)


def test_the_kinds_names_are_read_from_their_files():
    # train checks --kind against these before torch loads (test_startup): a kind file
    # must declare its name as a literal ``id = "..."`` in a class derived from AdapterKind
    # (and scenario check reads needs_base there: AdapterKind's default unless the class sets it)
    from loramix.discovery import declared, declared_names

    packaged = sorted(n for n, k in KINDS.items() if type(k).__module__.startswith("loramix.kinds."))
    assert declared_names("loramix.kinds", "AdapterKind") == packaged
    found = declared("loramix.kinds", "AdapterKind")
    assert {n: found[n].get("needs_base", AdapterKind.needs_base) for n in packaged} == {
        n: KINDS[n].needs_base for n in packaged
    }
    # a study trains those whose file leaves trainable True (scenario.traits.trainable_kinds)
    assert {n: found[n].get("trainable", True) for n in packaged} == {n: KINDS[n].trainable for n in packaged}


def test_a_second_kind_with_a_taken_name_is_refused():
    class Again(LoraKind):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Again())
    assert KINDS["lora"] is LORA


def test_adapter_kind_and_the_v01_method_alias():
    ad = Adapter("a", "d2lora", {"m": _d2("m", 5, 4, 2, 0)})
    assert ad.kind is D2LORA and ad.method == "d2lora" and type(ad.method) is str
    assert ad.provenance()["kind"] == "d2lora"
    assert ad.modules["m"].kind is D2LORA and _lora("m", 5, 4, 2, 1).kind is LORA
    with pytest.raises(ValueError, match="unknown adapter kind"):
        Adapter("a", "nope", {})


@pytest.mark.parametrize("fold_scale", [True, False])
def test_stack_factors_is_the_weighted_sum(fold_scale):
    mods = [_lora("m", 7, 5, 2, 0), _d2("m", 7, 5, 3, 1), _lora("m", 7, 5, 1, 2, scale=0.2)]
    w = [0.5, -1.25, 2.0]
    st = stack_factors(mods, w, fold_scale=fold_scale)
    assert st.B.shape == (7, 2 + 6 + 1) and st.A.shape == (9, 5) and st.offsets == [0, 2, 8, 9]
    assert st.B.T.is_contiguous()
    ref = sum(wi * _dense_residual(m) for wi, m in zip(w, mods))
    got = sum(
        st.scales[k] * st.B[:, st.offsets[k] : st.offsets[k + 1]] @ st.A[st.offsets[k] : st.offsets[k + 1]]
        for k in range(3)
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if fold_scale:
        torch.testing.assert_close(st.B @ st.A, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(st.scales, torch.ones(3, dtype=F64))


@pytest.mark.parametrize("norm_dim", [0, 1])
def test_d2_kind_delta_is_the_projection(norm_dim):
    m = _d2("m", 6, 9, 2, 3, norm_dim=norm_dim)
    W0 = torch.randn(6, 9, generator=torch.Generator().manual_seed(9), dtype=F64)
    dW = _dense_residual(m)
    V = W0 + dW
    n0 = W0.norm(dim=norm_dim, keepdim=True)
    ref = V * (n0 / V.norm(dim=norm_dim, keepdim=True)) + dW - W0
    torch.testing.assert_close(m.delta(W0), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs the base weight"):
        m.delta(None)
    torch.testing.assert_close(_lora("m", 6, 9, 2, 4).delta(None), _dense_residual(_lora("m", 6, 9, 2, 4)))


def test_format_readers_detect_their_files(tmp_path):
    peft_dir = make_peft_adapter(tiny_gpt2(), tmp_path / "p", r=2, lora_alpha=4)
    d2_dir = save_d2_adapter(tmp_path / "d", {"transformer.h.0.attn.c_attn": _d2("x", 96, 32, 2, 0)},
                             r=2, lora_alpha=1.5, tau=0.4)  # fmt: skip
    assert (
        find_format(peft_dir).kind is LORA
        and find_format(peft_dir / "adapter_model.safetensors").kind is LORA
    )
    assert find_format(d2_dir).kind is D2LORA
    assert {f.kind for f in FORMATS.values()} >= {LORA, D2LORA}
    assert load_adapter(peft_dir).kind is LORA and load_adapter(d2_dir).kind is D2LORA
    for f in FORMATS.values():
        assert not f.detect(tmp_path / "missing")


# ----------------------------------------------------------------- a kind from outside


class NegatedLora(AdapterKind):
    """A toy kind, ``dW = -s B A``, stored nowhere: what a kind must define to
    be compared, attached and merged."""

    id = "test-negated-lora"
    label = "negated LoRA"
    peft_type = "TEST_NEGATED_LORA"

    def scaled_factors(self, m, dtype=F64, device=None):
        return -m.B.to(device=device, dtype=dtype), m.A.to(device=device, dtype=dtype), float(m.scale)

    def tensors(self, m):
        return {"lora_A": m.A, "lora_B": m.B}


@pytest.fixture
def negated():
    kind = register(NegatedLora())
    yield kind
    del KINDS[kind.name]


def test_a_new_kind_needs_no_other_change(negated):
    model = tiny_llama()
    name = "model.layers.0.self_attn.q_proj"
    lin = model.get_submodule(name)
    base = _lora(name, lin.out_features, lin.in_features, 2, 5, scale=0.3)
    neg = ModuleDelta(
        name=name, B=base.B, A=base.A, scale=base.scale, alpha=base.alpha, kind="test-negated-lora"
    )
    a, b = Adapter("pos", "lora", {name: base}), Adapter("neg", negated, {name: neg})
    assert neg.kind is negated and neg.num_parameters == base.num_parameters

    sim = similarity([a, b])
    assert sim.mean.loc["pos", "neg"] == pytest.approx(-1.0, abs=1e-12)

    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))
    W0 = lin.weight.detach().double()
    ref = x.double() @ (W0 - 0.5 * _dense_residual(base)).T
    attach_adapters(model, [b], weights=[0.5])
    torch.testing.assert_close(model.get_submodule(name)(x).double(), ref, rtol=1e-5, atol=1e-5)
    detach(model)
    kept = merge_into_model(model, [b], weights=[0.5], keep_original=True)
    torch.testing.assert_close(model.get_submodule(name)(x).double(), ref, rtol=1e-5, atol=1e-5)
    restore_weights(model, kept)
    torch.testing.assert_close(model.get_submodule(name).weight.detach().double(), W0)


# ----------------------------------------------------------------- the CLI's names


def test_an_unknown_kind_lists_those_train_takes(capsys, tmp_path):
    """A mistyped --kind listed every kind as known ("known: d2lora, dora,
    lora"), and --kind dora, the one a user tried next, is refused in turn:
    loramix reads DoRA but does not train it. The line says which train takes."""
    rc = main(["train", "--base", str(tmp_path), "--data", "synthetic:arith", "--out", str(tmp_path / "o"),
               "--kind", "lorra"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["loramix: error: --kind: unknown adapter kind 'lorra'; train takes d2lora, lora "
                               "(dora, moved-base: read, not trained)"], err  # fmt: skip


@pytest.mark.parametrize("flag", ["--kind", "--method"])
def test_train_kind_flag_and_its_hidden_alias(capsys, tmp_path, flag):
    rc = main(["train", "--base", str(tmp_path), "--data", "synthetic:arith", "--out", str(tmp_path / "o"),
               flag, "vera"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and flag in err[0] and "unknown adapter kind 'vera'" in err[0]
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--kind" in out and "--method" not in out


def test_a_kind_keeps_its_own_state_in_extra(negated):
    m = ModuleDelta(name="m", B=torch.ones(3, 1), A=torch.ones(1, 2), scale=1.0, alpha=1.0, kind=negated,
                    extra={"gate": torch.zeros(3)})  # fmt: skip
    assert m.kind is negated and torch.equal(m.extra["gate"], torch.zeros(3))
    assert _lora("m", 3, 2, 1, 0).extra == {}


_PLUGIN_KIND = """
import torch

from loramix.kinds.base import AdapterKind, layout_extra, missing_part


class PlainKind(AdapterKind):
    id = "test-plain"
    label = "plain"
    peft_type = "TEST_PLAIN"
    parts = {"lora_A": ("A", "pos"), "lora_B": ("B", "pos")}

    def scaled_factors(self, m, dtype=torch.float64, device=None):
        return m.B.to(device=device, dtype=dtype), m.A.to(device=device, dtype=dtype), 1.0

    def from_tensors(self, name, fs, config, *, scale, alpha, embedding=False):
        from loramix.adapter import ModuleDelta

        missing_part(fs, self.parts, name)
        return ModuleDelta(name=name, B=fs[("B", "pos")], A=fs[("A", "pos")], scale=1.0, alpha=alpha,
                           kind=self, extra=layout_extra(self, name, embedding))

    def tensors(self, m):
        return {"lora_A": m.A, "lora_B": m.B}

    def layer(self, base, rank, alpha, *, generator=None, dtype=torch.float32, **options):
        from loramix.kinds.lora import LoraLinear

        layer = LoraLinear(base, rank, float(rank), generator=generator, dtype=dtype)  # scale 1
        layer.kind = self
        return layer


PLAIN = PlainKind()
"""
_PLUGIN_FORMAT = """
from loramix.io.formats.base import PeftLayoutFormat
from loramix.kinds.test_plugin_plain import PLAIN


class PlainFormat(PeftLayoutFormat):
    name = "test-plain"
    kind = PLAIN
"""


@pytest.fixture
def plugin_kind(tmp_path):
    """A kind and its format as files of their packages (``dW = B A``, scale 1,
    ``peft_type: TEST_PLAIN``): found by the packages' discovery as a file added there is."""
    import importlib
    import sys

    import loramix.io.formats as formats_pkg
    import loramix.kinds as kinds_pkg

    added = []
    for pkg, mod, src in ((kinds_pkg, "test_plugin_plain", _PLUGIN_KIND),
                          (formats_pkg, "test_plugin_plain_format", _PLUGIN_FORMAT)):  # fmt: skip
        folder = tmp_path / pkg.__name__
        folder.mkdir()
        (folder / f"{mod}.py").write_text(src)
        pkg.__path__.append(str(folder))  # the list discovery reads (the package spec's)
        added.append((pkg, str(folder), f"{pkg.__name__}.{mod}"))
    try:
        kind = register(importlib.import_module("loramix.kinds.test_plugin_plain").PLAIN)
        fmt = importlib.import_module("loramix.io.formats.test_plugin_plain_format").PlainFormat()
        FORMATS[fmt.name] = fmt
        yield kind
    finally:
        KINDS.pop("test-plain", None)
        FORMATS.pop("test-plain", None)
        for pkg, folder, mod in added:
            pkg.__path__.remove(folder)
            sys.modules.pop(mod, None)


def test_a_kind_added_as_a_file_with_its_format_is_read_by_every_reader(plugin_kind, tmp_path, capsys):
    """inspect and similarity read adapters with the numpy reader, which reads
    LoRA and D2-LoRA itself: another kind's ``peft_type`` goes to the torch
    readers (it was refused as an unsupported peft_type)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    folders, refs = [], []
    for i in range(2):
        B, A = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
        d = tmp_path / f"plain{i}"
        d.mkdir()
        save_file({"base_model.model.l.0.q.lora_A.weight": A, "base_model.model.l.0.q.lora_B.weight": B},
                  str(d / "adapter_model.safetensors"))  # fmt: skip
        cfg = {"peft_type": "TEST_PLAIN", "r": 2, "lora_alpha": 16, "target_modules": ["q"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        folders.append(str(d))
        refs.append((B.double() @ A.double()).flatten())
    ad = load_adapter(folders[0])
    assert ad.kind is plugin_kind
    torch.testing.assert_close(ad.modules["l.0.q"].residual(), refs[0].reshape(6, 5))
    assert main(["inspect", folders[0]]) == 0, capsys.readouterr().err
    assert "l.0.q" in capsys.readouterr().out
    assert main(["similarity", *folders, "--format", "json"]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    assert got["rms"][0][1] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(*refs, dim=0)), abs=1e-9
    )


def test_kind_names_are_the_registrys_once_imported_else_the_files(plugin_kind):
    """train's --kind check and the report's colours ask :func:`kind_names`:
    the registry (with a kind registered from outside) once the kinds are
    imported; before, the names their files declare, without importing torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from loramix.discovery import kind_names

    assert kind_names() == sorted(KINDS) and plugin_kind.name in kind_names()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys, json; from loramix.discovery import kind_names; print(json.dumps([kind_names(), list(sys.modules)]))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    names, mods = json.loads(p.stdout)
    assert "torch" not in mods and "loramix.kinds" not in mods
    assert names == sorted(set(KINDS) - {plugin_kind.name})  # the packaged kinds, as their files name them


@pytest.mark.parametrize(
    ("method", "params"), [("sum", {}), ("ties", {"density": 0.5}), ("magnitude", {"density": 0.5})]
)
def test_a_new_kind_is_merged_by_the_methods_that_name_no_kinds(negated, method, params):
    """A method that does not restrict ``kinds`` merges any kind from its
    effective deltas: the negated kind as LoRA with the weight negated (a
    hand-written default list of kind names refused every kind added later)."""
    from loramix.methods import get_method
    from loramix.methods.base import ModuleContext

    name = "layers.0.proj"
    pos = _lora(name, 12, 8, 2, 7, scale=0.5)
    neg = ModuleDelta(name=name, B=pos.B, A=pos.A, scale=pos.scale, alpha=pos.alpha, kind=negated)
    other = _lora(name, 12, 8, 3, 8)
    m = get_method(method)
    ctx = ModuleContext(name, (0, 1), torch.device("cpu"), F64)
    p = m.validate(params, [Adapter("neg", negated, {name: neg}), Adapter("o", "lora", {name: other})])
    got = m.delta(ctx, [neg, other], [0.7, 1.2], None, p)
    ref = m.delta(ctx, [pos, other], [-0.7, 1.2], None, m.validate(params, []))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_a_kind_added_as_a_file_can_be_a_studys_adapters(plugin_kind, tmp_path):
    """A study trains the kinds whose files do not say ``trainable = False``
    (DoRA's): a kind added as one file is one (it was refused as an unknown
    adapter method, from a hand-written list of lora and d2lora)."""
    from loramix.scenario.config import load_scenario

    p = tmp_path / "s.toml"
    p.write_text(
        'name = "v"\n[base.build]\nsteps = 5\n[domains.a]\ndata = "synthetic:arith"\ntrain = 10\neval = 5\n'
        '[domains.b]\ndata = "synthetic:units"\ntrain = 10\neval = 5\n[adapters]\nmethods = ["test-plain", "lora"]\n'
    )
    assert load_scenario(p).adapters.methods == ("test-plain", "lora")
    from loramix.scenario.traits import kinds_for, trainable_kinds

    assert trainable_kinds()[:1] == ("lora",) and {"d2lora", "test-plain"} <= set(trainable_kinds())
    assert "dora" not in trainable_kinds()
    assert "test-plain" in kinds_for("sum") and "test-plain" not in kinds_for("svd")


@pytest.mark.parametrize("flag", [["--tau", "0.3"], ["--norm-dim", "0"]])
def test_d2_options_for_a_kind_added_as_a_file_are_refused(plugin_kind, tmp_path, capsys, flag):
    """--tau and --norm-dim are D2-LoRA's options (its file's ``options``):
    given for another kind they are an error naming the flag, not ignored
    (only a LoRA's were refused; a kind added later went on without them)."""
    rc = main(["train", "--base", str(tmp_path), "--data", "synthetic:arith", "--out", str(tmp_path / "o"),
               "--kind", "test-plain", *flag])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err == f"loramix: error: {flag[0]}: applies to --kind d2lora only (a plain has no such option)\n"
    )


def test_an_unknown_peft_type_is_told_alike_by_both_readers_with_a_kind_added_as_a_file(
    plugin_kind, tmp_path
):
    """The numpy reader's error listed LORA and D2LORA by hand; the torch
    readers' listed their formats' types (with a kind's format added, one
    more): both now list what the format files name."""
    from safetensors.torch import save_file

    from loramix.errors import AdapterError
    from loramix.io.np_factors import load_np_adapter

    d = tmp_path / "vera"
    d.mkdir()
    save_file(
        {"base_model.model.l.0.q.lora_A.weight": torch.ones(2, 5)}, str(d / "adapter_model.safetensors")
    )
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 2, "lora_alpha": 2}))
    said = []
    for read in (load_adapter, load_np_adapter):
        with pytest.raises(AdapterError, match="unsupported peft_type 'VERA'") as e:
            read(d)
        said.append(str(e.value))
    assert said[0] == said[1], said
