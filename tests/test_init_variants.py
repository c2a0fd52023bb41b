"""PEFT adapters whose init moved the base (PiSSA, OLoRA), saved unconverted.

Real PEFT adapters on tiny real models (tests/factories.py): their factors
moved after the init, as training moves them, and saved without PEFT's
conversion, so ``adapter_config.json`` keeps ``init_lora_weights``. PEFT
reloads such an adapter onto the original base exactly (it runs the init
again); loramix must agree with that reload (docs/adapters.md, "Kinds"),
and refuse the inits it cannot compute again.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from .factories import (
    assert_applied_as_peft,
    assert_rel,
    logits,
    moved,
    one_line_error,
    peft_reloaded,
    save_base,
    tiny_gpt2,
    tiny_llama,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _moved_adapter(model, folder: Path, init, seed: int = 0, convert_to: Path | None = None, **kw) -> Path:
    """A PEFT adapter made with ``init_lora_weights=init`` on ``model`` (left
    as it is), its factors moved by noise (as training would), saved as PEFT
    saves it: unconverted, or with ``convert_to`` the plain LoRA PEFT's
    conversion writes there (the initial adapter kept beside it)."""
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=init)
    cfg.update(kw)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg))
    if convert_to is not None:
        pm.save_pretrained(str(folder / "initial"))
    moved(pm, seed, "lora_")
    pm.save_pretrained(str(folder))
    if convert_to is not None:
        pm.save_pretrained(str(convert_to), path_initial_model_for_weight_conversion=str(folder / "initial"))
    return folder


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_moved_base_into_the_base_equals_peft_reload(init, tmp_path, capsys):
    """``sum --into``, ``merge --into``, ``merge_into_model`` (eval merged) and
    ``attach_adapters`` (eval on the fly) equal PEFT's reload of the
    unconverted adapter on the original base, to 1e-6 of the weights; with
    ``use_rslora`` and an ``alpha_pattern``, whose scale PiSSA divides by.
    On the old code the adapter was a plain LoRA (s B A on the original base):
    0.04-0.14 off."""
    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = _moved_adapter(model, tmp_path / "a", init, seed=1, use_rslora=True, alpha_pattern={"v_proj": 3})
    ad = load_adapter(a)
    assert ad.kind == "moved-base" and ad.kind.needs_base
    pm = peft_reloaded(tiny_llama, a)
    on_the_fly = logits(pm)
    ref = pm.merge_and_unload().state_dict()
    # PEFT's reload moved the base: the plain LoRA reading is far off (what the old code merged)
    q = "model.layers.0.self_attn.q_proj"
    plain = model.get_submodule(q).weight.detach().double() + ad.modules[q].residual()
    assert float((plain - ref[q + ".weight"].double()).abs().max()) > 1e-3

    assert_applied_as_peft(ref, on_the_fly, a, base, tiny_llama, tmp_path / "out")


def test_moved_base_equals_peft_conversion_and_composes(tmp_path):
    """The delta is PEFT's converted rank-2r LoRA: loramix reading the
    unconverted PiSSA adapter against the base equals its reading of what
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` wrote,
    module by module (float64 deltas, 1e-6 of their size); weighted beside a
    plain LoRA, the sum and the similarity against the base are those of the
    converted adapter."""
    from loramix.io.adapter_files import load_adapter
    from loramix.overlap import similarity

    from .factories import make_peft_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = _moved_adapter(model, tmp_path / "a", "pissa", seed=2, convert_to=tmp_path / "conv")
    ad, conv = load_adapter(a), load_adapter(tmp_path / "conv")
    assert conv.kind == "lora" and ad.kind == "moved-base"
    for name, m in ad.modules.items():
        W0 = model.get_submodule(name).weight.detach()
        assert_rel(m.delta(W0), conv.modules[name].delta(), msg=name)
    other = load_adapter(
        make_peft_adapter(model, tmp_path / "o", seed=5, target_modules=["q_proj", "down_proj"])
    )
    got = similarity([ad, other], base=base, per_module=True, progress=False)
    want = similarity([conv, other], progress=False, per_module=True)
    assert got.effective
    assert float(got.rms.iloc[0, 1]) == pytest.approx(float(want.rms.iloc[0, 1]), rel=1e-6)
    assert got.norms.to_numpy() == pytest.approx(want.norms.to_numpy(), rel=1e-6, nan_ok=True)


@pytest.mark.parametrize(
    "make, init, kw",
    [
        (tiny_llama, "pissa", dict(use_rslora=True, alpha_pattern={"v_proj": 3})),
        (tiny_llama, "olora", {}),
        (tiny_gpt2, "pissa", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
        (tiny_gpt2, "olora", dict(target_modules=r".*attn\.c_proj", fan_in_fan_out=True)),
    ],
)
def test_convert_writes_the_moved_base_delta_as_a_lora_peft_reloads(tmp_path, capsys, make, init, kw):
    """``loramix convert`` of an unconverted PiSSA/OLoRA adapter writes the
    rank-2r LoRA ``s [B, -B0]``, ``[A; A0]``: PEFT's reload of it on the
    original base, merged, is PEFT's reload of the unconverted adapter (1e-6
    of the weights), and the commands without a base take it (which refuse
    the unconverted one, naming the conversion)."""
    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter

    model = make()
    base = save_base(model, tmp_path / "base")
    a = _moved_adapter(model, tmp_path / "a", init, seed=6, **kw)
    capsys.readouterr()
    one_line_error(capsys, ["similarity", a, a], "loramix convert")
    assert main(["convert", str(a), "--base", str(base), "--out", str(tmp_path / "lora")]) == 0
    conv = load_adapter(tmp_path / "lora")
    assert conv.kind == "lora" and {m.rank for m in conv.modules.values()} == {6}  # 2r
    want = peft_reloaded(make, a).merge_and_unload().state_dict()
    got = peft_reloaded(make, tmp_path / "lora").merge_and_unload().state_dict()
    for n, p in want.items():
        assert_rel(got[n], p, msg=n)
    assert main(["similarity", str(tmp_path / "lora"), str(tmp_path / "lora")]) == 0


def test_pissa_on_gpt2_conv1d_equals_peft(tmp_path):
    """GPT-2's ``Conv1D`` (``fan_in_fan_out``): PiSSA takes the SVD of the
    ``(out, in)`` weight (PEFT transposes the stored one); into the base and
    on the fly equal PEFT's reload."""

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    a = _moved_adapter(model, tmp_path / "a", "pissa", seed=3, target_modules=["c_attn", "c_proj", "c_fc"],
                       fan_in_fan_out=True)  # fmt: skip
    pm = peft_reloaded(tiny_gpt2, a)
    on_the_fly = logits(pm)
    assert_applied_as_peft(
        pm.merge_and_unload().state_dict(), on_the_fly, a, base, tiny_gpt2, tmp_path / "out"
    )


def test_olora_on_a_square_conv1d_equals_peft(tmp_path):
    """PEFT's OLoRA takes the QR of the weight as stored, not transposed for a
    ``Conv1D``: it works on a square one only (``attn.c_proj``; on the others
    PEFT's own forward fails), and its ``Q_r R_r`` is the transpose of the
    ``(out, in)`` term. loramix equals PEFT's reload there."""
    from transformers import GPT2LMHeadModel

    from loramix.cli import main

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    a = _moved_adapter(model, tmp_path / "a", "olora", seed=4, target_modules=r".*attn\.c_proj",
                       fan_in_fan_out=True)  # fmt: skip
    ref = peft_reloaded(tiny_gpt2, a).merge_and_unload().state_dict()
    assert main(["sum", str(a), "--into", str(base), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    sd = GPT2LMHeadModel.from_pretrained(str(tmp_path / "s")).state_dict()
    moved = "transformer.h.0.attn.c_proj.weight"
    assert float((ref[moved] - model.state_dict()[moved]).abs().max()) > 1e-3
    for n, p in ref.items():
        assert_rel(sd[n], p, msg=n)


def _with_init(src: Path, dst: Path, init) -> Path:
    """A copy of the adapter ``src`` whose config says ``init_lora_weights: init``."""
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    return dst


@pytest.mark.parametrize(
    "init, words",
    [
        ("pissa_niter_4", "randomized SVD"),
        ("corda", "calibration data"),
        ("loftq", "quantized"),
        ("lora_ga", "gradients"),
        ("pisa", "not one PEFT knows"),
        ("Eva", "not one PEFT knows"),
        (3, "not one PEFT knows"),
    ],
)
def test_inits_loramix_cannot_reproduce_are_refused(init, words, tmp_path, capsys):
    """One line naming adapter_config.json and the init, exit 2, from the
    torch and the numpy readers (``sum --into``, ``similarity``, ``inspect``)."""
    from .factories import make_peft_adapter

    model = tiny_llama(n_layer=1)
    base = save_base(model, tmp_path / "base")
    a = _with_init(
        make_peft_adapter(model, tmp_path / "src", target_modules=["q_proj"]), tmp_path / "a", init
    )
    capsys.readouterr()  # the base's save wrote a progress bar
    for args in (["sum", a, "--into", base, "--out", tmp_path / "m"], ["similarity", a, a], ["inspect", a]):
        one_line_error(capsys, args, "adapter_config.json", f"init_lora_weights {init!r}", words)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("init", [True, False, None, "gaussian", "Gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_stay_lora(init, tmp_path):
    """PEFT's inits that do not touch the base weight: the delta is ``s B A`` (a
    plain LoRA), as before."""
    from loramix.io.adapter_files import load_adapter
    from loramix.io.np_factors import load_np_adapter

    from .factories import make_peft_adapter

    src = make_peft_adapter(tiny_llama(n_layer=1), tmp_path / "src", target_modules=["q_proj"])
    a = _with_init(src, tmp_path / "a", init)
    assert load_adapter(a).kind == "lora" and load_np_adapter(a).kind == "lora"


def test_moved_base_without_a_base_is_refused(tmp_path, capsys):
    """Where a command has no base its factors alone are not the delta: the
    similarity (numpy and torch readers) and an adapter output are refused in
    one line naming the init or the kind and saying what to pass; a DoRA
    with such an init is refused; ``inspect`` lists the stored factors with
    the kind and the note that the delta depends on the base."""
    from loramix.cli import main
    from loramix.errors import AdapterError
    from loramix.io.adapter_files import load_adapter
    from loramix.overlap import similarity

    model = tiny_llama(n_layer=1)
    a = _moved_adapter(model, tmp_path / "a", "olora", target_modules=["q_proj"])
    one_line_error(capsys, ["similarity", a, a], "adapter_config.json", "init_lora_weights 'olora'", "--base")
    with pytest.raises(AdapterError, match="init_lora_weights 'olora'.*pass --base"):
        similarity([load_adapter(a)], progress=False)  # the torch reader's adapter
    one_line_error(capsys, ["sum", a, "--out", tmp_path / "x"], "PiSSA/OLoRA", "--into BASE")
    one_line_error(capsys, ["merge", "-m", "ties", "--density", "0.5", "--out-rank", "2", a, "--out", tmp_path / "y"],
                   "PiSSA/OLoRA", "--into BASE")  # fmt: skip
    assert main(["inspect", str(a)]) == 0
    out = capsys.readouterr().out
    assert "moved-base" in out and "depends on the base" in out
    d = _with_init(a, tmp_path / "d", "olora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    one_line_error(capsys, ["inspect", d], "adapter_config.json", "DoRA", "'olora'")


def test_predict_and_plan_name_the_commands_that_read_it(tmp_path, capsys):
    """``predict`` and ``plan`` read factors without a base (and take
    ``--base`` only with ``--data``): their refusal of a PiSSA/OLoRA adapter
    names the commands that read it with its base. It said "pass --base
    BASE", which those two then refused without ``--data``."""
    import numpy as np

    from loramix.fit import fit_line

    model = tiny_llama(n_layer=1)
    a = _moved_adapter(model, tmp_path / "a", "pissa", target_modules=["q_proj"])
    x = np.linspace(0.0, 0.1, 6)
    fit = tmp_path / "fit.json"
    line = {"adapter_method": "lora", "merge_method": "sum", **fit_line(x, 3 * x + 1).to_dict()}
    fit.write_text(json.dumps({"scenario": "t", "prediction_level": 0.9, "fits": [line]}))
    from .test_predict import _cosine_predictors

    predictors = _cosine_predictors(tmp_path / "predictors.json")
    for cmd in (["predict", a, a, "--fit", fit], ["plan", a, a, "--fit", predictors]):
        err = one_line_error(
            capsys, cmd, "adapter_config.json", "init_lora_weights 'pissa'", "similarity --base"
        )
        assert "pass --base" not in err, err
