from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

# relumon contains errors inside its per-step hooks (a warning, the call site disabled) so that a bug of ours never
# ends a user's run. Our own tests run strict, so that the same bug fails them; tests of the containment itself turn
# it off locally with monkeypatch. Set at import so that spawned workers inherit it too.
os.environ["RELUMON_STRICT"] = "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_REPO = Path(__file__).resolve().parents[1]


def _runs_in_repo() -> set[str]:
    runs = _REPO / "runs"
    return {p.name for p in runs.iterdir()} if runs.is_dir() else set()


@pytest.fixture(autouse=True, scope="session")
def _no_runs_left_in_the_repo() -> Iterator[None]:
    """Tests write event files under tmp_path: a run directory appearing in the checkout is a leftover."""
    before = _runs_in_repo()
    yield
    new = sorted(_runs_in_repo() - before)
    assert not new, f"the tests left run directories in {_REPO / 'runs'}: {new} (write to tmp_path)"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """End any child process a test left running: multiprocessing's exit handler joins its children, so one stuck
    rank would keep pytest from ever exiting (issue 29). `tests.launch` already kills its own; this is the last net."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
