"""What the format readers accept and refuse beyond plain PEFT LoRA (issue 13):
foreign formats named in one line, LoRA on ``lm_head``, bare-model adapters
merged into a model with a head, ``modules_to_save``. PEFT and transformers
are the oracles; the models are tiny real ones built from configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .factories import make_peft_adapter, save_base, tiny_gpt2, tiny_llama
from .test_cli_errors import run_error

# ---------------------------------------------------------------- 8: foreign formats named


def test_kohya_lora_is_named(tmp_path, capsys):
    t = torch.zeros(4, 8)
    f = tmp_path / "style.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t.T.contiguous(),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(f),
    )
    run_error(capsys, ["inspect", str(f)], str(f), "kohya-ss LoRA", "not supported")
    # the same file in a folder
    d = tmp_path / "kohya"
    d.mkdir()
    shutil.copy(f, d / "style.safetensors")
    run_error(capsys, ["inspect", str(d)], "kohya-ss LoRA", "not supported")


def test_lycoris_in_its_own_layout_is_named(tmp_path, capsys):
    """A LyCORIS LoHa file names its modules as kohya's do (``lora_unet_...``)
    but is LyCORIS's: said so, with PEFT's layout as what loramix reads (it was
    called a kohya-ss LoRA)."""
    f = tmp_path / "lycoris.safetensors"
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{m}.{p}": torch.zeros(4, 4) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
              | {f"{m}.alpha": torch.tensor(4.0)}, str(f))  # fmt: skip
    said = run_error(capsys, ["inspect", str(f)], str(f), "a LyCORIS adapter", "peft_type LOHA or LOKR")
    assert "kohya" not in said


def test_diffusers_lora_is_named(tmp_path, capsys):
    d = tmp_path / "diffusers"
    d.mkdir()
    save_file(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(
                4, 8
            ),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(
                8, 4
            ),
        },
        str(d / "pytorch_lora_weights.safetensors"),
    )
    run_error(capsys, ["inspect", str(d)], "diffusers LoRA", "not supported")
    run_error(capsys, ["similarity", str(d), str(d)], "diffusers LoRA")


def test_pickled_peft_adapter_is_named(tmp_path, capsys):
    src = make_peft_adapter(tiny_gpt2(), tmp_path / "src", r=2)
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(src / "adapter_config.json", d / "adapter_config.json")
    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32)},
               d / "adapter_model.bin")  # fmt: skip
    line = run_error(capsys, ["inspect", str(d)], "pickled PEFT adapter", "adapter_model.bin")
    assert "no adapter_config.json" not in line
    # one clear line: the file, the problem, what to do (it read "...: not supported, loramix never
    # unpickles (it can run code): save it as safetensors; loramix reads PEFT LoRA folders ...")
    fix = (
        "which loramix never loads (unpickling can run code): re-save it as safetensors with PEFT "
        "(PeftModel.from_pretrained(base, DIR).save_pretrained(DIR, safe_serialization=True) writes "
        "adapter_model.safetensors)"
    )
    assert line == f"loramix: error: {d}: holds adapter_model.bin, a pickled PEFT adapter, {fix}", line
    # every command, and the PEFT layout's own check, say the same line
    assert run_error(capsys, ["similarity", str(d), str(src)]) == line
    assert (
        run_error(capsys, ["merge", str(src), str(d), "--method", "ties", "--out", str(tmp_path / "m")])
        == line
    )
    assert not (tmp_path / "m").exists()
    from loramix.errors import AdapterError
    from loramix.io.peft_layout import resolve_adapter_paths

    with pytest.raises(AdapterError) as e:
        resolve_adapter_paths(d)
    assert f"loramix: error: {e.value}" == line
    f = d / "adapter_model.bin"
    assert run_error(capsys, ["inspect", str(f)]) == f"loramix: error: {f}: is a pickled PEFT adapter, {fix}"


def test_peft_file_without_config_still_says_so(tmp_path, capsys):
    """A PEFT safetensors file alone is not a foreign format: the message stays about the config."""
    src = make_peft_adapter(tiny_gpt2(), tmp_path / "src", r=2)
    f = tmp_path / "alone.safetensors"
    shutil.copy(src / "adapter_model.safetensors", f)
    run_error(capsys, ["inspect", str(f)], "adapter_config.json")


# ---------------------------------------------------------------- helpers


def peft_merged(make_model, *adapters):
    """PEFT's own merge of ``adapters`` (each once, weight 1) into a fresh model."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(make_model(), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    if len(adapters) > 1:
        pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return pm.merge_and_unload().eval()


def logits(model, vocab=128):
    ids = torch.arange(16).remainder(vocab).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def load_merged(folder, cls):
    return cls.from_pretrained(str(folder)).eval()


# ---------------------------------------------------------------- 1: LoRA on lm_head


def test_untied_lm_head_lora_is_a_linear_module(tmp_path, capsys):
    """PEFT saves ``lm_head.base_layer.weight`` beside the factors; loramix
    reads the factors, and its sum into the base equals PEFT's merge."""
    from transformers import LlamaForCausalLM

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    ad = make_peft_adapter(model, tmp_path / "head", target_modules=["q_proj", "lm_head"], r=3, lora_alpha=5)
    a = load_adapter(ad)
    assert "lm_head" in a.modules and a.modules["lm_head"].shape == (128, 32)
    capsys.readouterr()
    assert main(["inspect", str(ad)]) == 0
    # the copy is listed (so the file's size is explained), with its shape, and said to be unread
    out = capsys.readouterr().out
    assert "PEFT's copy of the base's lm_head.weight (128x32 F32, 4,096 parameters" in out, out
    assert "not read" in out
    assert main(["inspect", str(ad), "--format", "json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["base_copies"] == [
        {"tensor": "lm_head.weight", "shape": [128, 32], "dtype": "F32", "params": 4096}
    ]
    assert main(["sum", str(ad), "--into", str(base), "--out", str(tmp_path / "merged")]) == 0
    ours = logits(load_merged(tmp_path / "merged", LlamaForCausalLM))
    ref = logits(peft_merged(tiny_llama, ad))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_tied_lm_head_lora_is_refused_naming_the_tie(tmp_path, capsys):
    model = tiny_gpt2()  # GPT-2 ties lm_head to transformer.wte
    base = save_base(model, tmp_path / "base")
    ad = make_peft_adapter(model, tmp_path / "head", target_modules=["c_attn", "lm_head"])
    run_error(capsys, ["sum", str(ad), "--into", str(base), "--out", str(tmp_path / "m")],
              "lm_head", "tied to", "wte")  # fmt: skip


# ---------------------------------------------------------------- 5: bare-model adapter into a model with a head


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=64)  # fmt: skip


def test_bare_model_adapter_into_a_model_with_a_head(tmp_path, capfd, monkeypatch):
    """An adapter trained on ``BertModel`` (modules ``encoder.layer...``) merged
    into ``BertForMaskedLM`` (tensors ``bert.encoder.layer...``): the prefix
    comes from the base's tensor names; equal to PEFT applied to ``.bert``;
    nothing but loramix's own lines on stderr."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForMaskedLM

    from loramix.cli import main

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))  # the skeleton is built here
    torch.manual_seed(0)
    mlm = BertForMaskedLM(_tiny_bert_config()).eval()
    base = save_base(mlm, tmp_path / "base")
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], init_lora_weights=False)
    get_peft_model(BertForMaskedLM.from_pretrained(str(base)).bert, cfg).save_pretrained(str(tmp_path / "ad"))
    capfd.readouterr()
    rc = main(["sum", str(tmp_path / "ad"), "--into", str(base), "--out", str(tmp_path / "merged")])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "is_decoder" not in err and "warn" not in err.lower(), err

    ref = BertForMaskedLM.from_pretrained(str(base)).eval()
    ref.bert = PeftModel.from_pretrained(ref.bert, str(tmp_path / "ad")).merge_and_unload()
    ours = BertForMaskedLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(ours), logits(ref.eval()), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- 4: modules_to_save


def test_modules_to_save_copied_into_the_base(tmp_path, capsys):
    """One adapter carries a trained ``lm_head`` and norms (full copies): the
    merge writes them in place of the base's, equal to PEFT's merge of both
    adapters; a second adapter carrying a different copy is refused, naming it."""
    from transformers import LlamaForCausalLM

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = make_peft_adapter(
        model, tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]
    )
    # PEFT saves the module as it was wrapped: give the copies a trained value
    from safetensors.torch import load_file

    ts = load_file(str(a / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for k in ts:
        if "lora_" not in k:
            ts[k] = ts[k] + 0.1 * torch.randn(ts[k].shape, generator=g)
    save_file(ts, str(a / "adapter_model.safetensors"))
    b = make_peft_adapter(model, tmp_path / "b", seed=2, target_modules=["v_proj"])
    ad = load_adapter(a)
    assert set(ad.saved) >= {"lm_head.weight", "model.norm.weight"} and list(ad.modules) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # fmt: skip
    assert main(["sum", str(a), str(b), "--into", str(base), "--out", str(tmp_path / "m")]) == 0
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(ours.lm_head.weight, ts["base_model.model.lm_head.weight"])
    torch.testing.assert_close(logits(ours), logits(peft_merged(tiny_llama, a, b)), rtol=0, atol=1e-4)

    # the adapter output carries the copies; PEFT loads it and gives the same model
    assert main(["sum", str(a), str(b), "--out", str(tmp_path / "ad")]) == 0
    torch.testing.assert_close(
        logits(peft_merged(tiny_llama, tmp_path / "ad")), logits(ours), rtol=0, atol=1e-4
    )

    # two different copies of one module: refused, naming it
    c = Path(shutil.copytree(a, tmp_path / "c"))
    ts["base_model.model.lm_head.weight"] = ts["base_model.model.lm_head.weight"] + 1
    save_file(ts, str(c / "adapter_model.safetensors"))
    run_error(capsys, ["sum", str(a), str(c), "--into", str(base), "--out", str(tmp_path / "x")],
              "modules_to_save", "lm_head.weight")  # fmt: skip
    # an identical copy is fine
    d = Path(shutil.copytree(a, tmp_path / "d"))
    assert main(["sum", str(a), str(d), "--into", str(base), "--out", str(tmp_path / "y")]) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_modules_to_save_in_memory_equals_peft(tmp_path, tied):
    """On the fly (``attach_adapters``, what ``eval`` runs) and merged in memory,
    an adapter's trained ``lm_head`` copy is used as PEFT uses it: the logits
    equal PEFT's; a head tied to the input embedding is untied (PEFT's copy is
    its own), and ``detach`` / ``restore_weights`` put the tied base back."""
    from peft import PeftModel

    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters, detach, merge_into_model, restore_weights

    def make():
        m = tiny_llama()
        if tied:
            m.config.tie_word_embeddings = True
            m.lm_head.weight = m.model.embed_tokens.weight
        return m

    a = make_peft_adapter(
        make(), tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    from safetensors.torch import load_file

    ts = load_file(str(a / "adapter_model.safetensors"))
    ts["base_model.model.lm_head.weight"] = ts["base_model.model.lm_head.weight"] + 0.5
    save_file(ts, str(a / "adapter_model.safetensors"))
    ref = PeftModel.from_pretrained(make(), str(a)).eval()
    ad = load_adapter(a)
    model = make()
    base_logits = logits(model)
    attach_adapters(model, ad)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-5)
    assert not torch.equal(logits(model), base_logits)
    detach(model)
    torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    originals = merge_into_model(model, ad, keep_original=True)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-5)
    restore_weights(model, originals)
    torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_a_weight_does_not_scale_a_saved_copy_and_says_so(tmp_path, capfd):
    """A weight other than 1 on an adapter carrying ``modules_to_save`` copies:
    the copy is still put in whole (the merge is computed), and one warning
    line names the adapter, its weight and the copies; none at weight 1, and
    none for a weighted adapter without copies. The library warns too."""
    import warnings

    from transformers import LlamaForCausalLM

    from loramix.cli import main
    from loramix.errors import LoramixWarning
    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = make_peft_adapter(
        model, tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    b = make_peft_adapter(model, tmp_path / "b", seed=2, target_modules=["v_proj"])
    capfd.readouterr()
    assert (
        main(["sum", str(a), str(b), "--weights", "0.5,1", "--into", str(base), "--out", str(tmp_path / "m")])
        == 0
    )
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert lines == [
        f"loramix: warning: modules_to_save copies are full tensors and are put in whole, not scaled by their "
        f"adapter's weight: {a} (weight 0.5: lm_head.weight)"
    ], err
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    torch.testing.assert_close(ours.lm_head.weight, load_adapter(a).saved["lm_head.weight"])
    for weights in ("1,1", "1,0.5"):
        assert main(["sum", str(a), str(b), "--weights", weights, "--into", str(base), "--out",
                     str(tmp_path / f"m{weights}")]) == 0  # fmt: skip
        assert "warning" not in capfd.readouterr().err
    with pytest.warns(LoramixWarning, match=r"weight -1: lm_head\.weight"):
        attach_adapters(tiny_llama(), [load_adapter(a)], [-1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoramixWarning)
        attach_adapters(tiny_llama(), [load_adapter(a)], [1.0])


@pytest.mark.parametrize("method", ["sum", "svd"])
def test_lora_and_a_saved_copy_of_one_module_refused_for_an_adapter_output(tmp_path, capsys, method):
    """One input adapts ``lm_head`` by LoRA, another carries a full copy of it:
    refused for an adapter output as for ``--into`` (PEFT would load the
    written adapter with only the copy, dropping the LoRA delta silently)."""
    model = tiny_llama()
    a = make_peft_adapter(model, tmp_path / "a", seed=1, target_modules=["q_proj", "lm_head"])
    m = make_peft_adapter(
        model, tmp_path / "m", seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    extra = ["--rank", "2"] if method == "svd" else []
    run_error(capsys, ["merge", "-m", method, *extra, str(m), str(a), "--out", str(tmp_path / "o")],
              str(a), "module lm_head is LoRA here and a modules_to_save copy")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_modules_to_save_without_its_copy_is_refused(tmp_path, capsys):
    """A config listing ``modules_to_save`` whose tensors the file lacks: PEFT
    cannot load it (a missing key); loramix refuses it in one line naming the
    entry and the tensor, for a merge into the base and for ``eval``, instead
    of merging as if the entry were not there."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from .test_eval import _make_base

    base = _make_base(tmp_path / "base", "llama")
    model = LlamaForCausalLM.from_pretrained(str(base))
    a = make_peft_adapter(
        model, tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    ts = {k: v for k, v in load_file(str(a / "adapter_model.safetensors")).items() if "lm_head" not in k}
    save_file(ts, str(a / "adapter_model.safetensors"))
    with pytest.raises(KeyError):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(a))
    why = ("modules_to_save lists 'lm_head'", "no copy of lm_head.weight")
    run_error(capsys, ["sum", str(a), "--into", str(base), "--out", str(tmp_path / "m")], str(a), *why)
    assert not (tmp_path / "m").exists()
    run_error(
        capsys, ["eval", "--base", str(base), "--adapter", str(a), "--data", "synthetic:arith?n=8"], *why
    )


# ---------------------------------------------------------------- 2: embedding LoRA


def test_embedding_lora_equals_peft(tmp_path, capsys):
    """``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r): the delta
    ``s (B A)^T`` equals PEFT's ``get_delta_weight``; summed with a second
    adapter into the base it equals PEFT's merge; the adapter output round-trips
    through PEFT; ties on it equals the dense reference."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.methods import merge
    from loramix.overlap import similarity

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    a = make_peft_adapter(
        model, tmp_path / "a", seed=1, target_modules=["embed_tokens", "q_proj"], r=3, lora_alpha=5
    )
    b = make_peft_adapter(model, tmp_path / "b", seed=2, target_modules=["embed_tokens", "v_proj"], r=2)
    ad = load_adapter(a)
    md = ad.modules["model.embed_tokens"]
    pm = PeftModel.from_pretrained(tiny_llama(), str(a))
    ref_delta = pm.base_model.model.model.embed_tokens.get_delta_weight("default").double()
    torch.testing.assert_close(md.residual(), ref_delta, rtol=0, atol=1e-5)
    assert main(["inspect", str(a)]) == 0
    sim = similarity([ad, load_adapter(b)], progress=False)
    assert sim.rms.shape == (2, 2)

    assert main(["sum", str(a), str(b), "--into", str(base), "--out", str(tmp_path / "m")]) == 0
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(logits(ours), logits(peft_merged(tiny_llama, a, b)), rtol=0, atol=1e-4)

    assert main(["sum", str(a), str(b), "--out", str(tmp_path / "ad")]) == 0
    torch.testing.assert_close(
        logits(peft_merged(tiny_llama, tmp_path / "ad")), logits(ours), rtol=0, atol=1e-4
    )

    res = merge([str(a), str(b)], "ties", into=str(base), out=tmp_path / "t", density=0.5)
    assert res.kind == "model"
    from loramix.methods.base import trim_

    da, db = (load_adapter(p).modules["model.embed_tokens"].residual() for p in (a, b))
    ta, tb = trim_(da.clone(), 0.5), trim_(db.clone(), 0.5)
    g = torch.where(ta + tb >= 0, 1.0, -1.0).double()
    keep_a, keep_b = (ta * g > 0).double(), (tb * g > 0).double()
    ref = (ta * keep_a + tb * keep_b) / (keep_a + keep_b).clamp(min=1)
    got = LlamaForCausalLM.from_pretrained(str(tmp_path / "t")).model.embed_tokens.weight.double()
    torch.testing.assert_close(got - model.model.embed_tokens.weight.double(), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 3: DoRA


def _dora_ref(base_model, folder, module, conv1d=False):
    """``m / ||W0 + s B A||_row * (W0 + s B A) - W0`` from the raw tensors, float64,
    ``(out, in)`` (a ``Conv1D``'s stored weight transposed)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    ts = {k: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    key = f"base_model.model.{module}"
    W0 = base_model.get_submodule(module).weight.detach().double()
    W0 = W0.T if conv1d else W0
    V = W0 + cfg["lora_alpha"] / cfg["r"] * ts[f"{key}.lora_B.weight"] @ ts[f"{key}.lora_A.weight"]
    return (ts[f"{key}.lora_magnitude_vector"] / V.norm(dim=1))[:, None] * V - W0


def test_dora_into_the_base_equals_peft_and_composes_by_effective_deltas(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.overlap import similarity

    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    a = make_peft_adapter(
        model, tmp_path / "a", seed=1, target_modules=targets, use_dora=True, r=3, lora_alpha=6
    )
    b = make_peft_adapter(model, tmp_path / "b", seed=2, target_modules=["q_proj"], use_dora=True, r=2)
    # PEFT saves the magnitude as ||W0||_row (its init): make it trained
    from safetensors.torch import load_file

    ts = load_file(str(a / "adapter_model.safetensors"))
    for k in ts:
        if k.endswith("lora_magnitude_vector"):
            ts[k] = ts[k] * (1 + 0.3 * torch.rand(ts[k].shape, generator=torch.Generator().manual_seed(3)))
    save_file(ts, str(a / "adapter_model.safetensors"))
    ad = load_adapter(a)
    assert ad.kind == "dora" and ad.kind.needs_base
    assert main(["inspect", str(a)]) == 0

    # one adapter: PEFT's merge_and_unload
    assert main(["sum", str(a), "--into", str(base), "--out", str(tmp_path / "m1")]) == 0
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "m1")).eval()
    torch.testing.assert_close(logits(ours), logits(peft_merged(tiny_llama, a)), rtol=0, atol=1e-4)

    # several: W0 + sum_i w_i (W_hat_i - W0), each against the same W0 (docs/adapters.md)
    assert (
        main(
            ["sum", str(a), str(b), "--weights", "1,0.5", "--into", str(base), "--out", str(tmp_path / "m2")]
        )
        == 0
    )
    got = LlamaForCausalLM.from_pretrained(str(tmp_path / "m2")).eval()
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ref = _dora_ref(model, a, mod) + (0.5 * _dora_ref(model, b, mod) if "q_proj" in mod else 0)
        d = got.get_submodule(mod).weight.double() - model.get_submodule(mod).weight.double()
        torch.testing.assert_close(d, ref, rtol=0, atol=1e-6)

    # similarity on the effective deltas given the base
    sim = similarity([ad, load_adapter(b)], base=base, progress=False)
    assert sim.rms.shape == (2, 2)
    # an adapter output of a DoRA merge is refused with the reason
    run_error(capsys, ["sum", str(a), str(b), "--out", str(tmp_path / "x")], "DoRA", "depends on the base")
    run_error(capsys, ["merge", "-m", "ties", "--density", "0.5", "--out-rank", "2", str(a), "--out", str(tmp_path / "y")],
              "DoRA", "depends on the base")  # fmt: skip


def _train_magnitudes(folder: Path, seed: int) -> Path:
    """PEFT saves the magnitude as its init ``||W0 + s B A||_row``, where DoRA is
    plain LoRA: move it, as training would."""
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    ts = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    for k in sorted(ts):
        if k.endswith("lora_magnitude_vector"):
            ts[k] = ts[k] * (1 + 0.3 * torch.rand(ts[k].shape, generator=g))
    save_file(ts, str(f))
    return folder


def test_dora_on_gpt2_conv1d_equals_peft(tmp_path, capsys):
    """GPT-2's ``Conv1D`` stores ``W0^T`` (``fan_in_fan_out``); DoRA's magnitude
    is per output feature all the same (the rows of ``W0``, the columns of the
    stored tensor), on the square ``attn.c_proj`` too. Into the base
    (``sum --into``) equals PEFT's ``merge_and_unload``; on the fly
    (``attach_adapters``) PEFT's forward; two weighted adapters compose by
    their effective deltas, streamed, in memory and on the fly alike;
    similarity given the base uses those effective deltas."""
    import math

    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters, merge_into_model
    from loramix.overlap import similarity

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    a = make_peft_adapter(model, tmp_path / "a", seed=1, use_dora=True, r=3, lora_alpha=6)
    b = make_peft_adapter(
        model, tmp_path / "b", seed=2, use_dora=True, r=2, target_modules=["c_attn", "c_proj"]
    )
    _train_magnitudes(a, 3), _train_magnitudes(b, 4)
    ad, bd = load_adapter(a), load_adapter(b)
    assert ad.kind == "dora" and ad.config["fan_in_fan_out"] is True
    square = "transformer.h.0.attn.c_proj"
    assert ad.modules[square].shape == (32, 32) and ad.modules["transformer.h.0.mlp.c_fc"].shape == (128, 32)

    pm = PeftModel.from_pretrained(tiny_gpt2(), str(a)).eval()
    torch.testing.assert_close(logits(attach_adapters(tiny_gpt2(), [ad])), logits(pm), rtol=0, atol=1e-6)
    ref = pm.merge_and_unload()
    assert main(["sum", str(a), "--into", str(base), "--out", str(tmp_path / "m1")]) == 0
    ours = load_merged(tmp_path / "m1", GPT2LMHeadModel)
    for n, p in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[n], p, rtol=0, atol=1e-6, msg=n)

    w = [0.7, -0.4]
    assert (
        main(
            [
                "sum",
                str(a),
                str(b),
                "--weights",
                "0.7,-0.4",
                "--into",
                str(base),
                "--out",
                str(tmp_path / "m2"),
            ]
        )
        == 0
    )
    streamed = load_merged(tmp_path / "m2", GPT2LMHeadModel)
    in_memory = tiny_gpt2()
    merge_into_model(in_memory, [ad, bd], w)
    mods = [n for n in ad.modules if n in bd.modules]
    for mod in ad.modules:
        d_ref = w[0] * _dora_ref(model, a, mod, conv1d=True)
        if mod in bd.modules:
            d_ref = d_ref + w[1] * _dora_ref(model, b, mod, conv1d=True)
        W0 = model.get_submodule(mod).weight.double()
        for got in (streamed, in_memory):
            d = (got.get_submodule(mod).weight.double() - W0).T
            torch.testing.assert_close(d, d_ref, rtol=0, atol=1e-6, msg=mod)
    torch.testing.assert_close(
        logits(attach_adapters(tiny_gpt2(), [ad, bd], w)), logits(in_memory), rtol=0, atol=1e-5
    )

    sim = similarity([ad, bd], base=base, progress=False)
    cos = []
    for mod in mods:
        x, y = _dora_ref(model, a, mod, conv1d=True), _dora_ref(model, b, mod, conv1d=True)
        cos.append(float((x * y).sum() / (x.norm() * y.norm())))
    assert float(sim.rms.iloc[0, 1]) == pytest.approx(math.sqrt(sum(c * c for c in cos) / len(cos)), rel=1e-6)


@pytest.mark.parametrize("arch", ["bloom", "gpt-neox", "falcon", "gpt-bigcode"])
def test_bare_model_adapter_into_causal_lm(arch, tmp_path, capfd, monkeypatch):
    """The same for causal LMs whose prefix is not ``model.`` (``transformer``,
    ``gpt_neox``): an adapter made on the bare model merges into the LM with its head."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loramix.cli import main

    from .test_conformance import ARCHS, _build, _load, _logits

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))
    lm, base, targets = _build(arch, tmp_path)
    bare = getattr(lm, lm.base_model_prefix)
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    get_peft_model(bare, cfg).save_pretrained(str(tmp_path / "ad"))
    capfd.readouterr()
    assert (
        main(
            ["sum", str(tmp_path / "ad"), "--into", str(base), "--out", str(tmp_path / "m"), "--no-progress"]
        )
        == 0
    )
    assert capfd.readouterr().err == ""
    cls = ARCHS[arch][2]
    ref = _load(cls, base)
    setattr(
        ref,
        ref.base_model_prefix,
        PeftModel.from_pretrained(
            getattr(ref, ref.base_model_prefix), str(tmp_path / "ad")
        ).merge_and_unload(),
    )
    torch.testing.assert_close(_logits(_load(cls, tmp_path / "m")), _logits(ref.eval()), rtol=0, atol=2e-4)


def test_tied_lm_head_refused_when_the_checkpoint_stores_both(tmp_path, capsys):
    """Some checkpoints store the tied head too: the tie still decides (transformers re-ties on load)."""
    from safetensors.torch import load_file

    model = tiny_gpt2()
    base = save_base(model, tmp_path / "base")
    ts = load_file(str(base / "model.safetensors"))
    ts["lm_head.weight"] = ts["transformer.wte.weight"].clone()
    save_file(ts, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = make_peft_adapter(model, tmp_path / "head", target_modules=["c_attn", "lm_head"])
    run_error(capsys, ["sum", str(ad), "--into", str(base), "--out", str(tmp_path / "m")],
              "lm_head.weight", "tied to", "wte")  # fmt: skip


def test_the_torch_free_path_check_refuses_as_the_readers_do(tmp_path):
    """``check_adapter_path`` (run before a command imports torch) raises, for
    every path without a readable config and weights, the one line that
    ``load_adapter`` (the torch readers) raises for it."""
    from loramix.errors import AdapterError
    from loramix.io.adapter_files import load_adapter
    from loramix.io.peft_layout import check_adapter_path

    good = make_peft_adapter(tiny_gpt2(), tmp_path / "good", r=2)
    kohya = tmp_path / "style.safetensors"
    save_file({"lora_unet_x_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(kohya))
    bin_only, bad_json, no_weights = (tmp_path / n for n in ("bin_only", "bad_json", "no_weights"))
    for d in (bin_only, bad_json, no_weights):
        d.mkdir()
    shutil.copy(good / "adapter_config.json", bin_only / "adapter_config.json")
    (bin_only / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
    shutil.copy(good / "adapter_model.safetensors", bad_json / "adapter_model.safetensors")
    (bad_json / "adapter_config.json").write_text("{not json")
    shutil.copy(good / "adapter_config.json", no_weights / "adapter_config.json")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    bad = [tmp_path / "missing", tmp_path / "empty", kohya, bin_only, bad_json, no_weights, tmp_path / "notes.txt",
           good / "adapter_model.safetensors.missing"]  # fmt: skip
    for path in bad:
        with pytest.raises(AdapterError) as read:
            load_adapter(path)
        with pytest.raises(AdapterError) as checked:
            check_adapter_path(path)
        assert str(checked.value) == str(read.value), path
    check_adapter_path(good)  # a readable one passes


_FLAT_FORMAT = '''
import json
from pathlib import Path

from safetensors.torch import load_file

from loramix.adapter import Adapter, ModuleDelta
from loramix.io.filehash import cached_file_sha256
from loramix.kinds import LORA


class FlatFormat:
    """``lora.json`` {"alpha": a} and ``lora.safetensors`` with ``<module>.A``
    (r, in) and ``<module>.B`` (out, r): ``dW = (a / r) B A``."""

    name = "test-flat"
    kind = LORA
    files = ("lora.json",)  # what marks its folders: the torch-free checks read it from this file

    def detect(self, path):
        return (Path(path) / "lora.json").is_file()

    def read(self, path, name=None):
        path = Path(path)
        alpha = float(json.loads((path / "lora.json").read_text())["alpha"])
        t = load_file(str(path / "lora.safetensors"))
        mods = {k[:-2]: ModuleDelta(name=k[:-2], B=t[k[:-2] + ".B"], A=t[k], scale=alpha / t[k].shape[0],
                                    alpha=alpha) for k in t if k.endswith(".A")}
        w = path / "lora.safetensors"
        return Adapter(name=name or path.name, kind=LORA, modules=mods, path=path, weights_path=w,
                       sha256=cached_file_sha256(w))
'''


@pytest.fixture
def flat_format(tmp_path):
    """A reader of another layout (no adapter_config.json) as a file of
    loramix.io.formats, found by the package's discovery as one added there is."""
    import importlib
    import sys

    import loramix.io.formats as formats_pkg
    from loramix.io.formats import FORMATS

    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "test_plugin_flat.py").write_text(_FLAT_FORMAT)
    formats_pkg.__path__.append(str(folder))  # the list discovery reads (the package spec's)
    try:
        fmt = importlib.import_module("loramix.io.formats.test_plugin_flat").FlatFormat()
        FORMATS[fmt.name] = fmt
        yield fmt
    finally:
        FORMATS.pop("test-flat", None)
        formats_pkg.__path__.remove(str(folder))
        sys.modules.pop("loramix.io.formats.test_plugin_flat", None)


def test_a_format_of_another_layout_added_as_a_file_is_read_by_every_command(flat_format, tmp_path, capsys):
    """The commands' torch-free path checks and the numpy reader know PEFT's
    layout: a folder that another format file's reader detects goes to it
    (every command refused it: 'not an adapter folder: no adapter_config.json')."""
    from loramix.cli import main
    from loramix.io.adapter_files import load_adapter

    g = torch.Generator().manual_seed(0)
    mod, folders, deltas = "model.layers.0.self_attn.q_proj", [], []
    for i in range(2):
        A, B = (
            torch.randn(2, 5, generator=g, dtype=torch.float64),
            torch.randn(6, 2, generator=g, dtype=torch.float64),
        )
        d = tmp_path / f"flat{i}"
        d.mkdir()
        save_file({f"{mod}.A": A, f"{mod}.B": B}, str(d / "lora.safetensors"))
        (d / "lora.json").write_text(json.dumps({"alpha": 4 + i}))
        folders.append(str(d))
        deltas.append((4 + i) / 2 * B @ A)
    assert main(["inspect", folders[0]]) == 0, capsys.readouterr().err
    assert mod in capsys.readouterr().out
    assert main(["similarity", *folders, "--format", "json"]) == 0, capsys.readouterr().err
    cos = float(torch.nn.functional.cosine_similarity(deltas[0].flatten(), deltas[1].flatten(), dim=0))
    assert json.loads(capsys.readouterr().out)["rms"][0][1] == pytest.approx(abs(cos), abs=1e-9)
    out = tmp_path / "sum"
    assert main(["sum", *folders, "--weights", "1,-0.5", "--out", str(out)]) == 0, capsys.readouterr().err
    got = load_adapter(out).modules[mod].residual()
    torch.testing.assert_close(got, deltas[0] - 0.5 * deltas[1], rtol=1e-6, atol=1e-6)
