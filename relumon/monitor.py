"""The monitor: the thin handle users hold over the per-step [`Recorder`][relumon.recorder.Recorder], turning recorded
state into reports.

Report-time only: nothing here runs in the training step except what the recorder does (see `relumon.recorder`).
`Monitor.report` closes a window in a fixed order, each step in a module of its own: `relumon.windows` reads the
recorded state to the host once and builds the [`Report`][relumon.Report]; `relumon.cause` attaches the optimizer's
side of each death; `relumon.alerts` runs the ``on_dead`` alerts and warnings; `relumon.recycle_policy` recycles
(``recycle=``). The monitor also keeps what a checkpoint needs (`state_dict`) and writes to a ``SummaryWriter``
(`log`, `log_figures`).
"""

from __future__ import annotations

import functools
import gc
import math
import weakref
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from relumon.alerts import Alerts, global_rank, unconfirmed
from relumon.cause import CauseTracker
from relumon.errors import RelumonError, RelumonWarning, warn
from relumon.loggers import draw, pictures, write_figures
from relumon.options import DEFAULT_TYPES, OnDead, OptionAttributes, Options, signature_with_options
from relumon.proof import Certifier
from relumon.recorder import NEGATIVE_REGIME_TYPES, Recorder
from relumon.recycle import RecycleResult
from relumon.recycle_policy import RecyclePolicy
from relumon.report import LayerReport, Report
from relumon.state import distributed_world_size, gather
from relumon.tensorboard import write_alerts, write_layout_once, write_scalars
from relumon.windows import TIMELINE_WINDOWS, WindowCloser

__all__ = ["Monitor", "watch", "DEFAULT_TYPES", "NEGATIVE_REGIME_TYPES", "OnDead", "global_rank", "TIMELINE_WINDOWS"]


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _collector_paused(method: _Method) -> _Method:
    """Run ``method`` with Python's cyclic garbage collector paused (and restored after it, even on an error).

    A report makes a few dozen short-lived objects per call site; at a thousand sites they would set off several
    collections of the youngest generation per report, and now and then a full collection of the whole process heap
    (torch and the model alone hold some 300,000 objects: about 0.2 s). Paused, the report's objects cost one young
    collection when it returns, and the full collections come about 40 times less often. A report makes no reference
    cycles that need the collector: its garbage is freed by reference counting as it goes.
    """

    @functools.wraps(method)
    def paused(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return method(*args, **kwargs)
        gc.disable()
        try:
            return method(*args, **kwargs)
        finally:
            gc.enable()

    return paused  # type: ignore[return-value]


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
        #: Reads the open window and builds its report; keeps the death histories and the timeline.
        self._windows = WindowCloser(self._model_ref, self._recorder, self.options)
        #: The alerts and warnings, and what has been alerted on.
        self._alerts = Alerts(self.options, self._recorder)
        self.last_report: Optional[Report] = None
        self._window = 0
        self.optimizers: list[Any] = list(self.options.optimizer or ())
        self._cause = CauseTracker(
            model, self._recorder.sites, _optimizers_of(weakref.ref(self)), self.options.grad_scaler
        )
        #: When recycling acts and what it books (`recycle=` and `recycle()`).
        self._recycling = RecyclePolicy(
            self.options, self._model_ref, self._recorder, self._windows.diagnosis, self._cause
        )
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

    @property
    def last_recycle(self) -> Optional[RecycleResult]:
        """The [`RecycleResult`][relumon.recycle.RecycleResult] of the last recycling, or None."""
        return self._recycling.last

    # ------------------------------------------------------------------ reports

    def _sync(self) -> bool:
        sync_dist = self.options.sync_dist
        if sync_dist is None:
            return distributed_world_size() > 1
        if sync_dist and distributed_world_size() == 1 and not dist.is_initialized():
            raise RelumonError("`sync_dist=True` needs an initialised torch.distributed process group")
        return sync_dist

    @_collector_paused
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
        windows = self._windows
        windows.count_compiled_steps()
        step = recorder.clock.steps_seen if step is None else step
        sites = {site.name: site for site in recorder.sites}
        synced = self._sync()
        gathered = gather([(site.layout(), site.stats) for site in sites.values()], synced)
        layouts = [layout for layout, _ in gathered]
        # Under torch.distributed, blame may gather sharded parameters: only safe when every rank holds the same
        # global report, hence decides to blame the same sites in the same order.
        gather_sharded = synced or distributed_world_size() == 1
        measured = windows.layer_reports(gathered, step, reset, self._alerts.alerted)
        layers = windows.explain(measured, layouts, gather_sharded)
        # The cause goes where blame goes: to roots that alert and to jumps (decided from the global report).
        self._alerts.check_optimizers(self.optimizers)
        wanted = {x.name for x, y in zip(measured, layers) if x.blame is not None and y.caused_by is None}
        layers = self._cause.attach(layers, wanted, window=self._window, step=step, close=reset)
        if self._certifier is not None:
            layers = windows.certify(layers, self._certifier, self.optimizers)
        steps = windows.steps(layers, synced)
        report = Report(layers, window=self._window, steps=steps)
        if reset and windows.before_training(steps, synced):
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
            windows.close(sites.values(), layers, layouts, step, also_confirm=self._recycling.suspects(layers))
            self._window += 1
            self.last_report = report
            if not self._alerts.idle_checked and windows.trained(steps):
                self._alerts.warn_idle()
            self._alerts.alert(report, step)
            if self.options.recycle is not None:
                report = self.last_report = self._recycling.after_window(report, self.optimizers)
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
        return self._recycling.recycle(self.last_report, self.optimizers if optimizer is None else optimizer, criterion)

    @property
    def timeline(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, {call site: dead fraction})`` for each closed window, oldest first (the last 500 windows)."""
        return list(self._windows.timeline)

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
            write_alerts(writer, self._alerts.window_alerts, step)
        return report

    def log_figures(self, writer: Any, step: int) -> None:
        """Write the gradient-flow chart of the last closed window and the dead-unit heatmap to a ``SummaryWriter``.

        Tags are ``relumon/grad_flow`` and ``relumon/dead_heatmap``. Needs matplotlib (the ``tensorboard`` extra).
        Under ``torch.distributed`` only global rank 0 writes.

        Raises:
            RelumonError: when no window has been closed yet (call [`report()`][relumon.Monitor.report] or
                [`log()`][relumon.Monitor.log] first).
        """
        if not hasattr(writer, "add_figure"):
            raise TypeError(
                f"expected `writer` to be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        if self.last_report is None:
            raise RelumonError("no window closed yet: call monitor.report() or monitor.log() before log_figures()")
        if global_rank() != 0:
            return
        write_figures(writer, draw(pictures(self.last_report, self.timeline)), step)

    # ------------------------------------------------------------------ alerts

    @property
    def alerted(self) -> frozenset[str]:
        """Names of the call sites already alerted on (each alerts at most once)."""
        return frozenset(self._alerts.alerted)

    def unconfirmed(self) -> list[LayerReport]:
        """Layers of the last closed window that look dead but were not confirmed: its sampled window found every
        measured unit dead, and no window measured on every call has closed since (``confirming`` is True)."""
        return unconfirmed(self.last_report)

    def warn_unconfirmed(self, advice: str = "close windows more often") -> None:
        """Say once which layers look dead but could not be confirmed, and why (training ended first).

        Called by [`remove()`][relumon.Monitor.remove] (so by leaving a ``with relumon.watch(...)`` block) and by the
        Lightning callback at the end of fit. Nothing happens when every suspect was confirmed or cleared. Only
        global rank 0 warns.

        Args:
            advice: the second remedy named after ``measure_every=1``, in the caller's terms (the Hugging Face
                callback names ``logging_steps``).
        """
        self._alerts.warn_unconfirmed(self.last_report, self._window, advice)

    # ------------------------------------------------------------------ state and lifetime

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state to checkpoint: everything a later report depends on.

        The alert history, the window count, the training steps seen (so steps, logging steps and the sampling
        schedule go on from there), each site's death history and last dead fraction, the sites being confirmed,
        and the heatmap's timeline. The open window's statistics live on the device and are not included: a resumed
        run's first window counts from the resume.
        """
        windows = self._windows
        for site in self._recorder.sites:  # every discovered site has a history, reported or not
            windows.diagnosis.history(site.name, site.stats.units)
        timeline = [
            [step, {k: v for k, v in fractions.items() if not math.isnan(v)}] for step, fractions in windows.timeline
        ]
        recorder = self._recorder
        return {
            "alerted": sorted(self._alerts.alerted),
            "window": self._window,
            "steps": recorder.clock.steps_seen,
            "confirming": sorted(recorder.confirming),
            "history": windows.diagnosis.state_dict(),
            "timeline": timeline,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict()`][relumon.Monitor.state_dict] output; missing keys keep their defaults.

        Death histories of sites not discovered yet are applied when those sites first report.
        """
        self._alerts.alerted = set(state.get("alerted", ()))
        self._window = int(state.get("window", 0))
        recorder, windows = self._recorder, self._windows
        recorder.clock.steps_seen = int(state.get("steps", recorder.clock.steps_seen))
        windows.start = recorder.clock.steps_seen  # the open window's statistics are not saved: it starts here
        recorder.confirming = set(state.get("confirming", ()))
        for site in recorder.sites:
            site.exact = site.name in recorder.confirming
        windows.diagnosis.load_state_dict(state.get("history", {}))
        windows.timeline.clear()
        windows.timeline.extend((int(step), dict(fractions)) for step, fractions in state.get("timeline", []))

    def remove(self) -> None:
        """Remove every hook relumon put on the model and its optimizers. Idempotent; the statistics stay readable.

        When the last closed window left layers that look dead but could not be confirmed (a `?` in its table),
        says so once (see [`warn_unconfirmed()`][relumon.Monitor.warn_unconfirmed]).
        """
        if self._recorder.active:
            self.warn_unconfirmed()
        self._recorder.remove()
        self._recycling.remove()
        if self._certifier is not None:
            self._certifier.remove()
        self._cause.remove()

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
