"""``load_adapter`` against real PEFT adapters on tiny GPT-2 and Llama models.

The reference is PEFT itself: the saved folder is loaded back with
``PeftModel.from_pretrained`` and each LoRA layer's rank, scaling, factors and
``get_delta_weight`` are compared with what loramix read.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix import load_adapter
from loramix.errors import AdapterError

from .factories import make_peft_adapter, tiny_gpt2, tiny_llama

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def peft_layers(model, folder: Path) -> dict[str, dict]:
    """What PEFT makes of ``folder``: per LoRA layer r, scaling, A, B and the
    dense delta from its own ``get_delta_weight`` (fp32; Conv1D gives it
    transposed, which does not change the norm)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            with torch.no_grad():
                out[name] = dict(
                    r=mod.r["default"],
                    scale=mod.scaling["default"],
                    A=mod.lora_A["default"].weight.detach().clone(),
                    B=mod.lora_B["default"].weight.detach().clone(),
                    delta=mod.get_delta_weight("default").detach().double(),
                )
    return out


def assert_matches_peft(model, folder: Path, path=None):
    ad = load_adapter(path or folder)
    ref = peft_layers(model, folder)
    assert set(ad.modules) == set(ref), "loramix and PEFT disagree on the adapted modules"
    for name, m in ad.modules.items():
        r = ref[name]
        assert m.rank == r["r"], name
        assert m.scale == pytest.approx(r["scale"], rel=1e-12), name
        # factors kept as stored (PEFT may upcast on load; compare values)
        torch.testing.assert_close(m.A.double(), r["A"].double(), rtol=0, atol=0)
        torch.testing.assert_close(m.B.double(), r["B"].double(), rtol=0, atol=0)
        peft_norm = float(torch.linalg.matrix_norm(r["delta"]))
        assert m.norm() == pytest.approx(peft_norm, rel=1e-5), name
        # and the factored norm equals the dense float64 one exactly
        assert m.norm() == pytest.approx(float(torch.linalg.matrix_norm(m.residual())), rel=1e-12)
    return ad


def test_gpt2_conv1d_rank_and_alpha_patterns(gpt2, tmp_path):
    folder = make_peft_adapter(
        gpt2,
        tmp_path / "g",
        r=4,
        lora_alpha=8,
        rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 6},
        alpha_pattern={"c_proj": 3, "h.0.mlp.c_fc": 5},
    )
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    ad = assert_matches_peft(gpt2, folder)
    m = ad.modules["transformer.h.1.attn.c_attn"]
    # Linear layout even though Conv1D stores (in, out): c_attn is 32 -> 96
    assert m.shape == (96, 32) and m.rank == 6 and m.scale == 8 / 6
    assert ad.modules["transformer.h.0.mlp.c_fc"].scale == 5 / 2
    assert ad.modules["transformer.h.0.mlp.c_proj"].scale == 3 / 4
    assert ad.kind == "lora" and ad.sha256 and len(ad.sha256) == 64
    assert ad.config["r"] == 4 and ad.path == folder


def test_llama_rslora_regex_patterns(llama, tmp_path):
    folder = make_peft_adapter(
        llama,
        tmp_path / "l",
        r=4,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={r"layers\.1\..*_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    ad = assert_matches_peft(llama, folder)
    assert ad.modules["model.layers.1.mlp.up_proj"].scale == 16 / math.sqrt(2)
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == 3 / 2
    assert ad.modules["model.layers.0.mlp.down_proj"].shape == (32, 72)


def test_pattern_keys_must_match_the_end_of_the_module_name(llama, tmp_path):
    """PEFT's rule anchors a pattern at the end of the name: ``up`` is not
    ``up_proj``, ``layers\\.1`` is no module of layer 1. Such keys apply to
    nothing, in PEFT as in loramix (every module keeps ``lora_alpha / r``)."""
    folder = make_peft_adapter(
        llama, tmp_path / "l", r=4, lora_alpha=16, alpha_pattern={"up": 9, r"layers\.1": 11}
    )
    ad = assert_matches_peft(llama, folder)
    assert {m.scale for m in ad.modules.values()} == {16 / 4}


def test_llama_partial_targets(llama, tmp_path):
    folder = make_peft_adapter(
        llama, tmp_path / "p", r=3, lora_alpha=7, target_modules=["v_proj", "down_proj"]
    )
    ad = assert_matches_peft(llama, folder)
    assert len(ad) == 4 and all(n.endswith(("v_proj", "down_proj")) for n in ad.modules)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_storage_dtypes(gpt2, tmp_path, dtype):
    folder = make_peft_adapter(gpt2, tmp_path / "d", r=2, lora_alpha=4)
    # PEFT keeps adapter weights in fp32; store them as a half-precision
    # export (or a model saved with torch_dtype) would.
    stored = {k: v.to(dtype) for k, v in load_file(str(folder / WEIGHTS)).items()}
    save_file(stored, str(folder / WEIGHTS))
    assert {t.dtype for t in stored.values()} == {dtype}
    ad = load_adapter(folder)
    for name, m in ad.modules.items():
        assert m.dtype == dtype
        A = stored[f"base_model.model.{name}.lora_A.weight"]
        B = stored[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(m.A, A) and torch.equal(m.B, B)
        ref = (2.0 * B.double() @ A.double()).norm()
        assert m.norm() == pytest.approx(float(ref), rel=1e-12)
    assert_matches_peft(gpt2, folder)


def test_keys_with_adapter_name(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "n", r=2, lora_alpha=2)
    plain = load_adapter(folder)
    t = load_file(str(folder / WEIGHTS))
    named = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): v
        for k, v in t.items()
    }
    assert all(".default.weight" in k for k in named)
    save_file(named, str(folder / WEIGHTS))
    ad = load_adapter(folder)
    assert set(ad.modules) == set(plain.modules)
    for name, m in ad.modules.items():
        assert torch.equal(m.A, plain.modules[name].A) and m.scale == plain.modules[name].scale


def test_two_adapter_names_in_one_file_refused(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "n2", r=2, target_modules=["q_proj"])
    t = load_file(str(folder / WEIGHTS))
    mixed = {}
    for k, v in t.items():
        mixed[k.replace(".weight", ".one.weight")] = v
        mixed[k.replace(".weight", ".two.weight")] = v.clone()
    save_file(mixed, str(folder / WEIGHTS))
    with pytest.raises(AdapterError, match="several adapters"):
        load_adapter(folder)


def test_safetensors_file_path(gpt2, tmp_path):
    folder = make_peft_adapter(gpt2, tmp_path / "task", r=2, target_modules=["c_attn"])
    by_folder = load_adapter(folder)
    by_file = assert_matches_peft(gpt2, folder, path=folder / WEIGHTS)
    assert by_file.name == "task" and by_file.path == folder / WEIGHTS
    assert set(by_file.modules) == set(by_folder.modules)
    # any file name works as long as the config is beside it
    (folder / WEIGHTS).rename(folder / "math.safetensors")
    ad = load_adapter(folder / "math.safetensors")
    assert ad.name == "math" and len(ad) == 2
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        load_adapter(folder)


def test_never_forms_dense_delta_on_load(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "f", r=2)
    ad = load_adapter(folder)
    for m in ad.modules.values():
        assert m.A.shape[0] == 2 and m.B.shape[1] == 2  # factors only


@pytest.mark.parametrize(
    ("kwargs", "feature", "module"),
    [
        (dict(lora_bias=True), "LoRA biases", "transformer.h.0.attn.c_attn"),
        (dict(bias="all"), "trained biases", "transformer.h.0.attn.c_attn"),
    ],
)
def test_unsupported_features_refused(gpt2, tmp_path, kwargs, feature, module):
    folder = make_peft_adapter(gpt2, tmp_path / "u", r=2, **kwargs)
    with pytest.raises(AdapterError) as e:
        load_adapter(folder)
    msg = e.value.message
    assert feature in msg and module in msg and "not supported" in msg
    assert str(folder) in msg and "\n" not in msg


def test_unsupported_config_variant_refused(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "v", r=2, target_modules=["q_proj"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_qalora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="not supported: QALoRA"):
        load_adapter(folder)
