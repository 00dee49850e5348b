"""Worker functions for the 2-process gloo tests. They live at module level so that spawn can pickle them.

Each is ``fn(rank, world_size, *args)`` for `tests.launch.run_ranks`, which creates the gloo group before it (or lets
a Trainer create it) and destroys it after, once everything the worker built is gone: a worker neither initialises
nor destroys the group, and keeps its DDP/FSDP wrappers local.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
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
    rank: int, world_size: int, out_dir: str, on_dead: str, kill_all: bool, extra_branch_on: int = -1
) -> None:
    import relumon

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


def depth_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Rank 0 skips block ``a`` on step 0, rank 1 skips ``b``: the ranks discover the sites in different orders.

    The ranks hold the same weights, as under DDP (a dead unit's cause names its feeding bias, a local fact), and each
    its own seeded data."""
    import relumon

    torch.manual_seed(0)
    model = StochasticDepth()
    torch.manual_seed(100 + rank)
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
    rank: int, world_size: int, out_dir: str, namespace: str, on_dead: str, kill_all: bool, max_steps: int
) -> None:
    """One rank of a Lightning DDP fit, launched by `tests.launch.run_ranks` (as torchrun would) with ``init=False``:
    the Trainer creates the group from the environment, with `tests.launch.INIT_TIMEOUT`.

    ddp_spawn aborts now and then at process exit on this machine ("terminate called without an active exception"),
    with or without relumon. Launching externally lets each rank destroy its process group cleanly (after the
    Trainer, which holds the DDP wrapper, is gone) and report back.
    """
    import importlib
    import warnings

    from relumon.lightning import ReluMonitor
    from tests.launch import INIT_TIMEOUT

    warnings.simplefilter("ignore")
    pl = importlib.import_module(namespace)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    callback = ReluMonitor(log_every_n_steps=2, on_dead=on_dead, measure_every=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=pl.strategies.DDPStrategy(timeout=INIT_TIMEOUT),
        max_steps=max_steps,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(out_dir, name="ddp", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(lightning_module(pl, kill_all=kill_all))
    result = {
        "global_step": trainer.global_step,
        "report": callback.last_report.to_dict() if callback.last_report else None,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def fsdp2_worker(rank: int, world_size: int, out_dir: str) -> None:
    """FSDP2 (``fully_shard``) on CPU/gloo: 4 of the 8 units after the first Linear and all 6 after the second are
    forced dead; each rank trains on its own data and writes its two reports and the layers its alert callback
    received."""
    import relumon
    from tests.helpers import kill_units

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
    kill_units(model[0], [0, 1, 2, 3])  # a jump in the dead fraction: blame indexes the dead units' biases
    kill_units(model[2], list(range(6)))  # the whole layer dies: an alert
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    alerts: list[str] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    reports = []
    with relumon.watch(model, measure_every=1, on_dead=lambda layer: alerts.append(layer.name)) as monitor:
        for _window in range(2):
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 4, generator=gen)).pow(2).mean().backward()
                opt.step()
            reports.append(monitor.report().to_dict())
    sharded = type(model[2].bias).__name__
    result = {"reports": reports, "alerts": alerts, "bias": sharded}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


class ReportWriter:
    """Writes each rank's last relumon report at the end of fit (the rank's own view, from inside the worker)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from relumon.lightning import ReluMonitor

        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, ReluMonitor))
        result = {
            "global_step": trainer.global_step,
            "report": monitor.last_report.to_dict() if monitor.last_report else None,
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def spawn_fit(out_dir: str, strategy: str) -> None:
    """Run in a fresh interpreter: a Lightning fit that starts its own 2 workers (``ddp_spawn`` pickles the
    callbacks to start them; ``ddp_notebook`` forks). The rendezvous comes from the environment that
    `tests.launch.rendezvous` gives the interpreter, and the group's timeout is `tests.launch.INIT_TIMEOUT`."""
    import warnings

    import lightning.pytorch as pl

    from relumon.lightning import ReluMonitor
    from tests.launch import INIT_TIMEOUT

    warnings.simplefilter("ignore")
    writer = ReportWriterCallback
    start_method = {"ddp_spawn": "spawn", "ddp_notebook": "fork"}[strategy]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=pl.strategies.DDPStrategy(start_method=start_method, timeout=INIT_TIMEOUT),
        max_steps=4,
        callbacks=[ReluMonitor(log_every_n_steps=2, on_dead="ignore", measure_every=1), writer(out_dir)],
        logger=pl.loggers.CSVLogger(out_dir, name="spawn", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(lightning_module(pl))


try:
    from lightning.pytorch import Callback as _Callback

    class ReportWriterCallback(ReportWriter, _Callback):
        """`ReportWriter` as a Lightning callback (module level, so that ``ddp_spawn`` can pickle it)."""

except ImportError:  # pragma: no cover - only pytorch_lightning installed
    pass


def cause_worker(rank: int, world_size: int, out_dir: str) -> None:
    """tests.test_cause's forced kill under DDP, with different data per rank: every rank must build the same cause."""
    import relumon
    from tests.test_cause import BATCH, Killable, sgd

    model = Killable()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = sgd(model, lr=1.0)
    x = torch.full((BATCH, 4), 0.1 * (rank + 1))  # rank 0: 0.1, rank 1: 0.2
    causes = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 5):
            opt.zero_grad()
            ddp(x).sum().backward()
            opt.step()
            if step % 2 == 0:
                layer = monitor.report(step=step)["act"]
                causes.append(layer.cause.to_dict() if layer.cause is not None else None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(causes))


def recycle_worker(rank: int, world_size: int, out_dir: str) -> None:
    """DDP with Adam: units 2 and 5 of ``fc`` are dead on both ranks (bias -1e3), unit 0 fires on rank 1 only.

    Both ranks recycle after the first window and write their weights, Adam state and what was recycled.
    """
    import relumon

    torch.manual_seed(0)  # the same initial model on both ranks, as DDP expects
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, 0.0])
        model[0].bias.fill_(5.0)  # units 1, 3 and 4 fire everywhere
        model[0].bias[0] = 0.0
        model[0].bias[[2, 5]] = -1e3
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)  # different data on each rank
    with relumon.watch(model, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        monitor.optimizers = [opt]
        for window in range(2):
            for _ in range(3):
                opt.zero_grad()
                ddp(rank_inputs(rank)).sum().backward()
                opt.step()
            report = monitor.report()
            if window == 0:
                recycled = report.recycled
                params = {n: p.detach().tolist() for n, p in model.named_parameters()}
                state = {n: {k: v.tolist() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    result = {
        "units": recycled.units if recycled is not None else None,
        "params": params,
        "state": state,
        "alive_next": report["1"].dead_units,
        "final": {n: p.detach().tolist() for n, p in model.named_parameters()},
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def hang_worker(rank: int, world_size: int) -> None:
    """Rank 1 never joins rank 0's all_reduce: the run can only end at `tests.launch.run_ranks`' deadline."""
    import time

    import torch.distributed as dist

    if rank == 1:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))
