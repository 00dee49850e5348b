"""Proof of death on scikit-learn's digits: how many dead units a window flags, how many a certificate proves.

    PYTHONPATH=. python examples/proof_of_death.py          # seeded; about 10 s on one CPU core

An MLP 64-128-BN1d-ReLU-128-BN1d-ReLU-10 trained into dying (SGD at lr 2, no decay, batch 16, 15 epochs), watched with
``certify=True`` over the last epoch. Then: the certified units are switched off (their outgoing columns zeroed)
and the outputs on the held-out digits compared, in training-mode BatchNorm (batches of 16, the certified shape) and
in eval mode; and a small conv net shows what the BatchNorm bound proves when M = N*H*W is large.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import relumon

CONV_LR = 8.0


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits scaled to [0, 1]: 1,400 to train on, the other 397 held out."""
    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float32) / 16.0
    yt = torch.tensor(y)
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    xt, yt = xt[perm], yt[perm]
    return xt[:1400], yt[:1400], xt[1400:], yt[1400:]


def mlp() -> nn.Sequential:
    """64-128-BN1d-ReLU-128-BN1d-ReLU-10."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    model.train()
    order = torch.randperm(len(x))
    for i in range(0, len(x) - batch + 1, batch):  # full batches only: every batch has the certified shape
        idx = order[i : i + batch]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def switched_off(model: nn.Sequential, readers: dict[str, int], report: relumon.Report) -> nn.Sequential:
    """A copy with the certified units' outgoing columns zeroed in the Linear that reads each site."""
    off = copy.deepcopy(model)
    with torch.no_grad():
        for layer in report:
            if layer.certified is not None and len(layer.certified):
                reader = off[readers[layer.name]]
                assert isinstance(reader, nn.Linear)
                reader.weight[:, layer.certified.indices] = 0
    return off


def outputs(model: nn.Module, x: torch.Tensor, train_mode: bool, batch: int) -> torch.Tensor:
    """The model's outputs on ``x``; in training mode in batches of ``batch`` (running statistics left alone)."""
    model = copy.deepcopy(model)
    model.train(train_mode)
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)])


def conv_case() -> relumon.Report:
    """Conv-BN2d-ReLU on 8x8 digits: M = N*H*W = 16*8*8 = 1024, so the bound needs shift <= -32 |scale|."""
    torch.manual_seed(0)
    x, y, _, _ = digits()
    images = x.view(-1, 1, 8, 8)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=CONV_LR)
    for _ in range(3):
        epoch(net, opt, images, y, 16)
    monitor = relumon.watch(net, certify=True, optimizer=opt, measure_every=1, on_dead=lambda report: None)
    epoch(net, opt, images, y, 16)
    report = monitor.report()
    monitor.remove()
    for name in ("2", "5"):
        layer = report[name]
        cert = layer.certified
        assert cert is not None and cert.values_per_channel is not None
        bn = net[int(name) - 1]
        ratio = (bn.bias / bn.weight.abs()).detach()
        need = -((cert.values_per_channel - 1) ** 0.5)
        print(
            f"conv site {name}: {layer.dead_units} of {layer.units} dead over the epoch, {len(cert)} proven; "
            f"M = N*H*W = {cert.values_per_channel}, so the bound needs shift/|scale| <= {need:.1f}; "
            f"the most negative channel has {float(ratio.min()):.1f}"
        )
    return report


def main() -> dict[str, Any]:
    """Train, certify, switch off, print; returns the reports and the comparisons (for tests)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    x, y, x_held, y_held = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(14):
        epoch(model, opt, x, y, 16)
    # The last epoch, watched: every step measured, certificates at the report.
    monitor = relumon.watch(model, certify=True, optimizer=opt, measure_every=1, on_dead=lambda report: None)
    epoch(model, opt, x, y, 16)
    report = monitor.report()
    monitor.remove()
    print(report)
    print()
    print(f"{'site':<6}{'units':>7}{'dead (window)':>15}{'proven':>8}   proofs")
    for layer in report:
        cert = layer.certified
        assert cert is not None
        kinds: dict[str, int] = {}
        for proof in cert.units.values():
            kinds[proof.kind] = kinds.get(proof.kind, 0) + 1
        assert set(cert.indices) <= set(layer.dead_indices), "a certified unit fired in the window"
        print(f"{layer.name:<6}{layer.units:>7}{layer.dead_units:>15}{len(cert):>8}   {kinds or '-'}")
    readers = {"2": 3, "5": 6}
    off = switched_off(model, readers, report)
    same_train = torch.equal(outputs(model, x_held, True, 16), outputs(off, x_held, True, 16))
    same_eval = torch.equal(outputs(model, x_held, False, 397), outputs(off, x_held, False, 397))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_held).argmax(1) == y_held).float().mean())
    print(
        f"\nheld-out digits (397): accuracy {accuracy:.3f}; certified units switched off: outputs identical in "
        f"training-mode BatchNorm (batches of 16): {same_train}; in eval mode (running statistics): {same_eval}"
    )
    conv = conv_case()
    print(f"\nrun time {time.perf_counter() - start:.1f} s")
    return {"mlp": report, "same_train": same_train, "same_eval": same_eval, "accuracy": accuracy, "conv": conv}


if __name__ == "__main__":
    main()
