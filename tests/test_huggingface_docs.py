"""docs/huggingface.md reproduces: its OPT table and pictures are what the command beside them writes, and that
command, on a short setting, writes the same table twice (a seeded run)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "huggingface.md"
COMMAND = "python examples/huggingface_opt.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("huggingface_opt", ROOT / "examples" / "huggingface_opt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["huggingface_opt"] = module
    spec.loader.exec_module(module)
    return module


def _doc_table(text: str) -> str:
    """The first Markdown table of the doc whose header starts with ``| step |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| step |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_the_docs_table_and_pictures_are_what_the_documented_command_wrote() -> None:
    example = _example()
    text = DOC.read_text()
    # The command that regenerated the page is in it, and the example's own parser takes it.
    (command,) = [line for line in text.splitlines() if line.startswith(COMMAND) and "--out docs/img" in line]
    args = example.build_parser().parse_args(shlex.split(command)[2:])
    # The doc's table is the file that command wrote next to the pictures, row for row.
    out = ROOT / args.out
    assert _doc_table(text) == (out / example.TABLE).read_text()
    assert (out / example.LINES).stat().st_size > 0 and (out / example.HEATMAP).stat().st_size > 0
    assert f"img/{example.LINES}" in text and f"img/{example.HEATMAP}" in text
    # One row per logging step of that setting, one column per layer.
    table = _doc_table(text).splitlines()
    assert [int(row.split("|")[1]) for row in table[2:]] == list(
        range(args.logging_steps, args.steps + 1, args.logging_steps)
    )
    assert table[0].count("layer ") == args.layers
    # The settings the prose states are the command's.
    assert f"{args.steps} steps" in text and f"learning rate of {args.lr:g}" in text and f"seed {args.seed}" in text
    # The tracked pictures are written only when asked: the default writes none.
    assert example.build_parser().parse_args([]).out is None and example.build_parser().parse_args([]).picture is None


def test_the_documented_command_repeats_itself_on_a_short_setting(tmp_path: Path) -> None:
    example = _example()
    tables = []
    for run in ("a", "b"):
        example.main(["--quick", "--logdir", str(tmp_path / run), "--out", str(tmp_path / run / "docs")])
        tables.append((tmp_path / run / "docs" / example.TABLE).read_text())
    assert tables[0] == tables[1]
    assert re.fullmatch(
        r"\| step \| layer 0 \| layer 1 \|\n\|---:\|---:\|---:\|\n(\| \d+ \| [\d.]+% \| [\d.]+% \|\n){2}", tables[0]
    )
