"""The docs site builds with `mkdocs build --strict`: every page, API entry and cross-reference resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "measure_every" in api and "ReluMonitor" in api  # mkdocstrings rendered the docstrings
    for image in ("tensorboard_custom_scalars.png", "tensorboard_images.png", "grad_flow_dying_relu.png"):
        assert (tmp_path / "site" / "img" / image).is_file()
    where = (tmp_path / "site" / "where_to_look" / "index.html").read_text()
    for image in ("wandb_grad_flow.png", "mlflow_dead_heatmap.png", "tensorboard_images.png"):
        assert f"img/{image}" in where
    assert "relumon-report" in where and "dead%=" in where  # the notebook table and the progress bar


def test_every_docs_image_is_referenced_and_exists() -> None:
    docs = ROOT / "docs"
    text = "".join(p.read_text() for p in docs.glob("*.md"))
    for image in (docs / "img").glob("*.png"):
        assert f"img/{image.name}" in text, f"{image.name} is not shown on any page"
