"""Recycling dead units (`Monitor.recycle`, ``recycle=``): ground truth forced by construction.

A bias of -1e3 on k rows of the producing layer (or on k channels of its BatchNorm) kills exactly those k units.
Recycling must then pick exactly them, leave the network's function bit for bit as it was, touch only their rows and
columns (and the same entries of the optimizer state), and bring them back to life in the next window.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import relumon
from relumon.cli import summarize
from tests import dist_workers
from tests.launch import run_ranks
from tests.nets import BasicBlock, SmallMobileNetV2


class ConvNet(nn.Module):
    """Conv -> BN -> ReLU -> MaxPool -> Flatten -> Dropout -> Linear -> ReLU -> Linear: a conv channel is read as
    its 16 positions in the first Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.0)
        self.fc1 = nn.Linear(6 * 4 * 4, 5)
        self.act2 = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.flat(self.pool(self.act(self.bn(self.conv(x))))))
        return self.fc2(self.act2(self.fc1(x)))


class ResidualNet(nn.Module):
    """A stem, one ResNet BasicBlock (one inplace ReLU called twice, the second after the residual add), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = BasicBlock(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


class TransformerFFN(nn.Module):
    """A pre-norm transformer feed-forward block on (batch, seq, features): ``x + fc2(drop(relu(fc1(ln(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.drop(self.act(self.fc1(self.ln(x)))))
        return self.head(x).mean(1)


def mlp() -> nn.Sequential:
    """Linear(4->8) -> ReLU -> Linear(8->6) -> ReLU -> Linear(6->2); the second ReLU's bias 20 keeps it alive."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].bias.fill_(20.0)
    return model


def kill_rows(param: torch.Tensor, rows: list[int]) -> None:
    with torch.no_grad():
        param[rows] = -1e3


def force(param: torch.Tensor, dead: list[int]) -> None:
    """Exactly ``dead`` units dead: their bias -1e3, every other unit's +5 (alive on any of these inputs)."""
    with torch.no_grad():
        param.fill_(5.0)
        param[dead] = -1e3


# (model factory, input shape, the site, the parameter whose rows -1e3 kills, the killed units, the reader's columns
# of the killed units as a view of its weight)
CASES: dict[
    str, tuple[Callable[[], nn.Module], tuple[int, ...], str, Callable[[Any], torch.Tensor], list[int], Any]
] = {
    "mlp": (mlp, (16, 4), "1", lambda m: m[0].bias, [1, 4, 6], lambda m: m[2].weight[:, [1, 4, 6]]),
    "conv_bn_flatten_linear": (
        ConvNet,
        (8, 3, 8, 8),
        "act",
        lambda m: m.bn.bias,
        [0, 3],
        lambda m: m.fc1.weight.view(5, 6, 16)[:, [0, 3]],  # each channel is 4x4 positions of fc1's input
    ),
    "residual_block": (
        ResidualNet,
        (4, 3, 8, 8),
        "block.relu",
        lambda m: m.block.bn1.bias,
        [2, 5, 7],
        lambda m: m.block.conv2.weight[:, [2, 5, 7]],
    ),
    "transformer_ffn": (
        TransformerFFN,
        (4, 5, 16),
        "act",
        lambda m: m.fc1.bias,
        [1, 7],
        lambda m: m.fc2.weight[:, [1, 7]],
    ),
    # The expansion ReLU6 is read by a depthwise conv (groups = channels); its dead channels leave the depthwise ReLU6
    # after it dead too (a consequence), recycled as well, whose reader is the 1x1 projection.
    "mobilenet_v2": (
        SmallMobileNetV2,
        (4, 3, 16, 16),
        "features.2.conv.0.2",
        lambda m: m.features[2].conv[0][1].bias,
        [3, 20],
        lambda m: m.features[2].conv[2].weight[:, [3, 20]],
    ),
}


def train_window(model: nn.Module, monitor: relumon.Monitor, opt: torch.optim.Optimizer, x: torch.Tensor) -> Any:
    """Two Adam steps (so the optimizer has state), then close the window."""
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    return monitor.report()


def setup(case: str, **options: Any) -> tuple[nn.Module, relumon.Monitor, torch.optim.Optimizer, torch.Tensor]:
    factory, shape, _, killed_param, killed, _ = CASES[case]
    model = factory()
    force(killed_param(model), killed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = relumon.watch(model, measure_every=1, on_dead="ignore", **options)
    return model, monitor, opt, torch.randn(shape)


@pytest.mark.parametrize("case", list(CASES))
def test_recycling_dead_units_keeps_the_function_exactly_and_touches_only_their_parameters(case: str) -> None:
    model, monitor, opt, x = setup(case, recycle="dead")
    monitor.optimizers = [opt]
    site, killed, columns = CASES[case][2], CASES[case][4], CASES[case][5]
    model.train()
    for _ in range(2):  # Adam steps: the optimizer has state to reset
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out_before = model(x)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    report = monitor.report()  # closes the window, then recycles
    model.eval()
    with torch.no_grad():
        out_after = model(x)
    monitor.remove()

    assert report[site].dead_indices == killed
    result = report.recycled
    assert result is not None and result.units[site] == killed
    assert report[site].recycled_units == len(killed)
    assert torch.equal(out_before, out_after)  # dead units output 0, and every reader's columns for them are 0 now
    # The reader's columns of the recycled units are 0, except in rows of its own units that were recycled too (the
    # reader feeds the next site): those rows are new, and their units' outputs are ignored downstream in turn.
    renewed = result.units.get({"mlp": "3", "conv_bn_flatten_linear": "act2"}.get(case, ""), [])
    kept = [r for r in range(columns(model).shape[0]) if r not in renewed]
    assert torch.equal(columns(model)[kept], torch.zeros_like(columns(model)[kept]))
    touched = {name for names in result.parameters.values() for name in names}
    for name, p in model.named_parameters():
        if name not in touched:
            assert torch.equal(p, params_before[name]), f"{name} changed although recycling did not touch it"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_mlp_recycling_in_detail_new_rows_bias_zero_reader_columns_zero_and_adam_state() -> None:
    model, monitor, opt, x = setup("mlp")
    report = train_window(model, monitor, opt, x)
    fc0, fc2 = model[0], model[2]
    w0, b0, w2 = fc0.weight.detach().clone(), fc0.bias.detach().clone(), fc2.weight.detach().clone()
    state0 = {k: v.clone() for k, v in opt.state[fc0.weight].items()}
    state2 = {k: v.clone() for k, v in opt.state[fc2.weight].items()}
    assert report["1"].dead_indices == [1, 4, 6]

    # Without `recycle=`, the first call acts: the wiring was recorded when the sites were discovered.
    result = monitor.recycle(opt)
    killed = [1, 4, 6]
    alive = [i for i in range(8) if i not in killed]
    assert result.units == {"1": killed} and result.optimizers == 1
    assert result.parameters["1"] == ("0.weight", "0.bias", "2.weight")
    # Incoming: new rows for the killed units, from Linear's own distribution (|w| <= 1/sqrt(fan_in) = 0.5), bias 0.
    assert not torch.equal(fc0.weight[killed], w0[killed])
    assert fc0.weight[killed].abs().max() <= 0.5
    assert torch.equal(fc0.weight[alive], w0[alive])
    assert torch.equal(fc0.bias[killed], torch.zeros(3)) and torch.equal(fc0.bias[alive], b0[alive])
    # Outgoing: the reader's columns of the killed units are 0, the others untouched.
    assert torch.equal(fc2.weight[:, killed], torch.zeros(6, 3)) and torch.equal(fc2.weight[:, alive], w2[:, alive])
    # Adam's moments reset under the same masks only; its step is kept.
    for state, old, index in (
        (opt.state[fc0.weight], state0, (killed,)),
        (opt.state[fc2.weight], state2, (slice(None), killed)),
    ):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][index], torch.zeros_like(state[key][index]))
            keep = torch.ones_like(state[key], dtype=torch.bool)
            keep[index] = False
            assert torch.equal(state[key][keep], old[key][keep])
        assert torch.equal(state["step"], old["step"])
    # The second site's producer (model[2]) had its columns zeroed as a reader, not its rows: its own units live.
    assert "3" not in result.units and "3" not in result.skipped
    monitor.remove()


def test_sgd_momentum_is_reset_by_parameter_and_other_optimizers_are_left_alone() -> None:
    model = mlp()
    force(model[0].bias, [0, 2])
    head = nn.Linear(2, 2)  # another model's optimizer, holding nothing of `model`
    opt = torch.optim.SGD(
        [{"params": [model[2].weight, model[0].weight]}, {"params": [model[0].bias]}], 0.1, momentum=0.9
    )
    rest = torch.optim.SGD(
        [p for n, p in model.named_parameters() if n not in ("0.weight", "0.bias", "2.weight")], 0.1, momentum=0.9
    )
    with relumon.watch(model, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        monitor.optimizers = [opt, rest]
        x = torch.randn(8, 4)
        for _ in range(2):
            opt.zero_grad()
            rest.zero_grad()
            model(x).sum().backward()
            opt.step()
            rest.step()
        untouched = opt.state[model[2].weight]["momentum_buffer"][:, [1, 3]].clone()
        report = monitor.report()
        with pytest.raises(ValueError, match="none of them a parameter of Sequential"):
            monitor.recycle(torch.optim.SGD(head.parameters(), 0.1))
    assert report.recycled is not None and report.recycled.units == {"1": [0, 2]}
    buf = opt.state[model[2].weight]["momentum_buffer"]  # found by parameter, although it sits first in its group
    assert torch.equal(buf[:, [0, 2]], torch.zeros(6, 2)) and torch.equal(buf[:, [1, 3]], untouched)
    assert torch.equal(opt.state[model[0].bias]["momentum_buffer"][[0, 2]], torch.zeros(2))


def test_recycled_units_are_alive_in_the_next_window_and_the_history_says_whether_they_died_again() -> None:
    model, monitor, opt, x = setup("mlp", recycle="dead")
    monitor.optimizers = [opt]
    first = train_window(model, monitor, opt, x)
    assert first["1"].dead_units == 3 and first["1"].recycled_units == 3
    assert first["1"].first_dead_step is not None
    second = train_window(model, monitor, opt, x)
    assert second["1"].dead_units == 0  # the new rows and a zero bias fire on random inputs
    assert (second["1"].recycled_checked, second["1"].recycled_dead_again) == (3, 0)
    assert second["1"].revived_units == 0  # a recycled unit starts a fresh history: not a revival
    assert second["1"].first_dead_step is not None and bool((second["1"].first_dead_step[[1, 4, 6]] == -1).all())
    assert second.scalars()["relumon/recycled_dead_again/1"] == 0.0
    assert second.scalars()["relumon/recycled/1"] == 0.0
    # Kill two units: they are recycled after the third window. Kill one of them again at once: the fourth window
    # finds 1 of the 2 recycled units dead again (ReDo's "dead again" share).
    kill_rows(model[0].bias, [1, 4])
    third = train_window(model, monitor, opt, x)
    assert third["1"].recycled_checked == 0 and third["1"].recycled_units == 2  # none recycled after the second
    kill_rows(model[0].bias, [1])
    fourth = train_window(model, monitor, opt, x)
    assert (fourth["1"].recycled_checked, fourth["1"].recycled_dead_again) == (2, 1)
    assert fourth.scalars()["relumon/recycled_dead_again/1"] == 0.5
    assert fourth["1"].recycled_total == 3 + 2 + 1
    state = monitor.state_dict()
    monitor.remove()
    assert state["history"]["1"]["recycled_total"] == 6 and state["history"]["1"]["recycled_pending"] == [1]


def test_the_report_table_and_relumon_summary_show_recycled_counts(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model, monitor, opt, x = setup("mlp", recycle="dead")
    monitor.optimizers = [opt]
    writer = SummaryWriter(str(tmp_path / "run"))
    model.train()
    for step in (1, 2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        report = monitor.log(writer, step)
        if step == 1:
            table = str(report)
    writer.close()
    monitor.remove()
    assert "recycled" in table.splitlines()[1] and table.splitlines()[3].split()[-1] == "3"
    assert "recycled" in report._repr_html_()
    layers = {x["layer"]: x for x in summarize(str(tmp_path))["run"]}
    assert layers["1"]["recycled_units"] == 3 and layers["3"]["recycled_units"] == 0


def test_sites_it_cannot_rewire_are_skipped_with_reasons_and_left_unchanged() -> None:
    model = ResidualNet()
    kill_rows(model.block.bn2.bias, [1, 3])  # the block output: fed by the residual add
    kill_rows(model.stem[1].bias, [0])  # the stem: read by the block's conv1 *and* its residual add
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with relumon.watch(model, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        monitor.optimizers = [opt]
        x = torch.randn(4, 3, 8, 8)
        model.train()
        model(x).sum().backward()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state}
        report = monitor.report()
    result = report.recycled
    assert result is not None
    assert "residual join" in result.skipped["block.relu.call2"]
    assert "residual add" in result.skipped["stem.2"]
    assert result.units == {}
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert not states  # no step was taken: and none was made


def shared_reader() -> nn.Module:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)
            self.fc3 = nn.Linear(6, 6)
            self.act3 = nn.ReLU()
            self.fc4 = nn.Linear(6, 6)
            self.fc4.weight = self.fc3.weight  # tied
            self.act4 = nn.ReLU()
            self.out = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.act(self.fc1(x)))  # read by a LayerNorm, not a Linear
            h = self.act3(self.fc3(h))  # its producer's weight is tied to fc4's
            h = self.act4(self.fc4(h))
            return self.out(h).sum(1, keepdim=True) + self.act(self.fc2(h)).mean(1, keepdim=True)

    return Tied()


def test_layernorm_readers_tied_weights_and_shared_modules_are_skipped_with_reasons() -> None:
    model = shared_reader()
    for layer in (model.fc1, model.fc3, model.fc2):
        kill_rows(layer.bias, [0])
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
        monitor.report()
        result = monitor.recycle()  # the first call acts
    assert "`norm` (LayerNorm)" in result.skipped["act"]
    assert "tied weights" in result.skipped["act3"]
    assert "`MeanBackward1`" in result.skipped["act.call2"]  # a functional op reads it
    assert result.units == {}

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.shared = nn.Linear(6, 6)  # called twice per forward
            self.act2 = nn.ReLU()
            self.out = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act2(self.shared(self.act2(self.shared(self.act(self.fc(x)))))))

    reused = Reused()
    kill_rows(reused.fc.bias, [0])
    with relumon.watch(reused, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        reused(torch.randn(8, 4)).sum().backward()
        with pytest.warns(relumon.RelumonWarning, match="recycling without an optimizer"):
            result = monitor.report().recycled
    assert result is not None and result.units == {}
    assert result.skipped["act"] == "its reader `shared` is called 2 times per forward (shared weights)"


def test_a_sampled_window_is_not_acted_on_but_with_recycle_its_suspects_are_confirmed_next_window() -> None:
    model = mlp()
    force(model[0].bias, [2])
    opt = torch.optim.SGD(model.parameters(), 0.0)
    with relumon.watch(model, measure_every=4, on_dead="ignore") as monitor:
        for _ in range(8):
            model(torch.randn(8, 4)).sum().backward()
        report = monitor.report()
        assert not report["1"].exact
        result = monitor.recycle(opt)
        assert "window was sampled" in result.skipped["1"] and result.units == {}
    model = mlp()
    force(model[0].bias, [2])
    with relumon.watch(model, measure_every=4, on_dead="ignore", recycle="dead") as monitor:
        monitor.optimizers = [torch.optim.SGD(model.parameters(), 0.0)]
        for window in range(2):
            for _ in range(8):
                model(torch.randn(8, 4)).sum().backward()
            report = monitor.report()
            if window == 0:
                assert not report["1"].exact and report["1"].recycled_units == 0
        assert report["1"].exact and report["1"].recycled_units == 1  # measured on every call, then recycled


def test_bad_input_gets_clear_errors() -> None:
    model = mlp()
    monitor = relumon.watch(model)
    with pytest.raises(relumon.RelumonError, match="no window closed yet"):
        monitor.recycle()
    model(torch.randn(4, 4)).sum().backward()
    monitor.report()
    with pytest.raises(ValueError, match="`criterion='dormant'` needs `dormant_tau`"):
        monitor.recycle(criterion="dormant")
    with pytest.raises(ValueError, match=r"expected `criterion` to be one of \('dead', 'dormant'\), got 'zombie'"):
        monitor.recycle(criterion="zombie")
    with pytest.raises(TypeError, match="expected `optimizer` to be a torch.optim.Optimizer"):
        monitor.recycle(optimizer="adam")
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="holding 2 tensor"):
        monitor.recycle(torch.optim.Adam(other.parameters()))
    monitor.remove()
    with pytest.raises(ValueError, match="`recycle='dormant'` needs `dormant_tau`"):
        relumon.watch(model, recycle="dormant")
    with pytest.raises(ValueError, match="expected `recycle` to be None or one of"):
        relumon.Options(recycle="all")


def test_dormant_criterion_recycles_near_dead_units_too() -> None:
    model = mlp()
    force(model[0].bias, [5])  # a dead unit; the others fire strongly
    with torch.no_grad():
        model[0].weight[3] *= 1e-4  # a unit that fires, but 1e4 times weaker than the others: tau-dormant
        model[0].bias[3] = 1e-4
    opt = torch.optim.Adam(model.parameters())
    with relumon.watch(model, measure_every=1, dormant_tau=0.05, on_dead="ignore", recycle="dormant") as monitor:
        monitor.optimizers = [opt]
        x = torch.randn(16, 4)
        model(x).sum().backward()
        report = monitor.report()
    assert report.recycled is not None and report.recycled.units["1"] == [3, 5]
    assert report.recycled.criterion == "dormant"


def test_recycling_without_an_optimizer_warns_once() -> None:
    model, monitor, opt, x = setup("mlp", recycle="dead")
    with pytest.warns(relumon.RelumonWarning, match="recycling without an optimizer"):
        train_window(model, monitor, opt, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_window(model, monitor, opt, x)
    monitor.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lightning_recycles_with_the_trainers_optimizer_and_logs_recycled_counts(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import boring_module, loader, trainer

    model = boring_module(pl, lr=0.0)
    force(model.net[0].bias, [3, 9])
    with torch.no_grad():
        model.net[2].bias.fill_(40.0)  # the second layer lives: only the forced units are recycled
    callback = ReluMonitor(measure_every=1, log_every_n_steps=2, recycle="dead", figures=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer(pl, [callback], logger=logger, max_steps=4).fit(model, loader(4))
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("relumon/recycled/net.1")] == [2.0, 0.0]
    assert [e.value for e in acc.Scalars("relumon/recycled_dead_again/net.1")] == [0.0]
    assert torch.equal(model.net[0].bias[[3, 9]], torch.zeros(2))  # lr 0: exactly what recycling set
    assert torch.equal(model.net[2].weight[:, [3, 9]], torch.zeros(12, 2))


@pytest.mark.slow
def test_two_ddp_ranks_recycle_the_same_units_and_end_with_identical_weights_and_adam_state(tmp_path: Path) -> None:
    run_ranks(dist_workers.recycle_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Unit 0 fires only on rank 1's data: globally alive; units 2 and 5 are dead everywhere.
    assert ranks[0]["units"] == ranks[1]["units"] == {"1": [2, 5]}
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["alive_next"] == ranks[1]["alive_next"]
    assert ranks[0]["final"] == ranks[1]["final"]
