"""Exact figures in the training patterns people really run, beyond ``model(x)``, one backward, one optimizer step.

Each test names the pattern and the rule it checks (see docs/concepts.md, "Rules"): step boundaries, the sampling
schedule and its confirmation, one gradient per forward, AMP overflow steps, unit dims, resume.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import relumon
from tests.helpers import MLP, train_steps


class VAE(nn.Module):
    """Called through its methods, never as ``vae(x)``: no root forward marks the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.dec = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)


@pytest.mark.parametrize("track_grad", [True, False])
@pytest.mark.parametrize("measure_every", [1, 4])
def test_a_vae_called_through_its_methods_has_stable_sites_and_real_steps(track_grad: bool, measure_every: int) -> None:
    vae = VAE()
    opt = torch.optim.SGD(vae.parameters(), lr=0.01)
    with relumon.watch(vae, measure_every=measure_every, track_grad=track_grad) as monitor:
        for _ in range(40):
            x = torch.randn(5, 8)
            loss = (vae.decode(vae.encode(x)) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        report = monitor.report()
    assert report.names == ["enc.1", "dec.1"]
    assert report.steps == 40
    assert all(layer.forwards + layer.unmeasured_calls == 40 for layer in report)
    measured = report["enc.1"].forwards
    assert measured == 40 if measure_every == 1 else 6 <= measured <= 14


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
        self.D = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


def gan_iteration(gan: GAN, opt_d: torch.optim.Optimizer, opt_g: torch.optim.Optimizer) -> None:
    """Manual optimization: a D step on real and fake, then a G step."""
    real, z = torch.randn(6, 4), torch.randn(6, 2)
    fake = gan.G(z).detach()
    loss_d = gan.D(fake).mean() - gan.D(real).mean()
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = -gan.D(gan.G(z)).mean()
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()


def test_a_gan_with_manual_optimization_has_stable_sites_and_every_phase_measured() -> None:
    gan = GAN()
    opt_d, opt_g = torch.optim.SGD(gan.D.parameters(), lr=0.01), torch.optim.SGD(gan.G.parameters(), lr=0.01)
    with relumon.watch(gan) as monitor:
        for _ in range(30):
            gan_iteration(gan, opt_d, opt_g)
        report = monitor.report()
    # D step: G, D(fake), D(real); G step: G, D(G(z)). Two optimizer steps per iteration. D's calls are fed by the
    # same weights, so they are one site (before 18a: `D.1` and `D.1.call2`).
    assert report.names == ["G.1", "D.1"]
    assert report.steps == 60
    assert report["D.1"].forwards + report["D.1"].unmeasured_calls == 90  # three calls of D per iteration
    # Both phases measured: G.1 runs in both steps (a schedule of every 4th step would only ever measure one phase).
    assert report["G.1"].forwards >= 10 and report["D.1"].forwards >= 10
    assert all(layer.backward_passes > 0 for layer in report)


def test_reporting_after_every_step_never_gives_an_empty_window() -> None:
    model = MLP()
    fractions = []
    with relumon.watch(model) as monitor:
        for _ in range(9):
            train_steps(model, steps=1, batch=4)
            fractions.append(monitor.report()["act1"].dead_fraction)
    assert not any(math.isnan(f) for f in fractions)


class FiresOffTheMultiplesOfFour(nn.Module):
    """``act`` fires on steps 1, 2, 3, 5, 6, 7... and is all zero on steps 0, 4, 8...: alive, never dead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 1)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = -1e3 if self.step % 4 == 0 else 1e3
        self.step += 1
        return self.head(self.act(self.fc(x) * 0 + shift))


def test_a_layer_alive_only_on_unmeasured_steps_never_alerts() -> None:
    model = FiresOffTheMultiplesOfFour()
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.DeadUnitsWarning)
        with relumon.watch(model) as monitor:
            for _ in range(10):
                train_steps(model, steps=4, batch=2, in_shape=(4,))
                monitor.report()
    assert monitor.alerted == frozenset()


def test_a_truly_dead_layer_still_alerts_once_under_the_default_schedule() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with pytest.warns(relumon.DeadUnitsWarning) as record, relumon.watch(model) as monitor:
        for _ in range(5):
            train_steps(model, steps=8, batch=2)
            monitor.report()
    assert sum(issubclass(w.category, relumon.DeadUnitsWarning) for w in record) == 1
    assert monitor.alerted == {"act2"}


def test_a_healthy_run_pays_nothing_for_confirmation() -> None:
    model = MLP()
    with relumon.watch(model) as monitor:
        for _ in range(3):
            train_steps(model, steps=8, batch=16)
            report = monitor.report()
            assert not any(layer.confirming for layer in report)
            assert all(layer.forwards < 8 for layer in report)


def test_a_hessian_vector_product_step_counts_one_gradient_per_forward() -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(6, 8)
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: captured.append(g.clone()) and None)

    model.act2.register_forward_hook(capture)
    with relumon.watch(model, measure_every=1) as monitor:
        loss = model(x).pow(2).mean()
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn_like(p) for p in params]
        torch.autograd.grad(grads, params, v)  # the Hessian-vector product: a second pass through the graph
        report = monitor.report()
    assert len(captured) == 2  # the activation's output was reached twice
    true_norm = float(captured[0].detach().norm())
    assert report["act2"].backward_passes == 1
    assert report["act2"].grad_norm == pytest.approx(true_norm, rel=1e-5)


def test_retain_graph_reruns_do_not_count() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        loss = model(torch.randn(4, 8)).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        report = monitor.report()
    assert [layer.backward_passes for layer in report] == [1, 1]


def test_a_gradscaler_overflow_step_is_skipped_not_spread_over_the_window() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    # The first step's scaled gradients overflow; the scaler skips it and backs off to a scale of 2.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-126)
    with relumon.watch(model, measure_every=1, grad_scaler=scaler) as monitor:
        for _ in range(4):
            loss = model(torch.randn(4, 8) * 1e3).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        report = monitor.report()
    layer = report["act1"]
    assert layer.backward_passes == 4 and layer.skipped_passes == 1
    assert math.isfinite(layer.grad_norm)
    assert "relumon/grad_norm/act1" in report.scalars()
    assert layer.to_dict()["skipped_passes"] == layer.skipped_passes


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(5)
        self.act2 = nn.ReLU()
        self.late_conv = nn.Conv1d(16, 16, 1)
        self.late_act = nn.ReLU(inplace=True)
        self.use_late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.pool(self.act(self.drop(self.conv(x)))))
        if self.use_late:
            y = self.late_act(self.drop(self.late_conv(y)))
        return y


def test_conv1d_units_are_channels_through_dropout_pooling_and_late_discovery() -> None:
    model = Conv1dNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)  # no sample is dropped for a shape
        with relumon.watch(model, measure_every=1) as monitor:
            for length in (50, 30):
                model(torch.randn(4, 3, length)).sum().backward()
            model.use_late = True  # a site first called after the traced step
            for length in (50, 20):
                model(torch.randn(4, 3, length)).sum().backward()
            report = monitor.report()
    assert [(x.name, x.units, x.unit_dim, x.samples) for x in report] == [
        ("act", 16, 1, 16),
        ("act2", 16, 1, 16),
        ("late_act", 16, 1, 8),
    ]
    assert report["act"].fed_by == "conv"


def test_resume_continues_steps_history_and_blame_memory() -> None:
    torch.manual_seed(0)
    model = MLP()
    with relumon.watch(model, measure_every=1, on_dead="ignore") as first:
        train_steps(model, steps=10, batch=2)
        first.report()
        state = first.state_dict()
    assert state["steps"] == 10
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as resumed:
        resumed.load_state_dict(state)
        train_steps(model, steps=5, batch=2)
        report = resumed.report()
    assert report.steps == 5 and report.window == 1
    assert report["act2"].first_dead_step is not None
    assert set(report["act2"].first_dead_step.tolist()) == {15}  # run step 15, not 5
    assert report["act2"].blame is not None  # the jump from the saved window's dead fraction


def test_skipped_dtypes_take_no_call_index() -> None:
    class Quantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.act(torch.ones(2, 4, dtype=torch.uint8))  # a uint8 call first
            return self.act(self.act(self.fc(x)))

    model = Quantized()
    with pytest.warns(relumon.RelumonWarning, match="uint8"), relumon.watch(model, measure_every=1) as monitor:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
    assert monitor.names == ["act", "act.call2"]


def test_a_nan_unit_does_not_make_every_unit_dormant() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0].fill_(math.nan)
    with relumon.watch(model, measure_every=1, dormant_tau=0.1) as monitor:
        train_steps(model, steps=2, batch=4)
        report = monitor.report()
    layer = report["act1"]
    assert layer.nonfinite_units == 1
    assert layer.dormant_units is not None and layer.dormant_units < layer.units - 1


# --------------------------------------------------------------------------- Lightning life cycle

lightning_pl = pytest.importorskip("lightning.pytorch")


def _lightning() -> object:
    from relumon.lightning import ReluMonitor

    return ReluMonitor


def test_lightning_watches_a_model_built_in_configure_model() -> None:
    from tests.lightning_helpers import loader, trainer

    ReluMonitor = _lightning()

    class Late(lightning_pl.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "net"):
                self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.RelumonWarning)
        trainer(lightning_pl, [cb], max_steps=4).fit(Late(), loader(4))
    assert cb.last_report is not None and cb.last_report.names == ["net.1"]


def _on_dead_callback(layer: relumon.LayerReport) -> None:
    pass


def test_a_callable_on_dead_gives_a_stable_state_key() -> None:
    ReluMonitor = _lightning()
    key = ReluMonitor(on_dead=_on_dead_callback).state_key
    assert key == ReluMonitor(on_dead=_on_dead_callback).state_key
    assert "0x" not in key and "_on_dead_callback" in key


def test_a_reused_callback_starts_fresh_for_a_new_fit() -> None:
    from tests.lightning_helpers import boring_module, loader, trainer

    ReluMonitor = _lightning()
    cb = ReluMonitor(measure_every=1, log_every_n_steps=2)
    for _ in range(2):  # a sweep: a new model each time, the same callback
        with pytest.warns(relumon.DeadUnitsWarning, match="net.3") as record:
            trainer(lightning_pl, [cb], max_steps=4).fit(boring_module(lightning_pl, dead_fc2=True), loader(4))
        assert sum(issubclass(w.category, relumon.DeadUnitsWarning) for w in record) == 1
        assert cb.state_dict()["monitor"]["window"] == 2  # two windows of this fit, not four


def _two_optimizer_module() -> object:
    class TwoOptimizers(lightning_pl.LightningModule):
        """Manual optimization, a GAN's shape: two optimizer steps per batch."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gan = GAN()

        def training_step(self, batch: object, batch_idx: int) -> None:
            (x,) = batch
            opt_d, opt_g = self.optimizers()
            real, z = x[:, :4], x[:, 4:6]
            loss_d = self.gan.D(self.gan.G(z).detach()).mean() - self.gan.D(real).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            loss_g = -self.gan.D(self.gan.G(z)).mean()
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [
                torch.optim.SGD(self.gan.D.parameters(), lr=0.01),
                torch.optim.SGD(self.gan.G.parameters(), lr=0.01),
            ]

    return TwoOptimizers()


def test_lightning_gan_with_two_optimizer_steps_per_batch_closes_windows_on_crossing(tmp_path: object) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.lightning_helpers import loader, trainer

    ReluMonitor = _lightning()
    logger = lightning_pl.loggers.TensorBoardLogger(str(tmp_path), name="gan", version=0)
    cb = ReluMonitor(log_every_n_steps=5, figures=False)
    trainer(lightning_pl, [cb], logger=logger, max_epochs=1).fit(_two_optimizer_module(), loader(10))
    acc = EventAccumulator(f"{tmp_path}/gan/version_0", size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("relumon/dead_fraction/gan.G.1")] == [6, 10, 16, 20]
    assert cb.last_report is not None and cb.last_report.names == ["gan.G.1", "gan.D.1"]


def test_lightning_short_windows_all_log_under_the_default_schedule(tmp_path: object) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.lightning_helpers import boring_module, loader, trainer

    ReluMonitor = _lightning()
    logger = lightning_pl.loggers.TensorBoardLogger(str(tmp_path), name="short", version=0)
    trainer(lightning_pl, [ReluMonitor(log_every_n_steps=2, figures=False)], logger=logger, max_steps=12).fit(
        boring_module(lightning_pl), loader(12)
    )
    acc = EventAccumulator(f"{tmp_path}/short/version_0", size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("relumon/dead_fraction/net.1")] == [2, 4, 6, 8, 10, 12]


def test_lightning_accumulation_message_says_what_was_measured() -> None:
    from tests.lightning_helpers import boring_module, loader, trainer

    ReluMonitor = _lightning()
    with pytest.warns(relumon.DeadUnitsWarning, match=r"16 samples over 1 optimizer step: 4 micro-batches\)"):
        trainer(
            lightning_pl, [ReluMonitor(log_every_n_steps=1, figures=False)], accumulate_grad_batches=4, max_steps=4
        ).fit(boring_module(lightning_pl, dead_fc2=True), loader(16))


# --------------------------------------------------------------------------- found in review


def test_a_detached_model_driven_through_methods_keeps_its_call_sites_bounded() -> None:
    """A distillation teacher called as ``teacher.logits(x).detach()``: no root call, no backward through it."""
    from relumon.recorder import MAX_CALLS_PER_STEP

    class Teacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.act = nn.ReLU()

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    teacher = Teacher()
    with pytest.warns(relumon.RelumonWarning, match="monitor.new_step"), relumon.watch(teacher) as monitor:
        for _ in range(MAX_CALLS_PER_STEP + 10):
            teacher.logits(torch.randn(2, 4)).detach()
    # Every call is fed by the same weights: one site (before 18a: one per call index, MAX_CALLS_PER_STEP of them).
    assert monitor.names == ["act"]


def test_a_float64_unit_with_tiny_positive_outputs_is_alive() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1e-60)  # positive, but 0 in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", relumon.DeadUnitsWarning)
        with relumon.watch(model, measure_every=1) as monitor:
            model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
            report = monitor.report()
    assert report["1"].dead_units == 0


def test_the_idle_warning_also_fires_for_a_model_driven_through_its_methods() -> None:
    class Declared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()  # declared, but `encode` calls F.relu

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.relu(self.fc(x))

    model = Declared()
    with pytest.warns(relumon.RelumonWarning, match="none of the 1 watched module"):
        with relumon.watch(model) as monitor:
            model.encode(torch.randn(3, 4)).sum().backward()
            monitor.report()


def test_a_resumed_runs_first_window_counts_from_the_resume() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as first:
        train_steps(model, steps=3, batch=2)  # an open window: its statistics are not saved
        state = first.state_dict()
    with relumon.watch(model, measure_every=1) as resumed:
        resumed.load_state_dict(state)
        train_steps(model, steps=2, batch=2)
        report = resumed.report()
    assert report.steps == 2 and all(layer.exact for layer in report)
    assert "2 steps" in str(report) and "measured" not in str(report).splitlines()[0]


def test_a_reused_callback_writes_pictures_in_every_fit(tmp_path: object) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.lightning_helpers import boring_module, loader, trainer

    ReluMonitor = _lightning()
    cb = ReluMonitor(log_every_n_steps=4)
    for run in ("a", "b"):
        logger = lightning_pl.loggers.TensorBoardLogger(str(tmp_path), name=run, version=0)
        trainer(lightning_pl, [cb], logger=logger, max_steps=8).fit(boring_module(lightning_pl), loader(8))
        acc = EventAccumulator(f"{tmp_path}/{run}/version_0", size_guidance={"images": 0})
        acc.Reload()
        assert [e.step for e in acc.Images("relumon/grad_flow")] == [8], run


def test_an_unbatched_conv_output_has_its_channels_as_units() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
    with relumon.watch(model, measure_every=1) as monitor:
        model(torch.randn(3, 7, 9)).sum().backward()  # (C, H, W): no batch dim
        report = monitor.report()
    assert (report["1"].units, report["1"].unit_dim, report["1"].samples) == (5, 0, 1)
