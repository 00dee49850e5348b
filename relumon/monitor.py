"""The monitor: a thin handle over the per-step [`Recorder`][relumon.recorder.Recorder] that turns recorded state
into reports.

Report-time only: nothing here runs in the training step except what the recorder does (see `relumon.recorder`).
Closing a window reads the recorded state to the host once (`relumon.state.gather`), builds a
[`Report`][relumon.Report] with the help of `relumon.diagnosis`, runs the ``on_dead`` alerts and starts the next
window. The monitor also keeps what a checkpoint needs (`state_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import deque
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from relumon.cascade import consequences_of, find_blockers, find_roots
from relumon.cause import CauseTracker
from relumon.diagnosis import Diagnosis, blame
from relumon.errors import DeadUnitsWarning, RelumonError, RelumonWarning, warn
from relumon.options import DEFAULT_TYPES, OnDead, OptionAttributes, Options, signature_with_options
from relumon.proof import Certification, Certifier
from relumon.recorder import NEGATIVE_REGIME_TYPES, Recorder
from relumon.recycle import CRITERIA, Recycler, RecycleResult, optimizers_of_model
from relumon.report import LayerReport, Report, dead_layer_message
from relumon.state import GatheredSite, SiteLayout, distributed_world_size, gather, sum_over_ranks
from relumon.tensorboard import write_alerts, write_layout_once, write_scalars

__all__ = ["Monitor", "watch", "DEFAULT_TYPES", "NEGATIVE_REGIME_TYPES", "OnDead", "global_rank"]

#: Closed windows kept in [`Monitor.timeline`][relumon.Monitor.timeline] (and checkpoints) for the dead-unit heatmap.
TIMELINE_WINDOWS = 500


class Monitor(OptionAttributes):
    """Watches the ReLU-family activations of a model during training. Create one with [`relumon.watch`][relumon.watch].

    Between reports the hooks only launch in-place kernels on state that lives on the activations' device; nothing
    is read to the host until [`report()`][relumon.Monitor.report]. A *window* is the set of training forwards since
    the last report.

    The monitor is a context manager: leaving the ``with`` block, normally or by an exception, removes every hook.
    The statistics gathered so far stay readable with [`report()`][relumon.Monitor.report].

    Args:
        model: any ``nn.Module``.
        options: a ready [`Options`][relumon.Options]; keyword arguments override its fields.
        **kwargs: the options of [`Options`][relumon.Options], by name.

    Attributes:
        options: the validated [`Options`][relumon.Options] in force.
        last_report: the report of the last closed window, or None.
        optimizers: the optimizers that train the model, a plain list (from the ``optimizer`` option; settable, e.g.
            ``monitor.optimizers = [opt]``; the Lightning callback sets the Trainer's). relumon measures their steps
            for [`LayerReport.cause`][relumon.LayerReport], and recycling resets their state for the re-initialised
            weights; empty when none is known.
        last_recycle: the [`RecycleResult`][relumon.recycle.RecycleResult] of the last recycling, or None.
    """

    def __init__(self, model: nn.Module, options: Optional[Options] = None, **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected `model` to be a torch.nn.Module, got {type(model).__name__}")
        self.options = Options.resolve(options, kwargs, owner=type(self).__name__, own=("model", "options"))
        if self.options.sync_dist and not (dist.is_available() and dist.is_initialized()):
            # Said here rather than at the first report(), which may be hours into the run.
            raise RelumonError(
                "`sync_dist=True` needs an initialised torch.distributed process group, and there is none. Call "
                "`torch.distributed.init_process_group(...)` before `relumon.watch(...)`, or leave `sync_dist=None` "
                "(the default: reduce across ranks whenever a process group of more than one rank is initialised)."
            )
        self._model_name = type(model).__name__
        self._model_ref = weakref.ref(model)
        self._recorder = Recorder(model, self.options)
        self._diagnosis = Diagnosis(self.options.permanent_after)
        self._timeline: deque[tuple[int, dict[str, float]]] = deque(maxlen=TIMELINE_WINDOWS)
        self.last_report: Optional[Report] = None
        self._window = 0
        self._window_start = 0  # the recorder's steps_seen when the open window started
        self._compiled_counted = 0  # compiled steps of the open window already added to the recorder's steps_seen
        self._alerted: set[str] = set()
        self._idle_checked = False
        self._unconfirmed_said: Optional[int] = None  # the window whose unconfirmed deaths were last reported
        self.optimizers: list[Any] = list(self.options.optimizer or ())
        self._cause = CauseTracker(
            model, self._recorder.sites, _optimizers_of(weakref.ref(self)), self.options.grad_scaler
        )
        #: The alert texts of the window closed last (written to TensorBoard by `log`).
        self._window_alerts: list[str] = []
        self._warned_optimizers = False
        self.last_recycle: Optional[RecycleResult] = None
        # Recycling reads the recorder's wiring record (`relumon.wiring.WiringBook`) of the first training forward.
        self._recycler: Optional[Recycler] = None
        if self.options.recycle is not None:
            self._recycler = Recycler(self._recorder.wiring_book, self._cause.columns_zeroed)
        self._warned_no_optimizer = False
        # Certificates (`certify=True`) read the wiring of one training forward too, at report time only.
        self._certifier = Certifier(model) if self.options.certify else None

    # ------------------------------------------------------------------ the per-step side, delegated

    def new_step(self) -> None:
        """Mark the start of a training step, so the n-th call of each module maps to the same call site.

        Calling the watched model itself, or a backward pass, already does this. Call it yourself only when a step
        calls submodules of the watched model directly (the Lightning callback does so before every batch).
        """
        self._recorder.leave_stale_capture()
        self._recorder.clock.start_step()
        if torch.is_grad_enabled():
            self._recorder.clock.training_seen = True

    @property
    def names(self) -> list[str]:
        """Call-site names discovered so far, in forward order."""
        return [site.name for site in self._recorder.sites]

    @property
    def window(self) -> int:
        """Index of the window now open (the number of windows closed so far)."""
        return self._window

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return self._recorder.active

    # ------------------------------------------------------------------ reports

    def _sync(self) -> bool:
        sync_dist = self.options.sync_dist
        if sync_dist is None:
            return distributed_world_size() > 1
        if sync_dist and distributed_world_size() == 1 and not dist.is_initialized():
            raise RelumonError("`sync_dist=True` needs an initialised torch.distributed process group")
        return sync_dist

    def report(self, *, reset: bool = True, step: Optional[int] = None) -> Report:
        """Read the current window's statistics to the host and, by default, close the window.

        This is the only place relumon reads device state on the host (one transfer for all sites). Under
        ``torch.distributed`` every rank must call it: the figures are reduced across ranks and every rank returns
        the same global report.

        Args:
            reset: close the window (start a new one), update the death history and run the ``on_dead`` alerts.
                ``False`` peeks and changes nothing. Before any training step of the window, ``report()`` warns and
                keeps the window open (it returns the empty report), as torchmetrics' ``compute()`` before
                ``update()`` does.
            step: the step to record in the death history (``first_dead_step``); defaults to the number of
                training steps seen so far. [`log()`][relumon.Monitor.log] passes its ``step``.

        Returns:
            A [`Report`][relumon.Report] with one [`LayerReport`][relumon.LayerReport] per call site, in forward order.

        Raises:
            RelumonError: with ``on_dead="raise"``, when a layer's every unit is dead for the first time (confirmed
                by a window measured on every call; once per cascade, for its root); with ``sync_dist=True`` and no
                initialised process group; and, on every rank alike, when a call site has a different number of
                units on two ranks.
        """
        recorder = self._recorder
        recorder.leave_stale_capture()
        self._count_compiled_steps()
        step = recorder.clock.steps_seen if step is None else step
        sites = {site.name: site for site in recorder.sites}
        synced = self._sync()
        gathered = gather([(site.layout(), site.stats) for site in sites.values()], synced)
        # Under torch.distributed, blame may gather sharded parameters: only safe when every rank holds the same
        # global report, hence decides to blame the same sites in the same order.
        gather_sharded = synced or distributed_world_size() == 1
        measured = [self._layer_report(layout, g, step, reset) for layout, g in gathered]
        layers = self._explain(measured, [layout for layout, _ in gathered], gather_sharded)
        # The cause goes where blame goes: to roots that alert and to jumps (decided from the global report).
        self._check_optimizers()
        wanted = {x.name for x, y in zip(measured, layers) if x.blame is not None and y.caused_by is None}
        layers = self._cause.attach(layers, wanted, window=self._window, step=step, close=reset)
        if self._certifier is not None:
            layers = self._certify(layers)
        # Under torch.distributed, steps add up over ranks, like samples and forwards. Compiled steps are counted by
        # `_count_compiled_steps`; the forwards bound a window whose steps began elsewhere (another rank's only site).
        steps = recorder.clock.steps_seen - self._window_start
        if synced:
            steps = sum_over_ranks(steps)
        steps = max(steps, max((x.forwards for x in layers), default=0))
        report = Report(layers, window=self._window, steps=steps)
        # No step of a watched site: before any training, or a model whose watched modules never run (training
        # happened: the idle warning below says so). Under sync the summed steps decide alike on every rank.
        before_training = steps == 0 and (synced or not (recorder.clock.training_seen or self._model_has_gradients()))
        if reset and before_training:
            # As torchmetrics' compute() before update(): say so, and keep the window open for the steps to come.
            if global_rank() == 0:
                warn(
                    f"relumon: report() was called before any training step of window {self._window}: the report is "
                    "empty and the window stays open. Call it after training steps (a training forward: grad "
                    "enabled, model in training mode).",
                    RelumonWarning,
                )
            return report
        if reset:
            for site in sites.values():
                site.stats.reset()
            recorder.weight_grads.reset()
            self._window += 1
            self._window_start = recorder.clock.steps_seen
            self._compiled_counted = 0
            self._timeline.append((step, {x.name: x.dead_fraction for x in layers if x.samples > 0 and x.counts_dead}))
            self.last_report = report
            # A sampled window never alerts on its own: its suspects are measured on every call of the next window.
            recorder.confirming = (
                {x.name for x in layers if x.confirming}
                | self._recycle_suspects(layers)
                | _cascade_sites(layers, [layout for layout, _ in gathered])
            )
            for site in sites.values():
                site.exact = site.name in recorder.confirming
            if not self._idle_checked and (steps > 0 or recorder.clock.training_seen or self._model_has_gradients()):
                self._idle_checked = True
                self._warn_idle()
            self._alert(report, step)
            if self.options.recycle is not None:
                report = self._recycle_after(report)
        return report

    def _certify(self, layers: list[LayerReport]) -> list[LayerReport]:
        """``certify=True``: attach each site's certificates (`relumon.proof`), from the weights and optimizers now."""
        model = self._model_ref()
        if model is None or self._certifier is None:
            return layers
        certs = self._certifier.certify(model, [x.name for x in layers], self.optimizers or None)
        for x in layers:  # certificates index channels (dim 1): only where the report's units are the same
            if x.unit_dim != 1 and x.name in certs:
                certs[x.name] = Certification(x.name, why_not=f"its units are along dim {x.unit_dim}, not dim 1")
        return [dataclasses.replace(x, certified=certs.get(x.name)) for x in layers]

    def _count_compiled_steps(self) -> None:
        """Add the open window's compiled steps not counted yet to the recorder's ``steps_seen``.

        Compiled code cannot count steps as they run (a Python counter read in a graph would recompile it every step),
        but it measures every call: each site's compiled forward counter (``SiteStats.forwards``, on the device) is
        the number of compiled steps it ran in, and the largest is the window's compiled steps. One small read, at
        report time, and only once compiled code has run; a peek (``reset=False``) counts each step once.
        """
        recorder = self._recorder
        if not recorder.clock.compiled_seen or not recorder.sites:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for site in recorder.sites:
            by_device.setdefault(site.stats.forwards.device, []).append(site.stats.forwards)
        compiled = max(int(torch.cat(counters).max()) for counters in by_device.values())
        if compiled > self._compiled_counted:
            recorder.clock.steps_seen += compiled - self._compiled_counted
            self._compiled_counted = compiled

    def _recycle_suspects(self, layers: list[LayerReport]) -> set[str]:
        """With ``recycle=``: sites where a sampled window found candidates, to measure on every call next window."""
        if self.options.recycle is None:
            return set()
        dormant = self.options.recycle == "dormant"
        return {
            x.name
            for x in layers
            if not x.exact and x.counts_dead and (x.dead_units > 0 or (dormant and bool(x.dormant_units)))
        }

    def _recycle_after(self, report: Report) -> Report:
        """``recycle=``: recycle right after closing the window; the report shows what was recycled."""
        if not self.optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            if global_rank() == 0:
                warn(
                    "relumon: recycling without an optimizer: the weights are re-initialised but no optimizer state "
                    "is reset, so momentum and Adam moments keep pushing the old direction into the new weights. Set "
                    "`monitor.optimizers = [optimizer]` (the Lightning callback does it from the Trainer).",
                    RelumonWarning,
                )
        assert self.options.recycle is not None
        result = self.recycle(criterion=self.options.recycle)
        layers = [
            dataclasses.replace(
                x,
                recycled_units=len(result.units.get(x.name, ())),
                recycled_total=x.recycled_total + len(result.units.get(x.name, ())),
            )
            for x in report
        ]
        report = Report(layers, window=report.window, steps=report.steps, recycled=result)
        self.last_report = report
        return report

    def recycle(self, optimizer: Any = None, *, criterion: str = "dead") -> RecycleResult:
        """Re-initialise the units that the last closed window confirmed dead (or tau-dormant), where it is safe.

        For each unit: the incoming weights of the Linear/Conv that feeds it are re-drawn from that layer's own
        ``reset_parameters`` distribution and its bias set to 0 (a BatchNorm in between gets weight 1, bias 0 and
        fresh running statistics for it); the outgoing weights are set to 0 in every Linear/Conv that reads it, so a
        dead unit leaves the network's function exactly as it was; and the optimizers' per-element state of every
        touched entry is set to 0 (Adam's ``step`` is kept; see ``docs/plasticity.md``). Only a window measured on
        every call (``LayerReport.exact``) counts. A site whose wiring recycling cannot rewrite safely (a residual
        add feeding or reading it, tied weights, a reader that is not a Linear or Conv...) is skipped with the
        reason, and nothing there changes. A recycled unit starts a fresh death history; the next window says how
        many recycled units died again (``LayerReport.recycled_dead_again``).

        The wiring is read from one training forward, recorded from the first one after ``watch(..., recycle=...)``
        or, without that option, after the first call of this method (which then skips every site: call it again
        after the next window). Under ``torch.distributed`` call it on every rank: the report is global and the new
        weights are drawn from a generator seeded by the window and the site, so every rank ends identical.

        Args:
            optimizer: the optimizer (or a sequence of them) training the model; None uses
                [`optimizers`][relumon.Monitor] (which the Lightning callback fills). Without any, only the
                weights are reset.
            criterion: ``"dead"`` (the default) or ``"dormant"`` (tau-dormant units, dead ones included; needs
                ``dormant_tau``).

        Returns:
            A [`RecycleResult`][relumon.recycle.RecycleResult]: ``units`` (``{site: unit indices}``), ``skipped``
            (``{site: reason}``), ``parameters`` touched per site.

        Raises:
            ValueError: for an unknown ``criterion``, ``"dormant"`` without ``dormant_tau``, or an optimizer that
                holds none of the model's parameters.
            TypeError: for an ``optimizer`` that is not a ``torch.optim.Optimizer``.
            RelumonError: before any closed window, or when the model is gone.
        """
        if criterion not in CRITERIA:
            raise ValueError(f"expected `criterion` to be one of {CRITERIA}, got {criterion!r}")
        if criterion == "dormant" and self.options.dormant_tau is None:
            raise ValueError(
                "`criterion='dormant'` needs `dormant_tau` (e.g. relumon.watch(model, dormant_tau=0.1)): the "
                "tau-dormant score is measured only when it is set"
            )
        report = self.last_report
        if report is None:
            raise RelumonError(
                "no window closed yet: recycling acts on what a closed window confirmed. Call monitor.report() (or "
                "monitor.log()) first, after some training steps"
            )
        model = self._model_ref()
        if model is None:
            raise RelumonError("the watched model no longer exists")
        optimizers = optimizers_of_model(self.optimizers if optimizer is None else optimizer, model)
        done = self.last_recycle
        if done is not None and done.window == report.window:
            # This window was acted on already (by `recycle=` or an earlier call): recycling it again would re-draw
            # units that have been training since, and count them twice.
            reason = f"window {report.window} was already recycled; recycle again after the next window closes"
            again = {name: reason for name in done.units}
            again.update(done.skipped)  # every site with candidates gets units or a reason, the second time too
            return RecycleResult(report.window, criterion, {}, again, {}, 0)
        if self._recycler is None:
            self._recycler = Recycler(self._recorder.wiring_book, self._cause.columns_zeroed)
        result = self._recycler.recycle(model, report, optimizers, criterion, self.options.dormant_tau)
        units_of = {x.name: x.units for x in report}
        for name, indices in result.units.items():
            self._diagnosis.recycled(name, units_of[name], indices)
            self._cause.recycled(name, indices)  # their cause starts from the recycled weights
        self.last_recycle = result
        return result

    def _layer_report(self, layout: SiteLayout, g: GatheredSite, step: int, close: bool) -> LayerReport:
        """One site's figures, from its description (``layout.info``: this rank's or, for a site only another rank
        ran, that rank's) and its gathered statistics. Cascades and blame come after, in `_explain`."""
        info: dict[str, Any] = layout.info
        name, units = layout.name, layout.units
        seen = g.samples > 0
        counted = seen and bool(info["counts_dead"])
        dead_mask = g.peak <= 0 if counted else torch.zeros(units, dtype=torch.bool)
        dead_units = int(dead_mask.sum())
        cap: Optional[float] = info["cap"]
        saturated = int((g.floor >= cap).sum()) if counted and g.floor is not None and cap is not None else 0
        dead_fraction = dead_units / units if counted else math.nan
        history = self._diagnosis.update(name, units, dead_mask if counted else None, step, close)
        dormant_units = dormant_scores = None
        tau = self.options.dormant_tau
        if tau is not None and g.abs_sum is not None and g.positions > 0:
            mean_abs = g.abs_sum / g.positions
            finite = mean_abs.isfinite()  # a NaN unit must not make every unit dormant: leave it out of the mean
            layer_mean = float(mean_abs[finite].mean()) if bool(finite.any()) else math.nan
            dormant_scores = (mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)).float()
            dormant_units = int((dormant_scores <= tau).sum())
        # Blame is decided once the cascades are known (`_explain`): only roots and jumps get it.
        all_dead = counted and dead_units + saturated == units
        jumped = counted and self._diagnosis.jumped(name, dead_fraction)
        if counted and close:
            self._diagnosis.remember(name, dead_fraction)
        finite_passes = g.backwards - g.nonfinite_passes
        fed_by: Optional[str] = info["fed_by"]
        return LayerReport(
            name=name,
            module=info["module_name"],
            call=info["call"],
            kind=info["kind"],
            units=units,
            unit_dim=info["unit_dim"],
            fed_by=fed_by,
            samples=g.samples,
            forwards=g.forwards,
            backward_passes=g.backwards,
            dead_units=dead_units,
            nonfinite_units=int(g.peak.isnan().sum()) if seen else 0,
            grad_norm=g.grad_norm_sum / finite_passes if finite_passes > 0 else math.nan,
            skipped_passes=g.nonfinite_passes,
            unmeasured_calls=g.unmeasured,
            # An alert is decided once per layer: a layer already alerted on needs no second confirmation.
            confirming=g.unmeasured > 0 and (all_dead or jumped) and name not in self._alerted,
            grad_through_norm=g.through_sum / g.through_passes if g.through_passes else math.nan,
            negative_regime=info["negative_regime"],
            dead_mask=dead_mask,
            revived_units=history.revived_units,
            revived_total=history.revived_total,
            permanently_dead_units=history.permanently_dead_units,
            first_dead_step=history.first_dead_step,
            dead_streak=history.dead_streak,
            dormant_units=dormant_units,
            dormant_scores=dormant_scores,
            recycled_total=history.recycled_total,
            recycled_checked=history.recycled_checked,
            recycled_dead_again=history.recycled_dead_again,
            blame="" if all_dead or jumped else None,  # a placeholder that `_explain` fills in or clears
            saturated_units=saturated,
            cap=cap,
            counts_dead=bool(info["counts_dead"]),
            disabled=info.get("disabled"),
        )

    def _module_at(self, path: str) -> Optional[nn.Module]:
        """The model's submodule at ``path`` (found by path, so every rank finds it, whichever rank traced it)."""
        model = self._model_ref()
        if model is None:
            return None
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    def _explain(
        self, layers: list[LayerReport], layouts: list[SiteLayout], gather_sharded: bool = True
    ) -> list[LayerReport]:
        """Dead cascades (``caused_by``, ``consequences``), blocked gradients (``blocked_by``) and blame for roots.

        Uses the upstream sites recorded once at discovery (see `relumon.cascade`); host-side, O(sites).
        """
        order = [x.name for x in layers]
        upstream = {x.name: x.info["upstream"] for x in layouts}
        from_input = {x.name: x.info["from_input"] for x in layouts}
        dead = {x.name for x in layers if x.all_dead_or_saturated}
        silent = {x.name for x in layers if x.carries_no_signal}
        zero_grad = {x.name for x in layers if x.backward_passes > 0 and x.grad_norm == 0}
        # Silence is known only where every call was measured: an upstream left unmeasured on some call may have fired
        # then. Dead sites below a silent one, and that one, are measured on every call while they last
        # (`_cascade_sites`), so a cascade's consequences do not become roots (and alert) in sampled windows.
        known_silent = {x.name for x in layers if x.exact}
        root_of = find_roots(order, upstream, from_input, dead, silent, known_silent)
        blocked_by = find_blockers(order, upstream, dead, silent, zero_grad)
        consequences = consequences_of(order, root_of)
        explained = []
        for layer in layers:
            caused_by = root_of.get(layer.name)
            blamed = None
            producer = self._module_at(layer.fed_by) if layer.fed_by else None
            if layer.blame is not None and caused_by is None and producer is not None and layer.fed_by:
                blamed = blame(
                    layer.name,
                    layer.fed_by,
                    producer,
                    layer.dead_mask,
                    gather_sharded=gather_sharded,
                    weight_grad_norm=self._recorder.weight_grads.norm(layer.fed_by),
                )
            explained.append(
                dataclasses.replace(
                    layer,
                    caused_by=caused_by,
                    consequences=consequences.get(layer.name, ()),
                    blocked_by=blocked_by.get(layer.name),
                    blame=blamed,
                    # A consequence never alerts (its root does), so it is not worth measuring every call for.
                    confirming=layer.confirming and caused_by is None,
                )
            )
        return explained

    @property
    def timeline(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, {call site: dead fraction})`` for each closed window, oldest first (the last 500 windows)."""
        return list(self._timeline)

    def log(self, writer: Any, step: int) -> Report:
        """Close the window with [`report()`][relumon.Monitor.report]; write its scalars to a ``SummaryWriter``.

        Tags, per call site that saw samples in the window:

        - ``relumon/dead_fraction/<name>`` and ``relumon/dead_units/<name>``;
        - ``relumon/revived/<name>`` and ``relumon/permanently_dead/<name>`` (the death history);
        - ``relumon/grad_norm/<name>`` when a backward pass ran;
        - ``relumon/grad_through_norm/<name>`` with ``grad_through=True``;
        - ``relumon/nonfinite_units/<name>`` when non-zero;
        - ``relumon/dormant_fraction/<name>`` with ``dormant_tau``;

        ``relumon/alerts`` as text (``add_text``), the alerts of the window with their cause, when a layer alerted;
        and ``relumon/summary/dead_fraction`` over all units ([`Report.scalars()`][relumon.Report.scalars] lists the
        same). The first call for a writer also writes a custom-scalars layout: one multi-line chart per metric
        across layers, for the metrics logged; a metric that first appears later (a NaN unit) adds its chart then.
        Under ``torch.distributed`` call it on every rank; only global rank 0 writes.

        Args:
            writer: a ``torch.utils.tensorboard.SummaryWriter``, or anything with ``add_scalar``.
            step: the global step to log at.

        Returns:
            The report that was logged.
        """
        if not hasattr(writer, "add_scalar"):
            raise TypeError(
                f"expected `writer` to be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        report = self.report(step=step)
        if global_rank() == 0:
            scalars = report.scalars()
            write_layout_once(writer, tags=scalars)
            write_scalars(writer, scalars, step)
            write_alerts(writer, self._window_alerts, step)
        return report

    def log_figures(self, writer: Any, step: int) -> None:
        """Write the gradient-flow chart of the last closed window and the dead-unit heatmap to a ``SummaryWriter``.

        Tags are ``relumon/grad_flow`` and ``relumon/dead_heatmap``. Needs matplotlib (the ``tensorboard`` extra).
        Under ``torch.distributed`` only global rank 0 writes.

        Raises:
            RelumonError: when no window has been closed yet (call [`report()`][relumon.Monitor.report] or
                [`log()`][relumon.Monitor.log] first).
        """
        from relumon.figures import FIGURE_TAGS, dead_heatmap_figure, grad_flow_figure

        if not hasattr(writer, "add_figure"):
            raise TypeError(
                f"expected `writer` to be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        if self.last_report is None:
            raise RelumonError("no window closed yet: call monitor.report() or monitor.log() before log_figures()")
        if global_rank() != 0:
            return
        writer.add_figure(FIGURE_TAGS["grad_flow"], grad_flow_figure(self.last_report), global_step=step)
        writer.add_figure(FIGURE_TAGS["dead_heatmap"], dead_heatmap_figure(self.timeline), global_step=step)

    # ------------------------------------------------------------------ alerts

    def _alert(self, report: Report, step: int) -> None:
        """One alert per dead cascade, for its root; the message names the sites that died with it."""
        on_dead = self.options.on_dead
        self._window_alerts = []
        for layer in report.roots:
            if layer.name in self._alerted or layer.samples < self.options.min_samples or not layer.exact:
                continue
            self._alerted.add(layer.name)
            message = dead_layer_message(layer, report.steps, window=report.window, step=step)
            self._window_alerts.append(message)
            if callable(on_dead):
                on_dead(layer)
            elif on_dead == "raise":
                raise RelumonError(message)
            elif on_dead == "warn" and global_rank() == 0:
                warn(message, DeadUnitsWarning)

    def _check_optimizers(self) -> None:
        """Say once if ``optimizers`` holds something that is not an optimizer (it is left out, training goes on)."""
        if self._warned_optimizers:
            return
        bad = [type(x).__name__ for x in self.optimizers if not isinstance(x, torch.optim.Optimizer)]
        if bad or not isinstance(self.optimizers, list):
            self._warned_optimizers = True
            warn(
                f"relumon: `Monitor.optimizers` should be a list of torch.optim.Optimizer, got "
                f"{type(self.optimizers).__name__} holding {bad}; those are not measured. Set it to a list of "
                "optimizers (e.g. `monitor.optimizers = [opt]`).",
                RelumonWarning,
            )

    def _model_has_gradients(self) -> bool:
        """Whether any parameter of the model has a gradient: training happened, even through methods that neither
        call the model nor any watched module (a host-side check of ``.grad``, no device read)."""
        model = self._model_ref()
        return model is not None and any(p.grad is not None for p in model.parameters())

    def _warn_idle(self) -> None:
        """After the first window with training steps: name the watched modules that never ran in one."""
        if global_rank() != 0:
            return
        recorder = self._recorder
        idle = recorder.idle_modules()
        shown = ", ".join(f"`{name or 'root'}`" for name in idle[:5])
        shown += f" and {len(idle) - 5} more" if len(idle) > 5 else ""
        if not recorder.sites:
            what = f"none of the {len(idle)} watched module(s) ran in a training forward ({shown})" if idle else ""
            if self.options.functional:
                what += ("; " if what else "") + "functional=True found no F.relu, F.relu6 or F.leaky_relu call"
                hint = (
                    "Functional calls are caught while a module's `forward` runs: a call in another method "
                    "(`vae.encode`) is not. Pass `types=` to watch other activation classes."
                )
            else:
                hint = "If the model calls F.relu (or torch.relu, x.relu()) in `forward`, pass `functional=True`."
            warn(f"relumon: {what}, so nothing is being measured. {hint}", RelumonWarning)
        elif idle:
            warn(
                f"relumon: {len(idle)} watched module(s) never ran in a training forward: {shown}. A module that is "
                "declared but not called (an `nn.ReLU` attribute next to `F.relu` in `forward`) is not measured; "
                "`functional=True` watches functional calls.",
                RelumonWarning,
            )

    @property
    def alerted(self) -> frozenset[str]:
        """Names of the call sites already alerted on (each alerts at most once)."""
        return frozenset(self._alerted)

    # ------------------------------------------------------------------ state and lifetime

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state to checkpoint: everything a later report depends on.

        The alert history, the window count, the training steps seen (so steps, logging steps and the sampling
        schedule go on from there), each site's death history and last dead fraction, the sites being confirmed,
        and the heatmap's timeline. The open window's statistics live on the device and are not included: a resumed
        run's first window counts from the resume.
        """
        for site in self._recorder.sites:  # every discovered site has a history, reported or not
            self._diagnosis.history(site.name, site.stats.units)
        timeline = [
            [step, {k: v for k, v in fractions.items() if not math.isnan(v)}] for step, fractions in self._timeline
        ]
        recorder = self._recorder
        return {
            "alerted": sorted(self._alerted),
            "window": self._window,
            "steps": recorder.clock.steps_seen,
            "confirming": sorted(recorder.confirming),
            "history": self._diagnosis.state_dict(),
            "timeline": timeline,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict()`][relumon.Monitor.state_dict] output; missing keys keep their defaults.

        Death histories of sites not discovered yet are applied when those sites first report.
        """
        self._alerted = set(state.get("alerted", ()))
        self._window = int(state.get("window", 0))
        recorder = self._recorder
        recorder.clock.steps_seen = int(state.get("steps", recorder.clock.steps_seen))
        self._window_start = recorder.clock.steps_seen  # the open window's statistics are not saved: it starts here
        recorder.confirming = set(state.get("confirming", ()))
        for site in recorder.sites:
            site.exact = site.name in recorder.confirming
        self._diagnosis.load_state_dict(state.get("history", {}))
        self._timeline.clear()
        self._timeline.extend((int(step), dict(fractions)) for step, fractions in state.get("timeline", []))

    def remove(self) -> None:
        """Remove every hook relumon put on the model and its optimizers. Idempotent; the statistics stay readable.

        When the last closed window left layers that look dead but could not be confirmed (a `?` in its table),
        says so once (see [`warn_unconfirmed()`][relumon.Monitor.warn_unconfirmed]).
        """
        if self._recorder.active:
            self.warn_unconfirmed()
        self._recorder.remove()
        if self._recycler is not None:
            self._recycler.remove()
        if self._certifier is not None:
            self._certifier.remove()
        self._cause.remove()

    def unconfirmed(self) -> list[LayerReport]:
        """Layers of the last closed window that look dead but were not confirmed: its sampled window found every
        measured unit dead, and no window measured on every call has closed since (``confirming`` is True)."""
        report = self.last_report
        return [] if report is None else [x for x in report.layers if x.confirming]

    def warn_unconfirmed(self, advice: str = "close windows more often") -> None:
        """Say once which layers look dead but could not be confirmed, and why (training ended first).

        Called by [`remove()`][relumon.Monitor.remove] (so by leaving a ``with relumon.watch(...)`` block) and by the
        Lightning callback at the end of fit. Nothing happens when every suspect was confirmed or cleared. Only
        global rank 0 warns.

        Args:
            advice: the second remedy named after ``measure_every=1``, in the caller's terms (the Hugging Face
                callback names ``logging_steps``).
        """
        suspects = self.unconfirmed()
        if not suspects or self._unconfirmed_said == self._window or global_rank() != 0:
            return
        self._unconfirmed_said = self._window
        report = self.last_report
        assert report is not None
        names = ", ".join(f"`{x.name}`" for x in suspects[:5]) + (
            f" and {len(suspects) - 5} more" if len(suspects) > 5 else ""
        )
        measured = max(x.forwards for x in suspects)
        warn(
            f"relumon: {names} looked dead in window {report.window} (0-based) but could not be confirmed: that "
            f"window was sampled ({measured} of its {_steps(report.steps)} measured), and training ended before a "
            "window measured on every call could confirm it, so no alert was given. Measure every step "
            f"(`measure_every=1`) or {advice} to have short runs confirmed.",
            RelumonWarning,
        )

    def __enter__(self) -> Monitor:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a relumon.Monitor is bound to the live model it watches (hooks, modules, on-device state) and cannot be "
            "pickled or copied. Pickle `monitor.state_dict()` (plain data) or a `monitor.report()` instead, and keep "
            "the Monitor out of objects you pickle, copy or torch.save (e.g. not as a model attribute). A pickled or "
            "copied model is never watched by the original's monitor."
        )

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"Monitor({self._model_name}, watched={self._recorder.watched_count}, sites={len(self._recorder.sites)}, "
            f"window={self._window}, {state})"
        )


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def watch(model: nn.Module, *, options: Optional[Options] = None, **kwargs: Any) -> Monitor:
    """Attach relumon's hooks to every activation module of ``types`` in ``model``.

    Takes every option of [`Options`][relumon.Options] as a keyword argument (``types``, ``unit_dim``,
    ``track_grad``, ``grad_scaler``, ``on_dead``, ``min_samples``, ``sync_dist``, ``measure_every``,
    ``permanent_after``, ``dormant_tau``, ``functional``, ``grad_through``, ``recycle``); their meanings and defaults
    are listed there, once.

    Args:
        model: any ``nn.Module``. Watch it before the first ``torch.compile``-d call.
        options: a ready [`Options`][relumon.Options]; keyword arguments override its fields.
        **kwargs: options by name.

    Returns:
        The [`Monitor`][relumon.Monitor], already watching. Use it as a context manager or call ``remove()``.

    Raises:
        ValueError: when ``model`` has no module of ``types``, or on a bad argument.
        TypeError: on a keyword that names no option, or an argument of the wrong type.

    Example:
        >>> import torch, relumon
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with relumon.watch(model) as monitor:
        ...     model(torch.randn(16, 4)).sum().backward()
        >>> report = monitor.report()
        >>> report["1"].units, report["1"].samples
        (8, 16)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected `model` to be a torch.nn.Module, got {type(model).__name__}")
    return Monitor(model, Options.resolve(options, kwargs, owner="relumon.watch()"))


# help(), inspect.signature and notebooks show every option, although each is declared only in Options.
watch.__signature__ = signature_with_options(watch)  # type: ignore[attr-defined]
Monitor.__signature__ = signature_with_options(Monitor)  # type: ignore[attr-defined]


def _optimizers_of(monitor: weakref.ref[Monitor]) -> Any:
    """The monitor's current ``optimizers`` list, read through a weak reference (the optimizer hooks hold this)."""

    def optimizers() -> list[Any]:
        live = monitor()
        found = live.__dict__.get("optimizers") if live is not None else None
        return found if isinstance(found, list) else []

    return optimizers


def global_rank() -> int:
    """The global rank under ``torch.distributed``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _cascade_sites(layers: list[LayerReport], layouts: list[SiteLayout]) -> set[str]:
    """Dead sites whose nearest upstream site carried no signal, and those upstream sites: measured on every call of
    the next window, so that the cascade rule knows whether the upstream really stayed silent (a sampled upstream may
    fire on a call that is not measured, and then explains nothing). Costs kernels on dead cascades only."""
    upstream = {layout.name: layout.info.get("upstream") or () for layout in layouts}
    silent = {x.name for x in layers if x.carries_no_signal}
    sites: set[str] = set()
    for layer in layers:
        if not layer.all_dead_or_saturated:
            continue
        quiet = [u for u in upstream.get(layer.name, ()) if u in silent]
        if quiet:
            sites.add(layer.name)
            sites.update(quiet)
    return sites
