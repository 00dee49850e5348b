"""The dying-ReLU problem in Lightning, and what LeakyReLU does and does not change, watched by ReluMonitor.

The same MLP is trained twice on synthetic data with a learning rate that is too high (SGD at 1.0): once with ReLU
and once with LeakyReLU. ReluMonitor logs dead units and gradient flow to TensorBoard and warns when a whole layer
dies. At the end the script prints a comparison of the two runs and what it shows: the high learning rate pushes
most of the last hidden layer below zero with either activation (all of it with ReLU, about 94 % with LeakyReLU).
LeakyReLU does not prevent that, but its stuck units still pass alpha * gradient, so the gradient keeps reaching the
first layer, where ReLU's is 0. The cause is the learning rate.

    python examples/lightning_dying_relu.py             # lr 1.0: ReLU loses a layer, LeakyReLU about 94 % of one
    tensorboard --logdir runs/lightning_dying_relu

Each run starts clean: the script first removes its own run directories (runs/lightning_dying_relu/ReLU/lr1...), so
a re-run replaces them rather than adding a second event file to each run. Nothing else is touched.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older package name works too
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

import relumon
from relumon.lightning import ReluMonitor


class Regressor(pl.LightningModule):
    def __init__(self, act: type[nn.Module], lr: float, features: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, 1),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_loader(n: int = 4096, features: int = 32, batch_size: int = 64) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    y = torch.sin(x @ torch.randn(features, 1, generator=gen)) + 0.1 * torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


def train(act: type[nn.Module], lr: float, epochs: int, logdir: Path) -> relumon.Report:
    pl.seed_everything(0, verbose=False)
    shutil.rmtree(
        logdir / act.__name__ / f"lr{lr:g}", ignore_errors=True
    )  # this run's own directory: a re-run replaces it
    monitor = ReluMonitor(log_every_n_steps=16)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[monitor],
        logger=TensorBoardLogger(str(logdir), name=act.__name__, version=f"lr{lr:g}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(act, lr), make_loader())
    assert monitor.last_report is not None
    return monitor.last_report


def main(argv: list[str] | None = None) -> dict[str, relumon.Report]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default 1.0: too high for ReLU)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--logdir", type=Path, default=Path("runs") / "lightning_dying_relu")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    reports = {}
    for act in (nn.ReLU, nn.LeakyReLU):
        print(f"--- training with {act.__name__} at lr={args.lr:g}")
        reports[act.__name__] = train(act, args.lr, args.epochs, args.logdir)
        print(reports[act.__name__])
        print()

    print("Comparison at the end of training (last window):")
    columns = [(name, what) for name in reports for what in ("dead %", "grad norm")]
    print(f"{'layer':<8}" + "".join(f"{name + ' ' + what:>22}" for name, what in columns))
    for layer_name in reports["ReLU"].names:
        cells = ""
        for name in reports:
            layer = reports[name][layer_name]
            cells += f"{100 * layer.dead_fraction:>21.1f}%{layer.grad_norm:>22.2e}"
        print(f"{layer_name:<8}{cells}")
    relu, leaky = reports["ReLU"], reports["LeakyReLU"]
    worst = max(leaky, key=lambda layer: layer.dead_fraction)
    print(
        f"\nReLU: {len(relu.dead_layers)} layer(s) with every unit dead, and the first layer's gradient norm is "
        f"{relu.layers[0].grad_norm:.2e}: the layers below a dead layer get no gradient and stop learning.\n"
        f"LeakyReLU: {100 * worst.dead_fraction:.0f}% of `{worst.name}` is stuck in the negative regime, so it did "
        "not escape the learning rate either. But stuck units still pass alpha * gradient: the first layer's "
        f"gradient norm is {leaky.layers[0].grad_norm:.2e}, and every layer keeps learning.\n"
        "The cause is the learning rate: try --lr 0.01."
    )
    print(f"\nView both runs:  tensorboard --logdir {args.logdir}")
    return reports


if __name__ == "__main__":
    main()
