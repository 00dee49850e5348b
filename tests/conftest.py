from __future__ import annotations

import os

import pytest
import torch

# relumon contains errors inside its per-step hooks (a warning, the call site disabled) so that a bug of ours never
# ends a user's run. Our own tests run strict, so that the same bug fails them; tests of the containment itself turn
# it off locally with monkeypatch. Set at import so that spawned workers inherit it too.
os.environ["RELUMON_STRICT"] = "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
