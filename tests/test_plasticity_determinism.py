"""The plasticity example is deterministic for a seed: the figures docs/plasticity.md publishes can be reproduced.

The example runs on one thread with ``torch.use_deterministic_algorithms(True)``; two runs of a short seeded stream
in the same process must give the same accuracies, dead fractions, recycled counts and held-out comparison, bit for
bit, and leave the process's torch settings as they were.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plasticity.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plasticity_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_short_seeded_plasticity_run_reproduces_exactly() -> None:
    pytest.importorskip("sklearn")
    example = _example()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = example.main(["--quick", "--seed", "3"])
    second = example.main(["--quick", "--seed", "3"])
    assert [vars(r) for r in first] == [vars(r) for r in second]
    assert sum(first[1].recycled) > 0 and first[1].held_out[0] > 0  # it recycled, and compared held-out logits
    assert first[1].held_out[2] <= first[1].held_out[0] // 10  # predictions flipped: not the data, so few
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    other = example.main(["--quick", "--seed", "4"])
    assert [r.accuracy for r in other] != [r.accuracy for r in first]  # the seed matters
