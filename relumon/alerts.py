"""What relumon tells the user about closed windows: the dead-layer alert, and the warnings about what it cannot see.

Report-time only. Under ``torch.distributed`` every rank holds the same global report, so every rank decides alike;
only global rank 0 warns.

- **The dead-layer alert** (``on_dead``): once per dead cascade, for its root, when a window measured on every call
  confirms that every unit of the layer is dead; the message (`relumon.report.dead_layer_message`) names the sites
  that died with it. The window's alert texts are kept for ``Monitor.log`` to write.
- **Deaths that could not be confirmed**: layers that looked dead in a sampled window when training ended, said once
  (`Alerts.warn_unconfirmed`, from ``Monitor.remove`` and the adapters' end of training).
- **Idle modules**: watched modules that never ran in a training forward, named once, after the first window with
  training steps.
- **A bad ``optimizers`` list**: said once; what is not an optimizer is left out and training goes on.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from relumon.errors import DeadUnitsWarning, RelumonError, RelumonWarning, warn
from relumon.options import Options
from relumon.recorder import Recorder
from relumon.report import LayerReport, Report, dead_layer_message

__all__ = ["Alerts", "global_rank", "unconfirmed"]


class Alerts:
    """Decides and words what the user hears about closed windows: each dead layer's alert once, and the warnings.

    Args:
        options: ``on_dead``, ``min_samples`` and ``functional`` apply here.
        recorder: the per-step recorder (which watched modules ran in a training forward).
    """

    def __init__(self, options: Options, recorder: Recorder) -> None:
        self._options = options
        self._recorder = recorder
        #: Names of the call sites already alerted on (each alerts at most once).
        self.alerted: set[str] = set()
        #: The alert texts of the window closed last (written to TensorBoard by `Monitor.log`).
        self.window_alerts: list[str] = []
        #: Whether the idle modules were looked for (after the first window with training steps).
        self.idle_checked = False
        self._unconfirmed_said: Optional[int] = None  # the window whose unconfirmed deaths were last reported
        self._warned_optimizers = False

    def alert(self, report: Report, step: int) -> None:
        """One alert per dead cascade, for its root; the message names the sites that died with it."""
        on_dead = self._options.on_dead
        self.window_alerts = []
        for layer in report.roots:
            if layer.name in self.alerted or layer.samples < self._options.min_samples or not layer.exact:
                continue
            self.alerted.add(layer.name)
            message = dead_layer_message(layer, report.steps, window=report.window, step=step)
            self.window_alerts.append(message)
            if callable(on_dead):
                on_dead(layer)
            elif on_dead == "raise":
                raise RelumonError(message)
            elif on_dead == "warn" and global_rank() == 0:
                warn(message, DeadUnitsWarning)

    def check_optimizers(self, optimizers: Any) -> None:
        """Say once if ``optimizers`` holds something that is not an optimizer (it is left out, training goes on)."""
        if self._warned_optimizers:
            return
        bad = [type(x).__name__ for x in optimizers if not isinstance(x, torch.optim.Optimizer)]
        if bad or not isinstance(optimizers, list):
            self._warned_optimizers = True
            warn(
                f"relumon: `Monitor.optimizers` should be a list of torch.optim.Optimizer, got "
                f"{type(optimizers).__name__} holding {bad}; those are not measured. Set it to a list of "
                "optimizers (e.g. `monitor.optimizers = [opt]`).",
                RelumonWarning,
            )

    def warn_idle(self) -> None:
        """After the first window with training steps: name the watched modules that never ran in one."""
        self.idle_checked = True
        if global_rank() != 0:
            return
        recorder = self._recorder
        idle = recorder.idle_modules()
        shown = ", ".join(f"`{name or 'root'}`" for name in idle[:5])
        shown += f" and {len(idle) - 5} more" if len(idle) > 5 else ""
        if not recorder.sites:
            what = f"none of the {len(idle)} watched module(s) ran in a training forward ({shown})" if idle else ""
            if self._options.functional:
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

    def warn_unconfirmed(self, report: Optional[Report], window: int, advice: str) -> None:
        """Say once per window which layers of ``report`` (the last closed window) look dead but could not be confirmed,
        and why; only global rank 0 warns. See `Monitor.warn_unconfirmed`."""
        suspects = unconfirmed(report)
        if not suspects or self._unconfirmed_said == window or global_rank() != 0:
            return
        self._unconfirmed_said = window
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


def unconfirmed(report: Optional[Report]) -> list[LayerReport]:
    """Layers of ``report`` (the last closed window) that look dead but were not confirmed (``confirming``)."""
    return [] if report is None else [x for x in report.layers if x.confirming]


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def global_rank() -> int:
    """The global rank under ``torch.distributed``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
