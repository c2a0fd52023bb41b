"""``sum``/``merge --into BASE`` and ``eval --adapter`` warn, in one line naming
the adapter and both bases, where an adapter records a training base that is
clearly not BASE (same shapes, so the command goes on); nothing where it is
the same base under another name (a relative path, a copy of the folder, a
GGUF file and its import, a bfloat16 import of that file), or where nothing
comparable is recorded (a hub name, no record)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from loramix.cli import main

from .factories import make_peft_adapter, write_jsonl
from .test_realmodel import llama_gguf


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny GPT-2 bases of one shape (``a``, ``b``), a copy of ``a``, a loramix
    adapter trained on ``a``, and PEFT adapters whose config names ``a``, a hub name
    and nothing."""
    from loramix.basebuild import build_base
    from loramix.train import train_adapter

    root = tmp_path_factory.mktemp("trained-base")
    kw = dict(steps=1, device="cpu", progress=False)
    a = build_base(["synthetic:arith?n=64"], out=root / "a", seed=0, **kw)["out"]
    b = build_base(["synthetic:arith?n=64"], out=root / "b", seed=1, **kw)["out"]
    copy = shutil.copytree(a, root / "a-copy")
    trained = train_adapter(a, "synthetic:dates?n=8", out=root / "trained", rank=2, batch=4, max_len=32,
                            eval_size=0, **kw)["out"]  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(a))  # PEFT records the folder it was loaded from
    peft = make_peft_adapter(model, root / "peft", target_modules=["c_attn"])
    assert json.loads((peft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(a)
    named = {}
    for label, name in (("hub", "openai-community/gpt2"), ("none", None)):
        named[label] = shutil.copytree(peft, root / f"peft-{label}")
        cfg = json.loads((named[label] / "adapter_config.json").read_text())
        (named[label] / "adapter_config.json").write_text(
            json.dumps({**cfg, "base_model_name_or_path": name})
        )
    data = write_jsonl(root / "d.jsonl", [{"question": "1+1", "answer": "2"}] * 2)
    return dict(a=a, b=b, copy=copy, trained=trained, peft=peft, data=data, **named)


def _warnings(capsys, args) -> list[str]:
    assert main([str(x) for x in args]) == 0
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loramix: warning:")]


@pytest.mark.parametrize("adapter", ["trained", "peft"])
def test_sum_merge_and_eval_warn_of_another_base(bases, adapter, tmp_path, capsys):
    ad, a, b = bases[adapter], bases["a"], bases["b"]
    for cmd in (["sum", ad, "--into", b, "--out", tmp_path / "s"],
                ["merge", "-m", "ties", "--density", "0.5", ad, "--into", b, "--out", tmp_path / "t"],
                ["eval", "--base", b, "--adapter", ad, "--data", bases["data"]]):  # fmt: skip
        lines = _warnings(capsys, cmd)
        assert len(lines) == 1, (cmd, lines)
        assert lines[0].startswith(f"loramix: warning: {ad}: trained on another base, {a}")
        assert f"than {b};" in lines[0] and "all the same" in lines[0]
    # the same base: by itself, by a copy of its folder, and by a relative path
    for base in (a, bases["copy"], os.path.relpath(a)):
        assert _warnings(capsys, ["sum", ad, "--into", base, "--out", tmp_path / "o", "--force"]) == []
        assert _warnings(capsys, ["eval", "--base", base, "--adapter", ad, "--data", bases["data"]]) == []


def test_a_merge_into_the_adapters_base_is_that_base(bases, tmp_path, capsys):
    """An adapter summed into a loramix merge into its own base (merged one by one) is on its base."""
    merged = tmp_path / "m"
    assert _warnings(capsys, ["sum", bases["peft"], "--into", bases["a"], "--out", merged]) == []
    assert _warnings(capsys, ["sum", bases["trained"], "--into", merged, "--out", tmp_path / "o"]) == []
    assert (
        _warnings(capsys, ["eval", "--base", merged, "--adapter", bases["trained"], "--data", bases["data"]])
        == []
    )


def test_nothing_comparable_is_no_warning(bases, tmp_path, capsys):
    """A hub name, or no name, is not compared with a folder: no warning."""
    for label in ("hub", "none"):
        assert _warnings(capsys, ["sum", bases[label], "--into", bases["b"], "--out", tmp_path / label]) == []


def test_a_gguf_its_import_and_a_bfloat16_import_are_one_base(tmp_path, capsys):
    """An adapter whose config names a GGUF file (as ``loramix train`` on it records) is on
    that file's import in the user cache (the file given) and on a ``base import --dtype
    bfloat16`` of it; not on an import of another GGUF of the same shapes. And the other way
    round: one trained on the bfloat16 import is on the GGUF file."""
    from transformers import AutoModelForCausalLM

    from loramix.gguf_import import resolve_base

    gguf = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    other = llama_gguf(tmp_path / "other.gguf", tokenizer=True, context_length=32)
    for src, out, dtype in ((gguf, "bf16", "bfloat16"), (other, "other", "float32")):
        assert main(["base", "import", str(src), "--out", str(tmp_path / out), "--dtype", dtype]) == 0
    on_file = make_peft_adapter(AutoModelForCausalLM.from_pretrained(str(resolve_base(gguf))), tmp_path / "ad",
                                target_modules=["q_proj"])  # fmt: skip
    cfg = json.loads((on_file / "adapter_config.json").read_text())
    (on_file / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(gguf)}))
    on_bf16 = make_peft_adapter(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")), tmp_path / "ad16",
                                target_modules=["q_proj"])  # fmt: skip
    capsys.readouterr()
    for ad, base in ((on_file, gguf), (on_file, tmp_path / "bf16"), (on_bf16, gguf)):
        assert _warnings(capsys, ["sum", ad, "--into", base, "--out", tmp_path / "s", "--force"]) == []
    lines = _warnings(capsys, ["sum", on_file, "--into", tmp_path / "other", "--out", tmp_path / "s3"])
    assert len(lines) == 1 and f"trained on another base, {gguf}, than {tmp_path / 'other'};" in lines[0], (
        lines
    )


def test_eval_names_a_merged_folder_as_the_merge_it_is(bases, tmp_path, capsys):
    """``eval --base merged/`` said "the base: merged/"; a loramix merge's folder is
    named by its ``loramix.json``: the method, the adapters and the base it was made
    of (weights where not all 1), in the table and the JSON; a plain base is "the base"."""
    merged = tmp_path / "m"
    args = ["merge", "-m", "ties", "--density", "0.5", bases["peft"], bases["trained"], "--weights", "1,0.5",
            "--into", bases["a"], "--out", merged]  # fmt: skip
    assert main([str(x) for x in args]) == 0
    capsys.readouterr()
    assert main(["eval", "--base", str(merged), "--data", str(bases["data"])]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"the merge (ties) of {bases['peft']}, {bases['trained']} into {bases['a']} (weights 1, 0.5): "
                     f"{merged}")  # fmt: skip
    assert main(["eval", "--base", str(merged), "--adapter", str(bases["peft"]), "--data", str(bases["data"]),
                 "--format", "json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    from loramix.io.filehash import adapter_identity, adapter_sha256

    pair = (bases["peft"], bases["trained"])
    assert got["merge"] == {"method": "ties", "adapters": [str(bases["peft"]), str(bases["trained"])],
                            "weights": [1.0, 0.5], "base": str(bases["a"]),
                            "sha256": [adapter_sha256(x) for x in pair],
                            "identity": [adapter_identity(x) for x in pair],
                            # the method's parameters as it merged by them: fit labels merges by them
                            "params": {"density": 0.5, "sign": "mass", "divide": "count", "lambda": 1.0}}  # fmt: skip
    assert (
        main(
            ["eval", "--base", str(bases["a"]), "--adapter", str(bases["peft"]), "--data", str(bases["data"])]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith(f"the base with {bases['peft']} on the fly: {bases['a']}\n")


def test_a_bases_identity_is_its_folders_or_its_ggufs_import(bases, tmp_path, monkeypatch):
    """``base_identity``, what a fit file records for ``predict``'s other-base
    check (``loramix fit``, a study's report): a folder's own identity; a GGUF
    file's import in the user cache, None before it is imported (nothing is
    imported to read it); None where nothing names the base. ``loramix fit``
    of merges evaluated on a ``.gguf`` base recorded None, so ``predict`` of
    its fit compared no base."""
    from loramix.gguf_import import resolve_base
    from loramix.io.model_folder import BaseModelFolder
    from loramix.trained_base import base_identity

    a = BaseModelFolder(bases["a"]).identity()
    assert base_identity(bases["a"]) == base_identity(str(bases["copy"])) == a
    assert base_identity(bases["b"]) not in (None, a)
    assert base_identity(tmp_path / "nothing") is None
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / "cache"))  # the session's may hold its import
    gguf = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    assert base_identity(gguf) is None  # not imported yet, and not imported by asking
    folder = resolve_base(gguf)
    assert base_identity(gguf) == BaseModelFolder(folder).identity() is not None


def test_a_merge_without_into_warns_of_adapters_of_two_bases(bases, tmp_path, capsys):
    """``sum``/``merge`` in adapter space (no ``--into``) of adapters whose
    recorded bases clearly differ: one warning per adapter off the first's
    base, naming both (the output records the first's base, which the others
    were not trained on); the old code said nothing. Adapters on one base by
    any record (a loramix training, a PEFT path), or with nothing comparable
    (a hub name), are merged without a word."""
    from transformers import AutoModelForCausalLM

    on_b = make_peft_adapter(AutoModelForCausalLM.from_pretrained(str(bases["b"])), tmp_path / "on-b",
                             target_modules=["c_attn"])  # fmt: skip
    a, b, ad = bases["a"], bases["b"], bases["trained"]
    for cmd in (["sum", ad, on_b, "--out", tmp_path / "s"],
                ["merge", "-m", "svd", "--rank", "2", ad, on_b, "--out", tmp_path / "v"]):  # fmt: skip
        lines = _warnings(capsys, cmd)
        assert len(lines) == 1, (cmd, lines)
        assert lines[0].startswith(
            f"loramix: warning: {on_b}: trained on another base, {b}, than {ad} ({a} ("
        ), lines
        assert "merged with it all the same" in lines[0]
    for i, pair in enumerate([(ad, bases["peft"]), (bases["hub"], on_b), (bases["none"], on_b)]):
        assert _warnings(capsys, ["sum", *pair, "--out", tmp_path / f"q{i}"]) == [], pair
