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
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(4, 2, 8, 0.0, activation="gelu"), 1, enable_nested_tensor=False
            )
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


# --------------------------------------------------------------------------- recurrent layers and real-code blocks


class ReluOnRNN(nn.Module):
    def __init__(self, kind: type[nn.Module], batch_first: bool) -> None:
        super().__init__()
        self.rnn, self.act = kind(4, 6, batch_first=batch_first), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.rnn(x)[0])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda k: k.__name__)
@pytest.mark.parametrize("batch_first", [True, False])
def test_a_relu_on_a_recurrent_output_reads_units_and_rows_without_a_warning(
    kind: type[nn.Module], batch_first: bool
) -> None:
    model = ReluOnRNN(kind, batch_first)
    rows: list[int] = []
    _rows_hook(model.act, rows, 0 if batch_first else 1)
    x = [torch.randn(3, 11, 4) if batch_first else torch.randn(11, 3, 4) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)
        with relumon.watch(model, measure_every=1) as monitor:
            for batch in x:
                model(batch).sum().backward()
            report = monitor.report()
    assert (report["act"].units, report["act"].unit_dim, report["act"].samples) == (6, 2, sum(rows)) == (6, 2, 6)


class WaveNetBlock(nn.Module):
    """A gated dilated conv (one conv, chunked: ``tanh(a) * sigmoid(b)``), residual and skip 1x1 convs."""

    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.dilated = nn.Conv1d(c, 2 * c, 2, dilation=dilation, padding=dilation)
        self.res, self.skip = nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.dilated(x)[..., : x.shape[-1]].chunk(2, 1)
        h = torch.tanh(a) * torch.sigmoid(b)
        return x + self.res(h), self.skip(h)


class WaveNet(nn.Module):
    """WaveNet's output stack: ``relu(sum of skips)`` (``torch.stack(skips).sum(0)``), a 1x1 conv, ``relu``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, c, 1)
        self.blocks = nn.ModuleList(WaveNetBlock(c, d) for d in (1, 2, 4))
        self.act1, self.out, self.act2 = nn.ReLU(), nn.Conv1d(c, c, 1), nn.ReLU()
        with torch.no_grad():
            for block in self.blocks:
                block.skip.weight[:3] = 0.0
                block.skip.bias[:3] = -1e3  # channels 0-2 of every skip are very negative: their sum is dead
            self.out.weight[5:] = 0.0
            self.out.bias[5:] = -1e3

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        skips = []
        for block in self.blocks:
            h, s = block(h)
            skips.append(s)
        return self.act2(self.out(self.act1(torch.stack(skips).sum(0))))


def _dead_by_hook(module: nn.Module, dim: int, batch_dim: int) -> tuple[list[int], list[int]]:
    """A plain hook's dead units and samples (lists filled during training)."""
    dead: list[int] = []
    samples: list[int] = []
    peaks: list[Tensor] = []

    def hook(m: nn.Module, args: object, out: Tensor) -> None:
        peaks.append(out.detach().amax([d for d in range(out.ndim) if d != dim]))
        samples.append(out.shape[batch_dim])
        dead[:] = [int(i) for i in torch.nonzero(torch.stack(peaks).amax(0) <= 0).flatten()]

    module.register_forward_hook(hook)
    return dead, samples


def test_wavenet_gated_stack_with_variable_lengths_counts_channels() -> None:
    torch.manual_seed(0)
    model = WaveNet()
    truth = {name: _dead_by_hook(getattr(model, name), 1, 0) for name in ("act1", "act2")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)  # no guess, no skipped shape
        warnings.filterwarnings("ignore", "relumon: .* were dead", relumon.RelumonWarning)
        report = _train(model, [torch.randn(4, 1, n) for n in (16, 24, 12)])
    for name, (dead, samples) in truth.items():
        assert (report[name].units, report[name].samples, report[name].dead_indices) == (8, sum(samples), dead)
    assert {0, 1, 2} <= set(truth["act1"][0]) and {5, 6, 7} <= set(truth["act2"][0])
    assert report["act1"].samples == 12


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block with ReLU: depthwise conv, ``permute`` to channels-last, an in-place ReLU on that view, then
    LayerNorm, Linear (x4), ReLU, Linear, ``permute`` back, residual."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.act0 = nn.ReLU(inplace=True)
        self.norm, self.pw1, self.act, self.pw2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c)
        with torch.no_grad():
            self.dw.weight[:3] = 0.0
            self.dw.bias[:3] = -1e3
            self.pw1.weight[7:9] = 0.0
            self.pw1.bias[7:9] = -1e3

    def forward(self, x: Tensor) -> Tensor:
        h = self.act0(self.dw(x).permute(0, 2, 3, 1))
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def test_convnext_block_with_an_inplace_relu_on_a_permuted_view() -> None:
    torch.manual_seed(0)
    model = ConvNeXtBlock()
    truth0 = _dead_by_hook(model.act0, 3, 0)
    truth = _dead_by_hook(model.act, 3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)
        warnings.filterwarnings("ignore", "relumon: .* were dead", relumon.RelumonWarning)
        report = _train(model, [torch.randn(2, 8, 10, 5) for _ in range(3)])
    assert (report["act0"].units, report["act0"].samples, report["act0"].dead_indices) == (8, 6, truth0[0])
    assert truth0[0] == [0, 1, 2]  # 8 channels, 3 dead (not 10 "units" on the H rows)
    assert (report["act"].units, report["act"].samples, report["act"].dead_indices) == (32, 6, truth[0])
    assert {7, 8} <= set(truth[0])


class ReGLU(nn.Module):
    """A channels-last ReGLU feed-forward: ``relu(a) * b`` with ``a, b = Linear(x).chunk(2, -1)``."""

    def __init__(self, d: int = 4, h: int = 6) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(d, 2 * h), nn.ReLU(), nn.Linear(h, d)
        with torch.no_grad():
            self.fc.weight[:2] = 0.0
            self.fc.bias[:2] = -1e3

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc(x).chunk(2, -1)
        return self.out(self.act(a) * b)


def test_channels_last_reglu_with_variable_lengths() -> None:
    torch.manual_seed(0)
    model = ReGLU()
    dead, samples = _dead_by_hook(model.act, 2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)
        warnings.filterwarnings("ignore", "relumon: .* were dead", relumon.RelumonWarning)
        report = _train(model, [torch.randn(3, n, 4) for n in (5, 9, 7, 4)])
    assert (report["act"].units, report["act"].samples, report["act"].dead_indices) == (6, 12, dead)
    assert dead[:2] == [0, 1] and sum(samples) == 12


class Seq2SeqHead(nn.Module):
    """A sequence-first GRU encoder-decoder with a ReLU output head over the decoder's time-major outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.GRU(4, 8), nn.GRU(4, 8)
        self.fc, self.act, self.proj = nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4)
        with torch.no_grad():
            self.fc.weight[:4] = 0.0
            self.fc.bias[:4] = -1e3

    def forward(self, src: Tensor) -> Tensor:  # (S, B, 4)
        _, state = self.enc(src)
        out, _ = self.dec(src.flip(0), state)
        return self.proj(self.act(self.fc(out)))


def test_seq2seq_head_counts_batch_rows() -> None:
    torch.manual_seed(0)
    model = Seq2SeqHead()
    dead, samples = _dead_by_hook(model.act, 2, 1)
    report = _train(model, [torch.randn(n, 3, 4) for n in (6, 9)])
    assert (report["act"].units, report["act"].samples, report["act"].dead_indices) == (10, sum(samples), dead)
    assert sum(samples) == 6 and dead[:4] == [0, 1, 2, 3]


class UnrolledCell(nn.Module):
    """A recurrent cell unrolled T times through one ReLU: one site."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rec, self.act = nn.Linear(3, 6), nn.Linear(6, 6), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 3)
        h = torch.zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h = self.act(self.inp(x[:, t]) + self.rec(h))
        return h


def test_a_recurrent_site_counts_gradient_arrivals_per_time_step() -> None:
    """`backward_passes` counts one gradient arrival per time-step call; `grad_norm` is their mean norm (docs)."""
    torch.manual_seed(0)
    model = UnrolledCell()
    norms: list[float] = []

    def grad_norms(module: nn.Module, args: object, out: Tensor) -> None:
        out.register_hook(lambda g: norms.append(float(g.norm())))  # type: ignore[no-untyped-call]

    model.act.register_forward_hook(grad_norms)
    report = _train(model, [torch.randn(4, 5, 3) for _ in range(4)])
    layer = report["act"]
    assert layer.forwards == 4 and layer.samples == 16  # later time steps are the same rows
    assert layer.backward_passes == len(norms) == 4 * 5
    assert abs(layer.grad_norm - sum(norms) / len(norms)) < 1e-5 * max(1.0, layer.grad_norm)


class FlakyUpstream(nn.Module):
    """``u`` is dead unless the step's input says fire; ``d`` is dead on its own (zero weights, bias -1e3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin_u, self.u = nn.Linear(4, 6), nn.ReLU()
        self.lin_d, self.d = nn.Linear(6, 6), nn.ReLU()
        with torch.no_grad():
            self.lin_u.weight.fill_(1.0)
            self.lin_u.bias.fill_(-1.0)
            self.lin_d.weight.zero_()
            self.lin_d.bias.fill_(-1e3)

    def forward(self, x: Tensor) -> Tensor:  # x >= 0 fires every unit of u, x = -1 kills them
        return self.d(self.lin_d(self.u(self.lin_u(x))))


def test_an_upstream_that_fired_on_unmeasured_calls_explains_nothing() -> None:
    """The cascade rule: an upstream left unmeasured on some calls may have fired then, so a dead site below it is its
    own root. Here ``u`` was confirmed silent, then fires only on steps the schedule does not measure."""
    from relumon.recorder import is_measured_step

    model = FlakyUpstream()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as built
    windows = []
    step = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=4) as monitor:
            for window in range(5):
                for i in range(8):
                    # Fire on steps the schedule leaves unmeasured (a window's first call is always measured).
                    fire = window >= 2 and i > 0 and not is_measured_step(step, 4)
                    x = torch.ones(3, 4) if fire else -torch.ones(3, 4)
                    opt.zero_grad()
                    model(x).sum().backward()
                    step += 1
                report = monitor.report()
                windows.append({layer.name: (layer.caused_by, layer.exact) for layer in report})
    fired_windows = range(2, 5)
    for w in fired_windows:
        assert windows[w]["d"][0] != "u", (w, windows)  # u fired in this window: it explains nothing
    alerts = [str(m.message) for m in caught if "were dead" in str(m.message)]
    assert any("`d`" in a for a in alerts), alerts  # d is dead on its own: it is confirmed and alerts as a root


class FunctionalExperts(nn.Module):
    """``F.relu`` in a loop over experts, skipping those the data routes no token to."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 8) for _ in range(3))
        with torch.no_grad():
            self.experts[0].weight.zero_()
            self.experts[0].bias.fill_(-1e3)  # expert 0 is all dead
        self.seen: dict[int, list[Tensor]] = {}

    def forward(self, x: Tensor, route: Tensor) -> Tensor:
        total = x.new_zeros(())
        for e, expert in enumerate(self.experts):
            rows = route == e
            if not bool(rows.any()):
                continue
            h = torch.nn.functional.relu(expert(x[rows]))
            self.seen.setdefault(e, []).append(h.detach())
            total = total + h.sum()
        return total


def test_functional_relu_in_a_loop_with_skipped_experts() -> None:
    torch.manual_seed(0)
    model = FunctionalExperts()
    x = torch.randn(9, 4)
    routes = [torch.tensor([1] * 3 + [2] * 6), torch.tensor([0] * 3 + [1] * 3 + [2] * 3), torch.tensor([0] * 9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.RelumonWarning)
        with relumon.watch(model, measure_every=1, functional=True) as monitor:
            for route in routes:
                model(x, route).backward()
            report = monitor.report()
    # Sites are named in the order found: experts 1 and 2 in the first step, expert 0 (no token then) in the second.
    site_of = {1: "F.relu", 2: "F.relu.call2", 0: "F.relu.call3"}
    assert report.names == ["F.relu", "F.relu.call2", "F.relu.call3"]
    for e, name in site_of.items():
        samples, dead = _expert_truth(model.seen[e])
        assert (report[name].samples, report[name].dead_indices) == (samples, dead), e
    assert report["F.relu.call3"].all_dead and report["F.relu.call3"].samples == 12


def test_a_confirmed_expert_misses_none_of_its_calls_when_others_are_skipped() -> None:
    """Sampled steps: an expert being confirmed (measured on every call) gets all its calls, even when the data skips
    the experts before it (its call index then names another expert's site)."""
    torch.manual_seed(0)
    moe = RoutedMoE()
    with torch.no_grad():
        moe.experts[2].bias.fill_(-1e3)
        moe.experts[2].weight.zero_()
        for healthy in moe.experts[:2]:
            healthy.bias.fill_(10.0)  # never a dead unit: only expert 2 is confirmed
    x = torch.randn(12, 4)
    every = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    skip_one = torch.tensor([0] * 6 + [2] * 6)  # expert 1 gets no token: expert 2 is the second call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.RelumonWarning)
        with relumon.watch(moe, measure_every=4) as monitor:
            for i in range(8):
                moe(x, every if i % 2 == 0 else skip_one).pow(2).mean().backward()
            first = monitor.report()
            moe.seen.clear()
            for i in range(8):
                moe(x, skip_one if i % 2 == 0 else every).pow(2).mean().backward()
            second = monitor.report()
    name = next(layer.name for layer in first if layer.fed_by == "experts.2")
    assert first[name].confirming and [layer.exact for layer in second if layer.name != name] == [False, False]
    samples, dead = _expert_truth(moe.seen[2])
    assert second[name].exact and (second[name].samples, second[name].dead_units) == (samples, 8) == (40, 8)
    assert name in monitor.alerted


# --------------------------------------------------------------------------- review of issue 24: shapes no test named


class _Truth:
    """A plain forward hook on ``module``: its peak per unit along ``unit_dim`` and the rows along ``batch_dim``."""

    def __init__(self, module: nn.Module, unit_dim: int, batch_dim: int) -> None:
        self.unit_dim, self.batch_dim = unit_dim, batch_dim
        self.peak: Tensor | None = None
        self.samples = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, out: Tensor) -> None:
        peak = out.detach().amax([d for d in range(out.ndim) if d != self.unit_dim])
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.samples += out.shape[self.batch_dim]

    def figures(self) -> tuple[int, int, list[int]]:
        assert self.peak is not None
        return len(self.peak), self.samples, [int(i) for i in torch.nonzero(self.peak <= 0).flatten()]


def _kill(layer: nn.Module, units: tuple[int, ...] = (0, 3)) -> nn.Module:
    with torch.no_grad():
        for u in units:
            layer.weight[u].zero_()  # type: ignore[index, operator]
            layer.bias[u] = -1e3  # type: ignore[index, operator]
    return layer


def _train_saying(model: nn.Module, batches: list[Tensor]) -> tuple[relumon.Report, list[str]]:
    """`_train`, keeping what relumon says of the wiring (units it cannot tell, calls skipped for their shape)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1) as monitor:
            for x in batches:
                opt.zero_grad()
                model(x).float().pow(2).mean().backward()
                opt.step()
            report = monitor.report()
    wiring = ("does not tell", "skipped", "cannot tell")
    return report, [str(w.message) for w in caught if any(word in str(w.message) for word in wiring)]


class OneUnitGate(nn.Module):
    """A conv's channels times a gate of one unit from a Linear, broadcast over them: ``(B, 1)`` unsqueezed to
    ``(B, 1, 1)``, or a per-position gate ``(B, L, 1)`` squeezed and unsqueezed to ``(B, 1, L)``."""

    def __init__(self, per_position: bool) -> None:
        super().__init__()
        self.conv = _kill(nn.Conv1d(2, 8, 1))
        self.gate = nn.Linear(2, 1)
        self.per_position = per_position
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.per_position:
            g = torch.sigmoid(self.gate(x.transpose(1, 2))).squeeze(-1).unsqueeze(1)
        else:
            g = torch.sigmoid(self.gate(x.mean(2))).unsqueeze(1)
        return self.act(self.conv(x) * g)


@pytest.mark.parametrize("per_position", [False, True], ids=["per-sample", "per-position"])
def test_a_one_unit_gate_broadcast_over_the_channels_says_nothing_of_the_units(per_position: bool) -> None:
    """The gate's Linear makes one feature, broadcast over the 8 channels (or squeezed away): it was taken as a
    producer that disagrees with the conv (or merges its feature dim), so the units fell back to the time axis with a
    warning and every batch of another length was skipped."""
    torch.manual_seed(0)
    model = OneUnitGate(per_position)
    truth = _Truth(model.act, 1, 0)
    report, said = _train_saying(model, [torch.randn(3, 2, n) for n in (5, 6, 5)])
    layer = report["act"]
    assert not said
    assert (layer.units, layer.samples, layer.dead_indices) == truth.figures() == (8, 9, [0, 3])


class IndexedExperts(nn.Module):
    """Experts in one ``(E, D, H)`` parameter, picked by an index tensor (``index_select`` or ``W[tensor([e])]``);
    the data skips expert 1 on some steps."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 8) / 2)
        self.b = nn.Parameter(torch.zeros(3, 8))
        with torch.no_grad():
            self.w[1].zero_()
            self.b[1] = -1e3  # expert 1: all 8 units dead
        self.how = how
        self.act = nn.ReLU()
        self.step = 0
        self.seen: dict[int, list[Tensor]] = {}

    def forward(self, x: Tensor) -> Tensor:
        experts = [0, 2] if self.step == 1 else [0, 1, 2]
        self.step += 1
        y = x.new_zeros(x.shape[0], 8)
        for e in experts:
            ids = torch.tensor([e])
            w = self.w.index_select(0, ids)[0] if self.how == "index_select" else self.w[ids][0]
            h = self.act(x @ w + self.b[e])
            self.seen.setdefault(e, []).append(h.detach())
            y = y + h
        return y


@pytest.mark.parametrize("how", ["index_select", "index"])
def test_experts_picked_by_an_index_tensor_are_a_site_each(how: str) -> None:
    """The expert's weight is reached through ``IndexSelect``/``Index``, which keyed nothing: the three experts were
    one site of 36 samples with no dead unit, the all-dead expert averaged away."""
    torch.manual_seed(0)
    model = IndexedExperts(how)
    report, _ = _train_saying(model, [torch.randn(4, 4) for _ in range(3)])
    assert len(report) == 3
    for e, outs in model.seen.items():
        samples, dead = _expert_truth(outs)
        matching = [layer for layer in report if (layer.samples, layer.dead_indices) == (samples, dead)]
        assert matching, (e, samples, dead, [(x.name, x.samples, x.dead_indices) for x in report])
    assert any(layer.dead_indices == list(range(8)) for layer in report)


class LinearThenSeqFirst(nn.Module):
    """A Linear on the model's batch-first input, then its rows moved off dim 0 (``transpose(0, 1)`` or
    ``movedim(0, -2)``: a sequence-first block after a batch-first input), with no module that declares a layout."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = _kill(nn.Linear(4, 8))
        self.how = how
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return self.act(h.transpose(0, 1) if self.how == "transpose" else h.movedim(0, -2))


@pytest.mark.parametrize("how", ["transpose", "movedim"])
def test_rows_moved_off_dim_0_after_a_linear_on_the_input_are_counted_and_said(how: str) -> None:
    """Nothing in the graph said where the samples were, so dim 0 (the time steps) was counted: 11 samples for 6,
    silently. Now the rows are followed to the model's input, whose dim 0 is taken as the batch, and relumon says
    that it rests on that convention."""
    torch.manual_seed(0)
    model = LinearThenSeqFirst(how)
    truth = _Truth(model.act, 2, 1)
    report, said = _train_saying(model, [torch.randn(3, n, 4) for n in (6, 5)])
    layer = report["act"]
    assert (layer.units, layer.samples, layer.dead_indices) == truth.figures()
    assert layer.samples == 6
    assert any("holds the samples" in message and "batch_dim=" in message for message in said), said


def test_a_linear_on_the_input_with_rows_on_dim_0_says_nothing() -> None:
    """The convention agrees with the default: no warning for the common ``relu(linear(x))``."""
    torch.manual_seed(0)
    model = nn.Sequential(_kill(nn.Linear(4, 8)), nn.ReLU())
    truth = _Truth(model[1], 2, 0)
    report, said = _train_saying(model, [torch.randn(3, n, 4) for n in (6, 5)])
    layer = report["1"]
    assert (layer.units, layer.samples, layer.dead_indices) == truth.figures()
    assert not said


class VaryingLoop(nn.Module):
    """One ReLU object: after an input layer, then in a residual loop over one cell, run ``counts[step]`` times."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.inp = _kill(nn.Linear(4, 8))
        self.cell = nn.Linear(8, 8)
        with torch.no_grad():
            self.cell.weight.mul_(0.1)
        self.counts = counts
        self.act = nn.ReLU()
        self.step = 0
        self.seen: list[Tensor] = []  # the loop's outputs (the plain-hook ground truth)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        for _ in range(self.counts[self.step]):
            h = self.act(h + self.cell(h))
            self.seen.append(h.detach())
        self.step += 1
        return h


@pytest.mark.parametrize("counts", [[3, 3, 3, 3], [1, 3, 2, 4], [3, 1, 2, 4]], ids=["fixed", "growing", "shrinking"])
def test_a_loop_whose_count_varies_per_step_stays_one_site(counts: list[int]) -> None:
    """A call index first seen after the first step was walked past the loop's own earlier calls to the input layer's
    weights: it became a new site (``act.call3``) that counted later iterations as new samples (18 for 12), or held
    only the longest steps' last iterations (3 samples, units reported dead that fired)."""
    torch.manual_seed(0)
    model = VaryingLoop(counts)
    report, said = _train_saying(model, [torch.randn(3, 4) for _ in counts])
    assert [layer.name for layer in report] == ["act", "act.call2"], said
    loop = report["act.call2"]
    peak = torch.stack([h.amax(0) for h in model.seen]).amax(0)
    assert loop.samples == 3 * len(counts)  # a loop's iterations are the same rows
    assert loop.dead_indices == [int(i) for i in torch.nonzero(peak <= 0).flatten()]


class PackedLSTMHead(nn.Module):
    """``pack_padded_sequence``, a batch-first LSTM, ``pad_packed_sequence``, then a Linear and a ReLU head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = _kill(nn.Linear(8, 8))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        lengths = torch.tensor([x.shape[1], x.shape[1] - 1, 2])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = self.rnn(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.act(self.head(padded))


def test_a_relu_head_on_a_packed_lstm_counts_batch_rows() -> None:
    """The rows of the head's Linear reach a view whose merged dims are not the product's rows: following them to the
    input must not index a dim that is not there (an IndexError disabled the site, in the review's own first fix)."""
    torch.manual_seed(0)
    model = PackedLSTMHead()
    truth = _Truth(model.act, 2, 0)
    report, said = _train_saying(model, [torch.randn(3, n, 4) for n in (6, 5)])
    layer = report["act"]
    assert not layer.disabled
    assert (layer.units, layer.samples, layer.dead_indices) == truth.figures()
    assert not said
