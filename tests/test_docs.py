"""The README, docs/*.md and every ``--help`` against the code: every option
explained in its help, every ``loramix CMD --flag`` the docs write taken by
that command, every ``LORAMIX_*`` variable the package reads documented and
every documented one read; and the defaults and constants that the math
pages (docs/d2lora.md, predictors.md, interference.md, merging.md,
adapters.md, scenarios.md) state, against the code's."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from loramix.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> dict[str, click.Command]:
    """``{"loramix sum": command, "loramix base build": ..., ...}``: every leaf command."""
    out = {}

    def walk(cmd, path, ctx):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                walk(sub, [*path, name], click.Context(sub, info_name=name, parent=ctx))
        else:
            out[" ".join(path)] = (cmd, ctx)

    walk(cli, ["loramix"], click.Context(cli, info_name="loramix"))
    return out


COMMANDS = _commands()


def _options(name: str) -> list[click.Option]:
    cmd, ctx = COMMANDS[name]
    return [p for p in cmd.get_params(ctx) if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_says_what_it_does(name):
    """An option without a help text shows up in ``--help`` as its bare name
    (``--rank INTEGER  [default: 8]``): say what it sets."""
    bare = [p.opts[0] for p in _options(name) if not p.hidden and not (p.help or "").strip()]
    assert bare == [], f"{name}: options without a help text: {bare}"


def _doc_lines():
    for f in DOCS:
        text = f.read_text().replace("\\\n", " ")  # a shell line continued
        for i, line in enumerate(text.splitlines(), 1):
            yield f.relative_to(ROOT), i, line


def test_every_flag_the_docs_give_a_command_is_one_of_its_options():
    """``loramix CMD ... --flag`` in the README or docs/ (up to the end of the
    code span, a pipe, a semicolon or a parenthesis): CMD takes ``--flag``."""
    takes = {name: {o for p in _options(name) for o in (*p.opts, *p.secondary_opts)} for name in COMMANDS}
    groups = "|".join(sorted({n.split()[1] for n in COMMANDS if len(n.split()) == 3}))
    pattern = re.compile(rf"loramix ((?:{groups}) [a-z]+|[a-z]+)\b([^`|;()]*)")
    wrong = []
    for f, i, line in _doc_lines():
        for m in pattern.finditer(line):
            name = f"loramix {m.group(1)}"
            if name not in COMMANDS:
                continue  # prose: "loramix reads ...", "loramix does not ..."
            for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", m.group(2)):
                if flag not in takes[name] and flag not in ("--debug", "--help", "-h"):
                    wrong.append(f"{f}:{i}: {name} has no {flag}")
    assert wrong == []


def test_every_flag_the_docs_name_exists():
    """A ``--flag`` anywhere in the README or docs/ is some command's option
    (a renamed one would linger in prose otherwise)."""
    known = {o for name in COMMANDS for p in _options(name) for o in (*p.opts, *p.secondary_opts)}
    known |= {"--debug", "--version", "--help"}
    not_ours = {"--check", "--no-deps"}  # ruff format --check, pip download --no-deps
    wrong = [f"{f}:{i}: {flag}" for f, i, line in _doc_lines()
             for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)
             if flag not in known and flag not in not_ours]  # fmt: skip
    assert wrong == []


def _variables(paths) -> set[str]:
    return {v for p in paths for v in re.findall(r"\bLORAMIX_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())}


def test_every_loramix_variable_is_documented_and_every_documented_one_read():
    read = _variables((ROOT / "loramix").rglob("*.py"))
    documented = _variables(DOCS)
    assert read - documented == set(), "read by loramix/ but in neither README.md nor docs/"
    assert documented - read == set(), "documented but read nowhere in loramix/"


def test_the_readme_names_each_commands_device_default():
    """README's Conventions list which commands default to ``--device auto``
    (CUDA where there is a GPU) and which to ``cpu``."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    start = readme.index("- `--device auto|cpu|cuda`:")
    line = readme[start : readme.index("- ", start + 2)]
    auto_part, cpu_part = line.split("uses CUDA")[0], line.split("uses CUDA")[1]
    for name in COMMANDS:
        device = [p for p in _options(name) if "--device" in p.opts]
        if not device:
            continue
        short = f"`{name.removeprefix('loramix ').split()[0]}`"
        if name.startswith("loramix base "):
            short = "`base build`"
        said = short in auto_part and "auto" or short in cpu_part and "cpu" or None
        assert said == device[0].default, f"{name}: --device defaults to {device[0].default}, README: {said}"


def test_every_device_option_shows_its_choices_alike():
    """``--device`` reads the same in every command's help: its choices where click
    shows a choice's (``[auto|cpu|cuda]``; sum and merge said TEXT, eval the
    choices), what auto means, and a checked value, cuda:N taken as by the library."""
    from click.testing import CliRunner

    from loramix.cli import cli
    from loramix.devices import DEVICE_CHOICES

    seen = 0
    for name in COMMANDS:
        device = [p for p in _options(name) if "--device" in p.opts]
        if not device:
            continue
        seen += 1
        opt, ctx = device[0], COMMANDS[name][1]
        assert opt.make_metavar(ctx) == f"[{'|'.join(DEVICE_CHOICES)}]", name
        assert opt.help.endswith(": auto (CUDA where torch sees a GPU, else the CPU), cpu or cuda."), name
    assert seen >= 8
    help_text = CliRunner().invoke(cli, ["eval", "--help"]).output
    assert "--device [auto|cpu|cuda]" in help_text


def test_every_plug_in_is_named_in_its_document():
    """A merge method, adapter kind or feature is one file that the packages
    discover; the tables that explain them are written by hand, so a new one
    is asked for here: a method's math in docs/merging.md and its name in the
    README's list of methods, a kind's row in docs/adapters.md, a feature's
    matrix in docs/predictors.md (README, "Adding ...")."""
    from loramix.features import registry
    from loramix.kinds import KINDS
    from loramix.methods import available_methods

    merging, adapters, predictors = (
        (ROOT / "docs" / f).read_text() for f in ("merging.md", "adapters.md", "predictors.md")
    )
    readme = " ".join((ROOT / "README.md").read_text().split())
    methods = readme[
        readme.index("`loramix merge -m NAME`") : readme.index("All act on the true per-module deltas")
    ]
    missing = [f"docs/merging.md: {n}" for n in available_methods() if f"`{n}`" not in merging]
    missing += [f"README.md (merge -m NAME): {n}" for n in available_methods() if f"`{n}`" not in methods]
    packaged = [n for n, k in KINDS.items() if type(k).__module__.startswith("loramix.kinds.")]
    missing += [f"docs/adapters.md (Kinds): {n}" for n in packaged if f"| `{n}` |" not in adapters]
    missing += [f"docs/predictors.md (Features): {n}" for n in registry() if f"`{n}" not in predictors]
    assert missing == []


# ---------------------------------------------------------------- the math pages' numbers


def _doc(name: str) -> str:
    """``docs/NAME`` with its whitespace folded (a phrase may break across lines)."""
    return " ".join((ROOT / "docs" / name).read_text().split())


def _said(doc: str, pattern: str) -> str:
    """The first group of ``pattern`` in ``doc``; fails naming the pattern when the phrase is gone."""
    m = re.search(pattern, doc)
    assert m is not None, f"the docs no longer say {pattern!r}: reword this test with them"
    return m[1]


def _default(name: str, flag: str):
    return next(p.default for p in _options(name) if flag in p.opts)


def test_the_d2lora_page_states_the_kinds_defaults():
    """docs/d2lora.md's defaults of eps, tau and norm_dim are those of the kind,
    its training layer and ``loramix train``."""
    import inspect

    from loramix.kinds import D2LORA
    from loramix.kinds.d2lora import D2LoraLinear

    doc = _doc("d2lora.md")
    said = {
        "eps": float(_said(doc, r"\*\*eps\*\* \(default `([^`]+)`\)")),
        "tau": float(_said(doc, r"\*\*tau\*\* is fixed \(default `([^`]+)`\)")),
        "norm_dim": int(_said(doc, r"`(\d)` \(default\) takes one norm per output unit")),
    }
    assert said == D2LORA.options
    layer = inspect.signature(D2LoraLinear.__init__).parameters
    assert {k: layer[k].default for k in said} == said
    assert _default("loramix train", "--tau") == said["tau"]
    assert _default("loramix train", "--norm-dim") == said["norm_dim"]


def test_the_predictors_page_states_the_validations_constants():
    """docs/predictors.md: the ridge's lambdas, its interval's quantiles at the
    default level, the plan's defaults and the calibration recipe of a file
    that records none; docs/scenarios.md: the compositions a validation needs
    and the random groupings a verdict needs."""
    import inspect

    from loramix.features._calibration import DEFAULT_MAX_LEN, DEFAULT_TOKENS
    from loramix.grouping import COSINE_BUDGET, plan
    from loramix.scenario.config import PredictorSpec
    from loramix.scenario.planval import ALPHA
    from loramix.scenario.predictors import MIN_COMPOSITIONS
    from loramix.validation import LAMBDAS, validate

    doc = _doc("predictors.md")
    lambdas = _said(doc, r"`lambda` comes from `\{([^}]*)\}`")
    assert tuple(float(v) for v in lambdas.split(",")) == LAMBDAS
    lo, hi = _said(doc, r"the (\d+)% and (?:\d+)% quantiles"), _said(doc, r"the \d+% and (\d+)% quantiles")
    level = inspect.signature(validate).parameters["level"].default
    assert (float(lo), float(hi)) == (round(100 * (1 - level) / 2, 9), round(100 * (1 + level) / 2, 9))
    assert PredictorSpec().level == level
    assert int(_said(doc, r"has at most `K` members \(default (\d+)\)")) == _default(
        "loramix plan", "--max-group"
    )
    assert inspect.signature(plan).parameters["max_group"].default == _default("loramix plan", "--max-group")
    assert float(_said(doc, r"The default budget is a cosine of ([0-9.]+)\.")) == COSINE_BUDGET
    assert float(_said(doc, r"The default budget is (\d+), the zero-interference point")) == 0.0
    assert _said(doc, r"gets (\d+ and \d+)\.") == f"{DEFAULT_TOKENS} and {DEFAULT_MAX_LEN}"

    scen = _doc("scenarios.md")
    assert int(_said(scen, r"retention needs (\d+) compositions")) == MIN_COMPOSITIONS
    # p = (1 + #{random <= plan}) / (R + 1) reaches ALPHA only from this R on
    assert int(_said(scen, r"which needs `random` ≥ (\d+)")) == min(
        r for r in range(1, 1000) if 1 / (r + 1) <= ALPHA
    )


def test_the_interference_page_states_the_fit_files_level():
    """docs/interference.md: ``loramix predict``'s interval is at 95 % unless
    asked otherwise, the level a scenario writes into fit.json."""
    from loramix.scenario.report import PI_LEVEL

    said = _said(_doc("interference.md"), r"at `level` \(default (\d+) %")
    assert float(said) / 100 == PI_LEVEL


def test_the_merging_and_adapters_pages_state_the_codes_constants():
    """docs/merging.md's TIES engine (the sample stride, the one-pass band, the
    block sizes) and della's divisor; docs/adapters.md's range of the Gram
    products' factors."""
    from loramix.methods.base import (
        FACTOR_BLOCK_ELEMENTS,
        ONE_PASS_BAND,
        ROW_BLOCK_ELEMENTS,
        SAMPLE_STRIDE,
    )
    from loramix.methods.della import DIVIDE_WEIGHT
    from loramix.overlap import GRAM_RANGE

    doc = _doc("merging.md")
    assert int(_said(doc, r"every (\d+)(?:st|nd|rd|th) entry gives")) == SAMPLE_STRIDE
    assert float(_said(doc, r"a band around it \((\d+) standard errors")) == ONE_PASS_BAND
    assert int(_said(doc, r"Such blocks hold at most (\d+)K entries")) * 1024 == FACTOR_BLOCK_ELEMENTS
    assert int(_said(doc, r"blocks of rows \((\d+) MiB of float32")) << 20 == 4 * ROW_BLOCK_ELEMENTS
    assert _said(doc, r"disjoint merge with `--divide (\w+)`") == DIVIDE_WEIGHT.default
    exp = int(_said(_doc("adapters.md"), r"beyond `2\^\+-(\d+)`"))
    assert GRAM_RANGE == (2.0**-exp, 2.0**exp)


def test_the_predictors_page_names_each_features_aggregation():
    """docs/predictors.md: a composition takes the plain mean of the signed
    features (``*mean_cosine``, ``coverage``), ``member_sum`` of
    ``pairs_per_member``, and the RMS of its member pairs for every other."""
    from loramix.features import registry

    doc = _doc("predictors.md")
    assert "The signed features (`*mean_cosine`, `coverage`) take the plain mean" in doc
    assert "aggregates by `member_sum`" in doc
    assert "`max_cosine` takes the largest" in doc
    said = {
        name: "mean"
        if name.endswith("mean_cosine") or name == "coverage"
        else "member_sum"
        if name == "pairs_per_member"
        else "max"
        if name == "max_cosine"
        else "rms"
        for name in registry()
    }
    assert {name: f.aggregate for name, f in registry().items()} == said


def test_the_merge_help_and_docstring_name_every_method_that_writes_an_exact_adapter():
    """``merge --help`` and :func:`loramix.merge` list the low-rank methods
    (``low_rank``: the exact adapter without ``--into``), written by hand."""
    from loramix.methods import merge, method_classes

    exact = sorted(n for n, c in method_classes().items() if c.low_rank)
    cmd, _ = COMMANDS["loramix merge"]
    said = _said(" ".join(cmd.help.split()), r"Low-rank methods \(([^)]*)\) write a PEFT adapter")
    assert sorted(said.split(", ")) == exact
    said = _said(" ".join(merge.__doc__.split()), r"exact for the low-rank methods \(([^:]*):")
    assert sorted(s.strip("` ") for s in said.split(",")) == exact


def test_the_merging_page_states_the_engines_block_and_write_sizes():
    """docs/merging.md's engine (and the README's direct writes): the blocks
    of rows, the size from which a weight file skips the page cache, the
    write buffers, and the age at which an ownerless temporary is stale."""
    from loramix.engine import BLOCKS_PER_THREAD, MAX_BLOCK_ELEMENTS, MIN_ROWS
    from loramix.io.outputs import ORPHAN_SECONDS
    from loramix.io.shard_writer import DIRECT_CHUNK, DIRECT_MIN_BYTES

    doc = _doc("merging.md")
    big, per = (
        _said(doc, r"up to (\d+)M entries while each thread"),
        _said(doc, r"each thread still gets (\d+) blocks"),
    )
    assert (int(big) << 20, int(per)) == (MAX_BLOCK_ELEMENTS, BLOCKS_PER_THREAD)
    assert int(_said(doc, r"a block has at least (\d+) rows")) == MIN_ROWS
    assert int(_said(doc, r"starts on a multiple of (\d+)")) == MIN_ROWS
    readme = " ".join((ROOT / "README.md").read_text().split())
    for text in (doc, readme):
        assert int(_said(text, r"A weight file of (\d+) MiB or more")) << 20 == DIRECT_MIN_BYTES
    assert int(_said(doc, r"two page-aligned (\d+) MiB buffers")) << 20 == DIRECT_CHUNK
    assert int(_said(doc, r"plus the adapters and (\d+) MiB of write buffers")) << 20 == 2 * DIRECT_CHUNK
    assert float(_said(doc, r"is stale once older than (\d+) s")) == ORPHAN_SECONDS


def test_the_readme_states_the_limits_and_the_progress_lines_pace():
    """README: the bound on ``--weights`` and ``--lambda``, the pace of the
    plain progress line, and the adapter count below which ``similarity``
    runs OpenBLAS on one thread."""
    from loramix.blas import ONE_THREAD_BELOW
    from loramix.options import MAX_WEIGHT
    from loramix.progress import LINE_EVERY

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert float(_said(readme, r"must be finite and at most (\S+) in size")) == MAX_WEIGHT
    assert _said(readme, r"a plain line at most (once a minute)") and LINE_EVERY == 60.0
    assert int(_said(readme, r"`similarity` \(below (\d+) adapters\)")) == ONE_THREAD_BELOW


def test_the_scenarios_page_states_the_runs_limits_and_trains_defaults():
    """docs/scenarios.md: the workers a run starts unasked, the estimate's
    history, the Ray run's poll and probe, the refusal limits, and the
    ``loramix train`` defaults it sets against a study's."""
    from loramix.scenario.config import MAX_RANK, MAX_SYNTHETIC_RECORDS
    from loramix.scenario.estimate import HISTORY
    from loramix.scenario.executors import AUTO_JOBS_MAX, AUTO_MIN_TRAININGS, PROBE_SECONDS, STOP_POLL_SECONDS

    doc = _doc("scenarios.md")
    assert int(_said(doc, r"one worker process per usable core \(at most (\d+)\)")) == AUTO_JOBS_MAX
    assert int(_said(doc, r"the plan has at least (\d+) trainings per worker")) == AUTO_MIN_TRAININGS
    assert int(_said(doc, r"the older history counts as at most (\d+) steps")) == HISTORY
    assert float(_said(doc, r"which each task looks for every ([0-9.]+) s")) == STOP_POLL_SECONDS
    assert float(_said(doc, r"where nothing answers within (\d+) s")) == PROBE_SECONDS
    assert int(_said(doc, r"asked for more than (\d+) records")) == MAX_SYNTHETIC_RECORDS
    assert int(_said(doc, r"size's width; (\d+) where neither tells")) == MAX_RANK
    said = _said(doc, r"not those of `loramix train` \(([^)]*), for a quick adapter")
    want = {f"--{k.replace('_', '-')}": v for k, v in (kv.rsplit(" ", 1) for kv in said.split(", "))}
    assert {flag: float(v) for flag, v in want.items()} == {
        flag: float(_default("loramix train", flag)) for flag in want
    }


def test_the_merging_page_states_the_energy_rules_slack():
    """docs/merging.md: ``--energy F`` keeps the smallest rank whose energy
    reaches ``F`` of the total less a relative slack, the one
    :func:`~loramix.methods.svd.choose_rank` allows: a last component below it
    is dropped at ``F = 1``, one above it kept."""
    import torch

    from loramix.methods.svd import choose_rank

    slack = float(
        _said(_doc("merging.md"), r"`--energy` of `\|\|sum\|\|_F\^2 = sum_j S_j\^2`, less `([^`]+)` of it")
    )
    for frac, k in ((slack / 2, 1), (slack * 2, 2)):  # the last component's share of the energy
        S = torch.tensor([1.0, (frac / (1 - frac)) ** 0.5], dtype=torch.float64)
        assert choose_rank(S, None, 1.0) == k, (frac, k)


def test_the_merge_docstring_names_every_methods_parameter():
    """:func:`loramix.merge`'s ``params`` list names every parameter a merge
    method declares (its keyword, as ``merge --help`` lists the options)."""
    from loramix.methods import merge, method_classes

    said = _said(" ".join(merge.__doc__.split()), r"``params`` are the method's \(([^)]*)\)")
    named = set(re.findall(r"``(\w+)``", said))
    declared = {p.name for c in method_classes().values() for p in c.params}
    assert declared - named == set()


def test_the_scenarios_page_lists_the_files_and_columns_a_report_holds():
    """docs/scenarios.md, "The report": every file its table names is in a
    committed report (reports/quickstart, made by the README's command,
    reports/real-14-domains, which has ``[plan]``, or merge-groups-14-domains,
    whose compositions come in four sizes), every file of the
    quickstart's report is in the table, and every value column of
    ``results.csv`` and ``evaluations.csv`` is named on the page, and exists
    (a column added or renamed, as ``nll_sum`` beside ``nll``, must reach it)."""
    import csv
    import fnmatch

    text = (ROOT / "docs" / "scenarios.md").read_text()
    table = text[text.index("| file | contents |") :].split("\n\n")[0].splitlines()[2:]
    rows = {n: line.split("|")[2] for line in table for n in re.findall(r"`([^`]+)`", line.split("|")[1])}
    globs = [re.sub(r"<[^>]+>", "*", n) for n in rows]
    reports = [ROOT / "reports" / r for r in ("quickstart", "real-14-domains", "merge-groups-14-domains")]
    held = {p.name for r in reports for p in r.iterdir()}
    assert [g for g in globs if not fnmatch.filter(held, g)] == [], (
        "named on the page, in no committed report"
    )
    quick = sorted(p.name for p in reports[0].iterdir())
    assert [f for f in quick if not any(fnmatch.fnmatch(f, g) for g in globs)] == [], (
        "written, not on the page"
    )
    page = " ".join(text.split())
    keys = {"adapter_method", "seed", "composition", "k", "merge_method", "model", "domain"}  # the rows' keys
    for name in ("results.csv", "evaluations.csv"):
        with open(reports[0] / name) as f:
            header = next(csv.reader(f))
        named = set(re.findall(r"`([a-z][a-z0-9_]*)`", rows[name]))
        if name == "results.csv":
            also = re.search(r"`results\.csv` also carries ((?:`\w+`(?:, | and )?)+)", page)
            named |= set(re.findall(r"`(\w+)`", also.group(1)))
        assert sorted(set(header) - keys - named) == [], f"{name}: columns the page does not name"
        assert sorted(named - set(header)) == [], f"{name}: columns the page names that it lacks"


def test_the_readme_and_scenarios_page_state_a_studys_adapter_defaults():
    """README (Training) and docs/scenarios.md set ``loramix train``'s
    defaults against a study's ``[adapters]`` (rank, alpha, lr, batch,
    max_len) and the README the delta's step, lr x alpha / rank, of each:
    the study's half is the schema's (``AdapterSpec``), not only the train
    half (tested above)."""
    from loramix.scenario.config import AdapterSpec

    study = AdapterSpec()
    want = (study.rank, study.alpha, study.lr, study.batch, study.max_len)
    scen = _said(_doc("scenarios.md"), r"The `\[adapters\]` defaults are a study's \(([^)]*)\)")
    said = [float(kv.rsplit(" ", 1)[1]) for kv in scen.split(", ")]
    assert said == [float(v) for v in want]
    readme = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"Its defaults \(rank (\S+), alpha (\S+), lr (\S+), batch (\S+), `--max-len` (\S+)\) are for a "
                  r"quick adapter and differ from a study's `\[adapters\]` \(rank (\S+), alpha (\S+), lr (\S+), "
                  r"batch (\S+), (\d+);.*?lr x alpha / rank \((\S+) and (\S+)\)", readme)  # fmt: skip
    assert m, "README no longer sets train's defaults against a study's: reword this test with it"
    train = [
        float(_default("loramix train", f)) for f in ("--rank", "--alpha", "--lr", "--batch", "--max-len")
    ]
    assert [float(v) for v in m.groups()[:5]] == train
    assert [float(v) for v in m.groups()[5:10]] == [float(v) for v in want]
    steps = [float(v) for v in m.groups()[10:]]
    assert steps == pytest.approx(
        [train[2] * train[1] / train[0], study.lr * study.alpha / study.rank], rel=1e-12
    )


def test_sum_and_merge_name_every_output_dtype_they_take():
    """``--dtype float64`` is taken (docs/merging.md's rounding table measures
    it), but ``sum --help`` and ``merge --help`` offered float32, float16 and
    bfloat16 only, and the refusal of a bad one said "choose float32,
    float16, bfloat16". Failed before the fix."""
    from loramix.errors import UsageError
    from loramix.options import DTYPE_NAMES, OUTPUT_DTYPES, check_dtype

    assert set(OUTPUT_DTYPES) == set(DTYPE_NAMES.values())
    for name in ("loramix sum", "loramix merge"):
        said = next(p.help for p in _options(name) if p.name == "dtype")
        assert [d for d in OUTPUT_DTYPES if d not in said] == [], f"{name} --dtype: {said}"
    with pytest.raises(UsageError) as e:
        check_dtype("int8", "--dtype")
    assert all(d in e.value.message for d in OUTPUT_DTYPES), e.value.message


def test_the_scenarios_pages_example_files_load(tmp_path, monkeypatch):
    """Every ``toml`` example of docs/scenarios.md (the full example, the
    study of given adapters) is a scenario the loader takes as written, with
    its ``${...}`` variables pointing at a tiny base, data files and PEFT
    adapters: a renamed or removed key would leave the page showing a file
    that is refused. Guards the page; it did not fail before."""
    from transformers import AutoModelForCausalLM

    from loramix.basebuild import build_base
    from loramix.scenario.config import load_scenario

    from .factories import make_peft_adapter, write_jsonl

    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "scenarios.md").read_text(), re.S)
    assert len(blocks) >= 2
    base = tmp_path / "models" / "my-gpt2"
    build_base(["synthetic:arith?n=64"], out=base, steps=1, device="cpu", progress=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "smollm2-135m").symlink_to(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    (tmp_path / "data").mkdir()
    (tmp_path / "h" / "adapters").mkdir(parents=True)
    for d in ("math", "medicine", "finance"):
        write_jsonl(tmp_path / "data" / f"{d}.jsonl", rows)
        make_peft_adapter(model, tmp_path / "h" / "adapters" / f"{d}-lora", r=4)  # svd rank 8: 2 x 4
    write_jsonl(tmp_path / "h" / "adapters" / "math-train.jsonl", rows[:2])
    monkeypatch.setenv("LORAMIX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LORAMIX_MODELS", str(tmp_path / "m"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block)
        sc = load_scenario(path)
        assert sc.domains, block


def test_a_flag_that_means_the_same_everywhere_is_said_the_same_everywhere():
    """``--weights`` is one weight per adapter for ``sum``, ``merge`` and
    ``eval`` alike, but eval's help said it in other words ("Comma-separated
    weight per adapter (default 1 each)"); so with ``--force``, ``--threads``
    and ``--progress`` (a scenario's ``--force`` and ``--threads`` mean other
    things, and are left out). Compares the commands with each other, not
    with fixed words. Failed before the fix (eval's --weights)."""
    other = {("--force", "loramix scenario run"), ("--force", "loramix similarity"),
             ("--threads", "loramix scenario run"), ("--threads", "loramix scenario check")}  # fmt: skip
    wrong = []
    for flag in ("--weights", "--force", "--threads", "--progress"):
        said = {name: " ".join((p.help or "").split()) for name in COMMANDS for p in _options(name)
                if flag in p.opts and (flag, name) not in other}  # fmt: skip
        if len(set(said.values())) > 1:
            wrong.append(f"{flag}: {said}")
    assert wrong == []


def test_every_module_name_and_file_the_docs_cite_exists():
    """The README and docs/ cite code by dotted name (``loramix.fit.composition_cosine``)
    and by path (``loramix/native/ties.c``, ``benchmarks/bench_scale.py``,
    ``tests/test_dtypes.py``): each resolves, so a rename or a move that
    leaves the prose behind fails here. Placeholders (``loramix.X``,
    ``reports/NAME``, ``scenarios/x.toml``) and the file ``loramix.json``
    are not names. Guards the pages; it passed when written."""
    import importlib

    dotted, paths = set(), set()
    for f in DOCS:
        text = f.read_text()
        dotted |= {(m, f.name) for m in re.findall(r"`(loramix(?:\.[A-Za-z_]\w*)+)", text)}
        paths |= {(m, f.name) for m in re.findall(
            r"(?<![\w/.-])((?:loramix|tests|benchmarks|scenarios|reports|docs)/[\w./-]*[\w/])", text)}  # fmt: skip
    assert len(dotted) >= 20 and len(paths) >= 50
    wrong = []
    for name, f in sorted(dotted):
        if name in ("loramix.X", "loramix.json"):
            continue
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        if obj is None:
            wrong.append(f"{f}: {name}")
    placeholders = ("reports/NAME", "scenarios/x.toml")
    wrong += [
        f"{f}: {p}" for p, f in sorted(paths) if not p.startswith(placeholders) and not (ROOT / p).exists()
    ]
    assert wrong == []


def test_the_scenario_cache_folder_is_one_flag_everywhere():
    """``scenario run`` and ``scenario check`` take the scenario cache folder
    as ``--cache``; ``cache clean`` took it as ``--dir`` only, so a user
    copying ``--cache DIR`` from a run got "No such option". ``--dir`` still
    works. Failed before the fix."""
    for name in ("loramix scenario run", "loramix scenario check", "loramix cache clean"):
        assert any("--cache" in p.opts for p in _options(name)), name
    assert any("--dir" in p.opts for p in _options("loramix cache clean"))
