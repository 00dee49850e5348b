"""Model builders for `relumon check --model` in tests (importable as ``tests.check_models:build``)."""

from __future__ import annotations

from torch import Tensor, nn


def build() -> nn.Sequential:
    """Conv-BN2d-ReLU-pool-Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def not_a_model() -> int:
    """For the error path: returns no module."""
    return 3


class Residual(nn.Module):
    """Linear-BN, plus the input, then ReLU: a zero-initialised residual branch (torchvision's zero_init_residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.bn(self.fc(x)) + x))


def residual() -> Residual:
    """A `Residual` block."""
    return Residual()
