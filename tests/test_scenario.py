"""Scenario files: validation before any work, the cache, and a small study end to end."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loramix.cli import main
from loramix.scenario.cache import Cache, make_key
from loramix.scenario.config import load_scenario

ROOT = Path(__file__).resolve().parents[1]

# A study small enough for CI: 3 synthetic domains (one pair with template
# overlap), a tiny base built in a few steps, LoRA and D2-LoRA, two seeds.
CI_SCENARIO = """
name = "ci"
seeds = [0, 1]
compositions = ["all-pairs"]

[base.build]
size = "tiny"
steps = 8

[domains.arith]
data = "synthetic:arith"
train = 24
eval = 8

[domains.units]
data = "synthetic:units"
train = 24
eval = 8
overlap = 0.5
overlap_with = "arith"

[domains.dates]
data = "synthetic:dates"
train = 24
eval = 8

[adapters]
methods = ["lora", "d2lora"]
rank = 2
alpha = 8
steps = 3
lr = 5e-3
batch = 8
max_len = 48

[merge]
methods = ["sum", "ties", "svd", "d2-signed"]
ties = { density = 0.5 }
svd = { rank = 2 }
"""

GOOD = """
name = "v"
[base.build]
steps = 5
[domains.a]
data = "synthetic:arith"
train = 10
eval = 5
[domains.b]
data = "synthetic:units"
train = 10
eval = 5
[adapters]
rank = 4
"""


def _write(tmp_path: Path, text: str, name="s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- validation


BAD = [
    # (edit of GOOD, key named in the error, words in the problem)
    (GOOD + "rnak = 3\n", "adapters.rnak", "unknown key"),
    (GOOD.replace('name = "v"', 'name = "v"\nsedes = [1]'), "sedes", "unknown key"),
    (GOOD.replace("rank = 4", 'rank = "four"'), "adapters.rank", "expected an integer"),
    (GOOD.replace("train = 10\neval = 5\n[domains.b]", "train = 1.5\neval = 5\n[domains.b]"),
     "domains.a.train", "expected an integer"),
    (GOOD.replace('data = "synthetic:units"', 'data = "missing/qa.jsonl"'), "domains.b.data", "no such data file"),
    (GOOD.replace('name = "v"', 'name = "v"\ncompositions = [[]]'), "compositions[0]", "empty composition"),
    (GOOD.replace('name = "v"', 'name = "v"\ncompositions = []'), "compositions", "empty"),
    (GOOD.replace('name = "v"', 'name = "v"\ncompositions = [["a", "law"]]'), "compositions[0]", "unknown domain 'law'"),
    (GOOD.replace('name = "v"', 'name = "v"\ncompositions = [["a"]]'), "compositions[0]", "at least 2 domains"),
    (GOOD + '[merge]\nmethods = ["sum", "tie"]\n', "merge.methods", "unknown merge method 'tie'"),
    (GOOD + '[merge]\nmethods = ["ties"]\nties = { density = 1.5 }\n', "merge.ties.density", "outside (0, 1]"),
    (GOOD + '[merge]\nmethods = ["ties"]\n', "merge.ties.density", "missing"),
    (GOOD + '[merge]\nmethods = ["d2-signed"]\n', "merge.methods", "does not apply to lora"),
    (GOOD + '[merge]\nmethods = ["svd"]\nsvd = { rank = 99 }\n', "merge.svd.rank", "stacked rank"),
    (GOOD.replace('data = "synthetic:units"', 'data = "${NO_SUCH_VAR}/x.jsonl"'), "domains.b.data", "unknown variable"),
    (GOOD.replace('data = "synthetic:units"', 'data = "synthetic:poetry"'), "domains.b.data", "unknown synthetic"),
    (GOOD.replace("[base.build]\nsteps = 5", '[base]\npath = "no/model"'), "base.path", "no such model folder"),
    # a file as the base, a folder as the data: both were said to be missing ('no such ...')
    (GOOD.replace("[base.build]\nsteps = 5", '[base]\npath = "small.jsonl"'), "base.path",
     "small.jsonl is not a folder: a base is a Hugging Face model folder (config.json + model.safetensors) or a .gguf"),
    (GOOD.replace('data = "synthetic:units"', 'data = "."'), "domains.b.data", "is a folder, expected a .jsonl"),
    (GOOD.replace('data = "synthetic:units"', 'data = "small.jsonl"'), "domains.b.train", "fewer than"),
    (GOOD.replace("[adapters]", "[adapters]\nmethods = ['lora', 'qlora']"), "adapters.methods", "unknown adapter method"),
    # a method or seed listed twice is refused, as a repeated init always was (they were merged silently)
    (GOOD.replace("[adapters]", "[adapters]\nmethods = ['lora', 'lora']"), "adapters.methods", "'lora' is listed twice"),
    (GOOD.replace("[adapters]", "[adapters]\nmethods = ['lora@4', 'lora@04']"), "adapters.methods",
     "'lora@04' is listed twice"),
    (GOOD.replace("[adapters]", "[adapters]\nmethods = ['lora@\u00b2']"), "adapters.methods", "positive rank"),
    (GOOD + '[merge]\nmethods = ["sum", "ties", "ties"]\nties = { density = 0.5 }\n', "merge.methods",
     "'ties' is listed twice in ['sum', 'ties', 'ties']"),
    # variants: another name with method = "METHOD" (iso-c-rms = { method = "iso-c", flat = "rms" })
    (GOOD + '[merge]\nmethods = ["x"]\nx = { method = "tie" }\n', "merge.x.method", "unknown merge method 'tie'"),
    (GOOD + '[merge]\nmethods = ["a:b"]\n"a:b" = { method = "iso-c" }\n', "merge.a:b", "a variant's name is"),
    (GOOD + '[merge]\nmethods = ["plan"]\nplan = { method = "iso-c" }\n', "merge.plan", "not plan or keep"),
    (GOOD + '[merge]\nmethods = ["ties", "t2"]\nties = { density = 0.5 }\nt2 = { method = "ties", density = 0.5, '
     'sign = "mass" }\n', "merge.t2", "merges as ties does (the method ties with the same parameters)"),
    (GOOD + '[merge]\nmethods = ["iso-c", "iso-c-mean"]\niso-c-mean = { method = "iso-c", flat = "mean" }\n',
     "merge.iso-c-mean", "merges as iso-c does"),
    (GOOD + '[merge]\nmethods = ["ties"]\nties = { method = "ties", density = 0.5 }\n', "merge.ties.method",
     "a merge method's own name"),
    (GOOD + '[merge]\nmethods = ["ties2"]\n', "merge.methods", 'or a variant: [merge.ties2] with method = "METHOD"'),
    (GOOD + '[merge]\nmethods = ["sum"]\nt2 = { density = 0.5 }\n', "merge.t2", "or a variant's name with"),
    (GOOD + '[merge]\nmethods = ["d2s"]\nd2s = { method = "d2-signed" }\n', "merge.methods", "d2s does not apply"),
    (GOOD + '[merge]\nmethods = ["t2"]\nt2 = { method = "ties" }\n', "merge.t2.density", "missing (required by ties"),
    (GOOD.replace('name = "v"', 'name = "v"\nseeds = [0, 1, 0]'), "seeds", "0 is listed twice"),
    (GOOD.replace('name = "v"', 'name = "v/../x"'), "name", "letters, digits"),
    ("name = 'v'\n[domains\n", "", "not valid TOML"),
    (GOOD.replace("rank = 4", "rank = 4\nsteps = 3\nwarmup = 4"), "adapters.warmup", "more than adapters.steps = 3"),
    # a scale alpha / r beyond float32's range either way, or such a tau: the run failed at its first
    # training, after the base and data steps, naming train's --alpha / --tau
    (GOOD.replace("rank = 4", "rank = 4\nalpha = 1e40"), "adapters.alpha", "1e+40 / rank 4 = 2.5e+39 is outside"),
    (GOOD.replace("rank = 4", "rank = 4\nalpha = 1e-40"), "adapters.alpha", "float32's range"),
    (GOOD.replace("rank = 4", "rank = 4\nmethods = ['lora', 'lora@100']\nalpha = 1e-36"), "adapters.alpha",
     "1e-36 / rank 100 = 1e-38 is outside"),
    (GOOD.replace("rank = 4", "rank = 4\nmethods = ['d2lora']\ntau = 1e39"), "adapters.tau", "beyond float32's range"),
    # absurd numbers the old code took: a run of 1e300 epochs (or 2^40 steps) no loop ends; an lr that
    # torch's optimizer step failed on with a traceback; a decay that zeroes every weight each step
    (GOOD.replace("rank = 4", "rank = 4\nepochs = 1e300"), "adapters.epochs", "1e+300 epochs is more than"),
    (GOOD.replace("rank = 4", "rank = 4\nsteps = 1099511627776"), "adapters.steps", "optimizer steps a run"),
    (GOOD.replace("rank = 4", "rank = 4\nwarmup = 1099511627776"), "adapters.warmup", "optimizer steps a run"),
    (GOOD.replace("steps = 5", "steps = 1099511627776"), "base.build.steps", "optimizer steps a run"),
    (GOOD.replace("rank = 4", "rank = 4\nlr = 1e300"), "adapters.lr", "within float32's range"),
    (GOOD.replace("steps = 5", "steps = 5\nlr = 1e300"), "base.build.lr", "within float32's range"),
    (GOOD.replace("rank = 4", "rank = 4\nlr = 0.5\nweight_decay = 2.0"), "adapters.weight_decay",
     "lr x weight_decay = 1 is 1 or more"),
    # what was still unbounded: a pre-training batch of 2^62 windows (drawn with replacement, so no data
    # caps it: the run failed at its first step), 2^62 random groupings to merge and evaluate, and a
    # triples' seed past 64 bits (every other seed is bounded); scenario check took each
    (GOOD.replace("steps = 5", "steps = 5\nbatch = 4611686018427387904"), "base.build.batch",
     "4,611,686,018,427,387,904 is more than the 65,536 a step can take"),
    (GOOD + "[predictors]\n[plan]\nrandom = 4611686018427387904\n", "plan.random",
     "is more than 10,000 random groupings"),
    (GOOD + "[eval]\nbatch_tokens = -1\n", "eval.batch_tokens", "must be at least 0, got -1"),
    (GOOD.replace('name = "v"', 'name = "v"\ncompositions = { pairs = "all", seed = 36893488147419103232 }'),
     "compositions.seed", "is not a seed"),
]  # fmt: skip


@pytest.mark.parametrize("text, key, words", BAD)
def test_bad_scenarios_fail_before_any_work(tmp_path, capsys, text, key, words):
    p = _write(tmp_path, text)
    _write(tmp_path, "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)),
           "small.jsonl")  # fmt: skip
    cache, out = tmp_path / "cache", tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["scenario", "run", str(p), "--out", str(out), "--cache", str(cache), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"loramix: error: {p}") and err.count("\n") == 1, err
    if key:
        assert f"{p}: {key}:" in err, err
    assert words in err, err
    assert not cache.exists() and not out.exists()  # nothing was started
    assert time.perf_counter() - t0 < 20


def test_variables_and_defaults(tmp_path):
    data = tmp_path / "qa"
    data.mkdir()
    (data / "m.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n"
                                          for i in range(30)))  # fmt: skip
    text = GOOD.replace('data = "synthetic:units"', 'data = "${LORAMIX_DATA}/m.jsonl"')
    sub = tmp_path / "scen"
    sub.mkdir()
    p = _write(sub, text)
    sc = load_scenario(p, env={"LORAMIX_DATA": str(data)})
    assert sc.domains["b"].data == str(data / "m.jsonl")
    assert sc.variables == {"LORAMIX_DATA": str(data)}
    # Unset: the first shared/data walking up from the scenario's folder.
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "m.jsonl").write_text((data / "m.jsonl").read_text())
    sc = load_scenario(p, env={})
    assert sc.domains["b"].data == str(shared / "m.jsonl")
    # Defaults and expansions of the rest.
    assert sc.compositions == [("a", "b")] and [m.method for m in sc.merges] == ["sum"]
    assert sc.domains["a"].data == "synthetic:arith?n=15&seed=0"
    assert sc.seeds == (0,) and sc.adapters.epochs == 1.0 and sc.eval.max_len == sc.adapters.max_len
    assert sc.eval.batch_tokens is None  # eval's default cap on a batch's positions
    capped = _write(sub, text + "[eval]\nbatch_tokens = 0\n", "capped.toml")
    assert load_scenario(capped, env={"LORAMIX_DATA": str(data)}).eval.batch_tokens == 0


def test_shipped_scenarios_are_valid():
    """Every shipped scenario passes every check of its keys, as `scenario
    check` makes them: a GGUF base (d2-vs-lora's SmolLM2) checked against its
    header, not imported (8 s of CPU here, 1.8 s from the header; the import
    itself is tests/test_realmodel.py's test_gguf_path_accepted_as_base)."""
    absent = []
    for f in sorted((ROOT / "scenarios").glob("*.toml")):
        try:
            sc = load_scenario(f, import_gguf=False)
        except Exception as e:  # the real-data ones need ../shared/data (and ../shared/models)
            # given-adapters: $LORAMIX_ADAPTERS, the folders its header says how to make
            if any(v in str(e) for v in ("LORAMIX_DATA", "LORAMIX_MODELS", "LORAMIX_ADAPTERS")):
                absent.append(f"{f.name}: {e}")
                continue
            raise
        assert sc.name == f.stem
    if absent:  # the others were checked
        pytest.skip("real QA data, model or adapters absent: " + "; ".join(absent))


def test_compositions_expand():
    text = GOOD + "[domains.c]\ndata = 'synthetic:dates'\ntrain = 10\neval = 5\n"
    text = text.replace('name = "v"', 'name = "v"\ncompositions = ["all-pairs", "all-triples", ["b", "a"]]')
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sc = load_scenario(_write(Path(d), text))
    assert sc.compositions == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]


def test_the_truncation_rule_is_in_the_cache_keys(tmp_path):
    """Adapters, evaluations and dense merges depend on how records are cut
    to max_len: their cache keys carry the rule's version, so an artifact
    made by an earlier rule is made again, not reused."""
    from loramix.data import TRUNCATION
    from loramix.scenario.plan import plan

    text = GOOD + '[merge]\nmethods = ["sum", "ties"]\nties = { density = 0.5 }\n'
    steps = plan(load_scenario(_write(tmp_path, text)))
    cut = {st.cache_kind for st in steps if st.spec and TRUNCATION == (st.spec.get("truncation")
           or (st.spec.get("settings") or {}).get("truncation"))}  # fmt: skip
    assert {"adapter", "eval", "merge"} <= cut, cut  # merge: ties, evaluated as it is made


def test_the_nll_rule_is_in_the_cache_keys(tmp_path):
    """Evaluations, and dense merges evaluated as they are made, carry the
    rule by which loramix.perplexity computes NLL: a cache made by an earlier
    rule (torch's cross_entropy, about 1e-5 off) is not mixed with new numbers.
    Adapters, which no evaluation goes into, keep their keys."""
    from loramix.perplexity import NLL_RULE
    from loramix.scenario.plan import plan

    text = GOOD + '[merge]\nmethods = ["sum", "ties"]\nties = { density = 0.5 }\n'
    steps = plan(load_scenario(_write(tmp_path, text)))
    ruled = [st for st in steps if st.spec and (st.spec.get("settings") or {}).get("nll") == NLL_RULE]
    assert {st.cache_kind for st in ruled} == {"eval", "merge"}
    assert all("/ties/" in st.id for st in ruled if st.cache_kind == "merge")  # the sum is evaluated later


def test_merge_parameters_are_in_the_cache_keys(tmp_path):
    """A dense merge's key (and so its evaluation's) carries the method's
    parameters: a run with another density makes the ties merges again
    instead of reusing the cached ones; what does not depend on it keeps its key."""
    from loramix.scenario.plan import plan

    def keys(density):
        text = GOOD + f'[merge]\nmethods = ["sum", "ties"]\nties = {{ density = {density} }}\n'
        return {st.id: st.key for st in plan(load_scenario(_write(tmp_path, text, name=f"s{density}.toml")))}

    a, b = keys(0.5), keys(0.3)
    assert a.keys() == b.keys()
    changed = {i for i in a if a[i] != b[i]}
    merges = {i for i in a if i.startswith("merge/") and "/ties/" in i}
    assert merges and merges <= changed
    assert all("/ties/" in i for i in changed), changed  # adapters, sums and the rest are reused


def test_a_variant_is_keyed_as_its_method_with_its_parameters(tmp_path, capsys):
    """``iso-c-rms = { method = "iso-c", flat = "rms" }`` has its own steps and
    label, keyed by the method and parameters alone: a study that merged by
    ``iso-c = { flat = "rms" }`` (a side study) made the same merges, found
    cached; beside the plain ``iso-c`` it is a merge of its own."""
    from loramix.scenario.plan import plan

    def steps(merge, name):
        return {st.id: st for st in plan(load_scenario(_write(tmp_path, GOOD + merge, name=name)))}

    variant = steps('[merge]\nmethods = ["iso-c", "iso-c-rms"]\niso-c-rms = { method = "iso-c", flat = "rms" }\n',
                    "v.toml")  # fmt: skip
    side = steps('[merge]\nmethods = ["iso-c"]\niso-c = { flat = "rms" }\n', "side.toml")
    plain = steps('[merge]\nmethods = ["iso-c"]\n', "plain.toml")
    for sid, st in variant.items():
        if "/iso-c-rms/" in sid:
            twin = side[sid.replace("/iso-c-rms/", "/iso-c/")]
            assert st.key == twin.key and st.spec == twin.spec and "iso-c-rms a+b" in st.label
            assert plain[sid.replace("/iso-c-rms/", "/iso-c/")].key != st.key
        elif sid in plain:
            assert st.key == plain[sid].key, sid
    assert any("/iso-c-rms/" in sid for sid in variant)
    sc = load_scenario(tmp_path / "v.toml")
    assert [(m.label, m.method, m.params) for m in sc.merges] == [
        ("sum", "sum", {}), ("iso-c", "iso-c", {}), ("iso-c-rms", "iso-c", {"flat": "rms"})]  # fmt: skip
    assert main(["scenario", "check", str(tmp_path / "v.toml")]) == 0
    assert "; merges sum, iso-c, iso-c-rms\n" in capsys.readouterr().out


def test_a_given_base_tokenizer_is_in_the_cache_keys(tmp_path):
    """A given base folder's key covers its tokenizer files as well as its
    config and weights (its identity): the adapters and evaluations of a
    study read the base through its tokenizer, so a fixed tokenizer makes them
    again instead of reusing the ones tokenized the old way. A file that no
    step reads (a README) keeps every key."""
    from loramix.scenario.plan import plan
    from tests.factories import save_base, tiny_gpt2

    base = save_base(tiny_gpt2(), tmp_path / "base")
    (base / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    (base / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    scen = _write(tmp_path, GOOD.replace("[base.build]\nsteps = 5", f'[base]\npath = "{base}"'))

    def keys():
        return {st.id: st.key for st in plan(load_scenario(scen))}

    before = keys()
    (base / "README.md").write_text("a model card\n")
    assert keys() == before
    (base / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1, "b": 0}}}')
    after = keys()
    assert after["base"] != before["base"]
    trained = [i for i in before if i.startswith(("adapter/", "merged-data/", "eval/"))]
    assert trained and all(after[i] != before[i] for i in trained)
    assert all(after[i] == before[i] for i in before if i.startswith("data/"))  # the splits are the same text


def test_a_warmup_beyond_the_steps_of_an_epoch_names_the_key(tmp_path, capsys):
    """With adapters.epochs the steps are known once the data is read: the
    trainer's refusal names the scenario key and the adapter, not --warmup."""
    p = _write(tmp_path, GOOD.replace("rank = 4", "rank = 4\nwarmup = 1000"))
    rc = main(
        ["scenario", "run", str(p), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"loramix: error: {p}: adapters.warmup: 1000 steps is more than the run's 2 steps"
    ), err
    assert "adapters.lr (adapter lora/0/" in err and "--" not in err, err


# ----------------------------------------------------------------------------- cache


def test_cache_atomic_resume_and_fresh(tmp_path):
    c = Cache(tmp_path / "c")
    spec = {"x": 1}

    def boom(tmp):
        (tmp / "half").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        c.get_or_make("thing", spec, boom)
    assert not c.has("thing", make_key("thing", spec))
    assert list((tmp_path / "c" / "thing").iterdir()) == []  # no half artifact left

    made = []

    def ok(tmp):
        made.append(1)
        (tmp / "v").write_text("1")
        return {"n": 1}

    p = c.get_or_make("thing", spec, ok)
    assert (p / "v").read_text() == "1" and c.record("thing", p)["info"] == {"n": 1}
    assert c.get_or_make("thing", spec, ok) == p and len(made) == 1
    assert c.get_or_make("thing", {"x": 2}, ok) != p and len(made) == 2
    assert [e.status for e in c.log] == ["miss", "hit", "miss"]
    f = Cache(tmp_path / "c", fresh=True)
    f.get_or_make("thing", spec, ok)
    f.get_or_make("thing", spec, ok)  # remade once per run, then reused
    assert [e.status for e in f.log] == ["fresh", "hit"] and len(made) == 3
    # the remade artifact replaced the old one, and neither temporaries nor the old one are left
    assert sorted(q.name for q in (tmp_path / "c" / "thing").iterdir()) == sorted(
        {make_key("thing", spec)[:24], make_key("thing", {"x": 2})[:24]}
    )


def test_derived_results_are_keyed_by_their_inputs_and_loramix_source(tmp_path, monkeypatch):
    """A validation or a figure (Cache.derived) is made once per inputs and
    source: the last bit of an input, or a changed line of loramix, makes it
    again; an interrupted one is never read back."""
    from loramix.scenario import cache as cache_mod

    c = Cache(tmp_path / "c")
    made = []

    def make(tmp):
        made.append(1)
        (tmp / "v").write_text(str(len(made)))

    inputs = {"y": [0.1, float("nan")], "level": 0.9}
    p = c.derived("validation", inputs, make)
    assert c.derived("validation", {"level": 0.9, "y": [0.1, float("nan")]}, make) == p and len(made) == 1
    assert c.derived("validation", {"y": [np.nextafter(0.1, 1), float("nan")], "level": 0.9}, make) != p
    assert len(made) == 2
    monkeypatch.setattr(cache_mod, "source_digest", lambda: "another loramix")
    assert c.derived("validation", inputs, make) != p and len(made) == 3

    def boom(tmp):
        (tmp / "v").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        c.derived("figure", inputs, boom)
    assert c.derived("figure", inputs, make).joinpath("v").read_text() == "4"


def test_a_cache_made_anywhere_is_ignored_by_git(tmp_path):
    """docs/scenarios.md: the cache is ignored by git in whatever folder it is
    made, not only at the top of loramix's own checkout (whose .gitignore
    names it there): a study run from a subfolder of a repository left its
    artifacts for ``git add``. A folder that existed before gets nothing."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        pytest.skip("no git on this machine")
    repo = tmp_path / "repo"
    subprocess.run([git, "init", "-q", str(repo)], check=True)
    made = Cache(repo / "sub" / ".loramix-cache")
    made.get_or_make("thing", {"x": 1}, lambda tmp: (tmp / "v").write_text("1") and None)
    status = subprocess.run([git, "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert status == "", status
    (repo / "mine").mkdir()
    Cache(repo / "mine").get_or_make("thing", {"x": 1}, lambda tmp: None)
    assert not (repo / "mine" / ".gitignore").exists()


def test_derived_results_on_a_cache_that_cannot_be_written(tmp_path, monkeypatch):
    """Where the cache cannot be written (a read-only mount: the temporary
    of a missing validation or figure cannot be made), it is made in a
    private temporary folder instead, once per run, and removed with the
    Cache: a cached rerun on a read-only cache failed with 'Read-only file
    system' naming that temporary. Another error (a full disk) still
    stops the run."""
    import errno
    import os

    from loramix.scenario import cache as cache_mod

    root = tmp_path / "c"
    c = Cache(root)
    made = []

    def make(tmp):
        made.append(tmp)
        (tmp / "v").write_text("drawn")

    there = c.derived("figure", {"n": 1}, make)

    def refused(parent, target, err=errno.EROFS):
        raise OSError(err, os.strerror(err), str(parent / ".lmx-00000000"))

    monkeypatch.setattr(cache_mod, "new_temporary", refused)
    assert c.derived("figure", {"n": 1}, make) == there and len(made) == 1  # a hit writes nothing
    aside = c.derived("figure", {"n": 2}, make)
    assert len(made) == 2 and (aside / "v").read_text() == "drawn" and root not in aside.parents
    assert c.derived("figure", {"n": 2}, make) == aside and len(made) == 2
    assert sorted(q.name for q in (root / "figure").iterdir()) == [there.name]
    monkeypatch.setattr(cache_mod, "new_temporary", lambda p, t: refused(p, t, errno.ENOSPC))
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        c.derived("figure", {"n": 3}, make)
    del c
    assert not aside.exists()


def test_cache_clean_removes_derived_entries_of_another_source(tmp_path, monkeypatch, capsys):
    """``cache clean`` removes the validations and figures that another
    loramix source made (this code never reads them: ~300 KB per study per
    code change piled up) and says how many and how much; it keeps this
    source's, every artifact (an evaluation, a training's adapter: keyed on
    the version, not the source) and an old entry whose lock another maker
    holds (a --fresh run of that code replacing it)."""
    from loramix.scenario import cache as cache_mod
    from loramix.scenario.cache import Making

    root = tmp_path / "c"
    c = Cache(root)

    def make(tmp):
        (tmp / "v").write_bytes(b"x" * 1000)

    ours = [c.derived("figure", {"n": 1}, make), c.derived("validation", {"n": 1}, make)]
    kept = [c.get_or_make("adapter", {"n": 1}, make), c.get_or_make("eval", {"n": 1}, make)]
    monkeypatch.setattr(cache_mod, "source_digest", lambda: "f" * 64)
    old = [c.derived("figure", {"n": 1}, make), c.derived("validation", {"n": 1}, make)]
    being_made = c.derived("figure", {"n": 2}, make)
    monkeypatch.undo()
    assert all((p / "artifact.json").is_file() for p in [*ours, *kept, *old, being_made])
    size = sum(f.stat().st_size for p in old for f in p.rglob("*") if f.is_file())
    capsys.readouterr()
    with Making(being_made, wait=False) as lock:
        assert lock.fd is not None
        assert main(["cache", "clean", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"removed 0 stale temporaries from {root}",
        f"removed 2 derived entries of another loramix source ({size / 1e3:.0f} kB; figure/, validation/) from {root}",
    ]
    assert [p.is_dir() for p in [*ours, *kept, being_made]] == [True] * 5 and not any(p.exists() for p in old)
    leftover = sorted(q.name for q in root.rglob("*") if q.name.startswith("."))
    assert leftover == [".gitignore"]  # no temporary, no lock: the root's own .gitignore alone
    assert main(["cache", "clean", "--dir", str(root)]) == 0
    assert "derived" in capsys.readouterr().out and not being_made.exists()


def test_cache_clean_removes_the_derived_folders_it_empties(tmp_path, monkeypatch, capsys):
    """A ``figure/`` or ``validation/`` folder that ``cache clean`` empties of
    another source's entries goes too (it was left behind, empty); one that
    keeps an entry of this source, or was empty before, stays. A lock taken
    in a folder such a clean removed (between a maker's ``mkdir`` of the kind
    folder and its lock) is taken all the same: the folder is made again."""
    from loramix.scenario import cache as cache_mod
    from loramix.scenario.cache import Making

    root = tmp_path / "c"
    c = Cache(root)

    def make(tmp):
        (tmp / "v").write_text("x")

    ours = c.derived("figure", {"n": 1}, make)
    monkeypatch.setattr(cache_mod, "source_digest", lambda: "f" * 64)
    old = [c.derived("figure", {"n": 2}, make), c.derived("validation", {"n": 1}, make)]
    monkeypatch.undo()
    (root / "empty-before").mkdir()
    assert main(["cache", "clean", "--dir", str(root)]) == 0
    assert "removed 2 derived entries" in capsys.readouterr().out
    assert not any(p.exists() for p in old) and ours.is_dir()
    assert sorted(p.name for p in root.iterdir()) == [".gitignore", "empty-before", "figure"]

    target = root / "validation" / "0123456789abcdef01234567"
    with Making(target) as lock:
        assert lock.fd is not None and lock.path.is_file()
    assert not lock.path.exists()


# A process that makes the artifact ("thing", {"x": argv[2]}) in the cache argv[1], taking
# argv[4] seconds (or, for "go", until a file "go" is beside the cache: at most a minute),
# writes argv[3] into it, and prints its lookup
_MAKER = r"""
import sys, time
from pathlib import Path
from loramix.scenario.cache import Cache
def make(tmp):
    print("making", flush=True)
    if sys.argv[4] == "go":
        go = Path(sys.argv[1]).parent / "go"
        for _ in range(6000):
            if go.exists():
                break
            time.sleep(0.01)
    else:
        time.sleep(float(sys.argv[4]))
    (tmp / "who").write_text(sys.argv[3])
c = Cache(Path(sys.argv[1]))
print("asking", flush=True)
c.get_or_make("thing", {"x": sys.argv[2]}, make)
print(c.log[-1].status, flush=True)
"""


def _maker(root: Path, x: str, who: str, seconds: float | str, until: str):
    """A real process making ("thing", {"x": x}), returned once it printed ``until``."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _MAKER, str(root), x, who, str(seconds)], text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    for line in proc.stdout:
        if line.strip() == until:
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"the maker exited ({proc.returncode}) before {until!r}")


def test_an_artifact_another_process_is_making_is_waited_for(tmp_path, capsys):
    """While a real process makes an artifact, a run asking for it waits and
    then uses it (a hit, its seconds the wait) instead of making it again.
    --fresh does not wait but makes its own. Where the maker is killed
    (SIGKILL), the waiting run makes it itself and removes the killed one's
    temporary (its owner not yet reaped: a zombie is gone). A killed maker
    no one waited for leaves its temporary, which the next run removes as it
    starts, and its lock file, which ``cache clean`` removes."""
    root, made = tmp_path / "c", []

    def make(tmp):
        made.append(tmp)
        (tmp / "who").write_text("us")

    procs = [_maker(root, "1", "them", 2.0, "making")]
    try:
        c = Cache(root)
        p = c.get_or_make("thing", {"x": "1"}, make)
        assert procs[0].wait(timeout=60) == 0 and procs[0].stdout.read().split() == ["miss"]
        assert made == [] and (p / "who").read_text() == "them"
        assert [(e.status, e.seconds > 0) for e in c.log] == [("hit", True)]  # > 0: it waited
        procs.append(_maker(root, "2", "them", 600, "making"))
        f = Cache(root, fresh=True)
        p = f.get_or_make("thing", {"x": "2"}, make)
        assert procs[1].poll() is None and len(made) == 1 and [e.status for e in f.log] == ["miss"]
        assert (p / "who").read_text() == "us"
        procs[1].kill()
        procs[1].wait(timeout=60)
        procs.append(_maker(root, "3", "them", 600, "making"))
        procs.append(_maker(root, "3", "waiter", 0, "asking"))
        time.sleep(1.0)  # the waiter is blocked on the maker's lock by now
        procs[2].kill()
        assert procs[3].wait(timeout=60) == 0 and procs[3].stdout.read().split() == ["making", "miss"]
        assert (root / "thing" / make_key("thing", {"x": "3"})[:24] / "who").read_text() == "waiter"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=60)
    keys = sorted(make_key("thing", {"x": x})[:24] for x in "123")
    two = make_key("thing", {"x": "2"})[:24]
    assert sorted(q.name for q in (root / "thing").iterdir()) == sorted([*keys, f".{two}.lock"])
    capsys.readouterr()
    assert main(["cache", "clean", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"removed 0 stale temporaries from {root}",
        f"removed 1 lock file of killed runs from {root}",
    ]
    assert sorted(q.name for q in (root / "thing").iterdir()) == keys


def test_a_wait_for_another_process_says_so_once(tmp_path, capsys, monkeypatch):
    """A run about to wait for an artifact that a real process is making says
    so in one line on stderr, naming the artifact and the maker's pid (read
    from the lock file, which the maker signs); the wait was silent, seen
    only in cache_log.csv afterwards. A hit or a miss says nothing.

    The maker ends once the line is said (the file "go"), not after 2 s: a
    loaded machine that kept this process from the lock that long found
    the artifact made, no wait, no line (shown with a 2.5 s sleep here)."""
    from loramix.scenario import cache as cache_mod

    root = tmp_path / "c"
    say = cache_mod._say

    def say_then_go(line):
        say(line)
        (tmp_path / "go").touch()

    monkeypatch.setattr(cache_mod, "_say", say_then_go)
    maker = _maker(root, "1", "them", "go", "making")
    try:
        c = Cache(root)
        capsys.readouterr()
        p = c.get_or_make("thing", {"x": "1"}, lambda tmp: None, label="a thing")
        assert maker.wait(timeout=60) == 0 and (p / "who").read_text() == "them"
        assert [e.status for e in c.log] == ["hit"]
        assert capsys.readouterr().err.splitlines() == [
            f"loramix: waiting for thing {p.name} (a thing), being made by another run (pid {maker.pid})"
        ]
        c.get_or_make("thing", {"x": "1"}, lambda tmp: None)
        c.get_or_make("thing", {"x": "2"}, lambda tmp: None)
        assert [e.status for e in c.log] == ["hit", "hit", "miss"] and capsys.readouterr().err == ""
    finally:
        maker.kill()
        maker.wait(timeout=60)


def test_an_interrupt_as_the_lock_is_signed_lets_it_go(tmp_path, monkeypatch):
    """A Ctrl-C (or a kill, raised as Terminated) landing while the maker
    writes its pid into the lock it has just taken: ``Making`` is not entered,
    so nothing would close the file and the lock stayed held for as long as
    the process lived (a notebook driving a study through the API: every
    later wait for that artifact, in it or in another run, never ended).
    The interrupt is raised as the signature is written."""
    import os

    from loramix.scenario.cache import Making

    target = tmp_path / "thing" / "key"
    target.parent.mkdir()

    def interrupted(fd, length):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "ftruncate", interrupted)
    with pytest.raises(KeyboardInterrupt), Making(target):
        pass
    monkeypatch.undo()
    with Making(target, wait=False) as lock:
        assert lock.fd is not None  # taken at once: the interrupted one let go


def test_two_runs_at_once_make_each_artifact_once(tmp_path):
    """Two real ``scenario run`` processes started together on one cache (one
    with a pool of 2 workers): every artifact is made once, by one of them (a
    miss in its cache log), and used by the other (a hit), which waited for
    it where it was being made; both reports are written."""
    import os
    import subprocess
    import sys

    scen = _write(tmp_path, GOOD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [subprocess.Popen([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out",
                              str(tmp_path / f"r{jobs}"), "--cache", str(tmp_path / "cache"), "--quiet", "--jobs",
                              str(jobs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for jobs in (1, 2)]  # fmt: skip
    try:
        errs = [r.communicate(timeout=600)[1] for r in runs]
    finally:
        for r in runs:
            r.kill()
    assert [r.returncode for r in runs] == [0, 0], errs
    statuses: dict[tuple, list] = {}
    for jobs in (1, 2):
        for e in csv.DictReader(open(tmp_path / f"r{jobs}" / "cache_log.csv")):
            statuses.setdefault((e["kind"], e["key"]), []).append(e["status"])
    assert len(statuses) >= 10 and all(sorted(s) == ["hit", "miss"] for s in statuses.values()), statuses


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    scen = _write(d, CI_SCENARIO, "ci.toml")
    out, cache = d / "reports" / "ci", d / "cache"
    t0 = time.perf_counter()
    rc = main(["scenario", "run", str(scen), "--out", str(out), "--cache", str(cache), "--quiet"])
    first = time.perf_counter() - t0
    assert rc == 0
    log1 = list(csv.DictReader(open(out / "cache_log.csv")))
    t0 = time.perf_counter()
    rc = main(["scenario", "run", str(scen), "--out", str(out), "--cache", str(cache), "--quiet"])
    second = time.perf_counter() - t0
    assert rc == 0
    log2 = list(csv.DictReader(open(out / "cache_log.csv")))
    return {"out": out, "cache": cache, "scen": scen, "first": first, "second": second, "log1": log1,
            "log2": log2}  # fmt: skip


def test_every_artifact_is_written(study):
    out = study["out"]
    for f in ["report.md", "results.csv", "evaluations.csv", "report.json", "fit.json", "cache_log.csv",
              "similarity_per_module.csv", "similarity_lora.png", "similarity_d2lora.png", "delta_vs_cosine.png",
              "cosine_by_layer.png", "delta_by_method.png"]:  # fmt: skip
        p = out / f
        assert p.is_file() and p.stat().st_size > 0, f
        if f.endswith(".png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for words in ["## Setup", "Naive sum vs merged-data training: lora", "d2lora", "Δppl % by merge method",
                  "Does similarity predict interference?", "## Timings and environment", "torch 2.", "arith+units",
                  "batch 16 (at most `batch` records of the domain's mean length in positions)"]:  # fmt: skip
        assert words in md, words
    assert not list(out.parent.glob(".ci.tmp-*"))  # the report was renamed into place


def test_numbers_are_consistent(study):
    out = study["out"]
    rep = json.loads((out / "report.json").read_text())
    res = pd.read_csv(out / "results.csv")
    ev = pd.read_csv(out / "evaluations.csv")
    # results.csv and report.json hold the same rows.
    assert len(res) == len(rep["results"])
    for row, jrow in zip(res.to_dict(orient="records"), rep["results"]):
        for k, v in jrow.items():
            if isinstance(v, float):
                assert row[k] == pytest.approx(v, rel=1e-9), k
            elif v is None:
                assert pd.isna(row[k]), k
            else:
                assert row[k] == v, k
    # Every expected row: 2 methods x 2 seeds x 3 pairs x applicable merges.
    per = {"lora": {"sum", "ties", "svd"}, "d2lora": {"sum", "ties", "d2-signed"}}
    for am, ms in per.items():
        sub = res[res["adapter_method"] == am]
        assert set(sub["merge_method"]) == ms and len(sub) == 2 * 3 * len(ms)
    # delta % recomputed from the report's own perplexities, themselves pooled from the evaluations.
    for r in res.itertuples():
        doms = r.composition.split("+")
        sel = ev[(ev.adapter_method == r.adapter_method) & (ev.seed == r.seed) & ev.domain.isin(doms)]

        def pooled(model, sel=sel, doms=doms):
            s = sel[sel.model == model]
            assert len(s) == len(doms)
            return math.exp(s.nll_sum.sum() / s.tokens.sum())

        ppl_m = pooled(f"merge:{r.merge_method}:{r.composition}")
        ppl_md = pooled(f"merged-data:{r.composition}")
        assert r.ppl_merge == pytest.approx(ppl_m, rel=1e-9)
        assert r.ppl_merged_data == pytest.approx(ppl_md, rel=1e-9)
        assert r.delta_ppl_pct == pytest.approx(
            100 * (r.ppl_merge - r.ppl_merged_data) / r.ppl_merged_data, rel=1e-9
        )
        assert r.eval_tokens == sel[sel.model == "base"].tokens.sum()
        assert r.ppl_merge < 1e4 and r.ppl_merged_data < 1e4
    # The pairwise cosine is the similarity matrix entry of that seed.
    for r in res.itertuples():
        sim = next(
            s for s in rep["similarity"] if s["adapter_method"] == r.adapter_method and s["seed"] == r.seed
        )
        a, b = r.composition.split("+")
        i, j = sim["names"].index(a), sim["names"].index(b)
        assert r.rms_cosine == pytest.approx(sim["rms"][i][j], rel=1e-12)
        assert 0 <= r.rms_cosine <= 1
    # Seed means and spread, then the fit, recomputed from results.csv.
    fit = json.loads((out / "fit.json").read_text())
    summary = pd.DataFrame(rep["summary"])
    for (am, mm), g in res.groupby(["adapter_method", "merge_method"]):
        means = g.groupby("composition")[["rms_cosine", "delta_ppl_pct"]].mean()
        stds = g.groupby("composition")["delta_ppl_pct"].std(ddof=1)
        s = summary[(summary.adapter_method == am) & (summary.merge_method == mm)].set_index("composition")
        assert np.allclose(s.loc[means.index, "delta_ppl_pct"], means["delta_ppl_pct"], rtol=1e-10)
        assert np.allclose(s.loc[stds.index, "delta_ppl_pct_std"], stds, rtol=1e-10)
        f = next(f for f in fit["fits"] if f["adapter_method"] == am and f["merge_method"] == mm)
        slope, intercept = np.polyfit(means["rms_cosine"], means["delta_ppl_pct"], 1)
        assert f["n"] == 3
        assert f["slope"] == pytest.approx(slope, rel=1e-8, abs=1e-9)
        assert f["intercept"] == pytest.approx(intercept, rel=1e-8, abs=1e-9)
        assert f["pearson_r"] == pytest.approx(
            np.corrcoef(means["rms_cosine"], means["delta_ppl_pct"])[0, 1], rel=1e-8
        )
        assert f["loo_rmse"] is not None


def _kept_by_hand(ev: pd.DataFrame, am: str, comp: str, mm: str) -> tuple[float, float, str]:
    """A composition's worst-member share of its gain kept by merge ``mm``,
    from evaluations.csv alone: per member and seed 100 (base - merge) /
    (base - own) where the own adapter beats the base, averaged over seeds;
    the lowest member's mean, its sample std over seeds and its name."""
    member = {}
    for d in comp.split("+"):
        vals = []
        for seed in sorted(ev["seed"].unique()):
            e = ev[(ev.adapter_method == am) & (ev.seed == seed) & (ev.domain == d)].set_index("model")["ppl"]
            base, own, merge = e["base"], e[f"adapter:{d}"], e[f"merge:{mm}:{comp}"]
            if base > own:
                vals.append(100 * (base - merge) / (base - own))
        if vals:
            member[d] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan)
    if not member:
        return math.nan, math.nan, ""
    worst = min(member, key=lambda d: member[d][0])
    return (*member[worst], worst)


def test_which_adapters_compose(study):
    """The report's "Which adapters compose?" rows, recomputed from
    evaluations.csv and results.csv: each method's worst-member kept gain,
    the best method, the verdict at 90 / 50 %, the rank, the seed-spread
    flags (two seeds here); the CSV, report.json and report.md agree; the
    pair heatmap is written."""
    out = study["out"]
    ev, res = pd.read_csv(out / "evaluations.csv"), pd.read_csv(out / "results.csv")
    csv_rows = pd.read_csv(out / "composability.csv", keep_default_na=False, na_values=[""])
    rep = json.loads((out / "report.json").read_text())
    assert len(csv_rows) == len(rep["composability"]) == len(res.groupby(["adapter_method", "composition"]))
    for row, jrow in zip(csv_rows.to_dict(orient="records"), rep["composability"]):
        assert (row["adapter_method"], row["composition"], row["best_method"]) == (
            jrow["adapter_method"], jrow["composition"], jrow["best_method"])  # fmt: skip
    for r, jrow in zip(csv_rows.to_dict(orient="records"), rep["composability"]):
        g = res[(res.adapter_method == r["adapter_method"]) & (res.composition == r["composition"])]
        methods = list(dict.fromkeys(g["merge_method"]))
        figs = {m: _kept_by_hand(ev, r["adapter_method"], r["composition"], m) for m in methods}
        for m in methods:  # every method's figure, then the best one's
            assert r[f"kept_worst_pct_{m}"] == pytest.approx(figs[m][0], rel=1e-9)
        best = max(methods, key=lambda m: figs[m][0])
        assert r["best_method"] == best and r["kept_worst_pct"] == pytest.approx(figs[best][0], rel=1e-9)
        assert (
            r["kept_worst_pct_std"] == pytest.approx(figs[best][1], rel=1e-9)
            and r["worst_member"] == figs[best][2]
        )
        k = r["kept_worst_pct"]
        assert r["verdict"] == ("composes" if k >= 90 else "partly" if k >= 50 else "does not compose")
        assert r["retention_pct"] == pytest.approx(
            g[g.merge_method == best]["retention_pct"].mean(), rel=1e-9
        )
        runner = max((m for m in methods if m != best), key=lambda m: figs[m][0])
        assert r["runner_up"] == runner
        # the flags as report.json has them (booleans; the CSV's are text)
        assert jrow["lead_within_spread"] == (k - figs[runner][0] < max(figs[best][1], figs[runner][1]))
        assert jrow["verdict_within_spread"] == (min(abs(k - 90), abs(k - 50)) < figs[best][1])
        assert r["n_seeds"] == 2
    for _, g in csv_rows.groupby("adapter_method"):
        assert list(g["rank"]) == list(range(1, len(g) + 1))
        assert list(g["kept_worst_pct"]) == sorted(g["kept_worst_pct"], reverse=True)
    md = (out / "report.md").read_text()
    sec = md[md.index("## Which adapters compose?") : md.index("## Summary")]
    assert "Figures are means over 2 seeds" in sec and "One training seed" not in sec
    kinds = list(dict.fromkeys(csv_rows["adapter_method"]))
    blocks = {am: sec[sec.index(f"**{am}**, ") :] for am in kinds}  # each kind's count line and table
    for r in csv_rows.to_dict(orient="records"):  # three pairs: every row listed, with its verdict and figure
        lines = blocks[r["adapter_method"]].splitlines()
        line = next(ln for ln in lines if ln.startswith(f"| {r['rank']} | {r['composition']} |"))
        assert (
            r["verdict"] in line and f"| {r['kept_worst_pct']:.0f} ± {r['kept_worst_pct_std']:.0f} |" in line
        )
    png = out / "kept_gain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every evaluation keeps its records' NLL (they add up to its total) and every composition its interval
    for e in rep["evaluations"]:  # the records' tokens kept once per domain
        assert sum(rep["record_tokens"][e["domain"]]) == e["tokens"]
        assert sum(e["record_nll"]) == pytest.approx(e["nll_sum"], rel=1e-12)
        # "nll" per scored token, as `loramix eval` gives it; ppl its exp
        assert e["nll"] == e["nll_sum"] / e["tokens"]
        assert math.exp(e["nll"]) == pytest.approx(e["ppl"], rel=1e-12)
    assert "record_nll" not in ev.columns
    assert (csv_rows["kept_worst_pct_lo"] <= csv_rows["kept_worst_pct_hi"]).all()
    assert list(csv_rows.columns[-3:]) == [
        "kept_worst_pct_lo",
        "kept_worst_pct_hi",
        "verdict_within_eval_noise",
    ]
    assert "paired bootstrap" in sec and "not computed" not in sec


def _cached_record_tokens(cache: Path) -> dict[str, list]:
    """``{domain: [each distinct record_tokens list]}`` over every evaluation
    the study's cache holds (eval steps, merges with their evaluation)."""
    seen: dict[str, list] = {}

    def walk(x):
        for k, v in x.items() if isinstance(x, dict) else ():
            if isinstance(v, dict) and "record_tokens" in v:
                lists = seen.setdefault(k, [])
                lists += [] if v["record_tokens"] in lists else [v["record_tokens"]]
            else:
                walk(v)

    for f in cache.glob("*/*/result.json"):
        walk(json.loads(f.read_text()))
    return seen


def test_report_json_keeps_record_tokens_once_per_domain(study):
    """report.json keeps each domain's record token counts once
    (``record_tokens``), the evaluations only their ``record_nll``: every
    evaluation the cache holds scored the same tokens on a domain, and the
    composability rows, eval intervals included, are the same to the bit as
    computed from report.json with the full list in each evaluation (the
    layout before) and as re-rendered from report.json itself."""
    from loramix.io.outputs import json_safe
    from loramix.scenario import compose
    from loramix.scenario.evaluations import KEY, evaluations

    rep = json.loads((study["out"] / "report.json").read_text())
    cached = _cached_record_tokens(study["cache"])
    assert set(cached) == set(rep["domains"]) == set(rep["record_tokens"])
    for d, lists in cached.items():
        assert lists == [rep["record_tokens"][d]] and len(lists[0]) == rep["domains"][d]["eval"]
    assert all("record_tokens" not in e and len(e["record_nll"]) for e in evaluations(rep))
    full = {k: v for k, v in rep.items() if k not in ("record_tokens", "composability", KEY)}
    full["evaluations"] = [
        {**e, "record_tokens": rep["record_tokens"][e["domain"]]} for e in evaluations(rep)
    ]
    rows = compose.compute(full)
    assert any(r["kept_worst_pct_lo"] is not None for r in rows)
    assert json_safe(rows) == rep["composability"]  # NaN as None, as report.json writes them
    again = compose.compute({k: v for k, v in rep.items() if k != "composability"})
    assert json_safe(again) == json_safe(rows)


def test_report_json_keeps_the_base_evaluation_once(study, tmp_path):
    """report.json keeps the base's evaluation once (``base_evaluation``): it
    was repeated in every adapter label and seed, though one model on the
    same eval splits. Rendered from it and from the repeated form (as
    report.json had it before), report.md, every CSV and every figure are the
    same bytes; the committed reports (the repeated form) store it once and
    give it back as it was; base rows that differ between blocks are refused."""
    from loramix.scenario.evaluations import KEY, compact, evaluations, expand
    from loramix.scenario.report import write_report

    rep = json.loads((study["out"] / "report.json").read_text())
    labels = list(dict.fromkeys((e["adapter_method"], e["seed"]) for e in rep["evaluations"]))
    assert len(labels) >= 2 and not any(e["model"] == "base" for e in rep["evaluations"])
    assert sorted(b["domain"] for b in rep[KEY]) == sorted(rep["domains"]) and all(
        b["record_nll"] for b in rep[KEY]
    )
    full = evaluations(rep)
    assert sum(e["model"] == "base" for e in full) == len(labels) * len(rep["domains"])
    repeated = {**{k: v for k, v in rep.items() if k != KEY}, "evaluations": full}
    for form, r in (("once", rep), ("repeated", repeated)):
        (tmp_path / form).mkdir()
        write_report(tmp_path / form, r)
    files = sorted(p.name for p in (tmp_path / "once").iterdir() if p.name != "report.json")
    assert files == sorted(p.name for p in (tmp_path / "repeated").iterdir() if p.name != "report.json")
    assert "evaluations.csv" in files and "composability.csv" in files and "kept_gain.png" in files
    for f in files:
        assert (tmp_path / "once" / f).read_bytes() == (tmp_path / "repeated" / f).read_bytes(), f
    assert (tmp_path / "once" / "evaluations.csv").read_bytes() == (
        study["out"] / "evaluations.csv"
    ).read_bytes()
    assert compact(full) == (rep["evaluations"], rep[KEY])
    for name in ("real-14-domains", "given-adapters"):  # the committed reports: either form gives them back
        committed = json.loads((ROOT / "reports" / name / "report.json").read_text())
        old = evaluations(committed)  # the base's rows in every block, as report.json had them before
        rows, base = compact(old)
        assert len(rows) < len(old) and expand(rows, base) == old
        if KEY in committed:  # written in the new form: stored once, as compact gives it
            assert (rows, base) == (committed["evaluations"], committed[KEY])
    i = max(i for i, e in enumerate(full) if e["model"] == "base")
    bad = [*full[:i], {**full[i], "ppl": full[i]["ppl"] * (1 + 1e-12)}, *full[i + 1 :]]
    with pytest.raises(ValueError, match=f"base evaluation of .* differs from .* on {full[i]['domain']} "):
        compact(bad)


def test_an_evaluation_with_other_record_tokens_is_refused():
    """Two evaluations on one domain with different record token counts are
    not the same records: assembling the report refuses them, naming both."""
    from loramix.scenario.assemble import _Tables

    t = _Tables()
    ev = {"ppl": 2.0, "tokens": 5, "nll_sum": 3.4, "record_nll": [1.0, 2.4], "record_tokens": [2, 3]}
    t.add_evals("lora", 0, "base", {"a": ev})
    t.add_evals("lora", 0, "adapter:a", {"a": ev})
    assert t.record_tokens == {"a": [2, 3]} and "record_tokens" not in t.evaluations[1]
    with pytest.raises(ValueError, match=r"eval split a: lora/0/adapter:b .* than lora/0/base"):
        t.add_evals("lora", 0, "adapter:b", {"a": {**ev, "record_tokens": [3, 2]}})


def test_an_old_report_renders_which_adapters_compose():
    """A report.json written before the section (the committed real study,
    one seed, as it was written before ``composability`` and the per-record
    NLL were kept) renders it from its evaluations, after the answer and
    before the plan, and says the spread is not measured."""
    from loramix.scenario import compose
    from loramix.scenario.report import _View

    report = json.loads((ROOT / "reports" / "real-14-domains" / "report.json").read_text())
    report.pop("composability", None)
    for e in report["evaluations"]:
        e.pop("record_nll", None), e.pop("record_tokens", None)
    sec = compose.section(report, _View(report))
    text = "\n".join(sec)
    assert "One training seed: the seed-to-seed spread is not measured" in text
    # no per-record NLL in its evaluations: no eval interval, said once, not per row
    assert text.count("The eval-split interval is not computed") == 1 and "paired bootstrap" not in text
    assert "within eval noise" not in text and "eval interval |" not in text  # nor an empty column
    rows = compose.compute(report)
    assert all(r["kept_worst_pct_lo"] is None and r["verdict_within_eval_noise"] is None for r in rows)
    for am in ("lora", "lora:shared"):
        rs = [r for r in rows if r["adapter_method"] == am]
        counts = [sum(r["verdict"] == v for r in rs) for v in ("composes", "partly", "does not compose")]
        assert sum(counts) == len(rs) == 101
        assert (f"**{am}**, 101 compositions: {counts[0]} compose, {counts[1]} partly, {counts[2]} do not"
                in text)  # fmt: skip
    # law+sql by ties, lora: law keeps -94 % of its gain (worse than the base), sql nearly all of it
    r = next(r for r in rows if r["adapter_method"] == "lora" and r["composition"] == "law+sql")
    assert (r["best_method"], r["worst_member"], r["verdict"]) == ("ties", "law", "does not compose")
    assert r["kept_worst_pct"] == pytest.approx(-94.24, abs=0.01)


def test_second_run_is_cached_and_quick(study):
    log1, log2 = study["log1"], study["log2"]
    made1 = [e for e in log1 if e["status"] != "hit"]
    assert {e["kind"] for e in made1} >= {"base", "adapter", "eval", "merge", "data"}
    # 2 methods x 2 seeds x (3 domain + 3 merged-data adapters)
    assert sum(e["kind"] == "adapter" for e in made1) == 24
    assert log2 and all(e["status"] == "hit" for e in log2), [e for e in log2 if e["status"] != "hit"]
    assert len(log2) == len(log1)
    assert study["second"] < 30, study["second"]


def test_progress_lines_where_stderr_is_a_file(study, capsys, monkeypatch):
    """Run in the background with stderr in a file, a study draws no bar (its
    control characters) but says in plain lines how far it is."""
    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "0")
    capsys.readouterr()
    assert (
        main(
            [
                "scenario",
                "run",
                str(study["scen"]),
                "--out",
                str(study["out"]),
                "--cache",
                str(study["cache"]),
            ]
        )
        == 0
    )
    import re

    from loramix.scenario.plan import plan

    out, err = capsys.readouterr()
    assert "\r" not in err and "\x1b" not in err
    # and the report's line on stdout says so: the run made nothing (it said only its seconds)
    (report,) = [ln for ln in out.splitlines() if ln.startswith("report: ")]
    assert re.fullmatch(
        r"report: .*/report\.md \(\d+\.\d s; 0 artifacts made, [1-9]\d* from the cache\)", report
    ), report
    lines = [ln for ln in err.splitlines() if ln.startswith("scenario: ") and " steps (" in ln]
    k = len(lines)  # one a step, as the interval is 0; all of them cached but the LoRA similarity,
    # which has no cache entry: it was counted "from the cache", on an empty cache too
    n = sum(s.kind == "similarity" and s.cache_kind is None for s in plan(load_scenario(study["scen"])))
    assert n >= 1
    want = f"scenario: {k}/{k} steps (0 made, {k - n} from the cache, {n} not cached), "
    assert k > 10 and lines[-1].startswith(want), lines[-1]


def test_default_jobs_one_per_core_on_the_cpu(monkeypatch, capsys, tmp_path):
    """A run given neither --jobs, --threads nor --executor uses a worker per
    usable core (at most 4) on the CPU, one on a GPU; $LORAMIX_JOBS
    overrides, and a bad value is one line naming it."""
    import os

    from loramix.scenario import executors
    from loramix.scenario.executors import AUTO_JOBS_MAX, default_jobs

    monkeypatch.delenv("LORAMIX_JOBS")
    cores = len(os.sched_getaffinity(0))
    assert default_jobs("cpu") == max(1, min(cores, AUTO_JOBS_MAX))
    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_jobs("cpu") == AUTO_JOBS_MAX and default_jobs("cuda:0") == 1
    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: {0})
    assert default_jobs("cpu") == 1
    monkeypatch.setenv("LORAMIX_JOBS", "3")
    assert default_jobs("cpu") == 3 and default_jobs("cuda:0") == 3
    monkeypatch.setenv("LORAMIX_JOBS", " ")  # set to nothing: as unset
    assert default_jobs("cpu") == 1 and default_jobs("cuda:0") == 1
    monkeypatch.setenv("LORAMIX_JOBS", "0")
    p = _write(tmp_path, GOOD)
    assert (
        main(["scenario", "run", str(p), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    )
    err = capsys.readouterr().err
    assert err == "loramix: error: LORAMIX_JOBS: must be a whole number of at least 1, got '0'\n", err
    assert not (tmp_path / "o").exists()


def test_default_workers_only_where_the_plan_has_enough_to_spread(monkeypatch, capsys, tmp_path):
    """Without --jobs, --threads and --executor, workers start only where the
    plan has AUTO_MIN_TRAININGS trainings per worker: a small study runs
    serially (workers' start-up would cost more than they save), and
    `scenario check` estimates it so."""
    from types import SimpleNamespace

    from loramix.scenario import executors
    from loramix.scenario.executors import AUTO_MIN_TRAININGS, worth_workers

    def steps(n_train):
        return [SimpleNamespace(group="train")] * n_train + [SimpleNamespace(group="evaluate")] * 50

    assert worth_workers(steps(2 * AUTO_MIN_TRAININGS), 2) and not worth_workers(
        steps(2 * AUTO_MIN_TRAININGS - 1), 2
    )
    monkeypatch.delenv("LORAMIX_JOBS")
    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: {0, 1})
    p = _write(tmp_path, GOOD)  # 2 domain adapters and 1 merged-data adapter: 3 trainings
    assert main(["scenario", "check", str(p), "--cache", str(tmp_path / "c")]) == 0
    assert "with 2 jobs" not in capsys.readouterr().out
    out = tmp_path / "o"
    assert (
        main(["scenario", "run", str(p), "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    )
    ex = json.loads((out / "report.json").read_text())["executor"]
    assert ex == {"name": "serial", "jobs": 1, "chosen": "too few trainings for 2 workers"}, ex


def test_default_jobs_odd_values_and_check_says_no_ok_first(monkeypatch, capsys, tmp_path):
    """$LORAMIX_JOBS other than ASCII digits is the one-line error, not a
    traceback ("²" passed str.isdigit and failed int()); and `scenario check`
    refuses it (and a --device it cannot use) before printing "ok"."""
    from loramix.errors import UsageError
    from loramix.scenario.executors import default_jobs

    for bad in ("\u00b2", "+2", "1.5", "0"):  # (empty: as unset)
        monkeypatch.setenv("LORAMIX_JOBS", bad)
        with pytest.raises(UsageError, match="LORAMIX_JOBS"):
            default_jobs("cpu")
    monkeypatch.setenv("LORAMIX_JOBS", " 3 ")
    assert default_jobs("cpu") == 3
    p = _write(tmp_path, GOOD)
    monkeypatch.setenv("LORAMIX_JOBS", "0")
    assert main(["scenario", "check", str(p), "--cache", str(tmp_path / "c")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("loramix: error: LORAMIX_JOBS:"), (out, err)


def test_a_cache_that_is_a_file_is_one_line_before_anything(monkeypatch, capsys, tmp_path):
    """$LORAMIX_CACHE naming a file: ``scenario check`` said ok (and estimated
    from it), the run failed naming a path inside it (``.../data: Not a
    directory``). Both now name the file, before printing or writing anything."""
    p = _write(tmp_path, GOOD)
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    monkeypatch.setenv("LORAMIX_CACHE", str(cache))
    out = tmp_path / "o"
    for argv in (["scenario", "check", str(p)], ["scenario", "run", str(p), "--out", str(out), "--quiet"]):
        assert main(argv) == 2
        o, err = capsys.readouterr()
        assert (
            o == ""
            and err
            == f"loramix: error: {cache}: is not a folder: the scenario cache (--cache, or $LORAMIX_CACHE) must be one\n"
        ), (o, err)
    assert not out.exists() and cache.read_text() == "not a folder"


def test_processes_submit_no_more_steps_than_workers():
    """The processes executor hands the pool at most ``jobs`` steps at once,
    so ``on_start`` (the progress line's "under way for") is when a step
    starts, not when it was queued behind the running ones: with 2 workers and
    6 ready 5-minute steps the third was "under way for 9 min" after 4."""
    from types import SimpleNamespace

    from loramix.scenario.executors import Outcome, _schedule

    steps = [SimpleNamespace(id=f"s{i}", deps=[]) for i in range(6)]
    in_flight, most, started = set(), 0, []

    def submit(st, deps):
        nonlocal most
        in_flight.add(st.id)
        most = max(most, len(in_flight))
        return st.id

    def wait_any(handles):
        h = sorted(handles)[0]
        in_flight.discard(h)
        yield h, Outcome({})

    out = _schedule(
        steps, submit, wait_any, lambda st, o: None, on_start=lambda st: started.append(st.id), slots=2
    )
    assert sorted(out) == [st.id for st in steps] and started == [st.id for st in steps]
    assert most == 2, most


def test_the_parent_of_workers_leaves_torch_alone(tmp_path):
    """A run whose steps workers compute (--jobs 2) does not import torch
    nor set its threads in the parent, which computes nothing: that import
    (2-3 s of CPU) came before the first worker's start, on the quickstart's
    critical path (its base build). A serial run, and an auto one that stays
    serial (GOOD: 3 trainings), still do, and give them back after."""
    from loramix.scenario.cache import Cache
    from loramix.scenario.executors import ProcessExecutor, SerialExecutor
    from loramix.scenario.plan import plan, prepare_data
    from loramix.scenario.runner import Runner
    from loramix.scenario.steps import StepContext

    sc = load_scenario(_write(tmp_path, GOOD))
    data = prepare_data(sc)
    steps, cache = plan(sc, data), Cache(tmp_path / "c")
    ctx = StepContext(sc, data, cache, "cpu")
    for ex, computes in (
        (ProcessExecutor(2), False),
        (ProcessExecutor(2, auto=True), True),
        (SerialExecutor(), True),
    ):
        r = Runner(sc, cache=cache, device="cpu", executor=ex)
        r._computing(ctx, steps)
        assert (r._saved is not None) == computes, ex
        r._computed()
    assert (
        ProcessExecutor(2, auto=True).computes_here(steps, done={"base": None}) is False
    )  # decided by the first batch


def test_processes_start_their_workers_with_the_first_step(monkeypatch):
    """Right after the first computing step the pool gets a no-op per further
    worker, so the workers start (torch, transformers: seconds) beside that
    step, the base build that runs alone, not after it; no more workers than
    computing steps (a rerun missing one adapter starts one)."""
    import concurrent.futures as cf
    from types import SimpleNamespace

    import loramix.scenario.executors as ex

    submitted = []

    class Pool:
        def __init__(self, *a, **k):
            pass

        def submit(self, fn, *args):
            submitted.append(args[0].id if fn is ex._worker_run else fn.__name__)
            f = cf.Future()
            f.set_result(ex.Outcome({}) if fn is ex._worker_run else None)
            return f

        def shutdown(self, **k):
            pass

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(ex, "reads_back", lambda ctx, st: st.cached)
    monkeypatch.setattr(ex, "_timed", lambda ctx, st, deps: ex.Outcome({}))
    ctx = SimpleNamespace(device="cpu", payload=lambda: {})
    for computing, started in ((6, 2), (2, 1), (1, 0)):
        submitted.clear()
        steps = [SimpleNamespace(id="base", deps=[], cached=False)]
        steps += [SimpleNamespace(id=f"a{i}", deps=["base"], cached=i >= computing - 1) for i in range(5)]
        ex.ProcessExecutor(jobs=3).run(steps, ctx, lambda st, o: None)
        assert submitted[: 1 + started] == ["base"] + ["_worker_started"] * started, submitted
        assert submitted.count("_worker_started") == started
        assert [x for x in submitted if x != "_worker_started"] == ["base"] + [
            f"a{i}" for i in range(computing - 1)
        ]


def test_progress_line_while_one_step_runs_long(capsys, monkeypatch):
    """A step that runs for minutes (a base build) still gets its line a
    minute, naming it, where stderr is a file; none before it has run that
    long, and none once the step is done."""
    from types import SimpleNamespace

    from loramix.scenario import runner

    monkeypatch.setenv("LORAMIX_PROGRESS_EVERY", "1")
    prog = runner._Progress(3)
    base = SimpleNamespace(id="base", kind="base", label="tiny gpt2", group="base")
    started = time.monotonic()
    prog.start(base)
    time.sleep(0.5)
    err = capsys.readouterr().err
    if time.monotonic() - started < 1.0:  # a loaded machine may have kept this thread away past 1 s
        assert "under way" not in err
    # Polled, not slept for a fixed time: the line is due about 2 s in (the thread looks once a
    # second), and a loaded machine may wake that thread late.
    beats, deadline = [], time.monotonic() + 60
    while not beats and time.monotonic() < deadline:
        time.sleep(0.1)
        beats = [ln for ln in capsys.readouterr().err.splitlines() if "under way" in ln]
    assert (
        beats
        and beats[0].startswith("scenario: ")
        and "0/3 steps done; base: tiny gpt2 under way for " in beats[0]
    )
    prog.done(base, SimpleNamespace(seconds=2.7, events=[]))
    capsys.readouterr()
    time.sleep(2.2)
    prog.close()
    assert "under way" not in capsys.readouterr().err


def test_an_interrupted_run_does_not_leave_its_bar_saying_done(monkeypatch):
    """Ctrl-C at step 15 of 27 left '15/27 [...] done' above 'loramix:
    interrupted' on the terminal (close() wrote "done" whatever the count).
    Now the bar says done only once every step has run."""
    import io
    import sys
    from types import SimpleNamespace

    from loramix.scenario import runner

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for ran, done in ((1, False), (3, True)):
        monkeypatch.setattr(sys, "stderr", Terminal())
        prog = runner._Progress(3)
        for i in range(ran):
            step = SimpleNamespace(id=f"s{i}", kind="eval", label=f"model {i}", group="evaluate")
            prog.start(step)
            prog.done(step, SimpleNamespace(seconds=0.1, events=[]))
        prog.close()
        last = sys.stderr.getvalue().split("\r")[-1]
        assert f"{ran}/3" in last and ("done" in last) is done, last


def test_predict_on_the_study_adapters(study, capsys):
    out = study["out"]
    rep = json.loads((out / "report.json").read_text())
    paths = next(a for a in rep["adapters"] if a["adapter_method"] == "lora" and a["seed"] == 0)
    rc = main(["predict", paths["arith"], paths["units"], "--fit", str(out / "fit.json"), "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0
    row = next(x for x in rep["results"] if x["adapter_method"] == "lora" and x["seed"] == 0
               and x["composition"] == "arith+units" and x["merge_method"] == "sum")  # fmt: skip
    assert r["cosine"] == pytest.approx(row["rms_cosine"], rel=1e-9)
    f = next(f for f in rep["fits"] if f["adapter_method"] == "lora" and f["merge_method"] == "sum")
    assert r["predicted_delta_ppl_pct"] == pytest.approx(
        f["slope"] * row["rms_cosine"] + f["intercept"], rel=1e-9
    )


def test_rerun_refuses_a_foreign_folder(study, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc = main(
        [
            "scenario",
            "run",
            str(study["scen"]),
            "--out",
            str(foreign),
            "--cache",
            str(study["cache"]),
            "--quiet",
        ]
    )
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_an_unwritable_report_folder_is_refused_before_the_study(study, tmp_path, capsys):
    """--out under a file: refused in one line before any work (a fresh
    cache stays empty; it was refused only after the whole study ran)."""
    (tmp_path / "afile").write_text("x")
    cache = tmp_path / "fresh-cache"
    argv = [
        "scenario",
        "run",
        str(study["scen"]),
        "--out",
        str(tmp_path / "afile" / "rep"),
        "--cache",
        str(cache),
    ]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    assert not cache.exists() or not any(cache.rglob("artifact.json"))


def test_interrupted_run_resumes(study, tmp_path):
    """Kill a run (SIGTERM) after some adapters are made: nothing half-made is
    left, and the next run reuses what was finished and makes the rest."""
    import os
    import signal
    import subprocess
    import sys

    text = CI_SCENARIO.replace("seeds = [0, 1]", "seeds = [7]").replace(
        'methods = ["lora", "d2lora"]', 'methods = ["lora"]'
    )
    text = text.replace('"svd", "d2-signed"', '"svd"').replace('name = "ci"', 'name = "ci-resume"')
    scen = _write(tmp_path, text, "resume.toml")
    cache, out = study["cache"], tmp_path / "out"  # the base is reused from the study
    adapters = cache / "adapter"
    before = set(adapters.iterdir())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loramix", "scenario", "run", str(scen), "--out", str(out),
                             "--cache", str(cache), "--quiet"], env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        new = lambda: {p.name for p in set(adapters.iterdir()) - before if not p.name.startswith(".")}  # noqa: E731
        while time.time() < deadline and not new():  # hidden: temporaries and lock files
            time.sleep(0.05)
        made_before_kill = new()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0 and not out.exists()  # it was interrupted before the report
    assert made_before_kill, "no adapter was finished before the interrupt"
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]  # the half-made artifact was removed
    done = {p.name for p in adapters.iterdir() if (p / "artifact.json").is_file()} - {p.name for p in before}
    assert made_before_kill <= done | made_before_kill
    assert main(["scenario", "run", str(scen), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    log = list(csv.DictReader(open(out / "cache_log.csv")))
    ad = [e for e in log if e["kind"] == "adapter"]
    assert len(ad) == 6
    hits = {e["key"][:24] for e in ad if e["status"] == "hit"}
    assert done and done <= hits  # every adapter finished before the kill was reused
    assert all(e["status"] == "miss" for e in ad if e["key"][:24] not in done)
    assert [e for e in log if e["kind"] == "base"][0]["status"] == "hit"


def test_label_colors_distinct_beyond_the_palette():
    """Every adapter label of a figure gets its own colour: the sixth label
    took "C5", which is tab:brown, the fifth's."""
    from matplotlib.colors import to_hex

    from loramix.scenario.plots import _label_colors

    labels = ["lora", "lora:data", "lora@16", "lora@8", "lora:x", "lora@2", "lora@32", "d2lora"]
    colors = [to_hex(c) for c in _label_colors(labels).values()]
    assert len(set(colors)) == len(labels), colors


# A LoRA-only study (no effective-delta similarity, which needs the base's weights in torch).
TINY_LORA = """
name = "tiny"
[base.build]
steps = 4
[domains.a]
data = "synthetic:arith"
train = 16
eval = 8
[domains.b]
data = "synthetic:units"
train = 16
eval = 8
[adapters]
rank = 2
alpha = 8
steps = 2
batch = 8
max_len = 48
[merge]
methods = ["sum", "ties"]
ties = { density = 0.5 }
"""

# run_scenario from Python, as a notebook calls it, in a process of its own (this
# one's transformers state is whatever earlier tests left): the caller's settings after
_API_RUN = """
import json, sys, torch
from transformers.utils import logging as hf_logging
from loramix.scenario.runner import run_scenario
before = []
for bars in (True, False):
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    torch.set_num_threads(3)
    run_scenario(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], progress=False, force=True)
    before.append([bars, hf_logging.is_progress_bar_enabled(), torch.get_num_threads()])
print(json.dumps(before))
"""


@pytest.fixture(scope="module")
def tiny_lora_study(tmp_path_factory):
    """The first run of :data:`TINY_LORA` (every artifact made), by the
    library's ``run_scenario``, then a rerun read back from the cache."""
    import os
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("tiny")
    scen, out, cache = _write(d, TINY_LORA, "tiny.toml"), d / "first", d / "cache"
    p = subprocess.run([sys.executable, "-c", _API_RUN, str(scen), str(out), str(cache)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return {"scen": scen, "out": out, "cache": cache, "states": json.loads(p.stdout.splitlines()[-1])}


def test_run_scenario_leaves_transformers_bars_and_torch_threads_as_it_found_them(tiny_lora_study):
    """A study turns transformers' progress bars off while it computes (one
    overall bar) and sets torch's threads; a Python caller gets both back as
    they were, on or off (the bars were left off for the rest of a notebook's
    session)."""
    assert tiny_lora_study["states"] == [[True, True, 3], [False, False, 3]]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_rerun_read_back_from_the_cache_imports_no_torch(tiny_lora_study, tmp_path, jobs):
    """Every step a cache hit (and the similarity in numpy): the rerun imports
    neither torch nor transformers, in this process (the device told without
    torch, the report's versions from the packages' metadata) nor in workers
    (none started: ``--jobs 2``), and writes the same report."""
    from .test_startup import imported_modules

    s = tiny_lora_study
    out = tmp_path / "again"
    rc, mods, err = imported_modules("scenario", "run", str(s["scen"]), "--out", str(out), "--cache", str(s["cache"]),
                                     "--jobs", jobs, "--quiet", cwd=tmp_path)  # fmt: skip
    assert rc == 0, err
    assert not {"torch", "transformers"} & mods
    log = list(csv.DictReader(open(out / "cache_log.csv")))
    assert log and all(e["status"] == "hit" for e in log)
    for f in ("results.csv", "evaluations.csv", "similarity_per_module.csv"):
        assert (out / f).read_bytes() == (s["out"] / f).read_bytes(), f
    env1, env2 = (json.loads((o / "report.json").read_text())["environment"] for o in (s["out"], out))
    assert env1 == env2


# Runs `loramix scenario run` in this process (a missing file: it fails, before numpy is
# imported), then loads numpy, as a run does next, and prints the threads OpenBLAS runs with
_BLAS_THREADS = r"""
import ctypes, sys
from loramix.cli import main
assert main(["scenario", "run", "missing.toml"]) == 2 and "numpy" not in sys.modules
import numpy
libs = {l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l.lower() and ".so" in l}
for lib in map(ctypes.CDLL, libs):
    for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
        if hasattr(lib, name):
            print(getattr(lib, name)())
            sys.exit(0)
print("no OpenBLAS")
"""


@pytest.mark.parametrize("env, threads", [(None, "1"), ("2", "2")])
def test_scenario_run_gives_openblas_one_thread(tmp_path, env, threads):
    """`scenario run` has OpenBLAS run on one thread (the similarity step's
    small Gram GEMMs: with a second thread spinning on a busy 2-core machine
    that step of the 14-domain study took 1.2-3.1 s, not 0.1-0.2 s), as `loramix
    similarity` does; OPENBLAS_NUM_THREADS, when set, is kept. Where OpenBLAS
    would take one thread by itself (one core), this cannot tell."""
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: OpenBLAS takes one thread anyway")
    repo = Path(__file__).resolve().parents[1]
    e = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    e["PYTHONPATH"] = str(repo)
    if env is not None:
        e["OPENBLAS_NUM_THREADS"] = env
    p = subprocess.run([sys.executable, "-c", _BLAS_THREADS], capture_output=True, text=True, cwd=tmp_path,
                       env=e, timeout=120)  # fmt: skip
    if p.stdout.strip() == "no OpenBLAS":
        pytest.skip("numpy without OpenBLAS")
    assert p.returncode == 0 and p.stdout.split() == [threads], (p.stdout, p.stderr)


def test_the_per_domain_section_is_read_back_from_the_cache(tmp_path):
    """The report's per-composition-and-domain tables (0.5-0.7 s on the
    14-domain study's report) are a derived cache entry: the text a run
    without a cache renders, byte for byte; read back by a rerun (a hit);
    made again where an evaluation it reads changed."""
    from loramix.scenario.report import render_markdown

    report = json.loads((ROOT / "reports" / "real-14-domains" / "report.json").read_text())
    cold = render_markdown(report)
    c = Cache(tmp_path / "c")
    assert render_markdown(report, c) == cold
    again = Cache(tmp_path / "c")
    assert render_markdown(report, again) == cold
    assert [(e.kind, e.status) for e in c.log] == [("report", "miss")]
    assert [(e.kind, e.status) for e in again.log] == [("report", "hit")]
    report["evaluations"][0]["ppl"] *= 2
    changed = render_markdown(report)
    assert changed != cold and render_markdown(report, again) == changed
    assert again.log[-1].status == "miss"


def _predict_example(md: str) -> str | None:
    """The `loramix predict ... --fit` line the report offers, or None."""
    lines = [x for x in md.splitlines() if x.startswith("loramix predict ")]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


def test_the_report_offers_predict_only_on_a_fit_it_can_use():
    """The fit section shows a `loramix predict` command on two of the study's
    adapters. It showed it for the first label even where that label's sum
    line had fewer than two points (a study of one pair, or one with
    `merged_data` on a single pair), and the command then failed ("the
    lora/sum fit has 1 point(s): too few to predict", exit 2). Now it uses
    the first label whose line exists and is left out where none does; the
    note on too few compositions ends its list before the figure."""
    from loramix.scenario.report import render_markdown

    report = json.loads((ROOT / "reports" / "quickstart" / "report.json").read_text())
    paths = {a["adapter_method"]: a["arith"] for a in report["adapters"]}
    assert paths["lora"] in _predict_example(render_markdown(report))

    for f in report["fits"]:  # the first label's sum line from one composition: no line
        if f["adapter_method"] == "lora" and f["merge_method"] == "sum":
            f.update(n=1, slope=None, intercept=None, pearson_r=None, r2=None, loo_rmse=None, loo_mae=None)
    md = render_markdown(report)
    assert paths["lora:data"] in _predict_example(md) and paths["lora"] not in _predict_example(md)
    note = md.index("- lora: 1 composition(s): too few")
    assert md[note:].split("\n")[1] == ""  # a blank line: the figure is not part of the note's item

    for f in report["fits"]:
        if f["merge_method"] == "sum":
            f.update(n=1, slope=None)
    assert _predict_example(render_markdown(report)) is None
    # the committed d2-vs-lora study: one merged-data pair per label (its report.md, rendered before,
    # offers a command that fails)
    d2 = json.loads((ROOT / "reports" / "d2-vs-lora" / "report.json").read_text())
    assert {f["n"] for f in d2["fits"] if f["merge_method"] == "sum"} == {1}
    assert _predict_example(render_markdown(d2)) is None


def test_the_runs_fit_line_says_n_a_without_a_unit():
    """`scenario run`'s last lines: a study of one composition printed
    "over 1 compositions: r = n/a, LOO RMSE = n/a points"."""
    from loramix.cli.scenario_cmd import fit_line

    one = {"adapter_method": "lora", "n": 1, "pearson_r": None, "loo_rmse": None}
    assert fit_line(one) == "  lora: delta_ppl% ~ RMS cosine over 1 composition: r = n/a, LOO RMSE = n/a"
    ten = {"adapter_method": "lora:data", "n": 10, "pearson_r": -0.0401, "loo_rmse": 4.987}
    assert fit_line(ten) == (
        "  lora:data: delta_ppl% ~ RMS cosine over 10 compositions: r = -0.040, LOO RMSE = 4.99 points"
    )


def test_check_of_a_gguf_base_reads_it_and_imports_nothing(monkeypatch, tmp_path):
    """``scenario check`` of a study on a GGUF base never imported imported it
    (transformers and torch loaded, a float32 copy written into the cache:
    seconds and 0.5 GB for SmolLM2) from a command that only reads. Now it
    reads the file's header: the targets are checked against the same weight
    shapes the import gives, the estimate's architecture is the import's, every
    step is one to make (no key can name an artifact made on an import that
    does not exist), the import is said, and nothing is written but the file's
    hash. Once imported, check reads the import, as before."""
    from .test_realmodel import llama_gguf
    from .test_startup import imported_modules

    gguf = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    text = GOOD.replace("[base.build]\nsteps = 5", f'[base]\npath = "{gguf}"').replace(
        "rank = 4", 'rank = 4\ntargets = ["q_proj", "v_proj"]'
    )
    scen = _write(tmp_path, text)
    home = tmp_path / "home"
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(home))
    rc, mods, err = imported_modules("scenario", "check", str(scen), "--cache", str(tmp_path / "c"))
    assert rc == 0, err
    assert not {"torch", "transformers"} & mods and not (home / "bases").exists()
    written = sorted(p.name for p in home.iterdir()) if home.exists() else []
    assert written in ([], ["sha256"]) and not (tmp_path / "c").exists(), written
    from loramix.gguf_import import import_preview, resolve_base  # new: after what the old code failed
    from loramix.io.model_folder import BaseModelFolder
    from loramix.scenario.config import load_scenario
    from loramix.scenario.estimate import _arch, _folder_arch
    from loramix.scenario.plan import plan

    before = plan(load_scenario(scen, import_gguf=False), import_gguf=False)
    assert before[[s.id for s in before].index("base")].args["import_bytes"] == import_preview(gguf)["bytes"]
    bad = _write(tmp_path, text.replace('["q_proj", "v_proj"]', '["q_proj", "c_attn"]'), "bad.toml")
    rc, _, err = imported_modules("scenario", "check", str(bad), "--cache", str(tmp_path / "c"))
    assert rc == 2 and "c_attn" in err and err.count("\n") == 0, err

    folder = resolve_base(gguf)  # the run's import
    weights = {k.removesuffix(".weight"): tuple(t.shape) for k, t in BaseModelFolder(folder).tensors.items()
               if k.endswith(".weight") and len(t.shape) == 2}  # fmt: skip
    assert import_preview(gguf)["weights"] == weights
    after = plan(load_scenario(scen, import_gguf=False), import_gguf=False)
    assert [s.id for s in after] == [s.id for s in before] and "import_bytes" not in after[0].args | after[
        1
    ].args
    base_before = next(s for s in before if s.id == "base")
    base_after = next(s for s in after if s.id == "base")
    assert _arch(base_before) == _arch(base_after) == _folder_arch(str(folder))
    assert base_after.args["path"] == str(folder)


def test_the_summary_gives_the_cosines_of_the_compositions_it_ranges_over():
    """The summary's Δppl % range covers the compositions with a merged-data
    adapter, but its RMS-cosine range covered every composition (real-14-domains:
    20 of 101), and one merged-data composition read "ranges from -7.3
    (math+medicine) to -7.3 (math+medicine)" (d2-vs-lora)."""
    from loramix.scenario.report import render_markdown

    real = render_markdown(json.loads((ROOT / "reports" / "real-14-domains" / "report.json").read_text()))
    line = next(x for x in real.splitlines() if x.startswith("- **lora**: Δppl % of the naive sum"))
    assert "over 20 compositions; their RMS cosine from 0.008 to 0.173" in line, line
    d2 = render_markdown(json.loads((ROOT / "reports" / "d2-vs-lora" / "report.json").read_text()))
    line = next(x for x in d2.splitlines() if x.startswith("- **d2lora**: Δppl % of the naive sum"))
    assert line.startswith("- **d2lora**: Δppl % of the naive sum against merged-data training is -7.1 "
                           "(math+medicine), at RMS cosine 0.0"), line  # fmt: skip
    assert "ranges" not in line


def test_the_summary_of_given_adapters_of_one_composition_gives_its_figure():
    """A study of given adapters with one composition summed up as "retention %
    of the naive sum ... ranges from -0.1 (math+medicine) to -0.1
    (math+medicine) over 1 compositions; their RMS cosine from 0.004 to
    0.004", as the trained studies' line did before it was fixed (above)."""
    from loramix.scenario.report import render_markdown

    report = json.loads((ROOT / "reports" / "given-adapters" / "report.json").read_text())
    line = next(x for x in render_markdown(report).splitlines() if "retention % of the naive sum" in x)
    assert " ranges from " in line and " over 6 compositions; their RMS cosine from " in line, line
    first = report["summary"][0]["composition"]
    report["summary"] = [r for r in report["summary"] if r["composition"] == first]
    line = next(x for x in render_markdown(report).splitlines() if "retention % of the naive sum" in x)
    row = next(r for r in report["summary"] if r["merge_method"] == "sum")
    assert line == (f"- **lora**: retention % of the naive sum (its perplexity against the members' own adapters) "
                    f"is {row['retention_pct']:.1f} ({first}), at RMS cosine {row['rms_cosine']:.3f}."), line  # fmt: skip


def test_a_compositions_cosine_counts_a_pair_with_no_module_in_common_as_0(tmp_path):
    """The runner's composition cosine (and signed mean) counts a pair of
    adapters that adapt no module in common as 0, as ``predict`` and ``plan``
    do (their deltas are orthogonal over all parameters): it left the pair
    out, so a triple with one such pair averaged two pairs, not three, and a
    pair of them had a NaN cosine, where ``predict`` gives 0."""
    import torch

    from loramix.io.adapter_files import save_peft_adapter
    from loramix.scenario.assemble import _composition_rows, _Tables
    from loramix.scenario.plan import Step
    from loramix.scenario.steps import _similarity_step

    third = '[domains.c]\ndata = "synthetic:dates"\ntrain = 10\neval = 5\n[adapters]'
    comps = 'name = "v"\ncompositions = ["all-2", "all-3"]'
    text = GOOD.replace("[adapters]", third).replace('name = "v"', comps)
    sc = load_scenario(_write(tmp_path, text))
    assert sc.compositions[-1] == ("a", "b", "c") and [m.method for m in sc.merges] == ["sum"]
    gen = torch.Generator().manual_seed(0)
    modules = {"a": ["model.layers.0.self_attn.q_proj"], "b": ["model.layers.1.self_attn.q_proj"]}
    modules["c"] = modules["b"]  # a shares no module with b nor c
    deps = {}
    for d, mods in modules.items():
        factors = {m: (torch.randn(16, 2, generator=gen), torch.randn(2, 16, generator=gen)) for m in mods}
        deps[f"adapter/lora/0/{d}"] = {"path": str(save_peft_adapter(tmp_path / d, factors))}
    step = Step("similarity/lora/0", "similarity", None, None, "", (), "lora/0", "similarity",
                {"names": ["a", "b", "c"], "effective": False})  # fmt: skip
    sim = _similarity_step(None, step, deps)
    cos_bc, mean_bc = sim["rms"][1][2], sim["mean"][1][2]
    assert math.isnan(sim["rms"][0][1]) and sim["coverage"][0][1] == 0 and 0 < abs(cos_bc) < 1
    ev = {d: {"ppl": 2.0, "tokens": 10, "nll_sum": 10 * math.log(2.0)} for d in "abc"}
    results = {f"eval/lora/0/adapter/{d}": ev for d in "abc"}
    results.update({f"eval/lora/0/merge/sum/{'+'.join(c)}": ev for c in sc.compositions})
    t = _Tables()
    for comp in sc.compositions:
        _composition_rows(t, sc, results, "lora", 0, comp, sim, ["a", "b", "c"], ev)
    got = {r["composition"]: (r["rms_cosine"], r["mean_cosine"]) for r in t.results}
    assert got["a+b"] == (0.0, 0.0) and got["a+c"] == (0.0, 0.0)
    assert got["b+c"] == (pytest.approx(abs(cos_bc), rel=1e-12), pytest.approx(mean_bc, rel=1e-12))
    assert got["a+b+c"] == (pytest.approx(abs(cos_bc) / math.sqrt(3), rel=1e-12), pytest.approx(mean_bc / 3))
