"""Hostile review of the certificates (issue 30): wirings where a certified unit could fire again.

Each case builds a unit that closes by the weights (a zero scale, a non-positive row after a ReLU) but that something
the proof did not see opens. Ground truth is independent: a plain forward hook on the ReLU sees the unit fire on the
very inputs the certificate would cover. Training uses ``lr=0`` and ``zero_grad()`` after each step, so neither the
weights nor a kept gradient give the flaw away: only the wiring can.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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
