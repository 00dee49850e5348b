"""A plain PyTorch training loop watched by relumon.

A small MLP learns a synthetic regression task. With ``--lr 1.0`` (the default) SGD takes steps that are too big:
the hidden ReLU units are pushed into the region where they output 0 for every input, relumon's DeadUnitsWarning
fires, and the loss stops improving. Run it again with ``--lr 0.01`` to see a healthy network.

    python examples/plain_torch.py                 # too high a learning rate: layers die
    python examples/plain_torch.py --lr 0.01       # healthy
    tensorboard --logdir runs                      # look at relumon/dead_fraction/* and relumon/grad_norm/*

Each run starts clean: it first removes its own run directory (runs/plain_torch/lr1 for ``--lr 1.0``), so a re-run
replaces the run rather than adding a second event file to it. Other runs are left alone.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

import relumon


def make_data(n: int = 4096, features: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, 1, generator=gen)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def make_model(features: int = 32, hidden: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def main(argv: list[str] | None = None) -> relumon.Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default 1.0: too high)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--logdir", type=Path, default=Path("runs") / "plain_torch")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.MSELoss()

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: report to the terminal only
        writer = None
    else:
        run_dir = args.logdir / f"lr{args.lr:g}"
        shutil.rmtree(run_dir, ignore_errors=True)  # this run's own directory: a re-run replaces it
        writer = SummaryWriter(str(run_dir))

    warnings.simplefilter("always", relumon.DeadUnitsWarning)
    with relumon.watch(model, optimizer=opt) as monitor:  # the optimizer: alerts say the lr and the update size
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(x), (args.batch_size,))
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.log_every == 0:
                report = monitor.log(writer, step) if writer is not None else monitor.report()
                print(f"step {step:4d}  loss {loss.item():8.4f}  dead units {100 * report.dead_fraction:5.1f}%")
    if writer is not None:
        writer.close()
    print()
    print(report)
    if writer is not None:
        print(f"\nTensorBoard logs: {args.logdir}.  View them with:  tensorboard --logdir {args.logdir.parent}")
    return report


if __name__ == "__main__":
    main()
