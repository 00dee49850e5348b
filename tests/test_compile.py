"""torch.compile: same report as eager, no graph breaks from relumon's hooks, no per-step recompiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relumon

pytestmark = pytest.mark.slow


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.ReLU(inplace=True),
        nn.Linear(12, 6),
        nn.LeakyReLU(),
        nn.Linear(6, 1),
    )
    with torch.no_grad():
        model[2].weight[:3].zero_()
        model[2].bias[:3] = -1e3  # units 0..2 of the second activation are dead
    return model


def run(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    for x in inputs:
        model.zero_grad()
        model(x).sum().backward()


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_report_equals_eager() -> None:
    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    eager_model = make_model()
    with relumon.watch(eager_model, measure_every=1) as eager:
        run(eager_model, inputs)
    compiled_model = make_model()
    with relumon.watch(compiled_model, measure_every=1) as compiled:  # watch first, then compile
        run(torch.compile(compiled_model), inputs)
    for e, c in zip(eager.report(), compiled.report()):
        assert (c.name, c.units, c.samples, c.forwards, c.backward_passes) == (
            e.name,
            e.units,
            e.samples,
            e.forwards,
            e.backward_passes,
        )
        assert c.dead_indices == e.dead_indices
        assert c.grad_norm == pytest.approx(e.grad_norm, rel=1e-5)
    assert compiled.report(reset=False)["3"].dead_indices == []  # closed above: a new window


def test_hooks_cause_no_graph_break_and_no_per_step_recompile() -> None:
    from torch._dynamo.utils import counters

    model = make_model()
    x = torch.randn(4, 8)
    with relumon.watch(model, measure_every=1) as monitor:
        run(model, [x])  # one eager step allocates relumon's state
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1

        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model)
        run(compiled, [x, x])
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        run(compiled, [x] * 5)
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup
        assert not counters["graph_break"]
    layer = monitor.report()["1"]
    # 8 training steps of 4 samples, plus explain's own forward (no backward).
    assert (layer.samples, layer.forwards, layer.backward_passes) == (36, 9, 8)


def test_compiled_code_measures_every_step_whatever_measure_every() -> None:
    model = make_model()
    with relumon.watch(model) as monitor:  # default measure_every=4 applies to eager steps only
        run(torch.compile(model), [torch.randn(4, 8) for _ in range(5)])
    report = monitor.report()
    assert report.steps == 5 and report["1"].forwards == 5 and report["1"].samples == 20


def test_compiled_deaths_are_each_their_own_root() -> None:
    """No eager autograd graph to walk under compile: upstream is unknown, so no death is called a consequence."""

    def cascade() -> nn.Sequential:
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
        with torch.no_grad():
            model[0].bias.fill_(-1e3)  # act 1 dies...
            model[2].bias.zero_()  # ...and leaves act 3 with an all-zero output
        return model

    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    eager_model, compiled_model = cascade(), cascade()
    with relumon.watch(eager_model, measure_every=1, on_dead="ignore") as eager:
        run(eager_model, inputs)
    with relumon.watch(compiled_model, measure_every=1, on_dead="ignore") as compiled:
        run(torch.compile(compiled_model), inputs)
    assert [x.name for x in eager.report().roots] == ["1"] and eager.last_report["3"].caused_by == "1"
    report = compiled.report()
    assert [x.name for x in report.dead_layers] == ["1", "3"]
    assert [x.name for x in report.roots] == ["1", "3"] and all(x.caused_by is None for x in report)


def test_compiled_steps_are_counted_as_in_eager() -> None:
    """`first_dead_step`, the timeline's steps and `state_dict()["steps"]` advance under compile as they do in eager,
    with `report()` given no step; a peek (`reset=False`) counts no step twice."""
    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    monitors = []
    for compile_it in (False, True):
        model = make_model()
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            step_model = torch.compile(model) if compile_it else model
            run(step_model, inputs[:3])
            monitor.report(reset=False)  # a peek in the middle of a window
            run(step_model, inputs[3:5])
            monitor.report()
            run(step_model, inputs[5:])
            monitor.report()
        monitors.append(monitor)
    eager, compiled = monitors
    assert eager.state_dict()["steps"] == 7 and compiled.state_dict()["steps"] == 7
    assert [step for step, _ in compiled.timeline] == [step for step, _ in eager.timeline] == [5, 7]
    first_dead = compiled.last_report["3"].first_dead_step
    assert first_dead.tolist() == eager.last_report["3"].first_dead_step.tolist() == [5, 5, 5] + [-1] * 9
    assert compiled.last_report.steps == eager.last_report.steps == 2
