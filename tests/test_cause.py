"""The cause of death: learning rate, update size and bias shift, checked against values computed by hand.

The ground truth is forced: ``Killable`` is Linear(4->3) -> ReLU -> Linear(3->1) with every first-layer weight 0.1,
biases 1, head weights 1, and inputs of 0.1, so every unit is alive (pre-activation 1.04) and the loss ``out.sum()``
over a batch of 8 gives each first-layer bias the gradient 8 and each weight the gradient 0.8. One SGD step at lr 1
(the head in a param group at lr 0, so its weights stay 1) moves each bias by exactly -8 and each weight by -0.8,
an update ratio ||Δw||/||w|| of 0.8/0.1 = 8, and leaves every unit dead for good (pre-activation -7.28).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import relumon
from relumon.cause import Cause, advice

BATCH = 8
X = torch.full((BATCH, 4), 0.1)


class Killable(nn.Module):
    def __init__(self, in_features: int = 4, units: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, units)
        self.act = nn.ReLU()
        self.head = nn.Linear(units, 1)
        with torch.no_grad():
            self.fc1.weight.fill_(0.1)
            self.fc1.bias.fill_(1.0)
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc1(x)))


def sgd(model: Killable, lr: float = 1.0) -> torch.optim.SGD:
    """fc1 trains at ``lr``, the head in its own param group at lr 0."""
    return torch.optim.SGD(
        [{"params": model.fc1.parameters(), "lr": lr}, {"params": model.head.parameters(), "lr": 0.0}]
    )


def train(
    model: Killable,
    opt: Optional[torch.optim.Optimizer],
    monitor: relumon.Monitor,
    steps: int,
    report_every: int = 2,
    micro_batches: int = 1,
    scaler: Optional[torch.amp.GradScaler] = None,
    after_step: Callable[[int], None] = lambda step: None,
) -> list[relumon.Report]:
    """``steps`` optimizer steps (each over ``micro_batches`` backward passes), a report every ``report_every``."""
    reports = []
    for step in range(1, steps + 1):
        if opt is not None:
            opt.zero_grad()
        for _ in range(micro_batches):
            loss = model(X).sum()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if opt is not None and scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif opt is not None:
            opt.step()
        after_step(step)
        if step % report_every == 0:
            reports.append(monitor.report(step=step))
    return reports


def alerted_cause(reports: list[relumon.Report], name: str = "act") -> Cause:
    causes = [r[name].cause for r in reports if r[name].cause is not None]
    assert causes, "the dead layer got no cause"
    return causes[0]


def test_a_too_large_sgd_step_is_named_with_its_lr_update_and_bias_shift() -> None:
    model = Killable()
    opt = sgd(model, lr=1.0)
    with pytest.warns(relumon.DeadUnitsWarning) as caught:
        with relumon.watch(model, optimizer=opt, measure_every=1) as monitor:
            reports = train(model, opt, monitor, steps=4)
    # Window 0 (steps 1-2) saw the units alive at step 1's forward; step 1's update killed them; window 1 alerts.
    assert reports[0]["act"].dead_units == 0 and reports[0]["act"].cause is None
    layer = reports[1]["act"]
    assert layer.all_dead
    cause = layer.cause
    assert cause is not None
    assert cause.step == 4 and cause.units == 3 and cause.fed_by == "fc1"
    assert cause.lr == 1.0  # the param group holding fc1's weight, not the head's lr 0
    assert cause.update_step == 1
    assert cause.update_ratio == pytest.approx(8.0, rel=1e-6)  # 0.8 / 0.1, every element alike
    assert cause.bias_shift == pytest.approx(-8.0, abs=1e-6)  # -lr * batch * head weight
    assert cause.bias == pytest.approx(-7.0, abs=1e-6)
    assert cause.weight_shift == pytest.approx(6.0, rel=1e-5)  # row norm 0.2 -> 1.4
    assert cause.windows == 2 and cause.grad_scale is None
    message = str(caught[0].message)
    for fact in ("Cause (step 4)", "lr 1", "fell by 8", "= 8 at optimizer step 1", "lower the learning rate"):
        assert fact in message, (fact, message)
    assert "LeakyReLU(0.01)" in message
    assert layer.to_dict()["cause"]["lr"] == 1.0


def test_a_large_weight_is_sampled_in_chunks_and_a_uniform_update_still_reads_exactly() -> None:
    from relumon.cause import SAMPLED_WEIGHTS

    model = Killable(in_features=200, units=64)  # 12,800 weights: more than are copied per step
    assert model.fc1.weight.numel() > SAMPLED_WEIGHTS
    opt = sgd(model, lr=1.0)
    x = torch.full((BATCH, 200), 0.1)
    reports = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 5):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            if step % 2 == 0:
                reports.append(monitor.report(step=step))
    cause = alerted_cause(reports)
    assert cause.update_ratio == pytest.approx(8.0, rel=1e-5)  # every weight moved by -0.8 from 0.1
    assert cause.bias_shift == pytest.approx(-8.0, abs=1e-5) and cause.units == 64


def test_amp_scaler_scale_is_reported_and_the_update_is_unscaled() -> None:
    model = Killable()
    opt = sgd(model, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    with relumon.watch(model, optimizer=opt, grad_scaler=scaler, measure_every=1, on_dead="ignore") as monitor:
        reports = train(model, opt, monitor, steps=4, scaler=scaler)
    cause = alerted_cause(reports)
    assert cause.grad_scale == 256.0
    assert cause.update_ratio == pytest.approx(8.0, rel=1e-6)
    assert cause.bias_shift == pytest.approx(-8.0, abs=1e-6)
    assert "loss scale 256" in cause.advice


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches() -> None:
    model = Killable()
    opt = sgd(model, lr=1.0)
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        reports = train(model, opt, monitor, steps=4, micro_batches=2)
    cause = alerted_cause(reports)
    assert cause.update_step == 1  # the first optimizer step, made of two micro-batches
    assert cause.bias_shift == pytest.approx(-16.0, abs=1e-5)  # two micro-batches' gradients summed
    assert cause.update_ratio == pytest.approx(16.0, rel=1e-6)


def test_a_scheduler_gives_the_lr_of_the_step_of_death_not_the_current_one() -> None:
    model = Killable()
    opt = sgd(model, lr=1.0)
    # Steps 1-3 at 1e-3, step 4 at 1.0 (the kill), then 1e-3 again.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 3 else 1e-3)
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        reports = train(model, opt, monitor, steps=8, after_step=lambda step: sched.step())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    cause = alerted_cause(reports)
    assert cause.step == 6 and cause.update_step == 4
    assert cause.lr == 1.0
    # Since the start of window 1 (steps 3-4), the last in which the units lived: step 3 at 1e-3, step 4 at 1.
    assert cause.bias_shift == pytest.approx(-8.0 - 8e-3, abs=1e-5)
    assert cause.update_ratio > 1.0


def test_without_an_optimizer_the_cause_says_less_and_asks_for_one() -> None:
    model = Killable()

    def kill(step: int) -> None:
        if step == 4:
            with torch.no_grad():
                model.fc1.bias.sub_(8.0)

    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        assert monitor.optimizers == []
        reports = train(model, None, monitor, steps=8, after_step=kill)
    cause = alerted_cause(reports)
    assert cause.lr is None and cause.update_ratio is None and cause.update_step is None
    assert cause.bias_shift == pytest.approx(-8.0)  # from the start of window 1, the last the units lived in
    assert "pass `optimizer=`" in cause.advice


def test_optimizers_set_after_watch_are_measured_and_the_hooks_go_with_the_monitor() -> None:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    before = (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks))
    model = Killable()
    opt = sgd(model, lr=1.0)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=5.0)  # not the monitor's: never measured
    with pytest.raises(KeyboardInterrupt):
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            monitor.optimizers = [opt]
            reports = train(model, opt, monitor, steps=4, after_step=lambda step: other.step())
            raise KeyboardInterrupt
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == before
    cause = alerted_cause(reports)
    assert cause.lr == 1.0 and cause.update_step == 1


def test_bad_optimizers_get_a_clear_error_or_warning() -> None:
    model = Killable()
    with pytest.raises(TypeError, match=r"expected `optimizer` to be a torch.optim.Optimizer, a sequence of them"):
        relumon.watch(model, optimizer="sgd")
    with pytest.raises(TypeError, match=r"\['int'\]"):
        relumon.watch(model, optimizer=[sgd(model), 3])
    with relumon.watch(model, on_dead="ignore") as monitor:
        monitor.optimizers = ["adam"]
        train(model, None, monitor, steps=1)
        with pytest.warns(relumon.RelumonWarning, match=r"`Monitor.optimizers` should be a list"):
            monitor.report()


def test_a_resnet_branch_killed_by_one_huge_step_names_its_batchnorm_lr_and_shift() -> None:
    from tests.nets import SmallResNet

    model = SmallResNet()
    bn = model.layer1[0].bn1  # feeds `layer1.0.relu`, the first call of a BasicBlock's reused inplace ReLU
    others = [p for name, p in model.named_parameters() if not name.startswith("layer1.0.bn1.")]
    opt = torch.optim.SGD([{"params": others, "lr": 0.0}, {"params": bn.parameters(), "lr": 1.0}])
    gen = torch.Generator().manual_seed(0)
    alerts: list[relumon.LayerReport] = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead=alerts.append) as monitor:
        for step in range(1, 7):
            opt.zero_grad()
            model(torch.randn(6, 3, 12, 12, generator=gen)).sum().backward()
            if step == 1:  # one known, far too large step: bias -1000, BN scale 1 -> 2
                bn.bias.grad = torch.full_like(bn.bias, 1000.0)
                bn.weight.grad = torch.full_like(bn.weight, -1.0)
            opt.step()
            if step % 2 == 0:
                monitor.report(step=step)
    assert [x.name for x in alerts] == ["layer1.0.relu"]  # a branch death: the shortcut keeps the block alive
    cause = alerts[0].cause
    assert cause is not None and cause.fed_by == "layer1.0.bn1" and cause.step == 4
    assert cause.lr == 1.0 and cause.update_step == 1
    assert cause.update_ratio == pytest.approx(1.0, rel=1e-6)  # ||Δγ|| / ||γ|| = ||1|| / ||1||
    assert cause.bias_shift == pytest.approx(-1000.0)
    assert cause.weight_shift == pytest.approx(1.0)  # each channel's |γ| doubled


def test_advice_is_built_from_the_facts() -> None:
    common: dict[str, Any] = dict(update_step=3, windows=1, grad_scale=None, fed_by="fc", has_optimizer=True)
    large = advice(lr=2.0, update_ratio=0.3, bias_shift=-20.0, bias=-19.9, negative_regime=False, **common)
    assert "fell by 20 within one window" in large and "lr 2" in large and "0.3" in large
    assert "lower the learning rate (about 0.0067 would make it 1e-3)" in large and "LeakyReLU" in large
    leaky = advice(lr=2.0, update_ratio=0.3, bias_shift=-20.0, bias=-19.9, negative_regime=True, **common)
    assert "LeakyReLU" not in leaky
    drift = advice(lr=0.01, update_ratio=1e-3, bias_shift=-0.5, bias=-0.4, negative_regime=False, **common)
    assert "drifted down" in drift and "lower the learning rate" not in drift
    still = advice(lr=0.01, update_ratio=1e-4, bias_shift=0.0, bias=0.1, negative_regime=False, **common)
    assert "did not move" in still and "init of `fc`" in still


def test_the_alert_reaches_tensorboard_as_text_and_relumon_summary_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from relumon.cli import main, read_alerts

    model = Killable()
    opt = sgd(model, lr=1.0)
    writer = SummaryWriter(str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        with relumon.watch(model, optimizer=opt, measure_every=1) as monitor:
            for step in range(1, 7):
                opt.zero_grad()
                model(X).sum().backward()
                opt.step()
                if step % 2 == 0:
                    monitor.log(writer, step)
    writer.close()
    alerts = read_alerts(str(tmp_path))
    assert list(alerts) == ["run"] and [a["step"] for a in alerts["run"]] == [4]  # once, when it alerted
    text = alerts["run"][0]["text"]
    assert "`act`" in text and "Cause (step 4)" in text and "lr 1" in text
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "alert at step 4:" in out and "lr 1" in out
