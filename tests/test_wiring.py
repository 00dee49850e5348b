"""Units, samples, sites and steps read from the real wiring (issue 18, part A).

Ground truth is forced by construction (zeroed weight rows and a bias of -1e3 kill exactly the chosen channels) and
checked against a plain forward hook that reduces each activation over every dim but the true channel dim.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import relumon
from tests.nets import BasicBlock


def kill(layer: nn.Module, units: list[int]) -> None:
    """Exactly ``units`` of a Linear/Conv/norm output are very negative for every input."""
    with torch.no_grad():
        for u in units:
            layer.weight[u].zero_()
            layer.bias[u] = -1e3


class DeadByHook:
    """A plain forward hook: a channel is dead when its output was <= 0 everywhere, along ``dim``."""

    def __init__(self, module: nn.Module, dim: int) -> None:
        self.dim = dim
        self.peak: Optional[torch.Tensor] = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, out: torch.Tensor) -> None:
        dims = [d for d in range(out.ndim) if d != self.dim % out.ndim]
        peak = out.detach().amax(dim=dims)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)

    def dead(self) -> list[int]:
        assert self.peak is not None
        self.handle.remove()
        return [int(i) for i in torch.nonzero(self.peak <= 0).flatten()]


def train(model: nn.Module, batches: list[torch.Tensor], forward: Optional[Callable[..., torch.Tensor]] = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x in batches:
        opt.zero_grad()
        (forward or model)(x).float().pow(2).mean().backward()
        opt.step()


# --------------------------------------------------------------------------- units


class Chomp1d(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.size].contiguous()


class TemporalBlock(nn.Module):
    """The canonical TCN block: conv -> Chomp1d -> ReLU -> dropout, twice, then ``relu(out + res)``."""

    def __init__(self, inp: int, out: int, k: int = 3) -> None:
        super().__init__()
        self.conv1, self.chomp1, self.relu1 = nn.Conv1d(inp, out, k, padding=k - 1), Chomp1d(k - 1), nn.ReLU()
        self.conv2, self.chomp2, self.relu2 = nn.Conv1d(out, out, k, padding=k - 1), Chomp1d(k - 1), nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.downsample = nn.Conv1d(inp, out, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.relu1(self.chomp1(self.conv1(x))))
        out = self.drop(self.relu2(self.chomp2(self.conv2(out))))
        return self.relu(out + self.downsample(x))


@pytest.mark.parametrize("lengths", [[50, 50, 50], [40, 50, 30]], ids=["fixed", "variable"])
def test_tcn_block_counts_channels_not_time_steps(lengths: list[int]) -> None:
    block = TemporalBlock(4, 6)
    kill(block.conv1, [0, 1, 2])
    for layer in (block.conv2, block.downsample):
        kill(layer, [0, 1, 2])
    hooks = {name: DeadByHook(getattr(block, name), 1) for name in ("relu1", "relu2", "relu")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)  # no shape skipped, no guess
        with relumon.watch(block, measure_every=1) as monitor:
            train(block, [torch.randn(5, 4, n) for n in lengths])
            report = monitor.report()
    for name, hook in hooks.items():
        assert report[name].units == 6 and report[name].unit_dim == 1
        assert report[name].dead_indices == hook.dead() == [0, 1, 2]
        assert report[name].samples == 15


class ResBlock1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv1d(2, 8, 3, padding=1), nn.ReLU()
        self.block = ResBlock1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.stem(x)))


def test_one_d_resnet_relu_of_out_plus_x_counts_channels() -> None:
    model = ResNet1d()
    kill(model.stem, [3, 5])
    kill(model.block.bn2, [3, 5])
    hook = DeadByHook(model.block, 1)  # the block's output is the functional relu's
    with relumon.watch(model, measure_every=1, functional=True) as monitor:
        train(model, [torch.randn(4, 2, 32) for _ in range(3)])
        report = monitor.report()
    site = report["block.F.relu.call2"]
    assert (site.units, site.unit_dim) == (8, 1)
    assert site.dead_indices == hook.dead() == [3, 5]
    assert report["act"].dead_indices == [3, 5]


def test_layernorm_over_a_feature_map_keeps_the_conv_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.LayerNorm([5, 6, 6]), nn.ReLU())
    with torch.no_grad():
        model[1].weight[[1, 4]] = 0.0
        model[1].bias[[1, 4]] = -1e3
    hook = DeadByHook(model[2], 1)
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [torch.randn(4, 3, 6, 6) for _ in range(2)])
        report = monitor.report()
    assert (report["2"].units, report["2"].unit_dim) == (5, 1)
    assert report["2"].dead_indices == hook.dead() == [1, 4]


class ChannelsLastSum(nn.Module):
    """``(B, H, W, C)`` activations fed by an out-of-place add of two Linear outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(3, 7), nn.Linear(2, 7), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.a(x[..., :3]) + self.b(x[..., 3:]))


def test_channels_last_add_of_linear_outputs_counts_the_last_dim() -> None:
    model = ChannelsLastSum()
    kill(model.a, [2, 6])
    kill(model.b, [2, 6])
    hook = DeadByHook(model.act, -1)
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [torch.randn(4, 5, 6, 5) for _ in range(2)])
        report = monitor.report()
    assert (report["act"].units, report["act"].unit_dim) == (7, 3)
    assert report["act"].dead_indices == hook.dead() == [2, 6]
    assert report["act"].samples == 8


class PermutedConvBlock(nn.Module):
    """A ConvNeXt-style block: conv, permute to channels-last, LayerNorm(C), Linear, ReLU, and a cat of two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm, self.act = nn.LayerNorm(6), nn.ReLU()
        self.left, self.right, self.joined = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv(x).permute(0, 2, 3, 1)))  # (B, H, W, C)
        z = self.joined(torch.cat([self.left(x), self.right(x)], dim=1))
        return y.mean() + z.mean()


def test_shapes_no_case_names_permute_and_cat() -> None:
    model = PermutedConvBlock()
    with torch.no_grad():
        model.norm.weight[[0, 5]] = 0.0
        model.norm.bias[[0, 5]] = -1e3
    kill(model.right, [1])
    hooks = DeadByHook(model.act, 3), DeadByHook(model.joined, 1)
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [torch.randn(2, 3, 5, 5) for _ in range(2)])
        report = monitor.report()
    assert (report["act"].units, report["act"].unit_dim) == (6, 3)
    assert report["act"].dead_indices == hooks[0].dead() == [0, 5]
    assert (report["joined"].units, report["joined"].unit_dim) == (6, 1)
    assert report["joined"].dead_indices == hooks[1].dead() == [3]  # right's channel 1, after left's 2


def test_a_square_transpose_follows_the_features() -> None:
    """``(B, L, C)`` with L == C transposed to ``(B, C, L)``: shapes alone cannot tell, the graph can."""
    model = nn.Sequential(nn.Linear(6, 6))
    act = nn.ReLU()
    kill(model[0], [0, 2])
    wrapper = nn.ModuleDict({"fc": model, "act": act})
    hook = DeadByHook(act, 1)
    with relumon.watch(wrapper, measure_every=1) as monitor:
        train(wrapper, [torch.randn(3, 6, 6) for _ in range(2)], forward=lambda x: act(model(x).transpose(1, 2)))
        report = monitor.report()
    assert (report["act"].units, report["act"].unit_dim) == (6, 1)
    assert report["act"].dead_indices == hook.dead() == [0, 2]


def test_a_graph_that_cannot_tell_warns_once_and_uses_the_fallback() -> None:
    act = nn.ReLU()
    model = nn.ModuleDict({"act": act})
    with pytest.warns(relumon.RelumonWarning, match="does not tell"), relumon.watch(model, measure_every=1) as mon:
        for _ in range(2):
            act(torch.randn(2, 3, 4)).sum()  # raw data: no producer in any graph
        report = mon.report()
    assert report["act"].unit_dim == 2


# --------------------------------------------------------------------------- samples


def test_sequence_first_transformer_counts_batch_rows() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=nn.ReLU(), dropout=0.0)
    with relumon.watch(layer, measure_every=1) as monitor:
        train(layer, [torch.randn(20, 3, 8) for _ in range(4)])  # (S, B, E)
        report = monitor.report()
    assert report.names == ["activation"]
    assert report["activation"].units == 16
    assert report["activation"].samples == 4 * 3  # batch rows, not 4 * 20 positions


class LSTMHead(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=batch_first)
        self.fc, self.act = nn.Linear(6, 5), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.lstm(x)[0]))


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_layout_decides_the_samples(batch_first: bool) -> None:
    model = LSTMHead(batch_first)
    x = torch.randn(3, 11, 4) if batch_first else torch.randn(11, 3, 4)
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [x, x])
        assert monitor.report()["act"].samples == 6


def test_batch_dim_option_where_nothing_says() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    with relumon.watch(model, measure_every=1, batch_dim=1) as monitor:
        train(model, [torch.randn(9, 2, 4)])
        assert monitor.report()["1"].samples == 2
    with pytest.raises(TypeError, match="batch_dim"):
        relumon.Options(batch_dim="rows")


# --------------------------------------------------------------------------- a batch-of-one dry run


class PoolHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.fc, self.act = (
            nn.Conv2d(3, 4, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Linear(4, 6),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.pool(self.conv(x)).squeeze()))


@pytest.mark.parametrize("unit_dim", [None, {"act": -1}, {"act": 1}])
def test_a_batch_of_one_dry_run_does_not_lock_the_site(unit_dim: Optional[dict[str, int]]) -> None:
    model = PoolHead()
    kill(model.fc, [1, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)
        with relumon.watch(model, measure_every=1, unit_dim=unit_dim) as monitor:
            model(torch.randn(1, 3, 6, 6)).sum().backward()  # the dry run: a 1-D activation
            train(model, [torch.randn(8, 3, 6, 6) for _ in range(5)])
            report = monitor.report()
    assert (report["act"].units, report["act"].unit_dim) == (6, 1)
    assert report["act"].samples == 1 + 40
    assert report["act"].dead_indices == [1, 4]


def test_a_two_d_call_at_a_three_d_site_counts_its_rows() -> None:
    fc, act = nn.Linear(4, 5), nn.ReLU()
    model = nn.ModuleDict({"fc": fc, "act": act})
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [torch.randn(3, 7, 4), torch.randn(6, 4)], forward=lambda x: act(fc(x)))
        assert monitor.report()["act"].samples == 3 + 6


# --------------------------------------------------------------------------- sites from the wiring


class IRNN(nn.Module):
    """A ReLU RNN cell unrolled over T steps (pixel MNIST has T = 784)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.i2h, self.h2h, self.act = nn.Linear(1, hidden), nn.Linear(hidden, hidden), nn.ReLU()
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.h2h.in_features)
        for t in range(x.shape[1]):
            h = self.act(self.i2h(x[:, t : t + 1]) + self.h2h(h))
        return self.out(h)


def test_a_recurrent_cell_unrolled_past_the_call_bound_is_one_site() -> None:
    from relumon.recorder import MAX_CALLS_PER_STEP

    model = IRNN()
    with torch.no_grad():  # an IRNN (identity recurrence): live units stay >= 1, units 2 and 5 are dead at every step
        model.h2h.weight.copy_(torch.eye(8) * 0.5)
        model.h2h.bias.zero_()
        model.i2h.weight.fill_(0.01)
        model.i2h.bias.fill_(1.0)
    kill(model.i2h, [2, 5])
    hook = DeadByHook(model.act, 1)
    steps = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)  # no "missing step boundary" warning
        with relumon.watch(model, measure_every=1) as monitor:
            for _ in range(steps):
                model.h2h.weight.grad = None
                model(torch.randn(4, MAX_CALLS_PER_STEP + 44)).sum().backward()
            report = monitor.report()
    assert report.names == ["act"]
    assert report.steps == steps
    assert report["act"].units == 8
    assert report["act"].dead_indices == hook.dead() == [2, 5]
    assert report["act"].samples == 4 * steps  # the same rows at every time step


def test_calls_fed_by_different_layers_stay_separate_sites() -> None:
    block = BasicBlock(4, 4)
    kill(block.bn2, [1])
    with relumon.watch(block, measure_every=1) as monitor:
        train(block, [torch.randn(2, 4, 5, 5) for _ in range(2)])
        report = monitor.report()
    assert report.names == ["relu", "relu.call2"]
    assert report["relu.call2"].dead_indices == [1] or 1 in report["relu.call2"].dead_indices


# --------------------------------------------------------------------------- step boundaries


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
        self.head = nn.Linear(8, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc2(self.act1(self.fc1(x))))

    def checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.features, x.requires_grad_(), use_reentrant=True))


def test_reentrant_checkpointing_through_methods_resets_steps() -> None:
    model = Trunk()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own note on reentrant checkpoints
        with relumon.watch(model, measure_every=1) as monitor:
            for _ in range(12):
                opt.zero_grad()
                model.checkpointed(torch.randn(3, 4)).sum().backward()
                opt.step()
            report = monitor.report()
    assert report.names == ["act1", "act2"]
    assert report.steps == 12
    assert report["act1"].samples == 36


def test_a_frozen_trunk_driven_through_methods_resets_steps() -> None:
    model = Trunk()
    model.requires_grad_(False)
    probe = nn.Linear(8, 2)
    opt = torch.optim.SGD(probe.parameters(), lr=1e-2)
    with relumon.watch(model, measure_every=1) as monitor:
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(probe(model.features(torch.randn(5, 4))), torch.zeros(5, dtype=torch.long)).backward()
            opt.step()
        report = monitor.report()
    assert report.names == ["act1", "act2"]
    assert report.steps == 20
    assert report["act2"].samples == 100


# --------------------------------------------------------------------------- smaller items


def test_an_exception_in_the_first_forward_leaves_later_sites_their_producer() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU()
            self.fail = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act1(self.fc1(x))
            if self.fail:
                self.fail = False
                raise RuntimeError("first batch is bad")
            return self.act2(self.fc2(h))

    model = Flaky()
    with relumon.watch(model, measure_every=1) as monitor:
        with pytest.raises(RuntimeError, match="first batch"):
            model(torch.randn(2, 4))
        train(model, [torch.randn(2, 4) for _ in range(2)])
        report = monitor.report()
    assert report["act1"].fed_by == "fc1"
    assert report["act2"].fed_by == "fc2"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move the model to")
def test_state_follows_the_model_to_another_device() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    kill(model[0], [3])
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, [torch.randn(2, 4)])
        model.cuda()
        train(model, [torch.randn(2, 4, device="cuda")])
        report = monitor.report()
    assert report["1"].disabled is None
    assert report["1"].samples == 4 and report["1"].dead_indices == [3]
