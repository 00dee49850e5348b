"""Model builders for `relumon check --model` in tests (importable as ``tests.check_models:build``)."""

from __future__ import annotations

from torch import nn


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
