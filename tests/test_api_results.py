"""One rule for what the writing functions return (:mod:`loramix.results`):
path-like for what they wrote, ``.out`` a Path, ``res / name`` inside it,
figures as attributes, a one-line repr; those that returned a Path still
are one. Real calls on a tiny GPT-2, real files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

import loramix

from .factories import make_peft_adapter
from .test_api_errors import api_env
from .test_evalfit import _files, bank  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return api_env(tmp_path_factory.mktemp("api_results"))


def _obeys(res, folder, name: str) -> None:
    """The rule, for ``res`` that wrote ``folder``."""
    assert isinstance(res, os.PathLike) and os.fspath(res) == str(folder), name
    assert Path(res) == Path(folder) and open(res / "x", "w").close() is None, name
    assert isinstance(res.out, Path) and res.out == Path(folder), name
    assert res / "x" == Path(folder) / "x" and type(res / "x") is type(Path()), name
    said = repr(res)
    assert "\n" not in said and len(said) < 1000, (name, said)
    os.remove(Path(folder) / "x")


def test_every_writing_function_returns_a_path_like_result(env, bank, tmp_path):  # noqa: F811  (a fixture)
    """Each function that writes (merge, sum_into_base, sum_adapters, train_adapter, build_base,
    import_gguf, fit_evaluations, run_scenario, save_peft_adapter, save_d2_adapter) obeys the
    rule; the figures each had are where they were."""
    from transformers import AutoModelForCausalLM

    ads, base, data = env["ads"], env["base"], env["data"]
    loaded = [loramix.load_adapter(p) for p in ads]
    t = tmp_path
    got = {
        "merge": loramix.merge(ads, "sum", out=t / "m", progress=False),
        "merge into": loramix.merge(ads, "ties", density=0.5, into=base, out=t / "mi", progress=False),
        "sum_into_base": loramix.sum_into_base(ads, into=base, out=t / "si", progress=False),
        "sum_adapters": loramix.sum_adapters(ads, out=t / "sa"),
        "train_adapter": loramix.train_adapter(
            base, data, out=t / "tr", steps=1, batch=4, max_len=32, eval_size=4, device="cpu", progress=False
        ),  # fmt: skip
        "build_base": loramix.build_base(
            ["synthetic:arith?n=40"], out=t / "bb", steps=1, device="cpu", progress=False
        ),  # fmt: skip
        "fit_evaluations": loramix.fit_evaluations(_files(bank), out=t / "fit"),
        "save_peft_adapter": loramix.save_peft_adapter(
            t / "sp", {n: (m.B, m.A) for n, m in loaded[0].modules.items()}
        ),
    }
    import torch

    from loramix.adapter import ModuleDelta
    from loramix.kinds import D2LORA

    g = torch.Generator().manual_seed(0)
    d2 = {"h.0.mlp.c_fc": ModuleDelta(name="h.0.mlp.c_fc", B=torch.randn(8, 2, generator=g),
                                      A=torch.randn(2, 6, generator=g), B_neg=torch.randn(8, 2, generator=g),
                                      A_neg=torch.randn(2, 6, generator=g), scale=2.0, alpha=4.0, tau=0.5,
                                      kind=D2LORA)}  # fmt: skip
    got["save_d2_adapter"] = loramix.save_d2_adapter(t / "sd", d2, r=2, lora_alpha=4, tau=0.5)
    from .test_realmodel import llama_gguf

    got["import_gguf"] = loramix.import_gguf(llama_gguf(t / "tiny.gguf", tokenizer=True), out=t / "gg",
                                             progress=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(t / "bb")
    given = {d: make_peft_adapter(model, t / f"p-{d}", seed=k, r=2, lora_alpha=4) for k, d in enumerate("ab")}
    scen = t / "s.toml"
    scen.write_text(f'name = "s"\n[base]\npath = "{t / "bb"}"\n' + "".join(
        f'\n[domains.{d}]\ndata = "synthetic:arith?seed={k}"\neval = 8\nadapter = "{given[d]}"\n'
        for k, d in enumerate("ab")) + '\n[merge]\nmethods = ["sum"]\n\n[eval]\nbatch = 8\nmax_len = 32\n')  # fmt: skip
    got["run_scenario"] = loramix.run_scenario(scen, out=t / "rep", cache_dir=t / "cache", device="cpu",
                                               progress=False)  # fmt: skip
    folders = {"merge": "m", "merge into": "mi", "sum_into_base": "si", "sum_adapters": "sa", "train_adapter": "tr",
               "build_base": "bb", "fit_evaluations": "fit", "save_peft_adapter": "sp", "save_d2_adapter": "sd", "import_gguf": "gg",
               "run_scenario": "rep"}  # fmt: skip
    for name, res in got.items():
        _obeys(res, t / folders[name], name)
    # what each returned before still works: the dicts' "out" a string, the Paths Paths
    for name in ("train_adapter", "build_base", "fit_evaluations", "import_gguf", "run_scenario"):
        assert isinstance(got[name], dict) and got[name]["out"] == str(t / folders[name]), name
    for name in ("sum_adapters", "save_peft_adapter", "save_d2_adapter"):
        res = got[name]
        assert isinstance(res, Path) and res == t / folders[name] and str(res) == str(t / folders[name])
        assert res.name == folders[name] and res.is_dir() and pickle.loads(pickle.dumps(res)) == res
    # the figures: sum_adapters' are the merge's, save_*'s the counts written
    assert got["sum_adapters"].summary == got["merge"].summary and got["sum_adapters"].method == "sum"
    assert got["save_peft_adapter"].modules == len(loaded[0].modules) and got["save_d2_adapter"].modules == 1
    assert got["sum_into_base"].tensors > 0 and got["fit_evaluations"]["methods"]
    assert "ppl_adapter" in got["train_adapter"] and got["run_scenario"]["results"]


def test_a_fit_that_wrote_nothing_stands_for_no_path(bank):  # noqa: F811  (a fixture)
    res = loramix.fit_evaluations(_files(bank))
    assert res.out is None and res["out"] is None
    with pytest.raises(TypeError, match="wrote nothing"):
        os.fspath(res)
