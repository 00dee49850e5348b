"""Real-code shapes whose wiring was read wrong (issue 24), each against a plain forward hook.

Ground truth is forced by construction (a bias of -1e3 on chosen units kills them for every input) and read by a
plain forward hook that knows which dim holds the units and which the samples.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

import relumon


def _train(model: nn.Module, batches: list[Tensor]) -> relumon.Report:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.RelumonWarning)  # dead-layer alerts are expected here
        with relumon.watch(model, measure_every=1) as monitor:
            for x in batches:
                opt.zero_grad()
                model(x).float().pow(2).mean().backward()
                opt.step()
            return monitor.report()


# --------------------------------------------------------------------------- site identity


class RoutedMoE(nn.Module):
    """Top-1 routed experts sharing one ReLU object: experts that get no token are not called."""

    def __init__(self, d: int = 4, h: int = 8, experts: int = 3) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, h) for _ in range(experts))
        self.out = nn.Linear(h, d)
        self.act = nn.ReLU()
        self.seen: dict[int, list[Tensor]] = {}  # expert -> its ReLU outputs (the plain-hook ground truth)

    def forward(self, x: Tensor, route: Tensor) -> Tensor:
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = route == e
            if not bool(rows.any()):
                continue  # an expert with no token is not called: later experts' call indices shift
            h = self.act(expert(x[rows]))
            self.seen.setdefault(e, []).append(h.detach())
            y = y.index_put((rows.nonzero().flatten(),), self.out(h))
        return y


def _expert_truth(outs: list[Tensor]) -> tuple[int, list[int]]:
    peak = torch.stack([o.amax(0) for o in outs]).amax(0)
    return sum(o.shape[0] for o in outs), [int(i) for i in torch.nonzero(peak <= 0).flatten()]


def test_moe_experts_skipped_by_the_data_keep_their_own_sites() -> None:
    torch.manual_seed(0)
    moe = RoutedMoE()
    with torch.no_grad():
        moe.experts[2].bias.fill_(-1e3)  # expert 2 is all dead
        moe.experts[2].weight.zero_()
    x = torch.randn(15, 4)
    routes = [torch.tensor([0] * 5 + [1] * 5 + [2] * 5), torch.tensor([0] * 12 + [2] * 3), torch.tensor([1] * 15)]
    opt = torch.optim.SGD(moe.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.RelumonWarning)
        with relumon.watch(moe, measure_every=1) as monitor:
            for route in routes:
                opt.zero_grad()
                moe(x, route).pow(2).mean().backward()
                opt.step()
            report = monitor.report()
    by_fed = {layer.fed_by: layer for layer in report}
    for e in range(3):
        samples, dead = _expert_truth(moe.seen[e])
        layer = by_fed[f"experts.{e}"]
        assert (layer.samples, layer.dead_indices) == (samples, dead), e
    assert by_fed["experts.2"].all_dead and by_fed["experts.2"].samples == 8


def test_layerdrop_calls_go_to_their_own_layer() -> None:
    """LayerDrop: layers skipped at random in training, all through one shared ReLU."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
    with torch.no_grad():
        layers[1].bias[:4] = -1e3
        layers[1].weight[:4].zero_()
    act = nn.ReLU()
    plan = [[], [0], [1], [0, 2]]
    outs: dict[int, list[Tensor]] = {}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers, self.act = layers, act

        def forward(self, x: Tensor) -> Tensor:
            skip = plan.pop(0)
            for i, layer in enumerate(self.layers):
                if i in skip:
                    continue
                h = self.act(layer(x))
                outs.setdefault(i, []).append(h.detach())
                x = h + x
            return x

    net = Net()
    report = _train(net, [torch.randn(5, 6) for _ in range(4)])
    by_fed = {layer.fed_by: layer for layer in report}
    for i in range(3):
        samples, dead = _expert_truth(outs[i])
        layer = by_fed[f"layers.{i}"]
        assert (layer.samples, layer.dead_indices) == (samples, dead), i
    assert by_fed["layers.1"].dead_indices == [0, 1, 2, 3]


class BatchedExperts(nn.Module):
    """Experts stored in one ``(E, D, H)`` parameter: ``act(t @ W1[e] + b1[e])``."""

    def __init__(self, e: int = 3, d: int = 4, h: int = 8) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(e, d, h) / 2)
        self.b1 = nn.Parameter(torch.zeros(e, h))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return sum(self.act(x @ self.w1[e] + self.b1[e]).sum() for e in range(self.w1.shape[0]))  # type: ignore[return-value]


def test_experts_in_one_parameter_are_a_site_each() -> None:
    torch.manual_seed(0)
    model = BatchedExperts()
    with torch.no_grad():
        model.w1[1].zero_()
        model.b1[1] = -1e3  # expert 1 all dead
    report = _train(model, [torch.randn(5, 4) for _ in range(2)])
    layers = [layer for layer in report if layer.module == "act"]
    assert len(layers) == 3
    assert [layer.all_dead for layer in layers] == [False, True, False]
    assert all(layer.samples == 10 for layer in layers)


class TiedAutoencoder(nn.Module):
    """A bias-free tied autoencoder: ``act(x @ W.T)`` then ``act(h @ W)``, one ReLU object."""

    def __init__(self, d: int = 6, h: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h, d))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(x @ self.weight.T)
        return self.act(h @ self.weight)


def test_tied_autoencoder_encoder_and_decoder_are_two_sites() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder()
    report = _train(model, [torch.randn(5, 6) for _ in range(2)])
    layers = [layer for layer in report if layer.module == "act"]
    assert sorted(layer.units for layer in layers) == [4, 6]
