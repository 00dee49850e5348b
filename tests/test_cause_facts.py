"""The cause of death names the right number and gives advice that follows the facts.

Each ground truth is independent of relumon: the update ratio of every optimizer step is recorded by hand
(snapshots around each ``opt.step()``), biases and rows are read from the model, and deaths are forced by
construction (a bias of -5 or -100, a sparse update written into ``.grad``).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import relumon
from relumon.cause import SAMPLED_WEIGHTS, Cause


def _causes(reports: list[relumon.Report], name: str) -> list[Cause]:
    return [r[name].cause for r in reports if r[name].cause is not None]


class _Ratios:
    """An independent record of ``||Δw|| / ||w||`` of every optimizer step of one weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.ratios: list[float] = []

    def step(self, opt: torch.optim.Optimizer) -> None:
        before = self.weight.detach().clone()
        opt.step()
        self.ratios.append(float((self.weight.detach() - before).norm() / before.norm()))


def test_one_producer_held_by_two_optimizers_keeps_the_larger_update() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    big = torch.optim.SGD([model[0].weight, model[0].bias], lr=1.0)  # steps first
    small = torch.optim.SGD([model[0].weight, model[2].weight], lr=1e-4)  # steps last: its record was kept
    ratios = _Ratios(model[0].weight)
    x = torch.full((8, 4), 0.1)
    reports = []
    with relumon.watch(model, optimizer=[big, small], measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 5):
            big.zero_grad()
            small.zero_grad()
            model(x).sum().backward()
            ratios.step(big)
            ratios.step(small)
            if step % 2 == 0:
                reports.append(monitor.report(step=step))
    cause = _causes(reports, "1")[0]
    assert ratios.ratios[0] == pytest.approx(8.0, rel=1e-6)  # the step that killed: 0.8 / 0.1
    assert cause.update_ratio == pytest.approx(max(ratios.ratios), rel=1e-5)
    assert cause.lr == 1.0 and cause.update_step == 1


def test_units_dead_from_initialisation_get_advice_about_the_init_not_the_learning_rate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias.fill_(3.0)
        model[0].bias[:4] = -5.0  # 4 of 8 units dead from the start: never alive
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    ratios = _Ratios(model[0].weight)
    x = torch.rand(16, 4) * 0.1
    reports = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 7):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            ratios.step(opt)
            if step % 2 == 0:
                reports.append(monitor.report(step=step))
    # The facts, independently: the dead units' rows and biases never moved; the live ones' did, by a lot.
    assert torch.equal(model[0].weight[:4], start[0][:4]) and torch.equal(model[0].bias[:4], start[1][:4])
    assert max(ratios.ratios) > 10 * 1e-3
    cause = _causes(reports, "1")[0]
    assert cause.never_alive and cause.windows is None and cause.bias_shift == 0.0
    assert "started dead" in cause.advice and "init of `0`" in cause.advice and "input's scale" in cause.advice
    assert "lower the learning rate" not in cause.advice


def test_recycled_units_that_die_again_are_measured_from_their_recycled_bias() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].bias.fill_(-20.0)  # every unit dead: the layer alerts and all three are recycled
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(8, 4)
    reports = []

    def window(after: Callable[[], Any] = lambda: None) -> None:
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        after()
        reports.append(monitor.report())

    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        window()
        assert reports[-1].recycled is not None and reports[-1].recycled.units == {"1": [0, 1, 2]}
        assert torch.equal(model[0].bias.detach(), torch.zeros(3))  # recycled: bias 0
        window()  # the recycled units live (fresh rows, bias 0, positive inputs fire some of them)
        alive = [u for u in range(3) if u not in reports[-1]["1"].dead_indices]
        assert alive

        def fall() -> None:  # the biases fall by 0.72 from their recycled 0, and the rows go to 0: dead
            with torch.no_grad():
                model[0].bias.fill_(-0.72)
                model[0].weight.zero_()

        window(fall)
        window()
    cause = _causes(reports, "1")[-1]
    assert reports[-1]["1"].cause is cause
    assert cause.bias_shift == pytest.approx(-0.72, abs=1e-6)  # not +19.3 from the pre-recycling -20
    assert "fell by 0.72" in cause.advice


def test_a_sparse_update_of_a_sampled_weight_is_measured_exactly_on_the_dying_units_rows() -> None:
    from relumon.cause import SAMPLE_CHUNK, _sample_stride

    fan_in = 9000
    model = nn.Sequential(nn.Linear(fan_in, 1), nn.ReLU(), nn.Linear(1, 1))
    assert model[0].weight.numel() > SAMPLED_WEIGHTS  # sampled in chunks
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[0].bias.fill_(0.1)
        model[2].weight.fill_(1.0)
    # Three columns outside every sampled chunk: the sampled ratio cannot see them.
    stride = _sample_stride(model[0].weight)
    sampled = {c * stride + i for c in range(SAMPLED_WEIGHTS // SAMPLE_CHUNK) for i in range(SAMPLE_CHUNK)}
    columns = [c for c in range(fan_in) if c not in sampled][:3]
    assert len(columns) == 3
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ratios = _Ratios(model[0].weight)
    x = torch.full((4, fan_in), 0.1)
    reports = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 7):
            opt.zero_grad()
            model(x).sum().backward()
            for p in model.parameters():
                assert p.grad is not None
                p.grad.zero_()
            if step == 3:  # one update touching 1 row x 3 columns: pre-activation 9.1 -> -5.9
                model[0].weight.grad[0, columns] = 50.0
            ratios.step(opt)
            if step % 2 == 0:
                reports.append(monitor.report(step=step))
    truth = ratios.ratios[2]
    assert truth == pytest.approx(50 * 3**0.5 / (0.01 * fan_in**0.5), rel=1e-5)  # 91.3
    cause = _causes(reports, "1")[0]
    assert cause.update_ratio == 0.0  # the sample missed it, as designed
    assert cause.own_update == pytest.approx(truth, rel=1e-5)  # the dying unit's own row, exactly
    assert "modest" not in cause.advice and "measured exactly" in cause.advice
    assert "lower the learning rate" in cause.advice


def test_a_learning_rate_spike_in_the_window_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    lrs: list[float] = []
    x = torch.full((8, 4), 0.1)
    reports = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 13):
            opt.param_groups[0]["lr"] = 8.0 if step == 5 else 0.02  # a x400 spike at step 5
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            model(x).sum().backward()
            if step == 5:  # the spike's own step happens to move nothing (a skipped batch, say)
                for p in model.parameters():
                    assert p.grad is not None
                    p.grad.zero_()
            if step == 6:  # the next one, at lr 0.02, kills: the bias falls by 0.02 * 8 * 100 = 16
                assert model[0].bias.grad is not None
                model[0].bias.grad.mul_(100.0)
            opt.step()
            if step % 4 == 0:
                reports.append(monitor.report(step=step))
    cause = _causes(reports, "1")[0]
    assert max(lrs) == 8.0 and lrs.index(8.0) + 1 == 5
    assert cause.update_step == 6 and cause.lr == 0.02  # the largest update, at the rate of its own step
    assert cause.peak_lr == 8.0 and cause.peak_lr_step == 5
    assert cause.lr is not None and cause.peak_lr > 10 * cause.lr
    assert "reached 8 at optimizer step 5" in cause.advice and "spiked" in cause.advice


def test_a_zero_learning_rate_at_the_named_step_still_gives_advice() -> None:
    # A schedule at lr 0 on the step with the largest update (a warm-up's first step, a linear decay's last), and a
    # larger lr elsewhere in the window: the advice names both, with no ratio to a zero lr (it raised
    # ZeroDivisionError inside report() under the Hugging Face Trainer's default linear schedule).
    from relumon.cause import advice

    text = advice(
        lr=0.0,
        update_ratio=0.5,
        update_step=3,
        bias_shift=-1.0,
        bias=-0.5,
        windows=1,
        grad_scale=None,
        fed_by="`fc`",
        negative_regime=False,
        has_optimizer=True,
        peak_lr=0.01,
        peak_lr_step=1,
    )
    assert "the learning rate reached 0.01 at optimizer step 1, while the lr above was 0" in text


def test_a_readers_columns_zeroed_by_recycling_are_not_read_as_an_update_of_its_own_units() -> None:
    """`2` reads the recycled units of site `1` (its 32 columns zeroed) and feeds site `3`. With lr 0 nothing moved
    its rows but recycling; then half of site `3` is killed through its bias alone. The cause named an exact own-rows
    update of 0.71 (the zeroed half of each row) and advised lowering the learning rate (of 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 1))
    assert model[2].weight.numel() > SAMPLED_WEIGHTS  # its update ratio is sampled: the own-rows figure is used
    with torch.no_grad():
        model[0].bias.fill_(3.0)
        model[0].bias[:32] = -100.0  # half of site `1` dead: recycled, and `2`'s 32 columns for them zeroed
        model[2].bias.fill_(5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(16, 8)
    reports: list[relumon.Report] = []

    def window(after: Callable[[], Any] = lambda: None) -> None:
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        after()
        reports.append(monitor.report())

    def kill() -> None:
        with torch.no_grad():
            model[2].bias[:100] = -1e4

    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore", recycle="dead") as monitor:
        window()
        recycled = reports[-1].recycled
        assert recycled is not None and recycled.units == {"1": list(range(32))}
        rows = model[2].weight.detach().clone()
        assert torch.equal(rows[:, :32], torch.zeros(200, 32))
        window(kill)  # killed after the window's steps: the next window finds them dead
        assert torch.equal(model[2].weight, rows)  # after recycling, nothing moved `2`'s rows
        window()  # (its report recycles site `3`'s units after naming their cause)
    cause = _causes(reports, "3")[-1]
    assert cause.own_update == 0.0
    assert cause.weight_shift is not None and abs(cause.weight_shift) < 1e-6
    assert "lower the learning rate" not in cause.advice and "fell by 1e+04" in cause.advice


def test_a_parametrized_producers_weight_is_left_unknown_not_read_as_unmoved() -> None:
    """A `weight_norm` producer's `weight` is a new tensor at each read: the one the cause kept never moved, so it
    said `weight_shift` 0.0 for rows that moved by a ratio of about 400, and had no learning rate at all. Now the
    weight's figures are unknown (None) and the lr is the one of the group holding the module's parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(16, 4)
    ratios: list[float] = []
    reports = []
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for step in range(1, 9):
            opt.zero_grad()
            (model(x).sum() * (1e4 if step == 3 else 1.0)).backward()  # step 3: a huge update kills units
            before = model[0].weight.detach().clone()
            opt.step()
            ratios.append(float((model[0].weight.detach() - before).norm() / before.norm()))
            if step % 4 == 0:
                reports.append(monitor.report(step=step))
    assert max(ratios) > 100  # the weight did move, a lot
    causes = _causes(reports, "1")
    assert causes and all(c.weight_shift is None and c.update_ratio is None for c in causes)
    assert all(c.lr == 0.01 for c in causes)
