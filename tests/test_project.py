"""The project's promises about itself: CI runs the README's test command; the demo command exists; the code is typed
and formatted (mypy --strict, ruff), checked here so that the README's one test command covers them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    demo, tests = readme_commands()[:2]
    assert "pytest" in tests and "examples/" in demo
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_demo_script_exists() -> None:
    demo = readme_commands()[0]
    script = re.search(r"python (examples/\S+\.py)", demo).group(1)
    assert (ROOT / script).is_file()


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_mypy_strict_is_clean() -> None:
    """relumon ships py.typed, so its annotations are checked as strictly as its users' code may be."""
    result = _run("mypy", "--strict", "relumon")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_and_format_are_clean() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
