"""relumon never breaks the training it watches: saved and copied models, torch.func, dtypes, leaks, interrupts and
errors of its own. (Spawned DDP and FSDP2 are in test_distributed.py.)"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import relumon
from relumon.state import SiteStats
from tests.helpers import MLP, kill_units, train_steps


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock shape: one inplace ReLU called twice, the second after ``out += identity``."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


def step(model: nn.Module, batch: int = 8, shape: tuple[int, ...] = (8,), seed: int = 0) -> None:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).sum().backward()


def samples(monitor: relumon.Monitor) -> dict[str, int]:
    return {layer.name: layer.samples for layer in monitor.report(reset=False)}


# ---------------------------------------------------------------------- pickling (spawned workers need it)


def test_reports_and_an_unfitted_or_fitted_callback_pickle(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import boring_module, loader, trainer

    callback = ReluMonitor(measure_every=1, log_every_n_steps=2)
    assert isinstance(pickle.loads(pickle.dumps(callback)), ReluMonitor)
    trainer(pl, [callback], max_steps=4).fit(boring_module(pl, dead_fc2=True), loader())
    again = pickle.loads(pickle.dumps(callback))
    assert again.last_report is not None and again.last_report.to_dict() == callback.last_report.to_dict()
    assert again.state_dict() == callback.state_dict()  # the death history travels
    layer = pickle.loads(pickle.dumps(callback.last_report["net.3"]))
    assert layer.all_dead and layer.dead_mask.all()


def test_a_monitor_refuses_to_pickle_or_copy_with_a_clear_error() -> None:
    model = MLP()
    with relumon.watch(model) as monitor:
        for attempt in (pickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match=r"state_dict\(\)"):
                attempt(monitor)


# ---------------------------------------------------------------------- saved and copied models


@pytest.mark.parametrize("options", [{}, {"functional": True, "grad_through": True}])
def test_a_watched_model_saves_before_and_after_steps_and_the_loaded_copy_is_not_watched(options: dict) -> None:
    model = BasicBlock()
    with relumon.watch(model, measure_every=1, **options) as monitor:
        saved_before = io.BytesIO()
        torch.save(model, saved_before)  # before any step: the producer tracer's hooks are still on
        step(model, shape=(4, 5, 5))
        saved_after = io.BytesIO()
        torch.save(model, saved_after)
        pickled = pickle.dumps(model)
        seen = samples(monitor)
        assert seen == {"relu": 8, "relu.call2": 8}
        for blob in (saved_before, saved_after):
            blob.seek(0)
            loaded = torch.load(blob, weights_only=False)
            step(loaded, shape=(4, 5, 5))
        step(pickle.loads(pickled), shape=(4, 5, 5))
        assert samples(monitor) == seen  # training the loaded copies changed nothing
        step(model, shape=(4, 5, 5))  # the original is still watched
        assert samples(monitor) == {"relu": 16, "relu.call2": 16}


def test_a_deep_copy_never_feeds_the_original_monitor() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=2, batch=8)
        clone = copy.deepcopy(model)
        ema = torch.optim.swa_utils.AveragedModel(model)  # deep-copies too, as EMA and SWA do
        train_steps(clone, steps=3, batch=8)
        ema.update_parameters(model)
        ema(torch.randn(8, 8)).sum().backward()
        assert samples(monitor) == {"act1": 16, "act2": 16}
        train_steps(model, steps=1, batch=8)
        assert samples(monitor) == {"act1": 24, "act2": 24}
    assert len(monitor.report().layers) == 2  # no call site of the copies crept in


def test_a_shallow_copy_of_a_watched_activation_is_not_watched() -> None:
    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        shallow = copy.copy(model.act1)  # shares the hook dicts with the original
        shallow(torch.randn(5, 16, requires_grad=True)).sum().backward()
        assert samples(monitor) == {}


# ---------------------------------------------------------------------- torch.func


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_per_sample_gradients_under_vmap_grad_are_skipped_once_and_steps_around_them_count_exactly() -> None:
    model = MLP()
    x, y = torch.randn(6, 8), torch.randn(6, 1)
    expected = per_sample_grads(model, x, y)
    with relumon.watch(model, measure_every=1) as monitor:
        train_steps(model, steps=1, batch=8)
        with pytest.warns(relumon.RelumonWarning, match="torch.func transform") as record:
            got = per_sample_grads(model, x, y)
            per_sample_grads(model, x, y)
        assert len([w for w in record if "torch.func" in str(w.message)]) == 1  # said once
        train_steps(model, steps=1, batch=8)
        report = monitor.report()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # the transform's result is untouched
    assert [(layer.samples, layer.forwards, layer.backward_passes) for layer in report] == [(16, 2, 2)] * 2
    assert report.steps == 2


def test_an_ensemble_with_stack_module_state_and_vmap_is_skipped() -> None:
    models = [MLP() for _ in range(3)]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = models[0]
    x = torch.randn(5, 8)
    with relumon.watch(base, measure_every=1) as monitor, warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.RelumonWarning)
        out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        out.sum().backward()
        assert out.shape == (3, 5, 1)
        train_steps(base, steps=1, batch=4)
        assert samples(monitor) == {"act1": 4, "act2": 4}


# ---------------------------------------------------------------------- dtypes


def twin_models() -> tuple[nn.Module, nn.Module]:
    model = MLP()
    kill_units(model.fc2, [0, 3])
    return model, copy.deepcopy(model).double()


def test_a_float64_model_trains_with_the_figures_of_float32() -> None:
    options = dict(measure_every=1, dormant_tau=0.5, grad_through=True)
    reports = []
    for model in twin_models():
        with relumon.watch(model, **options) as monitor:
            dtype = next(model.parameters()).dtype
            for seed in range(3):
                x = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
                model(x).sum().backward()
            reports.append(monitor.report())
    single, double = reports
    for a, b in zip(single, double):
        assert (a.samples, a.dead_units, a.dormant_units) == (b.samples, b.dead_units, b.dormant_units)
        assert a.dead_units == (2 if a.name == "act2" else 0)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
        assert b.grad_through_norm == pytest.approx(a.grad_through_norm, rel=1e-5)
        assert torch.allclose(b.dormant_scores, a.dormant_scores, rtol=1e-5)


class IntegerActivation(nn.Module):
    """A ReLU applied to integer codes (quantised features): the activation itself is an int64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.relu(codes)


def test_integer_activations_get_dormant_scores() -> None:
    model = IntegerActivation()
    codes = torch.tensor([[0, 3, -2, 9], [0, 1, -5, 3]])  # per-unit mean |relu|: 0, 2, 0, 6; layer mean 2
    with relumon.watch(model, dormant_tau=0.1, measure_every=1) as monitor:
        model(codes)
        layer = monitor.report()["relu"]
    assert layer.samples == 2 and layer.dead_units == 2
    assert layer.dormant_scores.tolist() == pytest.approx([0.0, 1.0, 0.0, 3.0])
    assert layer.dormant_units == 2


def test_grad_through_frees_every_activation_after_its_step() -> None:
    model = MLP()
    outputs: list[weakref.ref] = []
    with relumon.watch(model, grad_through=True, measure_every=1) as monitor:
        # Registered after relumon's: sees the same output tensors relumon hooks.
        handle = model.act1.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
        train_steps(model, steps=5, batch=8)
        report = monitor.report()
        handle.remove()
    gc.collect()
    assert len(outputs) == 5
    assert [ref() is None for ref in outputs] == [True] * 5  # none kept alive by relumon's gradient hooks
    assert report["act1"].backward_passes == 5 and report["act1"].grad_through_norm > 0


class Interruptible(nn.Module):
    """Calls F.relu in forward; raises KeyboardInterrupt (Ctrl-C) mid-forward when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 1)
        self.interrupt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.interrupt:
            raise KeyboardInterrupt
        return self.fc2(h)


def test_a_keyboard_interrupt_in_forward_leaves_no_mode_behind_and_figures_stay_exact() -> None:
    model = Interruptible()
    assert torch._C._len_torch_function_stack() == 0
    with relumon.watch(model, functional=True, measure_every=1) as monitor:
        step(model)
        model.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            step(model)
        model.interrupt = False
        # The user's own ops afterwards are not recorded as call sites of the interrupted module.
        torch.relu(torch.randn(3, 6, requires_grad=True)).sum().backward()
        report = monitor.report()  # relumon's next call takes the stale mode off
        assert torch._C._len_torch_function_stack() == 0
        assert report.names == ["F.relu"]
        assert report["F.relu"].samples == 16  # the interrupted forward's F.relu ran before the interrupt
        step(model)
        assert torch._C._len_torch_function_stack() == 0
        assert monitor.report()["F.relu"].samples == 8
        model.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            step(model)
        model.interrupt = False
        step(model)  # the next forward leaves the stale mode first, and is measured as usual
        assert torch._C._len_torch_function_stack() == 0
        assert monitor.report()["F.relu"].samples == 16
    assert torch._C._len_torch_function_stack() == 0


def test_removing_the_monitor_after_an_interrupt_leaves_no_mode_behind() -> None:
    model = Interruptible()
    monitor = relumon.watch(model, functional=True)
    model.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        step(model)
    monitor.remove()
    assert torch._C._len_torch_function_stack() == 0


# ---------------------------------------------------------------------- errors of relumon's own


@pytest.fixture
def not_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELUMON_STRICT", raising=False)


def fail_on_12_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make relumon's statistics fail for the 12-unit site (``act2`` of the MLP) only."""
    original = SiteStats.observe

    def observe(self: SiteStats, out: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.units == 12:
            raise RuntimeError("injected failure")
        original(self, out, *args, **kwargs)

    monkeypatch.setattr(SiteStats, "observe", observe)


def fit(model: nn.Module, steps: int = 4) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 8, generator=gen)).pow(2).mean().backward()
        opt.step()


def test_an_error_inside_relumon_disables_the_site_warns_once_and_training_goes_on(
    not_strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, model = MLP(), MLP()
    model.load_state_dict(reference.state_dict())
    fit(reference)
    fail_on_12_units(monkeypatch)
    with relumon.watch(model, measure_every=1) as monitor:
        with pytest.warns(relumon.RelumonWarning) as record:
            fit(model)
        report = monitor.report()
    messages = [str(w.message) for w in record if "inside relumon" in str(w.message)]
    assert len(messages) == 1 and "`act2`" in messages[0] and "RuntimeError: injected failure" in messages[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))  # same training
    assert report["act2"].disabled == "RuntimeError: injected failure" and report["act2"].samples == 0
    assert report["act1"].disabled is None and report["act1"].samples == 32  # the other site counts exactly
    assert report["act2"].to_dict()["disabled"] == "RuntimeError: injected failure"
    assert "`act2` disabled after an error inside relumon" in str(report)


def test_an_error_in_a_gradient_hook_is_contained_too(not_strict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import relumon.state

    def broken(stats: relumon.state.SiteStats, grad: torch.Tensor) -> None:
        raise ValueError("injected in backward")

    model = MLP()
    with relumon.watch(model, measure_every=1) as monitor:
        monkeypatch.setattr(relumon.state.SiteStats, "_add_norm", broken)  # what a gradient hook folds a pass with
        with pytest.warns(relumon.RelumonWarning, match="injected in backward"):
            fit(model, steps=2)
        report = monitor.report()
    assert all(layer.disabled == "ValueError: injected in backward" for layer in report)


def test_strict_mode_raises_errors_inside_relumon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELUMON_STRICT", "1")
    fail_on_12_units(monkeypatch)
    model = MLP()
    with relumon.watch(model, measure_every=1), pytest.raises(RuntimeError, match="injected failure"):
        fit(model, steps=1)


def test_user_errors_still_raise_in_watch(not_strict: None) -> None:
    with pytest.raises(ValueError, match="no module of the watched types"):
        relumon.watch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not watched"):
        relumon.watch(MLP(), unit_dim={"fc1": 1})
