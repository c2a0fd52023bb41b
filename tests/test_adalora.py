"""PEFT AdaLoRA adapters, read as LoRA (loramix/io/formats/adalora.py).

Real PEFT AdaLoRA adapters on tiny real models (tests/factories.py), their
factors and singular values moved as training moves them, and with a rank
pattern as PEFT's allocator leaves one (some ranks pruned, one module
pruned to rank 0). loramix must agree with PEFT's reload of the saved
adapter: merged into the base, on the fly, and as the plain LoRA its
``sum --out`` writes, which PEFT must load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from .factories import (
    as_bfloat16,
    assert_applied_as_peft,
    assert_read_in_float32_and_summed,
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

LLAMA = ["q_proj", "v_proj", "down_proj"]
INIT_R = 6


def _adalora(model, folder: Path, seed: int = 0, masks: bool = True, **kw) -> Path:
    """A PEFT AdaLoRA adapter on ``model`` (left as it is), every factor and
    singular value moved by noise; with ``masks``, the config's
    ``rank_pattern`` as the allocator writes it: module ``i`` keeps the ranks
    ``j`` with ``(i + j) % 3 != 0``, module 1 none (rank 0)."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = dict(init_r=INIT_R, target_r=3, lora_alpha=10, total_step=20, target_modules=LLAMA)
    cfg.update(kw)
    pm = get_peft_model(copy.deepcopy(model), AdaLoraConfig(**cfg))
    moved(pm, seed, "lora_")
    if masks:
        names = sorted(n.removeprefix("base_model.model.").replace(".default", "")
                       for n, _ in pm.named_parameters() if ".lora_E." in n)  # fmt: skip
        pm.peft_config["default"].rank_pattern = {
            n: [i != 1 and (i + j) % 3 != 0 for j in range(cfg["init_r"])] for i, n in enumerate(names)
        }
    pm.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    "masks,alpha", [(True, 10), (True, 0), (False, 10)], ids=["pruned", "pruned-alpha0", "unpruned"]
)
def test_adalora_into_the_base_equals_peft_reload(masks, alpha, tmp_path):
    """``sum --into``, ``merge --into`` (TIES at density 1: the adapter
    itself), ``merge_into_model`` and ``attach_adapters`` (on the fly) equal
    PEFT's reload, to 1e-6 of the weights: pruned ranks and a rank-0 module
    (left out: its delta is zero), and ``lora_alpha = 0`` (PEFT scales by
    the kept ``r`` then, where a LoRA of alpha 0 does nothing). Before this reader
    the config was refused (its ``rank_pattern`` of lists)."""

    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = _adalora(model, tmp_path / "a", seed=1, masks=masks, lora_alpha=alpha)
    ad = load_adapter(a)
    assert ad.kind == "lora"
    wrapped = 3 * model.config.num_hidden_layers
    assert len(ad.modules) == (wrapped - 1 if masks else wrapped)
    ranks = {m.rank for m in ad.modules.values()}
    assert ranks == ({4} if masks else {INIT_R})
    pm = peft_reloaded(tiny_llama, a)
    on_the_fly = logits(pm)
    for name, d in peft_deltas(pm).items():
        if name in ad.modules:
            assert_rel(ad.modules[name].delta(), d, msg=name)
        else:
            assert masks and float(d.abs().max()) == 0.0, name
    ref = pm.merge_and_unload().state_dict()

    assert_applied_as_peft(ref, on_the_fly, a, base, tiny_llama, tmp_path / "out")


def test_adalora_on_gpt2_conv1d_equals_peft(tmp_path):
    """GPT-2's ``Conv1D`` (``fan_in_fan_out``, which PEFT's AdaLoRA sets for
    it): every way loramix applies it equals PEFT's reload."""
    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    a = _adalora(model, tmp_path / "a", seed=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert json.loads((a / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft_reloaded(tiny_gpt2, a)
    on_the_fly = logits(pm)
    assert_applied_as_peft(
        pm.merge_and_unload().state_dict(), on_the_fly, a, base, tiny_gpt2, tmp_path / "out"
    )


def test_bfloat16_adalora_is_scaled_in_float32_as_peft(tmp_path):
    """Factors stored in bfloat16: PEFT loads them into float32 parameters and
    forms ``A * E`` there; loramix too, so the deltas agree to 1e-6 (``A * E``
    rounded to bfloat16 would be off by about 4e-3); ``sum --out`` writes
    them as a LoRA PEFT loads."""
    a = as_bfloat16(_adalora(tiny_llama(), tmp_path / "a", seed=3))
    assert_read_in_float32_and_summed(a, tiny_llama, tmp_path / "lora")


def test_summed_adalora_is_a_peft_lora_and_composes(tmp_path):
    """``sum --out`` of an AdaLoRA adapter and a LoRA writes one PEFT LoRA
    that PEFT loads, with the deltas of both (AdaLoRA's as PEFT reloads it);
    the similarity of the AdaLoRA adapter beside the LoRA (the numpy reader
    hands it to the torch readers) is that of its written LoRA form."""
    from peft import PeftModel

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.overlap import similarity

    model = tiny_llama()
    a = _adalora(model, tmp_path / "a", seed=4)
    lo = make_peft_adapter(model, tmp_path / "lo", seed=5, target_modules=["q_proj", "o_proj"])
    assert main(["sum", str(a), "--out", str(tmp_path / "alone"), "--no-progress"]) == 0
    assert main(["sum", str(a), str(lo), "--out", str(tmp_path / "both"), "--no-progress"]) == 0
    ada = peft_deltas(peft_reloaded(tiny_llama, a))
    lora = peft_deltas(PeftModel.from_pretrained(tiny_llama(), str(lo)))
    summed = peft_deltas(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "both")))
    for name in set(ada) | set(lora):
        want = sum(d[name] for d in (ada, lora) if name in d)
        if float(want.abs().max()) > 0:  # a module pruned to rank 0 is left out
            assert_rel(summed[name], want, msg=name)
    alone = load_adapter(tmp_path / "alone")
    got = similarity([str(a), str(lo)], progress=False, per_module=True)
    want = similarity([alone, load_adapter(lo)], progress=False, per_module=True)
    assert float(got.rms.iloc[0, 1]) == pytest.approx(float(want.rms.iloc[0, 1]), rel=1e-6)
    assert got.norms.to_numpy() == pytest.approx(want.norms.to_numpy(), rel=1e-6, nan_ok=True)


def test_bad_adalora_files_are_refused_in_one_line(tmp_path, capsys):
    """Exit 2 and one line naming the file and the problem: a mask of the
    wrong length, a mask whose kept count is not the tensors' rank, a
    ``rank_pattern`` of numbers (LoRA's form), an adapter pruned to nothing,
    a module without its ``lora_E``."""
    model = tiny_llama()
    a = _adalora(model, tmp_path / "a", seed=6)
    masks = json.loads((a / "adapter_config.json").read_text())["rank_pattern"]
    first = sorted(masks)[0]

    def cut(d):
        d["rank_pattern"][first] = d["rank_pattern"][first][:-1]

    bad = edited_copy(a, tmp_path / "short", config=cut)
    one_line_error(
        capsys, ["inspect", bad], "adapter_config.json", first.removesuffix(".lora_E"), "init_r is 6"
    )

    def flip(d):
        d["rank_pattern"][first] = [True] * INIT_R

    bad = edited_copy(a, tmp_path / "flip", config=flip)
    one_line_error(capsys, ["inspect", bad], "adapter_model.safetensors", "init_r / rank_pattern")

    def numbers(d):
        d["rank_pattern"] = {k: 3 for k in d["rank_pattern"]}

    bad = edited_copy(a, tmp_path / "numbers", config=numbers)
    one_line_error(capsys, ["inspect", bad], "adapter_config.json", "rank_pattern must be", "AdaLoRA")

    def nothing(d):
        d["rank_pattern"] = {k: [False] * INIT_R for k in d["rank_pattern"]}

    def emptied(ts):
        return {k: t[:0] if k.endswith(("lora_A", "lora_E")) else t[:, :0] for k, t in ts.items()}

    empty = edited_copy(a, tmp_path / "empty", tensors=emptied, config=nothing)
    one_line_error(capsys, ["sum", empty, "--out", tmp_path / "o"], "adapter_model.safetensors", "rank 0")
    assert not (tmp_path / "o").exists()

    def no_e(ts):
        del ts[sorted(k for k in ts if k.endswith("lora_E"))[0]]
        return ts

    one_line_error(capsys, ["inspect", edited_copy(a, tmp_path / "no_e", tensors=no_e)],
                   "adapter_model.safetensors", "no lora_E")  # fmt: skip


def test_inspect_says_how_an_adalora_adapter_is_read(tmp_path, capsys):
    """``inspect`` names the format and how it is read (``read_as``, text and
    JSON); a plain LoRA has neither line nor key."""
    from loramix.cli import main

    model = tiny_llama()
    a = _adalora(model, tmp_path / "a", seed=7)
    lo = make_peft_adapter(model, tmp_path / "lo", seed=8)
    assert main(["inspect", str(a)]) == 0
    text = capsys.readouterr().out
    assert "format:     PEFT AdaLoRA, read as LoRA: A is lora_A * lora_E" in text
    assert main(["inspect", str(a), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["read_as"].startswith("PEFT AdaLoRA, read as LoRA")
    assert main(["inspect", str(lo)]) == 0
    assert "format:" not in capsys.readouterr().out
    assert main(["inspect", str(lo), "--format", "json"]) == 0
    assert "read_as" not in json.loads(capsys.readouterr().out)
