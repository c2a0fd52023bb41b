"""Errors from the Python API name its keywords; the CLI's name its flags.

Each case is one bad argument given both ways: ``loramix.X(...)`` raises the
line in keyword terms (``rank``, ``force=True``, ``batch``), the command
prints the same error in flag terms, byte for byte as before (``--rank``,
``--force``, ``--batch``). Real calls on a tiny GPT-2 and PEFT adapters.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

import loramix
from loramix.cli import main
from loramix.errors import LoramixError, OutputError, UsageError

from .factories import make_peft_adapter, tiny_gpt2, write_jsonl
from .test_train import make_tiny_base

REPORTS = Path(__file__).resolve().parents[1] / "reports" / "quickstart"
QUICKSTART = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.toml"


def api_env(root: Path) -> dict:
    """A tiny GPT-2 base folder, two rank-2 LoRA adapters on it and a QA file
    under ``root``, with a folder that exists and a path that does not: what
    the tests of the public functions call them on."""
    base = make_tiny_base(root / "base", "gpt2")
    from transformers import AutoConfig

    model = tiny_gpt2(vocab_size=AutoConfig.from_pretrained(base).vocab_size)
    ads = [str(make_peft_adapter(model, root / f"a{i}", seed=i, r=2, lora_alpha=4)) for i in (1, 2)]
    data = write_jsonl(
        root / "d.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(40)]
    )
    exists = root / "exists"
    exists.mkdir()
    return {"base": str(base), "ads": ads, "data": str(data), "exists": str(exists), "new": str(root / "new")}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return api_env(tmp_path_factory.mktemp("api_errors"))


def _cases(e):
    """(name, Python call, the Python line, CLI argv, the CLI's line as it was before)."""
    b, ads, d, ex, new = e["base"], e["ads"], e["data"], e["exists"], e["new"]
    fit, predictors = str(REPORTS / "fit.json"), str(REPORTS / "predictors.json")
    forced = f"{ex}: already exists; pass force=True to replace it"
    forced_cli = f"{ex}: already exists; pass --force to replace it"
    return [
        ("merge rank", lambda: loramix.merge(ads, "svd", out=new, rank=9),
         "rank: 9 is above the stacked rank 4 of the adapters (the sum of their ranks)",
         ["merge", "-m", "svd", "--rank", "9", *ads, "--out", new],
         "--rank: 9 is above the stacked rank 4 of the adapters (the sum of their ranks)"),
        ("merge out-rank", lambda: loramix.merge(ads, "sum", out=new, out_rank=2, energy=0.5),
         "out_rank/energy: give one of out_rank=K or energy=F, not both",
         ["merge", "-m", "sum", "--out-rank", "2", "--energy", "0.5", *ads, "--out", new],
         "--out-rank/--energy: give one of --out-rank K or --energy F, not both"),
        # each flag said once, as its keyword: they read "into=BASE (into=)", "out_rank=K / energy=F
        # (out_rank= / energy=)" and "rank k or energy e" (a lower-case placeholder, left as it was)
        ("merge dense", lambda: loramix.merge(ads, "ties", out=new, density=0.5),
         "into: method ties writes a dense delta: pass into=BASE, or out_rank=K / energy=F for an adapter "
         "truncated by SVD (only core-dare-linear, core-dare-ties, core-ties, iso-c, iso-cts, knots-dare-ties, knots-ties, "
         "sum, svd, task-arithmetic, tsv write an exact adapter; core-ties and knots-ties: ties in bases the adapters span)",
         ["merge", "-m", "ties", "--density", "0.5", *ads, "--out", new],
         "--into: method ties writes a dense delta: pass --into BASE, or --out-rank K / --energy F for an "
         "adapter truncated by SVD (only core-dare-linear, core-dare-ties, core-ties, iso-c, iso-cts, "
         "knots-dare-ties, knots-ties, sum, svd, task-arithmetic, tsv write an exact adapter; core-ties and knots-ties: ties in bases "
         "the adapters span)"),
        ("merge svd neither", lambda: loramix.merge(ads, "svd", out=new),
         "rank/energy: method svd needs exactly one of rank=K or energy=F",
         ["merge", "-m", "svd", *ads, "--out", new],
         "--rank/--energy: method svd needs exactly one of --rank K or --energy F"),
        # --out-rank above the merged delta's rank is refused as svd's --rank is (it was capped silently)
        ("sum out-rank cap", lambda: loramix.merge(ads, "sum", out=new, out_rank=5),
         "out_rank: 5 is above the stacked rank 4 of the adapters (the sum of their ranks): give at most 4",
         ["sum", *ads, "--out-rank", "5", "--out", new],
         "--out-rank: 5 is above the stacked rank 4 of the adapters (the sum of their ranks): give at most 4"),
        ("merge out-rank cap", lambda: loramix.merge(ads, "ties", out=new, density=0.5, out_rank=33),
         "out_rank: 33 is above 32, the largest rank a merged module can have (per module min(out, in)): "
         "give at most 32",
         ["merge", "-m", "ties", "--density", "0.5", "--out-rank", "33", *ads, "--out", new],
         "--out-rank: 33 is above 32, the largest rank a merged module can have (per module min(out, in)): "
         "give at most 32"),
        ("merge svd out-rank", lambda: loramix.merge(ads, "svd", out=new, rank=3, out_rank=4),
         "out_rank: 4 is above svd's rank=3: give at most 3",
         ["merge", "-m", "svd", "--rank", "3", "--out-rank", "4", *ads, "--out", new],
         "--out-rank: 4 is above svd's --rank 3: give at most 3"),
        # a scale beyond +-1e6 (as --weights) was refused only after the work, naming an overflowed tensor
        ("merge lambda", lambda: loramix.merge(ads, "task-arithmetic", out=new, lambda_=1e300),
         "lambda_: 1e+300 is beyond +-1e+06; that is not a scale",
         ["merge", "-m", "task-arithmetic", "--lambda", "1e300", *ads, "--out", new],
         "--lambda: 1e+300 is beyond +-1e+06; that is not a scale"),
        # seeds are 0..2^63-1 everywhere, as train --seed's IntRange says (merge took 2^64 silently)
        ("merge seed", lambda: loramix.merge(ads, "dare-linear", out=new, density=0.5, seed=2**63),
         "seed: 9223372036854775808 is not a seed: seeds are integers in [0, 2^63 - 1]",
         ["merge", "-m", "dare-linear", "--density", "0.5", "--seed", str(2**63), *ads, "--out", new],
         "--seed: 9223372036854775808 is not a seed: seeds are integers in [0, 2^63 - 1]"),
        ("train seed", lambda: loramix.train_adapter(b, d, out=new, steps=2, seed=2**63),
         "seed: 9223372036854775808 is not a seed: seeds are integers in [0, 2^63 - 1]",
         ["train", "--base", b, "--data", d, "--out", new, "--steps", "2", "--seed", str(2**63)],
         "Invalid value for '--seed': 9223372036854775808 is not in the range 0<=x<=9223372036854775807. "
         "(see 'loramix train --help')"),
        ("build seed", lambda: loramix.build_base(d, out=new, steps=2, seed=-1),
         "seed: -1 is not a seed: seeds are integers in [0, 2^63 - 1]",
         ["base", "build", "--data", d, "--out", new, "--steps", "2", "--seed", "-1"],
         "Invalid value for '--seed': -1 is not in the range 0<=x<=9223372036854775807. "
         "(see 'loramix base build --help')"),
        ("merge force", lambda: loramix.merge(ads, "sum", out=ex), forced,
         ["merge", "-m", "sum", *ads, "--out", ex], forced_cli),
        ("sum_into_base", lambda: loramix.sum_into_base(ads, into=b, out=ex), forced,
         ["sum", *ads, "--into", b, "--out", ex], forced_cli),
        ("sum_adapters", lambda: loramix.sum_adapters(ads, out=ex), forced, ["sum", *ads, "--out", ex], forced_cli),
        ("train warmup", lambda: loramix.train_adapter(b, d, out=new, steps=2, warmup=100),
         "warmup: 100 steps is more than the run's 2 steps: the learning rate would never reach lr",
         ["train", "--base", b, "--data", d, "--out", new, "--steps", "2", "--warmup", "100"],
         "--warmup: 100 steps is more than the run's 2 steps: the learning rate would never reach --lr"),
        ("train force", lambda: loramix.train_adapter(b, d, out=ex, steps=1), forced,
         ["train", "--base", b, "--data", d, "--out", ex, "--steps", "1"], forced_cli),
        ("evaluate batch", lambda: loramix.evaluate(b, data=[d], batch=0),
         "batch: must be at least 1, got 0",
         ["eval", "--base", b, "--data", d, "--batch", "0"], "--batch: must be at least 1, got 0"),
        ("evaluate merged", lambda: loramix.evaluate(b, data=[d], merged=True),
         "merged=True: needs at least one adapters",
         ["eval", "--base", b, "--data", d, "--merged"], "--merged: needs at least one --adapter"),
        ("build_base", lambda: loramix.build_base(["synthetic:arith"], out=new, steps=0),
         "steps: must be at least 1, got 0",
         ["base", "build", "--data", "synthetic:arith", "--out", new, "--steps", "0"],
         "--steps: must be at least 1, got 0"),
        ("run_scenario jobs", lambda: loramix.run_scenario(QUICKSTART, out=new, jobs=0),
         "jobs: must be at least 1, got 0",
         ["scenario", "run", str(QUICKSTART), "--out", new, "--jobs", "0"], "--jobs: must be at least 1, got 0"),
        ("run_scenario force", lambda: loramix.run_scenario(QUICKSTART, out=ex),
         f"{ex}: exists and is not a report of this scenario; pass force=True to replace it",
         ["scenario", "run", str(QUICKSTART), "--out", ex],
         f"{ex}: exists and is not a report of this scenario; pass --force to replace it"),
        ("predict method", lambda: loramix.predict(ads, predictors, method="nope"),
         f"method: {predictors} has no predictor for merge method nope (it has: sum, ties, dare-ties, svd)",
         ["predict", *ads, "--fit", predictors, "--method", "nope"],
         f"--method: {predictors} has no predictor for merge method nope (it has: sum, ties, dare-ties, svd)"),
        ("predict data", lambda: loramix.predict(ads, fit, data=[d, d]),
         "data: applies to a predictors file; a fit.json predicts from the RMS cosine alone",
         ["predict", *ads, "--fit", fit, "--data", d, "--data", d],
         "--data: applies to a predictors file; a fit.json predicts from the RMS cosine alone"),
        # no error of similarity's named a flag: its device was already a keyword
        ("similarity", lambda: loramix.similarity(ads, device="tpu"),
         "device: unknown device 'tpu'; choose auto, cpu or cuda",
         ["similarity", *ads, "--device", "tpu"], None),
    ]  # fmt: skip


CASES = [c[0] for c in _cases(dict.fromkeys(["base", "ads", "data", "exists", "new"], ""))]


def _case(env, case):
    c = next(c for c in _cases(env) if c[0] == case)
    if "predict" in case and not (REPORTS / "predictors.json").is_file():
        pytest.skip("no committed quickstart report")
    return c


@pytest.mark.parametrize("case", CASES)
def test_python_names_its_keywords(env, case):
    _, call, python_line, _, _ = _case(env, case)
    with pytest.raises(LoramixError) as e:
        call()
    assert str(e.value) == e.value.message == python_line
    assert not Path(env["new"]).exists()


@pytest.mark.parametrize("case", [c for c in CASES if c != "similarity"])  # its --device is click's
def test_the_cli_names_its_flags_as_before(env, capsys, case):
    _, _, _, argv, cli_line = _case(env, case)
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == f"loramix: error: {cli_line}\n"
    assert not Path(env["new"]).exists()


def test_the_error_keeps_its_type_and_attributes(env):
    with pytest.raises(OutputError) as e:
        loramix.sum_adapters(env["ads"], out=env["exists"])
    assert (e.value.where, e.value.problem) == (
        env["exists"],
        "already exists; pass force=True to replace it",
    )
    with pytest.raises(UsageError) as e:
        loramix.merge(env["ads"], "ties", out=env["new"], lambda_=0.5)
    assert e.value.where == "density"
    assert e.value.problem.startswith("method ties needs density (")
    back = pickle.loads(pickle.dumps(e.value))
    assert (type(back), back.where, back.problem, str(back)) == (
        UsageError,
        "density",
        e.value.problem,
        str(e.value),
    )


def test_a_flag_the_function_has_no_keyword_for_stays():
    """Only the function's own parameters are renamed: another command's flag,
    or one inside a command line such as ``ray start --head``, is left alone."""
    from loramix.api import keyword_namer, python_terms
    from loramix.scenario.runner import run_scenario

    name = keyword_namer(run_scenario, {"--cache": "cache_dir"})
    text = "start one with `ray start --head` or leave --address out; --rank/--jobs; a path /x/--jobs, runs--jobs"
    assert python_terms(text, name) == (
        "start one with `ray start --head` or leave address out; --rank/--jobs; a path /x/--jobs, runs--jobs"
    )
    assert python_terms("pass --force, --fresh or --jobs N (--cache)", name) == (
        "pass force=True, fresh=True or jobs=N (cache_dir)"
    )


def test_a_flag_with_a_literal_value_reads_as_python():
    """A flag followed by its value in a CLI sentence is that keyword with that
    value as Python writes it (``--prompt chat`` read "prompt chat"): a choice
    quoted, a number as it is; a word that is no value of it stays the
    sentence's, and an upper-case placeholder is the value's name, as before."""
    from loramix.api import keyword_namer, python_terms
    from loramix.perplexity import evaluate

    name = keyword_namer(evaluate, {"--adapter": "adapters"})
    said = {
        "its tokenizer has no chat template (needed by --prompt chat; use --prompt raw)":
            "its tokenizer has no chat template (needed by prompt='chat'; use prompt='raw')",
        "use --device cpu or --dtype bfloat16, --on all": "use device='cpu' or dtype='bfloat16', on='all'",
        "--max-len 128 is above the model's context; --limit -1.": "max_len=128 is above the model's context; limit=-1.",
        "--max-len is too large, --device is unknown": "max_len is too large, device is unknown",
        "--prompt jinja is no mode; --weights 1,0.5 --merged on": "prompt jinja is no mode; weights 1,0.5 merged=True on",
        "--batch N records": "batch=N records",
    }  # fmt: skip
    for cli, py in said.items():
        assert python_terms(cli, name) == py, cli


def test_the_functions_pickle_as_themselves():
    """A pool's task (``pool.map(loramix.train_adapter, ...)``) pickles the
    function by name: ``loramix.X`` must resolve to the very object."""
    for name in ("merge", "evaluate", "train_adapter", "predict"):
        f = getattr(loramix, name)
        assert pickle.loads(pickle.dumps(f)) is f


def test_a_result_stands_for_the_folder_it_wrote(env, tmp_path):
    """merge's MergeResult, sum_into_base's StreamResult and train_adapter's
    and build_base's dicts are path-like (``os.fspath`` is their ``out``):
    passed as an adapter or a base they are that folder (they were refused,
    "pass its .out"). A merge written into a base is a model folder, and as
    an adapter it is refused in one line that says so. An object with an
    ``out`` that is not path-like still gets the hint. Real files, real
    models: the figures equal those of the folders' paths."""
    import os
    import types

    from loramix.errors import AdapterError

    ads = [loramix.load_adapter(p) for p in env["ads"]]
    base, data = env["base"], [env["data"]]
    merged = loramix.merge(ads, "sum", out=tmp_path / "m", progress=False)
    into = loramix.sum_into_base(ads, into=base, out=tmp_path / "b", progress=False)
    model = loramix.merge(ads, "ties", density=0.5, into=base, out=tmp_path / "t", progress=False)
    trained = loramix.train_adapter(
        base, env["data"], out=tmp_path / "tr", steps=1, progress=False, device="cpu"
    )
    built = loramix.build_base(
        ["synthetic:arith?n=40"], out=tmp_path / "bb", steps=1, progress=False, device="cpu"
    )
    for res, folder in ((merged, merged.out), (into, into.out), (model, model.out), (trained, trained["out"]),
                        (built, built["out"])):  # fmt: skip
        assert isinstance(res, os.PathLike) and os.fspath(res) == str(folder)
    assert str(trained.out) == trained["out"] and isinstance(trained, dict)  # still the dict it was

    def ppl(b, adapters=(), d=data):
        return loramix.evaluate(b, adapters=adapters, data=d, progress=False, device="cpu")["ppl"].tolist()

    assert ppl(base, [merged]) == ppl(base, [str(merged.out)])
    assert ppl(base, merged) == ppl(base, [str(merged.out)])  # one adapter, not a list of something
    assert ppl(base, [trained]) == ppl(base, [trained["out"]])
    assert ppl(into) == ppl(str(into.out)) and ppl(model) == ppl(str(model.out))
    assert ppl(built, d=["synthetic:arith?n=8"]) == ppl(built["out"], d=["synthetic:arith?n=8"])
    sim = loramix.similarity([merged, ads[0]], progress=False)
    assert sim.names == ["m", ads[0].name]
    assert (
        loramix.load_adapter(merged).path == str(merged.out)
        or loramix.load_adapter(merged).path == merged.out
    )
    assert loramix.plan([ads[0], ads[1], merged], progress=False).groups
    again = loramix.merge([merged, trained], "sum", out=tmp_path / "again", progress=False)
    assert loramix.load_adapter(again).modules
    # a model folder is a base, not an adapter: one line that says so (whatever names it)
    for given in (model, into, str(model.out)):
        for call in (
            lambda g: loramix.similarity([g, ads[0]], progress=False),
            lambda g: loramix.merge([g, ads[0]], "sum", out=tmp_path / "no", progress=False),
            lambda g: loramix.evaluate(base, adapters=[g], data=data, progress=False),
            loramix.load_adapter,
        ):
            with pytest.raises(AdapterError) as e:
                call(given)
            assert str(e.value) == (f"{os.fspath(given)}: not an adapter folder: no adapter_config.json; it holds "
                                    "a model (config.json), which is a base, not an adapter")  # fmt: skip
    assert not (tmp_path / "no").exists()
    # an object that names a folder but is not path-like: the hint stays
    other = types.SimpleNamespace(out=tmp_path / "m")
    with pytest.raises(AdapterError) as e:
        loramix.similarity([other, ads[0]], progress=False)
    assert str(e.value) == (
        f"an adapter is a path or a loaded adapter, not a SimpleNamespace; pass its .out, {str(tmp_path / 'm')!r}"
    )
    # a single loaded adapter is still one adapter, not a list of its modules
    assert loramix.similarity(ads[0], progress=False).names == [ads[0].name]


def test_one_adapter_alone_is_one_adapter_in_every_function(env, tmp_path):
    """A path (str or Path) or a loaded adapter given alone where a list of
    adapters is taken is a list of one, as similarity and evaluate took it:
    merge and sum_into_base iterated it, so ``merge("a1", ...)`` said
    ``a: no such file or folder`` (a str's characters), a Path raised a
    TypeError and an Adapter gave its modules; predict and plan too. Now
    merge writes the same bytes as for the list of one, and predict and plan
    say they need two adapters."""
    from safetensors.torch import load_file

    from loramix.errors import UsageError

    one = env["ads"][0]
    fit = str(REPORTS / "fit.json")
    ref = loramix.merge([one], "sum", out=tmp_path / "ref", progress=False)
    weights = load_file(Path(ref.out) / "adapter_model.safetensors")
    into_ref = loramix.sum_into_base([one], into=env["base"], out=tmp_path / "iref", progress=False)
    for i, given in enumerate((one, Path(one), loramix.load_adapter(one))):
        got = loramix.merge(given, "sum", out=tmp_path / f"m{i}", progress=False)
        assert got.weights == [1.0]
        new = load_file(Path(got.out) / "adapter_model.safetensors")
        assert new.keys() == weights.keys() and all(new[k].equal(weights[k]) for k in new)
        into = loramix.sum_into_base(given, into=env["base"], out=tmp_path / f"i{i}", progress=False)
        assert into.tensors == into_ref.tensors
        assert loramix.sum_adapters(given, out=tmp_path / f"s{i}").exists()
        with pytest.raises(UsageError, match=r"^predict: a composition needs at least 2 adapters, got 1$"):
            loramix.predict(given, fit)
        with pytest.raises(UsageError, match=r"^plan: needs at least two adapters, got 1$"):
            loramix.plan(given, progress=False)


def test_numbers_given_as_strings_are_refused(env):
    """The API takes numbers, as click hands them to it: ``density="0.5"``
    was parsed and ``True`` taken as 1, ``out_rank=2.5`` kept rank 2,
    ``rank="8"`` / ``batch="4"`` failed with a TypeError deep inside, and
    ``level="0.9"`` was parsed. Now one line naming the keyword, before any
    work; the CLI, whose values click converts, is unchanged."""
    b, ads, d, new = env["base"], env["ads"], env["data"], env["new"]
    fit = str(REPORTS / "fit.json")
    cases = [
        (
            lambda: loramix.merge(ads, "ties", density="0.5", into=b, out=new),
            "density: '0.5' is not a number",
        ),
        (lambda: loramix.merge(ads, "ties", density=True, into=b, out=new), "density: True is not a number"),
        (lambda: loramix.merge(ads, "svd", rank="2", out=new), "rank: '2' is not a number"),
        (lambda: loramix.merge(ads, "sum", out_rank="2", out=new), "out_rank: '2' is not a number"),
        (lambda: loramix.merge(ads, "sum", out_rank=2.5, out=new), "out_rank: 2.5 is not a valid int"),
        (lambda: loramix.merge(ads, "sum", energy="0.5", out=new), "energy: '0.5' is not a number"),
        (lambda: loramix.train_adapter(b, d, out=new, rank="8", steps=1), "rank: '8' is not a number"),
        (lambda: loramix.train_adapter(b, d, out=new, lr="1e-3", steps=1), "lr: '1e-3' is not a number"),
        (lambda: loramix.evaluate(b, data=d, batch="4"), "batch: '4' is not a number"),
        (lambda: loramix.predict(ads, fit, level="0.9", label="lora"), "level: '0.9' is not a number"),
        (lambda: loramix.build_base(d, out=new, steps="2"), "steps: '2' is not a number"),
    ]
    _each_refused(cases, new, UsageError)
    # numbers of any kind still are numbers (numpy's too), and the CLI's values are
    import numpy as np

    res = loramix.merge(ads, "sum", out_rank=np.int64(2), out=new + "-ok")
    assert res.params["out_rank"] == 2
    assert main(["merge", "-m", "svd", "--rank", "2", *ads, "--out", new + "-cli"]) == 0


def test_evaluate_refuses_bad_weights_before_the_model_loads(env, tmp_path):
    """A weight count that does not match the adapters (or weights without adapters) was
    refused only once the data were read and the base loaded (SmolLM2: seconds; a 7B:
    minutes): here a base whose config reads but whose weights are missing, so a load
    fails first. Now refused with the other argument checks, in the same words."""
    broken = tmp_path / "config-only"
    broken.mkdir()
    shutil.copy(Path(env["base"]) / "config.json", broken)
    cases = [
        (
            dict(adapters=env["ads"], weights=[1.0]),
            "weights: got 1 weight for 2 adapters; give one per adapter",
        ),
        (dict(weights=[1.0]), "weights: given without adapters"),
    ]
    for kwargs, line in cases:
        with pytest.raises(LoramixError) as e:
            loramix.evaluate(str(broken), data=[env["data"]], device="cpu", progress=False, **kwargs)
        assert str(e.value) == line


def test_one_weight_given_as_a_number_is_a_list_of_one(env, tmp_path):
    """``weights=0.5`` for one adapter (a number, where ``weights="0.5"`` and
    ``[0.5]`` were taken) raised ``TypeError: 'float' object is not iterable``
    from ``merge``, ``sum_into_base``, ``sum_adapters`` and ``evaluate``; one
    number alone is now a list of one, as one adapter alone is, so it merges
    as ``[0.5]`` does, and for two adapters it is the count's one line; an
    object that is no number nor a list of them is one line too. Failed on
    the old code (the TypeError)."""
    ads = env["ads"]
    as_list = loramix.merge(ads[0], "sum", weights=[0.5], out=tmp_path / "list")
    as_number = loramix.merge(ads[0], "sum", weights=0.5, out=tmp_path / "number")
    assert as_number.weights == as_list.weights == [0.5]
    written = sorted(p.name for p in (tmp_path / "list").iterdir())
    assert any(name.endswith(".safetensors") for name in written), written
    for name in written:  # the same adapter, byte for byte
        if name.endswith(".safetensors"):
            assert (tmp_path / "list" / name).read_bytes() == (tmp_path / "number" / name).read_bytes()
    for weights, line in [
        (0.5, "weights: got 1 weight for 2 adapters; give one per adapter"),
        (object(), "weights: <object object at"),
    ]:
        with pytest.raises(LoramixError) as e:
            loramix.merge(ads, "sum", weights=weights, out=tmp_path / "no")
        assert str(e.value).startswith(line), str(e.value)
        with pytest.raises(LoramixError) as e:  # refused before the base loads
            loramix.evaluate(env["base"], adapters=ads, weights=weights, data=[env["data"]], progress=False)
        assert str(e.value).startswith(line), str(e.value)
    assert not (tmp_path / "no").exists()


def test_fractions_given_for_counts_are_refused(env):
    """A count or a size given a fraction from Python: ``train_adapter(rank=2.5)`` failed in torch
    (``empty() takes 1 positional argument``) after the model had loaded, ``max_len``, ``steps``
    and ``batch`` in a slice or a ``range`` (TypeErrors naming none of them), and ``top_layers``,
    ``limit``, ``plan``'s ``max_group`` and ``build_base``'s ``steps`` were taken as they were
    (``max_group=2.5`` printed "groups of at most 2.5"). Now one line naming the keyword, before
    any work (options.whole_numbers); a whole float is that int, as a merge's ``rank=2.0`` is."""
    b, ads, d, new = env["base"], env["ads"], env["data"], env["new"]
    cases = [
        (lambda: loramix.train_adapter(b, d, out=new, steps=1, rank=2.5), "rank: 2.5 is not a whole number"),
        (lambda: loramix.train_adapter(b, d, out=new, steps=1.5), "steps: 1.5 is not a whole number"),
        (lambda: loramix.train_adapter(b, d, out=new, steps=1, batch=2.5), "batch: 2.5 is not a whole number"),
        (lambda: loramix.train_adapter(b, d, out=new, steps=1, max_len=50.5), "max_len: 50.5 is not a whole number"),
        (lambda: loramix.train_adapter(b, d, out=new, steps=1, limit=20.5), "limit: 20.5 is not a whole number"),
        (lambda: loramix.train_adapter(b, d, out=new, steps=1, top_layers=1.5),
         "top_layers: 1.5 is not a whole number"),
        (lambda: loramix.evaluate(b, data=d, batch=2.5), "batch: 2.5 is not a whole number"),
        (lambda: loramix.evaluate(b, data=d, max_len=40.5), "max_len: 40.5 is not a whole number"),
        (lambda: loramix.evaluate(b, data=d, limit=2.5), "limit: 2.5 is not a whole number"),
        (lambda: loramix.evaluate(b, data=d, limit=float("inf")), "limit: inf is not a whole number"),
        (lambda: loramix.plan(ads, max_group=2.5), "max_group: 2.5 is not a whole number"),
        (lambda: loramix.build_base(d, out=new, steps=1.5), "steps: 1.5 is not a whole number"),
    ]  # fmt: skip
    _each_refused(cases, new, UsageError)
    # a whole float is its int, as before where it worked
    assert loramix.plan(ads, max_group=2.0, progress=False).max_group == 2
    df = loramix.evaluate(b, data=d, limit=4.0, batch=2.0, device="cpu", progress=False)
    assert list(df["records"]) == [4, 4]


def _each_refused(cases, new, error) -> None:
    """Each ``(call, line)`` of ``cases`` raises ``error`` whose message is
    ``line``, leaving nothing at ``new``."""
    for call, line in cases:
        with pytest.raises(error) as e:
            call()
        assert str(e.value) == line
        assert not Path(new).exists()


def test_a_table_or_an_object_where_a_path_is_wanted_is_refused_in_one_line(env):
    """A notebook's DataFrame given where a path (or a list of paths) is wanted: it failed in
    pathlib, "expected str, bytes or os.PathLike object, not DataFrame", naming no argument (out,
    into, a base, fit, a scenario, a GGUF file); or, iterated, gave its column names, each refused
    as a missing file ("question: no such file" for data, adapters); or raised pandas' "truth value
    of a DataFrame is ambiguous" (fit_evaluations, plan's data); or, inside evaluate's data list, an
    AttributeError once the model had loaded. Now one line each, before any work, that names the
    argument or what it stands for, and says what it takes."""
    import pandas as pd

    b, ads, d, new = env["base"], env["ads"], env["data"], env["new"]
    df = pd.DataFrame({"question": ["What is 1 plus 1?"], "answer": ["2"]})
    base = "a base is a model folder or a .gguf file, not a DataFrame"
    data = ("data: takes a data file, a synthetic: spec or a list of them, not a DataFrame (write a DataFrame "
            "as one with df.to_json(PATH, orient='records', lines=True))")  # fmt: skip
    evaluations = "evaluations: takes evaluation files (eval --format json > FILE), not a DataFrame"
    cases = [
        (lambda: loramix.load_adapter(df), "an adapter is a path to a folder or a .safetensors file, not a DataFrame"),
        (lambda: loramix.merge(df, "sum", out=new), "adapters are paths or loaded adapters (or a list of them), not a DataFrame"),
        (lambda: loramix.similarity(dict(a=ads[0])), "adapters are paths or loaded adapters (or a list of them), not a dict"),
        (lambda: loramix.merge(ads, "sum", out=df), "out: is a DataFrame, not a path; give the folder to write"),
        (lambda: loramix.merge(ads, "ties", density=0.5, into=df, out=new), base),
        (lambda: loramix.sum_into_base(ads, into=df, out=new), base),
        (lambda: loramix.similarity(ads, base=df), base),
        (lambda: loramix.train_adapter(df, d, out=new, steps=1), base),
        (lambda: loramix.train_adapter(b, df, out=new, steps=1), data),
        (lambda: loramix.evaluate(b, data=df), data),
        (lambda: loramix.build_base(df, out=new, steps=1), data),
        (lambda: loramix.evaluate(b, data=[df]),
         "data: data set 0 is a DataFrame, not a file, a synthetic: spec or a list of QARecord (write a "
         "DataFrame as one with df.to_json(PATH, orient='records', lines=True))"),
        (lambda: loramix.evaluate(b, data=[["What is 1 plus 1? 2"]]), "data: record set 0 holds a str, not QARecord records"),
        (lambda: loramix.predict(ads, df), "fit: takes a fit file (fit.json, predictors.json) or a study's report folder, not a DataFrame"),
        (lambda: loramix.plan(ads, data=df), data),
        (lambda: loramix.fit_evaluations(df), evaluations),
        (lambda: loramix.fit_evaluations([df]), evaluations),
        (lambda: loramix.run_scenario(df), "a scenario is a path to its TOML file, not a DataFrame"),
        (lambda: loramix.import_gguf(df, out=new), "a GGUF file is a path, not a DataFrame"),
    ]  # fmt: skip
    _each_refused(cases, new, LoramixError)


def test_a_comma_list_given_as_one_string_of_targets_is_said_to_be_a_regex(env):
    """``train_adapter(targets="c_attn,c_fc")``, the command's ``--targets`` form, is one regex in
    Python (PEFT's rule, as the docstring says): it matched no module, and the line listed the
    modules there are, all of them in the string, without saying why. Now it says so and gives
    the list to pass instead."""
    b, d, new = env["base"], env["data"], env["new"]
    with pytest.raises(UsageError) as e:
        loramix.train_adapter(b, d, out=new, steps=1, targets="c_attn, c_fc", progress=False)
    assert str(e.value).startswith("targets: no module of the model matches c_attn, c_fc; ")
    assert str(e.value).endswith(
        "; a string is one regex the whole name must match: name modules in a list, ['c_attn', 'c_fc']"
    )
    assert not Path(new).exists()
    # a list, or a regex without a comma, is as it was
    with pytest.raises(UsageError, match=r"matches \['c_atn'\]; its Linear/Conv1D modules are [^;]*$"):
        loramix.train_adapter(b, d, out=new, steps=1, targets=["c_atn"], progress=False)


def test_import_gguf_refuses_a_bad_dtype_before_it_parses_the_file(tmp_path):
    """``import_gguf(dtype="int3")`` (the command's ``--dtype`` is a choice) was refused only after
    the file's header had been parsed and checked (SmolLM2: 2.6 s here), so a damaged file was
    refused first, for its damage. Now the dtype is, at once, as an existing ``out`` is."""
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 12)  # the magic, then no header that parses
    with pytest.raises(LoramixError) as e:
        loramix.import_gguf(bad, out=tmp_path / "new", dtype="int3")
    assert str(e.value) == "dtype: 'int3' is not one of float32, bfloat16"
    assert not (tmp_path / "new").exists()
