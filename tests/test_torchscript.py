"""A TorchScript submodule anywhere in the model: relumon watches around it and says once what it could not watch.

PyTorch allows no hooks on TorchScript modules (``register_forward_hook is not supported on ScriptModules``).
Ground truth: zeroed rows and a bias of -1e3 kill exactly the chosen units of the eager layers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relumon
from tests.helpers import kill_units
from tests.lightning_helpers import import_namespace, loader, trainer


class WithScripted(nn.Module):
    """A scripted encoder (with a ReLU inside), a traced block, then eager ``fc -> act`` and ``F.relu`` in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        self.block = torch.jit.trace(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), torch.randn(2, 8))
        self.fc, self.act = nn.Linear(8, 6), nn.ReLU()
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(self.act(self.fc(self.block(self.encoder(x)))))))


def _relumon_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, relumon.RelumonWarning)]


@pytest.mark.parametrize("functional", [False, True])
def test_a_model_with_torchscript_submodules_is_watched_around_them(functional: bool) -> None:
    model = WithScripted()
    kill_units(model.fc, [0, 3])
    kill_units(model.fc2, [1])
    fired = {"act": torch.zeros(6, dtype=torch.bool), "F.relu": torch.zeros(5, dtype=torch.bool)}

    def probe(name: str) -> Any:  # ground truth: which units fired, from plain forward hooks on the eager layers
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            fired[name] |= (out.detach() > 0).any(0)

        return hook

    probes = [model.act.register_forward_hook(probe("act")), model.fc2.register_forward_hook(probe("F.relu"))]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1, on_dead="ignore", functional=functional) as monitor:
            for _ in range(2):
                model(torch.randn(4, 8)).sum().backward()
        report = monitor.report()
    for handle in probes:
        handle.remove()
    truth = {name: (~mask).nonzero().flatten().tolist() for name, mask in fired.items()}
    assert {0, 3} <= set(truth["act"]) and 1 in truth["F.relu"]
    scripted = [m for m in _relumon_warnings(record) if "TorchScript" in m]
    assert len(scripted) == 1 and "`encoder`, `block` are TorchScript modules" in scripted[0]
    assert report["act"].dead_indices == truth["act"] and report["act"].samples == 8
    if functional:
        assert report.names == ["act", "F.relu"] and report["F.relu"].dead_indices == truth["F.relu"]
    else:
        assert report.names == ["act"]
    assert not monitor.active  # every hook came off


def test_a_torchscript_model_gets_a_clear_error() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match=r"cannot watch a TorchScript module .*Watch the eager model"):
        relumon.watch(scripted)


def test_activations_only_inside_torchscript_say_where_they_are() -> None:
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"TorchScript submodules \(`0`\) cannot be looked inside"):
        relumon.watch(model)


@pytest.mark.parametrize("namespace", ["lightning.pytorch"])
def test_lightning_fit_with_a_torchscript_submodule(namespace: str, tmp_path: Path) -> None:
    pl = import_namespace(namespace)
    from relumon.lightning import ReluMonitor

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
            self.fc, self.act, self.head = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.bias.copy_(torch.tensor([1.0, 1.0, -1e3, 1.0, 1.0, 1.0]))  # only unit 2 is dead

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.head(self.act(self.fc(self.encoder(batch[0])))).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callback = ReluMonitor(log_every_n_steps=2, measure_every=1, on_dead="ignore")
    with pytest.warns(relumon.RelumonWarning, match="`encoder` is a TorchScript module"):
        trainer(pl, [callback], max_steps=4, default_root_dir=tmp_path).fit(Scripted(), loader(4))
    assert callback.last_report is not None and callback.last_report["act"].dead_indices == [2]
