"""One Python API: one name per concept, one shape of signature, the old names kept for a release.

The rules (README, "From Python") are checked on every function ``loramix``
exports, so a function added later cannot drift from them; each name of the
previous release is checked with a real call: it warns, naming both names,
gives the same result as the new name, and is refused when given together
with it. pyproject ignores DeprecationWarning, so ``pytest.warns`` sees them.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import loramix
from loramix.errors import LoramixError

from .test_api_errors import QUICKSTART, REPORTS, api_env

#: each function's positional parameters: what the call works on (its inputs; a writer's
#: folder and contents; merge's method, predict's fit); every other parameter is keyword-only
POSITIONAL = {
    "load_adapter": ("path",),
    "save_peft_adapter": ("out", "factors"),
    "save_d2_adapter": ("out", "modules"),
    "similarity": ("adapters",),
    "sum_into_base": ("adapters",),
    "sum_adapters": ("adapters",),
    "merge": ("adapters", "method"),
    "train_adapter": ("base", "data"),
    "evaluate": ("base",),
    "build_base": ("data",),
    "run_scenario": ("scenario",),
    "predict": ("adapters", "fit"),
    "plan": ("adapters",),
    "fit_evaluations": ("evaluations",),
    "inspect_adapter": ("adapter",),
    "import_gguf": ("gguf_path",),
}
#: a concept's other names, which no function may take (the commands' name is the one)
SYNONYMS = {
    "adapters_or_paths": "adapters",
    "adapter_paths": "adapters",
    "batch_size": "batch",
    "merge_method": "method",
    "out_dir": "out",
    "output": "out",
    "output_dir": "out",
    "base_model": "base",
    "base_path": "base",
    "verbose": "progress",
    "show_progress": "progress",
}
#: the shared keywords, in the order every signature holds them; the last four close it
ORDER = ["weights", "into", "base", "data", "out", "device", "dtype", "force", "progress"]
LAST = ["device", "dtype", "force", "progress"]
#: device "cpu" by default, on purpose: they compute from the factors in numpy float64
CPU_FIRST = {"similarity", "predict", "plan"}


def _functions() -> dict:
    return {n: getattr(loramix, n) for n in loramix._API if inspect.isfunction(getattr(loramix, n))}


def test_every_exported_function_declares_its_positional_parameters():
    """A new export must be added to POSITIONAL, and so meet the rules below."""
    assert set(_functions()) == set(POSITIONAL)


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_the_signature_follows_the_rules(name):
    params = list(inspect.signature(getattr(loramix, name)).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert tuple(positional) == POSITIONAL[name], "only what the call works on is positional"
    keywords = [p for p in params if p.kind is p.KEYWORD_ONLY]
    assert len(positional) + len(keywords) + sum(p.kind is p.VAR_KEYWORD for p in params) == len(params)
    names = [p.name for p in params]
    assert not set(names) & set(SYNONYMS), f"{name}: use {[SYNONYMS[n] for n in set(names) & set(SYNONYMS)]}"
    shared = [p.name for p in keywords if p.name in ORDER]
    assert shared == sorted(shared, key=ORDER.index), f"{name}: shared keywords out of order {shared}"
    last = [p.name for p in keywords if p.name in LAST]
    assert [p.name for p in keywords[len(keywords) - len(last) :]] == last, f"{name}: {last} must close it"
    by_name = {p.name: p for p in params}
    if "progress" in by_name:  # every export runs work that can take seconds; a bar only on a terminal
        assert by_name["progress"].default is True, name
    if "device" in by_name:
        want = "cpu" if name in CPU_FIRST else "auto"
        assert by_name["device"].default == want, name
    if name in CPU_FIRST:  # and say why
        assert "numpy float64" in " ".join(getattr(loramix, name).__doc__.split()), name


def test_the_commands_options_are_the_keywords():
    """Where a command's flag and the function's keyword differ, the API's
    error rendering needs a rename; only the unavoidable ones are left
    (``--lambda``: a Python keyword; ``--adapter``: repeated, one per
    adapter; ``--cache``: ``cache_dir``, a folder, beside ``fresh``)."""
    from loramix.api import RENAMES

    assert RENAMES == {
        "evaluate": {"--adapter": "adapters"},
        "merge": {"--lambda": "lambda_"},
        "run_scenario": {"--cache": "cache_dir"},
    }


# ---- the previous release's names ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return api_env(tmp_path_factory.mktemp("api_names"))


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_tensors(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta and ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all(), k


def _deprecated(*names):
    """``pytest.warns`` for a DeprecationWarning naming all of ``names``, said at the caller's line."""
    return pytest.warns(DeprecationWarning, match=".*".join(names))


def test_old_keywords_warn_and_give_the_same_result(env, tmp_path):
    ads, b, d = env["ads"], env["base"], env["data"]
    with _deprecated("similarity", "adapters_or_paths", "adapters") as w:
        old = loramix.similarity(adapters_or_paths=ads)
    assert w[0].filename == __file__  # the caller's line, where Python shows a __main__'s warning
    assert old.rms.equals(loramix.similarity(ads).rms)

    loramix.sum_into_base(ads, into=b, out=tmp_path / "new")
    with _deprecated("sum_into_base", "base", "into"):
        loramix.sum_into_base(ads, base=b, out=tmp_path / "old")
    _same_tensors(tmp_path / "new", tmp_path / "old")
    with _deprecated("sum_adapters", "adapters_or_paths", "adapters"):
        loramix.sum_adapters(adapters_or_paths=ads, out=tmp_path / "sa-old")
    _same_tensors(loramix.sum_adapters(ads, out=tmp_path / "sa-new"), tmp_path / "sa-old")

    with _deprecated("evaluate", "batch_size", "batch"):
        old = loramix.evaluate(b, data=[d], batch_size=5, device="cpu")
    new = loramix.evaluate(b, data=[d], batch=5, device="cpu")
    assert old[["records", "tokens", "ppl", "nll"]].equals(new[["records", "tokens", "ppl", "nll"]])

    save = loramix.load_adapter(ads[0])
    factors = {n: (m.B, m.A) for n, m in save.modules.items()}
    with _deprecated("save_peft_adapter", "out_dir", "out"):
        loramix.save_peft_adapter(out_dir=tmp_path / "w-old", factors=factors)
    _same_tensors(loramix.save_peft_adapter(tmp_path / "w-new", factors), tmp_path / "w-old")


def test_evaluate_takes_the_record_fields_as_train_adapter_does(env, tmp_path, capsys):
    """``question_field``, ``answer_field``, ``context_field``: the keywords of
    ``train_adapter`` (and the flags of ``eval`` and ``train``); ``evaluate``
    took them as one dict, ``fields``, so train_adapter's keywords were a
    TypeError and a wrong key a TypeError from inside ``load_records``.
    ``fields=`` still works, warned, and gives the same result."""
    b = env["base"]
    rows = [json.loads(line) for line in Path(env["data"]).read_text().splitlines()]
    renamed_file = tmp_path / "qa.jsonl"
    renamed_file.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in rows))
    cols = ["records", "tokens", "ppl", "nll"]
    want = loramix.evaluate(b, data=[env["data"]], limit=8, device="cpu", progress=False)[cols]
    kw = dict(data=[str(renamed_file)], limit=8, device="cpu", progress=False)
    new = loramix.evaluate(b, question_field="q", answer_field="a", context_field=None, **kw)
    assert new[cols].equals(want)
    with _deprecated("evaluate", "fields", "question_field=", "answer_field=") as w:
        old = loramix.evaluate(b, fields={"question_field": "q", "answer_field": "a"}, **kw)
    assert w[0].filename == __file__
    assert old[cols].equals(want)
    from loramix.cli import main

    argv = [
        "eval",
        "--base",
        b,
        "--data",
        str(renamed_file),
        "--limit",
        "8",
        "--device",
        "cpu",
        "--format",
        "json",
    ]
    assert main([*argv, "--question-field", "q", "--answer-field", "a", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)["results"]
    assert [r["ppl"] for r in printed] == list(want["ppl"])  # the command passes its flags as the keywords
    with pytest.raises(LoramixError) as e:
        loramix.evaluate(b, fields={"question": "q"}, **kw)
    assert (
        str(e.value) == "evaluate: fields: 'question' is none of question_field, answer_field, context_field"
    )
    with pytest.raises(LoramixError) as e:
        loramix.evaluate(b, fields={"question_field": "q"}, question_field="q", **kw)
    assert (
        str(e.value)
        == "evaluate: give question_field or its old form fields={'question_field': ...}, not both"
    )


def test_inspect_and_base_import_are_functions_as_the_commands_are(env, tmp_path, capsys):
    """``loramix inspect`` and ``loramix base import`` had no ``loramix.X``: a notebook
    reached for ``loramix.contents`` and ``loramix.gguf_import``, whose errors named the
    commands' flags. The same tables and the same bytes as the commands; errors in keywords."""
    from loramix.cli import main

    from .test_realmodel import llama_gguf

    a = env["ads"][0]
    assert main(["inspect", a, "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    df = loramix.inspect_adapter(a)
    assert df.attrs["sha256"] == printed["sha256"] and df.attrs["totals"] == printed["totals"]
    assert [
        {k: v.item() if hasattr(v, "item") else v for k, v in r.items()} for r in df.to_dict("records")
    ] == (printed["modules"])
    # a loaded adapter's factors are torch's: its norms agree to float64 rounding, not bit for bit
    assert loramix.inspect_adapter(loramix.load_adapter(a))["norm"].tolist() == pytest.approx(
        df["norm"].tolist()
    )

    gguf = llama_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    r = loramix.import_gguf(gguf, out=tmp_path / "api", progress=False)
    assert os.fspath(r) == str(tmp_path / "api") and r["architecture"] == printed_arch(
        main, gguf, tmp_path, capsys
    )
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (
        tmp_path / "cli" / "model.safetensors"
    ).read_bytes()
    with pytest.raises(LoramixError) as e:
        loramix.import_gguf(gguf, out=tmp_path / "api")
    assert str(e.value) == f"{tmp_path / 'api'}: already exists; pass force=True to replace it"


def printed_arch(main, gguf, tmp_path, capsys) -> str:
    """``loramix base import GGUF --out tmp_path/cli``'s architecture, from its line."""
    assert main(["base", "import", str(gguf), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    return capsys.readouterr().out.split(" -> ")[1].split(":")[1].split(",")[0].strip()


@pytest.mark.skipif(not (REPORTS / "fit.json").is_file(), reason="no committed quickstart report")
def test_predict_and_plans_old_keywords(env):
    ads, fit = env["ads"], str(REPORTS / "fit.json")
    new = loramix.predict(ads, fit, method="sum", label="lora")
    with _deprecated("predict", "merge_method", "method"):
        assert loramix.predict(ads, fit, merge_method="sum", label="lora") == new
    with _deprecated("predict", "adapters_or_paths", "adapters"):
        assert loramix.predict(adapters_or_paths=ads, fit=fit, method="sum", label="lora") == new
    with _deprecated("plan", "adapters_or_paths", "adapters"):
        old = loramix.plan(adapters_or_paths=ads, max_group=2)
    assert old.to_json_dict() == loramix.plan(ads, max_group=2).to_json_dict()


def test_old_positional_calls_warn_and_give_the_same_result(env, tmp_path):
    """The previous release's positional forms, as its README wrote them."""
    ads, b, d = env["ads"], env["base"], env["data"]
    with _deprecated("sum_into_base", "into, out", "by position"):
        loramix.sum_into_base(ads, b, tmp_path / "pos", [1.0, 0.5])
    loramix.sum_into_base(ads, into=b, out=tmp_path / "kw", weights=[1.0, 0.5])
    _same_tensors(tmp_path / "pos", tmp_path / "kw")
    with _deprecated("sum_adapters", "out, weights"):
        loramix.sum_adapters(ads, tmp_path / "sa-pos", [2.0, 1.0])
    _same_tensors(loramix.sum_adapters(ads, out=tmp_path / "sa-kw", weights=[2.0, 1.0]), tmp_path / "sa-pos")
    with _deprecated("load_adapter", "name"):
        assert loramix.load_adapter(ads[0], "x").name == "x"

    kw = dict(steps=1, batch=4, max_len=32, eval_size=0, device="cpu")
    with _deprecated("train_adapter", "out"):
        loramix.train_adapter(b, d, tmp_path / "t-pos", **kw)
    loramix.train_adapter(b, d, out=tmp_path / "t-kw", **kw)
    _same_tensors(tmp_path / "t-pos", tmp_path / "t-kw")

    # build_base and run_scenario: the positional out is the out, refused as such before any work
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    for call in (lambda out: loramix.build_base("synthetic:arith", out),
                 lambda out: loramix.run_scenario(QUICKSTART, out)):  # fmt: skip
        with _deprecated("out"), pytest.raises(LoramixError) as e:
            call(tmp_path / "taken")
        assert e.value.where == str(tmp_path / "taken") and "force=True" in e.value.problem


@pytest.mark.parametrize(
    "call, line",
    [
        (lambda e, out: loramix.evaluate(e["base"], data=[e["data"]], batch=4, batch_size=4),
         "evaluate: give batch or its old name batch_size, not both"),
        (lambda e, out: loramix.sum_into_base(e["ads"], e["base"], into=e["base"], out=out),
         "sum_into_base: into given twice, by position and as into="),
        (lambda e, out: loramix.sum_into_base(e["ads"], into=e["base"], base=e["base"], out=out),
         "sum_into_base: give into or its old name base, not both"),
        (lambda e, out: loramix.predict(e["ads"], "fit.json", method="sum", merge_method="sum"),
         "predict: give method or its old name merge_method, not both"),
        (lambda e, out: loramix.similarity(e["ads"], adapters_or_paths=e["ads"]),
         "similarity: give adapters or its old name adapters_or_paths, not both"),
    ],
)  # fmt: skip
def test_both_names_at_once_are_refused(env, tmp_path, call, line):
    with pytest.raises(LoramixError) as e:
        call(env, tmp_path / "out")
    assert str(e.value) == line
    assert not (tmp_path / "out").exists()


def test_deprecation_is_said_at_the_callers_line_through_every_wrapper(tmp_path):
    """``predict`` and ``run_scenario`` have a second wrapper (:func:`loramix.blas.one_openblas_thread`)
    between ``loramix.X`` and :func:`loramix.api.renamed`: the warning is still said at the
    caller's line, not inside loramix, where Python's default filters hide it from a script."""
    with _deprecated("run_scenario", "out") as w, pytest.raises(LoramixError):
        loramix.run_scenario(tmp_path / "none.toml", tmp_path / "out")
    assert [x.filename for x in w if x.category is DeprecationWarning] == [__file__]
    assert (
        str(w[0].message)
        == "run_scenario: passing out by position is deprecated; pass it as a keyword (out=...)"
    )
    with _deprecated("predict", "merge_method") as w, pytest.raises(LoramixError):
        loramix.predict([tmp_path / "a", tmp_path / "b"], tmp_path / "fit.json", merge_method="sum")
    assert [x.filename for x in w if x.category is DeprecationWarning] == [__file__]


def test_too_many_positional_arguments_are_a_type_error(env, tmp_path):
    with pytest.raises(TypeError, match=r"^sum_adapters\(\) takes 1 positional argument but 7 were given$"):
        loramix.sum_adapters(env["ads"], tmp_path / "o", None, False, None, None, True)


# ---- plan and targets, as the commands take them ---------------------------------------------------------------


def test_plan_returns_what_the_command_prints(env, capsys):
    from loramix.cli import main

    ads = env["ads"] + [env["ads"][0]]
    assert main(["plan", *ads, "--max-group", "2", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # the same object, its sentences in keyword terms (the command's "no --fit given")
    assert printed["cost"] == "RMS cosine of the composition (no --fit given)"
    assert loramix.plan(ads, max_group=2).to_json_dict() == {
        **printed,
        "cost": printed["cost"].replace("--", ""),
    }
    with pytest.raises(LoramixError, match="^max_group: must be at least 1, got 0$"):
        loramix.plan(ads, max_group=0)


def test_targets_a_list_of_names_or_a_regex(env, tmp_path):
    """``--targets c_attn,c_fc`` is ``targets=["c_attn", "c_fc"]`` (or a
    tuple); a regex string selecting the same modules trains the same
    adapter."""
    b, d = env["base"], env["data"]
    kw = dict(steps=1, batch=4, max_len=32, eval_size=0, device="cpu")
    loramix.train_adapter(b, d, out=tmp_path / "list", targets=["c_attn", "c_fc"], **kw)
    loramix.train_adapter(b, d, out=tmp_path / "tuple", targets=("c_attn", "c_fc"), **kw)
    loramix.train_adapter(b, d, out=tmp_path / "regex", targets=r".*\.(c_attn|c_fc)", **kw)
    _same_tensors(tmp_path / "list", tmp_path / "tuple")
    _same_tensors(tmp_path / "list", tmp_path / "regex")
    modules = loramix.load_adapter(tmp_path / "list").modules
    assert {n.rpartition(".")[2] for n in modules} == {"c_attn", "c_fc"}
