"""Diagnosis on real-network shapes: dead cascades and their roots, the ReLU family with ReLU6 saturation, blocked
gradients, activations outside the family, and watched modules that never run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relumon
from tests.helpers import MLP, kill_units, train_steps
from tests.nets import MOBILENET_SITES, RESNET_SITES, SmallMobileNetV2, SmallResNet, set_bias, train

DOWNSTREAM_OF_LAYER1_1 = RESNET_SITES[5:]


def watch_and_train(model: nn.Module, **options: Any) -> tuple[relumon.Report, list[str]]:
    """Train two steps under relumon, close the window; return the report and the DeadUnitsWarnings' messages."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1, **options) as monitor:
            train(model)
        report = monitor.report()
    return report, [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]


# ---------------------------------------------------------------------------------------------- dead cascades


def test_a_trunk_death_in_a_resnet_is_one_alert_naming_its_root() -> None:
    model = SmallResNet()
    set_bias(model.layer1[1].bn2, -1e3)  # the trunk activation after layer1.1's residual add dies
    report, alerts = watch_and_train(model)
    root = "layer1.1.relu.call2"
    assert report.names == RESNET_SITES
    assert [x.name for x in report.dead_layers] == [root, *DOWNSTREAM_OF_LAYER1_1]  # every later site died
    assert [x.name for x in report.roots] == [root]
    assert report[root].caused_by is None and report[root].consequences == tuple(DOWNSTREAM_OF_LAYER1_1)
    assert all(report[name].caused_by == root for name in DOWNSTREAM_OF_LAYER1_1)
    assert all(report[name].caused_by is None for name in RESNET_SITES[:5])  # live layers have no cause
    # Blame for the root only: the BatchNorms after it are innocent (their bias is 0).
    assert report[root].blame is not None and "mean -1e+03" in report[root].blame
    assert all(report[name].blame is None for name in DOWNSTREAM_OF_LAYER1_1)
    assert len(alerts) == 1
    assert f"`{root}`" in alerts[0]
    assert "6 call sites downstream died with it" in alerts[0]
    assert "`layer2.0.relu`, `layer2.0.relu.call2`, `layer2.1.relu` and 3 more" in alerts[0]
    scalars = report.scalars()
    assert scalars["relumon/summary/root_deaths"] == 1.0 and scalars["relumon/summary/consequence_deaths"] == 6.0
    assert scalars[f"relumon/root_death/{root}"] == 1.0 and scalars["relumon/consequence/layer3.0.relu"] == 1.0
    assert scalars["relumon/root_death/layer3.0.relu"] == 0.0
    table = str(report)
    assert "root: 6 downstream dead" in table and f"caused by `{root}`" in table
    data = report.to_dict()["layers"]
    assert data[-1]["caused_by"] == root and data[4]["consequences"] == DOWNSTREAM_OF_LAYER1_1


def test_a_branch_death_is_its_own_root_and_the_block_output_stays_alive() -> None:
    model = SmallResNet()
    set_bias(model.layer2[0].bn1, -1e3)  # layer2.0's branch dies; its downsample shortcut still carries signal
    set_bias(model.layer3[0].bn1, -1e3)  # a later, independent death
    report, alerts = watch_and_train(model)
    assert [x.name for x in report.dead_layers] == ["layer2.0.relu", "layer3.0.relu"]
    assert [x.name for x in report.roots] == ["layer2.0.relu", "layer3.0.relu"]
    assert report["layer2.0.relu.call2"].dead_units == 0  # the block's output is alive
    assert report["layer2.0.relu"].consequences == () and report["layer3.0.relu"].caused_by is None
    assert len(alerts) == 2 and "`layer2.0.relu`" in alerts[0] and "`layer3.0.relu`" in alerts[1]
    assert all(x.blocked_by is None for x in report)  # the shortcut carries the gradient around the dead branch


def test_a_dead_mobilenet_stem_is_one_root_across_the_residual_adds() -> None:
    model = SmallMobileNetV2()
    set_bias(model.features[0][1], -1e3)
    report, alerts = watch_and_train(model)  # default types: ReLU6 is watched
    assert report.names == MOBILENET_SITES
    assert all(x.kind == "ReLU6" and x.all_dead for x in report)
    assert [x.name for x in report.roots] == ["features.0.2"]
    assert all(report[name].caused_by == "features.0.2" for name in MOBILENET_SITES[1:])
    assert len(alerts) == 1 and "8 call sites downstream died with it" in alerts[0]


def test_lightning_raise_and_stop_act_on_the_root_only(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import loader, trainer

    class Cascade(pl.LightningModule):
        """fc1 -> act1 -> fc2 (dead) -> act2 -> fc3 (bias 0) -> act3 -> head: act2 kills act3."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 1)
            )
            kill_units(self.net[2], list(range(12)))
            with torch.no_grad():
                self.net[4].bias.zero_()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    with pytest.raises(relumon.RelumonError) as raised:
        trainer(pl, [ReluMonitor(measure_every=1, on_dead="raise", log_every_n_steps=2)], max_steps=4).fit(
            Cascade(), loader(4)
        )
    assert "`net.3`" in str(
        raised.value
    ) and "1 call site downstream died with it, left without signal: `net.5`" in str(raised.value)
    cb = ReluMonitor(measure_every=1, on_dead="stop", log_every_n_steps=2)
    with pytest.warns(relumon.DeadUnitsWarning) as record:
        trainer(pl, [cb], max_steps=4).fit(Cascade(), loader(4))
    alerts = [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]
    assert len(alerts) == 1 and "`net.3`" in alerts[0] and "Stopping training" in alerts[0]
    assert cb.last_report is not None and cb.last_report["net.5"].caused_by == "net.3"


def test_under_compile_every_death_is_its_own_root() -> None:
    from relumon.cascade import find_roots

    # What the recorder stores for sites whose upstream is unknown (torch.compile, or discovered late): None.
    roots = find_roots(["a", "b"], {"a": None, "b": None}, {"a": True, "b": True}, {"a", "b"}, {"a", "b"})
    assert roots == {}


def test_the_graph_walk_is_done_once_at_discovery() -> None:
    model = SmallResNet()
    with relumon.watch(model, measure_every=1) as monitor:
        train(model, steps=1)
        upstream = {site.name: site.upstream for site in monitor._recorder.sites}
        assert monitor._recorder._graph_nodes is not None  # held until the next step starts...
        train(model, steps=1)
        assert monitor._recorder._graph_nodes is None  # ...then released: later steps add nothing
    assert upstream["relu"] == ()  # fed by the data
    assert upstream["layer1.0.relu.call2"] == ("relu", "layer1.0.relu")  # the residual add joins two sites
    assert upstream["layer2.0.relu.call2"] == ("layer1.1.relu.call2", "layer2.0.relu")  # through the downsample
    assert [s.from_input for s in monitor._recorder.sites] == [True] + [False] * 10


def test_a_site_that_also_sees_the_data_is_not_a_consequence() -> None:
    class Wide(nn.Module):
        """deep: fc1 -> act1 (dead); wide: the input itself; act2 sees both."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act1 = nn.Linear(4, 4), nn.ReLU()
            self.fc2, self.skip, self.act2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act2(self.fc2(self.act1(self.fc1(x))) + self.skip(x)))

    model = Wide()
    kill_units(model.fc1, [0, 1, 2, 3])
    kill_units(model.fc2, [0, 1, 2, 3])  # act2 dies on its own: -1e3 outweighs the wide path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        with relumon.watch(model, measure_every=1) as monitor:
            train_steps(model, steps=1, in_shape=(4,))
        report = monitor.report()
    assert [x.name for x in report.roots] == ["act1", "act2"]


# ---------------------------------------------------------------------------------------------- the ReLU family


def test_the_relu_family_is_watched_by_default() -> None:
    assert relumon.DEFAULT_TYPES == (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.RReLU, nn.PReLU)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU6(), nn.Linear(5, 5), nn.RReLU(), nn.Linear(5, 5), nn.PReLU(), nn.Linear(5, 1)
    )
    for linear, dead in ((model[2], [0, 1]), (model[4], [3])):
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.fill_(1.0)  # alive...
        kill_units(linear, dead)  # ...except these
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, in_shape=(4,))
    report = monitor.report()
    assert [x.kind for x in report] == ["ReLU6", "RReLU", "PReLU"]
    assert [x.negative_regime for x in report] == [False, True, True]  # RReLU's random slope passes negatives
    assert report["3"].dead_indices == [0, 1] and report["5"].dead_indices == [3]
    assert report["1"].cap == 6.0 and report["3"].cap is None


def test_relu6_dead_and_saturated_units_are_counted_exactly() -> None:
    model = SmallMobileNetV2()
    bn = model.features[2].conv[0][1]  # the expand ReLU6 of block 2: 32 channels
    set_bias(bn, 1e3, slice(0, 5))  # 5 saturated at 6
    set_bias(bn, -1e3, slice(5, 8))  # 3 dead
    report, alerts = watch_and_train(model)
    layer = report["features.2.conv.0.2"]
    assert (layer.saturated_units, layer.dead_units) == (5, 3)
    assert layer.dead_indices == [5, 6, 7]
    assert report.scalars()["relumon/saturated_units/features.2.conv.0.2"] == 5.0
    assert report["features.0.2"].saturated_units == 0 and alerts == []
    assert "saturated" in str(report)


def test_a_saturated_relu6_layer_alerts_saying_saturated_at_6() -> None:
    model = SmallMobileNetV2()
    set_bias(model.features[2].conv[0][1], 1e3)
    report, alerts = watch_and_train(model)
    layer = report["features.2.conv.0.2"]
    assert layer.saturated_units == layer.units == 32 and layer.dead_units == 0
    assert layer.all_dead_or_saturated and not layer.all_dead
    assert [x.name for x in report.roots] == ["features.2.conv.0.2"]
    assert len(alerts) == 1 and "were saturated at 6" in alerts[0] and "Dead ReLU" not in alerts[0]
    # Nothing passes back through a saturated layer: the layers below it are blocked.
    assert report["features.0.2"].grad_norm == 0 and report["features.0.2"].blocked_by == "features.2.conv.0.2"


def test_relu6_grad_through_is_zero_at_the_cap() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU6(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([100.0, 1.0, -1.0]))  # saturated, linear, dead
    with relumon.watch(model, measure_every=1, grad_through=True, on_dead="ignore") as monitor:
        model(torch.randn(4, 2)).sum().backward()
    layer = monitor.report()["1"]
    expected = (model[2].weight[0, 1].abs() * 2).item()  # only unit 1 passes: 4 samples of |w| each, norm 2|w|
    assert layer.grad_through_norm == pytest.approx(expected)
    assert (layer.saturated_units, layer.dead_units) == (1, 1)


def test_functional_relu6_is_watched_with_its_cap() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu6(self.fc(x))

    model = Net()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([10.0, 1.0, 1.0, -1.0]))
    with relumon.watch(model, functional=True, measure_every=1, on_dead="ignore") as monitor:
        model(torch.randn(5, 3)).sum().backward()
    layer = monitor.report()["F.relu6"]
    assert layer.kind == "F.relu6" and (layer.saturated_units, layer.dead_units) == (1, 1)


# ---------------------------------------------------------------------------------------------- blocked gradients


def test_a_zero_gradient_below_a_dead_layer_names_its_blocker() -> None:
    model = MLP()
    kill_units(model.fc2, list(range(12)))
    with pytest.warns(relumon.DeadUnitsWarning):
        with relumon.watch(model, measure_every=1) as monitor:
            train_steps(model, steps=2)
            report = monitor.report()
    act1 = report["act1"]
    assert act1.dead_units == 0 and act1.grad_norm == 0.0
    assert act1.blocked_by == "act2" and report["act2"].blocked_by is None
    assert "blocked by `act2`" in str(report)
    assert report.scalars()["relumon/blocked/act1"] == 1.0 and report.scalars()["relumon/blocked/act2"] == 0.0
    assert report.to_dict()["layers"][0]["blocked_by"] == "act2"


def test_in_a_resnet_trunk_death_every_layer_below_is_blocked_by_the_root() -> None:
    model = SmallResNet()
    set_bias(model.layer1[1].bn2, -1e3)
    report, _ = watch_and_train(model)
    assert [report[name].blocked_by for name in RESNET_SITES[:4]] == ["layer1.1.relu.call2"] * 4
    assert all(report[name].grad_norm == 0 for name in RESNET_SITES[:4])


def test_the_gradient_flow_figure_marks_consequences_and_blockers() -> None:
    pytest.importorskip("matplotlib")
    from relumon.figures import grad_flow_figure

    model = SmallResNet()
    set_bias(model.layer1[1].bn2, -1e3)
    report, _ = watch_and_train(model)
    fig = grad_flow_figure(report)
    ax = fig.axes[0]
    bars = ax.patches[: len(report)]
    assert [bar.get_hatch() for bar in bars[5:]] == ["xx"] * 6  # consequences are cross-hatched...
    assert bars[5].get_facecolor() != bars[4].get_facecolor()  # ...and lighter than their root
    labels = [t.get_text() for t in ax.texts]
    assert labels[0].startswith("0, blocked by layer1.1.relu.call2")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dead: caused upstream" in legend


# ---------------------------------------------------------------------------------------------- other activations


def test_tanh_is_watched_for_gradient_flow_only() -> None:
    model = MLP(act=nn.Tanh)
    kill_units(model.fc2, list(range(12)))  # tanh output -1 everywhere: not "dead", it has no such state
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.DeadUnitsWarning)  # no alert at all
        with relumon.watch(model, types=(nn.Tanh,), measure_every=1) as monitor:
            train_steps(model, steps=2)
            report = monitor.report()
    act2 = report["act2"]
    assert not act2.counts_dead and act2.dead_units == 0 and math.isnan(act2.dead_fraction)
    assert not act2.all_dead and report.dead_layers == [] and act2.grad_norm > 0
    scalars = report.scalars()
    assert "relumon/grad_norm/act2" in scalars
    assert not any(tag.startswith(("relumon/dead_", "relumon/summary/dead_fraction")) for tag in scalars)
    assert report.to_dict()["layers"][1]["dead_units"] is None
    row = next(line for line in str(report).splitlines() if line.startswith("act2"))
    assert row.split()[4:6] == ["-", "-"]
    assert monitor.timeline[-1][1] == {}


def test_relumon_summary_does_not_call_tanh_layers_dead(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from relumon.cli import summarize

    model = MLP(act=nn.Tanh)
    kill_units(model.fc2, list(range(12)))
    writer = SummaryWriter(str(tmp_path / "run"))
    with relumon.watch(model, types=(nn.Tanh,), measure_every=1) as monitor:
        for step in (1, 2):
            train_steps(model, steps=1)
            monitor.log(writer, step)
    writer.close()
    layers = summarize(str(tmp_path))["run"]
    assert [x["layer"] for x in layers] == ["act1", "act2"]
    assert all(x["last_dead_fraction"] is None and not x["counts_dead"] for x in layers)
    assert all(x["last_grad_norm"] is not None for x in layers)


# ---------------------------------------------------------------------------------------------- idle modules


class DeclaredButUnused(nn.Module):
    """Declares ``self.act = nn.ReLU()`` but calls F.relu in forward, as many models do."""

    def __init__(self, use_second: bool = False) -> None:
        super().__init__()
        self.fc, self.act, self.act2 = nn.Linear(4, 4), nn.ReLU(), nn.ReLU()
        self.use_second = use_second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x))
        return self.act2(x) if self.use_second else x


def test_an_idle_relu_is_named_once_after_the_first_window() -> None:
    model = DeclaredButUnused()
    with relumon.watch(model) as monitor:
        train_steps(model, steps=2, in_shape=(4,))
        with pytest.warns(relumon.RelumonWarning, match=r"none of the 2 watched module\(s\) ran") as record:
            monitor.report()
        message = str(record[0].message)
        assert "`act`, `act2`" in message and "functional=True" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error", relumon.RelumonWarning)
            train_steps(model, steps=1, in_shape=(4,))
            monitor.report()  # once only


def test_a_partly_idle_model_names_the_modules_that_never_ran() -> None:
    model = DeclaredButUnused(use_second=True)
    with relumon.watch(model, measure_every=1) as monitor:
        with pytest.warns(relumon.RelumonWarning) as record:
            monitor.report()  # before any training step: a hint, not the idle warning (nothing ran yet)
        assert [str(w.message) for w in record if "never ran" in str(w.message)] == []
        assert any("before any training step" in str(w.message) for w in record)
        train_steps(model, steps=1, in_shape=(4,))
        with pytest.warns(relumon.RelumonWarning, match=r"1 watched module\(s\) never ran .*: `act`\."):
            monitor.report()


def test_functional_true_without_any_relu_call_says_so() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with relumon.watch(model, functional=True) as monitor:
        train_steps(model, steps=1, in_shape=(4,))
        with pytest.warns(relumon.RelumonWarning, match="functional=True found no F.relu"):
            monitor.report()


def test_lightning_warns_about_idle_modules(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import loader, trainer

    class Idle(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DeclaredButUnused()
            self.head = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.head(self.net(batch[0][:, :4])).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    with pytest.warns(relumon.RelumonWarning, match=r"`net.act`, `net.act2`") as record:
        trainer(pl, [ReluMonitor(log_every_n_steps=2)], max_steps=4).fit(Idle(), loader(4))
    assert sum("ran in a training forward" in str(w.message) for w in record) == 1


def test_a_dead_layer_that_also_sees_the_raw_input_is_its_own_root() -> None:
    """A wide path (``cat``) or a residual shortcut from the raw input carries signal around a dead site."""

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fa, self.a = nn.Linear(4, 16), nn.ReLU()
            self.fb, self.b = nn.Linear(20, 16), nn.ReLU()
            self.head = nn.Linear(16, 1)
            with torch.no_grad():
                self.fa.bias.fill_(-1e3)
                self.fb.bias.fill_(-1e3)  # b dies of its own bias, not of a's death

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(self.fb(torch.cat([self.a(self.fa(x)), x], dim=1))))

    model = Wide()
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        model(torch.randn(3, 4)).sum().backward()
        report = monitor.report()
    assert report["b"].caused_by is None and [x.name for x in report.roots] == ["a", "b"]
