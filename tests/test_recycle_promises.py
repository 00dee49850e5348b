"""Recycling keeps its promise (the same function on the window's samples) on every model, or skips with a reason.

Ground truth by construction: a bias of -100 on chosen rows kills exactly those units (every other unit's bias is +5,
so it fires on any small input). Each test compares the model's outputs before and after recycling, the state dict,
and the optimizer state with what a fresh parameter would have.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relumon


def _kill(layer: nn.Module, rows: list[int]) -> None:
    """Exactly ``rows`` dead: their bias -100, every other unit's +5 (alive for any small input)."""
    with torch.no_grad():
        bias: torch.Tensor = layer.bias  # type: ignore[assignment]
        bias.fill_(5.0)
        bias[rows] = -100.0


def _loss(out: Any) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return sum((p.float().pow(2).mean() for p in parts), torch.zeros(()))


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x)
    return tuple(o.clone() for o in (out if isinstance(out, tuple) else (out,)))


def _window(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, steps: int = 3) -> Any:
    """Train ``steps`` steps on ``x`` with lr 0 (the weights stay as forced), close the window, recycle once; return
    the result and the model's outputs on ``x`` (train mode: the window's samples) before and after, and the state
    dict before."""
    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt)
    with monitor:
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            _loss(model(x)).backward()
            opt.step()
        monitor.report()
        before = _outputs(model, x)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = monitor.recycle()  # the first call acts: the wiring was read when the sites were discovered
        after = _outputs(model, x)
        again = monitor.recycle()
    return result, before, after, state, again


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- it changes the function: skip


def test_a_tuple_output_with_an_aux_computed_from_the_activation_is_skipped_and_nothing_moves() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.fc1(x))
            return self.fc2(h), h.square().mean(1)  # logits, and an auxiliary figure of the activation

    model = WithAux()
    _kill(model.fc1, [1, 6])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result, before, after, state, again = _window(model, torch.randn(6, 4), opt)
    assert result.units == {} and "PowBackward0" in result.skipped["act"]
    assert all(torch.equal(b, a) for b, a in zip(before, after)) and _unchanged(model, state)
    # Every dead site gets units or a reason, a second call on the same window too.
    assert again.units == {} and again.skipped == result.skipped


def test_an_aux_output_that_is_a_pooled_view_of_the_activation_is_the_models_output() -> None:
    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.fc1(x))
            return self.fc2(h), h.mean(0)  # the mean over the batch keeps each unit apart, and reaches the output

    model = WithFeatures()
    _kill(model.fc1, [0, 3])
    result, before, after, state, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {} and "returns" in result.skipped["act"]
    assert all(torch.equal(b, a) for b, a in zip(before, after)) and _unchanged(model, state)


def test_weights_tied_through_a_functional_call_are_found_from_the_graph() -> None:
    class TiedDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.act, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.head(self.act(self.enc(x)))
            return F.linear(z, self.enc.weight.t())  # the decoder reuses the encoder's weight, unregistered

    model = TiedDecoder()
    _kill(model.enc, [2, 5])
    result, before, after, state, _ = _window(model, torch.randn(5, 6), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {}
    assert "`enc`" in result.skipped["act"] and "reached 2 times" in result.skipped["act"]
    assert torch.equal(before[0], after[0]) and _unchanged(model, state)


@pytest.mark.parametrize("make", [lambda: nn.LeakyReLU(0.2), nn.PReLU, nn.RReLU])
def test_negative_regime_units_are_skipped_with_the_reason(make: Any) -> None:
    model = nn.Sequential(nn.Linear(4, 8), make(), nn.Linear(8, 2))
    _kill(model[0], [1, 4])
    result, _, _, state, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {} and "negative regime" in result.skipped["1"]
    assert _unchanged(model, state)
    model.eval()  # RReLU: a fixed slope in eval
    x = torch.randn(6, 4)
    assert torch.equal(_outputs(model, x)[0], _outputs(model, x)[0])


@pytest.mark.parametrize("frozen", ["2", "4"])
def test_a_frozen_producer_or_reader_is_skipped_with_the_reason(frozen: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [])
    _kill(model[2], [0, 7])
    model.get_submodule(frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    result, before, after, state, _ = _window(model, torch.randn(6, 4), opt)
    role = "producer" if frozen == "2" else "reader"
    assert result.units == {} and f"its {role} `{frozen}` is frozen" in result.skipped["3"]
    assert torch.equal(before[0], after[0]) and _unchanged(model, state)


def test_batchnorm_promise_is_the_same_function_on_the_windows_samples() -> None:
    """A channel dead under the window's batch statistics is recycled; the output on the window's samples (train
    mode, batch statistics) is bit for bit the same. (Under running statistics, on other inputs, it may differ:
    docs/plasticity.md says how much.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 2)
    )
    with torch.no_grad():
        model[1].bias.fill_(5.0)
        model[1].bias[[1, 4]] = -100.0
    x = torch.randn(4, 3, 4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt)
    with monitor:
        for _ in range(2):
            _loss(model(x)).backward()
        monitor.report()
        before = _outputs(model, x)[0]  # train mode: batch statistics
        result = monitor.recycle()
        running = model[1].running_mean[[1, 4]].clone(), model[1].running_var[[1, 4]].clone()
        after = _outputs(model, x)[0]
    assert result.units == {"2": [1, 4]}
    assert torch.equal(before, after)
    assert torch.equal(running[0], torch.zeros(2)) and torch.equal(running[1], torch.ones(2))


# ----------------------------------------------------------------------------- it could act: it must


def test_a_torchvision_style_head_relu_avgpool_flatten_linear_is_recycled_exactly() -> None:
    class Head(nn.Module):  # ResNet's and VGG's: ReLU -> AdaptiveAvgPool2d(1) -> flatten -> Linear
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(self.conv(x)))), 1))

    model = Head()
    _kill(model.bn, [2, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result, before, after, state, _ = _window(model, torch.randn(4, 3, 6, 6), opt)
    assert result.units == {"relu": [2, 5]}
    assert set(result.parameters["relu"]) == {"conv.weight", "bn.weight", "bn.bias", "fc.weight"}
    assert torch.equal(before[0], after[0])
    assert torch.equal(model.fc.weight[:, [2, 5]], torch.zeros(3, 2))
    assert torch.equal(model.fc.weight[:, [0, 1, 3, 4, 6, 7]], state["fc.weight"][:, [0, 1, 3, 4, 6, 7]])


def test_a_spatial_mean_without_keepdim_is_read_as_the_units() -> None:
    class MeanHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv(x)).mean((-2, -1)))

    model = MeanHead()
    _kill(model.conv, [0, 4])
    result, before, after, _, _ = _window(model, torch.randn(3, 3, 5, 5), torch.optim.SGD(model.parameters(), 0.0))
    assert result.units == {"act": [0, 4]} and torch.equal(before[0], after[0])


def test_conv1d_relu_maxpool1d_over_time_is_recycled_exactly() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(6, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4 * 4, 2),
    )  # fmt: skip
    _kill(model[0], [1, 3])
    _kill(model[3], [2])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result, before, after, state, _ = _window(model, torch.randn(5, 2, 16), opt)
    assert result.units == {"1": [1, 3], "4": [2]}
    assert result.parameters["4"] == ("3.weight", "3.bias", "7.weight")
    assert torch.equal(before[0], after[0])
    # The Linear after the flatten reads channel 2 as its 4 time steps: columns 8..11.
    assert torch.equal(model[7].weight[:, 8:12], torch.zeros(2, 4))
    assert torch.equal(model[7].weight[:, :8], state["7.weight"][:, :8])


def test_a_pool_across_the_units_is_still_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(4, 2))  # pools neighbouring units
    _kill(model[0], [1, 2])
    result, before, after, _, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {} and "mix its units" in result.skipped["1"]
    assert torch.equal(before[0], after[0])


def test_adagrad_accumulators_of_recycled_entries_restart_at_the_initial_value() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [3, 6])
    opt = torch.optim.Adagrad(model.parameters(), lr=0.0, initial_accumulator_value=0.25)
    x = torch.randn(6, 4)
    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt)
    with monitor:
        for _ in range(3):
            opt.zero_grad()
            _loss(model(x)).backward()
            opt.step()
        monitor.report()
        sums = {name: opt.state[p]["sum"].clone() for name, p in model.named_parameters()}
        result = monitor.recycle()
    assert result.units == {"1": [3, 6]}
    fresh = torch.optim.Adagrad([nn.Parameter(torch.zeros(2))], lr=0.0, initial_accumulator_value=0.25)
    assert float(fresh.state[fresh.param_groups[0]["params"][0]]["sum"][0]) == 0.25  # what a fresh one has
    state = {name: opt.state[p]["sum"] for name, p in model.named_parameters()}
    assert torch.equal(state["0.weight"][[3, 6]], torch.full((2, 4), 0.25))
    assert torch.equal(state["0.bias"][[3, 6]], torch.full((2,), 0.25))
    assert torch.equal(state["2.weight"][:, [3, 6]], torch.full((2, 2), 0.25))
    keep = [0, 1, 2, 4, 5, 7]
    assert torch.equal(state["0.weight"][keep], sums["0.weight"][keep])
    assert torch.equal(state["2.weight"][:, keep], sums["2.weight"][:, keep])


def test_a_second_recycle_of_a_window_that_skipped_everything_repeats_every_reason() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    _kill(model[0], [1])
    with torch.no_grad():
        model[2].bias.fill_(5.0)
        model[2].bias[[0, 2]] = -100.0
    model[4].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    result, _, _, state, again = _window(model, torch.randn(6, 4), opt)
    assert result.units == {} and set(result.skipped) == {"1", "3"}
    assert again.units == {} and again.skipped == result.skipped
    assert _unchanged(model, state)


def test_the_first_recycle_without_recycle_option_acts() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [2, 5])
    result, before, after, _, again = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {"1": [2, 5]} and torch.equal(before[0], after[0])
    assert again.units == {} and "already recycled" in again.skipped["1"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_wiring_record_costs_one_forward_its_hooks_come_off_when_the_next_step_begins() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [2, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(6, 4)
    with relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt) as monitor:
        assert model[2]._forward_pre_hooks  # the probe records the first training forward
        for _ in range(2):
            opt.zero_grad()
            _loss(model(x)).backward()
            opt.step()
        # The second step began: the record was read, and no hook is left on a module relumon does not watch.
        assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
        assert not model[0]._forward_hooks and not model[2]._forward_hooks
        monitor.report()
        assert monitor.recycle().units == {"1": [2, 5]}


# ----------------------------------------------------------------------------- review 25: hostile cases


def _weight_norm_parametrization(module: nn.Module) -> None:
    torch.nn.utils.parametrizations.weight_norm(module)


def _spectral_norm_parametrization(module: nn.Module) -> None:
    torch.nn.utils.parametrizations.spectral_norm(module)


def _old_weight_norm(module: nn.Module) -> None:
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(module)  # the hook-based one: `weight` is recomputed before every forward


@pytest.mark.parametrize("apply", [_weight_norm_parametrization, _spectral_norm_parametrization, _old_weight_norm])
@pytest.mark.parametrize("role", ["producer", "reader"])
def test_a_computed_weight_is_skipped_with_the_reason_and_nothing_moves(apply: Any, role: str) -> None:
    """A parametrized producer made `copy.copy` raise from inside torch; a parametrized reader had its columns zeroed
    in a temporary (the real weight kept them) while the recycled units revived: the outputs changed by 0.3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [1, 6])
    apply(model[0] if role == "producer" else model[2])
    result, before, after, state, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    path = "0" if role == "producer" else "2"
    assert result.units == {} and f"its {role} `{path}` computes its `weight`" in result.skipped["1"]
    # spectral_norm's power-iteration vectors `_u`, `_v` move at every training forward (the ones measuring the
    # outputs too), not by recycling
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    moved = [k for k in moved if not k.endswith(("._u", "._v"))]
    assert torch.equal(before[0], after[0]) and moved == []


def test_adafactor_factored_statistics_of_recycled_rows_and_columns_restart_at_zero() -> None:
    """Adafactor keeps ``row_var`` (out, 1) and ``col_var`` (1, in) per weight: not the parameter's shape, so they were
    left as they were. A recycled row's ``row_var`` and a zeroed column's ``col_var`` restart at 0 now; statistics
    shared with live entries (the producer's ``col_var``, the reader's ``row_var``) are kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    _kill(model[0], [1, 6])
    opt = torch.optim.Adafactor(model.parameters(), lr=0.0)
    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt)
    x = torch.randn(6, 4)
    with monitor:
        for _ in range(3):
            opt.zero_grad()
            _loss(model(x)).backward()
            opt.step()
        monitor.report()
        for state in opt.state.values():  # every statistic non-zero, so that a reset shows
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    value.copy_(torch.rand_like(value) + 1)
        old = {p: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in opt.state}
        assert monitor.recycle().units == {"1": [1, 6]}
    producer, reader = opt.state[model[0].weight], opt.state[model[2].weight]
    rows = torch.zeros(8, 1, dtype=torch.bool)
    rows[[1, 6]] = True
    assert torch.equal(producer["row_var"], torch.where(rows, 0.0, old[model[0].weight]["row_var"]))
    assert torch.equal(producer["col_var"], old[model[0].weight]["col_var"])
    assert torch.equal(reader["col_var"], torch.where(rows.T, 0.0, old[model[2].weight]["col_var"]))
    assert torch.equal(reader["row_var"], old[model[2].weight]["row_var"])
    bias = opt.state[model[0].bias]["variance"]
    assert torch.equal(bias, torch.where(rows.flatten(), 0.0, old[model[0].bias]["variance"]))


def test_lbfgs_history_is_cleared_its_next_step_is_a_fresh_optimizers() -> None:
    """L-BFGS keeps one flat history (directions, steps, the last gradient) for all parameters: after recycling, its
    next curvature pair mixed the jump recycling made with a gradient step. The history is cleared: the next step is
    the one a fresh L-BFGS would take from the recycled weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    _kill(model[0], [1, 6])
    x, target = torch.randn(16, 4), torch.randn(16, 3)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=5)

    def step(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (net(x) - target).pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)

    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt)
    with monitor:
        for _ in range(3):
            step(model, opt)
        monitor.report()
        assert opt.state[model[0].weight]["old_dirs"]  # a history to clear
        assert monitor.recycle().units == {"1": [1, 6]}
    twin = copy.deepcopy(model)
    step(model, opt)
    step(twin, torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=3, history_size=5))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_an_activation_the_model_returns_detached_is_the_models_output() -> None:
    """``return logits, h.detach()`` has no autograd node to find: recycling re-drew the units and the second output
    changed by 0.66. The site is skipped now: the returned tensor shares the activation's storage."""

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.fc1(x))
            return self.fc2(h), h[:, :6].detach()  # a detached view: features for a metric

    torch.manual_seed(0)
    model = WithFeatures()
    _kill(model.fc1, [1, 4])
    result, before, after, state, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {} and "returns its values without gradient" in result.skipped["act"]
    assert all(torch.equal(b, a) for b, a in zip(before, after)) and _unchanged(model, state)


def test_a_module_replaced_after_the_wiring_was_read_is_skipped_not_a_traceback() -> None:
    """The head swapped for a Sequential after the first forward: recycling raised ``AttributeError: 'Sequential'
    object has no attribute 'weight'`` from inside its rewrite. Now the site is skipped with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [1, 6])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(6, 4)
    with relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt) as monitor:
        opt.zero_grad()
        _loss(model(x)).backward()
        opt.step()
        monitor.report()
        model[2] = nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 2))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = monitor.recycle()
    assert result.units == {} and "module `2` is not the one relumon recorded" in result.skipped["1"]
    assert _unchanged(model, state)


class _GainLinear(nn.Linear):
    """A Linear subclass whose own init also resets a buffer and a submodule (in place)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("gain", torch.ones(n_out))
        self.extra = nn.Linear(n_out, n_out)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gain"):
            self.gain.fill_(1.0)
            nn.init.eye_(self.extra.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


def test_a_producer_subclass_whose_init_resets_buffers_and_submodules_keeps_them() -> None:
    """The clone that draws the fresh rows shared the module's buffers and submodules: its `reset_parameters` reset
    the real `gain` (2 -> 1 for every unit) and `extra.weight`, and the outputs changed by 3.3."""
    torch.manual_seed(0)
    model = nn.Sequential(_GainLinear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _kill(model[0], [1, 6])
    with torch.no_grad():
        model[0].gain.fill_(2.0)
        model[0].extra.weight.fill_(0.3)
    result, before, after, state, _ = _window(model, torch.randn(6, 4), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {"1": [1, 6]}
    assert torch.equal(before[0], after[0])
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert moved == {"0.weight", "0.bias", "2.weight"}


def test_a_reader_whose_rows_are_redrawn_for_another_site_keeps_zero_columns() -> None:
    """BasicBlock style: `c2` reads the first call of `relu` and feeds its second. Recycling both re-drew `c2`'s rows
    for the second call after zeroing its columns for the first: the recycled units of the first call were read
    again by rows 0 and 6 (the order of the sites decided it). Every reader's columns for a recycled unit are 0 now."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.relu, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.relu(self.c2(self.relu(self.c1(x)))))

    torch.manual_seed(0)
    model = Block()
    _kill(model.c1, [1, 6])
    _kill(model.c2, [0, 6])
    result, before, after, state, _ = _window(model, torch.randn(6, 8), torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.units == {"relu": [1, 6], "relu.call2": [0, 6]}
    assert torch.equal(before[0], after[0])
    assert torch.equal(model.c2.weight[:, [1, 6]], torch.zeros(8, 2))  # read by nothing yet
    assert torch.equal(model.out.weight[:, [0, 6]], torch.zeros(2, 2))
    assert not torch.equal(
        model.c2.weight[[0, 6]][:, [0, 2, 3, 4, 5, 7]], state["c2.weight"][[0, 6]][:, [0, 2, 3, 4, 5, 7]]
    )
