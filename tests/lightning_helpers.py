"""A BoringModel-style LightningModule for either namespace, with a forced-dead layer when asked."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def import_namespace(name: str) -> ModuleType:
    import pytest

    return pytest.importorskip(name)


def boring_module(pl: ModuleType, *, dead_fc2: bool = False, act: type[nn.Module] = nn.ReLU, lr: float = 0.0) -> Any:
    """fc1(8->16) -> act1 -> fc2(16->12) -> act2 -> head. ``lr=0`` keeps forced weights exactly as set."""

    class Boring(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 12), act(), nn.Linear(12, 1))
            if dead_fc2:
                with torch.no_grad():
                    self.net[2].bias.fill_(-1e3)
            self.val_forwards = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).pow(2).mean()  # a submodule, not self(x): relumon must cope

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            (x,) = batch
            self.val_forwards += 1
            self.log("val_loss", self.net(x).pow(2).mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Boring()


def loader(batches: int = 12, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(batches * batch_size, 8, generator=gen)), batch_size=batch_size)


def trainer(pl: ModuleType, callbacks: list[Any], **kwargs: Any) -> Any:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)
