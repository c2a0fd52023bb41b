"""``loramix inspect`` (library and CLI) on real PEFT and D2 adapters."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from loramix.adapter import ModuleDelta
from loramix.cli import main
from loramix.contents import COLUMNS, inspect_adapter
from loramix.io.adapter_files import save_d2_adapter

from .factories import make_peft_adapter, tiny_gpt2, tiny_llama
from .test_np_similarity import adapter_paths  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("i")
    model = tiny_gpt2(n_layer=11)  # h.10 sorts after h.9, not after h.1
    return make_peft_adapter(model, d / "g", r=4, lora_alpha=8, rank_pattern={"c_fc": 2}, use_rslora=True)


def test_table_matches_factors(gpt2_adapter):
    df = inspect_adapter(gpt2_adapter)
    assert list(df.columns) == COLUMNS and len(df) == 11 * 4
    names = list(df["module"])
    assert names.index("transformer.h.2.attn.c_attn") < names.index("transformer.h.10.attn.c_attn")
    row = df.set_index("module").loc["transformer.h.3.mlp.c_fc"]
    assert (row["out"], row["in"], row["rank"]) == (128, 32, 2)
    assert row["scale"] == pytest.approx(8 / math.sqrt(2)) and row["dtype"] == "float32"
    assert row["params"] == 2 * (128 + 32)
    from loramix import load_adapter

    ad = load_adapter(gpt2_adapter)
    for r in df.itertuples():
        dense = ad.modules[r.module].residual()  # s * B @ A, float64
        assert r.norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-12)
    t = df.attrs["totals"]
    assert t["params"] == ad.num_parameters and t["modules"] == 44 and t["ranks"] == [2, 4]
    assert t["norm"] == pytest.approx(math.sqrt(sum(m.squared_norm() for m in ad)), rel=1e-12)


def test_cli_table_and_json(gpt2_adapter, capsys):
    assert main(["inspect", str(gpt2_adapter)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.10.mlp.c_proj" in out and "total: 44 modules" in out and "sha256" in out
    assert main(["inspect", str(gpt2_adapter / "adapter_model.safetensors"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "g" and data["method"] == "lora" and len(data["sha256"]) == 64
    assert len(data["modules"]) == 44 and set(data["modules"][0]) == set(COLUMNS)
    assert data["totals"]["params"] == sum(m["params"] for m in data["modules"])


def test_modules_to_save_copies_are_listed(tmp_path, capsys):
    """Full copies replace base tensors when merged: inspect lists each one
    (the table of deltas does not), in the JSON too."""
    a = make_peft_adapter(
        tiny_llama(), tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    assert main(["inspect", str(a)]) == 0
    out = capsys.readouterr().out
    assert "full copy (modules_to_save): lm_head.weight 128x32 float32, 4,096 parameters" in out, out
    assert main(["inspect", str(a), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["saved"] == [
        {"tensor": "lm_head.weight", "shape": [128, 32], "dtype": "float32", "params": 4096}
    ]
    assert main(["inspect", str(make_peft_adapter(tiny_llama(), tmp_path / "b")), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["saved"] == []


def test_d2_adapter(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, (o, i) in {
        "model.layers.0.mlp.up_proj": (8, 6),
        "model.layers.0.mlp.down_proj": (6, 8),
    }.items():
        mods[name] = ModuleDelta(
            name=name,
            B=torch.randn(o, 2, generator=g),
            A=torch.randn(2, i, generator=g),
            B_neg=torch.randn(o, 2, generator=g),
            A_neg=torch.randn(2, i, generator=g),
            scale=2.0,
            alpha=4.0,
            tau=0.5,
        )
    folder = save_d2_adapter(tmp_path / "d2", mods, r=2, lora_alpha=4, tau=0.5)
    df = inspect_adapter(folder)
    assert set(df["kind"]) == {"d2lora"} and list(df["params"]) == [4 * (6 + 8)] * 2
    for r in df.itertuples():
        m = mods[r.module]
        ref = 2.0 * (m.B.double() @ m.A.double() - 0.5 * m.B_neg.double() @ m.A_neg.double())
        assert r.norm == pytest.approx(float(torch.linalg.matrix_norm(ref)), rel=1e-12)


def test_llama_half_storage(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = make_peft_adapter(tiny_llama(), tmp_path / "l", r=2, target_modules=["q_proj"])
    w = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(w)).items()}, str(w))
    df = inspect_adapter(folder)
    assert set(df["dtype"]) == {"bfloat16"} and len(df) == 2


def test_json_keeps_full_precision(tmp_path, capsys):
    """The JSON's module norms and scales are those of the table, not rounded
    to 10 decimals by pandas (a 1e-9 delta lost all but two digits)."""
    model = tiny_llama()
    a = make_peft_adapter(model, tmp_path / "a", r=3, lora_alpha=5)
    df = inspect_adapter(a)
    assert main(["inspect", str(a), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    assert [r["scale"] for r in rows] == list(df["scale"])  # 5/3 exactly
    assert [r["norm"] for r in rows] == list(df["norm"])
    from safetensors.torch import load_file, save_file

    f = a / "adapter_model.safetensors"
    small = {k: v * 1e-6 for k, v in load_file(f).items()}  # deltas of norm ~1e-12
    save_file(small, f, metadata={"format": "pt"})
    df = inspect_adapter(a)
    assert main(["inspect", str(a), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    assert all(r["norm"] > 0 for r in rows)
    assert [r["norm"] for r in rows] == list(df["norm"])


def test_d2_table_says_the_norm_is_the_residual(tmp_path, capsys):
    """A D2 adapter's effective delta W_hat - W0 is about twice its residual on
    a real base; the table must not present the residual's norm as the delta's."""
    g = torch.Generator().manual_seed(0)
    mods = {"model.layers.0.mlp.up_proj": ModuleDelta(
        name="model.layers.0.mlp.up_proj", B=torch.randn(8, 2, generator=g), A=torch.randn(2, 6, generator=g),
        B_neg=torch.randn(8, 2, generator=g), A_neg=torch.randn(2, 6, generator=g), scale=2.0, alpha=4.0, tau=0.5,
    )}  # fmt: skip
    folder = save_d2_adapter(tmp_path / "d2", mods, r=2, lora_alpha=4, tau=0.5)
    assert main(["inspect", str(folder)]) == 0
    assert "signed residual" in capsys.readouterr().out


def test_the_residual_note_names_the_kinds_whose_delta_needs_the_base(tmp_path, capsys):
    """The note is for kinds whose delta depends on the base, named as they
    are: a DoRA adapter's said 'norm of a D2-LoRA module: its signed residual'
    (any kind but lora got D2-LoRA's note)."""
    dora = make_peft_adapter(
        tiny_llama(), tmp_path / "dora", seed=3, target_modules=["q_proj"], use_dora=True, r=2
    )
    assert main(["inspect", str(dora)]) == 0
    out = capsys.readouterr().out
    assert "D2-LoRA" not in out and "norm of a DoRA module: its residual" in out


def _inspected_by_torch(monkeypatch):
    """Make a path's inspect take the torch path (as for a kind the numpy reader leaves to torch)."""
    monkeypatch.setattr("loramix.io.np_factors.load_np_adapter", lambda *a, **k: None)


@pytest.fixture(scope="module")
def all_kinds(adapter_paths, tmp_path_factory):  # noqa: F811  (the fixture of test_np_similarity)
    """test_np_similarity's adapters (GPT-2 Conv1D with rank/alpha patterns,
    rsLoRA, bf16 and fp16 factors, D2-LoRA, Llama, Llama bf16) and a DoRA one
    (read in numpy too), and three the numpy reader leaves to torch:
    embedding LoRA, modules_to_save, DoRA on an embedding."""
    from .test_formats import _train_magnitudes

    d, model = tmp_path_factory.mktemp("kinds"), tiny_llama()
    dora = make_peft_adapter(
        model, d / "dora", seed=3, target_modules=["q_proj", "down_proj"], use_dora=True, r=2
    )
    torch_read = [
        make_peft_adapter(model, d / "emb", seed=1, target_modules=["embed_tokens", "q_proj"], r=3),
        make_peft_adapter(model, d / "mts", seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        make_peft_adapter(
            model, d / "dora_emb", seed=4, target_modules=["embed_tokens", "q_proj"], use_dora=True
        ),
    ]
    return adapter_paths["gpt2"] + adapter_paths["llama"] + [_train_magnitudes(dora, 5)], torch_read


def test_a_path_is_inspected_in_numpy_with_torchs_numbers(all_kinds, monkeypatch):
    """By path, a LoRA, DoRA or D2-LoRA adapter is read as numpy factors
    (torch's reader is not called) and every column and attribute is that of
    the loaded Adapter (torch float64), the norms to 1e-12 (BLAS summation
    order); DoRA's magnitude range too."""
    import loramix.io.adapter_files as files
    from loramix import load_adapter

    numpy_read, torch_read = all_kinds
    loaded = {p: load_adapter(p) for p in numpy_read + torch_read}
    calls = []
    monkeypatch.setattr(files, "load_adapter", lambda *a, **k: calls.append(a) or load_adapter(*a, **k))
    for p in numpy_read + torch_read:
        calls.clear()
        by_path, by_torch = inspect_adapter(p), inspect_adapter(loaded[p])
        assert (calls == []) == (p in numpy_read), p.name
        pd.testing.assert_frame_equal(by_path, by_torch, check_exact=False, rtol=1e-12, atol=0)
        a, b = by_path.attrs, by_torch.attrs
        assert a["totals"].pop("norm") == pytest.approx(b["totals"].pop("norm"), rel=1e-12, abs=0)
        assert a == b, p.name
    kinds = {p.name: set(inspect_adapter(p)["kind"]) for p in numpy_read}
    assert kinds["d0"] == {"d2lora"} and kinds["g0"] == {"lora"} and kinds["dora"] == {"dora"}
    mags = {p.name: inspect_adapter(p).attrs["magnitude"] for p in numpy_read + torch_read}
    assert mags["dora"]["modules"] == 4 and 0 < mags["dora"]["min"] < mags["dora"]["max"]
    assert mags["dora_emb"]["modules"] == 3 and mags["g0"] is None
    assert {d for p in numpy_read for d in inspect_adapter(p)["dtype"]} == {"float32", "bfloat16", "float16"}


def test_numpy_and_torch_print_the_same(all_kinds, capsys, monkeypatch, tmp_path):
    """The text (every digit) and the JSON of a path's inspect are those of the
    torch path; a bad adapter gives the same one-line error."""
    from .test_np_similarity import _bad_adapters

    numpy_read, _ = all_kinds
    paths = numpy_read + list(_bad_adapters(numpy_read[0], tmp_path))
    outs = {}
    for how in ("numpy", "torch"):
        if how == "torch":
            _inspected_by_torch(monkeypatch)
        for p in paths:
            for fmt in ("table", "json"):
                code = main(["inspect", str(p), "--format", fmt])
                outs[how, p, fmt] = (code, *capsys.readouterr())
    assert all(outs["numpy", p, "table"][0] == 0 for p in numpy_read)
    for p in paths:
        if p.name == "truncated":  # the safetensors library's own words differ between frameworks
            assert outs["numpy", p, "table"][0] == outs["torch", p, "table"][0] == 2
            continue
        assert outs["numpy", p, "table"] == outs["torch", p, "table"], p.name
        code, out, err = outs["numpy", p, "json"]
        assert (code, err) == outs["torch", p, "json"][::2], p.name
        if code == 0:
            n, t = json.loads(out), json.loads(outs["torch", p, "json"][1])
            assert [m.pop("norm") for m in n["modules"]] == pytest.approx(
                [m.pop("norm") for m in t["modules"]], rel=1e-12, abs=0
            )
            assert n["totals"].pop("norm") == pytest.approx(t["totals"].pop("norm"), rel=1e-12, abs=0)
            assert n == t, p.name


def _as_bf16(folder):
    """``folder``'s weights stored in bfloat16 (the factors as a bf16 adapter holds them)."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inspect_of_a_path_and_of_the_loaded_adapter_agree_bit_for_bit(tmp_path, dtype):
    """A path is read as numpy factors and a loaded Adapter holds torch tensors: both norms are one
    computation (numpy float64, from the same float64 factors), so every column is equal, the norm
    to the last bit, for LoRA, DoRA and D2-LoRA in float32 and bfloat16. Wide enough modules that
    torch's and numpy's float64 matmuls sum in another order (they did: last-bit differences)."""
    from loramix.io.adapter_files import load_adapter

    model = tiny_gpt2(n_embd=96, n_layer=2)
    g = torch.Generator().manual_seed(1)
    mods = {
        f"h.{i}.mlp.c_fc": ModuleDelta(name=f"h.{i}.mlp.c_fc", B=torch.randn(384, 8, generator=g),
                                       A=torch.randn(8, 96, generator=g), B_neg=torch.randn(384, 8, generator=g),
                                       A_neg=torch.randn(8, 96, generator=g), scale=0.7, alpha=5.6, tau=0.3)
        for i in range(2)
    }  # fmt: skip
    folders = {
        "lora": make_peft_adapter(model, tmp_path / "lora", seed=3, r=8, lora_alpha=11),
        "dora": make_peft_adapter(model, tmp_path / "dora", seed=4, r=8, lora_alpha=11, use_dora=True),
        "d2lora": save_d2_adapter(tmp_path / "d2", mods, r=8, lora_alpha=5.6, tau=0.3),
    }
    for kind, folder in folders.items():
        if dtype == "bfloat16":
            _as_bf16(folder)
        by_path, loaded = inspect_adapter(folder), inspect_adapter(load_adapter(folder))
        assert set(by_path["kind"]) == {kind} and set(by_path["dtype"]) == {dtype}, kind
        assert by_path["norm"].tolist() == loaded["norm"].tolist(), kind  # exactly
        pd.testing.assert_frame_equal(by_path, loaded, check_exact=True)
