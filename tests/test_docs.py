"""The README, docs/*.md and every ``--help`` against the code: every option
explained in its help, every ``loramix CMD --flag`` the docs write taken by
that command, every ``LORAMIX_*`` variable the package reads documented and
every documented one read."""

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
