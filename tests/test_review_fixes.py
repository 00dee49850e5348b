"""Defects a hostile review found in the merged issues 17-21, each with its ground truth.

- float64 models with the cause of death (issue 20);
- reentrant activation checkpointing in a model called as a whole (issue 18's step boundaries);
- recycling (issue 19): pooling that mixes units, activations the model returns, a window recycled twice, Rprop.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import relumon


def _kill(linear: nn.Linear, rows: list[int]) -> None:
    """Exactly ``rows`` dead: their bias -100, every other unit's +5 (alive for any small input)."""
    with torch.no_grad():
        linear.bias.fill_(5.0)
        linear.bias[rows] = -100.0


def _train(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        opt.step()


def test_a_float64_model_reports_with_an_optimizer() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    _kill(model[0], [1, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        _train(model, torch.randn(10, 4, dtype=torch.float64), opt)
        report = monitor.report()
    assert report["1"].dead_indices == [1, 4]


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.b2 = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(checkpoint(self.b2, self.b1(x), use_reentrant=self.reentrant))

    reentrant = True


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_in_a_model_called_whole_counts_each_step_once(reentrant: bool) -> None:
    model = Checkpointed()
    model.reentrant = reentrant
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(5, 4, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    with relumon.watch(model, measure_every=1) as monitor:
        _train(model, x, opt, steps=6)
        report = monitor.report()
    assert report.steps == 6 and monitor.timeline[-1][0] == 6
    assert report["b2.1"].forwards == 6 and report["b2.1"].samples == 30


def _recycled(model: nn.Module, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Train 3 steps at lr 0 with recycle="dead", then: the recycle result, outputs before and after recycling."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = relumon.watch(model, measure_every=1, recycle="dead", on_dead="ignore", optimizer=opt)
    with monitor:
        _train(model, x, opt)
        with torch.no_grad():
            before = model(x)
        monitor.report()
        with torch.no_grad():
            after = model(x)
    return monitor.last_recycle, before, after


def test_pooling_across_units_is_skipped_and_the_function_is_kept() -> None:
    class Pooled(nn.Module):  # AvgPool1d over the feature dim of (B, T, F): it mixes neighbouring units
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.pool, self.fc2 = (
                nn.Linear(8, 16),
                nn.ReLU(),
                nn.AvgPool1d(3, 1, 1),
                nn.Linear(16, 4),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.pool(self.act(self.fc1(x))))

    model = Pooled()
    _kill(model.fc1, [3, 7])
    result, before, after = _recycled(model, torch.randn(5, 6, 8))
    assert result.units == {} and "pooled" in result.skipped["act"]
    assert torch.equal(before, after)


def test_a_spatial_pool_of_a_conv_map_still_recycles_exactly() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)
    )
    with torch.no_grad():
        model[0].bias[[2, 5]] = -100.0
    result, before, after = _recycled(model, torch.randn(4, 3, 8, 8))
    assert result.units == {"1": [2, 5]}
    assert torch.equal(before, after)


def test_an_activation_the_model_returns_is_not_recycled() -> None:
    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.fc1(x))
            return self.fc2(h), h  # logits and features, as for an auxiliary loss

    model = Features()
    _kill(model.fc1, [1, 6])
    result, before, after = _recycled(model, torch.randn(6, 4))
    assert result.units == {} and "returns" in result.skipped["act"]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_recycling_the_same_window_twice_changes_nothing_the_second_time() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    _kill(model[0], [3, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with relumon.watch(model, measure_every=1, recycle="dead", on_dead="ignore", optimizer=opt) as monitor:
        _train(model, torch.randn(6, 4), opt)
        monitor.report()
        assert monitor.last_recycle is not None and monitor.last_recycle.units == {"1": [3, 7]}
        weights = model[0].weight.detach().clone()
        again = monitor.recycle(opt)
        assert again.units == {} and "already recycled" in again.skipped["1"]
        assert torch.equal(model[0].weight, weights)
        _train(model, torch.randn(6, 4), opt)
        assert monitor.report()["1"].recycled_total == 2


def test_rprop_step_sizes_of_recycled_entries_restart_at_the_lr() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    _kill(model[0], [3, 7])
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        _train(model, torch.randn(6, 4), opt)
        monitor.report()
        result = monitor.recycle(opt)  # the first call acts: the wiring was read at discovery
    recycled = result.units["1"]
    assert recycled == [3, 7]
    assert torch.all(opt.state[model[0].weight]["step_size"][recycled] == 0.01)
    assert torch.all(opt.state[model[2].weight]["step_size"][:, recycled] == 0.01)
