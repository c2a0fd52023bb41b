"""Adapters whose ``adapter_config.json`` has a null ``target_modules``, on
model types outside loramix's own table (:mod:`loramix.archs`), against real
PEFT; and the one warning line of the commands that read them without a base
(one per adapter where several code paths meet).

PEFT puts its default for the base's ``model_type`` in place of a null
``target_modules`` (:mod:`loramix.peft_targets`; BLOOM: ``query_key_value``)
and ignores the factors of any other module; a type it has no default for
(OLMo) it refuses. loramix read every factor for any type its own table did
not hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from loramix.cli import main
from loramix.errors import AdapterError

from .factories import make_peft_adapter, save_base, tiny_gpt2

QKV_MLP = ["query_key_value", "dense_h_to_4h"]
NULL_LINE = "loramix: warning: target_modules is null in"


def _null(folder: Path) -> Path:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = None
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _refused(code: int, err: str, *needles) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loramix: error: "), (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def _peft_wraps(model, adapter: Path) -> set[str]:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(adapter))
    return {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if "default" in getattr(m, "lora_A", {})
    }


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """A tiny BLOOM (``nn.Linear``; not in loramix's architecture table) and
    two PEFT adapters made null-targeted: one on ``query_key_value`` only
    (PEFT's default), one on ``dense_h_to_4h`` too."""
    from transformers import BloomConfig, BloomForCausalLM

    root = tmp_path_factory.mktemp("bloom")
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)).eval()
    return dict(
        base=save_base(model, root / "base"),
        qkv=_null(make_peft_adapter(model, root / "qkv", seed=1, r=2, target_modules=["query_key_value"])),
        extra=_null(make_peft_adapter(model, root / "extra", seed=2, r=3, target_modules=QKV_MLP)),
    )


def _load_bloom(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base)).eval()


def test_null_targets_on_a_bloom_base_are_pefts_default(bloom, tmp_path, capsys):
    """BLOOM is outside loramix's table: an adapter with null targets read
    every factor there. Now PEFT's default applies, as for GPT-2: on
    ``query_key_value`` alone, ``sum --into`` gives PEFT's ``merge_and_unload``
    and ``eval``'s in-memory merge and on-the-fly paths PEFT's weights and
    logits; with ``dense_h_to_4h`` factors too (which PEFT ignores: its merge
    is not the sum of every factor) ``sum --into``, ``similarity --base`` and
    eval's paths refuse it in one line naming the module."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters, detach, merge_into_model

    base, qkv, extra = bloom["base"], bloom["qkv"], bloom["extra"]
    want = PeftModel.from_pretrained(_load_bloom(base), str(qkv)).merge_and_unload().state_dict()
    assert _cli(capsys, "sum", "--no-progress", qkv, "--into", base, "--out", tmp_path / "m")[0] == 0
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "transformer.h.1.self_attention.query_key_value.weight" in got
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=key)
    model = _load_bloom(base)
    merge_into_model(model, [load_adapter(qkv)])
    for key, t in model.state_dict().items():
        torch.testing.assert_close(t, want[key], msg=key)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    peft_logits = PeftModel.from_pretrained(_load_bloom(base), str(qkv))(input_ids=ids).logits
    model = attach_adapters(_load_bloom(base), [load_adapter(qkv)])
    torch.testing.assert_close(model(input_ids=ids).logits, peft_logits)
    detach(model)

    assert _peft_wraps(_load_bloom(base), extra) == {f"transformer.h.{i}.self_attention.query_key_value"
                                                     for i in (0, 1)}  # fmt: skip
    needle = ("transformer.h.0.mlp.dense_h_to_4h is not in target_modules ['query_key_value'] "
              "(target_modules is null: PEFT's default for a bloom base)")  # fmt: skip
    code, _, err = _cli(capsys, "sum", "--no-progress", extra, "--into", base, "--out", tmp_path / "x")
    _refused(code, err, extra, needle)
    assert not (tmp_path / "x").exists()
    code, _, err = _cli(capsys, "similarity", extra, qkv, "--base", base)
    _refused(code, err, extra, needle)
    for apply in (attach_adapters, merge_into_model):
        with pytest.raises(AdapterError, match=re.escape(needle)):
            apply(_load_bloom(base), [load_adapter(extra)])


def test_null_targets_on_a_type_peft_has_no_default_for(tmp_path, capsys):
    """OLMo (``olmo``) is in neither table: PEFT refuses an adapter with null
    targets on it (``ValueError`` when it injects the adapter); so do ``sum
    --into`` and eval's paths, in one line (every factor was merged)."""
    from peft import PeftModel
    from transformers import OlmoConfig, OlmoForCausalLM

    from loramix.io.adapter_files import load_adapter
    from loramix.layers import attach_adapters

    torch.manual_seed(0)
    cfg = OlmoConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    model = OlmoForCausalLM(cfg).eval()
    base = save_base(model, tmp_path / "base")
    ad = _null(make_peft_adapter(model, tmp_path / "ad", seed=1, r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        PeftModel.from_pretrained(OlmoForCausalLM(cfg), str(ad))
    needle = "target_modules is null and PEFT has no default targets for model type 'olmo'"
    code, _, err = _cli(capsys, "sum", "--no-progress", ad, "--into", base, "--out", tmp_path / "out")
    _refused(code, err, ad, needle)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match=re.escape(needle)):
        attach_adapters(OlmoForCausalLM(cfg), [load_adapter(ad)])


@pytest.fixture(scope="module")
def gpt2_nulls(tmp_path_factory):
    """Two GPT-2 adapters on every projection, made null-targeted, and a fit.json for them."""
    from loramix.fit import fit_line

    root = tmp_path_factory.mktemp("nulls")
    model = tiny_gpt2()
    ads = [_null(make_peft_adapter(model, root / n, seed=i, r=2)) for i, n in enumerate("ab")]
    x = [0.0, 0.2, 0.4, 0.6, 0.8]
    fit = {"adapter_method": "lora", "merge_method": "sum", **fit_line(x, [2 * v + 0.1 * (-1) ** i
                                                                          for i, v in enumerate(x)]).to_dict()}  # fmt: skip
    (root / "fit.json").write_text(json.dumps({"scenario": "t", "prediction_level": 0.95, "fits": [fit]}))
    return ads, root / "fit.json"


PREDICTORS = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "predictors.json"


@pytest.mark.parametrize(
    ("args", "hint"),
    [(["inspect", "{a}"], "(inspect lists them all; given the base, similarity, merge, sum_into_base and evaluate "
                          "apply PEFT's rule: similarity base=, merge or sum_into_base into=; similarity --base, "
                          "sum or merge --into, eval)"),
     (["predict", "{a}", "{b}", "--fit", "{fit}"], "(the predictor's features read them all)"),
     (["predict", "{a}", "{b}", "--fit", PREDICTORS], "(the predictor's features read them all)"),
     (["plan", "{a}", "{b}", "--fit", PREDICTORS], "(the predictor's features read them all)"),
     (["similarity", "{a}", "{b}"], "(give the base to apply PEFT's rule)")],
)  # fmt: skip
def test_commands_without_a_base_say_so_in_one_line(gpt2_nulls, capsys, args, hint):
    """``inspect``, ``predict`` (a fit.json, whose cosine line runs similarity,
    and a predictors file, whose features may not) and ``plan`` warn of a null
    ``target_modules`` in one line, as ``similarity`` does, with what the
    command does about it: inspect and predict with a predictors file said
    nothing; predict and plan said it twice where their paths met similarity's,
    or told predict, which takes no base, to give one."""
    if PREDICTORS in args and not PREDICTORS.is_file():
        pytest.skip("no committed quickstart predictors file")
    (a, b), fit = gpt2_nulls
    code, _, err = _cli(capsys, *[str(x).format(a=a, b=b, fit=fit) for x in args])
    assert code == 0, err
    said = [ln for ln in err.splitlines() if ln.startswith(NULL_LINE)]
    assert len(said) == 1, err
    assert f"{a} (8 modules)" in said[0] and hint in said[0], said


def test_features_warn_once_and_apply_the_base_they_calibrate_on(tmp_path):
    """The features (predict, plan) warn of null targets once, whichever of them
    run; with a calibration the base is loaded, so PEFT's default for its
    type is checked there (an adapter with factors outside it refused by the
    capture, as by sum --into) and no warning of a missing base is given."""
    import warnings

    from loramix.errors import LoramixWarning
    from loramix.features import compute_features
    from loramix.features._calibration import capture
    from loramix.io.adapter_files import load_adapter
    from loramix.models import load_causal_lm

    from .test_train import make_tiny_base

    base = make_tiny_base(tmp_path / "base", "llama")
    model, _ = load_causal_lm(base)
    qv = [_null(make_peft_adapter(model, tmp_path / f"qv{k}", seed=k, r=2, target_modules=["q_proj", "v_proj"]))
          for k in range(2)]  # fmt: skip
    down = _null(
        make_peft_adapter(model, tmp_path / "down", seed=3, r=2, target_modules=["q_proj", "down_proj"])
    )
    data = ["synthetic:arith?n=8&seed=3", "synthetic:units?n=8&seed=4"]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compute_features([load_adapter(p) for p in qv], only=["coverage", "rms_cosine", "subspace_overlap"])
        loaded = [load_adapter(p) for p in qv]
        cal = capture(loaded, base, data, tokens=16, max_len=16)
        compute_features(loaded, calibration=cal, only=["rms_cosine", "functional_interference"])
    said = [str(w.message) for w in seen if issubclass(w.category, LoramixWarning)]
    assert len(said) == 1 and f"null in {qv[0]} (4 modules); {qv[1]} (4 modules): " in said[0], said
    assert said[0].endswith("(the predictor's features read them all)"), said
    with pytest.raises(AdapterError, match=re.escape("model.layers.0.mlp.down_proj is not in target_modules "
                                                     "['q_proj', 'v_proj'] (target_modules is null")):  # fmt: skip
        capture([load_adapter(qv[0]), load_adapter(down)], base, data, tokens=16, max_len=16)
