"""No host reads between reports, and O(units) state with flat memory over long runs.

On the CPU a host read costs nothing, so timing cannot catch one. Instead every Tensor method that would force a
CUDA sync is wrapped, and any call made from relumon's code during training steps is recorded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

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
    from relumon.state import PENDING_PASSES, SiteStats

    for site in monitor._recorder.sites:
        tensors = [getattr(site.stats, name) for name in SiteStats.__slots__]
        nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        # One float32 per unit, six float64 counters, and the float32 slots of pending gradient norms.
        assert nbytes == site.stats.units * 4 + 6 * 8 + PENDING_PASSES * 4


#: relumon's own source files: a test that matched "relumon" anywhere in a path also counted torch's allocations
#: whenever the checkout (and its venv) lived in a folder named relumon.
RELUMON_DIR = str(Path(relumon.__file__).resolve().parent) + os.sep


def _is_relumons(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(RELUMON_DIR)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run a block with the cycle collector off, so that what it leaves behind does not depend on when it ran."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))


@pytest.mark.parametrize(
    ("net", "options"),
    [
        ("mlp", {"measure_every": 1}),
        ("mlp", {}),  # sampled steps: unmeasured calls carry the step-boundary hook
        ("mlp", {"track_grad": False}),
        ("resnet", {"measure_every": 1, "grad_through": True, "dormant_tau": 0.1}),
        ("mobilenet", {"measure_every": 1, "grad_through": True}),
        ("functional", {"functional": True, "measure_every": 1, "grad_through": True}),
    ],
)
def test_training_steps_leave_no_cyclic_garbage(net: str, options: dict) -> None:
    """Every measured step's hooks and closures are freed by reference counting alone: the collector finds nothing.

    Ground truth: the same steps of the same model without relumon, collected the same way.
    """
    from tests.nets import SmallMobileNetV2, SmallResNet, train
    from tests.test_diagnosis import FunctionalNet

    def run(model: nn.Module, steps: int) -> None:
        if net in ("resnet", "mobilenet"):
            train(model, steps=steps)
        elif net == "functional":
            train_steps(model, steps=steps, in_shape=(4,))
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            for _ in range(steps):
                loss = model(torch.randn(8, 16)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()

    def garbage_of(model: nn.Module, monitor: Optional[relumon.Monitor]) -> list[object]:
        run(model, 3)  # discovery and the first traced step are behind us
        if monitor is not None:
            monitor.report()
        run(model, 1)
        with collector_paused():
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                run(model, 12)
                gc.collect()
                garbage = list(gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        return garbage

    make = {"mlp": _mlp, "resnet": SmallResNet, "mobilenet": SmallMobileNetV2, "functional": FunctionalNet}[net]
    baseline = garbage_of(make(), None)
    model = make()
    with relumon.watch(model, **options) as monitor:
        garbage = garbage_of(model, monitor)
    # What relumon's hooks make per step: its own objects, closures of its code, and the handles of the tensor hooks
    # it registers (the RemovableHandle weakrefs the issue saw). None may be left for the collector.
    owned = [
        o
        for o in garbage
        if type(o).__module__.startswith("relumon") or _is_relumons(_code_file(o)) or isinstance(o, RemovableHandle)
    ]
    assert owned == [], f"relumon's objects in cyclic garbage: {owned[:10]}"
    # The counts are not compared: garbage left by earlier tests (torch.compile's fake tensors, caches dropped mid-run)
    # can become collectable during either run, whatever relumon does. The unwatched run shows what the steps alone do.
    assert not any(isinstance(o, RemovableHandle) for o in baseline)


def _code_file(obj: object) -> str:
    code = getattr(obj, "__code__", None)
    return code.co_filename if code is not None else ""


@pytest.mark.slow
def test_host_memory_stays_flat_over_a_long_run() -> None:
    """relumon's own host allocations do not grow with the steps (only the bounded report history does).

    Deterministic: the collector is off while steps run and a full collection precedes both snapshots (it also empties
    CPython's free lists, whose blocks tracemalloc would otherwise charge to whichever line first allocated them).
    Only allocations made by relumon's own files count.
    """
    model = _mlp()
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

    with relumon.watch(model, measure_every=1) as monitor, collector_paused():
        steps(200, monitor)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            steps(1000, monitor)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    relumon_growth = sum(
        stat.size_diff for stat in after.compare_to(before, "filename") if _is_relumons(stat.traceback[0].filename)
    )
    # 10 closed windows add 10 entries to the heatmap's timeline (bounded at 500 windows) and replace the last report.
    assert relumon_growth < 16 * 1024, f"relumon's host allocations grew by {relumon_growth} bytes over 1000 steps"
