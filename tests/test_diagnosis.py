"""Diagnosis depth: death history, blame on the feeding layer, tau-dormant units and functional calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relumon
from tests.helpers import MLP, kill_units, train_steps


class TwoUnits(nn.Module):
    """x (positive) -> Linear(2 -> 2) -> ReLU: each unit is alive or dead exactly as its bias says."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(1.0)

    def set_alive(self, unit: int, alive: bool) -> None:
        with torch.no_grad():
            self.fc.bias[unit] = 1.0 if alive else -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


def test_history_records_the_step_of_death_a_revival_and_permanent_death() -> None:
    model = TwoUnits()
    # Window:      0      1      2      3      4
    # unit 0:   alive  alive   dead   dead   dead   -> first dead at step 30, permanently dead from window 4
    # unit 1:   alive   dead  alive  alive  alive   -> revives in window 2
    schedule = {0: (True, True), 1: (True, False), 2: (False, True), 3: (False, True), 4: (False, True)}
    reports = []
    with relumon.watch(model, measure_every=1, permanent_after=3, on_dead="ignore") as monitor:
        for window, (unit0, unit1) in schedule.items():
            model.set_alive(0, unit0)
            model.set_alive(1, unit1)
            train_steps(model, steps=2, batch=3, in_shape=(2,))
            reports.append(monitor.report(step=10 * (window + 1)))
    act = [r["act"] for r in reports]
    assert [x.dead_indices for x in act] == [[], [1], [0], [0], [0]]
    assert [x.revived_units for x in act] == [0, 0, 1, 0, 0]
    assert act[-1].revived_total == 1
    assert [x.permanently_dead_units for x in act] == [0, 0, 0, 0, 1]
    assert act[-1].first_dead_step.tolist() == [30, 20]  # unit 1 died first at step 20, and stays on record
    assert act[-1].dead_streak.tolist() == [3, 0]
    assert reports[2].scalars()["relumon/revived/act"] == 1.0
    assert reports[4].scalars()["relumon/permanently_dead/act"] == 1.0


def test_a_peek_does_not_touch_the_history() -> None:
    model = TwoUnits()
    model.set_alive(0, False)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=1, batch=2, in_shape=(2,))
        for _ in range(3):
            assert monitor.report(reset=False)["act"].dead_streak.tolist() == [0, 0]
        assert monitor.report()["act"].dead_streak.tolist() == [1, 0]


def test_history_survives_a_state_dict_round_trip_even_before_sites_exist() -> None:
    model = TwoUnits()
    model.set_alive(0, False)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        for step in (5, 10):
            train_steps(model, steps=1, batch=2, in_shape=(2,))
            monitor.report(step=step)
    state = monitor.state_dict()
    with relumon.watch(model, measure_every=1, permanent_after=3, on_dead="ignore") as resumed:
        resumed.load_state_dict(state)  # no site yet: applied when `act` is first called
        train_steps(model, steps=1, batch=2, in_shape=(2,))
        act = resumed.report(step=15)["act"]
    assert act.first_dead_step.tolist() == [5, -1]
    assert act.dead_streak.tolist() == [3, 0] and act.permanently_dead_units == 1


def test_blame_names_the_feeding_linear_and_its_negative_biases() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-3.0)
        model.fc2.weight.mul_(0.01)
    with pytest.warns(relumon.DeadUnitsWarning) as record:
        with relumon.watch(model, measure_every=1) as monitor:
            train_steps(model, steps=2, batch=8)
            act2 = monitor.report()["act2"]
    assert act2.all_dead
    assert act2.blame is not None
    assert act2.blame.startswith("`fc2` (Linear 16→12) feeds `act2`: 100% of its biases are negative, mean -3")
    assert "its weight gradient norm is 0" in act2.blame  # dead units pass no gradient to fc2's weights
    message = str(record[0].message)
    assert "Blame: `fc2` (Linear 16→12) feeds `act2`" in message


def test_blame_on_a_jump_points_at_the_dead_units_biases() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, batch=64)
        before = monitor.report()["act1"]
        kill_units(model.fc1, list(range(8)))  # half of act1 dies at once: a jump of 0.5
        train_steps(model, steps=2, batch=64)
        after = monitor.report()["act1"]
    assert before.blame is None
    assert after.dead_fraction - before.dead_fraction >= 0.4
    assert after.blame is not None and "the dead units' biases: 100% negative, mean -1e+03" in after.blame


def test_blame_describes_conv_and_batchnorm_feeders() -> None:
    from relumon.diagnosis import describe_module

    assert describe_module(nn.Conv2d(3, 8, 3)) == "Conv2d 3→8 3×3"
    assert describe_module(nn.BatchNorm2d(6)) == "BatchNorm2d(6)"
    assert describe_module(nn.Linear(512, 256)) == "Linear 512→256"


def test_tau_dormant_units_are_scored_against_the_layer_mean() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.LeakyReLU(0.01), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.001]))  # mean |h| = 1, 1, 1, 0.001
    with relumon.watch(model, measure_every=1, dormant_tau=0.1) as monitor:
        train_steps(model, steps=2, batch=4, in_shape=(2,))
        report = monitor.report()
    layer = report["1"]
    layer_mean = (3 + 0.001) / 4
    assert layer.dormant_scores.tolist() == pytest.approx([1 / layer_mean] * 3 + [0.001 / layer_mean], rel=1e-5)
    assert layer.dormant_units == 1 and layer.dormant_fraction == 0.25
    assert layer.dead_units == 0  # dormant, not dead: it is still positive
    assert report.scalars()["relumon/dormant_fraction/1"] == 0.25


def test_dormant_is_off_by_default_and_validated() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1)
    assert monitor.report()["act1"].dormant_units is None
    with pytest.raises(ValueError, match="dormant_tau"):
        relumon.watch(MLP(), dormant_tau=1.5)


class FunctionalNet(nn.Module):
    """Only functional activations, in a nested module, one of them called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(4, 6), "fc2": nn.Linear(6, 5)})
        self.head = nn.Linear(5, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder["fc1"](x))
        return torch.relu(self.encoder["fc2"](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.leaky_relu(self.encode(x), 0.1).relu())


def test_functional_calls_are_watched_with_stable_names() -> None:
    model = FunctionalNet()
    with torch.no_grad():
        model.encoder["fc2"].bias.fill_(10.0)  # alive...
    kill_units(model.encoder["fc2"], [1, 3])  # ...but for units 1 and 3
    with pytest.raises(ValueError, match="functional=True"):
        relumon.watch(model)
    with relumon.watch(model, functional=True, measure_every=1) as monitor:
        train_steps(model, steps=3, batch=5, in_shape=(4,))
    report = monitor.report()
    assert report.names == ["F.relu", "F.relu.call2", "F.leaky_relu", "F.relu.call3"]
    assert [x.units for x in report] == [6, 5, 5, 5]
    assert all(x.samples == 15 for x in report)
    assert report["F.relu.call2"].dead_indices == [1, 3]
    assert report["F.relu"].fed_by == "encoder.fc1"
    assert report["F.leaky_relu"].negative_regime and report["F.leaky_relu"].kind == "F.leaky_relu"
    assert report["F.relu.call2"].grad_norm > 0


def test_functional_names_follow_the_enclosing_module_and_modules_are_not_counted_twice() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()  # calls F.relu inside: must stay one site

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x) + F.relu(self.fc(x))

    model = nn.Sequential(Block(), Block())
    with relumon.watch(model, functional=True, measure_every=1) as monitor:
        model(torch.randn(2, 3)).sum().backward()
    assert monitor.report().names == ["0.act", "0.F.relu", "1.act", "1.F.relu"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._is_torch_function_mode_enabled() is False or not torch.overrides._get_current_function_mode()


def test_functional_capture_exits_its_mode_on_errors() -> None:
    from torch.overrides import _get_current_function_mode

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            F.relu(x)
            raise RuntimeError("boom")

    model = Boom()
    with relumon.watch(model, functional=True) as monitor:
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 3, requires_grad=True))
        assert _get_current_function_mode() is None  # the mode was left despite the error
        assert monitor.names == ["F.relu"]


def test_functional_leaky_relu_slope_is_read_for_grad_through() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(self.fc(x), negative_slope=0.2)

    model = Leaky()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-1.0)  # every unit negative: the gradient through is exactly 0.2 times the output's
    with relumon.watch(model, functional=True, measure_every=1, grad_through=True, on_dead="ignore") as monitor:
        model(torch.randn(5, 3)).sum().backward()
    layer = monitor.report()["F.leaky_relu"]
    assert layer.grad_through_norm == pytest.approx(0.2 * layer.grad_norm)


def test_blame_states_the_windows_weight_gradient_not_grad_at_report_time() -> None:
    """A loop that zeroes gradients in place at the end of each step leaves ``.grad`` all zero at report time; blame
    states the norm of the weight gradient of the window's first measured pass, read from ``.grad`` right after that
    backward."""
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(0)
    norms: list[float] = []

    def step(record: bool) -> None:
        model(torch.randn(16, 8, generator=gen)).sum().backward()
        if record:
            norms.append(float(model.fc1.weight.grad.norm()))  # ground truth: the gradient of this pass
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        step(record=False)
        assert monitor.report()["act1"].blame is None
        kill_units(model.fc1, list(range(8)))  # half of act1 dies at once: a jump, blamed on fc1
        step(record=True)
        step(record=True)
        assert float(model.fc1.weight.grad.abs().sum()) == 0.0  # what report time sees
        act1 = monitor.report()["act1"]
    assert norms[0] > 0 and norms[1] != norms[0]
    assert act1.blame is not None
    assert f"its weight gradient norm is {norms[0]:.3g} (first measured pass of the window)" in act1.blame


def test_blame_says_nothing_of_a_gradient_no_measured_backward_saw() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-3.0)
        model.fc2.weight.mul_(0.01)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        model(torch.randn(4, 8)).sum()  # a training forward, no backward
        act2 = monitor.report()["act2"]
    assert act2.all_dead and act2.blame is not None and "gradient" not in act2.blame
