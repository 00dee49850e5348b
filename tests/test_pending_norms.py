"""Pending gradient norms: what a site folds per backward pass adds up to one ``||grad||`` per pass, however the
passes fall between flushes, and the fold leaves autograd and grad mode as it found them.

An eager pass with a contiguous float32 gradient writes its squared norm into one of `PENDING_PASSES` slots; the
slots are folded into ``grad_norm_sum`` when full and before anything reads the state (`SiteStats.sums`, a device
move, a new window). The ground truth is ``torch.linalg.vector_norm`` of each gradient, in float64, summed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relumon.state import GRAD_NORM_SUM, PENDING_PASSES, SiteStats


def _stats(units: int = 5, through: bool = False) -> SiteStats:
    """A site's statistics; with ``through``, its gradient hook also measures the gradient through a ReLU."""
    return SiteStats(units, 1, 2, torch.device("cpu"), through_slope=0.0 if through else None)


def _grad_norm_sum(stats: SiteStats) -> float:
    return float(stats.sums()[GRAD_NORM_SUM])


def _pass(stats: SiteStats, grad: torch.Tensor) -> None:
    """One backward pass through a measured output, as the recorder hooks it (one hook per forward)."""
    out = torch.zeros(grad.shape, requires_grad=True)
    stats.grad_hook_for(out)(grad)


_kinds = st.sampled_from(["float32", "transposed", "bfloat16", "float64"])


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(_kinds, min_size=1, max_size=3 * PENDING_PASSES + 3),
    seed=st.integers(0, 2**16),
    through=st.booleans(),
)
def test_the_sum_is_one_norm_per_pass_whatever_the_mix_of_gradients(kinds: list[str], seed: int, through: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    stats = _stats(through=through)
    expected = 0.0
    for kind in kinds:
        grad = torch.randn(7, 5, generator=gen) * 10 ** float(torch.randint(-3, 3, (), generator=gen))
        if kind == "transposed":  # not contiguous: added at once
            grad = torch.randn(5, 7, generator=gen).t()
        elif kind != "float32":
            grad = grad.to(getattr(torch, kind))
        expected += float(torch.linalg.vector_norm(grad.double()))
        _pass(stats, grad)
    assert stats.n_backwards == len(kinds)
    assert _grad_norm_sum(stats) == pytest.approx(expected, rel=1e-5)


def test_a_second_read_adds_nothing_and_a_new_window_starts_from_zero() -> None:
    stats = _stats()
    grads = [torch.full((3, 5), float(i + 1)) for i in range(PENDING_PASSES + 3)]
    for grad in grads:
        _pass(stats, grad)
    expected = sum(float(torch.linalg.vector_norm(g.double())) for g in grads)
    assert _grad_norm_sum(stats) == pytest.approx(expected, rel=1e-6)
    assert _grad_norm_sum(stats) == pytest.approx(expected, rel=1e-6)  # flushed once: read again, the same
    _pass(stats, grads[0])  # pending when the window closes: it belongs to the closing window
    stats.reset()
    assert _grad_norm_sum(stats) == 0.0
    _pass(stats, grads[1])
    assert _grad_norm_sum(stats) == pytest.approx(float(torch.linalg.vector_norm(grads[1].double())), rel=1e-6)


def test_a_device_move_keeps_the_pending_passes() -> None:
    stats = _stats()
    _pass(stats, torch.ones(4, 5))  # sqrt(20)
    stats.move_to(torch.device("cpu"))  # flushes, and makes its slots again on the new device
    _pass(stats, torch.ones(4, 5))
    assert _grad_norm_sum(stats) == pytest.approx(2 * 20**0.5, rel=1e-6)


def test_a_later_pass_through_the_same_forward_is_not_counted() -> None:
    """Second order (a Hessian-vector product's second pass) reaches the hook again: only the first pass counts."""
    stats = _stats()
    out = torch.zeros(2, 5, requires_grad=True)
    hook = stats.grad_hook_for(out)
    hook(torch.ones(2, 5))
    hook(torch.full((2, 5), 100.0))
    assert stats.n_backwards == 1
    assert _grad_norm_sum(stats) == pytest.approx(10**0.5, rel=1e-6)


def test_a_gradient_that_requires_grad_is_folded_without_recording_a_graph() -> None:
    """``create_graph=True`` makes the gradients themselves require grad: the fold must not write into them."""
    x = torch.randn(6, 5, requires_grad=True)
    stats = _stats()
    out = torch.relu(x * 2)
    out.register_hook(stats.grad_hook_for(out))
    loss = (out * torch.arange(5.0)).sum()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert stats.n_backwards == 1
    assert grad.requires_grad  # training with the second-order graph goes on
    assert _grad_norm_sum(stats) == pytest.approx(float(torch.arange(5.0).repeat(6, 1).norm()), rel=1e-6)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_the_fold_leaves_grad_mode_and_the_output_alone(grad_enabled: bool) -> None:
    stats = SiteStats(3, 1, 4, torch.device("cpu"))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.set_grad_enabled(grad_enabled):
        out = x * 1.0
        stats.observe(out)
        assert torch.is_grad_enabled() == grad_enabled
    assert not stats.peak.requires_grad and stats.peak.grad_fn is None
    assert torch.equal(stats.peak, out.detach().amax(dim=(0, 2, 3)))
    if grad_enabled:
        out.sum().backward()  # the output's graph is intact
        assert x.grad is not None


def test_a_forward_with_dual_tensors_is_measured_and_later_steps_too() -> None:
    """Forward-mode AD (a JVP through the model) keeps a tangent with grad mode off: the fold must not see it (found in
    review: out= reductions refused it, and the site was disabled for the rest of the run)."""
    import torch.autograd.forward_ad as forward_ad

    import relumon

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with relumon.watch(model, measure_every=1) as monitor:
        with forward_ad.dual_level():
            out = model(forward_ad.make_dual(torch.randn(4, 8), torch.ones(4, 8)))
            assert forward_ad.unpack_dual(out).tangent is not None
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
        (layer,) = monitor.report().layers
    assert layer.disabled is None
    assert (layer.forwards, layer.backward_passes) == (4, 3)
