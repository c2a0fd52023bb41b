"""PEFT LoHa adapters, read as LoRA of rank r^2 (loramix/io/formats/loha.py).

Real PEFT LoHa adapters on a tiny Llama (tests/factories.py), every factor
moved by noise as training moves them, with a rank and an alpha pattern.
loramix's exact Khatri-Rao factors must give PEFT's reload: merged into the
base, on the fly, and as the plain LoRA ``sum --out`` writes, which PEFT
must load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .factories import (
    as_bfloat16,
    assert_applied_as_peft,
    assert_read_in_float32_and_summed,
    assert_rel,
    edited_copy,
    logits,
    moved,
    one_line_error,
    peft_deltas,
    peft_reloaded,
    save_base,
    tiny_llama,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _loha(model, folder: Path, seed: int = 0, **kw) -> Path:
    """A PEFT LoHa adapter on ``model`` (left as it is), ``r`` 3 and ``alpha``
    5, ``v_proj`` at rank 2 and ``down_proj`` at alpha 7 by the patterns,
    every factor moved by noise."""
    from peft import LoHaConfig, get_peft_model

    cfg = dict(
        r=3, alpha=5, target_modules=TARGETS, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 7}
    )
    cfg.update(kw)
    pm = get_peft_model(copy.deepcopy(model), LoHaConfig(**cfg))
    moved(pm, seed, "hada_", size=0.1)
    pm.save_pretrained(str(folder))
    return folder


def test_khatri_rao_factors_are_the_hadamard_product():
    """``B @ A = (W1a @ W1b) * (W2a @ W2b)``, to float64 rounding, ranks 3 and 2."""
    from loramix.io.formats.loha import khatri_rao

    g = torch.Generator().manual_seed(0)
    W1a, W1b = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    W2a, W2b = (
        torch.randn(7, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )
    B, A = khatri_rao(W1a, W1b, W2a, W2b)
    assert B.shape == (7, 6) and A.shape == (6, 5)
    assert torch.allclose(B @ A, (W1a @ W1b) * (W2a @ W2b), rtol=0, atol=1e-13)


def test_loha_into_the_base_equals_peft_reload(tmp_path):
    """``sum --into``, ``merge_into_model`` and ``attach_adapters`` (on the
    fly) equal PEFT's reload to 1e-6 of the weights, each module's delta too;
    the patterns' rank and alpha are each module's (rank r^2 as LoRA)."""

    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = _loha(model, tmp_path / "a", seed=1)
    ad = load_adapter(a)
    assert ad.kind == "lora"
    for name, m in ad.modules.items():
        assert (m.rank, m.scale) == (
            (4, 2.5) if name.endswith("v_proj") else (9, 7 / 3 if "down" in name else 5 / 3)
        )
    pm = peft_reloaded(tiny_llama, a)
    on_the_fly = logits(pm)
    deltas = peft_deltas(pm)
    assert set(deltas) == set(ad.modules)
    for name, d in deltas.items():
        assert_rel(ad.modules[name].delta(), d, msg=name)
    assert_applied_as_peft(
        pm.merge_and_unload().state_dict(), on_the_fly, a, base, tiny_llama, tmp_path / "out"
    )


def test_bfloat16_loha_is_formed_in_float32_and_sums_to_a_peft_lora(tmp_path):
    """Factors stored in bfloat16 are formed into ``B``, ``A`` in float32, as
    PEFT's float32 parameters multiply them; ``sum --out`` writes a LoRA
    PEFT loads, with the LoHa deltas."""
    a = as_bfloat16(_loha(tiny_llama(), tmp_path / "a", seed=2))
    assert_read_in_float32_and_summed(a, tiny_llama, tmp_path / "lora")


def test_bad_loha_files_are_refused_in_one_line(tmp_path, capsys):
    """Exit 2 and one line naming the file: a module without one of its four
    factors, a rank the config does not say, LoHa on convolutions, and an
    ``alpha`` that is not a number."""

    a = _loha(tiny_llama(), tmp_path / "a", seed=3)

    def drop(ts):
        del ts[sorted(k for k in ts if k.endswith("hada_w2_b"))[0]]
        return ts

    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "drop", tensors=drop)], "adapter_model.safetensors",
                   "no hada_w2_b")  # fmt: skip
    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "rank", config=lambda c: c.update(rank_pattern={}))],
                   "adapter_model.safetensors", "v_proj has rank 2", "says 3")  # fmt: skip
    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "conv", config=lambda c: c.update(use_effective_conv2d=True))],
                   "adapter_config.json", "LoHa on convolutions")  # fmt: skip
    one_line_error(capsys, ["sum", edited_copy(a, tmp_path / "alpha", config=lambda c: c.update(alpha="5")), "--out", tmp_path / "o"],
                   "adapter_config.json", "alpha must be a finite number")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_inspect_says_how_a_loha_adapter_is_read(tmp_path, capsys):
    """``inspect`` names LoHa and its reading as LoRA of rank r^2; the ranks listed are r^2."""
    from loramix.cli import main

    a = _loha(tiny_llama(), tmp_path / "a", seed=4)
    assert main(["inspect", str(a), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["read_as"].startswith("PEFT LoHa, read as LoRA of rank r^2")
    assert sorted({m["rank"] for m in out["modules"]}) == [4, 9]
