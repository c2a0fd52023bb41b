"""The README's two set-up commands are exactly what CI runs."""

from pathlib import Path

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
