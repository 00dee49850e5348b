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
