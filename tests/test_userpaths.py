"""``~`` in the paths a user gives (loramix.userpaths): expanded in one place.

A quoted ``'~/x'`` or an ``--out=~/x`` reaches loramix unexpanded (the shell
expands only an unquoted ``~`` at a word's start); loramix made a folder
literally named ``~`` in the working directory."""

from __future__ import annotations

import click
import pytest

from loramix.cli import COMMANDS, cli, main

from .factories import make_peft_adapter, tiny_gpt2


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home of the test's own, and a working folder beside it."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home


def test_path_environment_variables_expand_home(home, monkeypatch):
    from loramix.io.filehash import cache_dir
    from loramix.scenario.cache import default_cache_dir

    monkeypatch.setenv("LORAMIX_CACHE", "~/study-cache")
    monkeypatch.setenv("LORAMIX_CACHE_DIR", "~/machine-cache")
    assert default_cache_dir() == home / "study-cache" and cache_dir() == home / "machine-cache"
    monkeypatch.delenv("LORAMIX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cache_dir() == home / "xdg" / "loramix"


def test_a_path_option_after_an_equals_sign_expands_home(home, tmp_path):
    """``sum A B --out=~/summed`` (bash leaves ``~`` after ``=``) writes into the home folder."""
    model = tiny_gpt2()
    a, b = (make_peft_adapter(model, tmp_path / n, seed=k) for k, n in enumerate("ab"))
    assert main(["sum", "~/../a", str(b), "--out=~/summed", "--no-progress"]) == 0
    assert (home / "summed" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "cwd" / "~").exists()


def test_every_path_parameter_of_every_command_expands_home(home):
    """Each click.Path parameter (a future command's too) is converted through the one helper;
    ``--data`` and ``sum``'s adapters, which were plain strings, are paths."""
    from loramix.cli import _HomePath

    ctx, seen = click.Context(cli), set()
    for name in COMMANDS.values():
        stack = [cli.get_command(ctx, name)]
        while stack:
            cmd = stack.pop()
            stack += getattr(cmd, "commands", {}).values()
            for p in cmd.params:
                if isinstance(p.type, click.Path):
                    assert isinstance(p.type, _HomePath), (cmd.name, p.name)
                    seen.add((cmd.name, p.name))
                    if not p.type.exists:
                        assert str(p.type.convert("~/x", p, None)) == str(home / "x"), (cmd.name, p.name)
    assert {("sum", "adapters"), ("eval", "data"), ("train", "more_data"), ("run", "cache_dir")} <= seen
