"""The Hugging Face ``transformers.Trainer`` callback: a thin adapter from Trainer events to a Monitor.

This is the only relumon module that imports ``transformers``. What it relies on in the Trainer (read from
transformers 5.x, ``trainer.py`` and ``trainer_callback.py``):

- ``CallbackHandler.call_event`` calls each callback in list order with the model (unwrapped), the optimizer
  (accelerate's wrapper) and the rest as keyword arguments; nothing hands a callback the Trainer itself.
- The reporting integrations of ``report_to`` (``TensorBoardCallback``, ``WandbCallback``, ``MLflowCallback``...)
  come before the user's callbacks, and each writes the ``logs`` dict it receives in ``on_log``. A key added to that
  dict by a callback that runs *before* them reaches every one of them; one added after them reaches none.
- ``Trainer.log`` copies ``logs`` into ``state.log_history`` before ``on_log``, so keys added in ``on_log`` never
  grow ``trainer_state.json``.
- No callback event fires when ``train()`` raises.
- ``TrainerState.stateful_callbacks`` (in ``trainer_state.json``) holds each ``ExportableState`` callback's
  ``state()``, as JSON, and a resumed run's ``state`` is read back from the checkpoint before ``on_train_begin``.

Example::

    from transformers import Trainer, TrainingArguments
    from relumon.huggingface import ReluMonitorCallback

    args = TrainingArguments("out", logging_steps=10, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ReluMonitorCallback()])
    trainer.train()
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Optional

import torch
from torch import nn

from relumon.errors import DeadUnitsWarning, RelumonError, warn
from relumon.hooks import OwnPreHook
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
from relumon.tensorboard import write_layout_once

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


class ReluMonitorCallback(OptionAttributes, TrainerCallback, ExportableState):
    """Log dead units and gradient flow of every ReLU-family activation of a ``transformers.Trainer`` model.

    The callback watches the Trainer's model from ``on_train_begin`` to ``on_train_end``. Every micro-batch is a
    step; evaluation and prediction forwards (``no_grad``, eval mode) never count.

    **Windows follow the Trainer's logging.** A window closes each time the Trainer logs training metrics (every
    ``logging_steps`` optimizer steps, also under ``gradient_accumulation_steps``; at the first step with
    ``logging_first_step``; per epoch with ``logging_strategy="epoch"``) and at the end of training, and its scalars
    are added to the Trainer's own ``logs`` dict in ``on_log``. So they go wherever ``report_to`` sends the loss
    (TensorBoard, Weights & Biases, MLflow...), at the same step, through each integration's own code; the
    integrations name them ``train/relumon/<metric>/<layer>``. For that, the callback moves itself in front of the
    reporting integrations in the Trainer's callback list when training begins. The progress bar prints only the
    overall ``relumon/summary/dead_fraction`` (the other keys are removed from ``logs`` after the integrations), and
    none goes to ``state.log_history``.
    Under DDP (``torchrun``, ``accelerate launch``) every rank closes the same windows, so the figures are global and
    alerts are decided alike on every rank; the integrations write from rank 0 only.

    **Pictures**: the gradient-flow chart and the dead-unit heatmap go to the ``TensorBoardCallback``'s writer (tags
    ``relumon/grad_flow`` and ``relumon/dead_heatmap``) at the end of each epoch and of training. Needs matplotlib.

    **Cleanup**: the hooks are removed at ``on_train_end``, and also when ``train()`` raises (no Trainer event fires
    then): an exception out of the Trainer's ``training_step`` removes them on its way out, and the first training
    forward of the model that the Trainer did not drive (after an exception elsewhere) removes them before it is
    counted. A later ``train()`` with the same callback starts afresh.

    **Resume**: the callback is an ``ExportableState``: its state (alerts, death history, the heatmap's timeline) is
    written to each checkpoint's ``trainer_state.json`` and continued by ``train(resume_from_checkpoint=...)``,
    whether or not ``restore_callback_states_from_checkpoint`` is set.

    Args:
        on_dead: what to do the first time a window measured on every call finds every unit of a layer dead (once
            per dead cascade, for its root): ``"warn"`` (a [`DeadUnitsWarning`][relumon.DeadUnitsWarning]),
            ``"raise"`` (a [`RelumonError`][relumon.RelumonError], after removing the hooks), ``"stop"`` (set
            ``control.should_training_stop``, so the Trainer ends training after the step, and say why),
            ``"ignore"``, or a callable that receives the [`LayerReport`][relumon.LayerReport].
        figures: write the two pictures to TensorBoard (needs a ``TensorBoardCallback``, e.g.
            ``report_to=["tensorboard"]``).
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
        last_report: the most recent [`Report`][relumon.Report], or None.
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
        # checkpoint): the arguments given, where JSON can hold them.
        self._json_args = _json_safe({"on_dead": on_dead, "figures": figures, "prefix": prefix, **kwargs})
        self.monitor: Optional[Monitor] = None
        self.last_report: Optional[Report] = None
        self._saved: Optional[dict[str, Any]] = None  # the monitor's state once training ends, for state()
        self._reset_run()

    def _reset_run(self) -> None:
        """Per-``train()`` bookkeeping, outside the monitor."""
        self._last_closed_step = 0
        self._window_start_step = 0
        self._pictured_step = -1
        self._rank_zero = True
        self._control: Any = None
        self._tensorboard: Any = None  # the TensorBoardCallback, if any
        self._trainer: Any = None
        self._in_training_step = False
        self._guard: Any = None
        self._tail: Optional[_StripRelumonKeys] = None
        self._handler: Any = None  # the CallbackHandler, while the tail waits for a place

    # ------------------------------------------------------------------ attach and detach

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()  # an earlier train() that raised before its hooks could go
        self._reset_run()
        self._rank_zero = bool(state.is_world_process_zero)
        self._control = control
        self._last_closed_step = self._window_start_step = state.global_step
        model = kwargs.get("model")
        handler, trainer = _find_handler_and_trainer(self)
        self._trainer = trainer
        if handler is not None:
            self._take_place(handler)
        elif self._rank_zero:
            warn(
                "ReluMonitorCallback could not find the Trainer's callback list, so it cannot run before the "
                "reporting integrations: its scalars reach only the callbacks after it, and it cannot remove its "
                "hooks if train() raises. Pass it to a transformers.Trainer through `callbacks=`."
            )
        if not isinstance(model, nn.Module):
            return
        types = self.options.types
        if not self.options.functional and not any(isinstance(m, types) for m in model.modules()):
            if self._rank_zero:
                looked_for = ", ".join(t.__name__ for t in types)
                warn(
                    f"relumon found no module of the watched types ({looked_for}) in {type(model).__name__}. "
                    "ReluMonitorCallback stays idle; training goes on."
                )
            return
        # A resumed run (global_step > 0 at train begin) continues the state saved in the checkpoint; a new run, even
        # with a reused callback, starts fresh.
        resumed = _saved_state(state, type(self).__name__, self.prefix) if state.global_step > 0 else None
        if resumed is None:
            self._saved = None
            self.last_report = None
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        monitor = Monitor(model, self.options.replace(grad_scaler=scaler, on_dead=self._on_dead_layer))
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        monitor.optimizers = [inner] if isinstance(inner, torch.optim.Optimizer) else []
        if resumed is not None:
            monitor.load_state_dict(resumed)
        self.monitor = monitor
        if trainer is not None:
            self._guard_training_step(trainer)
            self._guard = model.register_forward_pre_hook(OwnPreHook(self._check_driven, model))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None and state.global_step > self._last_closed_step:
            self._close_window(state, control)  # no training log came after the last steps: keep their report
        self._write_pictures(state.global_step)
        self._detach()

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
        """Put a `_StripRelumonKeys` in front of the progress bar or printer (which print ``logs``), after the
        reporting integrations, unless one is there already.

        ``running`` is the index the handler's loop is at: inserting above it leaves every entry still to be called
        exactly once, inserting at or below it would call one twice. Where the slot is not above it (the Trainer
        rebuilt the callback at the end of its list on resume, or it was added with ``add_callback`` after the
        Trainer was built), this waits for the next event, when this callback runs from its new place.
        """
        handler, self._handler = self._handler, None
        callbacks: list[Any] = handler.callbacks
        if any(isinstance(cb, _StripRelumonKeys) and cb.owner is self for cb in callbacks):
            self._tail = next(cb for cb in callbacks if isinstance(cb, _StripRelumonKeys) and cb.owner is self)
            return
        printer = next(
            (i for i, cb in enumerate(callbacks) if type(cb).__name__ in ("ProgressCallback", "PrinterCallback")),
            len(callbacks),
        )
        if printer <= running:
            self._handler = handler  # retried at the next event
            return
        self._tail = _StripRelumonKeys(self)
        callbacks.insert(printer, self._tail)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handler is not None and self in self._handler.callbacks:
            self._place_tail(self._handler.callbacks.index(self))

    def _guard_training_step(self, trainer: Any) -> None:
        """Wrap the Trainer's ``training_step`` (an instance attribute, undone at detach) so that an exception out of
        it removes the hooks, and so that forwards the Trainer drives can be told from others."""
        original = trainer.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            callback._in_training_step = True
            try:
                return original(*args, **kwargs)
            except BaseException:
                callback._detach()
                raise
            finally:
                callback._in_training_step = False

        training_step.__relumon_original__ = original  # type: ignore[attr-defined]
        trainer.training_step = training_step

    def _check_driven(self, module: nn.Module, inputs: Any) -> None:
        """A forward pre-hook on the model: a training forward outside the Trainer's ``training_step`` means
        ``train()`` has unwound without ``on_train_end`` (an exception elsewhere): remove the hooks before it counts."""
        if self._in_training_step or not module.training or not torch.is_grad_enabled():
            return
        self._detach()
        if self._rank_zero:
            warn(
                "relumon: the model ran a training forward outside the Trainer's training_step, after train() "
                "ended without on_train_end (an exception?). ReluMonitorCallback removed its hooks; "
                "the next trainer.train() watches the model again."
            )

    def _detach(self) -> None:
        """Remove every hook and wrapper; keep the monitor's state for ``state()``. Idempotent."""
        trainer, self._trainer = self._trainer, None
        wrapper = getattr(trainer, "__dict__", {}).get("training_step")
        if wrapper is not None and hasattr(wrapper, "__relumon_original__"):
            del trainer.training_step
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        if self.monitor is not None:
            self._saved = self.monitor.state_dict()
            self.monitor.remove()
            self.monitor = None

    # ------------------------------------------------------------------ windows

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if self.monitor is None or logs is None or state.global_step <= self._last_closed_step:
            return
        if any(key.startswith(_NOT_TRAINING) for key in logs):
            return
        report = self._close_window(state, control)
        scalars = report.scalars(self.prefix)
        logs.update(scalars)
        if self._tail is not None:
            self._tail.keys = list(scalars)
        writer = getattr(self._tensorboard, "tb_writer", None)
        if writer is not None and self._rank_zero and scalars:
            write_layout_once(writer, _TRAIN_PREFIX + self.prefix, [_TRAIN_PREFIX + tag for tag in scalars])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The last epoch's pictures come at on_train_end, after the end of training's log closed its last window.
        if not control.should_training_stop and state.global_step < state.max_steps:
            self._write_pictures(state.global_step)

    def _close_window(self, state: Any, control: Any) -> Report:
        assert self.monitor is not None
        self._control = control
        step = state.global_step
        self._last_closed_step = step
        report = self.monitor.report(step=step)  # every rank: the reduction is collective
        self._window_start_step = step
        self.last_report = report
        return report

    def _write_pictures(self, step: int) -> None:
        """The gradient-flow chart and the dead-unit heatmap to TensorBoard, once per step, from rank 0."""
        writer = getattr(self._tensorboard, "tb_writer", None)
        report, monitor = self.last_report, self.monitor
        if not self.figures or writer is None or not self._rank_zero or monitor is None or report is None:
            return
        if step == self._pictured_step:
            return
        self._pictured_step = step
        try:
            from relumon.figures import FIGURE_TAGS, dead_heatmap_figure, grad_flow_figure

            grad_flow, heatmap = grad_flow_figure(report), dead_heatmap_figure(monitor.timeline)
        except ImportError as error:
            self.figures = False
            warn(f"relumon: no pictures ({error}); `pip install matplotlib`, or pass figures=False. Training goes on.")
            return
        tag = {key: FIGURE_TAGS[key].replace("relumon", self.prefix, 1) for key in ("grad_flow", "dead_heatmap")}
        writer.add_figure(tag["grad_flow"], grad_flow, global_step=step)
        writer.add_figure(tag["dead_heatmap"], heatmap, global_step=step)

    # ------------------------------------------------------------------ alerts

    def _on_dead_layer(self, layer: LayerReport) -> None:
        trainer_steps = self._last_closed_step - self._window_start_step
        message = dead_layer_message(layer, optimizer_steps=trainer_steps or None)
        if callable(self.on_dead):
            self.on_dead(layer)
        elif self.on_dead == "raise":
            self._detach()
            raise RelumonError(message)
        elif self.on_dead == "stop":
            if self._control is not None:
                self._control.should_training_stop = True
            if self._rank_zero:
                warn(f"{message} Stopping training (ReluMonitorCallback(on_dead='stop')).", DeadUnitsWarning)
        elif self.on_dead == "warn" and self._rank_zero:
            warn(message, DeadUnitsWarning)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """The callback's checkpoint state for ``trainer_state.json`` (``ExportableState``): plain JSON data.

        ``args`` rebuild the callback where ``restore_callback_states_from_checkpoint`` asks the Trainer to (options
        JSON cannot hold, such as ``types`` or a callable ``on_dead``, are left out: keep them as given by leaving
        that flag off, the default); ``attributes`` carry the monitor's state.
        """
        monitor_state = self.monitor.state_dict() if self.monitor is not None else self._saved
        return {"args": dict(self._json_args), "attributes": {"relumon_state": monitor_state}}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.monitor is not None:
            state["_saved"] = self.monitor.state_dict()
        state.update(
            monitor=None, _trainer=None, _guard=None, _control=None, _tensorboard=None, _tail=None, _handler=None
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


def _find_handler_and_trainer(callback: Any) -> tuple[Any, Any]:
    """The ``CallbackHandler`` calling ``callback`` now, and the Trainer that owns it, from the calling frames.

    Nothing hands a callback the Trainer: ``call_event`` is the handler's method (its ``self``), and the Trainer's
    method that raised the event is a few frames above. Either is None when not found.
    """
    from transformers import Trainer

    handler = trainer = None
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if handler is None and isinstance(owner, CallbackHandler) and callback in owner.callbacks:
            handler = owner
        elif isinstance(owner, Trainer) and getattr(owner, "callback_handler", None) is handler is not None:
            trainer = owner
            break
        frame = frame.f_back  # type: ignore[assignment]
    return handler, trainer


def _saved_state(state: Any, name: str, prefix: str) -> Optional[dict[str, Any]]:
    """This callback's saved monitor state in a resumed ``TrainerState``, or None (several callbacks of the class are
    told apart by their ``prefix``)."""
    entries = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if entries is None:
        return None
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict):
            continue
        if entry.get("args", {}).get("prefix", "relumon") == prefix:
            saved = entry.get("attributes", {}).get("relumon_state")
            return dict(saved) if isinstance(saved, dict) else None
    return None


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
