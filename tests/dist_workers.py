"""Worker functions for the 2-process gloo tests. They live at module level so that spawn can pickle them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset


def split_model() -> nn.Sequential:
    """Linear(2 -> 3) + ReLU: unit 0 fires iff x0 > 0, unit 1 always, unit 2 never."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 1.0, -1e3]))
    return model


def rank_inputs(rank: int, batch: int = 4) -> torch.Tensor:
    """Rank 1's data has x0 > 0 (unit 0 fires); rank 0's has x0 < 0 (unit 0 silent there)."""
    x = torch.rand(batch, 2) + 0.1
    x[:, 0] *= 1.0 if rank == 1 else -1.0
    return x


def plain_worker(
    rank: int, world_size: int, port: int, out_dir: str, on_dead: str, kill_all: bool, extra_branch_on: int = -1
) -> None:
    import relumon

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = split_model()
        if kill_all:
            with torch.no_grad():
                model[0].bias.fill_(-1e3)
        result: dict[str, Any] = {}
        with relumon.watch(model, on_dead=on_dead, measure_every=1) as monitor:
            for _ in range(3):
                x = rank_inputs(rank)
                if rank == extra_branch_on:  # a call site the other rank never has
                    x = model[1](x) + 0.0
                model(x).sum().backward()
            try:
                local = monitor.report(reset=False)  # peeks, yet reduces: all ranks must call it
                result["peek"] = local.to_dict()
                report = monitor.report()
                result["report"] = report.to_dict()
            except relumon.RelumonError as err:
                result["error"] = str(err)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class StochasticDepth(nn.Module):
    """Residual blocks ``a`` and ``b`` (``b`` dead: bias -1e3) and ``c``, which only rank 1 ever runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
        self.c = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        with torch.no_grad():
            self.b[0].bias.fill_(-1e3)
        self.skip: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("a", "b", "c"):
            if name not in self.skip:
                x = x + getattr(self, name)(x)
        return x


def depth_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 0 skips block ``a`` on step 0, rank 1 skips ``b``: the ranks discover the sites in different orders."""
    import relumon

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = StochasticDepth()
        result: dict[str, Any] = {}
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            for step in range(3):
                model.skip = {"a" if rank == 0 else "b"} if step == 0 else set()
                if rank == 0:
                    model.skip.add("c")
                model(torch.randn(5, 4)).sum().backward()
            result["local_names"] = monitor.names
            result["report"] = monitor.report().to_dict()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class SplitData(Dataset):
    """Index i has x0 > 0 when i is odd: with DistributedSampler(shuffle=False) rank 1 gets the odd indices."""

    def __init__(self, n: int = 32) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.tensor([0.5 + 0.01 * i, 0.3])
        return x if i % 2 == 1 else x * torch.tensor([-1.0, 1.0])


def lightning_module(pl: Any, kill_all: bool = False) -> Any:
    return _LIGHTNING_CLASSES[pl.__name__](kill_all)


def _make_lightning_class(pl: Any) -> type:
    class SplitModule(pl.LightningModule):
        def __init__(self, kill_all: bool = False) -> None:
            super().__init__()
            self.net = split_model()
            if kill_all:
                with torch.no_grad():
                    self.net[0].bias.fill_(-1e3)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(batch).sum() * 0.0  # zero loss: weights stay forced

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(SplitData(), batch_size=4, shuffle=False)

    SplitModule.__qualname__ = SplitModule.__name__ = f"SplitModule_{pl.__name__.replace('.', '_')}"
    return SplitModule


_LIGHTNING_CLASSES: dict[str, type] = {}
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _pl = __import__(_name, fromlist=["LightningModule"])
    except ImportError:
        continue
    _cls = _make_lightning_class(_pl)
    globals()[_cls.__name__] = _cls  # picklable by module-level name
    _LIGHTNING_CLASSES[_name] = _cls


def lightning_worker(
    rank: int, world_size: int, port: int, out_dir: str, namespace: str, on_dead: str, kill_all: bool, max_steps: int
) -> None:
    """One rank of a Lightning DDP fit, launched by us (as torchrun would) rather than by ddp_spawn.

    ddp_spawn aborts now and then at process exit on this machine ("terminate called without an active exception"),
    with or without relumon. Launching externally lets each rank destroy its process group cleanly and report back.
    """
    import importlib
    import warnings

    from relumon.lightning import ReluMonitor

    warnings.simplefilter("ignore")
    pl = importlib.import_module(namespace)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    callback = ReluMonitor(log_every_n_steps=2, on_dead=on_dead, measure_every=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_steps=max_steps,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(out_dir, name="ddp", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    try:
        trainer.fit(lightning_module(pl, kill_all=kill_all))
        result = {
            "global_step": trainer.global_step,
            "report": callback.last_report.to_dict() if callback.last_report else None,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
