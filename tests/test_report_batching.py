"""Report time works on every site at once: the batched history, counts and report objects against plain oracles.

`report()` folds every site's death history in one pass over all sites (`fold_histories`), counts every site's dead
and NaN peaks from one cumulative sum (`segment_counts`) and builds its `LayerReport`s without the frozen dataclass's
``__init__`` (`LayerReport._from_fields`). Each is checked here against the obvious per-site code it replaces.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import relumon
from relumon.diagnosis import SiteHistory, fold_histories
from relumon.report import LayerReport
from relumon.segments import segment_counts


class PlainHistory:
    """The death history of one site as plain Python lists, one unit at a time: the oracle."""

    def __init__(self, units: int) -> None:
        self.first = [-1] * units
        self.streak = [0] * units
        self.revived_total = 0
        self.pending: list[bool] = [False] * units
        self.recycled_total = 0
        self.checked = self.dead_again = 0

    def recycle(self, indices: list[int]) -> None:
        for i in indices:
            self.first[i], self.streak[i], self.pending[i] = -1, 0, True
        self.recycled_total += len(indices)

    def fold(self, dead: Optional[list[bool]], step: int, permanent_after: int) -> dict[str, object]:
        revived = 0
        if dead is not None:
            if any(self.pending):
                self.checked = sum(self.pending)
                self.dead_again = sum(p and d for p, d in zip(self.pending, dead))
                self.pending = [False] * len(dead)
            else:
                self.checked = self.dead_again = 0
            revived = sum(s > 0 and not d for s, d in zip(self.streak, dead))
            self.revived_total += revived
            self.streak = [s + 1 if d else 0 for s, d in zip(self.streak, dead)]
            self.first = [step if d and f < 0 else f for f, d in zip(self.first, dead)]
        return {
            "revived_units": revived,
            "revived_total": self.revived_total,
            "permanently_dead_units": sum(s >= permanent_after for s in self.streak),
            "first_dead_step": list(self.first),
            "dead_streak": list(self.streak),
            "recycled_total": self.recycled_total,
            "recycled_checked": self.checked,
            "recycled_dead_again": self.dead_again,
        }


def as_plain(history: object) -> dict[str, object]:
    values = dataclasses.asdict(history)  # type: ignore[call-overload]
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


@settings(max_examples=60, deadline=None)
@given(
    units=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    windows=st.integers(1, 6),
    permanent_after=st.integers(1, 3),
    data=st.data(),
)
def test_fold_histories_matches_a_per_unit_oracle(
    units: list[int], windows: int, permanent_after: int, data: st.DataObject
) -> None:
    histories = [SiteHistory(n) for n in units]
    oracles = [PlainHistory(n) for n in units]
    handed_out: list[tuple[object, dict[str, object]]] = []  # every report copy, with what it said when returned
    for window in range(windows):
        masks: list[Optional[torch.Tensor]] = []
        for i, n in enumerate(units):
            if data.draw(st.booleans(), label="recycle"):
                picked = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="recycled"))
                if picked:
                    histories[i].recycle(picked)
                    oracles[i].recycle(picked)
            if data.draw(st.integers(0, 4), label="peek") == 0:
                masks.append(None)  # a peek, or a site that saw no sample
            else:
                masks.append(torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="dead")))
        step = 10 * (window + 1)
        got = fold_histories(histories, masks, step, permanent_after)
        for history, oracle, mask, i in zip(got, oracles, masks, range(len(units))):
            want = oracle.fold(None if mask is None else mask.tolist(), step, permanent_after)
            assert as_plain(history) == want, f"site {i}, window {window}"
            handed_out.append((history, want))
    for history, said in handed_out:  # later folds and recycling never change a report handed out
        assert as_plain(history) == said


def test_one_site_update_and_view_are_the_batch_of_one() -> None:
    history = SiteHistory(3)
    first = history.update(torch.tensor([True, False, True]), step=5, permanent_after=2)
    assert first.dead_streak.tolist() == [1, 0, 1] and first.first_dead_step.tolist() == [5, -1, 5]
    second = history.update(torch.tensor([True, False, False]), step=9, permanent_after=2)
    assert second.revived_units == 1 and second.permanently_dead_units == 1
    peek = history.view(permanent_after=2)
    assert peek.dead_streak.tolist() == [2, 0, 0] and peek.revived_units == 0
    assert first.dead_streak.tolist() == [1, 0, 1]  # the first window's copy did not move


def test_a_mask_of_the_wrong_length_is_refused_not_misaligned() -> None:
    with pytest.raises(ValueError, match="dead mask of shape"):
        fold_histories([SiteHistory(3), SiteHistory(2)], [torch.zeros(2, dtype=torch.bool), None], 1, 1)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), data=st.data())
def test_segment_counts_matches_a_sum_per_segment(lengths: list[int], data: st.DataObject) -> None:
    total = sum(lengths)
    rows = [data.draw(st.lists(st.booleans(), min_size=total, max_size=total)) for _ in range(2)]
    counts = segment_counts(torch.tensor(rows, dtype=torch.bool).reshape(2, total), lengths)
    for row, got in zip(rows, counts):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        assert got == [sum(row[s : s + n]) for s, n in zip(starts, lengths)]


def test_from_fields_builds_the_object_init_builds() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1) as monitor:
            model(torch.randn(5, 3)).sum().backward()
            layer = monitor.report()["1"]
    values = {f.name: getattr(layer, f.name) for f in dataclasses.fields(LayerReport)}
    built, made = LayerReport._from_fields(**values), LayerReport(**values)
    assert built == made and vars(built) == vars(made) and repr(built) == repr(made)
    required = {f.name: values[f.name] for f in dataclasses.fields(LayerReport) if f.default is dataclasses.MISSING}
    assert vars(LayerReport._from_fields(**required)) == vars(LayerReport(**required))  # the defaults filled in
    with pytest.raises(TypeError, match="unexpected keyword"):
        LayerReport._from_fields(**values, colour="red")
    del required["units"]
    with pytest.raises(TypeError, match="units"):
        LayerReport._from_fields(**required)


def test_a_report_of_a_cpu_model_holds_no_live_parameter() -> None:
    """The cause reads a CPU model's biases without copying them to a device: its figures must be copies, so that
    training after a report does not change what the report said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit dead: the site is blamed and gets a cause
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            model(torch.randn(5, 3)).sum().backward()
            first = monitor.report()["1"]
            assert first.cause is not None and first.cause.bias == pytest.approx(-100.0)
            with torch.no_grad():
                model[0].bias.fill_(-200.0)
            model(torch.randn(5, 3)).sum().backward()
            second = monitor.report()["1"]
    assert first.cause.bias == pytest.approx(-100.0)
    assert second.cause is not None and second.cause.bias == pytest.approx(-200.0)


def test_each_layer_report_owns_its_tensors() -> None:
    """A layer's per-unit tensors hold its own units only: pickling one layer's report, or keeping one per window,
    must not carry every site's units (views of a buffer shared by all sites would)."""
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(64, 64), nn.ReLU())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            for _ in range(2):
                model(torch.randn(4, 64)).sum().backward()
                report = monitor.report()
    for layer in report:
        for tensor in (layer.dead_mask, layer.first_dead_step, layer.dead_streak):
            assert tensor is not None
            assert tensor.untyped_storage().nbytes() == layer.units * tensor.element_size(), layer.name
    assert len(pickle.dumps(report["1"])) == len(pickle.dumps(LayerReport._from_fields(**_fields_of(report["1"]))))


def _fields_of(layer: LayerReport) -> dict[str, object]:
    """A layer's fields, its tensors copied: the size a report of this one layer pickles to on its own."""
    return {
        f.name: v.clone() if isinstance(v := getattr(layer, f.name), torch.Tensor) else v
        for f in dataclasses.fields(LayerReport)
    }


def test_row_norms_do_not_move_when_the_weight_layout_does() -> None:
    """Units dead from the start whose weights never moved are `never_alive`, also after the model turns
    channels-last: the row norms are summed in one order whatever the weight's memory layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))
    with torch.no_grad():
        model[0].bias[:16] = -100.0  # half the channels dead from the start
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1, on_dead="ignore", optimizer=opt) as monitor:
            for channels_last in (False, True):
                if channels_last:
                    model.to(memory_format=torch.channels_last)
                x = torch.randn(4, 16, 8, 8)
                opt.zero_grad()
                model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).mean().backward()
                opt.step()
            layer = monitor.report()["1"]
    assert layer.cause is not None
    assert layer.cause.weight_shift == 0.0 and layer.cause.never_alive
