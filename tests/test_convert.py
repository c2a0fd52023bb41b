"""PEFT VeRA adapters, converted to LoRA with their base (loramix/convert.py).

Real PEFT VeRA adapters on a tiny Llama (``q_proj``, ``v_proj`` and
``down_proj``: ``down_proj``'s in-features are the widest, so the others cut
the shared ``vera_A``) and a tiny GPT-2 (``Conv1D``, ``fan_in_fan_out``),
every vector moved by noise. The LoRA ``loramix convert`` writes must load
in PEFT with PEFT's own VeRA deltas, and every loramix command must take it;
a VeRA folder is refused elsewhere, naming the conversion.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from .factories import (
    assert_rel,
    edited_copy,
    logits,
    make_peft_adapter,
    moved,
    one_line_error,
    peft_deltas,
    peft_reloaded,
    save_base,
    tiny_gpt2,
    tiny_llama,
)


def _vera(model, folder: Path, seed: int = 0, **kw) -> Path:
    """A PEFT VeRA adapter on ``model`` (left as it is), rank 4, its vectors moved by noise."""
    from peft import VeraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = moved(get_peft_model(copy.deepcopy(model), VeraConfig(r=4, **kw)), seed, "vera_lambda", 0.3)
    pm.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    "make, targets",
    [
        (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
        (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"]),
    ],
)
def test_converted_vera_is_peft_s_delta_in_peft_and_in_every_command(tmp_path, make, targets):
    from loramix.cli import main

    base = save_base(make(), tmp_path / "base")
    kw = {"fan_in_fan_out": True} if make is tiny_gpt2 else {}
    vera = _vera(make(), tmp_path / "vera", target_modules=targets, **kw)
    assert main(["convert", str(vera), "--base", str(base), "--out", str(tmp_path / "lora")]) == 0
    # PEFT reads the LoRA, with VeRA's deltas to float32's rounding
    want, got = peft_deltas(peft_reloaded(make, vera)), peft_deltas(peft_reloaded(make, tmp_path / "lora"))
    assert sorted(got) == sorted(want) and len(want) == 2 * len(targets)
    assert len({tuple(d.shape) for d in want.values()}) > 1  # in-features that differ: vera_A cut
    for name in want:
        assert_rel(got[name], want[name], 1e-6, name)
    # merged into the base by loramix, the model is PEFT's merged VeRA model
    assert main(["sum", str(tmp_path / "lora"), "--into", str(base), "--out", str(tmp_path / "merged"),
                 "--no-progress"]) == 0  # fmt: skip
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_rel(logits(merged), logits(peft_reloaded(make, vera).merge_and_unload()), 1e-5)
    rec = json.loads((tmp_path / "lora" / "loramix.json").read_text())
    assert rec["method"] == "convert" and rec["parameters"] == {"from": "vera", "rank": 4}
    from loramix.io.model_folder import BaseModelFolder
    from loramix.io.provenance import recorded_base

    assert recorded_base(tmp_path / "lora") == BaseModelFolder(base).identity()  # made for that base


def test_vera_is_refused_elsewhere_and_bad_vera_input_in_one_line(tmp_path, capsys):
    make = tiny_llama
    base = save_base(make(), tmp_path / "base")
    vera = _vera(make(), tmp_path / "vera", target_modules=["q_proj", "down_proj"])
    capsys.readouterr()  # the base's save
    for args in (["inspect", vera], ["similarity", vera, vera], ["sum", vera, "--out", tmp_path / "o"]):
        one_line_error(capsys, args, "VERA", "loramix convert")
    out = tmp_path / "out"
    # a LoRA needs no conversion
    lora = edited_copy(vera, tmp_path / "lora", config=lambda c: c.update(peft_type="LORA"))
    one_line_error(capsys, ["convert", lora, "--base", base, "--out", out], "adapter_config.json", "VeRA")
    dora = make_peft_adapter(make(), tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    one_line_error(capsys, ["convert", dora, "--base", base, "--out", out], "DoRA", "sum --into")
    # projections not saved: PEFT draws them again, loramix does not
    unsaved = edited_copy(vera, tmp_path / "unsaved", config=lambda c: c.update(save_projection=False))
    one_line_error(capsys, ["convert", unsaved, "--base", base, "--out", out], "save_projection")
    # a base whose modules the adapter does not fit: another model
    other = save_base(tiny_llama(hidden=48), tmp_path / "other")
    capsys.readouterr()
    one_line_error(capsys, ["convert", vera, "--base", other, "--out", out], "vera", "out x in")
    # the shared projections missing from the weights
    no_a = edited_copy(
        vera, tmp_path / "no_a", tensors=lambda t: {k: v for k, v in t.items() if k != "base_model.vera_A"}
    )
    one_line_error(capsys, ["convert", no_a, "--base", base, "--out", out], "base_model.vera_A")
    assert not out.exists() and not any(p.name.startswith(".lmx") for p in tmp_path.iterdir())
    # an existing output is refused unless --force
    from loramix.cli import main

    assert main(["convert", str(vera), "--base", str(base), "--out", str(out)]) == 0
    one_line_error(capsys, ["convert", vera, "--base", base, "--out", out], "--force")
    assert main(["convert", str(vera), "--base", str(base), "--out", str(out), "--force"]) == 0
