"""Activation checkpointing must not double counts; GradScaler-scaled gradients are reported unscaled."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import relumon
from tests.helpers import kill_units


class CheckpointedNet(nn.Module):
    """Two checkpointed blocks that share one activation module, as many models share ``self.act``."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 1)
        self.act = nn.ReLU()
        self.use_reentrant = use_reentrant

    def block1(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x)) * 1.0

    def block2(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(x)) * 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.block1, x, use_reentrant=self.use_reentrant)
        x = checkpoint(self.block2, x, use_reentrant=self.use_reentrant)
        return self.head(x)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_neither_doubles_samples_nor_adds_sites(use_reentrant: bool) -> None:
    model = CheckpointedNet(use_reentrant)
    kill_units(model.fc1, [3])
    with relumon.watch(model, measure_every=1) as monitor:
        for _ in range(3):
            x = torch.randn(7, 6, requires_grad=True)
            model(x).sum().backward()
    report = monitor.report()
    assert len(report) == 2
    assert sorted(layer.units for layer in report) == [5, 8]
    assert all(layer.samples == 21 and layer.forwards == 3 and layer.backward_passes == 3 for layer in report)
    eight = next(layer for layer in report if layer.units == 8)
    assert eight.dead_indices == [3]


def test_grad_norm_is_unscaled_under_a_grad_scaler() -> None:
    def run(scale: float | None) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
        x = torch.randn(8, 4)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        with relumon.watch(model, measure_every=1, grad_scaler=scaler) as monitor:
            loss = model(x).sum()
            (scaler.scale(loss) if scaler else loss).backward()
        return monitor.report()["1"].grad_norm

    assert run(1024.0) == pytest.approx(run(None), rel=1e-6)
    assert run(None) > 0


def test_bf16_autocast_accumulates_in_fp32() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with relumon.watch(model, measure_every=1) as monitor:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(8, 4))
            out.float().sum().backward()
    layer = monitor.report()["1"]
    assert layer.samples == 24 and layer.backward_passes == 3 and layer.grad_norm > 0
