"""Real-code shapes whose wiring was read wrong (issue 24), each against a plain forward hook.

Ground truth is forced by construction (a bias of -1e3 on chosen units kills them for every input) and read by a
plain forward hook that knows which dim holds the units and which the samples.
"""

from __future__ import annotations

import warnings

import pytest
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
    """A bias-free tied autoencoder with a square weight: ``act(x @ W.T)`` then ``act(h @ W)``, one ReLU object."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        weight = torch.rand(d, d) + 0.1
        weight[0, :] = -weight[0, :]  # encoder unit 0 (row 0 of W) is dead on non-negative inputs
        weight[:, 5] = -weight[:, 5].abs()  # decoder unit 5 (column 5 of W) is dead on non-negative codes
        self.weight = nn.Parameter(weight)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(x @ self.weight.T)
        return self.act(h @ self.weight)


def test_tied_autoencoder_encoder_and_decoder_are_two_sites() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder()
    calls: list[Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: calls.append(out.detach()))
    report = _train(model, [torch.rand(5, 6) for _ in range(2)])
    layers = [layer for layer in report if layer.module == "act"]
    assert len(layers) == 2
    truth = [
        [int(i) for i in torch.nonzero(torch.stack([c.amax(0) for c in calls[k::2]]).amax(0) <= 0).flatten()]
        for k in (0, 1)
    ]
    assert truth == [[0], [5]]
    assert [layer.dead_indices for layer in layers] == truth
    assert [layer.samples for layer in layers] == [10, 10]


# --------------------------------------------------------------------------- samples from the graph


class SeqFirstToBatchFirst(nn.Module):
    """A sequence-first encoder (``batch_first=False``) whose output is transposed to batch-first for a ReLU head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.enc: nn.Module = nn.LSTM(4, 6)
        else:
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, 0.0, activation="gelu"), 1)
        self.head, self.act = nn.Linear(6 if kind == "lstm" else 4, 5), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, D)
        seq = x.transpose(0, 1)
        out = self.enc(seq)[0] if self.kind == "lstm" else self.enc(seq)
        return self.act(self.head(out.transpose(0, 1)))


def _rows_hook(module: nn.Module, seen: list[int], dim: int) -> None:
    module.register_forward_hook(lambda m, a, out: seen.append(out.shape[dim]))


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_a_sequence_first_encoder_transposed_to_batch_first_counts_batch_rows(kind: str) -> None:
    model = SeqFirstToBatchFirst(kind)
    rows: list[int] = []
    _rows_hook(model.act, rows, 0)
    report = _train(model, [torch.randn(3, 7, 4) for _ in range(4)])
    assert report["act"].samples == sum(rows) == 12  # batch rows, not 4 * 7 positions


class BatchFirstWithDefaultAttention(nn.Module):
    """A batch-first block calling a default (sequence-first) ``nn.MultiheadAttention`` through transposes."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc, self.act = nn.Linear(8, 6), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, E)
        seq = x.transpose(0, 1)
        out, _ = self.attn(seq, seq, seq)
        return self.act(self.fc(out.transpose(0, 1)))


def test_a_batch_first_block_around_default_attention_counts_batch_rows() -> None:
    model = BatchFirstWithDefaultAttention()
    rows: list[int] = []
    _rows_hook(model.act, rows, 0)
    report = _train(model, [torch.randn(3, 5, 8) for _ in range(4)])
    assert report["act"].samples == sum(rows) == 12


class TwoBranches(nn.Module):
    """A sequence-first GRU in one branch, a batch-first Linear/ReLU branch that it does not feed."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 4)
        self.fc, self.act = nn.Linear(4, 6), nn.ReLU()
        self.gru_head, self.gru_act = nn.Linear(4, 6), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, D)
        seq_out, _ = self.gru(x.transpose(0, 1))  # (T, B, D)
        branch = self.act(self.fc(x))  # (B, T, 6)
        return branch.sum() + self.gru_act(self.gru_head(seq_out)).sum()


def test_a_sequence_first_gru_does_not_change_a_branch_it_does_not_feed() -> None:
    model = TwoBranches()
    rows: list[int] = []
    gru_rows: list[int] = []
    _rows_hook(model.act, rows, 0)
    _rows_hook(model.gru_act, gru_rows, 1)  # the GRU head is sequence-first: batch in dim 1
    report = _train(model, [torch.randn(3, 20, 4) for _ in range(4)])
    assert report["act"].samples == sum(rows) == 12  # not 80 positions
    assert report["gru_act"].samples == sum(gru_rows) == 12


# --------------------------------------------------------------------------- cascades


class MessagePassing(nn.Module):
    """A graph layer: messages ``act1(lin1(x))[src]`` summed into ``zeros(N, H).index_add_(0, dst, ...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.act1 = nn.Linear(4, 8), nn.ReLU()
        self.lin2, self.act2 = nn.Linear(8, 8), nn.ReLU()
        with torch.no_grad():
            self.lin1.weight.zero_()
            self.lin1.bias.fill_(-1e3)  # the first layer is dead
            self.lin2.bias.fill_(-1.0)  # so the second sees only zeros, and outputs its negative bias: dead too

    def forward(self, x: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        messages = self.act1(self.lin1(x))[src]
        aggregated = torch.zeros(x.shape[0], 8).index_add_(0, dst, messages)
        return self.act2(self.lin2(aggregated))


def test_a_scatter_aggregation_keeps_one_cascade_one_root() -> None:
    torch.manual_seed(0)
    model = MessagePassing()
    src, dst = torch.randint(0, 6, (12,)), torch.randint(0, 6, (12,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1) as monitor:
            for _ in range(3):
                model(torch.randn(6, 4), src, dst).pow(2).sum().backward()
            report = monitor.report()
    assert report["act1"].all_dead and report["act2"].all_dead
    assert report["act1"].is_root and report["act2"].caused_by == "act1"
    alerts = [str(w.message) for w in caught if "were dead" in str(w.message)]
    assert len(alerts) == 1 and "`act1`" in alerts[0], alerts
