"""Hostile review of the certificates (issue 30): wirings where a certified unit could fire again.

Each case builds a unit that closes by the weights (a zero scale, a non-positive row after a ReLU) but that something
the proof did not see opens. Ground truth is independent: a plain forward hook on the ReLU sees the unit fire on the
very inputs the certificate would cover. Training uses ``lr=0`` and ``zero_grad()`` after each step, so neither the
weights nor a kept gradient give the flaw away: only the wiring can.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relumon
from relumon.proof import Certification

QUIET = {"on_dead": lambda report: None, "measure_every": 1}


def _loss(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).pow(2).mean()


def certify_and_fire(
    model: nn.Module,
    site: str,
    lr: float = 0.0,
    loss_fn: Callable[[Any], torch.Tensor] = _loss,
    steps: int = 3,
    more: int = 10,
) -> tuple[Certification, set[int]]:
    """Certify ``site`` after a few steps, then train on and return which units fired (plain forward hook)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)

    def step() -> None:
        loss_fn(model(torch.randn(16, 8))).backward()
        opt.step()
        opt.zero_grad()  # set_to_none: no gradient is left for the report to see

    for _ in range(steps):
        step()
    certification = monitor.report()[site].certified
    monitor.remove()
    assert certification is not None
    fired: set[int] = set()
    relu = dict(model.named_modules())[site]

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        fired.update(int(u) for u in (out.reshape(out.shape[0], out.shape[1], -1).amax((0, 2)) > 0).nonzero().flatten())

    handle = relu.register_forward_hook(hook)
    for _ in range(more):
        step()
    handle.remove()
    return certification, fired


def _zero_scale(bn: nn.Module, shift: float = -0.1) -> None:
    with torch.no_grad():
        bn.weight[0] = 0.0  # type: ignore[index]
        bn.bias[0] = shift  # type: ignore[index]


def test_alpha_dropout_between_batchnorm_and_relu_stops_the_proof() -> None:
    # AlphaDropout maps x to a * x + b (b > 0) in training mode: the shift -0.1 comes out positive.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.AlphaDropout(0.5), nn.ReLU(), nn.Linear(4, 2))
    _zero_scale(model[1])
    certification, fired = certify_and_fire(model, "3")
    assert 0 in fired  # ground truth: the unit opens
    assert 0 not in certification.units
    assert certification.why_not is not None and "AlphaDropout" in certification.why_not
    # Plain Dropout keeps the sign: the same model with it is certified, and the unit stays closed.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2))
    _zero_scale(model[1])
    certification, fired = certify_and_fire(model, "3")
    assert certification.units[0].kind == "zero-scale" and 0 not in fired


class Fn(nn.Module):
    """A module around a function (the function's graph nodes are what the proof reads)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _after_relu(middle: nn.Module) -> nn.Sequential:
    """Linear-ReLU-middle-Linear-ReLU with unit 0 of the second site non-positive (a bias -0.1)."""
    torch.manual_seed(1)
    width = 6 if isinstance(middle, Fn) and getattr(middle, "wide", False) else 4
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), middle, nn.Linear(width, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[3].weight[0] = -model[3].weight[0].abs() - 0.1
        model[3].bias[0] = -0.1
    return model


def _cat_constant(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, -torch.ones(x.shape[0], 2)], 1)


def _slice_scatter_constant(x: torch.Tensor) -> torch.Tensor:
    return torch.slice_scatter(x, -5 * torch.ones(x.shape[0], 2), dim=1, start=0, end=2)


def test_nonnegative_input_is_not_taken_through_ops_that_can_go_negative() -> None:
    # A prefix match took `Tan` and `Threshold` for the transpose `T`; a constant operand (no grad) was not looked at.
    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "threshold": lambda x: F.threshold(x, 0.5, -10.0),
        "tan": lambda x: torch.tan(3 * x),
        "cat with a negative constant": _cat_constant,
        "slice_scatter of a negative constant": _slice_scatter_constant,
        "avg_pool with a negative divisor": lambda x: F.avg_pool2d(x[:, None, None], 1, divisor_override=-1)[:, 0, 0],
    }
    for name, fn in cases.items():
        middle = Fn(fn)
        middle.wide = name.startswith("cat")  # type: ignore[assignment]
        certification, fired = certify_and_fire(_after_relu(middle), "4")
        assert 0 in fired, name  # ground truth: the input went negative and the non-positive row opened the unit
        assert 0 not in certification.units, name
    # The sign-keeping ops still prove it, and the unit stays closed.
    for name, fn in {
        "max pool": lambda x: F.max_pool1d(x.unsqueeze(1), 1).squeeze(1),
        "avg pool": lambda x: F.avg_pool2d(x[:, None, None], 1)[:, 0, 0],
        "view": lambda x: x.view(-1, 4),
    }.items():
        certification, fired = certify_and_fire(_after_relu(Fn(fn)), "4")
        assert certification.units[0].kind == "nonnegative-input", name
        assert 0 not in fired, name


def test_a_forward_hook_that_changes_the_batchnorm_output_stops_the_proof() -> None:
    # A hook registered before `watch` returns output + 1: the graph node the ReLU reads is the hook's add, which
    # the probe credited to the BatchNorm call.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    _zero_scale(model[1])
    model[1].register_forward_hook(lambda module, args, out: out + 1.0)
    certification, fired = certify_and_fire(model, "2")
    assert 0 in fired
    assert 0 not in certification.units
    assert certification.why_not is not None and "forward hook" in certification.why_not
    # A hook that only reads (returns None) changes nothing: certified, and closed.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    _zero_scale(model[1])
    model[1].register_forward_hook(lambda module, args, out: None)
    certification, fired = certify_and_fire(model, "2")
    assert certification.units[0].kind == "zero-scale" and 0 not in fired


class IdentityAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.same = nn.Identity()
        self.act = nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.same(self.fc(x) + 1.0)))


@pytest.mark.timeout(60)
def test_an_identity_after_an_operation_outside_modules_does_not_hang_the_report() -> None:
    # The Identity returned its input as is, so it "owned" the add's node and the walk went round forever.
    model = IdentityAfterAdd()
    certification, _ = certify_and_fire(model, "act", steps=1, more=0)
    assert not certification.units
    assert certification.why_not is not None and "sum" in certification.why_not


class ReturnsTheBatchNormOutput(nn.Module):
    """Returns the BatchNorm's output beside the logits (a second consumer outside any module call)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()
        self.out = nn.Linear(4, 2)
        self.tied = tied

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.fc(x))
        aux = F.linear(x, self.bn.weight.unsqueeze(1).expand(4, 8)) if self.tied else h
        return self.out(self.act(h)), aux


def _aux_loss(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return out[0].pow(2).mean() - out[1][:, 0].mean() - 0.1 * out[1][:, 0].abs().mean()


def test_a_second_consumer_returned_beside_the_logits_is_seen() -> None:
    for tied in (False, True):
        model = ReturnsTheBatchNormOutput(tied)
        _zero_scale(model.bn)
        certification, fired = certify_and_fire(model, "act", lr=0.01, loss_fn=_aux_loss, more=30)
        assert 0 in fired, tied  # the loss on the returned tensor lifts the shift (or the scale) until it fires
        assert 0 not in certification.units, tied
        reasons = [certification.why_not or "", *certification.refused.values()]
        assert any("returned by the model" in r or "read by 2 nodes" in r for r in reasons), (tied, reasons)


class ShiftedReLU(nn.ReLU):
    """An nn.ReLU whose forward is not ReLU's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + 1.0)


def test_an_activation_that_is_not_plain_relu_gets_no_certificate() -> None:
    # A subclass overriding forward, and a forward hook that changes a ReLU's output, both open the unit.
    subclass = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), ShiftedReLU(), nn.Linear(4, 2))
    hooked = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    hooked[2].register_forward_hook(lambda module, args, out: out + 1.0)
    for model, why in ((subclass, "overrides the forward"), (hooked, "forward hook")):
        _zero_scale(model[1])
        certification, fired = certify_and_fire(model, "2")
        assert 0 in fired, why
        assert 0 not in certification.units, why
        assert certification.why_not is not None and why in certification.why_not
    # nn.ReLU6 (a Hardtanh) is still certified.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU6(inplace=True), nn.Linear(4, 2))
    _zero_scale(model[1])
    certification, fired = certify_and_fire(model, "2")
    assert certification.units[0].kind == "zero-scale" and 0 not in fired


def test_a_frozen_parameter_with_momentum_left_in_its_optimizer_is_refused() -> None:
    # The BatchNorm is frozen at the report but its optimizer still holds a velocity for it: unfrozen, the shift
    # rises past 0 with no gradient at all.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    opt.state[model[1].bias]["momentum_buffer"][0] = -5.0  # a velocity that lifts the shift
    _zero_scale(model[1])
    model[1].requires_grad_(False)
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)
    step()
    certification = monitor.report()["2"].certified
    monitor.remove()
    assert certification is not None and 0 not in certification.units
    assert "momentum left" in certification.refused[0]
    model[1].requires_grad_(True)  # ground truth: unfrozen, the unit opens
    fired: set[int] = set()
    model[2].register_forward_hook(
        lambda module, args, out: fired.update((out.amax(0) > 0).nonzero().flatten().tolist())
    )
    for _ in range(5):
        step()
    assert 0 in fired
    # Frozen and held by no optimizer: nothing can move it, and it is certified.
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    _zero_scale(model[1])
    model[1].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)
    model(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()
    certification = monitor.report()["2"].certified
    monitor.remove()
    assert certification is not None and certification.units[0].kind == "zero-scale"


class Adam(torch.optim.Optimizer):
    """Another library's optimizer named Adam: its momentum lives in ``state["m"]``, where relumon does not look."""

    def __init__(self, params: Any, lr: float = 0.01, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["beta"]).add_(p.grad)
                p.add_(m, alpha=-group["lr"])


def test_an_optimizer_that_only_shares_a_name_with_the_allow_list_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    opt = Adam(model.parameters())

    def step() -> None:
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    opt.state[model[1].bias]["m"][0] = -3.0  # a velocity that lifts the shift
    _zero_scale(model[1])
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)
    step()
    certification = monitor.report()["2"].certified
    monitor.remove()
    assert certification is not None and 0 not in certification.units
    assert any("not torch.optim.Adam itself" in r for r in certification.refused.values())
    fired: set[int] = set()
    model[2].register_forward_hook(
        lambda module, args, out: fired.update((out.amax(0) > 0).nonzero().flatten().tolist())
    )
    for _ in range(40):
        step()
    assert 0 in fired  # ground truth: its momentum carried the shift past 0


class StdConv2d(nn.Conv2d):
    """Weight standardisation as timm writes it (the weight read once, through a batch norm of its rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_producer_subclass_with_its_own_forward_gets_no_certificate() -> None:
    # Row 0 is all <= 0 after a ReLU, but the standardised row the convolution uses has both signs: it fires.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), StdConv2d(4, 5, 3), nn.ReLU(), Fn(lambda x: x.mean((2, 3))), nn.Linear(5, 2)
    )
    with torch.no_grad():
        model[2].weight[0] = -torch.rand_like(model[2].weight[0])
        model[2].bias[0] = -0.1
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)
    model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    certification = monitor.report()["3"].certified
    monitor.remove()
    assert certification is not None and 0 not in certification.units
    assert certification.why_not is not None and "overrides the forward" in certification.why_not
    with torch.no_grad():  # ground truth
        assert (model[:4](torch.randn(4, 3, 8, 8))[:, 0] > 0).any()


def test_a_relu6_with_a_moved_floor_is_not_a_closing_activation() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU6(), nn.Linear(4, 2))
    model[2].min_val = 0.5  # clamps to [0.5, 6]: every output is > 0
    _zero_scale(model[1])
    certification, fired = certify_and_fire(model, "2")
    assert 0 in fired and 0 not in certification.units
    assert certification.why_not is not None and "clamps to [0.5, 6]" in certification.why_not


def test_a_hook_that_thresholds_the_relu_output_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[2].register_forward_hook(lambda module, args, out: F.threshold(out, 0.5, 3.0))  # 0 becomes 3
    _zero_scale(model[1])
    certification, fired = certify_and_fire(model, "2")
    assert 0 in fired and 0 not in certification.units
    assert certification.why_not is not None and "ThresholdBackward" in certification.why_not
