"""The Hugging Face ``transformers.Trainer`` callback: a thin adapter from Trainer events to a Monitor.

This is the only relumon module that imports ``transformers``. What it relies on in the Trainer (read from
transformers 5.x, ``trainer.py`` and ``trainer_callback.py``):

- ``CallbackHandler.call_event`` calls each callback in list order with ``model`` (unwrapped), ``optimizer``
  (accelerate's ``AcceleratedOptimizer``, whose ``scaler`` is the GradScaler under fp16), ``lr_scheduler``,
  ``processing_class``, ``train_dataloader`` and ``eval_dataloader`` as keyword arguments; nothing hands a callback
  the Trainer itself.
- The Trainer's own training logs are ``_maybe_log_save_evaluate``'s (``loss``, ``grad_norm``, ``learning_rate``...),
  after ``on_step_end`` or ``on_epoch_end``, and ``_finalize_training``'s (``train_runtime``, ``train_loss``...), before
  ``on_train_end``. ``Trainer.log`` called from a subclass's ``compute_loss`` (inside ``training_step``) is not one.
- ``on_epoch_end`` runs before that epoch's log; ``on_save`` runs after the checkpoint folder
  ``<output_dir>/checkpoint-<global_step>`` and its ``trainer_state.json`` are written.
- ``train(resume_from_checkpoint=...)`` hands the folder (resolved to a path when ``True``) to
  ``_inner_training_loop`` as ``resume_from_checkpoint``, whose frame is on the stack at ``on_train_begin``.
- The reporting integrations of ``report_to`` (``TensorBoardCallback``, ``WandbCallback``, ``MLflowCallback``...)
  come before the user's callbacks, and each writes the ``logs`` dict it receives in ``on_log``. A key added to that
  dict by a callback that runs *before* them reaches every one of them; one added after them reaches none.
- ``Trainer.log`` copies ``logs`` into ``state.log_history`` before ``on_log``, so keys added in ``on_log`` never
  grow ``trainer_state.json``.
- No callback event fires when ``train()`` raises.
- ``TrainerState.stateful_callbacks`` (in ``trainer_state.json``) holds each ``ExportableState`` callback's
  ``state()``, as JSON, and a resumed run's ``state`` is read back from the checkpoint before ``on_train_begin``.
  With several callbacks of one class the entry is a list that every save *appends* to (the newest entries last).

Example::

    from transformers import Trainer, TrainingArguments
    from relumon.huggingface import ReluMonitorCallback

    args = TrainingArguments("out", logging_steps=10, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ReluMonitorCallback()])
    trainer.train()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from typing import Any, Optional

import torch
from torch import nn

from relumon.errors import DeadUnitsWarning, RelumonError, warn
from relumon.hooks import OwnPreHook
from relumon.loggers import draw, pictures, write_figures
from relumon.monitor import Monitor
from relumon.options import (
    FROM_TRAINER,
    CallbackOnDead,
    OptionAttributes,
    Options,
    resolve_callback_options,
    signature_with_options,
)
from relumon.report import LayerReport, Report, dead_layer_message
from relumon.tensorboard import write_alerts, write_layout_once

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState
except ImportError:  # pragma: no cover - exercised only where transformers is absent
    raise ImportError(
        "relumon.huggingface needs Hugging Face transformers: `pip install relumon[huggingface]`"
    ) from None

__all__ = ["ReluMonitorCallback"]

OnDeadPolicy = CallbackOnDead
#: The callback's own arguments (the rest go to Options).
_OWN_ARGUMENTS = ("on_dead", "figures", "prefix", "options")
#: Prefixes of evaluation and prediction metrics: a ``logs`` dict with such a key is not a training log.
_NOT_TRAINING = ("eval_", "test_")
#: The Trainer's reporting integrations rewrite a training-log key ``k`` to ``train/k`` (``rewrite_logs``).
_TRAIN_PREFIX = "train/"


#: Keys only the Trainer's own training logs carry: ``loss`` at each logging step, ``train_runtime`` at the end.
_TRAINER_LOG_KEYS = ("loss", "train_runtime")
#: Per-unit lists of a site's death history (`relumon.diagnosis`), kept out of ``trainer_state.json``.
_PER_UNIT = ("first_dead_step", "dead_streak", "recycled_pending")


class ReluMonitorCallback(OptionAttributes, TrainerCallback, ExportableState):
    """Log dead units and gradient flow of every ReLU-family activation of a ``transformers.Trainer`` model.

    The callback watches the Trainer's model from ``on_train_begin`` to ``on_train_end``. Every micro-batch is a
    step; evaluation and prediction forwards (``no_grad``, eval mode) never count.

    **Windows follow the Trainer's own training logs.** A window closes each time the Trainer logs its training
    metrics (every ``logging_steps`` optimizer steps, also under ``gradient_accumulation_steps``; at the first step
    with ``logging_first_step``; per epoch with ``logging_strategy="epoch"``) and at the end of training; a
    ``self.log({...})`` of your own (say in a Trainer subclass's ``compute_loss``) never closes one. The window's
    scalars are added to the Trainer's ``logs`` dict in ``on_log``, so they go wherever ``report_to`` sends the loss
    (TensorBoard, Weights & Biases, MLflow...), at the same step, through each integration's own code; the
    integrations name them ``train/relumon/<metric>/<layer>``. For that, the callback moves itself in front of the
    reporting integrations in the Trainer's callback list when training begins. The progress bar prints only the
    overall ``relumon/summary/dead_fraction`` (the other keys are removed from ``logs`` after the integrations), and
    none goes to ``state.log_history``.
    Under DDP (``torchrun``, ``accelerate launch``) every rank closes the same windows, so the figures are global and
    alerts are decided alike on every rank; the integrations write from rank 0 only.

    **Pictures and alerts**: the gradient-flow chart and the dead-unit heatmap go to the ``TensorBoardCallback``'s
    writer (tags ``relumon/grad_flow`` and ``relumon/dead_heatmap``) once per epoch, when the first window that
    closes at or after the epoch's end closes (at its step), and at the end of training; needs matplotlib. Alerts go
    to the same writer as text under ``train/relumon/alerts``, at the step of their window, which ``relumon summary``
    prints.

    **Finding the Trainer**: the callback needs the Trainer (for its callback list and its ``training_step``). Pass it
    with ``attach(trainer)``, or let ``on_train_begin`` find the Trainer that holds this callback among its callers.
    Without one it still measures and logs, but says so.

    **Cleanup**: the hooks are removed at ``on_train_end``, and also when ``train()`` raises (no Trainer event fires
    then): an exception out of the Trainer's ``training_step`` removes them on its way out, and the first training
    forward of the model after ``train()`` has unwound (no frame of that Trainer's ``train()`` on the stack) removes
    them before it is counted. A training forward of your own while ``train()`` runs (a probe in a callback) keeps
    them, and counts as a step of the window. A later ``train()`` with the same callback starts afresh.

    **Resume**: the callback is an ``ExportableState``. Per checkpoint, ``trainer_state.json`` gets its arguments and
    its small state (alerts given, windows, per layer the counts), which grows with the number of layers, not units
    or windows; the per-unit death history and the heatmap's timeline go to ``relumon-<prefix>.pt`` in the checkpoint
    folder (at ``on_save``). ``train(resume_from_checkpoint=...)`` continues both, from the folder it is given
    (moved or not), whether or not ``restore_callback_states_from_checkpoint`` is set.

    Args:
        on_dead: what to do the first time a window measured on every call finds every unit of a layer dead (once
            per dead cascade, for its root): ``"warn"`` (a [`DeadUnitsWarning`][relumon.DeadUnitsWarning]),
            ``"raise"`` (a [`RelumonError`][relumon.RelumonError], after removing the hooks), ``"stop"`` (set
            ``control.should_training_stop``, and ``control.should_save`` unless ``save_strategy="no"``, so the
            Trainer saves a checkpoint that shows the death and ends training after the step, and say why),
            ``"ignore"``, or a callable that receives the [`LayerReport`][relumon.LayerReport].
        figures: write the two pictures to TensorBoard (needs a ``TensorBoardCallback``, e.g.
            ``report_to=["tensorboard"]``; without one the callback says so once).
        prefix: the first part of every relumon key.
        options: a ready [`Options`][relumon.Options]; keyword arguments override its fields. Its ``on_dead`` applies
            unless ``on_dead`` is given here; its ``grad_scaler`` and ``sync_dist`` must be None.
        **kwargs: the options of [`Options`][relumon.Options] by name (``types``, ``unit_dim``, ``track_grad``,
            ``min_samples``, ``measure_every``, ``permanent_after``, ``dormant_tau``, ``functional``,
            ``grad_through``...), as for [`relumon.watch`][relumon.watch]. ``grad_scaler`` and ``sync_dist`` come
            from the Trainer.

    Raises:
        TypeError: for ``grad_scaler`` or ``sync_dist``, or a keyword that names no option.
        ValueError: for an ``on_dead`` or ``prefix`` out of range.

    Attributes:
        options: the validated [`Options`][relumon.Options] the monitor is built with.
        last_report: the [`Report`][relumon.Report] of the last closed window (kept after training), or None.
        history: ``(step, {layer: dead fraction})`` per closed window, oldest first (kept after training; continued
            on resume): the timeline the heatmap draws.
        monitor: the [`Monitor`][relumon.Monitor] while training, else None.
    """

    def __init__(
        self,
        *,
        on_dead: OnDeadPolicy = "warn",
        figures: bool = True,
        prefix: str = "relumon",
        options: Optional[Options] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(figures, bool):
            raise TypeError(f"expected `figures` to be True or False, got {figures!r}")
        self.options, on_dead = resolve_callback_options(
            "ReluMonitorCallback",
            options,
            kwargs,
            on_dead=on_dead,
            prefix=prefix,
            own=_OWN_ARGUMENTS,
            source="its accelerator's GradScaler, its process group, its optimizer",
        )
        self.on_dead = on_dead
        self.figures = figures
        self.prefix = prefix
        # What the Trainer needs to rebuild this callback from trainer_state.json (restore_callback_states_from_
        # checkpoint): the arguments in force, those given through `options=` included, where JSON can hold them.
        given = {"on_dead": on_dead, "figures": figures, "prefix": prefix, **_changed(self.options)}
        self._json_args = _json_safe(given)
        # Named in state() so that a callback the Trainer rebuilds from it can say what it runs without.
        self._unsaved = sorted(set(given) - set(self._json_args))
        self.monitor: Optional[Monitor] = None
        self.last_report: Optional[Report] = None
        self._saved: Optional[dict[str, Any]] = None  # the monitor's state once training ends, for state()
        self._attached: Any = None  # the Trainer given to attach()
        self._said_no_writer = False
        self._reset_run()

    def _reset_run(self) -> None:
        """Per-``train()`` bookkeeping, outside the monitor."""
        self._last_closed_step = 0
        self._window_start_step = 0
        self._pictured_step = -1
        self._pictures_due = False
        self._rank_zero = True
        self._args: Any = None
        self._control: Any = None
        self._tensorboard: Any = None  # the TensorBoardCallback, if any
        self._trainer: Any = None
        self._in_training_step = False
        self._ending = False
        self._window_alerts: list[str] = []
        self._guard: Any = None
        self._step_wrapper: Any = None  # (trainer, its training_step wrapper) while guarded
        self._tail: Optional[_StripRelumonKeys] = None
        self._handler: Any = None  # the CallbackHandler, while the tail waits for a place

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, {layer: dead fraction})`` per closed window, oldest first: the heatmap's timeline.

        Readable during and after training (and after a resume, from the checkpoint's start).
        """
        if self.monitor is not None:
            return self.monitor.timeline
        saved = self._saved or {}
        return [(int(step), dict(fractions)) for step, fractions in saved.get("timeline", [])]

    def attach(self, trainer: Any) -> ReluMonitorCallback:
        """Tie this callback to ``trainer`` (a ``transformers.Trainer``), adding it to its callbacks if missing.

        Optional: ``on_train_begin`` looks for the Trainer that holds this callback among its callers first, and
        takes this one only where none is found (a loop that raises the Trainer's events from elsewhere).

        Returns:
            The callback itself.
        """
        from transformers import Trainer

        if not isinstance(trainer, Trainer):
            raise TypeError(f"expected `trainer` to be a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._attached = trainer
        return self

    # ------------------------------------------------------------------ attach and detach

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()  # an earlier train() that raised before its hooks could go
        self._reset_run()
        self._rank_zero = bool(state.is_world_process_zero)
        self._args = args
        self._control = control
        self._last_closed_step = self._window_start_step = state.global_step
        model = kwargs.get("model")
        trainer = self._find_trainer()
        self._trainer = trainer
        if trainer is not None:
            self._take_place(trainer.callback_handler)
        elif self._rank_zero:
            warn(
                "ReluMonitorCallback could not find the transformers.Trainer it belongs to, so it cannot run before "
                "the reporting integrations: its scalars reach only the callbacks after it, and it cannot remove its "
                "hooks if train() raises. Pass it through `Trainer(callbacks=...)`, or call "
                "`callback.attach(trainer)`."
            )
        unsaved = self.__dict__.pop("relumon_unsaved", None)  # set by the Trainer on a callback it rebuilt
        if unsaved and self._rank_zero:
            names = ", ".join(f"`{name}`" for name in unsaved)
            warn(
                "restore_callback_states_from_checkpoint=True: transformers replaced your ReluMonitorCallback with "
                f"one rebuilt from trainer_state.json, without {names} (JSON cannot hold them): it runs with their "
                "defaults, and its history is on the callback in `trainer.callback_handler.callbacks`, not on "
                "yours. Leave that flag off (the default) to keep your callback and its options; relumon's state is "
                "resumed either way."
            )
        no_writer = trainer is not None and self._tensorboard is None
        if self.figures and no_writer and self._rank_zero and not self._said_no_writer:
            self._said_no_writer = True
            warn(
                "ReluMonitorCallback(figures=True) draws its pictures into TensorBoard, but the Trainer has no "
                "TensorBoardCallback: no pictures. Add `report_to=['tensorboard']` to the TrainingArguments, or pass "
                "figures=False."
            )
        if not isinstance(model, nn.Module):
            return
        types = self.options.types
        if not self.options.functional and not any(isinstance(m, types) for m in model.modules()):
            if self._rank_zero:
                warn(_no_watched_types_message(model, types))
            return
        # A resumed run (global_step > 0 at train begin) continues the state saved in the checkpoint; a new run, even
        # with a reused callback, starts fresh.
        resumed = self._resumed_state(args, state, trainer) if state.global_step > 0 else None
        if resumed is None:
            self._saved = None
            self.last_report = None
        optimizer = kwargs.get("optimizer")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
        if scaler is None:
            scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        monitor = Monitor(model, self.options.replace(grad_scaler=scaler, on_dead=self._on_dead_layer))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        monitor.optimizers = [inner] if isinstance(inner, torch.optim.Optimizer) else []
        if resumed is not None:
            monitor.load_state_dict(resumed)
        self.monitor = monitor
        if trainer is not None:
            self._guard_training_step(trainer)
            self._guard = model.register_forward_pre_hook(OwnPreHook(self._check_driven, model))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ending = True
        if self.monitor is not None and state.global_step > self._last_closed_step:
            self._close_window(state, control)  # no training log came after the last steps: keep their report
        self._write_pictures(state.global_step)
        self._detach()

    def _find_trainer(self) -> Any:
        """The Trainer among the callers of this event whose callback list holds this callback (the nearest; the
        whole stack is searched), else the one given to `attach` if it holds it. None when there is none.

        The callers come first: a callback attached to one Trainer and then passed to another is driven by that one.
        """
        from transformers import Trainer

        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None) if isinstance(owner, Trainer) else None
            if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                return owner
            frame = frame.f_back  # type: ignore[assignment]
        attached = self._attached
        if attached is not None and self in attached.callback_handler.callbacks:
            return attached
        return None

    def _take_place(self, handler: Any) -> None:
        """Move this callback right after ``DefaultFlowCallback``, in front of the reporting integrations, so the
        keys it adds to ``logs`` reach them; then `_place_tail`.

        Called from ``on_train_begin`` while the handler loops over its list (index ``running``, this callback's):
        moving an entry from ``running`` to a lower index leaves every entry still to be called where it was.
        """
        callbacks: list[Any] = handler.callbacks
        running = callbacks.index(self)
        flows = [i for i, cb in enumerate(callbacks[:running]) if isinstance(cb, DefaultFlowCallback)]
        target = flows[-1] + 1 if flows else 0
        if target < running:
            callbacks.insert(target, callbacks.pop(running))
        from transformers.integrations.integration_utils import TensorBoardCallback

        self._tensorboard = next((cb for cb in callbacks if isinstance(cb, TensorBoardCallback)), None)
        self._handler = handler
        self._place_tail(running)

    def _place_tail(self, running: int) -> None:
        """Move the progress bar or printer (which print ``logs``) to the end of the list and put a
        `_StripRelumonKeys` right in front of it: every other callback, the reporting integrations and loggers added
        with ``add_callback`` after the Trainer was built included, gets relumon's keys; only the printer does not.

        ``running`` is the index the handler's loop is at: moving or inserting entries above it leaves every entry
        still to be called exactly once, touching one at or below it would call one twice. Where the printer is not
        above it (the Trainer rebuilt the callback at the end of its list on resume, or it was added with
        ``add_callback`` after the Trainer was built), this waits for the next event, when this callback runs from
        its new place.
        """
        handler, self._handler = self._handler, None
        callbacks: list[Any] = handler.callbacks
        printer = next(
            (i for i, cb in enumerate(callbacks) if type(cb).__name__ in ("ProgressCallback", "PrinterCallback")),
            None,
        )
        if printer is not None and printer <= running:
            self._handler = handler  # retried at the next event
            return
        tail = next((cb for cb in callbacks if isinstance(cb, _StripRelumonKeys) and cb.owner is self), None)
        if tail is not None and callbacks.index(tail) <= running:
            self._tail = tail  # already called in this event: leave it where it is
            return
        if tail is not None:
            callbacks.remove(tail)  # from an earlier train(): placed again, in front of the printer
        if printer is not None:
            printer = next(
                i for i, cb in enumerate(callbacks) if type(cb).__name__ in ("ProgressCallback", "PrinterCallback")
            )
            callbacks.append(callbacks.pop(printer))
        self._tail = tail if tail is not None else _StripRelumonKeys(self)
        callbacks.insert(len(callbacks) - 1 if printer is not None else len(callbacks), self._tail)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handler is not None and self in self._handler.callbacks:
            self._place_tail(self._handler.callbacks.index(self))

    def _guard_training_step(self, trainer: Any) -> None:
        """Wrap the Trainer's ``training_step`` (an instance attribute, undone at detach) so that an exception out of
        it removes the hooks, and so that forwards and logs the Trainer drives can be told from others. A
        ``training_step`` of your own set on the instance is called inside it and put back at detach."""
        original = trainer.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if not training_step.__relumon_active__:  # type: ignore[attr-defined]
                return original(*args, **kwargs)  # detached while another wrapper held on to this one
            callback._in_training_step = True
            try:
                return original(*args, **kwargs)
            except BaseException:
                callback._detach()
                raise
            finally:
                callback._in_training_step = False

        training_step.__relumon_original__ = original  # type: ignore[attr-defined]
        training_step.__relumon_had_own__ = "training_step" in vars(trainer)  # type: ignore[attr-defined]
        training_step.__relumon_active__ = True  # type: ignore[attr-defined]
        trainer.training_step = training_step
        self._step_wrapper = (trainer, training_step)

    def _unguard_training_step(self) -> None:
        """Undo `_guard_training_step`: put back what the instance had (the class's method, or your own), skipping
        wrappers of relumon's already detached; a wrapper another one holds on to only stops acting."""
        guard, self._step_wrapper = self._step_wrapper, None
        if guard is None:
            return
        trainer, wrapper = guard
        wrapper.__relumon_active__ = False
        if vars(trainer).get("training_step") is not wrapper:
            return
        inner, had_own = wrapper.__relumon_original__, wrapper.__relumon_had_own__
        while getattr(inner, "__relumon_active__", None) is False:
            inner, had_own = inner.__relumon_original__, inner.__relumon_had_own__
        if had_own:
            trainer.training_step = inner
        else:
            del trainer.training_step

    def _check_driven(self, module: nn.Module, inputs: Any) -> None:
        """A forward pre-hook on the model: a training forward outside the Trainer's ``training_step`` after
        ``train()`` has unwound without ``on_train_end`` (an exception elsewhere) removes the hooks before it counts.
        One while ``train()`` still runs (a callback's probe forward) leaves them."""
        if self._in_training_step or not module.training or not torch.is_grad_enabled():
            return
        if _is_running(self._trainer):
            return
        self._detach()
        if self._rank_zero:
            warn(
                "relumon: the model ran a training forward after the Trainer's train() ended without on_train_end "
                "(an exception?). ReluMonitorCallback removed its hooks; the next trainer.train() watches the model "
                "again."
            )

    def _detach(self) -> None:
        """Remove every hook and wrapper; keep the monitor's state for ``state()``. Idempotent.

        First says which layers looked dead but could not be confirmed, in the Trainer's terms."""
        self._trainer = None
        self._unguard_training_step()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        if self.monitor is not None:
            self._warn_unconfirmed(self.monitor)
            self._saved = self.monitor.state_dict()
            self.monitor.remove()
            self.monitor = None

    def _warn_unconfirmed(self, monitor: Monitor) -> None:
        """`Monitor.warn_unconfirmed`, with the Trainer's own setting to change named."""
        logging_steps = getattr(self._args, "logging_steps", None)
        now = f" (now {logging_steps:g})" if isinstance(logging_steps, (int, float)) else ""
        monitor.warn_unconfirmed(
            advice=f"lower the TrainingArguments' `logging_steps`{now}, so that windows close sooner,"
        )

    # ------------------------------------------------------------------ windows

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if self.monitor is None or logs is None or state.global_step <= self._last_closed_step:
            return
        # Only the Trainer's own training logs close a window: not eval/predict metrics, not a `self.log()` made in
        # compute_loss or training_step, not a log without the Trainer's keys.
        if self._in_training_step or any(key.startswith(_NOT_TRAINING) for key in logs):
            return
        if not any(key in logs for key in _TRAINER_LOG_KEYS):
            return
        report = self._close_window(state, control)
        scalars = report.scalars(self.prefix)
        logs.update(scalars)
        if self._tail is not None:
            self._tail.keys = list(scalars)
        writer = getattr(self._tensorboard, "tb_writer", None)
        if writer is not None and self._rank_zero:
            if scalars:
                write_layout_once(writer, _TRAIN_PREFIX + self.prefix, [_TRAIN_PREFIX + tag for tag in scalars])
            write_alerts(writer, self._window_alerts, state.global_step, prefix=_TRAIN_PREFIX + self.prefix)
        if self._pictures_due:
            self._write_pictures(state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The last epoch's pictures come at on_train_end, after the end of training's log closed its last window.
        if control.should_training_stop or state.global_step >= state.max_steps:
            return
        if self._last_closed_step == state.global_step and not control.should_log:
            self._write_pictures(state.global_step)  # a window closed at this very step: the pictures hold it
        else:
            # Drawn when the next window closes (this epoch's log, or the next logging step), at that window's step:
            # a picture never holds data older than the step it is shown at.
            self._pictures_due = True

    def _close_window(self, state: Any, control: Any) -> Report:
        assert self.monitor is not None
        self._control = control
        step = state.global_step
        self._last_closed_step = step
        self._window_alerts = []
        report = self.monitor.report(step=step)  # every rank: the reduction is collective
        self._window_start_step = step
        self.last_report = report
        return report

    def _write_pictures(self, step: int) -> None:
        """The gradient-flow chart and the dead-unit heatmap to TensorBoard, once per step, from rank 0."""
        self._pictures_due = False
        writer = getattr(self._tensorboard, "tb_writer", None)
        report, monitor = self.last_report, self.monitor
        if not self.figures or writer is None or not self._rank_zero or monitor is None or report is None:
            return
        if step == self._pictured_step:
            return
        self._pictured_step = step
        try:
            figures = draw(pictures(report, monitor.timeline, self.prefix))
        except ImportError as error:
            self.figures = False
            warn(f"relumon: no pictures ({error}); `pip install matplotlib`, or pass figures=False. Training goes on.")
            return
        write_figures(writer, figures, step)

    # ------------------------------------------------------------------ alerts

    def _on_dead_layer(self, layer: LayerReport) -> None:
        trainer_steps = self._last_closed_step - self._window_start_step
        monitor = self.monitor
        message = dead_layer_message(
            layer,
            optimizer_steps=trainer_steps or None,
            # Alerts run while the window closes, after the monitor has opened the next one.
            window=monitor.window - 1 if monitor is not None else None,
            step=self._last_closed_step,
        )
        self._window_alerts.append(message)
        if callable(self.on_dead):
            try:
                self.on_dead(layer)
            except BaseException:
                self._detach()  # as for on_dead="raise": your exception ends train(), no hook stays behind
                raise
        elif self.on_dead == "raise":
            self._detach()
            raise RelumonError(message)
        elif self.on_dead == "stop":
            control, args = self._control, self._args
            at_end = self._ending or (control is not None and control.should_training_stop)
            if control is not None and not at_end:
                control.should_training_stop = True
                if getattr(args, "save_strategy", "no") != "no":  # SaveStrategy is a str enum
                    control.should_save = True  # the checkpoint that shows the death
            if self._rank_zero:
                why = "Training was ending anyway" if at_end else "Stopping training"
                warn(f"{message} {why} (ReluMonitorCallback(on_dead='stop')).", DeadUnitsWarning)
        elif self.on_dead == "warn" and self._rank_zero:
            warn(message, DeadUnitsWarning)

    # ------------------------------------------------------------------ checkpoints

    def _monitor_state(self) -> Optional[dict[str, Any]]:
        return self.monitor.state_dict() if self.monitor is not None else self._saved

    def state(self) -> dict[str, Any]:
        """The callback's checkpoint state for ``trainer_state.json`` (``ExportableState``): plain JSON data whose
        size grows with the number of layers, not units or windows.

        ``args`` rebuild the callback where ``restore_callback_states_from_checkpoint`` asks the Trainer to (options
        JSON cannot hold, such as ``types`` or a callable ``on_dead``, are left out: keep them as given by leaving
        that flag off, the default); ``attributes`` carry the monitor's state without the per-unit death history and
        the heatmap's timeline, which `on_save` writes to ``relumon-<prefix>.pt`` next to it (named, with a digest of
        its content, in the state).
        """
        small, _ = _split_state(self._monitor_state(), self._units_file())
        attributes: dict[str, Any] = {"relumon_state": small}
        if self._unsaved:
            # The Trainer sets each attribute on the callback it rebuilds: `relumon_unsaved` tells it what was lost.
            attributes["relumon_unsaved"] = list(self._unsaved)
        return {"args": dict(self._json_args), "attributes": attributes}

    def _units_file(self) -> str:
        """``relumon-<prefix>.pt``; a prefix with characters a file name should not hold is spelled with ``_`` and
        told apart by a short hash (``enc/relu`` and ``enc_relu`` get two files)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.prefix)
        if safe != self.prefix:
            safe += "-" + hashlib.sha256(self.prefix.encode()).hexdigest()[:8]
        return f"relumon-{safe}.pt"

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the per-unit death history and the timeline into the checkpoint folder the Trainer just wrote (from
        rank 0)."""
        _, payload = _split_state(self._monitor_state(), self._units_file())
        if not payload or not state.is_world_process_zero:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            path = os.path.join(folder, self._units_file())
            torch.save(payload, path + ".tmp")
            os.replace(path + ".tmp", path)  # whole or absent, even if the job is killed while saving

    def _resumed_state(self, args: Any, state: Any, trainer: Any) -> Optional[dict[str, Any]]:
        """The monitor state saved in the checkpoint being resumed: this callback's newest entry in
        ``stateful_callbacks`` and its file, read from the folder given to ``train(resume_from_checkpoint=...)``
        (else ``<output_dir>/checkpoint-<global_step>``), and only if its digest is the one the entry names."""
        small = _saved_state(state, type(self).__name__, self.prefix)
        if small is None or "units_file" not in small:
            return small
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folders = [
            _resume_folder(trainer),
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
        ]
        paths = list(dict.fromkeys(os.path.join(f, small["units_file"]) for f in folders if f is not None))
        foreign = []
        for path in paths:
            if not os.path.isfile(path):
                continue
            try:
                payload = torch.load(path, weights_only=True)
            except Exception:  # a file cut short (a job killed while saving) must not stop the resume
                foreign.append(path)
                continue
            digest = small.get("units_digest")
            if not isinstance(payload, dict) or digest is None or payload.get("digest") != digest:
                foreign.append(path)
                continue
            history = small.setdefault("history", {})
            for site, lists in payload.get("history", {}).items():
                history.setdefault(site, {}).update({key: value.tolist() for key, value in lists.items()})
            small["timeline"] = payload.get("timeline", [])
            return small
        if self._rank_zero:
            where = " or ".join(paths)
            why = (
                f"{' and '.join(foreign)} is unreadable or belongs to another checkpoint"
                if foreign
                else f"{where} is not there"
            )
            warn(
                f"ReluMonitorCallback: resuming at step {state.global_step}, but its per-unit death history and "
                f"timeline ({small['units_file']}) cannot be read: {why}. Alerts and windows go on; each unit's "
                "death history and the heatmap's timeline start again."
            )
        return small

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.monitor is not None:
            state["_saved"] = self.monitor.state_dict()
        state.update(
            monitor=None,
            _trainer=None,
            _attached=None,
            _guard=None,
            _step_wrapper=None,
            _control=None,
            _args=None,
            _tensorboard=None,
            _tail=None,
            _handler=None,
        )
        return state


# help() and inspect.signature show the options the callback forwards, although each is declared only in Options.
ReluMonitorCallback.__signature__ = signature_with_options(  # type: ignore[attr-defined]
    ReluMonitorCallback, exclude=(*FROM_TRAINER, "on_dead")
)


class _StripRelumonKeys(TrainerCallback):
    """Removes relumon's keys from ``logs`` once the reporting integrations have them, before the progress bar
    prints ``logs``: a per-layer scalar for every layer would bury the loss. The overall dead fraction stays."""

    def __init__(self, owner: ReluMonitorCallback) -> None:
        self.owner = owner
        self.keys: list[str] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if logs is None or not self.keys:
            return
        kept = f"{self.owner.prefix}/summary/dead_fraction"
        for key in self.keys:
            if key != kept:
                logs.pop(key, None)
        self.keys = []

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.keys = []


def _is_running(trainer: Any) -> bool:
    """Whether ``trainer``'s ``train()`` is still on the calling stack (it has not unwound)."""
    if trainer is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is trainer:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _no_watched_types_message(model: nn.Module, types: tuple[type[nn.Module], ...]) -> str:
    """The warning for a model with no module of the watched types: what it looked for, the activation classes it
    found instead, and how to watch them (``types=``)."""
    from transformers.activations import ACT2CLS

    known = {cls if isinstance(cls, type) else cls[0] for cls in ACT2CLS.values()}  # type: ignore[index]
    found: dict[str, int] = {}
    for module in model.modules():
        kind = type(module)
        if kind in known or kind.__module__.startswith(("torch.nn.modules.activation", "transformers.activations")):
            found[kind.__name__] = found.get(kind.__name__, 0) + 1
    looked_for = ", ".join(t.__name__ for t in types)
    message = f"relumon found no module of the watched types ({looked_for}) in {type(model).__name__}"
    if found:
        names = ", ".join(f"{name} ({count})" for name, count in sorted(found.items()))
        first = sorted(found)[0]
        message += (
            f"; its activations are {names}. To watch one, pass its class: "
            f"`ReluMonitorCallback(types=({first},))` (gradient flow; dead units for the ReLU family)"
        )
    return message + ". ReluMonitorCallback stays idle; training goes on."


def _split_state(state: Optional[dict[str, Any]], units_file: str) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
    """A monitor ``state_dict()`` as its small part, for JSON (per site: counts and the last dead fraction), and the
    rest for a file of relumon's own: per site its per-unit lists as int64 tensors, the heatmap's timeline, and a
    digest of both that the small part names too (so a resume reads only the file written with it)."""
    if state is None:
        return None, {}
    small = {key: value for key, value in state.items() if key not in ("history", "timeline")}
    history: dict[str, Any] = {}
    per_unit: dict[str, dict[str, torch.Tensor]] = {}
    for site, record in (state.get("history") or {}).items():
        history[site] = {key: value for key, value in record.items() if key not in _PER_UNIT}
        lists = {key: torch.tensor(record[key], dtype=torch.int64) for key in _PER_UNIT if key in record}
        if lists:
            per_unit[site] = lists
    small["history"] = history
    timeline = state.get("timeline") or []
    if not per_unit and not timeline:
        return small, {}
    content = {site: {key: value.tolist() for key, value in lists.items()} for site, lists in per_unit.items()}
    digest = hashlib.sha256(json.dumps([content, timeline], sort_keys=True).encode()).hexdigest()[:16]
    small["units_file"], small["units_digest"] = units_file, digest
    return small, {"history": per_unit, "timeline": timeline, "digest": digest}


def _resume_folder(trainer: Any) -> Optional[str]:
    """The checkpoint folder ``trainer``'s running ``train()`` resumes from (its ``resume_from_checkpoint``, a path
    once ``train()`` resolved ``True``), read from the calling frames; None when none is found."""
    if trainer is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        folder = local.get("resume_from_checkpoint")
        if local.get("self") is trainer and isinstance(folder, (str, os.PathLike)):
            return str(os.fspath(folder))
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _saved_state(state: Any, name: str, prefix: str) -> Optional[dict[str, Any]]:
    """This callback's saved monitor state in a resumed ``TrainerState``, or None. Several callbacks of the class are
    told apart by their ``prefix``; each save appends to the list, so the last matching entry is the newest."""
    entries = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if entries is None:
        return None
    for entry in reversed(entries if isinstance(entries, list) else [entries]):
        if not isinstance(entry, dict):
            continue
        if entry.get("args", {}).get("prefix", "relumon") == prefix:
            saved = entry.get("attributes", {}).get("relumon_state")
            return json.loads(json.dumps(saved)) if isinstance(saved, dict) else None
    return None


def _changed(options: Options) -> dict[str, Any]:
    """The fields of ``options`` that differ from the defaults (those the Trainer supplies, and ``on_dead``, aside)."""
    defaults = Options()
    return {
        field.name: getattr(options, field.name)
        for field in dataclasses.fields(Options)
        if field.name not in (*FROM_TRAINER, "on_dead")
        and getattr(options, field.name) != getattr(defaults, field.name)
    }


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that JSON holds as they are (a callable ``on_dead``, ``types`` are left out)."""
    safe = {}
    for key, value in values.items():
        try:
            if json.loads(json.dumps(value)) == value and not (isinstance(value, float) and math.isnan(value)):
                safe[key] = value
        except (TypeError, ValueError):
            continue
    return safe
