"""When recycling acts, on which window, and what it books: the monitor's side of recycling dead units.

Report-time only. `relumon.recycle` rewrites the weights; this module decides when that happens and keeps the books:

- with ``recycle=``, the sites where a sampled window found candidates are measured on every call of the next window
  (`RecyclePolicy.suspects`), and recycling runs right after each window closes (`RecyclePolicy.after_window`); the
  report then shows what was recycled;
- every recycle call (``Monitor.recycle``, or ``recycle=``) checks its arguments, acts at most once per closed window,
  and books what it did: a recycled unit starts a fresh death history (`relumon.diagnosis`) and a fresh cause
  (`relumon.cause`).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from torch import nn

from relumon.alerts import global_rank
from relumon.cause import CauseTracker
from relumon.diagnosis import Diagnosis
from relumon.errors import RelumonError, RelumonWarning, warn
from relumon.options import Options
from relumon.recorder import Recorder
from relumon.recycle import CRITERIA, Recycler, RecycleResult, optimizers_of_model
from relumon.report import LayerReport, Report

__all__ = ["RecyclePolicy"]


class RecyclePolicy:
    """Decides when recycling acts and on which closed window, runs the `relumon.recycle.Recycler`, and books it.

    Args:
        options: ``recycle`` and ``dormant_tau`` apply here.
        model_ref: a weak reference to the watched model.
        recorder: the per-step recorder, whose wiring record (`relumon.wiring.WiringBook`) recycling reads.
        diagnosis: the death histories, where a recycled unit starts afresh.
        cause: the cause tracker, told which units were recycled and which readers' columns are zeroed.
    """

    def __init__(
        self,
        options: Options,
        model_ref: weakref.ref[nn.Module],
        recorder: Recorder,
        diagnosis: Diagnosis,
        cause: CauseTracker,
    ) -> None:
        self._options = options
        self._model_ref = model_ref
        self._recorder = recorder
        self._diagnosis = diagnosis
        self._cause = cause
        #: The result of the last recycling, or None (`Monitor.last_recycle`).
        self.last: Optional[RecycleResult] = None
        # Recycling reads the recorder's wiring record (`relumon.wiring.WiringBook`) of the first training forward.
        self._recycler: Optional[Recycler] = None
        if options.recycle is not None:
            self._recycler = Recycler(recorder.wiring_book, cause.columns_zeroed)
        self._warned_no_optimizer = False

    def suspects(self, layers: list[LayerReport]) -> set[str]:
        """With ``recycle=``: sites where a sampled window found candidates, to measure on every call next window."""
        if self._options.recycle is None:
            return set()
        dormant = self._options.recycle == "dormant"
        return {
            x.name
            for x in layers
            if not x.exact and x.counts_dead and (x.dead_units > 0 or (dormant and bool(x.dormant_units)))
        }

    def after_window(self, report: Report, optimizers: list[Any]) -> Report:
        """``recycle=``: recycle right after ``report``'s window closed; the report returned shows what was recycled."""
        if not optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            if global_rank() == 0:
                warn(
                    "relumon: recycling without an optimizer: the weights are re-initialised but no optimizer state "
                    "is reset, so momentum and Adam moments keep pushing the old direction into the new weights. Set "
                    "`monitor.optimizers = [optimizer]` (the Lightning callback does it from the Trainer).",
                    RelumonWarning,
                )
        assert self._options.recycle is not None
        result = self.recycle(report, optimizers, self._options.recycle)
        layers = [
            x.replace(
                recycled_units=len(result.units.get(x.name, ())),
                recycled_total=x.recycled_total + len(result.units.get(x.name, ())),
            )
            for x in report
        ]
        return Report(layers, window=report.window, steps=report.steps, recycled=result)

    def recycle(self, report: Optional[Report], optimizer: Any, criterion: str) -> RecycleResult:
        """Recycle what ``report`` (the last closed window, or None) confirmed, with ``optimizer`` (an optimizer or a
        sequence of them, or None), and book it. See `Monitor.recycle`."""
        if criterion not in CRITERIA:
            raise ValueError(f"expected `criterion` to be one of {CRITERIA}, got {criterion!r}")
        if criterion == "dormant" and self._options.dormant_tau is None:
            raise ValueError(
                "`criterion='dormant'` needs `dormant_tau` (e.g. relumon.watch(model, dormant_tau=0.1)): the "
                "tau-dormant score is measured only when it is set"
            )
        if report is None:
            raise RelumonError(
                "no window closed yet: recycling acts on what a closed window confirmed. Call monitor.report() (or "
                "monitor.log()) first, after some training steps"
            )
        model = self._model_ref()
        if model is None:
            raise RelumonError("the watched model no longer exists")
        optimizers = optimizers_of_model(optimizer, model)
        done = self.last
        if done is not None and done.window == report.window:
            # This window was acted on already (by `recycle=` or an earlier call): recycling it again would re-draw
            # units that have been training since, and count them twice.
            reason = f"window {report.window} was already recycled; recycle again after the next window closes"
            again = {name: reason for name in done.units}
            again.update(done.skipped)  # every site with candidates gets units or a reason, the second time too
            return RecycleResult(report.window, criterion, {}, again, {}, 0)
        if self._recycler is None:
            self._recycler = Recycler(self._recorder.wiring_book, self._cause.columns_zeroed)
        result = self._recycler.recycle(model, report, optimizers, criterion, self._options.dormant_tau)
        units_of = {x.name: x.units for x in report}
        for name, indices in result.units.items():
            self._diagnosis.recycled(name, units_of[name], indices)
            self._cause.recycled(name, indices)  # their cause starts from the recycled weights
        self.last = result
        return result

    def remove(self) -> None:
        """Let go of the recycler (the wiring record belongs to the recorder)."""
        if self._recycler is not None:
            self._recycler.remove()
