"""The Lightning callback: a thin adapter that turns Trainer events into [`relumon.Monitor`][relumon.Monitor] calls.

This is the only relumon module that imports Lightning. It works with ``lightning.pytorch`` and with
``pytorch_lightning``: the class derives from whichever is installed (``lightning`` first), and Trainers of either
namespace accept it, checkpoint state included.

Example::

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from relumon.lightning import ReluMonitor

    trainer = Trainer(callbacks=[ReluMonitor()], logger=TensorBoardLogger("runs"))
"""

from __future__ import annotations

import math
from typing import Any, Optional

from relumon.errors import DeadUnitsWarning, RelumonError, warn
from relumon.loggers import PictureWriter, TextWriter, is_tensorboard, pictures
from relumon.monitor import Monitor
from relumon.options import (
    FROM_TRAINER,
    CallbackOnDead,
    OptionAttributes,
    Options,
    check_int_at_least,
    resolve_callback_options,
    signature_with_options,
)
from relumon.report import LayerReport, Report, dead_layer_message
from relumon.tensorboard import alerts_text, write_layout_once

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised only where just pytorch_lightning is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
    except ImportError:
        raise ImportError(
            "relumon.lightning needs Lightning: `pip install relumon[lightning]` (or pytorch-lightning)"
        ) from None

__all__ = ["ReluMonitor"]

OnDeadPolicy = CallbackOnDead
#: The callback's own arguments (the rest go to Options).
_OWN_ARGUMENTS = ("log_every_n_steps", "on_dead", "figures", "prog_bar", "prefix", "options")


class ReluMonitor(OptionAttributes, Callback):
    """Log dead units and gradient flow of every ReLU-family activation, and alert when a layer dies.

    The callback watches the LightningModule from ``on_fit_start`` (after ``configure_model``, so models built
    there are watched) to ``teardown``, and also removes its hooks when fit ends with an exception. Every training
    micro-batch is a step; validation, test, predict and sanity-check forwards never count. A window closes each time
    ``trainer.global_step`` crosses a multiple of ``log_every_n_steps`` (once under gradient accumulation, and also
    when several optimizer steps per batch jump over the multiple) and at the end of fit, and each closed window is
    logged once, at ``trainer.global_step``, to every logger in ``trainer.loggers`` from global rank 0. Under DDP
    every rank reduces the window, so the figures are global and alerts are decided the same way on all ranks.
    When fit ends while the last window's sampled figures show layers dead that no window measured on every call
    could confirm (a `?` in its table: a short fit), one `RelumonWarning` from rank 0 names them and says why.

    A second ``fit`` with the same callback (a sweep) starts fresh: alerts, death history and timeline begin anew,
    unless that fit resumes from a checkpoint (``ckpt_path``) that holds this callback's state, which it continues
    (a checkpoint saved without it starts fresh too).

    Args:
        log_every_n_steps: optimizer steps per window. ``None`` uses the Trainer's ``log_every_n_steps``.
        on_dead: what to do the first time a window measured on every call finds every unit of a layer dead (once
            per dead cascade, for its root): ``"warn"`` (a [`DeadUnitsWarning`][relumon.DeadUnitsWarning]),
            ``"raise"`` (a [`RelumonError`][relumon.RelumonError]), ``"stop"`` (set ``trainer.should_stop`` and say
            why),
            ``"ignore"``, or a callable that receives the [`LayerReport`][relumon.LayerReport].
        figures: write the gradient-flow chart and the dead-unit heatmap at the end of each training epoch and of
            fit, once per step, to every logger that can show an image: TensorBoard (images), Weights & Biases
            (images under the same keys) and MLflow (PNG artifacts under ``relumon/``). Needs matplotlib. A logger
            that fails to take a picture gets one warning and no more pictures; training goes on.
        prog_bar: show the overall dead share of the last closed window in Lightning's progress bar, as
            ``dead%`` (a percentage, e.g. ``dead%=12.5``; ``<prefix>/dead%`` with another ``prefix``). It is updated
            whenever a window closes during training, and readable in ``trainer.progress_bar_metrics``.
        prefix: the first part of every logged tag.
        options: a ready [`Options`][relumon.Options]; keyword arguments override its fields. Its ``on_dead`` applies
            unless ``on_dead`` is given here; its ``grad_scaler``, ``sync_dist`` and ``optimizer`` must be None (the
            Trainer's are used).
        **kwargs: the options of [`Options`][relumon.Options] by name (``types``, ``unit_dim``, ``track_grad``,
            ``min_samples``, ``measure_every``, ``permanent_after``, ``dormant_tau``, ``functional``,
            ``grad_through``, ``recycle``), as for [`relumon.watch`][relumon.watch]. With ``recycle="dead"`` (or
            ``"dormant"``) each closed window is followed by recycling, with the Trainer's optimizers.
            ``grad_scaler`` and ``sync_dist`` come from the Trainer; ``on_dead`` is the callback's own, above. With
            ``measure_every``, a training micro-batch is a step. ``optimizer`` comes from the Trainer too: at
            ``on_train_start`` the monitor's ``optimizers`` become ``trainer.optimizers``, so alerts carry their cause
            (learning rate, update size, bias shift) and recycling resets their state. Each alert is also logged as
            text, under ``<prefix>/alerts``, to loggers that show text (TensorBoard, Weights & Biases, MLflow).

    Attributes:
        options: the validated [`Options`][relumon.Options] the monitor is built with.
        last_report: the most recent [`Report`][relumon.Report], or None.
        monitor: the [`Monitor`][relumon.Monitor] while fitting, else None.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: Optional[int] = None,
        on_dead: OnDeadPolicy = "warn",
        figures: bool = True,
        prog_bar: bool = False,
        prefix: str = "relumon",
        options: Optional[Options] = None,
        **kwargs: Any,
    ) -> None:
        if log_every_n_steps is not None:
            check_int_at_least("log_every_n_steps", log_every_n_steps)
        self.options, on_dead = resolve_callback_options(
            "ReluMonitor",
            options,
            kwargs,
            on_dead=on_dead,
            prefix=prefix,
            own=_OWN_ARGUMENTS,
            source="its precision plugin's GradScaler, its process group, its optimizers",
        )
        self.log_every_n_steps = log_every_n_steps
        self.on_dead = on_dead
        self.figures = figures
        self.prog_bar = prog_bar
        self.prefix = prefix
        self.monitor: Optional[Monitor] = None
        self.last_report: Optional[Report] = None
        self._trainer: Any = None
        self._window_start_step = 0
        self._last_logged_step = -1
        self._loaded_state: Optional[dict[str, Any]] = None
        self._restored = False  # _loaded_state came from a checkpoint of this fit, not from an earlier fit
        self._pictures = PictureWriter()
        self._pictures_due = False
        self._texts = TextWriter()
        #: Alert texts of the window being closed, logged as text with it.
        self._window_alerts: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        """Plain state for pickling (``ddp_spawn`` pickles every callback to start its workers).

        Mid-fit, the live monitor (bound to the model's hooks) and the Trainer are left out; the monitor's checkpoint
        state travels instead (a later fit that resumes from a checkpoint continues it; a new fit starts fresh).
        """
        state = dict(self.__dict__)
        if self.monitor is not None:
            state["_loaded_state"] = self.monitor.state_dict()
        state["monitor"] = None
        state["_trainer"] = None
        # The Trainer binds the LightningModule's `log` and `log_dict` onto every callback at fit start: pickling
        # them would drag the whole model along (and fail for a locally defined LightningModule).
        state.pop("log", None)
        state.pop("log_dict", None)
        return state

    @property
    def state_key(self) -> str:
        """The checkpoint key: stable across processes (a callable ``on_dead`` is named, not its address)."""
        on_dead = self.on_dead
        policy = on_dead if isinstance(on_dead, str) else _qualified_name(on_dead)
        return self._generate_state_key(
            types=[t.__name__ for t in self.options.types], on_dead=policy, prefix=self.prefix
        )

    # ------------------------------------------------------------------ attach and detach

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Attach here rather than in setup: a model built in `configure_model()` exists only after setup.
        if self.monitor is not None:
            return
        self._trainer = trainer
        if not self._restored:
            # No relumon state came from this fit's checkpoint (`load_state_dict` runs before `on_fit_start`): a new
            # fit, or a resume from a checkpoint saved without this callback. A reused callback (a sweep) starts
            # fresh then, without the last fit's alerts.
            self._loaded_state = None
            self.last_report = None
        self._restored = False
        self._pictures = PictureWriter()  # a new fit: its loggers, its steps
        self._pictures_due = False
        self._texts = TextWriter()
        types = self.options.types
        if not self.options.functional and not any(isinstance(m, types) for m in pl_module.modules()):
            if trainer.is_global_zero:
                looked_for = ", ".join(t.__name__ for t in types)
                warn(
                    f"relumon found no module of the watched types ({looked_for}) in {type(pl_module).__name__}. "
                    "ReluMonitor stays idle; training goes on."
                )
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = Monitor(pl_module, self.options.replace(grad_scaler=scaler, on_dead=self._on_dead_layer))
        if self._loaded_state is not None:
            self.monitor.load_state_dict(self._loaded_state)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.monitor is not None:
            self._loaded_state = self.monitor.state_dict()
            self.monitor.remove()
            self.monitor = None
        self._trainer = None

    # ------------------------------------------------------------------ windows

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Resuming restores global_step after setup: windows count from here.
        self._window_start_step = trainer.global_step
        self._last_logged_step = trainer.global_step
        if self.monitor is not None:  # the cause of death reads the learning rate and updates of these
            self.monitor.optimizers = list(trainer.optimizers)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self.monitor.new_step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        # A window closes when global_step crosses a multiple of `every`: once under accumulation (global_step
        # repeats across micro-batches), and also when several optimizer steps per batch jump over the multiple.
        if step // every > self._last_logged_step // every:
            self._close_window(trainer, step)
            if self.prog_bar:
                self._show_in_progress_bar(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Written at the next epoch's start or at the end of fit, whichever comes first: when this epoch was the last,
        # the end of fit closes one more window at the same step, and the pictures should show it, once.
        self._pictures_due = True

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pictures_due:
            self._log_figures(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None and trainer.global_step != self._last_logged_step:
            self._close_window(trainer, trainer.global_step)
        self._log_figures(trainer)
        if self.monitor is not None:
            # A warning at the end of fit, from rank 0, like Lightning's own end-of-fit advice.
            self.monitor.warn_unconfirmed()

    def _log_figures(self, trainer: Any) -> None:
        """The gradient-flow chart and the dead-unit heatmap, to every logger that shows images, from rank 0."""
        self._pictures_due = False
        if self.monitor is None or self.last_report is None or not trainer.is_global_zero or not self.figures:
            return
        shown = pictures(self.last_report, self.monitor.timeline, self.prefix)  # each drawn once, for every logger
        self._pictures.write(trainer.loggers, shown, trainer.global_step)

    def _show_in_progress_bar(self, pl_module: Any) -> None:
        """The last closed window's overall dead share, in percent, in the progress bar (not sent to loggers)."""
        report = self.last_report
        if report is None or math.isnan(report.dead_fraction):
            return
        key = "dead%" if self.prefix == "relumon" else f"{self.prefix}/dead%"
        # A Python float: Lightning makes it a tensor on the module's device, only when a window closes.
        pl_module.log(
            key, 100.0 * report.dead_fraction, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1
        )

    def _close_window(self, trainer: Any, step: int) -> None:
        assert self.monitor is not None
        self._last_logged_step = step
        self._window_alerts = []
        report = self.monitor.report(step=step)  # every rank: the reduction is collective
        self._window_start_step = step
        self.last_report = report
        if trainer.is_global_zero:
            self._log(trainer, report, step)

    def _log(self, trainer: Any, report: Report, step: int) -> None:
        scalars = report.scalars(self.prefix)
        if not scalars:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None) if is_tensorboard(logger) else None
            if experiment is not None:
                write_layout_once(experiment, self.prefix, scalars)
            logger.log_metrics(scalars, step=step)
        if self._window_alerts:
            self._texts.write(trainer.loggers, f"{self.prefix}/alerts", alerts_text(self._window_alerts), step)

    # ------------------------------------------------------------------ alerts

    def _on_dead_layer(self, layer: LayerReport) -> None:
        trainer = self._trainer
        optimizer_steps = trainer.global_step - self._window_start_step if trainer is not None else None
        monitor = self.monitor
        message = dead_layer_message(
            layer,
            optimizer_steps=optimizer_steps or None,
            # Alerts run while the window closes, after the monitor has opened the next one.
            window=monitor.window - 1 if monitor is not None else None,
            step=trainer.global_step if trainer is not None else None,
        )
        self._window_alerts.append(message)
        if callable(self.on_dead):
            self.on_dead(layer)
        elif self.on_dead == "raise":
            raise RelumonError(message)
        elif self.on_dead == "stop":
            if trainer is not None:
                trainer.should_stop = True
            if trainer is None or trainer.is_global_zero:
                warn(f"{message} Stopping training (ReluMonitor(on_dead='stop')).", DeadUnitsWarning)
        elif self.on_dead == "warn" and (trainer is None or trainer.is_global_zero):
            warn(message, DeadUnitsWarning)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = self.monitor.state_dict() if self.monitor is not None else dict(self._loaded_state or {})
        return {"monitor": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict.get("monitor", {}))
        self._restored = True
        if self.monitor is not None:
            self.monitor.load_state_dict(self._loaded_state)


# help() and inspect.signature show the options ReluMonitor forwards, although each is declared only in Options.
ReluMonitor.__signature__ = signature_with_options(  # type: ignore[attr-defined]
    ReluMonitor, exclude=(*FROM_TRAINER, "on_dead")
)


def _qualified_name(fn: Any) -> str:
    """``module.qualname`` of a callable (its class's for other callables): the same in every process."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"
