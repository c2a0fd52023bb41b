"""The lines a ``loramix.X`` call shows name its keywords: a refusal in
keyword terms (:mod:`loramix.api`), a warning worded for both readers (the
keyword as well as the flag). Each case is a real call with the input that
reaches a line which named only a flag before."""

from __future__ import annotations

import json
import re
import warnings

import pytest

import loramix
from loramix.errors import LoramixError

from .factories import make_peft_adapter, tiny_gpt2

_FLAG = re.compile(r"(?<![\w./-])--([a-z][a-z0-9-]*)")


def _names_keywords(text: str) -> None:
    """Every flag ``text`` names comes with its keyword (``--into`` with ``into``, outside a flag)."""
    for flag in _FLAG.findall(text):
        kw = flag.replace("-", "_")
        assert re.search(rf"(?<![\w-]){kw}\b(?!-)", _FLAG.sub("", text)), (f"--{flag} without {kw}", text)


@pytest.fixture(scope="module")
def ads(tmp_path_factory):
    """Two LoRA adapters, a DoRA one and a LoRA one whose target_modules is null (PEFT's own files)."""
    root = tmp_path_factory.mktemp("kw")
    model = tiny_gpt2()
    out = {k: make_peft_adapter(model, root / k, seed=i, r=2) for i, k in enumerate(("a", "b", "null"))}
    out["dora"] = make_peft_adapter(model, root / "dora", seed=5, r=2, use_dora=True)
    cfg_path = out["null"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = None
    cfg_path.write_text(json.dumps(cfg))
    return {k: str(v) for k, v in out.items()}


def test_inspects_null_target_warning_names_the_keywords(ads):
    """It named similarity --base and sum or merge --into only."""
    for given in (ads["null"], loramix.load_adapter(ads["null"])):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loramix.inspect_adapter(given)
        (w,) = [str(w.message) for w in seen if "target_modules is null" in str(w.message)]
        assert "similarity base=" in w and "into=" in w and "--into" in w, w  # both readers
        _names_keywords(w)


def test_refusals_and_notes_name_another_functions_keyword(ads, tmp_path):
    """A flag the function called has no keyword for, but another function has: sum_adapters'
    "merge it into the base with --into BASE", plan's "(--into)" note, plan's "loramix fit to its
    --out"."""
    with pytest.raises(LoramixError) as e:
        loramix.sum_adapters([ads["dora"], ads["a"]], out=tmp_path / "s")
    assert "sum_into_base's into=BASE" in str(e.value) and "--into" not in str(e.value), str(e.value)
    notes = loramix.plan([ads["a"], ads["b"], ads["dora"]], progress=False).notes
    assert any("(merge's into)" in n for n in notes), notes
    for n in notes:
        assert "--into" not in n, n
        _names_keywords(n)
    (tmp_path / "report").mkdir()
    with pytest.raises(LoramixError) as e:
        loramix.plan([ads["a"], ads["b"]], fit=tmp_path / "report", progress=False)
    assert "fit_evaluations to its out=" in str(e.value), str(e.value)
    _names_keywords(str(e.value))
    assert not (tmp_path / "s").exists()
