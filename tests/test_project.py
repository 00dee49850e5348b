"""The project's promises about itself: CI runs the README's test command; the demo command exists."""

from __future__ import annotations

import re
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
