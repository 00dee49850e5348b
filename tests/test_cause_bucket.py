"""The cause's per-step measurement of ``||Δw|| / ||w||`` against plain ground truth, and its cost rule.

`relumon.cause._Bucket` copies every producer's measured elements into two rows of a flat buffer per optimizer step
(before and after it), and folds up to `PENDING_STEPS` steps at a time with one ``index_add_`` and one
``vector_norm``. The oracle: the same elements read through their own views and ``torch.linalg.vector_norm`` one
producer and one step at a time, over whole and sampled weights, several dtypes, a storage swap
(``param.data = ...``) between steps, a channels-last weight, and generated runs of steps, reads, window closes,
overflowing steps and changes between steps (in place, and through ``w.data``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

import relumon
from relumon.cause import PENDING_STEPS, SAMPLE_CHUNK, SAMPLED_WEIGHTS, _Bucket, _flat, _Producer


def _oracle(producer: _Producer, before: torch.Tensor, after: torch.Tensor) -> float:
    """``||after - before|| / ||before||`` over the producer's measured elements, read one producer at a time."""

    def measured(w: torch.Tensor) -> torch.Tensor:
        flat = _flat(w)
        assert flat is not None
        if producer.stride:
            chunks = SAMPLED_WEIGHTS // SAMPLE_CHUNK
            flat = flat.as_strided((chunks, SAMPLE_CHUNK), (producer.stride, 1), flat.storage_offset())
        return flat.double()

    old, new = measured(before), measured(after)
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old))


def _producers(model: nn.Module) -> list[_Producer]:
    return [_Producer(name, m, 0, True) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _step(bucket: _Bucket, params: list[nn.Parameter], step: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One optimizer-like update of every weight between the pre- and post-hook; returns the weights before it."""
    bucket.before()
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 10.0 ** -torch.randint(1, 4, (1,), generator=gen))
    bucket.after(step, None)
    return before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_producers_ratio_matches_its_own_norms(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5),  # whole (15 elements)
        nn.Linear(200, 100),  # sampled (20,000 > 8,192)
        nn.Conv2d(4, 6, 3),  # whole
        nn.Linear(1, 1),  # whole, a single element
        nn.Conv2d(64, 64, 3),  # sampled
    ).to(dtype)
    producers = _producers(model)
    assert {bool(p.stride) for p in producers} == {True, False}  # both kinds in one bucket
    bucket = _Bucket(producers, [0] * len(producers))
    weights = [p.weight for p in bucket.producers]
    for step in range(1, 4):
        before = _step(bucket, weights, step, gen)  # type: ignore[arg-type]
        bucket.flush()
        ratios = bucket.max_ratio  # the running max over the steps so far
        expected = [_oracle(p, b, p.weight) for p, b in zip(bucket.producers, before)]  # type: ignore[arg-type]
        if step == 1:
            running = torch.tensor(expected)
        else:
            running = torch.maximum(running, torch.tensor(expected))
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the oracle's own difference is exact in fp64
        torch.testing.assert_close(ratios.double(), running.double(), rtol=tolerance, atol=0)


def test_a_weight_whose_storage_is_swapped_is_read_from_its_new_storage() -> None:
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(300, 300))
    producers = _producers(model)
    bucket = _Bucket(producers, [0, 0])
    _step(bucket, [p.weight for p in bucket.producers], 1, gen)  # type: ignore[misc]
    bucket.reset()
    for layer in model:
        assert isinstance(layer, nn.Linear)
        layer.weight.data = torch.full_like(layer.weight, 2.0)  # a new storage: the old views would read stale data
    bucket.before()
    with torch.no_grad():
        for layer in model:
            layer.weight.add_(1.0)  # 2 -> 3 everywhere: the ratio is exactly 0.5
    bucket.after(2, None)
    bucket.flush()
    torch.testing.assert_close(bucket.max_ratio, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_a_channels_last_weight_is_measured_in_memory_order() -> None:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    (producer,) = _producers(nn.Sequential(conv))
    bucket = _Bucket([producer], [0])
    (before,) = _step(bucket, [conv.weight], 1, gen)
    bucket.flush()
    assert bucket.max_ratio[0].item() == pytest.approx(_oracle(producer, before, conv.weight), rel=1e-5)


def _kernels_per_step(producers: int, steps: int = 1) -> int:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(producers)], nn.Linear(200, 100), nn.Linear(300, 100))
    bucket = _Bucket(_producers(model), [0] * (producers + 2))
    bucket.before()
    bucket.after(1, None)
    kernels = 0
    for step in range(2, 2 + steps):
        for hook in (bucket.before, functools.partial(bucket.after, step, None)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                hook()
            kernels += sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
            if hook == bucket.before:
                with torch.no_grad():
                    for layer in model:
                        layer.weight.add_(1e-3)  # the optimizer's update, between the hooks
    return kernels


def test_the_kernels_per_optimizer_step_do_not_grow_with_the_producers() -> None:
    """The rule that made `optimizer=` cheap on a model of thousands of tiny layers: the same ops for 3 or 300, in a
    step that only copies and over a whole block of pending steps with its fold."""
    assert _kernels_per_step(3) == _kernels_per_step(300)
    assert _kernels_per_step(3, PENDING_STEPS) == _kernels_per_step(300, PENDING_STEPS)


def _ops(hook: Callable[[], None]) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hook()
    return sorted(e.key for e in prof.key_averages() if e.key.startswith("aten::"))


def test_each_hook_only_copies_until_the_pending_steps_are_folded() -> None:
    """A pre-hook and a post-hook each copy (a ``cat`` and a ``stack``) and compute nothing; the post-hook that fills
    the last pending row folds them all (the norms)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(300, 300))
    bucket = _Bucket(_producers(model), [0, 0])
    assert bucket.capacity == PENDING_STEPS
    for step in range(1, PENDING_STEPS + 1):
        before = _ops(bucket.before)
        after = _ops(functools.partial(bucket.after, step, None))
        assert before == after if step < PENDING_STEPS else set(before) < set(after)
        assert "aten::cat" in before and "aten::stack" in before and "aten::linalg_vector_norm" not in before
    assert "aten::linalg_vector_norm" in after


def test_a_bucket_of_large_producers_keeps_fewer_pending_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copies stay within `PENDING_BYTES`, down to one step (its two copies) however large the producers."""
    from relumon import cause

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(300, 300))
    elements = 16 + SAMPLED_WEIGHTS
    monkeypatch.setattr(cause, "PENDING_BYTES", 3 * 2 * elements * 4 + 7)
    assert _Bucket(_producers(model), [0, 0]).capacity == 3
    monkeypatch.setattr(cause, "PENDING_BYTES", 1)
    bucket = _Bucket(_producers(model), [0, 0])
    assert bucket.capacity == 1 and bucket.copies.shape == (2, elements)


def test_a_weight_the_optimizer_step_replaces_is_read_after_the_step_from_its_new_storage() -> None:
    """An optimizer whose step assigns new tensors (``p.data = p.data - lr * grad``, a hand-written SGD) moves the
    weights to new storage between the pre- and the post-hook: the post-hook must read the new one (the pre-hook's
    views still read the old storage, which would give a ratio of 0)."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(300, 300))
    bucket = _Bucket(_producers(model), [0, 0])
    weights = [p.weight for p in bucket.producers]
    for step in (1, 2):
        bucket.before()
        before = [w.detach().clone() for w in weights]  # type: ignore[union-attr]
        for w in weights:
            assert w is not None
            w.data = w.data + torch.randn(w.shape, generator=gen) * 1e-2  # a new storage, in the step
        bucket.after(step, None)
        bucket.flush()
        expected = [_oracle(p, b, w) for p, b, w in zip(bucket.producers, before, weights)]  # type: ignore[arg-type]
        torch.testing.assert_close(bucket.max_ratio.double(), torch.tensor(expected).double(), rtol=1e-5, atol=0)
        bucket.reset()


def test_a_closed_window_lets_go_of_the_weights_the_views_held() -> None:
    """The cached views hold their weights' storage: after ``model.half()`` the old float32 weights must not stay in
    memory past the window's close (they would, until the next optimizer step, with views kept for good)."""
    import relumon

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 300)
    with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        old = model[0].weight.untyped_storage()._weak_ref()
        try:
            model.half()  # every weight gets new storage; training is over
            monitor.report()  # the window closes
            assert torch.UntypedStorage._expired(old)
        finally:
            torch.UntypedStorage._free_weak_ref(old)


def _measured(producer: _Producer, w: torch.Tensor) -> torch.Tensor:
    flat = _flat(w)
    assert flat is not None
    if producer.stride:
        chunks = SAMPLED_WEIGHTS // SAMPLE_CHUNK
        flat = flat.as_strided((chunks, SAMPLE_CHUNK), (producer.stride, 1), flat.storage_offset())
    return flat.double().clone()


_STEP = st.tuples(st.just("step"), st.integers(-4, 0), st.booleans())  # an update of 10**k, with or without a scale
_ACTIONS = st.lists(
    st.one_of(
        _STEP,
        _STEP,
        _STEP,  # steps are most of what happens: runs of them fill more than one block of pending steps
        st.tuples(st.just("poke"), st.integers(-3, 0), st.booleans()),  # a change between steps (True: via .data)
        st.tuples(st.just("step-overflow"), st.just(0), st.booleans()),  # an update that overflows to inf
        st.tuples(st.just("weights"), st.just(0), st.booleans()),  # between steps: NaN weights (True) or fresh ones
        st.tuples(st.just("skip"), st.just(0), st.just(False)),  # an optimizer step the bucket did not see
        st.tuples(st.just("step-closing"), st.integers(-4, 0), st.booleans()),  # a report inside the step's closure
        st.tuples(st.just("read"), st.just(0), st.just(False)),
        st.tuples(st.just("close"), st.just(0), st.just(False)),
    ),
    min_size=1,
    max_size=5 * PENDING_STEPS,
)


def _rank(ratio: float) -> float:
    return -0.5 if math.isnan(ratio) else ratio


@settings(max_examples=40, deadline=None)
@given(actions=_ACTIONS, seed=st.integers(0, 2**16), few=st.booleans())
@example(  # NaN weights after a finite step: the finite step is the largest measurable update
    actions=[("step", -2, False), ("weights", 0, True), ("step", -2, False), ("read", 0, False)], seed=0, few=False
)
@example(  # an overflow, then NaN updates: the overflow is the largest
    actions=[("step", -2, True), ("step-overflow", 0, False), ("step", -2, True), ("read", 0, False)], seed=0, few=True
)
def test_the_windows_largest_update_matches_the_steps_one_by_one(
    actions: list[tuple[str, int, bool]], seed: int, few: bool
) -> None:
    """Whatever the order of steps, reads (`flush`), window closes (also inside a step, between its hooks) and
    in-place changes between steps (which are not updates), the window's largest ratio, its step and its scale are
    those of the steps taken one by one."""
    from relumon import cause

    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(200, 100), nn.Conv2d(64, 64, 3))
    producers = _producers(model)
    budget = cause.PENDING_BYTES
    cause.PENDING_BYTES = 3 * 2 * (15 + 2 * SAMPLED_WEIGHTS) * 4 if few else budget  # three pending steps
    try:
        bucket = _Bucket(producers, [0] * len(producers))
    finally:
        cause.PENDING_BYTES = budget
    assert bucket.capacity == (3 if few else PENDING_STEPS)
    weights = [p.weight for p in bucket.producers]
    best: list[tuple[float, int, float]] = []  # per producer: (ratio, step, scale), the first step that reached it
    step = 0
    for action, size, scaled in actions:
        if action.startswith(("step", "skip")):
            step += 1
        if action.startswith("step"):
            bucket.before()
            old = [_measured(p, w) for p, w in zip(bucket.producers, weights)]  # type: ignore[arg-type]
            if action == "step-closing":  # the window closes between the pre- and the post-hook
                bucket.flush()
                bucket.reset()
                best = []
            with torch.no_grad():
                for w in weights:
                    assert w is not None
                    if action == "step-overflow":
                        w.add_(math.inf)  # its update is inf; the next one's, from inf weights, NaN
                    else:
                        w.add_(torch.randn(w.shape, generator=gen) * 10.0**size)
            scale = torch.tensor(float(2 ** (step % 7))) if scaled else None
            bucket.after(step, scale)
            for j, (p, w) in enumerate(zip(bucket.producers, weights)):
                new = _measured(p, w)  # type: ignore[arg-type]
                ratio = float(torch.linalg.vector_norm(new - old[j]) / torch.linalg.vector_norm(old[j]))
                this = (ratio, step, float(scale) if scale is not None else math.nan)
                # An overflow (inf) is the largest update, a NaN one (NaN weights) the smallest: the first step of
                # the largest is kept, with its own ratio.
                if j >= len(best):
                    best.append(this)
                elif _rank(ratio) > _rank(best[j][0]):
                    best[j] = this
        elif action == "poke":  # not an optimizer step: never read as an update
            for w in weights:
                assert w is not None
                if scaled:
                    w.data.mul_(1.0 + 10.0**size)  # a change PyTorch's version counter does not see
                else:
                    with torch.no_grad():
                        w.mul_(1.0 + 10.0**size)
        elif action == "weights":  # NaN weights give NaN updates until fresh weights replace them
            with torch.no_grad():
                for w in weights:
                    assert w is not None
                    w.copy_(torch.full_like(w, math.nan) if scaled else torch.randn(w.shape, generator=gen))
        elif action == "read":
            bucket.flush()
            if best:
                torch.testing.assert_close(
                    bucket.max_ratio,
                    torch.tensor([b[0] for b in best], dtype=torch.float64),
                    rtol=1e-5,
                    atol=0,
                    equal_nan=True,
                )
                assert bucket.max_step.tolist() == [b[1] for b in best]
                torch.testing.assert_close(
                    bucket.max_scale, torch.tensor([b[2] for b in best], dtype=torch.float32), equal_nan=True
                )
            else:
                assert bucket.max_step.tolist() == [-1] * len(producers)
        elif action == "close":
            bucket.flush()
            bucket.reset()
            best = []


def test_the_buckets_of_many_optimizers_share_the_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """One optimizer per parameter (PyTorch's optimizer step in backward) makes a bucket per optimizer: past
    `PENDING_BYTES` for all of them together, a bucket keeps one step (its two copies), and every ratio is still
    measured."""
    from relumon import cause

    row = 4 * 32 * 32  # one copy of a Linear(32, 32) weight, in bytes
    monkeypatch.setattr(cause, "PENDING_BYTES", 3 * 2 * PENDING_STEPS * row)  # room for three full buckets
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.ReLU())])
    opts = [torch.optim.SGD([layer.weight, layer.bias], lr=0.1) for layer in model if isinstance(layer, nn.Linear)]
    with relumon.watch(model, optimizer=opts, measure_every=1, on_dead="ignore") as monitor:
        for _ in range(3):
            model(torch.randn(4, 32)).pow(2).mean().backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        buckets = [bucket for opt in opts for bucket in monitor._cause._groups[opt].buckets]
        assert sorted(bucket.capacity for bucket in buckets) == [1, 1, 1, PENDING_STEPS, PENDING_STEPS, PENDING_STEPS]
        assert sum(bucket.copies.nbytes for bucket in buckets) == (3 * PENDING_STEPS + 3) * 2 * row
        for bucket in buckets:
            bucket.flush()
            assert float(bucket.max_ratio[0]) > 0 and int(bucket.max_step[0]) >= 1


def test_a_change_between_steps_is_never_read_as_an_update() -> None:
    """The copy before a step is taken in the pre-hook, so a change made between steps is left out, whether PyTorch
    counts it (an in-place change under ``torch.no_grad()``) or not (through ``w.data``)."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    bucket = _Bucket(_producers(model), [0])
    weight = model[0].weight
    ratios = []
    for change in ("data", "no_grad"):
        bucket.reset()
        with torch.no_grad():
            weight.fill_(1.0)
        bucket.before()
        bucket.after(1, None)  # a step that moved nothing
        if change == "data":
            weight.data.mul_(2.0)
        else:
            with torch.no_grad():
                weight.mul_(2.0)
        bucket.before()
        with torch.no_grad():
            weight.add_(0.02)  # the step: 2.00 -> 2.02 everywhere, a ratio of 0.01
        bucket.after(2, None)
        bucket.flush()
        ratios.append(float(bucket.max_ratio[0]))
        assert int(bucket.max_step[0]) == 2
    assert ratios == pytest.approx([0.01, 0.01])


@pytest.mark.slow
def test_a_compiled_optimizer_step_is_measured_without_recompiles() -> None:
    """PyTorch's recipe for a compiled optimizer step (``torch.compile`` around ``opt.step()``): relumon's step hooks
    run outside the trace, so their Python state (a row index that changes every step) sets off no recompile, and
    the figures are eager's."""
    from torch._dynamo.utils import counters

    figures = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        with relumon.watch(model, optimizer=opt, measure_every=1, on_dead="ignore") as monitor:
            for i in range(3 * PENDING_STEPS):
                if i == 3:
                    graphs = counters["stats"]["unique_graphs"]
                opt.zero_grad()
                model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).mean().backward()
                step()
            if compiled:
                assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled after the warm-up
            (bucket,) = monitor._cause._groups[opt].buckets
            bucket.flush()
            figures.append((bucket.max_ratio.tolist(), bucket.max_step.tolist()))
    torch._dynamo.reset()
    assert figures[0][1] == figures[1][1] and min(figures[0][1]) > 0
    assert all(math.isfinite(r) for r in figures[0][0])
    assert figures[1][0] == pytest.approx(figures[0][0], rel=1e-6)
