"""A differential oracle for the wiring walk (issue 24): units, samples and dead units against a plain forward hook.

Every op that `relumon.wiring` walks through or stops at is one entry of an op table. An op is a transform of a
tensor whose unit dim and sample dim are known by construction: it returns the new tensor with the dims they moved to.
A producer layer (conv1d/2d/3d, Linear on 2-D to 5-D inputs, an embedding, ``W @ x + b``, ``bmm`` with the weight on
either side) makes the features, with some units killed by construction (zero weight rows and a bias of -1e3); a
chain of ops carries them to an ``nn.ReLU``. The ground truth is a plain forward hook on that ReLU that reduces over
every dim but the known unit dim and counts the known sample dim's rows.

The rule checked: with only ops the walk knows, relumon's units, samples and dead units equal the hook's, with no
warning (so no call is skipped as "another shape"); with an op it does not know (``cumsum``), relumon warns
(that the graph does not tell, or that calls of another shape are skipped), and never gives a wrong figure silently.
Hypothesis composes random chains of the table's ops; the chains that found bugs are kept as explicit cases.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import relumon

#: A tensor with its unit dim and its sample dim (None: an unbatched call, one sample).
State = tuple[Tensor, int, Optional[int]]

BATCH = 3
UNITS = 8
KILLED = [0, 3]


def _neg(dim: int, ndim: int) -> int:
    """``dim`` as a negative index."""
    return dim - ndim


def _shift(dim: Optional[int], removed: int) -> Optional[int]:
    """``dim`` after dim ``removed`` is taken out."""
    return dim - 1 if dim is not None and dim > removed else dim


def _other_dims(t: Tensor, u: int, b: Optional[int]) -> list[int]:
    """Dims that hold neither the units nor the samples."""
    return [d for d in range(t.ndim) if d != u and d != b]


# --------------------------------------------------------------------------- the op table


@dataclass(frozen=True)
class Op:
    """One op: ``apply`` returns the new state, or None where the op does not apply to this state."""

    name: str
    apply: Callable[[Tensor, int, Optional[int]], Optional[State]]
    known: bool = True


def _transpose_last_two(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 3 or b in (n - 1, n - 2):
        return None
    swap = {n - 1: n - 2, n - 2: n - 1}
    return t.transpose(-1, -2), swap.get(u, u), b


def _transpose_units_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 2 or u == n - 1 or b == n - 1:
        return None
    return t.transpose(u, -1), n - 1, b  # a positive and a negative dim


def _permute_channels_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 3 or b != 0 or u != 1:
        return None
    order = [0] + [_neg(d, n) for d in range(2, n)] + [1]  # permute(0, -2, -1, 1) on 4-D
    return t.permute(*order), n - 1, 0


def _permute_channels_first(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 3 or b != 0 or u != n - 1:
        return None
    return t.permute(0, -1, *range(1, n - 1)), 1, 0


def _flatten_tail(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 4 or u >= n - 2 or (b is not None and b >= n - 2):
        return None
    return t.flatten(-2), u, b


def _reshape_tail(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 4 or u >= n - 2 or (b is not None and b >= n - 2):
        return None
    return t.reshape(*t.shape[:-2], -1), u, b


def _unsqueeze_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.ndim >= 5:
        return None
    return t.unsqueeze(-1), u, b


def _squeeze_ones(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    ones = [d for d in _other_dims(t, u, b) if t.shape[d] == 1]
    if not ones or t.ndim <= 2:
        return None
    d = ones[-1]
    return t.squeeze(_neg(d, t.ndim)), u - (u > d), _shift(b, d)


def _cat_other(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = _other_dims(t, u, b)
    if not others:
        return None
    return torch.cat([t, t * 0.5], dim=_neg(others[-1], t.ndim)), u, b


def _cat_units(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    return torch.cat([t, t.flip(_neg(u, t.ndim))], dim=_neg(u, t.ndim)), u, b


def _stack_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.ndim >= 5:
        return None
    return torch.stack([t, t + 1.0], dim=-1), u, b


def _stack_sum(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    return torch.stack([t, 2.0 * t]).sum(0), u, b  # WaveNet's sum of skips


def _stack_mean_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.ndim >= 5:
        return None
    return torch.stack([t, t - 1.0], dim=-1).mean(-1), u, b


def _chomp(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = [d for d in _other_dims(t, u, b) if t.shape[d] > 2]
    if not others:
        return None
    d = others[-1]
    return t.narrow(d, 0, t.shape[d] - 1) if d != t.ndim - 1 else t[..., :-1], u, b


def _select_other(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = _other_dims(t, u, b)
    if t.ndim < 4 or not others:
        return None
    d = others[-1]
    return t.select(_neg(d, t.ndim), 0), u - (u > d), _shift(b, d)


def _chunk_units(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] % 2:
        return None
    return t.chunk(2, _neg(u, t.ndim))[0], u, b


def _chunk_other(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = [d for d in _other_dims(t, u, b) if t.shape[d] % 2 == 0]
    if not others:
        return None
    return t.chunk(2, others[-1])[1], u, b


def _split_units(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] < 3:
        return None
    return t.split([2, t.shape[u] - 2], dim=_neg(u, t.ndim))[1], u, b


def _unsafe_chunk_units(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] % 2:
        return None
    return t.unsafe_chunk(2, u)[0], u, b


def _glu_units(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] % 2:
        return None
    return F.glu(t, _neg(u, t.ndim)), u, b


def _add_mul(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    return (t + 0.5) * torch.sigmoid(t), u, b


def _dropout(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    return F.dropout(t, 0.1, training=True), u, b


def _batch_norm(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if u != 1 or b != 0 or t.ndim < 2:
        return None
    return F.batch_norm(t, None, None, training=True), u, b


def _instance_norm(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if u != 1 or b != 0 or t.ndim < 3 or t[0, 0].numel() < 2:
        return None
    return F.instance_norm(t), u, b


def _group_norm(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if u != 1 or b != 0 or t.ndim < 3 or t.shape[1] % 2:
        return None
    return F.group_norm(t, 2), u, b


def _layer_norm_last(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if u != t.ndim - 1:
        return None
    return F.layer_norm(t, t.shape[-1:]), u, b


def _max_pool(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if u != 1 or b != 0 or not 3 <= n <= 5 or min(t.shape[2:]) < 2:
        return None
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 3]
    return pool(t, 2), u, b


def _avg_pool(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if u != 1 or b != 0 or not 3 <= n <= 5:
        return None
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[n - 3]
    return pool(t, 1), u, b  # a mean over the spatial dims in the graph


def _cumsum(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = _other_dims(t, u, b)
    if not others:
        return None
    return t.cumsum(others[-1]), u, b


def _transpose_last_two_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 3 or b in (n - 1, n - 2):
        return None
    swap = {n - 1: n - 2, n - 2: n - 1}
    return t.transpose(n - 2, n - 1), swap.get(u, u), b


def _permute_channels_last_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    n = t.ndim
    if n < 3 or b != 0 or u != 1:
        return None
    return t.permute(0, *range(2, n), 1), n - 1, 0


def _stack_last_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.ndim >= 5:
        return None
    return torch.stack([t, t + 1.0], dim=t.ndim), u, b


def _cat_other_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = _other_dims(t, u, b)
    if not others:
        return None
    return torch.cat([t, t * 0.5], dim=others[-1]), u, b


def _select_other_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    others = _other_dims(t, u, b)
    if t.ndim < 4 or not others:
        return None
    d = others[-1]
    return t.select(d, 0), u - (u > d), _shift(b, d)


def _chunk_units_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] % 2:
        return None
    return t.chunk(2, u)[1], u, b


def _glu_units_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.shape[u] % 2:
        return None
    return F.glu(t, u), u, b


def _squeeze_ones_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    ones = [d for d in _other_dims(t, u, b) if t.shape[d] == 1]
    if not ones or t.ndim <= 2:
        return None
    d = ones[0]
    return t.squeeze(d), u - (u > d), _shift(b, d)


def _unsqueeze_positive(t: Tensor, u: int, b: Optional[int]) -> Optional[State]:
    if t.ndim >= 5:
        return None
    return t.unsqueeze(t.ndim), u, b


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("transpose(-1,-2)", _transpose_last_two),
        Op("transpose(u,-1)", _transpose_units_last),
        Op("permute channels last", _permute_channels_last),
        Op("permute channels first", _permute_channels_first),
        Op("flatten(-2)", _flatten_tail),
        Op("reshape tail", _reshape_tail),
        Op("unsqueeze(-1)", _unsqueeze_last),
        Op("squeeze", _squeeze_ones),
        Op("cat other dim", _cat_other),
        Op("cat unit dim", _cat_units),
        Op("stack(-1)", _stack_last),
        Op("stack(0).sum(0)", _stack_sum),
        Op("stack(-1).mean(-1)", _stack_mean_last),
        Op("chomp", _chomp),
        Op("select", _select_other),
        Op("chunk units", _chunk_units),
        Op("chunk other", _chunk_other),
        Op("split units", _split_units),
        Op("unsafe_chunk units", _unsafe_chunk_units),
        Op("glu", _glu_units),
        Op("add mul", _add_mul),
        Op("dropout", _dropout),
        Op("batch_norm", _batch_norm),
        Op("instance_norm", _instance_norm),
        Op("group_norm", _group_norm),
        Op("layer_norm", _layer_norm_last),
        Op("max_pool", _max_pool),
        Op("adaptive avg pool", _avg_pool),
        Op("transpose(n-2,n-1)", _transpose_last_two_positive),
        Op("permute channels last (positive dims)", _permute_channels_last_positive),
        Op("stack(ndim)", _stack_last_positive),
        Op("cat other dim (positive)", _cat_other_positive),
        Op("select (positive)", _select_other_positive),
        Op("chunk units (positive)", _chunk_units_positive),
        Op("glu (positive)", _glu_units_positive),
        Op("squeeze (positive)", _squeeze_ones_positive),
        Op("unsqueeze(ndim)", _unsqueeze_positive),
        Op("cumsum", _cumsum, known=False),
    )
}


# --------------------------------------------------------------------------- producers


def _kill_rows(weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        for u in KILLED:
            weight[u].zero_()
            bias[u] = -1e3


class LeftMatmul(nn.Module):
    """``W @ x + b``: features in the row dim of the product (dim -2), not the last dim."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.bias = nn.Parameter(torch.zeros(h, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight @ x + self.bias


class Bmm(nn.Module):
    """A batched product with the weight on the left (features in dim 1) or on the right (the last dim)."""

    def __init__(self, d: int, h: int, left: bool) -> None:
        super().__init__()
        self.left = left
        self.weight = nn.Parameter(torch.randn(h, d) / d**0.5 if left else torch.randn(d, h) / d**0.5)
        self.bias = nn.Parameter(torch.zeros(h))

    def forward(self, x: Tensor) -> Tensor:
        if self.left:
            return torch.bmm(self.weight.expand(x.shape[0], -1, -1), x) + self.bias[:, None]
        return torch.bmm(x, self.weight.expand(x.shape[0], -1, -1)) + self.bias


@dataclass(frozen=True)
class Producer:
    """A layer making ``UNITS`` features, an input maker (by length) and where the units and samples are."""

    name: str
    make: Callable[[], nn.Module]
    data: Callable[[int], Tensor]
    unit_dim: int
    batch_dim: Optional[int] = 0


def _conv(dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, UNITS, 1)
        _kill_rows(conv.weight, conv.bias)
        return conv

    return make


def _linear() -> nn.Module:
    lin = nn.Linear(4, UNITS)
    _kill_rows(lin.weight, lin.bias)
    return lin


def _embedding() -> nn.Module:
    emb = nn.Embedding(10, UNITS)
    with torch.no_grad():
        emb.weight[:, KILLED] = -1e3  # columns: the same units dead for every token
    return emb


def _left_matmul() -> nn.Module:
    layer = LeftMatmul(4, UNITS)
    _kill_rows(layer.weight, layer.bias)
    return layer


def _bmm(left: bool) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layer = Bmm(4, UNITS, left)
        with torch.no_grad():
            for u in KILLED:
                (layer.weight[u] if left else layer.weight[:, u]).zero_()
                layer.bias[u] = -1e3
        return layer

    return make


PRODUCERS: dict[str, Producer] = {
    p.name: p
    for p in (
        Producer("conv1d", _conv(1), lambda n: torch.randn(BATCH, 2, n), 1),
        Producer("conv2d", _conv(2), lambda n: torch.randn(BATCH, 2, 4, n), 1),
        Producer("conv2d height 1", _conv(2), lambda n: torch.randn(BATCH, 2, 1, n), 1),
        Producer("conv3d", _conv(3), lambda n: torch.randn(BATCH, 2, 2, 4, n), 1),
        Producer("conv1d unbatched", _conv(1), lambda n: torch.randn(2, n), 0, None),
        Producer("conv2d unbatched", _conv(2), lambda n: torch.randn(2, 4, n), 0, None),
        Producer("linear 2-D", _linear, lambda n: torch.randn(BATCH * n, 4), 1),
        Producer("linear 3-D", _linear, lambda n: torch.randn(BATCH, n, 4), 2),
        Producer("linear 4-D channels-last", _linear, lambda n: torch.randn(BATCH, 4, n, 4), 3),
        Producer("linear 5-D channels-last", _linear, lambda n: torch.randn(BATCH, 2, 4, n, 4), 4),
        Producer("embedding", _embedding, lambda n: torch.randint(0, 10, (BATCH, n)), 2),
        Producer("W @ x + b", _left_matmul, lambda n: torch.randn(BATCH, 4, n), 1),
        Producer("bmm weight left", _bmm(True), lambda n: torch.randn(BATCH, 4, n), 1),
        Producer("bmm weight right", _bmm(False), lambda n: torch.randn(BATCH, n, 4), 2),
    )
}

#: The lengths of the batches: variable, so a wrong unit dim shows as calls skipped for their shape.
LENGTHS = (6, 8, 6)


class Chain(nn.Module):
    """producer -> ops -> ReLU, with the unit and sample dims of the ReLU's input known by construction."""

    def __init__(self, producer: Producer, ops: list[Op], inplace: bool = False) -> None:
        super().__init__()
        self.producer = producer.make()
        self.spec = producer
        self.ops = ops
        self.act = nn.ReLU(inplace=inplace)
        self.dims: tuple[int, Optional[int]] = (producer.unit_dim, producer.batch_dim)

    def forward(self, x: Tensor) -> Tensor:
        t, u, b = self.producer(x), self.spec.unit_dim, self.spec.batch_dim
        for op in self.ops:
            state = op.apply(t, u, b)
            assert state is not None, op.name  # the chain was built from ops that apply
            t, u, b = state
        self.dims = (u, b)
        return self.act(t)


def build_chain(producer: Producer, wanted: list[str], inplace: bool = False) -> Chain:
    """A chain of the ``wanted`` ops that apply, in order, to every batch (ops that do not apply are left out)."""
    chain = Chain(producer, [], inplace)
    kept: list[Op] = []
    for name in wanted:
        trial = Chain.__new__(Chain)
        nn.Module.__init__(trial)
        trial.producer, trial.spec, trial.ops, trial.act = chain.producer, producer, kept + [OPS[name]], chain.act
        if all(_applies(trial, producer.data(n), inplace) for n in LENGTHS):
            kept.append(OPS[name])
    chain.ops = kept
    return chain


def _applies(chain: Chain, x: Tensor, inplace: bool = False) -> bool:
    t, u, b = chain.producer(x), chain.spec.unit_dim, chain.spec.batch_dim
    for op in chain.ops:
        state = op.apply(t, u, b)
        if state is None:
            return False
        t, u, b = state
    if inplace:
        try:  # torch forbids in-place ops on some views (one output of a chunk or split)
            F.relu(t, inplace=True)
        except RuntimeError:
            return False
    return t.ndim >= 2 and t.numel() > 0


class PlainHook:
    """The ground truth: the ReLU's units, samples and dead units, from the known unit and sample dims."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.peak: Optional[Tensor] = None
        self.samples = 0
        self.handle = chain.act.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, out: Tensor) -> None:
        u, b = self.chain.dims
        peak = out.detach().amax(dim=[d for d in range(out.ndim) if d != u])
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.samples += 1 if b is None else out.shape[b]

    def figures(self) -> tuple[int, int, list[int]]:
        assert self.peak is not None
        self.handle.remove()
        return len(self.peak), self.samples, [int(i) for i in torch.nonzero(self.peak <= 0).flatten()]


def run_oracle(producer_name: str, op_names: list[str], inplace: bool = False) -> None:
    """Train a chain under relumon and a plain hook; check relumon against the hook (with an in-place ReLU, the
    hook's output is the ReLU's output all the same)."""
    torch.manual_seed(0)
    producer = PRODUCERS[producer_name]
    chain = build_chain(producer, op_names, inplace)
    known = all(op.known for op in chain.ops)
    hook = PlainHook(chain)
    opt = torch.optim.SGD(chain.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relumon.watch(chain, measure_every=1) as monitor:
            for n in LENGTHS:
                opt.zero_grad()
                chain(producer.data(n)).float().pow(2).mean().backward()
                opt.step()
            report = monitor.report()
    said = [  # what relumon says of units and shapes (dead-layer alerts are about the figures, not the wiring)
        str(w.message)
        for w in caught
        if issubclass(w.category, relumon.RelumonWarning) and ("does not tell" in str(w.message) or "skipped" in str(w))
    ]
    units, samples, dead = hook.figures()
    layer = report["act"]
    right = (layer.units, layer.samples, layer.dead_indices) == (units, samples, dead)
    ops = [op.name for op in chain.ops]
    # Known ops must give the right figures without a word; an in-place ReLU after several views may leave a view of
    # a view whose base merges dims (an instance norm's), where the walk may only say that it cannot tell.
    if known and (not inplace or len(ops) <= 1 or not said):
        assert not said, (producer_name, ops, said)
        assert right, (producer_name, ops, (layer.units, layer.samples, layer.dead_indices), (units, samples, dead))
    else:
        assert right or said, (producer_name, ops, said)  # never a wrong figure without a warning
    if said:
        assert any("does not tell" in message for message in said), said  # the documented warning comes first


# --------------------------------------------------------------------------- the table: every op on every producer


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_each_producer_alone(producer: str) -> None:
    run_oracle(producer, [])


_TABLE = [
    (producer, op)
    for producer in PRODUCERS
    for op in OPS
    if build_chain(PRODUCERS[producer], [op]).ops  # the op applies to this producer's output
]


@pytest.mark.parametrize(("producer", "op"), _TABLE, ids=[f"{p}-{o}" for p, o in _TABLE])
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace"])
def test_op_table(producer: str, op: str, inplace: bool) -> None:
    run_oracle(producer, [op], inplace)


def test_every_op_is_in_the_table() -> None:
    """Each op applies to at least one producer, so the table exercises it."""
    assert {op for _, op in _TABLE} == set(OPS)


def test_an_unknown_op_warns_rather_than_guessing() -> None:
    """``cumsum`` over the time dim is not in the walk's tables: relumon says the graph does not tell."""
    chain = build_chain(PRODUCERS["conv2d"], ["cumsum"])
    assert [op.name for op in chain.ops] == ["cumsum"]
    with pytest.warns(relumon.RelumonWarning, match="does not tell"):
        with relumon.watch(chain, measure_every=1) as monitor:
            chain(PRODUCERS["conv2d"].data(6)).sum().backward()
            monitor.report()


# --------------------------------------------------------------------------- generated compositions

#: Chains that found bugs (kept as explicit cases).
FOUND = [
    ("conv1d", ["transpose(-1,-2)"]),  # a saved -1 read back as 2**64 - 1, wrong % 3
    ("linear 3-D", ["transpose(-1,-2)", "transpose(-1,-2)"]),
    ("conv1d", ["permute channels last"]),  # permute(0, -1, 1)
    ("conv1d", ["stack(-1)"]),
    ("W @ x + b", []),  # matmul transposes internally with negative dims
    ("bmm weight left", []),
    ("conv1d", ["chunk units"]),
    ("conv1d", ["glu"]),
    ("conv1d", ["stack(0).sum(0)"]),
    ("conv1d", ["instance_norm"]),
    ("linear 3-D", ["chunk units"]),  # channels-last ReGLU
    ("conv1d unbatched", ["transpose(u,-1)"]),  # an unbatched call counted its time steps as samples
]


@pytest.mark.parametrize(("producer", "ops"), FOUND, ids=[f"{p}-{'-'.join(o)}" for p, o in FOUND])
def test_chains_that_found_bugs(producer: str, ops: list[str]) -> None:
    run_oracle(producer, ops)


def test_an_inplace_relu_on_a_permuted_view() -> None:
    """ConvNeXt's ``permute`` then ``ReLU(inplace=True)``: the graph shows an as_strided view of the conv output."""
    run_oracle("conv2d", ["permute channels last"], inplace=True)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)  # deterministic, writes nothing
@given(
    producer=st.sampled_from(sorted(PRODUCERS)),
    ops=st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=4),
    inplace=st.booleans(),
)
@example(producer="conv2d", ops=["permute channels last", "transpose(-1,-2)", "layer_norm"], inplace=False)
@example(
    producer="linear 4-D channels-last", ops=["permute channels first", "instance_norm", "chunk units"], inplace=False
)
@example(producer="conv2d", ops=["permute channels last"], inplace=True)  # ConvNeXt: an as_strided view in the graph
@example(producer="conv2d", ops=["glu", "glu", "glu", "flatten(-2)"], inplace=False)  # one unit: a size-1 unit dim
@example(producer="conv1d unbatched", ops=["cumsum", "transpose(u,-1)"], inplace=False)  # unknown op on 2-D: warned
@example(producer="W @ x + b", ops=["permute channels last", "add mul", "chomp"], inplace=True)  # base not contiguous
@example(producer="W @ x + b", ops=["instance_norm", "chomp"], inplace=True)  # a view of a view: warned, not wrong
def test_random_chains_match_a_plain_hook(producer: str, ops: list[str], inplace: bool) -> None:
    run_oracle(producer, ops, inplace)
