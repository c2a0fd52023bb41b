"""``--prompt chat``: records formatted by the base tokenizer's own chat template.

The oracle is transformers' ``apply_chat_template`` itself: the encoded
prompt/answer boundary must be where the template's text splits the user
turn (with the generation prompt) from the assistant's reply.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from loramix.data import QARecord, encode_records, load_records
from tests.factories import one_line_error, save_base, tiny_gpt2, tiny_llama

# SmolLM2-Instruct's template (ChatML with a default system turn), as in its tokenizer_config.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARITH = "synthetic:arith?n=12&seed=3"
RECORDS = [
    QARecord("What is 2 + 3?", "2 + 3 = 5"),
    QARecord("How much is left?", "Seven dollars.", context="Ann had 10 dollars and spent 3."),
]


@functools.cache
def _tokenizer(chat: bool):
    from loramix.basebuild import train_tokenizer

    texts = [f"{r.question} {r.answer}" for r in load_records("synthetic:arith?n=200")]
    tok = train_tokenizer(texts, 300, 64)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template, and a tiny GPT-2 without one."""
    root = tmp_path_factory.mktemp("promptbases")
    out = {}
    for name, chat, make in (("chat", True, tiny_llama), ("raw", False, tiny_gpt2)):
        tok = _tokenizer(chat)
        folder = save_base(make(vocab_size=len(tok)), root / name)
        tok.save_pretrained(str(folder))
        out[name] = folder
    return out


def test_chat_boundary_is_the_templates_split():
    tok = _tokenizer(chat=True)
    ex = encode_records(tok, RECORDS, max_len=256, prompt="chat")
    for rec, e in zip(RECORDS, ex):
        user = f"Context: {rec.context}\nQuestion: {rec.question}" if rec.context else rec.question
        turns = [{"role": "user", "content": user}]
        prompt = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(turns + [{"role": "assistant", "content": rec.answer}], tokenize=False)
        assert full.startswith(prompt) and full[len(prompt) :].rstrip().endswith("<|im_end|>")
        n_prompt = e["labels"].count(-100)
        # the prompt tokens decode to the template's prompt, the scored ones to its reply
        assert tok.decode(e["input_ids"][:n_prompt]) == prompt
        assert tok.decode(e["input_ids"][n_prompt:]) == full[len(prompt) :].rstrip()
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
        # the end-of-turn marker is the EOS: it ends the sequence once, not twice
        assert e["input_ids"][-1] == tok.eos_token_id and e["input_ids"][-2] != tok.eos_token_id
    raw = encode_records(tok, RECORDS, max_len=256)
    assert tok.decode(raw[0]["input_ids"]).startswith("Question: What is 2 + 3?\nAnswer: 2 + 3 = 5")


def test_chat_without_template_is_refused():
    from loramix.errors import BaseModelError, UsageError

    with pytest.raises(BaseModelError, match="no chat template"):
        encode_records(_tokenizer(chat=False), RECORDS, max_len=64, prompt="chat")
    with pytest.raises(UsageError, match="--prompt"):
        encode_records(_tokenizer(chat=True), RECORDS, max_len=64, prompt="jinja")


def test_python_chat_without_template_names_the_keyword_value(bases):
    """From Python the error reads in keyword terms, the value as Python writes
    it: "needed by prompt='chat'; use prompt='raw'" (it read "needed by prompt
    chat; use prompt raw"); the CLI's line keeps its flags."""
    import loramix
    from loramix.errors import BaseModelError

    with pytest.raises(BaseModelError) as e:
        loramix.evaluate(bases["raw"], data=ARITH, prompt="chat", limit=2)
    assert "(needed by prompt='chat'; use prompt='raw')" in str(e.value), str(e.value)


def test_cli_chat_without_template_is_one_line(bases, capsys, tmp_path):
    raw = bases["raw"]
    one_line_error(capsys, ["eval", "--base", raw, "--data", ARITH, "--prompt", "chat"], raw, "chat template",
                   "(needed by --prompt chat; use --prompt raw)")  # fmt: skip
    one_line_error(capsys, ["train", "--base", raw, "--data", ARITH, "--out", tmp_path / "a", "--prompt", "chat",
                            "--steps", "1", "--quiet"], raw, "chat template")  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_train_and_eval_record_the_prompt(bases, capsys, tmp_path):
    from loramix import evaluate
    from loramix.cli import main

    base, out = bases["chat"], tmp_path / "ad"
    args = ["train", "--base", base, "--data", ARITH, "--out", out, "--steps", "1", "--batch", "4",
            "--rank", "2", "--prompt", "chat", "--quiet", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert "chat prompt" in capsys.readouterr().out
    settings = json.loads((out / "loramix.json").read_text())["parameters"]
    assert settings["prompt"] == "chat"
    eval_args = ["eval", "--base", base, "--adapter", out, "--data", ARITH, "--device", "cpu"]
    assert main([str(a) for a in [*eval_args, "--prompt", "chat", "--format", "json"]]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["prompt"] == "chat" and "warning" not in got.err
    # scored in another format than it was trained in: said in one warning line, naming the adapter
    assert main([str(a) for a in eval_args]) == 0
    got = capsys.readouterr()
    assert "prompt: raw" in got.out
    assert got.err.strip() == (f"loramix: warning: scored with prompt raw (prompt=, --prompt), but trained with "
                               f"another format: {out} (chat)")  # fmt: skip
    # the API's prompt= reaches the scoring: other text, another perplexity
    chat = evaluate(base, data=ARITH, prompt="chat", device="cpu").iloc[-1]
    raw = evaluate(base, data=ARITH, device="cpu").iloc[-1]
    assert chat["ppl"] != raw["ppl"]


def test_smol_eval_with_its_chat_template(smol, capsys):
    from loramix.cli import main

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    src = next(iter(sorted(data.glob("*.jsonl"))), None) if data.is_dir() else None
    spec = str(src) if src else "synthetic:arith?n=8"
    assert (
        main(
            [
                "eval",
                "--base",
                str(smol),
                "--data",
                spec,
                "--limit",
                "8",
                "--prompt",
                "chat",
                "--format",
                "json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["prompt"] == "chat" and res["results"][-1]["tokens"] > 0


def test_calibration_formats_each_domain_as_its_adapter_was_trained(bases, tmp_path):
    """Data-aware features run each domain's records through the base as its
    adapter saw them in training: ``--prompt chat`` adapters get the chat
    template (it ran the raw ``Question: ...`` text for every adapter)."""
    from loramix.cli import main
    from loramix.features import compute_features
    from loramix.features._calibration import capture
    from loramix.interference import predict_validated
    from loramix.io.adapter_files import load_adapter
    from loramix.validation import write_predictors

    from .test_grouping import _feature_validation

    base, data = bases["chat"], [ARITH, "synthetic:units?n=12&seed=3"]
    ads = [tmp_path / "a", tmp_path / "b"]
    for out, d, prompt in zip(ads, data, ("chat", "raw")):
        args = ["train", "--base", base, "--data", d, "--out", out, "--steps", "2", "--batch", "4",
                "--rank", "2", "--prompt", prompt, "--eval-size", "0", "--quiet", "--device", "cpu"]  # fmt: skip
        assert main([str(a) for a in args]) == 0
    loaded = [load_adapter(a) for a in ads]

    def wso(prompts):
        cal = capture(loaded, base, data, tokens=48, max_len=32, prompts=prompts)
        return compute_features(loaded, calibration=cal).composition("weighted_subspace_overlap", [0, 1])

    trained, raw = wso(["chat", "raw"]), wso(None)
    assert abs(trained - raw) > 1e-6  # the format reaches the activations
    fit = write_predictors(tmp_path / "p.json", _feature_validation("weighted_subspace_overlap", high=1.0))
    d = json.loads(fit.read_text())
    d["calibration"] = {"tokens": 48, "max_len": 32}
    fit.write_text(json.dumps(d))
    got = predict_validated([str(a) for a in ads], fit, data=data, base=base)
    assert got["features"]["weighted_subspace_overlap"] == pytest.approx(trained, rel=1e-12)
