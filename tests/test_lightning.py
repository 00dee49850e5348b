"""ReluMonitor in real Lightning Trainers on the CPU, in both namespaces."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import relumon
from tests.lightning_helpers import NAMESPACES, boring_module, import_namespace, loader, trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from relumon.lightning import ReluMonitor  # noqa: E402


@pytest.fixture(params=NAMESPACES)
def pl(request: pytest.FixtureRequest) -> Any:
    return import_namespace(request.param)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_tensorboard_logger_gets_exact_values_for_a_forced_dead_layer(pl: Any, tmp_path: Path) -> None:
    model = boring_module(pl, dead_fc2=True)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    with pytest.warns(relumon.DeadUnitsWarning, match=r"`net.3`.*16 samples over 4 steps") as record:
        trainer(pl, [ReluMonitor(measure_every=1, log_every_n_steps=4)], logger=logger, max_steps=12).fit(
            model, loader(12)
        )
    assert sum(issubclass(w.category, relumon.DeadUnitsWarning) for w in record) == 1
    assert _hook_count(model) == 0  # gone after fit

    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    dead = acc.Scalars("relumon/dead_fraction/net.3")
    assert [e.step for e in dead] == [4, 8, 12]
    assert [e.value for e in dead] == [1.0, 1.0, 1.0]
    assert [e.value for e in acc.Scalars("relumon/dead_units/net.3")] == [12.0] * 3
    assert [e.value for e in acc.Scalars("relumon/grad_norm/net.1")] == [0.0] * 3
    assert "relumon/dead_fraction/net.1" in acc.Tags()["scalars"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_one_callback_class_serves_both_namespaces() -> None:
    lpl = import_namespace("lightning.pytorch")
    ppl = import_namespace("pytorch_lightning")
    for pl in (lpl, ppl):
        cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
        model = boring_module(pl)
        trainer(pl, [cb], max_steps=4).fit(model, loader(4))
        assert cb.last_report is not None and cb.last_report["net.1"].samples == 8
        assert _hook_count(model) == 0


def test_csv_logger_gets_the_scalars_as_columns(pl: Any, tmp_path: Path) -> None:
    model = boring_module(pl, dead_fc2=True)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(pl, [ReluMonitor(measure_every=1, log_every_n_steps=3)], logger=logger, max_steps=6).fit(
            model, loader(6)
        )
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    assert {"step", "relumon/dead_fraction/net.3", "relumon/grad_norm/net.1"} <= set(rows[0])
    logged = [r for r in rows if r.get("relumon/dead_fraction/net.3")]
    assert [int(r["step"]) for r in logged] == [3, 6]
    assert [float(r["relumon/dead_fraction/net.3"]) for r in logged] == [1.0, 1.0]


def test_on_dead_stop_stops_the_trainer_and_says_why(pl: Any) -> None:
    model = boring_module(pl, dead_fc2=True)
    t = trainer(pl, [ReluMonitor(measure_every=1, log_every_n_steps=2, on_dead="stop")], max_steps=20)
    with pytest.warns(relumon.DeadUnitsWarning, match="Stopping training"):
        t.fit(model, loader(20))
    assert t.global_step == 2 and t.should_stop
    assert _hook_count(model) == 0


def test_on_dead_raise_raises_relumon_error_and_removes_hooks(pl: Any) -> None:
    model = boring_module(pl, dead_fc2=True)
    with pytest.raises(relumon.RelumonError, match="net.3"):
        trainer(pl, [ReluMonitor(measure_every=1, log_every_n_steps=2, on_dead="raise")], max_steps=20).fit(
            model, loader(20)
        )
    assert _hook_count(model) == 0


def test_min_samples_holds_back_alerts_on_small_windows(pl: Any) -> None:
    model = boring_module(pl, dead_fc2=True)
    seen: list[str] = []
    cb = ReluMonitor(measure_every=1, log_every_n_steps=1, on_dead=lambda layer: seen.append(layer.name), min_samples=5)
    trainer(pl, [cb], max_steps=3).fit(model, loader(3))  # windows of 4 samples
    assert seen == []
    cb = ReluMonitor(measure_every=1, log_every_n_steps=2, on_dead=lambda layer: seen.append(layer.name), min_samples=5)
    trainer(pl, [cb], max_steps=3).fit(boring_module(pl, dead_fc2=True), loader(3))
    assert seen == ["net.3"]


def test_accumulation_counts_every_micro_batch_and_logs_each_step_once(pl: Any, tmp_path: Path) -> None:
    model = boring_module(pl)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="acc", version=0)
    cb = ReluMonitor(measure_every=1, log_every_n_steps=1)
    trainer(pl, [cb], logger=logger, accumulate_grad_batches=2, max_steps=3).fit(model, loader(6))
    rows = [
        r
        for r in csv.DictReader(open(tmp_path / "acc" / "version_0" / "metrics.csv"))
        if r.get("relumon/dead_fraction/net.1")
    ]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert cb.last_report["net.1"].samples == 8  # 2 micro-batches of 4
    assert cb.last_report["net.1"].backward_passes == 2


def test_validation_and_sanity_forwards_never_count(pl: Any) -> None:
    model = boring_module(pl)
    cb = ReluMonitor(measure_every=1, log_every_n_steps=4)
    t = trainer(pl, [cb], max_steps=4, num_sanity_val_steps=2, val_check_interval=2, limit_val_batches=3)
    t.fit(model, loader(4), loader(3))
    assert model.val_forwards >= 5
    assert cb.last_report["net.1"].samples == 16 and cb.last_report["net.1"].forwards == 4


def test_checkpoint_resume_keeps_the_alert_history(pl: Any, tmp_path: Path) -> None:
    model = boring_module(pl, dead_fc2=True)
    cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
    t = trainer(pl, [cb], max_steps=4, default_root_dir=str(tmp_path))
    with pytest.warns(relumon.DeadUnitsWarning):
        t.fit(model, loader(8))
    ckpt = tmp_path / "resume.ckpt"
    t.save_checkpoint(str(ckpt))
    saved = torch.load(str(ckpt), weights_only=False)["callbacks"][cb.state_key]
    assert saved["monitor"]["alerted"] == ["net.3"]

    resumed_cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
    t2 = trainer(pl, [resumed_cb], max_steps=8, max_epochs=3, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t2.fit(boring_module(pl, dead_fc2=True), loader(8), ckpt_path=str(ckpt))
    assert not [w for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]
    assert resumed_cb.state_dict()["monitor"]["alerted"] == ["net.3"]
    last = resumed_cb.last_report
    assert last is not None and last["net.3"].all_dead
    # The death history goes on: first seen dead in the window closed at step 2, dead in all 4 windows since.
    assert last["net.3"].first_dead_step.tolist() == [2] * 12
    assert last["net.3"].dead_streak.tolist() == [4] * 12
    assert last["net.3"].permanently_dead_units == 12


def test_two_instances_coexist_in_one_checkpoint(pl: Any, tmp_path: Path) -> None:
    a, b = (
        ReluMonitor(measure_every=1, on_dead="warn"),
        ReluMonitor(measure_every=1, on_dead="ignore", prefix="relumon2"),
    )
    assert a.state_key != b.state_key
    t = trainer(pl, [a, b], max_steps=2, default_root_dir=str(tmp_path))
    t.fit(boring_module(pl), loader(2))
    t.save_checkpoint(str(tmp_path / "two.ckpt"))
    keys = torch.load(str(tmp_path / "two.ckpt"), weights_only=False)["callbacks"]
    assert a.state_key in keys and b.state_key in keys


def test_a_model_without_relu_warns_once_and_training_goes_on(pl: Any) -> None:
    model = boring_module(pl, act=nn.Tanh)
    cb = ReluMonitor(measure_every=1)
    t = trainer(pl, [cb], max_steps=3)
    with pytest.warns(relumon.RelumonWarning, match="stays idle") as record:
        t.fit(model, loader(3))
    assert sum("stays idle" in str(w.message) for w in record) == 1
    assert t.global_step == 3 and cb.last_report is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_dead": "halt"}, r"`on_dead` to be one of \('warn', 'raise', 'stop', 'ignore'\)"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"min_samples": -1}, "min_samples"),
        ({"prefix": ""}, "prefix"),
        ({"dormant_tau": 2}, "dormant_tau"),
    ],
)
def test_bad_arguments_are_rejected_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReluMonitor(**kwargs)
    with pytest.raises(TypeError, match="types"):
        ReluMonitor(types=("ReLU",))


def test_default_window_is_the_trainers_log_every_n_steps(pl: Any, tmp_path: Path) -> None:
    logger = pl.loggers.CSVLogger(str(tmp_path), name="d", version=0)
    trainer(pl, [ReluMonitor(measure_every=1)], logger=logger, max_steps=6, log_every_n_steps=3).fit(
        boring_module(pl), loader(6)
    )
    rows = [
        r
        for r in csv.DictReader(open(tmp_path / "d" / "version_0" / "metrics.csv"))
        if r.get("relumon/dead_fraction/net.1")
    ]
    assert [int(r["step"]) for r in rows] == [3, 6]


@pytest.mark.slow
def test_fit_a_compiled_module(pl: Any) -> None:
    torch._dynamo.reset()
    model = boring_module(pl, dead_fc2=True)
    cb = ReluMonitor(measure_every=1, log_every_n_steps=2, on_dead="ignore")
    trainer(pl, [cb], max_steps=4).fit(torch.compile(model), loader(4))
    assert cb.last_report is not None
    assert cb.last_report["net.3"].all_dead and cb.last_report["net.1"].samples == 8
    assert _hook_count(model) == 0
    torch._dynamo.reset()


def test_the_trainers_grad_scaler_is_found_and_norms_are_unscaled(pl: Any) -> None:
    from importlib import import_module

    mixed_precision = import_module(f"{pl.__name__}.plugins.precision").MixedPrecision

    def grad_norm(scale: float | None) -> float:
        torch.manual_seed(0)
        cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
        plugins = []
        if scale is not None:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            plugins = [mixed_precision("16-mixed", device="cpu", scaler=scaler)]
        trainer(pl, [cb], max_steps=2, plugins=plugins).fit(boring_module(pl), loader(2))
        return cb.last_report["net.1"].grad_norm

    unscaled = grad_norm(None)
    assert unscaled > 0
    assert grad_norm(1024.0) == pytest.approx(unscaled, rel=1e-2)  # fp16 autocast, not 1024x


def test_callback_forwards_options_and_takes_scaler_and_sync_from_the_trainer() -> None:
    import relumon

    cb = ReluMonitor(measure_every=2, options=relumon.Options(min_samples=5))
    assert cb.options.measure_every == 2 and cb.min_samples == 5
    with pytest.raises(TypeError, match="from the Trainer"):
        ReluMonitor(sync_dist=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ReluMonitor(log_every=3)
    with pytest.raises(TypeError, match="from the Trainer"):
        ReluMonitor(options=relumon.Options(sync_dist=False))
    assert ReluMonitor(options=relumon.Options(on_dead="raise")).on_dead == "raise"  # the options' on_dead applies
    assert ReluMonitor(on_dead="stop", options=relumon.Options(on_dead="raise")).on_dead == "stop"  # unless given


def test_the_trainers_optimizer_is_found_and_the_stop_reason_carries_the_cause(pl: Any, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from relumon.cli import read_alerts
    from tests.test_cause import BATCH, Killable, X

    class KillableModule(pl.LightningModule):
        """tests.test_cause's forced kill: one SGD step at lr 1 moves every fc1 bias by -8 and kills the layer."""

        def __init__(self) -> None:
            super().__init__()
            self.net = Killable()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            net = self.net
            return torch.optim.SGD(
                [{"params": net.fc1.parameters(), "lr": 1.0}, {"params": net.head.parameters(), "lr": 0}]
            )

    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(cb.monitor.optimizers == list(trainer.optimizers) and len(trainer.optimizers) == 1)

    cb = ReluMonitor(measure_every=1, log_every_n_steps=2, on_dead="stop", figures=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    data = DataLoader(TensorDataset(X.repeat(6, 1)), batch_size=BATCH)
    with pytest.warns(relumon.DeadUnitsWarning) as record:
        trainer(pl, [cb, Spy()], logger=logger, max_steps=6).fit(KillableModule(), data)
    assert seen and all(seen)
    message = str(next(w.message for w in record if issubclass(w.category, relumon.DeadUnitsWarning)))
    assert "Stopping training" in message and "Cause (step 4)" in message and "lr 1" in message
    cause = cb.last_report["net.act"].cause
    # The first step's forward runs inside the optimizer's closure, after its pre-hook: still measured.
    assert cause is not None and cause.lr == 1.0 and cause.update_step == 1
    assert cause.update_ratio == pytest.approx(8.0, rel=1e-6) and cause.bias_shift == pytest.approx(-8.0, abs=1e-6)
    alerts = read_alerts(str(tmp_path))
    assert [a["step"] for a in alerts["run/version_0"]] == [4] and "Cause (step 4)" in alerts["run/version_0"][0][
        "text"
    ]


def test_the_optimizer_comes_from_the_trainer() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"from the Trainer.*its optimizers"):
        ReluMonitor(optimizer=opt)
    with pytest.raises(TypeError, match="from the Trainer"):
        ReluMonitor(options=relumon.Options(optimizer=opt))
