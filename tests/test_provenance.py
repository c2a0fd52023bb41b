"""One reader of an adapter's ``loramix.json`` (:mod:`loramix.io.provenance`):
every caller that reads it back agrees on the same file, a real record,
damaged ones and ones without the fields alike.

The callers: ``scenario check`` of a given adapter (the base it records,
warned of where it is another), ``plan``/``predict``'s check of the base a
fit was made for (:func:`loramix.grouping.other_base`), the prompt format
(:func:`loramix.grouping.trained_prompt`,
:func:`loramix.perplexity.warn_other_prompt`), the initialisation
(``predict``'s choice of fit) and ``eval --held-out``'s training split
(:func:`loramix.heldout.training_split`). Before the one reader, ``scenario``
read the base from its own parse and the others from grouping's: a record
whose first ``base_model`` input had no string identity was another base to
the study and none to ``plan``, one with a number crashed ``plan`` in a
TypeError, and ``parameters`` that were no object crashed ``predict``'s
choice of fit in an AttributeError."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from loramix.cli import main
from tests.factories import make_peft_adapter, write_jsonl

FIT_BASE = "f1" * 32  # the base a fit records: another than every adapter's here


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny base, a PEFT adapter on it (no record of its own), the record
    ``loramix train`` writes for an adapter of the same shapes trained on
    another base (``shared_init``, eval split of 3), and its data file."""
    from transformers import AutoModelForCausalLM

    from loramix.basebuild import build_base
    from loramix.train import train_adapter

    root = tmp_path_factory.mktemp("provenance")
    kw = dict(steps=1, device="cpu", progress=False)
    base = build_base(["synthetic:arith?n=64"], out=root / "base", **kw)["out"]
    other = build_base(["synthetic:units?n=64"], out=root / "other", seed=1, **kw)["out"]
    peft = make_peft_adapter(AutoModelForCausalLM.from_pretrained(base), root / "peft", r=2)
    rows = [{"question": f"{i} + 1?", "answer": str(i + 1)} for i in range(12)]
    data = write_jsonl(root / "qa.jsonl", rows)
    trained = train_adapter(other, str(data), out=root / "trained", rank=2, steps=1, batch=4, max_len=32,
                            eval_size=3, shared_init=True, device="cpu", progress=False)["out"]  # fmt: skip
    record = json.loads((Path(trained) / "loramix.json").read_text())
    identity = next(i["identity"] for i in record["inputs"] if i["kind"] == "base_model")
    return Path(base), peft, record, identity, data


def _variants(record: dict, identity: str) -> dict:
    """``{name: (loramix.json text or bytes, or None: no file; the base identity every caller should see)}``."""
    odd = {**record, "parameters": [1],
           "inputs": [{"kind": "base_model"}, {"kind": "base_model", "identity": 7}, *record["inputs"]]}  # fmt: skip
    number = {"method": "train", "inputs": [{"kind": "base_model", "identity": 7}]}
    return {
        "train's record": (json.dumps(record), identity),
        "no file": (None, None),
        "cut short": (json.dumps(record)[:40], None),
        "not UTF-8": (b"\xff\xfe{", None),
        "a list": ("[1, 2]", None),
        "no fields": ("{}", None),
        "inputs null": ('{"inputs": null, "parameters": null}', None),
        "first base has no string identity": (json.dumps(odd), identity),
        "identity a number": (json.dumps(number), None),
    }


def _study_sees(tmp_path: Path, base: Path, peft: Path, adapter: Path, capsys) -> str | None:
    """The base ``scenario check`` says ``adapter`` was trained on (its warning), or None."""
    text = f'name = "prov"\n[base]\npath = "{base}"\n'
    for d, a in (("arith", peft), ("units", adapter)):
        text += f'\n[domains.{d}]\ndata = "synthetic:{d}"\neval = 8\nadapter = "{a}"\n'
    scen = tmp_path / "prov.toml"
    scen.write_text(text + '\n[merge]\nmethods = ["sum"]\n')
    capsys.readouterr()
    assert main(["scenario", "check", str(scen), "--cache", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if "was trained on another base" in ln]
    assert len(said) <= 1 and "Traceback" not in err, err
    # "... was trained on another base (PATH (IDENTITY[:12])) than base.path; ..."
    return re.search(r"another base \(.*\((\w{12})\)\) than base\.path", said[0])[1] if said else None


def _plan_sees(adapter) -> str | None:
    """The base :func:`loramix.grouping.other_base` says ``adapter`` was trained on, or None."""
    from loramix.grouping import other_base

    said = other_base([adapter], FIT_BASE, "this fit was")
    assert said is not None  # another base, or none recorded: either is said
    return None if "record no base" in said else said.split("another base (")[1].split(")")[0]


@pytest.mark.parametrize("variant", list(_variants({"inputs": []}, "")))
def test_every_reader_of_a_loramix_json_agrees(made, tmp_path, capsys, variant):
    """The same ``loramix.json`` beside a real PEFT adapter, read by every
    caller: the same base identity for the study and for ``plan`` (first
    ``base_model`` input with a string identity), the prompt, the init and
    the training split from train's record alone, nothing from a damaged
    file or one without the fields (no error either)."""
    from loramix.grouping import trained_prompt
    from loramix.heldout import training_split
    from loramix.interference import _recorded_init
    from loramix.io.np_factors import load_np_adapter
    from loramix.io.outputs import normalized_path
    from loramix.perplexity import warn_other_prompt

    base, peft, record, identity, data = made
    content, expected = _variants(record, identity)[variant]
    adapter = shutil.copytree(peft, tmp_path / "adapter")
    if content is not None:
        f = adapter / "loramix.json"
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    loaded = load_np_adapter(adapter, lazy=True)

    seen = expected[:12] if expected else None
    assert _study_sees(tmp_path, base, peft, adapter, capsys) == seen
    assert _plan_sees(loaded) == seen
    real = variant == "train's record"
    assert trained_prompt(loaded) == "raw"  # train's default; nothing recorded reads as raw too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_other_prompt([str(adapter)], "chat")
    assert len(caught) == real, [str(w.message) for w in caught]
    assert _recorded_init(loaded) == ("shared" if real else None)
    split = training_split(adapter)
    if real:  # 12 records, 3 held out: the 9 others, as train drew them
        assert {k: len(v) for k, v in split.items()} == {normalized_path(data): 9}
    else:
        assert split == {}
