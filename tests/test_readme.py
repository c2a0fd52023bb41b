"""The README's two set-up commands are exactly what CI runs."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ci_command(tag: str) -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return lines[lines.index(f"# README:{tag}") + 1].strip()


def test_readme_opens_with_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    install, test = _ci_command("install"), _ci_command("test")
    assert install in readme and test in readme
    # Both come before any other section: they are the set-up.
    first_heading = readme.index("\n## ", readme.index(test))
    assert readme.index(install) < readme.index(test) < first_heading


def test_install_pins_the_local_cpu_torch():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject


def _from_python_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n", readme.index("### From Python")) + len("```python\n")
    return readme[start : readme.index("```", start)]


def test_the_from_python_snippet_runs(tmp_path, monkeypatch):
    """README's "From Python" as written, in a folder holding a tiny GPT-2
    ``base/`` with a tokenizer and three QA files ``a.jsonl``, ``b.jsonl``,
    ``c.jsonl`` (synthetic records): every call exists with those arguments,
    and what the comments promise is there."""
    import json

    import pandas as pd

    from loramix.basebuild import train_tokenizer
    from loramix.data import load_records, record_text

    from .factories import save_base, tiny_gpt2

    records = {
        n: load_records(f"synthetic:{spec}?n=40") for n, spec in zip("abc", ("arith", "units", "dates"))
    }
    for name, recs in records.items():
        lines = [json.dumps({"question": r.question, "answer": r.answer}) for r in recs]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([record_text(r) for recs in records.values() for r in recs], 300, 64)
    save_base(tiny_gpt2(vocab_size=len(tok)), tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        exec(_from_python_snippet(), scope)
    # the README shows this release's names, none of those kept for the previous one's callers
    import loramix

    said = [str(w.message) for w in caught if w.category is DeprecationWarning]
    old = [m for m in said if m.split(":")[0] in loramix._API and "deprecated" in m]
    assert not old, old
    sim, ppl = scope["sim"], scope["ppl"]
    for attr in ("rms", "mean", "coverage", "norms", "per_module"):
        assert isinstance(getattr(sim, attr), pd.DataFrame), attr
    assert list(sim.rms.index) == ["a", "b", "c"]
    for out in ("a", "b", "c", "merged", "summed-adapter", "ties"):
        assert (tmp_path / out / "loramix.json").is_file(), out
    assert isinstance(ppl, pd.DataFrame) and list(ppl["data"]) == ["a", "b", "c", "union"]
    groups = scope["groups"]
    assert sorted(m for g in groups for m in g["members"]) == ["a", "b", "c"]
    assert all({"members", "method", "cost"} <= set(g) for g in groups)


def test_what_from_python_says_of_run_scenarios_report_holds():
    """README's "From Python" says what ``run_scenario`` returns (the report's
    dict) and how to read it: each ``report["KEY"]`` it names is a key of a
    committed ``report.json``, the columns it names are the summary's, and
    the ``evaluations`` function it names gives the base's rows back, as
    ``evaluations.csv`` lists them (it said nothing of the returned report)."""
    import csv
    import importlib
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index("### From Python") : readme.index("## Data")]
    start = part.index("`loramix.run_scenario(")
    said = part[start : part.index("\n\n", start)]
    keys = set(re.findall(r'report\["(\w+)"\]', said))
    assert {"summary", "results", "composability", "base_evaluation"} <= keys, said
    folder = ROOT / "reports" / "quickstart"
    report = json.loads((folder / "report.json").read_text())
    if "base_evaluation" not in report:  # written before the base was kept apart: the form a run returns now
        from loramix.scenario.evaluations import compact

        rows, base = compact(report["evaluations"])
        report = {**report, "evaluations": rows, "base_evaluation": base}
    assert keys <= set(report), keys - set(report)
    cols = re.findall(r"`(\w+_\w+)`", said.split("merge method")[1].split(")")[0])
    assert len(cols) >= 3 and set(cols) <= set(report["summary"][0]), cols
    path = re.search(r"`(loramix\.[\w.]+)\(report\)`", said)[1]
    module, fn = path.rsplit(".", 1)
    rows = getattr(importlib.import_module(module), fn)(report)
    with open(folder / "evaluations.csv") as f:
        listed = list(csv.DictReader(f))
    assert [(r["model"], r["domain"]) for r in rows] == [(r["model"], r["domain"]) for r in listed]
    assert any(r["model"] == "base" for r in rows) and not any(
        r["model"] == "base" for r in report["evaluations"]
    )


def test_the_start_up_figures_are_those_of_the_benchmarks_report():
    """README's Conventions, Start-up: the range of the torch-free commands'
    start-up (``inspect``, ``similarity``, ``plan``, ``predict``) and its share
    of ``import torch`` cover every such row of reports/benchmarks.md's startup
    table, the last one written (a rerun that moves them must move the README)."""
    import re

    readme = " ".join((ROOT / "README.md").read_text().split())
    said = re.search(r"run without torch \([^)]*\): ([\d.]+)-([\d.]+) s where `import torch` takes ([\d.]+) s, "
                     r"([\d.]+)-([\d.]+) of it \(`reports/benchmarks.md`, startup\)", readme)  # fmt: skip
    assert said, "README no longer states the start-up range: reword this test with it"
    lo, hi, torch_s, share_lo, share_hi = (float(x) for x in said.groups())
    bench = (ROOT / "reports" / "benchmarks.md").read_text()
    table = bench[bench.index("## startup") :].split("\n## ")[0]
    rows = {c[0]: (float(c[1]), float(c[4])) for line in table.splitlines() if line.startswith("| ")
            for c in [[x.strip() for x in line.strip("|").split("|")]] if re.fullmatch(r"[\d.]+", c[1])}  # fmt: skip
    assert round(rows['python -c "import torch"'][0], 1) == torch_s
    free = {k: v for k, v in rows.items()
            if re.match(r"loramix (inspect|similarity|plan|predict) ", k) and "exit 2" not in k and "--help" not in k}  # fmt: skip
    assert len(free) >= 4, sorted(rows)
    wrong = [f"{k}: {wall:.3f} s, {share:.3f} of import torch" for k, (wall, share) in free.items()
             if not (lo <= round(wall, 2) <= hi and share_lo <= round(share, 2) <= share_hi)]  # fmt: skip
    assert wrong == [], f"README says {lo}-{hi} s, {share_lo}-{share_hi} of import torch"


def _readme_commands() -> list[list[str]]:
    """Every ``loramix ...`` line of the README's ``bash`` blocks, its
    backslash continuations joined, its ``# comment`` dropped and the
    recipe's ``$T`` expanded, as argument lists (``loramix`` itself dropped)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    commands, env = [], {}
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"\w+=\S+", words[0]):
                env.update([words[0].split("=", 1)])
            for i, w in enumerate(words):  # `.venv/bin/pip ... && .venv/bin/loramix scenario run ...` too
                if w.endswith("loramix") and (i == 0 or words[i - 1] == "&&"):
                    commands.append([re.sub(r"\$(\w+)", lambda m: env[m[1]], x) for x in words[i + 1 :]])
    return commands


def test_the_readmes_commands_parse():
    """Every ``loramix`` command the README shows names a command and options
    that exist, with a value where the option takes one (click's own parser,
    nothing run or imported beyond the command's module): a renamed or removed
    flag would leave the README showing a command that exits 2."""
    import click

    from loramix.cli import cli

    commands = _readme_commands()
    assert len(commands) >= 20, commands
    wrong = []
    for args in commands:
        ctx, cmd, rest = click.Context(cli, info_name="loramix"), cli, list(args)
        while isinstance(cmd, click.Group) and rest:
            cmd = cmd.get_command(ctx, rest.pop(0))
        try:
            assert cmd is not None and not isinstance(cmd, click.Group), "no such command"
            cmd.make_parser(click.Context(cmd, info_name=cmd.name)).parse_args(rest)
        except (AssertionError, click.UsageError) as e:
            wrong.append(f"loramix {' '.join(args)}: {e}")
    assert wrong == []


def test_what_it_does_predicts_from_the_recipes_study():
    """ "What it does" shows ``predict`` with the fit the SmolLM2 recipe below
    uses (a study's report folder): it showed the quickstart's ``fit.json``, a
    study of a tiny synthetic GPT-2, whose fit warns of another base on any
    adapter of one's own. Both name a study folder that ships."""
    fits = [a[a.index("--fit") + 1] for a in _readme_commands() if a[0] == "predict"]
    assert len(fits) >= 2 and len(set(fits)) == 1, fits
    assert (ROOT / fits[0] / "predictors.json").is_file(), fits[0]


def _readme_outputs() -> list[str]:
    """What the README's ``bash`` blocks write: every ``--out``, ``--plot`` and
    ``-d`` (``pip download``, ``unzip``) value and every ``>`` redirect
    (``eval --format json > math.json``), ``loramix`` or not."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    outs = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            outs += [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--plot", "-d", ">")]
    return outs


def test_the_readmes_outputs_stay_out_of_git():
    """The README's commands, run in the checkout (the SmolLM2 recipe reads
    ``../shared/``, beside it), wrote ``smol/``, ``adapters/``,
    ``smol-merged/``... there, where ``git status`` showed them as untracked
    files. Each output is now ignored (``.gitignore``), or a study's report
    under ``reports/`` (which the repository tracks); and nothing the
    repository tracks is ignored."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outs = _readme_outputs()
    assert {"smol/", "smol-merged/", "adapters/smol-math", "sim.png"} <= set(outs), outs
    shown = [o for o in outs if not o.startswith("reports/")]
    git = ["git", "-C", str(ROOT)]
    kept = [o for o in shown if subprocess.run([*git, "check-ignore", "-q", "--no-index", o]).returncode != 0]
    assert kept == [], f"README commands write {kept} into the checkout, which .gitignore does not list"
    tracked = subprocess.run([*git, "ls-files", "-ci", "--exclude-standard"], capture_output=True, text=True)
    assert tracked.returncode == 0 and tracked.stdout == "", tracked.stdout
