"""relumon.watch on plain torch models with a forced ground truth."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import relumon
import relumon.options
from tests.helpers import MLP, ConvNet, ReuseReLU, kill_units, train_steps


def test_forced_dead_layer_is_reported_exactly() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=3, batch=10)
    report = monitor.report()
    assert report.names == ["act1", "act2"]
    act1, act2 = report["act1"], report["act2"]
    assert (act2.units, act2.samples, act2.forwards, act2.dead_units) == (12, 30, 3, 12)
    assert act2.dead_fraction == 1.0 and act2.all_dead
    assert act1.units == 16 and act1.samples == 30 and act1.dead_units == 0
    assert act2.kind == "ReLU" and not act2.negative_regime
    assert act2.fed_by == "fc2" and act1.fed_by == "fc1"
    # act2 is dead, so no gradient reaches act1's output.
    assert act1.grad_norm == 0.0 and act1.backward_passes == 3
    assert report.dead_layers == [act2]


def test_exactly_k_dead_units() -> None:
    model = MLP()
    kill_units(model.fc1, [0, 5, 7])
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=4, batch=32)
    act1 = monitor.report()["act1"]
    assert act1.dead_units == 3
    assert act1.dead_indices == [0, 5, 7]
    assert act1.dead_fraction == pytest.approx(3 / 16)


def test_inplace_relu_conv_net_counts_dead_channels() -> None:
    model = ConvNet()
    kill_units(model.features[0], [1, 2])
    with torch.no_grad():  # BatchNorm recentres, so kill its channels through its own bias
        model.features[3].bias[[0, 4]] = -1e3
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, batch=4, in_shape=(3, 8, 8))
    report = monitor.report()
    first, second = report["features.1"], report["features.4"]
    assert (first.units, first.unit_dim, first.dead_indices) == (8, 1, [1, 2])
    assert (second.units, second.unit_dim, second.dead_indices) == (6, 1, [0, 4])
    assert first.samples == 8 and second.fed_by == "features.3"
    assert first.grad_norm > 0 and second.grad_norm > 0


def test_grad_norm_is_the_mean_of_the_output_gradient_norms() -> None:
    model = MLP()
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append(g.norm()))

    model.act2.register_forward_hook(record)
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=3)
    expected = torch.stack(seen).mean().item()
    assert monitor.report()["act2"].grad_norm == pytest.approx(expected, rel=1e-6)


def test_reused_module_gets_one_site_per_call_in_forward_order() -> None:
    model = ReuseReLU()
    kill_units(model.fc2, [0, 1])  # the second call sees exactly units 0 and 1 dead
    with torch.no_grad():
        model.fc2.bias[2:] = 100.0  # and the others always alive
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=3, in_shape=(4,))
    report = monitor.report()
    assert report.names == ["relu", "relu.call2", "relu.call3"]
    assert [x.units for x in report] == [6, 5, 3]
    assert [x.call for x in report] == [0, 1, 2]
    assert report["relu.call2"].dead_indices == [0, 1]
    assert all(x.samples == 30 and x.forwards == 3 for x in report)


def test_leaky_relu_stuck_negative_is_the_negative_regime() -> None:
    model = MLP(act=nn.LeakyReLU)
    kill_units(model.fc1, [3])
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with pytest.warns(relumon.DeadUnitsWarning, match="negative regime") as record:
        with relumon.watch(model, measure_every=1) as monitor:
            train_steps(model)
        report = monitor.report()
    assert report["act1"].dead_indices == [3] and report["act1"].negative_regime
    assert report["act2"].all_dead and report["act2"].kind == "LeakyReLU"
    assert len(record) == 1 and "act2" in str(record[0].message)
    assert report["act1"].grad_norm > 0  # leaky units still pass alpha * gradient


def test_eval_no_grad_and_inference_forwards_do_not_count_and_do_not_break_training() -> None:
    model = MLP()
    x = torch.randn(5, 8)
    with relumon.watch(model, measure_every=1) as monitor:
        model.eval()
        model(x)
        model.train()
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model(x)
        assert monitor.names == []  # nothing allocated, nothing counted
        train_steps(model, steps=2, batch=7)
        with torch.inference_mode():
            model(x)
        train_steps(model, steps=1, batch=7)
    report = monitor.report()
    assert report["act1"].samples == 21 and report["act1"].forwards == 3


def test_report_closes_the_window() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, batch=5)
        first = monitor.report()
        peek = monitor.report(reset=False)
        train_steps(model, steps=1, batch=5)
        second = monitor.report()
    assert (first.window, first["act1"].samples) == (0, 10)
    assert peek["act1"].samples == 0 and math.isnan(peek["act1"].dead_fraction)
    assert (second.window, second["act1"].samples) == (1, 5)
    assert monitor.window == 2


def _our_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_remove_is_idempotent_and_leaves_no_hook() -> None:
    model = ConvNet()
    before = _our_hooks(model)
    monitor = relumon.watch(model, measure_every=1)
    assert _our_hooks(model) > before and monitor.active
    monitor.remove()
    monitor.remove()
    assert _our_hooks(model) == before and not monitor.active
    train_steps(model, steps=1, batch=2, in_shape=(3, 8, 8))
    assert monitor.report()["features.1"].samples == 0 if monitor.names else True


def test_exception_inside_with_removes_hooks_and_propagates() -> None:
    model = MLP()
    with pytest.raises(KeyError, match="boom"):
        with relumon.watch(model, measure_every=1) as monitor:
            train_steps(model, steps=1)
            raise KeyError("boom")
    assert _our_hooks(model) == 0 and not monitor.active
    assert monitor.report()["act1"].samples == 10  # what was gathered stays readable


def test_the_dead_layer_warning_fires_once_per_layer() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1) as monitor:
            for _ in range(3):
                train_steps(model, steps=2, batch=4)
                monitor.report()
    dead = [w for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]
    assert len(dead) == 1
    message = str(dead[0].message)
    for expected in ("`act2`", "12 units", "8 samples over 2 steps", "learning rate", "LeakyReLU", "`fc2`"):
        assert expected in message
    assert monitor.alerted == {"act2"}


def test_on_dead_raise_and_callable_and_min_samples() -> None:
    def dead_model() -> MLP:
        model = MLP()
        with torch.no_grad():
            model.fc1.bias.fill_(-1e3)
        return model

    model = dead_model()
    with relumon.watch(model, measure_every=1, on_dead="raise") as monitor:
        train_steps(model, steps=1)
        with pytest.raises(relumon.RelumonError, match="act1"):
            monitor.report()

    seen: list[str] = []
    model = dead_model()
    with relumon.watch(
        model, measure_every=1, on_dead=lambda layer: seen.append(layer.name), min_samples=25
    ) as monitor:
        train_steps(model, steps=2, batch=10)  # 20 samples < 25: no alert yet
        monitor.report()
        assert seen == []
        train_steps(model, steps=3, batch=10)
        monitor.report()
    assert seen == ["act1"]


def test_state_dict_round_trip_keeps_alert_history() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=1)
        monitor.report()
    state = monitor.state_dict()
    assert state["alerted"] == ["act1"] and state["window"] == 1
    assert state["history"]["act1"]["dead_streak"] == [1] * 16
    with relumon.watch(model, measure_every=1, on_dead="raise") as resumed:
        resumed.load_state_dict(state)
        train_steps(model, steps=1)
        resumed.report()  # already alerted: no raise
    assert resumed.window == 2


def test_no_watched_layer_raises_naming_the_types() -> None:
    with pytest.raises(ValueError, match=r"ReLU, LeakyReLU"):
        relumon.watch(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match=r"GELU"):
        relumon.watch(MLP(), types=(nn.GELU,))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_dead": "halt"}, ValueError, "on_dead"),
        ({"min_samples": 0}, ValueError, "min_samples"),
        ({"types": (int,)}, TypeError, "types"),
        ({"unit_dim": "last"}, TypeError, "unit_dim"),
        ({"unit_dim": {"nope": 1}}, ValueError, "not watched"),
        ({"grad_scaler": 3.0}, TypeError, "GradScaler"),
        ({"measure_every": 0}, ValueError, "measure_every"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        relumon.watch(MLP(), **kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        relumon.watch("model")  # type: ignore[arg-type]


def test_unit_dim_override_and_sequence_activations() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.proj(x))

    model = Seq()
    kill_units(model.proj, [2])
    with relumon.watch(model, measure_every=1) as monitor:
        model(torch.randn(3, 5, 4)).sum().backward()  # (batch, seq, features)
    act = monitor.report()["act"]
    assert (act.units, act.unit_dim, act.samples, act.dead_indices) == (6, 2, 3, [2])

    model = Seq()
    with relumon.watch(model, measure_every=1, unit_dim={"act": 1}) as monitor:
        model(torch.randn(3, 5, 4)).sum().backward()
    assert monitor.report()["act"].units == 5


def test_nan_empty_and_1d_activations_do_not_crash() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        x = torch.randn(4, 8)
        x[0, 0] = float("nan")  # fc1 mixes it into every unit
        model(x).sum().backward()
        model(torch.randn(0, 8)).sum().backward()  # empty batch: no samples added
        model(torch.randn(8)).sum().backward()  # 1-D: one sample, units along dim 0
    act1 = monitor.report()["act1"]
    assert act1.samples == 5
    assert act1.nonfinite_units == 16 and act1.dead_units == 0
    assert act1.forwards == 2  # the empty batch is no forward of any sample


def test_shape_change_at_a_site_warns_and_skips() -> None:
    relu = nn.ReLU()
    with relumon.watch(relu, measure_every=1) as monitor:
        relu(torch.randn(2, 3, requires_grad=True)).sum().backward()
        with pytest.warns(relumon.RelumonWarning, match="unit_dim"):
            relu(torch.randn(2, 5, requires_grad=True)).sum().backward()
    layer = monitor.report()["root"]
    assert (layer.units, layer.samples) == (3, 2)


def test_report_is_printable_and_serialisable() -> None:
    import json

    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1)
    report = monitor.report()
    text = str(report)
    assert "act1" in text and "act2" in text and "dead %" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == "act1" and data["window"] == 0
    assert "act1" in report and "nope" not in report and len(report) == 2
    with pytest.raises(KeyError, match="act1"):
        report["nope"]
    assert set(report.scalars()) >= {"relumon/dead_fraction/act1", "relumon/grad_norm/act2"}


def test_importing_relumon_imports_no_optional_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, relumon; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard', 'transformers', 'accelerate')"
        " for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_default_measures_one_step_in_four_and_confirms_a_death_before_alerting() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    assert relumon.watch(model).measure_every == 4
    with relumon.watch(model) as monitor:
        with warnings.catch_warnings():
            warnings.simplefilter("error", relumon.DeadUnitsWarning)  # a sampled window never alerts on its own
            train_steps(model, steps=10, batch=4)  # steps 0, 2 and 5 are measured (a golden-ratio sequence)
            report = monitor.report()
        assert report.steps == 10
        assert [(x.samples, x.forwards, x.unmeasured_calls) for x in report] == [(12, 3, 7)] * 2
        assert report["act2"].all_dead and report["act2"].confirming and not report["act2"].exact
        assert "10 steps, 3 measured" in str(report) and "128?" not in str(report) and "12?" in str(report)
        with pytest.warns(relumon.DeadUnitsWarning, match=r"40 samples over 10 steps\)"):
            train_steps(model, steps=10, batch=4)  # the confirming window measures act2 on every step
            confirmed = monitor.report()
    assert confirmed["act2"].exact and confirmed["act2"].forwards == 10 and not confirmed["act2"].confirming
    assert confirmed["act1"].forwards < 10  # only the suspect pays for the confirmation


def test_step_boundaries_are_idempotent() -> None:
    # The root forward, new_step() and a finished backward may all mark one boundary: it counts once.
    model = MLP()
    with relumon.watch(model, measure_every=2) as monitor:
        for _ in range(4):
            monitor.new_step()
            monitor.new_step()
            model(torch.randn(3, 8)).sum().backward()
    report = monitor.report()
    assert report.steps == 4 and report["act1"].forwards == 2


def test_warnings_point_at_the_users_code() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1)
        with pytest.warns(relumon.DeadUnitsWarning) as record:
            monitor.report()
    assert record[0].filename == __file__


def test_a_failure_while_attaching_leaves_no_hook_behind() -> None:
    class Unhookable(nn.ReLU):
        def register_forward_hook(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise RuntimeError("no hooks here")

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), Unhookable())
    with pytest.raises(RuntimeError, match="no hooks here"):
        relumon.watch(model)
    assert _our_hooks(model) == 0


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_grad_through_is_the_gradient_that_reaches_the_pre_activation(act: type[nn.Module]) -> None:
    model = MLP(act=act)
    kill_units(model.fc2, [0, 1, 2])
    expected: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        args[0].register_hook(lambda g: expected.append(g.norm()))  # dL/d(pre-activation), the honest way

    model.act2.register_forward_hook(record)
    with relumon.watch(model, measure_every=1, grad_through=True) as monitor:
        train_steps(model, steps=3)
    act2 = monitor.report()["act2"]
    assert act2.grad_through_norm == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert act2.grad_through_norm < act2.grad_norm  # dead units let nothing (or alpha) through


def test_grad_through_shows_a_dead_layer_blocking_the_gradient() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1, grad_through=True, on_dead="ignore") as monitor:
        train_steps(model, steps=2)
    report = monitor.report()
    assert report["act2"].grad_norm > 0 and report["act2"].grad_through_norm == 0.0
    assert report.scalars()["relumon/grad_through_norm/act2"] == 0.0


def test_grad_through_is_off_by_default() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1)
    report = monitor.report()
    assert math.isnan(report["act1"].grad_through_norm)
    assert not any("grad_through" in tag for tag in report.scalars())


def test_options_are_declared_once_and_shared_by_every_front_door() -> None:
    import inspect

    options = relumon.Options(measure_every=1, min_samples=2)
    monitor = relumon.watch(MLP(), options=options, min_samples=3)
    assert monitor.options == options.replace(min_samples=3)
    assert monitor.measure_every == 1 and monitor.min_samples == 3  # option attributes stay readable
    monitor.remove()
    assert list(inspect.signature(relumon.watch).parameters)[2:] == relumon.options.option_names()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['measure_evry'\]"):
        relumon.watch(MLP(), measure_evry=2)
    with pytest.raises(TypeError, match="relumon.Options"):
        relumon.watch(MLP(), options={"measure_every": 2})
