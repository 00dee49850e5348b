"""The per-unit extremes that every measured call folds are the same whatever order the reductions run in.

`relumon.state.extreme_per_unit` picks, per layout, the order of reductions that reads an activation fastest (one
pass, positions first, or the batch first). The ground truth is the one-pass ``amax``/``amin`` over every dim but
the unit dim, over generated shapes, unit dims, dtypes, memory formats, NaN and infinities.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relumon.state import SiteStats, extreme_per_unit

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=5)


def _reference(x: torch.Tensor, unit_dim: int, op: str) -> torch.Tensor:
    dims = tuple(d for d in range(x.ndim) if d != unit_dim)
    return getattr(x, op)(dim=dims) if dims else x


@settings(max_examples=200, deadline=None)
@given(
    shape=shapes,
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32]),
    specials=st.booleans(),
    op=st.sampled_from(["amax", "amin"]),
)
def test_any_order_gives_the_one_pass_extremes(
    shape: list[int], data: st.DataObject, dtype: torch.dtype, specials: bool, op: str
) -> None:
    unit_dim = data.draw(st.integers(0, len(shape) - 1))
    gen = torch.Generator().manual_seed(len(shape) * 31 + sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    if specials and dtype.is_floating_point and x.numel() > 2:
        flat = x.view(-1)
        flat[0], flat[-1] = math.nan, math.inf
    reduce_dims = tuple(d for d in range(x.ndim) if d != unit_dim)
    got = extreme_per_unit(x, unit_dim, reduce_dims, getattr(torch, op)) if reduce_dims else x
    torch.testing.assert_close(got, _reference(x, unit_dim, op), equal_nan=True, rtol=0, atol=0)


# Both sides of POSITIONS_FIRST_FROM (256 positions): the batch first below it, the positions first from it.
@pytest.mark.parametrize("spatial", [(2, 2), (4, 4), (8, 8), (5, 7), (16, 16), (32, 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_layouts_on_both_sides_of_the_switch(spatial: tuple[int, int], channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, *spatial, generator=gen).relu()
    x[:, 2] = 0.0  # a dead channel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = extreme_per_unit(x, 1, (0, 2, 3), torch.amax)
    assert torch.equal(got, x.amax(dim=(0, 2, 3)))
    assert got[2] == 0


def test_site_stats_fold_matches_one_pass_over_calls() -> None:
    """A site folding calls of several spatial sizes keeps the same peaks and floors as one pass per call."""
    stats = SiteStats(4, 1, 4, torch.device("cpu"), cap=6.0)
    peak = torch.full((4,), -math.inf)
    floor = torch.full((4,), math.inf)
    gen = torch.Generator().manual_seed(1)
    for side in (2, 4, 16, 20):
        out = torch.randn(5, 4, side, side, generator=gen).clamp(0, 6)
        stats.observe(out)
        peak = torch.maximum(peak, out.amax(dim=(0, 2, 3)))
        floor = torch.minimum(floor, out.amin(dim=(0, 2, 3)))
    assert torch.equal(stats.peak, peak)
    assert stats.floor is not None and torch.equal(stats.floor, floor)
