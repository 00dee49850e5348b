"""The cause's per-step measurement of ``||Δw|| / ||w||`` against plain ground truth, and its cost rule.

`relumon.cause._Bucket` copies every producer's measured elements into one flat buffer and takes the per-producer
norms with one ``index_add_`` and one row sum. The oracle: the same elements read through their own views and
``torch.linalg.vector_norm`` one producer at a time, over whole and sampled weights, several dtypes, a storage swap
(``param.data = ...``) between steps, and a channels-last weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from relumon.cause import SAMPLE_CHUNK, SAMPLED_WEIGHTS, _Bucket, _flat, _Producer


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
    torch.testing.assert_close(bucket.max_ratio, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_a_channels_last_weight_is_measured_in_memory_order() -> None:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    (producer,) = _producers(nn.Sequential(conv))
    bucket = _Bucket([producer], [0])
    (before,) = _step(bucket, [conv.weight], 1, gen)
    assert bucket.max_ratio[0].item() == pytest.approx(_oracle(producer, before, conv.weight), rel=1e-5)


def _kernels_per_step(producers: int) -> int:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(producers)], nn.Linear(200, 100), nn.Linear(300, 100))
    bucket = _Bucket(_producers(model), [0] * (producers + 2))
    bucket.before()
    bucket.after(1, None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bucket.before()
        bucket.after(2, None)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_the_kernels_per_optimizer_step_do_not_grow_with_the_producers() -> None:
    """The rule that made `optimizer=` cheap on a model of thousands of tiny layers: the same ops for 3 or 300."""
    assert _kernels_per_step(3) == _kernels_per_step(300)


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
