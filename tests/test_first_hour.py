"""What a newcomer meets in the first hour: error messages, report headers and tables, confirmation of sampled deaths,
the end of a short run, and `relumon summary` on a re-run into the same directory.

Ground truth is forced (a bias of -1e3 kills a layer) or written on purpose (event files with known values).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import relumon
from tests.helpers import MLP, kill_units, train_steps

# ---------------------------------------------------------------------------------------------- arguments


def test_relumonitor_lists_its_own_arguments_and_only_the_options_it_takes() -> None:
    pytest.importorskip("lightning")
    from relumon.lightning import ReluMonitor

    with pytest.raises(TypeError) as raised:
        ReluMonitor(foo=1)
    message = str(raised.value)
    assert "['foo']" in message
    for own in ("log_every_n_steps", "figures", "prog_bar", "prefix", "options", "on_dead"):
        assert f"'{own}'" in message
    for option in ("measure_every", "grad_through", "dormant_tau", "types"):
        assert f"'{option}'" in message
    for from_trainer in ("grad_scaler", "sync_dist"):  # the callback rejects these: never offer them
        assert from_trainer not in message


def test_watch_lists_its_options_on_a_typo() -> None:
    with pytest.raises(TypeError) as raised:
        relumon.watch(MLP(), measure_evry=1)
    assert "['measure_evry']" in str(raised.value) and "'measure_every'" in str(raised.value)


def test_sync_dist_without_a_process_group_fails_at_watch() -> None:
    assert not torch.distributed.is_initialized()
    model = MLP()
    with pytest.raises(relumon.RelumonError, match=r"init_process_group.*before `relumon.watch"):
        relumon.watch(model, sync_dist=True)
    assert not model.act1._forward_hooks  # nothing left attached
    relumon.watch(model, sync_dist=False).remove()  # False and None need no process group


# ---------------------------------------------------------------------------------------------- the report's header


def test_the_header_says_one_call_site_and_one_step() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1)
        title = str(monitor.report()).splitlines()[0]
    assert title == "relumon report, window 0 (0-based): 1 call site, 1 step"


def test_the_header_counts_measured_steps_even_when_one_layer_was_measured_in_full() -> None:
    model = MLP()
    kill_units(model.fc2, list(range(12)))  # act2 dead: a sampled window marks it for confirmation
    with relumon.watch(model, measure_every=4) as monitor:
        train_steps(model, steps=12)
        first = monitor.report()
        assert first["act2"].confirming
        train_steps(model, steps=12)  # act2 measured on every call, act1 sampled
        second = monitor.report()
    assert second["act2"].exact and not second["act1"].exact
    measured = second["act1"].forwards
    assert 0 < measured < 12
    assert str(second).splitlines()[0].endswith(f"2 call sites, 12 steps, {measured} measured")


# ---------------------------------------------------------------------------------------------- report() too early


def test_report_before_any_step_warns_and_keeps_window_0_open() -> None:
    model = MLP()
    kill_units(model.fc2, list(range(12)))
    with relumon.watch(model, measure_every=1) as monitor:
        with pytest.warns(relumon.RelumonWarning, match="before any training step of window 0"):
            early = monitor.report()
        assert len(early) == 0 and monitor.window == 0 and monitor.last_report is None and monitor.timeline == []
        train_steps(model, steps=2)
        with pytest.warns(relumon.DeadUnitsWarning):
            report = monitor.report()
    assert report.window == 0 and report.steps == 2 and report["act2"].dead_units == 12


# ---------------------------------------------------------------------------------------------- the text table


def test_the_table_shows_grad_through_dormant_units_and_the_negative_regime() -> None:
    model = MLP(act=nn.LeakyReLU)
    kill_units(model.fc2, [0, 1, 2])  # 3 units stuck negative: their score is far below any tau
    with relumon.watch(model, measure_every=1, grad_through=True, dormant_tau=0.1) as monitor:
        train_steps(model, steps=2)
        report = monitor.report()
    lines = str(report).splitlines()
    header = lines[1].split()
    assert "dormant" in header and "through" in header  # "grad through"
    act2 = next(line for line in lines if line.startswith("act2 "))
    assert "LeakyReLU (neg.)" in act2
    dormant = report["act2"].dormant_units
    assert dormant is not None and dormant >= 3
    cells = act2.split()
    assert str(dormant) in cells
    through = report["act2"].grad_through_norm
    assert not math.isnan(through) and f"{through:.3e}" in cells
    assert any(line.startswith("(neg.) negative regime") for line in lines)
    # A plain ReLU table without these options keeps its columns.
    plain = MLP()
    with relumon.watch(plain, measure_every=1) as monitor:
        train_steps(plain, steps=1)
        text = str(monitor.report())
    assert "dormant" not in text and "grad through" not in text and "(neg.)" not in text


# ---------------------------------------------------------------------------------------------- confirmation


class Chain(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> head: with act1 dead, act2 (bias 0) is a consequence of it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(12, 1)
        with torch.no_grad():
            self.fc1.bias.fill_(-1e3)
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_a_consequence_is_never_confirmed_and_a_new_root_is() -> None:
    model = Chain()
    with relumon.watch(model, measure_every=4, on_dead="ignore") as monitor:
        recorder = monitor._recorder
        # Window 0 is sampled: act1 may have fired on an unmeasured step, so act2 may have died on its own and is
        # confirmed with it (the sampled-upstream rule of issue 18).
        train_steps(model, steps=8)
        first = monitor.report()
        assert first["act2"].caused_by is None and first["act2"].confirming
        for _ in range(6):  # act1 is confirmed once; from then on act2 died with it and never alerts
            train_steps(model, steps=8)
            report = monitor.report()
            assert report["act2"].caused_by == "act1"
            assert not report["act2"].confirming
            # The cascade is measured on every call while it lasts: an upstream sampled on some calls may have fired
            # on the others, and would then explain nothing (issue 24).
            assert report["act1"].exact and report["act2"].exact and {"act1", "act2"} <= recorder.confirming
        assert monitor.alerted == {"act1"}
        # act1 comes back to life and act2 dies on its own: measured on every call, it is a confirmed root at once.
        with torch.no_grad():
            model.fc1.bias.fill_(1.0)
            model.fc2.bias.fill_(-1e3)
        train_steps(model, steps=8)
        report = monitor.report()
    assert report["act2"].caused_by is None and report["act2"].exact and "act2" in monitor.alerted


def test_leaving_watch_names_layers_that_look_dead_but_were_not_confirmed() -> None:
    model = MLP()
    kill_units(model.fc2, list(range(12)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=4) as monitor:
            train_steps(model, steps=12)
            report = monitor.report()  # the only window of this short run is sampled
    assert report["act2"].confirming and not monitor.alerted
    said = [str(w.message) for w in record if "could not be confirmed" in str(w.message)]
    assert len(said) == 1
    assert "`act2`" in said[0] and "window 0" in said[0] and "measure_every=1" in said[0]
    assert "`act1`" not in said[0]
    monitor.remove()  # idempotent, and said once
    assert sum("could not be confirmed" in str(w.message) for w in record) == 1


def test_a_confirmed_or_healthy_run_ends_in_silence() -> None:
    model = MLP()
    kill_units(model.fc2, list(range(12)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=4) as monitor:
            for _ in range(2):  # the second window confirms
                train_steps(model, steps=12)
                monitor.report()
    assert "act2" in monitor.alerted
    assert not any("could not be confirmed" in str(w.message) for w in record)


@pytest.mark.parametrize("namespace", ["lightning.pytorch"])
def test_a_short_lightning_fit_ends_by_naming_its_unconfirmed_layers(namespace: str) -> None:
    from tests.lightning_helpers import boring_module, import_namespace, loader, trainer

    pl = import_namespace(namespace)
    from relumon.lightning import ReluMonitor

    cb = ReluMonitor(measure_every=4, log_every_n_steps=50, figures=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(pl, [cb], max_steps=12).fit(boring_module(pl, dead_fc2=True), loader(12))
    assert cb.last_report is not None and cb.last_report["net.3"].confirming
    said = [str(w.message) for w in record if "could not be confirmed" in str(w.message)]
    assert len(said) == 1 and "`net.3`" in said[0]
    assert not any(issubclass(w.category, relumon.DeadUnitsWarning) for w in record)


# ---------------------------------------------------------------------------------------------- the alert


def test_the_alert_names_the_window_and_the_step() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=3)
        monitor.report(step=30)
        kill_units(model.fc2, list(range(12)))
        train_steps(model, steps=3)
        with pytest.warns(relumon.DeadUnitsWarning) as record:
            monitor.report(step=60)
    message = str(record[0].message)
    assert "for window 1 (0-based), which closed at step 60 (30 samples over 3 steps)" in message


# ---------------------------------------------------------------------------------------------- relumon summary


def test_summary_reads_a_rerun_like_tensorboard_one_value_per_step_latest_wins(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from relumon.cli import summarize

    run = tmp_path / "run"

    def train_and_log(dead: bool) -> None:
        model = MLP()
        if dead:
            kill_units(model.fc2, list(range(12)))
        writer = SummaryWriter(str(run))  # a second run into the same directory: a second event file
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            for step in (4, 8, 12):
                train_steps(model, steps=2)
                monitor.log(writer, step)
        writer.close()

    train_and_log(dead=False)
    train_and_log(dead=True)
    assert len(list(run.glob("events.out.tfevents*"))) == 2
    raw = EventAccumulator(str(run), size_guidance={"scalars": 0})
    raw.Reload()
    assert len(raw.Scalars("relumon/dead_fraction/act2")) == 6  # both runs' values are in the files
    act2 = {x["layer"]: x for x in summarize(str(run))["run"]}["act2"]
    assert act2["windows"] == 3 and act2["last_step"] == 12
    assert act2["last_dead_fraction"] == 1.0 and act2["max_dead_fraction"] == 1.0  # the second run's, at each step
    assert act2["first_step_fully_dead"] == 4


def test_summary_keeps_the_latest_value_of_a_step_within_one_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from relumon.cli import summarize

    writer = SummaryWriter(str(tmp_path))
    values: list[tuple[int, float]] = [(1, 0.5), (2, 0.25), (2, 0.75), (3, 0.0)]
    for order, (step, value) in enumerate(values):
        writer.add_scalar("relumon/dead_fraction/act", value, step, walltime=1000.0 + order)
    writer.close()
    layer: dict[str, Any] = summarize(str(tmp_path))[tmp_path.name][0]
    assert layer["windows"] == 3 and layer["max_dead_fraction"] == 0.75 and layer["last_dead_fraction"] == 0.0
