"""Tiny models with a forced ground truth, so that assertions can be exact."""

from __future__ import annotations

import torch
from torch import nn


def kill_units(linear_or_conv: nn.Module, units: list[int], bias: float = -1e3) -> None:
    """Make exactly ``units`` of a Linear/Conv output always negative: zero weight rows and a large negative bias."""
    with torch.no_grad():
        for u in units:
            linear_or_conv.weight[u].zero_()
            linear_or_conv.bias[u] = bias


class MLP(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> head, 8 -> 16 -> 12 -> 1."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act1 = act()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = act()
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ConvNet(nn.Module):
    """Two conv blocks with inplace ReLU, as in torchvision, then global pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class ReuseReLU(nn.Module):
    """One nn.ReLU module called three times per forward (as torchvision's BasicBlock reuses ``self.relu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc3(self.relu(self.fc2(self.relu(self.fc1(x))))))


def train_steps(model: nn.Module, steps: int = 3, batch: int = 10, in_shape: tuple[int, ...] = (8,)) -> None:
    """Forward + backward on random data, without an optimizer step (weights stay as forced)."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, *in_shape, generator=gen)
        model.zero_grad()
        model(x).float().sum().backward()
