"""PReLU's negative regime, whatever its learned slope: decided from the pre-activation's sign, not the output's.

Ground truth by construction: zeroed weight rows and a bias of -1e3 keep exactly the chosen units' pre-activations
negative; a plain forward hook on the PReLU confirms it, and shows that with a slope below 0 their outputs are
positive.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relumon
from tests.helpers import kill_units, train_steps


class PReLUNet(nn.Module):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.act = nn.PReLU(num_parameters=6, init=slope)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


@pytest.mark.parametrize("slope", [-0.5, 0.0, 0.25])
def test_prelu_units_stuck_negative_are_found_whatever_the_learned_slope(slope: float) -> None:
    model = PReLUNet(slope)
    kill_units(model.fc, [1, 4])
    seen: dict[str, list[torch.Tensor]] = {"pre": [], "out": []}

    def probe(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["pre"].append(args[0].detach().amax(0))
        seen["out"].append(out.detach().amin(0))

    handle = model.act.register_forward_hook(probe)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=3)
    handle.remove()
    pre_peak = torch.stack(seen["pre"]).amax(0)
    truth = [u for u in range(6) if pre_peak[u] <= 0]
    assert truth == [1, 4]
    if slope < 0:  # the output of a unit stuck negative is positive: its sign alone would call it alive
        assert bool((torch.stack(seen["out"]).amin(0)[truth] > 0).all())
    layer = monitor.report()["act"]
    assert layer.negative_regime and layer.dead_indices == truth and layer.dead_units == 2


def test_conv_prelu_channels_stuck_negative_with_a_negative_slope() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1)
    model = nn.Sequential(conv, nn.PReLU(5, init=-0.3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 1))
    kill_units(conv, [2])
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        model(torch.randn(4, 3, 6, 6)).sum().backward()
    layer = monitor.report()["1"]
    assert (layer.units, layer.unit_dim, layer.dead_indices) == (5, 1, [2])
