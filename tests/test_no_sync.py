"""No host reads between reports, and O(units) state with flat memory over long runs.

On the CPU a host read costs nothing, so timing cannot catch one. Instead every Tensor method that would force a
CUDA sync is wrapped, and any call made from relumon's code during training steps is recorded.
"""

from __future__ import annotations

import sys
import tracemalloc
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import relumon
from tests.helpers import ConvNet, ReuseReLU, train_steps

#: Tensor methods that read device memory on the host (a sync on CUDA), or can.
HOST_READS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "to",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__repr__",
    "__format__",
)


def _called_from_relumon() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.split(".")[0] == "relumon":
            return True
        if name.startswith("tests."):
            return False
        frame = frame.f_back
    return False


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record the name of every host-reading Tensor method called from relumon's code."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, _name: str = name, _orig: Callable = original, **kw: Any) -> Any:
            if _called_from_relumon():
                calls.append(_name)
            return _orig(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield calls


@pytest.mark.parametrize(
    "options",
    [{"measure_every": 1}, {"measure_every": 4}, {"measure_every": 1, "grad_through": True, "dormant_tau": 0.1}],
)
def test_training_steps_read_nothing_on_the_host(host_reads: list[str], options: dict) -> None:
    model = ConvNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    with relumon.watch(model, grad_scaler=scaler, **options) as monitor:
        train_steps(model, steps=1, batch=4, in_shape=(3, 8, 8))  # allocation step
        monitor.report()
        host_reads.clear()
        for _ in range(6):
            loss = model(torch.randn(4, 3, 8, 8)).sum()
            scaler.scale(loss).backward()
        assert host_reads == [], f"relumon read device memory on the host during steps: {host_reads}"
        monitor.report()
    assert host_reads, "the detector must see report()'s one transfer, or it detects nothing"


def test_optimizer_steps_measured_for_the_cause_read_nothing_on_the_host(host_reads: list[str]) -> None:
    """Several optimizers and param groups, a scheduler, a GradScaler and gradient accumulation."""
    model = ConvNet()
    head, features = model.head, model.features
    sgd = torch.optim.SGD(
        [{"params": features[0].parameters()}, {"params": features[2:].parameters(), "lr": 0.1}], lr=0.01, momentum=0.9
    )
    adam = torch.optim.Adam(head.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    gen = torch.Generator().manual_seed(0)

    def steps(n: int) -> None:
        for _ in range(n):
            for _ in range(2):  # two micro-batches per optimizer step
                scaler.scale(model(torch.randn(4, 3, 8, 8, generator=gen)).sum()).backward()
            for opt in (sgd, adam):
                scaler.step(opt)
            scaler.update()
            sgd.zero_grad()
            adam.zero_grad()
            sched.step()

    with relumon.watch(model, grad_scaler=scaler, optimizer=[sgd, adam], measure_every=1) as monitor:
        steps(1)  # allocation step
        monitor.report()
        host_reads.clear()
        steps(5)
        assert host_reads == [], f"relumon read device memory on the host during steps: {host_reads}"
        report = monitor.report()
        assert monitor._cause._groups[sgd].steps == 6 and monitor._cause._groups[adam].steps == 6
    assert report.layers[0].fed_by == "features.0"


def test_relu6_saturation_and_cascades_read_nothing_on_the_host(host_reads: list[str]) -> None:
    from tests.nets import SmallMobileNetV2, SmallResNet, train

    for model in (SmallMobileNetV2(), SmallResNet()):
        with relumon.watch(model, measure_every=1, grad_through=True) as monitor:
            train(model, steps=1)  # allocation step
            host_reads.clear()
            train(model, steps=2)
            assert host_reads == []
        assert monitor.report().layers[0].saturated_units == 0


def test_reused_modules_and_eval_forwards_read_nothing_either(host_reads: list[str]) -> None:
    model = ReuseReLU()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, in_shape=(4,))
        host_reads.clear()
        train_steps(model, steps=3, in_shape=(4,))
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4))
        assert host_reads == []
    assert [x.samples for x in monitor.report()] == [50, 50, 50]  # 5 training steps of 10; eval not counted


def test_functional_capture_reads_nothing_on_the_host(host_reads: list[str]) -> None:
    from tests.test_diagnosis import FunctionalNet

    model = FunctionalNet()
    with relumon.watch(model, functional=True, measure_every=1, grad_through=True) as monitor:
        train_steps(model, steps=1, in_shape=(4,))
        host_reads.clear()
        train_steps(model, steps=3, in_shape=(4,))
        assert host_reads == []
    assert len(monitor.report()) == 4


def test_state_is_o_units() -> None:
    model = ConvNet()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, batch=4, in_shape=(3, 8, 8))
    for site in monitor._recorder.sites:
        tensors = [
            site.stats.peak,
            site.stats.samples,
            site.stats.forwards,
            site.stats.backwards,
            site.stats.grad_norm_sum,
        ]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        assert nbytes == site.stats.units * 4 + 4 * 8  # one float32 per unit, four float64 counters


@pytest.mark.slow
def test_host_memory_stays_flat_over_a_long_run() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)

    def steps(n: int, monitor: relumon.Monitor) -> None:
        for i in range(n):
            loss = model(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (i + 1) % 100 == 0:
                monitor.report()

    with relumon.watch(model, measure_every=1) as monitor:
        steps(300, monitor)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        steps(3000, monitor)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    relumon_growth = sum(
        stat.size_diff for stat in after.compare_to(before, "filename") if "relumon" in stat.traceback[0].filename
    )
    assert relumon_growth < 16 * 1024, f"relumon's host allocations grew by {relumon_growth} bytes over 3000 steps"
