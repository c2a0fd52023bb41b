"""Start-up: ``loramix --help``, every ``loramix CMD --help`` and argument
errors import no torch, transformers or pandas (issue 12, item 2).

Checked on whole processes with ``python -X importtime``, which lists every
module the interpreter imported, so a heavy import anywhere on the path
(including one a dependency pulls in) fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loramix.cli import COMMANDS

HEAVY = ("torch", "transformers", "pandas")
ROOT = Path(__file__).resolve().parents[1]


def imported_modules(*args: str, cwd: Path = ROOT) -> tuple[int, set[str], str]:
    """Run ``python -X importtime -m loramix ARGS``; its exit code, the names
    of the modules it imported and its stderr without the import lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loramix", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    mods, rest = set(), []
    for line in p.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "package":  # the header line
                mods.add(name)
        else:
            rest.append(line)
    return p.returncode, mods, "\n".join(rest)


def heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_importtime_lists_torch_when_torch_is_imported():
    # The probe itself must be able to see a heavy import, or the tests below prove nothing.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import loramix.devices as d; d.resolve_device('cpu')"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "torch" in {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()}


def test_top_level_help_imports_no_torch():
    rc, mods, err = imported_modules("--help")
    assert rc == 0, err
    assert "loramix.cli" in mods
    assert heavy(mods) == []


@pytest.mark.parametrize("command", sorted(COMMANDS.values()))
def test_command_help_imports_no_torch(command):
    rc, mods, err = imported_modules(command, "--help")
    assert rc == 0, err
    assert heavy(mods) == [], f"loramix {command} --help imported {heavy(mods)[:5]}"


@pytest.mark.parametrize(
    "args",
    [
        ("similarity",),  # no adapters: click's missing-argument error
        ("similarity", "a"),  # one adapter: loramix's own usage error
        ("similarity", "a", "b", "--format", "xml"),
        ("sum", "a", "b"),  # no --out
        ("sum", "a", "b", "--out", "o", "--weights", "1"),  # weights count
        ("sum", "a", "b", "--out", "o", "--dtype", "int8"),
        ("merge", "a", "b"),  # no --method
        ("train", "--base", "b"),
        ("eval", "--data", "d"),
        ("base", "build"),
        ("predict",),
        ("scenario", "run"),
        ("inspect",),
        ("no-such-command",),
        # a mistyped or wrong path: refused by the torch-free checks before torch loads
        ("inspect", "missing"),
        ("inspect", "."),  # a folder, but no adapter in it
        ("sum", "a", "b", "--out", "o"),
        ("merge", "a", "b", "--method", "ties", "--out", "o"),
        ("plan", "a", "b"),
        ("base", "import", "missing.gguf", "--out", "o"),
        ("scenario", "check", "missing.toml"),
        ("eval", "--base", "b", "--data", "missing.jsonl"),  # the data are read before the device is resolved
        ("base", "build", "--data", "missing.jsonl", "--out", "o"),  # likewise
        ("base", "build", "--data", "synthetic:arith?n=20", "--out", "."),  # --out: before the device too
        ("similarity", "a", "b"),  # the paths are checked before pandas loads (overlap's results)
        ("similarity", "a", "b", "--plot", "x.xyz"),  # plots.check_figure_path needs matplotlib only
        ("scenario", "run", "missing.toml"),  # the report's writer (pandas) loads after the study
        ("predict", "a", "b", "--fit", "missing.json"),  # overlap (pandas) loads after the fit is read
    ],
)
def test_argument_errors_import_no_torch(args, tmp_path):
    rc, mods, err = imported_modules(*args, cwd=tmp_path)
    assert rc == 2, err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--base", "{base}", "--data", "{data}", "--out", "o", "--kind", "bogus"),
        ("train", "--base", "{base}", "--data", "{data}", "--out", "o", "--method", "bogus"),
        ("train", "--base", "{base}", "--data", "{data}", "--out", "o", "--rank", "0"),
        ("train", "--base", "{base}", "--data", "missing.jsonl", "--out", "o"),
        ("train", "--base", "{base}", "--data", "{data}", "--out", "{exists}"),
        ("train", "--base", "missing", "--data", "{data}", "--out", "o"),
        ("train", "--base", "{exists}", "--data", "{data}", "--out", "o"),  # no config.json
        ("eval", "--base", "missing", "--data", "{data}"),
        ("eval", "--base", "{exists}", "--data", "{data}"),
        ("eval", "--base", "{base}", "--data", "{data}", "--adapter", "missing"),
        ("eval", "--base", "{base}", "--data", "{data}", "--adapter", "{exists}"),  # no adapter in it
        ("eval", "--base", "{base}", "--data", "{data}", "--dtype", "int8"),
    ],
)
def test_train_and_eval_path_errors_import_no_torch(args, tmp_path):
    """train checks --kind against the names the kind files declare, and both
    commands check the data, the base folder (it exists, has a config.json) and
    the adapters' paths before torch loads; the base's model type, which needs
    transformers, is checked when it loads."""
    f = {"base": tmp_path / "base", "data": tmp_path / "d.jsonl", "exists": tmp_path / "exists"}
    f["base"].mkdir()
    (f["base"] / "config.json").write_text('{"model_type": "gpt2"}')
    f["data"].write_text('{"question": "q", "answer": "a"}\n' * 3)
    f["exists"].mkdir()
    rc, mods, err = imported_modules(*(a.format(**f) for a in args), cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


def test_scenario_check_imports_no_torch(tmp_path):
    """``scenario check`` validates and estimates, no work: the kinds' needs_base
    is read from their files (scenario.traits), the CPU is told without torch
    (devices.is_cpu), and the predictors' minimum is read without pandas (a
    scenario on a base folder: test_scenario_check_of_a_base_folder_imports_no_torch)."""
    rc, mods, err = imported_modules(
        "scenario", "check", str(ROOT / "scenarios" / "quickstart.toml"), "--cache", str(tmp_path / "c"),
        cwd=tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    assert heavy(mods) == [], f"scenario check imported {heavy(mods)[:5]}"


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    from .factories import make_peft_adapter, tiny_gpt2

    where, model = tmp_path_factory.mktemp("adapters"), tiny_gpt2()
    (where / "exists").mkdir()
    return {"exists": str(where / "exists")} | {
        n: str(make_peft_adapter(model, where / n, seed=i, r=4)) for i, n in enumerate("ab")
    }


@pytest.mark.parametrize(
    "args",
    [
        ("merge", "{a}", "{b}", "-m", "ties", "--density", "2", "--out", "o"),
        ("merge", "{a}", "{b}", "-m", "svd", "--rank", "0", "--out", "o"),
        ("merge", "{a}", "{b}", "-m", "sum", "--density", "0.5", "--out", "o"),  # not sum's
        ("sum", "{a}", "{b}", "--energy", "2", "--out", "o"),
        ("sum", "{a}", "{b}", "--out-rank", "2", "--into", "base", "--out", "o"),
        ("merge", "{a}", "{b}", "-m", "svd", "--out", "o"),  # svd's check: --rank or --energy
        ("merge", "{a}", "{b}", "-m", "della", "--density", "0.5", "--epsilon", "0.6", "--out", "o"),
        ("sum", "{a}", "{b}", "--out", "{exists}"),  # the output is checked before the adapters load too
        ("sum", "{a}", "{b}", "--out", "{a}"),
        ("merge", "{a}", "{b}", "-m", "ties", "--density", "0.5", "--out-rank", "2", "--out", "{exists}"),
        ("sum", "{a}", "{b}", "--into", "missing", "--out", "o"),  # --into: the base's first checks too
        ("merge", "{a}", "{b}", "-m", "ties", "--density", "0.5", "--into", "{exists}", "--out", "o"),
        # a dense method without --into: "pass --into" after the adapters' checks, in numpy (LoRA, CPU)
        ("merge", "{a}", "{b}", "-m", "ties", "--density", "0.5", "--out", "{exists}"),
        ("merge", "{a}", "{b}", "-m", "della", "--density", "0.5", "--out", "o", "--device", "cpu"),
    ],
)
def test_merge_parameter_errors_import_no_torch(args, two_adapters, tmp_path):
    """The truncation, the method's parameters, the output and the base
    folder (``--into``: it exists, has a config.json) are checked before the
    adapters load (run_merge and BaseModelFolder check them again)."""
    rc, mods, err = imported_modules(*(a.format(**two_adapters) for a in args), cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


def test_method_params_import_no_torch():
    # The merge command's options are built from these declarations.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, json, loramix.methods.params as p; p.DENSITY.coerce(0.5); print(json.dumps(list(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    mods = set(json.loads(p.stdout))
    assert heavy(mods) == []
    from loramix.methods.base import DENSITY, Param
    from loramix.methods.params import DENSITY as D2
    from loramix.methods.params import Param as P2

    assert Param is P2 and DENSITY is D2


def _run_entry(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_entry_point_runs_atexit_handlers_and_flushes_before_it_exits():
    """``run()`` ends the process without the interpreter's teardown
    (cli.exit_now), but the atexit handlers still run, in order, after the
    command's own output, and piped stdout and stderr arrive whole."""
    prog = (
        "import atexit, sys\n"
        "atexit.register(print, 'atexit ran')\n"
        "sys.argv = ['loramix', {args}]\n"
        "from loramix.cli import run\n"
        "run()\n"
        "print('never here')\n"
    )
    p = _run_entry(prog.format(args="'--version'"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [p.stdout.splitlines()[0], "atexit ran"]
    assert p.stdout.startswith("loramix, version ")
    p = _run_entry(prog.format(args="'sum', 'a', 'b', '--weights', 'x', '--out', 'o'"))
    assert p.returncode == 2
    assert p.stderr.strip().startswith("loramix: error: --weights") and p.stdout == "atexit ran\n"


def test_predict_with_a_fit_json_imports_no_torch(tmp_path):
    """``predict A B --fit fit.json`` reads the adapters with the numpy reader:
    its cosines are computed in numpy on the CPU anyway (overlap.similarity),
    so the process never pays for torch (the same figures: test_predict)."""
    from loramix.fit import fit_line

    from .factories import make_peft_adapter, tiny_gpt2
    from .test_predict import _data

    model = tiny_gpt2()
    a, b = (make_peft_adapter(model, tmp_path / n, seed=i, r=4) for i, n in enumerate("ab"))
    x, y = _data(n=5, seed=1)
    fit = tmp_path / "fit.json"
    fit.write_text(
        json.dumps({"fits": [{"adapter_method": "lora", "merge_method": "sum", **fit_line(x, y).to_dict()}]})
    )
    rc, mods, err = imported_modules("predict", str(a), str(b), "--fit", str(fit))
    assert rc == 0, err
    assert not {"torch", "transformers"} & mods
    rc, mods, err = imported_modules("predict", str(a), "missing", "--fit", str(fit))
    assert rc == 2 and "missing: no such file or folder" in err
    assert not {"torch", "transformers"} & mods


def test_inspect_of_a_lora_adapter_imports_no_torch(tmp_path):
    """``inspect A`` reads a PEFT LoRA adapter with the numpy reader and
    computes its norms in numpy float64 (the same figures: test_inspect)."""
    import torch
    from safetensors.torch import load_file, save_file

    from .factories import make_peft_adapter, tiny_gpt2

    a = make_peft_adapter(tiny_gpt2(), tmp_path / "a", r=4, rank_pattern={"c_fc": 2}, use_rslora=True)
    w = a / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(w).items()}, w)
    for fmt in ("table", "json"):
        rc, mods, err = imported_modules("inspect", str(a), "--format", fmt)
        assert rc == 0, err
        assert not {"torch", "transformers"} & mods, fmt


def test_inspect_and_similarity_of_dora_adapters_import_no_torch(tmp_path, capsys):
    """A PEFT DoRA adapter on linear layers is LoRA factors and a magnitude
    vector: ``inspect`` (magnitudes shown) and ``similarity`` without a base
    (on the residuals) read it with the numpy reader. Before, both imported
    torch for it (2.4 s CPU instead of 0.5 s for an inspect)."""
    from loramix.cli import main

    from .factories import make_peft_adapter, tiny_gpt2

    model = tiny_gpt2()
    a = make_peft_adapter(model, tmp_path / "a", r=4, use_dora=True)
    b = make_peft_adapter(model, tmp_path / "b", seed=1, r=2, use_dora=True, target_modules=["c_attn"])
    for args in (
        ["inspect", str(a)],
        ["inspect", str(a), "--format", "json"],
        ["similarity", str(a), str(b)],
    ):
        rc, mods, err = imported_modules(*args)
        assert rc == 0, err
        assert not {"torch", "transformers"} & mods, args
    capsys.readouterr()
    assert main(["inspect", str(a)]) == 0
    assert "magnitude m (DoRA, one per output row" in capsys.readouterr().out


def test_gguf_import_to_an_existing_out_is_refused_before_the_file_is_parsed(tmp_path):
    """``base import F --out EXISTING`` says so at once: parsing a real GGUF's
    header (gguf.GGUFReader over its vocabulary) takes seconds."""
    from .test_realmodel import llama_gguf

    path = llama_gguf(tmp_path / "m.gguf", tokenizer=True)
    (tmp_path / "out").mkdir()
    rc, mods, err = imported_modules("base", "import", str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and "already exists" in err, err
    assert not {"gguf", "torch", "numpy"} & mods


def test_plan_without_a_fit_and_a_predictors_files_path_errors_import_no_torch(tmp_path):
    """``plan A B`` (the RMS cosine) reads the adapters with the numpy reader;
    ``predict`` with a predictors file refuses a missing adapter before torch
    loads (the feature registry it checks the file against is torch-free)."""
    from .factories import make_peft_adapter, tiny_gpt2

    model = tiny_gpt2()
    a, b = (make_peft_adapter(model, tmp_path / n, seed=i, r=4) for i, n in enumerate("ab"))
    rc, mods, err = imported_modules("plan", str(a), str(b))
    assert rc == 0, err
    assert not {"torch", "transformers"} & mods
    predictors = ROOT / "reports" / "quickstart" / "predictors.json"
    if predictors.is_file():
        rc, mods, err = imported_modules("predict", str(a), "missing", "--fit", str(predictors))
        assert rc == 2 and "missing: no such file or folder" in err, err
        assert not {"torch", "transformers"} & mods
        # without --data its features (subspace_overlap, per-type cosines) are numpy's
        for args in (("predict", str(a), str(b)), ("plan", str(a), str(b))):
            rc, mods, err = imported_modules(*args, "--fit", str(predictors))
            assert rc == 0, err
            assert not {"torch", "transformers"} & mods, args[0]


@pytest.mark.parametrize(
    "args",
    [
        ("plan", "{a}", "{b}", "--fit", "missing.json"),
        ("plan", "{a}", "{b}", "--fit", "{bad}"),
        # with --data the adapters load with torch: the fit file is read first
        (
            "plan",
            "{a}",
            "{b}",
            "--fit",
            "missing.json",
            "--data",
            "{data}",
            "--data",
            "{data}",
            "--base",
            "{base}",
        ),
        ("predict", "{a}", "missing", "--fit", "{fit}"),  # the fit file parses: the adapters, then overlap
        ("predict", "{a}", "{b}", "--fit", "{fit}", "--data", "{data}"),
        ("predict", "{a}", "missing", "--fit", "{predictors}"),
        ("predict", "{a}", "{b}", "--fit", "{predictors}", "--label", "x"),
    ],
)
def test_fit_file_errors_import_no_pandas(args, two_adapters, tmp_path):
    """A fit or predictors file that is missing, does not parse, or parses
    but comes with a wrong adapter or option is refused without pandas:
    loramix.validation and the feature registry import it where a table is
    made, ``plan`` reads the file before the adapters load, and ``predict``
    imports overlap once the adapters are read."""
    from loramix.fit import fit_line

    from .test_predict import _data

    x, y = _data(n=5, seed=1)
    f = {**two_adapters, "fit": tmp_path / "fit.json", "bad": tmp_path / "bad.json", "data": tmp_path / "d.jsonl",
         "base": tmp_path / "base", "predictors": ROOT / "reports" / "quickstart" / "predictors.json"}  # fmt: skip
    if "{predictors}" in args and not f["predictors"].is_file():
        pytest.skip("no reports/quickstart/predictors.json")
    f["fit"].write_text(
        json.dumps({"fits": [{"adapter_method": "lora", "merge_method": "sum", **fit_line(x, y).to_dict()}]})
    )
    f["bad"].write_text("{not json")
    f["data"].write_text('{"question": "q", "answer": "a"}\n' * 3)
    f["base"].mkdir()
    (f["base"] / "config.json").write_text('{"model_type": "gpt2"}')
    rc, mods, err = imported_modules(*(a.format(**f) for a in args), cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


@pytest.fixture(scope="module")
def bases_with_tokenizer(tmp_path_factory):
    """Tiny Llama and GPT-2 bases of 2 blocks with a real tokenizer (a byte-level BPE trained on the spot)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .factories import save_base, tiny_gpt2, tiny_llama

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["1 + 2 = 3", "two plus two is four"], trainers.BpeTrainer(vocab_size=300))
    where, out = tmp_path_factory.mktemp("bases"), {}
    for name, model in (("llama", tiny_llama()), ("gpt2", tiny_gpt2())):
        out[name] = save_base(model, where / name)
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(out[name]))
    return out


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize(
    ("base", "top", "line"),
    [
        ("llama", "0", "must be between 1 and the model's 2 layers, got 0"),
        ("llama", "3", "must be between 1 and the model's 2 layers, got 3"),
        ("gpt2", "1", "model type 'gpt2' does not allow the frozen-prefix cache (loramix.archs)"),
    ],
)
def test_top_layers_errors_import_no_torch(command, base, top, line, bases_with_tokenizer, tmp_path):
    """``--top-layers`` out of the base's blocks, or on an architecture without
    the frozen-prefix cache, is refused from config.json (the model type, and
    ``num_hidden_layers`` for the Llama family) before torch loads
    (archs.check_top_layers), with the line prefix.split_point says of the
    loaded model, which checks it again."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n' * 3)
    args = [command, "--base", str(bases_with_tokenizer[base]), "--data", str(data), "--top-layers", top]
    rc, mods, err = imported_modules(*args, *(["--out", "o"] if command == "train" else []), cwd=tmp_path)
    assert rc == 2 and err.strip() == f"loramix: error: --top-layers: {line}", err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (("", ""), None),
        (
            ("rank = 4", "rank = 17"),
            "adapters.rank: 17 is above 16, the smallest dimension of a targeted weight",
        ),
        (("rank = 4", "rank = 4\ntop_layers = 3"), "adapters.top_layers: 3 is above the base's 2 blocks"),
    ],
)
def test_scenario_check_of_a_base_folder_imports_no_torch(edit, line, bases_with_tokenizer, tmp_path):
    """``scenario check`` of a scenario on a base folder reads its config and
    safetensors headers (io.model_folder imports torch where a tensor or a
    dtype is made) and hashes its files (st_header): no torch."""
    from .test_scenario import GOOD

    base = f'[base]\npath = "{bases_with_tokenizer["llama"]}"'
    scen = tmp_path / "s.toml"
    scen.write_text(GOOD.replace("[base.build]\nsteps = 5", base).replace(*edit))
    rc, mods, err = imported_modules(
        "scenario", "check", str(scen), "--cache", str(tmp_path / "c"), cwd=tmp_path
    )
    if line is None:
        assert rc == 0, err
    else:
        assert rc == 2 and err.strip() == f"loramix: error: {scen}: {line}", err
    assert heavy(mods) == [], f"scenario check imported {heavy(mods)[:5]}"


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ("b", "--into: method ties writes a dense delta: pass --into BASE"),
        ("wide", "has shape 144x48 but 96x32 in"),  # check_compatible first, as run_merge
        ("llama", "cannot belong to one base model"),  # check_one_base too
    ],
)
def test_a_dense_merge_without_into_is_refused_without_torch(other, words, two_adapters, tmp_path):
    """``merge -m ties`` without ``--into`` or a truncation has nothing to write.
    The adapters' checks that come before that line (the files, their shapes,
    one base) are made on the numpy reader's LoRA adapters, so each line is
    run_merge's and the process imports no torch (test_merge checks the lines
    with the torch path)."""
    from .factories import make_peft_adapter, tiny_gpt2, tiny_llama

    paths = {"b": two_adapters["b"]}
    if other == "wide":
        paths["wide"] = make_peft_adapter(tiny_gpt2(n_embd=48), tmp_path / "wide", r=4)
    if other == "llama":
        paths["llama"] = make_peft_adapter(tiny_llama(), tmp_path / "llama", r=4)
    args = ("merge", two_adapters["a"], str(paths[other]), "-m", "ties", "--density", "0.5", "--out", "o")
    rc, mods, err = imported_modules(*args, cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert heavy(mods) == [], f"loramix {' '.join(args)} imported {heavy(mods)[:5]}"


def test_a_command_run_under_cprofile_leaves_its_profile(tmp_path):
    """``python -m cProfile -o FILE -m loramix ...`` (how to find where a
    command's time goes) writes FILE: the entry point's ``os._exit``
    (cli.exit_now) ended the process before cProfile wrote it, so there was
    none. A profiled run takes Python's normal exit (sys.exit)."""
    import pstats

    prof = tmp_path / "p.prof"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "loramix", "sum", "a", "b",
                        "--weights", "x", "--out", "o"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)  # fmt: skip
    # cProfile takes the SystemExit for the end of its script: its exit status is 0
    assert p.stderr.strip().startswith("loramix: error: --weights"), p.stderr
    assert prof.is_file(), "no profile written"
    funcs = {f"{Path(f).name}:{name}" for f, _, name in pstats.Stats(str(prof)).stats}
    assert "__init__.py:main" in funcs
