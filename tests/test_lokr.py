"""PEFT LoKr adapters, read as LoRA (loramix/io/formats/lokr.py).

Real PEFT LoKr adapters on a tiny Llama (tests/factories.py), every factor
moved by noise as training moves them: ``W1`` whole and ``W2`` a rank-r pair
(PEFT's default), both pairs (``decompose_both``), both whole (a rank as
large as the sides), with a rank and an alpha pattern. loramix's exact
Kronecker factors must give PEFT's reload: merged into the base, on the fly,
and as the plain LoRA ``sum --out`` writes, which PEFT must load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
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
SHAPES = {
    "w1-whole": dict(r=2, alpha=3, rank_pattern={"v_proj": 1}, alpha_pattern={"down_proj": 5}),
    "both-pairs": dict(r=2, alpha=3, decompose_both=True, alpha_pattern={"down_proj": 5}),
    "both-whole": dict(r=16, alpha=3),
}


def _lokr(model, folder: Path, seed: int = 0, **kw) -> Path:
    """A PEFT LoKr adapter on ``model`` (left as it is), every factor moved by noise."""
    from peft import LoKrConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoKrConfig(target_modules=TARGETS, **kw))
    moved(pm, seed, "lokr_", size=0.1)
    pm.save_pretrained(str(folder))
    return folder


def test_kronecker_factors_are_the_kronecker_product():
    """``kron(U1, U2) kron(V1, V2) = kron(W1, W2)`` for a whole side (either
    orientation: the identity on its shorter side) and a pair, to float64
    rounding."""
    from loramix.io.formats.lokr import side_factors

    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    for W1 in (rand(3, 5), rand(5, 3)):
        U2, V2 = rand(4, 2), rand(2, 6)
        (a, b), (c, d) = side_factors(W1, None, None), side_factors(None, U2, V2)
        assert a.shape[1] == b.shape[0] == 3
        B, A = torch.kron(a, c), torch.kron(b, d)
        assert B.shape[1] == A.shape[0] == 6
        assert torch.allclose(B @ A, torch.kron(W1, U2 @ V2), rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_lokr_into_the_base_equals_peft_reload(shape, tmp_path):
    """Each module's delta, ``sum --into``, ``merge --into`` (TIES at density
    1), ``merge_into_model`` and on the fly equal PEFT's reload to 1e-6;
    the scale is ``alpha / r`` by the patterns, even where both sides are
    whole."""
    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = _lokr(model, tmp_path / "a", seed=1, **SHAPES[shape])
    ad = load_adapter(a)
    assert ad.kind == "lora"
    cfg = SHAPES[shape]
    for name, m in ad.modules.items():
        r = cfg.get("rank_pattern", {}).get(name.rsplit(".", 1)[-1], cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], cfg["alpha"])
        assert m.scale == alpha / r, name
    pm = peft_reloaded(tiny_llama, a)
    on_the_fly = logits(pm)
    deltas = peft_deltas(pm)
    assert set(deltas) == set(ad.modules)
    for name, d in deltas.items():
        assert_rel(ad.modules[name].delta(), d, msg=name)
    assert_applied_as_peft(
        pm.merge_and_unload().state_dict(), on_the_fly, a, base, tiny_llama, tmp_path / "out"
    )


def test_bfloat16_lokr_is_formed_in_float32_and_sums_to_a_peft_lora(tmp_path):
    """Factors stored in bfloat16 are formed into ``B``, ``A`` in float32, as
    PEFT's float32 parameters multiply them; ``sum --out`` writes a LoRA PEFT
    loads, with the LoKr deltas; ``inspect`` says how the adapter is read."""
    from loramix.contents import read_as

    a = as_bfloat16(_lokr(tiny_llama(), tmp_path / "a", seed=2, **SHAPES["both-pairs"]))
    assert_read_in_float32_and_summed(a, tiny_llama, tmp_path / "lora")
    assert read_as(json.loads((a / "adapter_config.json").read_text())).startswith(
        "PEFT LoKr, read as LoRA: B = kron(U1, U2)"
    )


def test_bad_lokr_files_are_refused_in_one_line(tmp_path, capsys):
    """Exit 2 and one line naming the file: a side without its pair's other
    half, a side both whole and a pair, a rank the config does not say, LoKr
    on convolutions."""

    a = _lokr(tiny_llama(), tmp_path / "a", seed=3, **SHAPES["w1-whole"])
    q = "base_model.model.model.layers.0.self_attn.q_proj"

    def drop(ts):
        del ts[f"{q}.lokr_w2_b"]
        return ts

    def both(ts):
        ts[f"{q}.lokr_w1_a"], ts[f"{q}.lokr_w1_b"] = torch.ones(4, 2), torch.ones(2, 4)
        return ts

    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "drop", tensors=drop)], "adapter_model.safetensors",
                   "q_proj needs lokr_w2 or both lokr_w2_a and lokr_w2_b, and holds lokr_w2_a")  # fmt: skip
    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "both", tensors=both)], "adapter_model.safetensors",
                   "holds lokr_w1, lokr_w1_a, lokr_w1_b")  # fmt: skip
    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "rank", config=lambda c: c.update(rank_pattern={}))],
                   "adapter_model.safetensors", "v_proj has rank 1", "says 2")  # fmt: skip
    conv = edited_copy(a, tmp_path / "conv", config=lambda c: c.update(use_effective_conv2d=True))
    one_line_error(
        capsys, ["sum", conv, "--out", tmp_path / "o"], "adapter_config.json", "LoKr on convolutions"
    )
    assert not (tmp_path / "o").exists()
