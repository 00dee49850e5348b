"""Monitor.log writes real TensorBoard event files; read them back with tensorboard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import relumon
from tests.helpers import MLP, train_steps

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_log_writes_scalars_and_the_layout(tmp_path: Path) -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    writer = SummaryWriter(str(tmp_path))
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        for step in (10, 20, 30):
            train_steps(model, steps=2, batch=4)
            monitor.log(writer, step)
    writer.close()

    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {
        "relumon/dead_fraction/act1",
        "relumon/dead_fraction/act2",
        "relumon/dead_units/act2",
        "relumon/grad_norm/act1",
        "relumon/grad_norm/act2",
        "relumon/summary/dead_fraction",
    } <= tags
    dead = acc.Scalars("relumon/dead_fraction/act2")
    assert [e.step for e in dead] == [10, 20, 30]
    assert [e.value for e in dead] == [1.0, 1.0, 1.0]
    assert [e.value for e in acc.Scalars("relumon/dead_units/act2")] == [12.0] * 3
    assert [e.value for e in acc.Scalars("relumon/grad_norm/act1")] == [0.0] * 3
    act1_dead = acc.Scalars("relumon/dead_units/act1")[0].value
    assert acc.Scalars("relumon/summary/dead_fraction")[0].value == pytest.approx((12 + act1_dead) / 28)
    # The custom-scalars layout is written once, as a tensor under the custom_scalars plugin.
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert len(acc.Tensors("custom_scalars__config__")) == 1


def test_layout_lists_one_multiline_chart_per_metric() -> None:
    from relumon.tensorboard import custom_scalars_layout

    layout = custom_scalars_layout()
    charts = layout["relumon"]
    assert charts["dead fraction per layer"] == ["Multiline", [r"relumon/dead_fraction/.*"]]
    assert all(kind == "Multiline" for kind, _ in charts.values())


def test_log_rejects_something_that_is_not_a_writer() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor, pytest.raises(TypeError, match="SummaryWriter"):
        monitor.log("runs/", 0)


def test_tags_are_sanitised() -> None:
    from relumon.report import sanitize_tag

    assert sanitize_tag("blocks.0.act") == "blocks.0.act"
    assert sanitize_tag("enc:act #1") == "enc_act__1"
    assert sanitize_tag("") == "root"


def layout_titles(acc: EventAccumulator) -> list[list[str]]:
    """The chart titles of each custom-scalars layout written, oldest first."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = [
        layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in acc.Tensors("custom_scalars__config__")
    ]
    return [[chart.title for category in layout.category for chart in category.chart] for layout in layouts]


def test_layout_charts_only_what_is_logged_and_grows_when_a_metric_appears(tmp_path: Path) -> None:
    model = MLP()
    writer = SummaryWriter(str(tmp_path))
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        for step in (10, 20):
            train_steps(model, steps=2, batch=4)
            monitor.log(writer, step)
        model(torch.full((4, 8), float("nan"))).sum().backward()  # NaN units: a metric not logged so far
        monitor.log(writer, 30)
    writer.close()

    acc = read_events(tmp_path)
    first, latest = layout_titles(acc)  # the second layout is written only when NaN units first appear
    assert first == [
        "dead fraction per layer",
        "dead units per layer",
        "gradient norm at the activation output (L2 over the batch tensor)",
        "units revived in the window",
        "permanently dead units",
        "dead layers that start a cascade (roots)",
        "dead layers an upstream death explains",
        "layers whose gradient a dead layer blocks",
        "overall dead fraction",
        "dead cascades: roots and consequences",
    ]
    assert latest == first[:3] + ["units with NaN output"] + first[3:]
    assert "relumon/nonfinite_units/act1" in acc.Tags()["scalars"]


def test_lightning_layout_follows_the_options(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import boring_module, loader, trainer

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="layout", version=0)
    callback = ReluMonitor(log_every_n_steps=2, measure_every=1, grad_through=True, dormant_tau=0.1, figures=False)
    trainer(pl, [callback], logger=logger).fit(boring_module(pl), loader(4))
    (titles,) = layout_titles(read_events(tmp_path / "layout" / "version_0"))
    assert "gradient norm through the activation (L2 over the batch tensor)" in titles
    assert "tau-dormant fraction per layer" in titles and "units with NaN output" not in titles
