"""The story of ReLU, measured by relumon on synthetic data (CPU, seconds).

1. Vanishing gradients: a deep sigmoid MLP and a deep tanh MLP against the same MLP with ReLU. The gradient that
   reaches the first layers shrinks layer after layer with sigmoid, whose derivative is at most 1/4.
2. The dying ReLU: at too high a learning rate ReLU units die (their output is 0 for every input, so they never get
   a gradient again) and relumon's DeadUnitsWarning fires. The same run with LeakyReLU, max(αx, x), keeps learning.
3. Skip connections: a deep plain stack of Linear-ReLU-Linear blocks against the same stack with residual
   connections, x + f(x), which give the gradient a path around every block.

Each run is written to TensorBoard under runs/relu_story/, with the gradient-flow chart and the dead-unit heatmap.
Each run starts clean: the script first removes its own run directories (runs/relu_story/1_vanishing/ReLU...), so a
second run replaces the first rather than adding a second event file to the same run. Nothing else is touched.

    python examples/relu_story.py
    tensorboard --logdir runs/relu_story
    relumon summary runs/relu_story
"""

from __future__ import annotations

import argparse
import math
import shutil
import textwrap
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import relumon

WATCHED = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


def regression_data(n: int = 2048, features: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.sin(x @ torch.randn(features, 1, generator=gen)) + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def mlp(act: Callable[[], nn.Module], depth: int, width: int = 64, features: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(features, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class Block(nn.Module):
    """Linear -> ReLU -> Linear, with or without the skip connection x + f(x) around it."""

    def __init__(self, width: int, skip: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x)))
        return x + out if self.skip else out


def stack(depth: int, skip: bool, width: int = 64, features: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, width), *[Block(width, skip) for _ in range(depth)], nn.Linear(width, 1))


def train(
    model: nn.Module,
    logdir: Path,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    clip: Optional[float] = None,
    log_every: int = 25,
) -> tuple[relumon.Report, list[warnings.WarningMessage]]:
    """Train on the synthetic task; log relumon's scalars and pictures; return the last report and relumon's alerts."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    x, y = regression_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shutil.rmtree(logdir, ignore_errors=True)  # this run's own directory: a re-run replaces it (see the docstring)
    writer = SummaryWriter(str(logdir))
    with warnings.catch_warnings(record=True) as alerts:
        warnings.simplefilter("always", relumon.DeadUnitsWarning)
        with relumon.watch(model, types=WATCHED, measure_every=1) as monitor:
            for step in range(1, steps + 1):
                idx = torch.randint(0, len(x), (64,))
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                if step % log_every == 0 or step == steps:
                    monitor.log(writer, step)
            monitor.log_figures(writer, steps)
    writer.close()
    assert monitor.last_report is not None
    return monitor.last_report, [a for a in alerts if issubclass(a.category, relumon.DeadUnitsWarning)]


def fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2e}"


def compare(
    title: str,
    reports: dict[str, relumon.Report],
    column: str,
    value: Callable[[relumon.LayerReport], str],
    every: int = 1,
) -> None:
    names = list(reports)
    print(f"\n{title}")
    print(f"  {'layer':<6}" + "".join(f"{name + ' ' + column:>28}" for name in names))
    rows = max(len(r) for r in reports.values())
    for i in range(0, rows, every):
        cells = "".join(f"{value(reports[name].layers[i]) if i < len(reports[name]) else '-':>28}" for name in names)
        print(f"  {i + 1:<6}{cells}")


def first_last_ratio(report: relumon.Report) -> float:
    first, last = report.layers[0].grad_norm, report.layers[-1].grad_norm
    return first / last if last > 0 else math.nan


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, relumon.Report]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, default=Path("runs") / "relu_story")
    parser.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    results: dict[str, dict[str, relumon.Report]] = {}

    print("=" * 100)
    print("1. Vanishing gradients: a 10-layer MLP with sigmoid, tanh and ReLU (SGD, lr 0.01)")
    part: dict[str, relumon.Report] = {}
    for name, act in (("Sigmoid", nn.Sigmoid), ("Tanh", nn.Tanh), ("ReLU", nn.ReLU)):
        torch.manual_seed(0)
        part[name], _ = train(
            mlp(act, depth=10), args.logdir / "1_vanishing" / name, steps=int(100 * scale) or 5, lr=0.01
        )
    compare(
        "   mean gradient norm at each activation's output, first layer at the top:",
        part,
        "grad",
        lambda layer: fmt(layer.grad_norm),
    )
    for name, report in part.items():
        print(f"   {name:<8} first layer / last layer gradient: {first_last_ratio(report):.1e}")
    results["vanishing"] = part

    print("=" * 100)
    print("2. The dying ReLU: a 3-layer MLP at too high a learning rate (SGD, lr 1.0, momentum 0.9;")
    print("   gradients clipped at norm 1, so that neither run diverges)")
    part, alerts_by_run = {}, {}
    for name, act in (("ReLU", nn.ReLU), ("LeakyReLU", nn.LeakyReLU)):
        torch.manual_seed(0)
        part[name], alerts_by_run[name] = train(
            mlp(act, depth=3, width=128),
            args.logdir / "2_dying" / name,
            steps=int(300 * scale) or 25,
            lr=1.0,
            momentum=0.9,
            clip=1.0,
        )
    for name, alerts in alerts_by_run.items():
        for alert in alerts:
            text = textwrap.fill(f"{name}: DeadUnitsWarning: {alert.message}", width=100, subsequent_indent="      ")
            print(textwrap.indent(text, "   "))
        if not alerts:
            print(f"   {name}: no layer died entirely.")
    compare(
        "   dead units (LeakyReLU: stuck in the negative regime) and gradient norm in the last window:",
        part,
        "dead % | grad",
        lambda layer: f"{100 * layer.dead_fraction:5.1f}% | {fmt(layer.grad_norm)}",
    )
    results["dying"] = part

    print("=" * 100)
    print("3. Skip connections: 20 blocks (Linear, ReLU, Linear) without and with x + f(x) (SGD, lr 0.001)")
    part = {}
    for name, skip in (("plain", False), ("residual", True)):
        torch.manual_seed(0)
        part[name], _ = train(
            stack(depth=20, skip=skip), args.logdir / "3_skip" / name, steps=int(100 * scale) or 5, lr=0.001
        )
    compare(
        "   gradient norm at every 4th block's ReLU output, first block at the top:",
        part,
        "grad",
        lambda layer: fmt(layer.grad_norm),
        every=4,
    )
    for name, report in part.items():
        print(
            f"   {name:<9} first block / last block gradient: {first_last_ratio(report):.1e}, "
            f"dead units overall {100 * report.dead_fraction:.1f}%"
        )
    results["skip"] = part

    print("=" * 100)
    print("Next:")
    print(f"   tensorboard --logdir {args.logdir}     # scalars, the relumon chart layout and pictures")
    print(f"   relumon summary {args.logdir}          # the same, as tables")
    return results


if __name__ == "__main__":
    main()
