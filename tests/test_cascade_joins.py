"""Which dead layer explains which, where the data joins a site's path by ops other than an add or a cat, and where the
upstream layer was only sampled.

Ground truth is forced: a bias of -1e3 kills a layer on its own, whatever its input; a layer whose input is exactly
0 and whose bias is 0 dies only because its upstream did.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from torch import nn

import relumon
from tests.helpers import kill_units

Join = Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]


def _slice_assignment(h: torch.Tensor, wide: torch.Tensor, model: nn.Module) -> torch.Tensor:
    feat = h.new_zeros(h.shape[0], 12)  # the wide-and-deep buffer
    feat[:, :6] = h
    feat[:, 6:] = wide
    return feat


def _index_copy(h: torch.Tensor, wide: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return wide.index_copy(1, torch.arange(3), h[:, :3])


def _index_put(h: torch.Tensor, wide: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return wide.index_put((torch.tensor([0, 2]),), h[:2])


def _maximum(h: torch.Tensor, wide: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.maximum(h, wide)


def _addmm(h: torch.Tensor, wide: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.addmm(wide, h, model.mix)


JOINS: dict[str, Join] = {
    "slice assignment": _slice_assignment,
    "index_copy": _index_copy,
    "index_put": _index_put,
    "maximum": _maximum,
    "addmm": _addmm,
}


class WideAndDeep(nn.Module):
    """deep: ``fc1 -> act1``; wide: the raw features; a join mixes both; then ``fc2 -> act2 -> head``."""

    def __init__(self, join: Join, width: int) -> None:
        super().__init__()
        self.join = join
        self.fc1, self.act1 = nn.Linear(6, 6), nn.ReLU()
        self.mix = nn.Parameter(torch.eye(6))
        self.fc2, self.act2 = nn.Linear(width, 5), nn.ReLU()
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.join(self.act1(self.fc1(x)), x, self))))


def _report(
    model: nn.Module, steps: int = 2, in_features: int = 6, **options: object
) -> tuple[relumon.Report, list[str]]:
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1, **options) as monitor:  # type: ignore[arg-type]
            for _ in range(steps):
                model.zero_grad()
                model(torch.randn(8, in_features, generator=gen)).sum().backward()
            report = monitor.report()
    return report, [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]


@pytest.mark.parametrize("join", list(JOINS))
def test_an_independent_death_behind_a_join_with_the_data_is_a_root_and_alerts(join: str) -> None:
    model = WideAndDeep(JOINS[join], width=12 if join == "slice assignment" else 6)
    kill_units(model.fc1, list(range(6)))  # act1 dies
    kill_units(model.fc2, list(range(5)))  # act2 dies of its own bias, whatever the join passes on
    report, alerts = _report(model)
    assert [x.name for x in report.dead_layers] == ["act1", "act2"]
    assert [x.name for x in report.roots] == ["act1", "act2"]
    assert report["act2"].caused_by is None and report["act1"].consequences == ()
    assert len(alerts) == 2 and "`act2`" in alerts[1]


def test_the_same_wiring_with_a_constant_factor_instead_of_the_data_stays_a_consequence() -> None:
    """A product with a constant (a mask, a frozen scale) passes no signal around a dead site: ``act2``, whose input
    is exactly 0 and whose bias is 0, dies because ``act1`` did."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act1 = nn.Linear(6, 6), nn.ReLU()
            self.register_buffer("scale", torch.full((6,), 2.0))
            self.norm = nn.LayerNorm(6, elementwise_affine=False)
            self.fc2, self.act2 = nn.Linear(6, 5), nn.ReLU()
            self.fc2.requires_grad_(False)  # frozen: its weight is an operand without grad too
            self.head = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.act1(self.fc1(x)) * self.scale)
            return self.head(self.act2(nn.functional.linear(h, self.fc2.weight)))

    model = Scaled()
    kill_units(model.fc1, list(range(6)))
    report, alerts = _report(model)
    assert [x.name for x in report.dead_layers] == ["act1", "act2"]
    assert [x.name for x in report.roots] == ["act1"] and report["act2"].caused_by == "act1"
    assert len(alerts) == 1 and "`act1`" in alerts[0]


# ---------------------------------------------------------------------------------------------- sampled upstream


class Sparse(nn.Module):
    """``fc_a -> a``: a fires only on batches whose feature 0 is large; ``fc_b -> b``: b is dead by its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a, self.a = nn.Linear(4, 6), nn.ReLU()
        self.fc_b, self.b = nn.Linear(6, 5), nn.ReLU()
        self.head = nn.Linear(5, 1)
        with torch.no_grad():
            self.fc_a.weight.zero_()
            self.fc_a.weight[:, 0] = 1.0
            self.fc_a.bias.fill_(-1e3)  # fires where feature 0 > 1e3
        kill_units(self.fc_b, list(range(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.fc_b(self.a(self.fc_a(x)))))


def test_a_sampled_upstream_explains_nothing_and_the_dead_layer_below_alerts_once_confirmed() -> None:
    model = Sparse()
    fired: list[bool] = []  # ground truth: did `a` fire in each training forward (a plain forward hook)
    probe = model.a.register_forward_hook(lambda m, i, out: fired.append(bool((out > 0).any())))
    gen = torch.Generator().manual_seed(0)
    reports = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model) as monitor:  # default sampling: about one step in four is measured
            for step in range(8):
                x = torch.randn(6, 4, generator=gen)
                if step % 4 == 1:  # steps 1 and 5; the schedule leaves step 1 unmeasured in the sampled first window
                    x[:, 0] = 2e3
                model.zero_grad()
                model(x).sum().backward()
                if step % 4 == 3:
                    reports.append(monitor.report())
    probe.remove()
    alerts = [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]
    assert fired == [step % 4 == 1 for step in range(8)]
    first, second = reports
    # The first window measured `a` only on calls where it was silent: its figures say dead, but it was sampled.
    assert first["a"].dead_units == 6 and first["a"].unmeasured_calls > 0
    assert first["b"].dead_units == 5 and first["b"].caused_by is None
    assert [x.name for x in first.roots] == ["a", "b"] and first["b"].confirming
    # The confirming window measures both on every call: `a` fired on step 5, so `b` is a root and alerts.
    assert second["a"].exact and second["a"].dead_units == 0
    assert second["b"].exact and second["b"].caused_by is None and second["b"].dead_units == 5
    assert len(alerts) == 1 and "`b`" in alerts[0]


def test_a_silent_upstream_measured_on_every_call_still_explains_the_layer_below() -> None:
    model = Sparse()
    with torch.no_grad():
        model.fc_b.bias.zero_()  # b now dies only because its input is 0
        model.fc_b.weight.normal_()
    report, alerts = _report(model, in_features=4)
    assert report["a"].exact and report["b"].caused_by == "a"
    assert len(alerts) == 1 and "`a`" in alerts[0]
