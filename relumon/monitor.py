"""The monitor: attaches hooks to a model's activations and turns their statistics into reports."""

from __future__ import annotations

import math
import re
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from relumon.blame import blame
from relumon.errors import DeadUnitsWarning, RelumonError, warn
from relumon.functional import ActivationCapture
from relumon.history import SiteHistory
from relumon.hooks import ProducerTracer, in_backward, is_compiling, is_counted_forward
from relumon.report import LayerReport, Report, dead_layer_message
from relumon.state import SiteStats, distributed_world_size, gather
from relumon.tensorboard import write_layout_once, write_scalars
from relumon.units import infer_unit_dim
from relumon.validation import check_dormant_tau, check_int_at_least, check_on_dead, check_types

__all__ = ["Monitor", "watch", "DEFAULT_TYPES", "NEGATIVE_REGIME_TYPES", "OnDead"]

#: The activation types watched by default.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)

#: Activations that pass negative values: for them "dead" means "stuck in the negative regime".
NEGATIVE_REGIME_TYPES: tuple[type[nn.Module], ...] = (
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)

OnDead = Union[Literal["warn", "raise", "ignore"], Callable[[LayerReport], Any]]

#: Closed windows kept in [`Monitor.timeline`][relumon.Monitor.timeline] (and checkpoints) for the dead-unit heatmap.
TIMELINE_WINDOWS = 500

#: A rise in a layer's dead fraction, from one closed window to the next, that makes relumon blame its feeder.
BLAME_JUMP = 0.2
_ON_DEAD_CHOICES = ("warn", "raise", "ignore")


class _Site:
    """A call site: the n-th call of a watched module within one forward, with its statistics."""

    __slots__ = (
        "name",
        "module_name",
        "call",
        "kind",
        "fed_by",
        "producer",
        "negative_regime",
        "stats",
        "history",
        "last_dead_fraction",
    )

    def __init__(
        self,
        name: str,
        module_name: str,
        call: int,
        kind: str,
        fed_by: Optional[str],
        producer: Optional[nn.Module],
        negative_regime: bool,
        stats: SiteStats,
    ) -> None:
        self.name = name
        self.module_name = module_name
        self.call = call
        self.kind = kind
        self.fed_by = fed_by
        self.producer = weakref.ref(producer) if producer is not None else None
        self.negative_regime = negative_regime
        self.stats = stats
        self.history = SiteHistory(stats.units)
        self.last_dead_fraction = 0.0


class _Watched:
    """A watched module: its path, its call counter for the current forward and its sites by call index."""

    __slots__ = ("name", "kind", "negative_regime", "unit_dim", "slope", "calls", "sites", "warned_shape")

    def __init__(
        self, name: str, kind: str, negative_regime: bool, unit_dim: Optional[int], slope: Optional[float]
    ) -> None:
        self.name = name
        self.kind = kind
        self.negative_regime = negative_regime
        self.unit_dim = unit_dim
        #: The activation's derivative for non-positive outputs (0 for ReLU, alpha for LeakyReLU); None if it is not
        #: that simple (GELU...), which leaves the gradient through the activation unmeasured.
        self.slope = slope
        self.calls = 0
        self.sites: list[_Site] = []
        self.warned_shape = False


class Monitor:
    """Watches the ReLU-family activations of a model during training. Create one with [`relumon.watch`][relumon.watch].

    Between reports the hooks only launch in-place kernels on state that lives on the activations' device; nothing
    is read to the host until [`report()`][relumon.Monitor.report]. A *window* is the set of training forwards since
    the last report.

    The monitor is a context manager: leaving the ``with`` block, normally or by an exception, removes every hook.
    The statistics gathered so far stay readable with [`report()`][relumon.Monitor.report].
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        types: Iterable[type[nn.Module]] = DEFAULT_TYPES,
        unit_dim: Union[int, Mapping[str, int], None] = None,
        track_grad: bool = True,
        grad_scaler: Optional[Any] = None,
        on_dead: OnDead = "warn",
        min_samples: int = 1,
        sync_dist: Optional[bool] = None,
        measure_every: int = 4,
        permanent_after: int = 3,
        dormant_tau: Optional[float] = None,
        functional: bool = False,
        grad_through: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected `model` to be a torch.nn.Module, got {type(model).__name__}")
        self._types = check_types(types)
        check_on_dead(on_dead, _ON_DEAD_CHOICES)
        check_int_at_least("min_samples", min_samples)
        check_int_at_least("measure_every", measure_every)
        check_int_at_least("permanent_after", permanent_after)
        check_dormant_tau(dormant_tau)
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise TypeError(f"expected `grad_scaler` to be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if sync_dist is not None and not isinstance(sync_dist, bool):
            raise TypeError(f"expected `sync_dist` to be True, False or None, got {sync_dist!r}")

        watched_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, self._types)]
        if not watched_modules and not functional:
            looked_for = ", ".join(t.__name__ for t in self._types)
            raise ValueError(
                f"relumon found no module of the watched types ({looked_for}) in {type(model).__name__}. "
                "Pass `types=` to watch other activation classes, or `functional=True` to watch F.relu calls."
            )
        overrides = _check_unit_dim(unit_dim, [name for name, _ in watched_modules], functional)

        self.track_grad = track_grad
        self.grad_through = grad_through and track_grad
        self.on_dead = on_dead
        self.min_samples = min_samples
        self.sync_dist = sync_dist
        self._grad_scaler = grad_scaler
        self._model_ref = weakref.ref(model)
        self._watched: dict[Union[nn.Module, str], _Watched] = {}  # modules, and functional call sites by name
        self._sites: list[_Site] = []
        self._handles: list[RemovableHandle] = []
        self.measure_every = measure_every
        self.permanent_after = permanent_after
        self.dormant_tau = dormant_tau
        self.functional = functional
        self._unit_dim_overrides = overrides
        self._pending_history: dict[str, Any] = {}  # from load_state_dict, for sites not allocated yet
        self._timeline: deque[tuple[int, dict[str, float]]] = deque(maxlen=TIMELINE_WINDOWS)
        self.last_report: Optional[Report] = None
        self._step_pending = False  # a backward finished: the next forward outside backward starts a step
        self._in_step = False  # a counted forward happened since the last step boundary
        self._measuring = True  # this step is one of the measured ones
        self._steps_seen = 0  # training steps with a counted forward, since watch()
        self._window_start = 0  # _steps_seen when the open window started
        self._window = 0
        self._alerted: set[str] = set()
        self._layout_written: weakref.WeakSet[Any] = weakref.WeakSet()

        self._module_stack: list[tuple[str, nn.Module]] = []
        self._capture: Optional[ActivationCapture] = None
        self._tracer: Optional[ProducerTracer] = None
        try:
            for name, module in watched_modules:
                unit = overrides.get(name, overrides.get("*"))
                negative = isinstance(module, NEGATIVE_REGIME_TYPES)
                watched = _Watched(name, type(module).__name__, negative, unit, _slope_of(module))
                self._watched[module] = watched
                self._handles.append(module.register_forward_hook(self._make_forward_hook(watched)))
            self._handles.append(model.register_forward_pre_hook(self._on_root_forward))
            self._tracer = ProducerTracer(model, skip=set(self._watched))
            if functional:
                self._attach_functional(model)
        except BaseException:
            self.remove()  # never leave half the hooks behind
            raise

    # ------------------------------------------------------------------ hooks (the per-step path)

    def _make_forward_hook(self, watched: _Watched) -> Callable[[nn.Module, Any, Any], None]:
        def forward_hook(module: nn.Module, args: Any, out: Any) -> None:
            self._observe(watched, module, args, out)
            return None

        return forward_hook

    def _observe(self, watched: _Watched, module: nn.Module, args: Any, out: Any) -> None:
        """One call of a watched activation (``module`` decides whether it is a training forward)."""
        if not isinstance(out, Tensor) or not is_counted_forward(module):
            return
        if self._step_pending and not in_backward():
            self._start_step()
        if not self._in_step:  # the first counted forward of a step decides whether the step is measured
            self._in_step = True
            if is_compiling():
                # A step counter read inside a compiled graph would be guarded on and recompile every step, so
                # compiled code measures every step; inductor fuses the reductions into its kernels.
                self._measuring = True
            else:
                self._measuring = self._steps_seen % self.measure_every == 0
                self._steps_seen += 1
        call = watched.calls
        watched.calls = call + 1
        site = watched.sites[call] if call < len(watched.sites) else self._add_site(watched, call, args, out)
        if site is None or not self._measuring or out.numel() == 0:  # an empty batch adds no sample
            return
        stats = site.stats
        if out.ndim != stats.ndim and stats.unit_dim > 0 and out.ndim == stats.ndim - 1:
            obs = out.unsqueeze(0)  # an unbatched call (e.g. Linear on a 1-D input): one sample
        else:
            obs = out
        if obs.ndim != stats.ndim or (obs.ndim and obs.shape[stats.unit_dim] != stats.units):
            self._warn_shape(watched, site, out)
            return
        stats.observe(obs)
        if self.track_grad and out.requires_grad:
            out.register_hook(stats.grad_hook_for(out) if stats.through_slope is not None else stats.grad_hook)

    # ------------------------------------------------------------------ functional calls (opt-in)

    def _attach_functional(self, model: nn.Module) -> None:
        """Track the running module on a stack; while any runs, a TorchFunctionMode catches F.relu calls."""
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._make_enter(name)))
            self._handles.append(module.register_forward_hook(self._exit_module, always_call=True))

    def _make_enter(self, name: str) -> Callable[[nn.Module, Any], None]:
        def enter(module: nn.Module, args: Any) -> None:
            if not self._module_stack and not is_compiling():
                self._capture = ActivationCapture(self._on_functional_call)
                self._capture.__enter__()
            self._module_stack.append((name, module))
            return None

        return enter

    def _exit_module(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._module_stack:
            self._module_stack.pop()
        if not self._module_stack and self._capture is not None:
            capture, self._capture = self._capture, None
            capture.__exit__(None, None, None)
        return None

    def _on_functional_call(self, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not self._module_stack:
            return
        path, module = self._module_stack[-1]
        if module in self._watched:  # nn.ReLU calling F.relu: the module's own hook counts it
            return
        site_path = f"{path}.F.{fn}" if path else f"F.{fn}"
        watched = self._watched.get(site_path)
        if watched is None:
            unit = self._unit_dim_overrides.get(site_path, self._unit_dim_overrides.get("*"))
            slope = 0.0 if fn == "relu" else float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
            watched = _Watched(site_path, f"F.{fn}", fn != "relu", unit, slope)
            self._watched[site_path] = watched
        self._observe(watched, module, args, out)

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        self._start_step()
        return None

    def new_step(self) -> None:
        """Mark the start of a training step, so the n-th call of each module maps to the same call site.

        Calling the watched model itself, or a backward pass, already does this. Call it yourself only when a step
        calls submodules of the watched model directly (the Lightning callback does so before every batch).
        """
        self._start_step()

    def _on_backward(self) -> None:
        self._step_pending = True

    def _start_step(self) -> None:
        """A new training step: call counters restart, so the n-th call of a module maps to the same site.

        Idempotent until a counted forward happens, so the root forward, ``new_step()`` and a finished backward can
        all mark the same boundary.
        """
        self._step_pending = False
        self._in_step = False
        for watched in self._watched.values():
            watched.calls = 0
        tracer = self._tracer
        if tracer is not None and tracer.active:
            if self._sites:  # the first training forward has been traced: producers are known
                tracer.remove()
            else:
                tracer.clear()

    def _grad_scale(self) -> Optional[Tensor]:
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # the live scale tensor: reading it on the host would sync

    # Allocation runs eagerly even inside a torch.compile trace: state created in a graph would not persist. This
    # costs one graph break and one recompile on the first compiled training step only.
    @torch._dynamo.disable
    def _add_site(self, watched: _Watched, call: int, args: Any, out: Tensor) -> Optional[_Site]:
        if not (out.is_floating_point() or out.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            warn(
                f"relumon: `{watched.name}` produced a {out.dtype} tensor; only real-valued activations are "
                "watched, so this call site is skipped."
            )
            return None
        fed_by, producer = (None, None)
        if args and self._tracer is not None:
            fed_by, producer = self._tracer.producer_of(args[0])
        ndim = out.ndim
        unit_dim = watched.unit_dim
        if unit_dim is None:
            unit_dim = infer_unit_dim(ndim, producer)
        elif not -max(ndim, 1) <= unit_dim < max(ndim, 1):
            raise ValueError(
                f"`unit_dim={unit_dim}` is out of range for `{watched.name}`, whose output has shape {tuple(out.shape)}"
            )
        unit_dim = unit_dim % max(ndim, 1)
        units = out.shape[unit_dim] if ndim else 1
        stats = SiteStats(
            units=units,
            unit_dim=unit_dim,
            ndim=ndim,
            device=out.device,
            grad_scale=self._grad_scale,
            on_backward=self._on_backward,
            track_abs=self.dormant_tau is not None,
            through_slope=watched.slope if self.grad_through else None,
        )
        path = watched.name or "root"
        site = _Site(
            name=path if call == 0 else f"{path}.call{call + 1}",
            module_name=watched.name,
            call=call,
            kind=watched.kind,
            fed_by=fed_by,
            producer=producer,
            negative_regime=watched.negative_regime,
            stats=stats,
        )
        if site.name in self._pending_history:
            site.history.load_state_dict(self._pending_history.pop(site.name))
        # A call index can only be new if every lower one exists (calls count up from 0 each step).
        watched.sites.append(site)
        self._sites.append(site)
        return site

    def _warn_shape(self, watched: _Watched, site: _Site, out: Tensor) -> None:
        if watched.warned_shape:
            return
        watched.warned_shape = True
        warn(
            f"relumon: call site `{site.name}` first had {site.stats.units} units along dim "
            f"{site.stats.unit_dim} of a {site.stats.ndim}-D output, now it produced shape {tuple(out.shape)}; "
            "calls with the new shape are skipped. Pass `unit_dim=` to relumon.watch if the unit dim was guessed "
            "wrong."
        )

    # ------------------------------------------------------------------ reports

    @property
    def names(self) -> list[str]:
        """Call-site names discovered so far, in forward order."""
        return [site.name for site in self._sites]

    @property
    def window(self) -> int:
        """Index of the window now open (the number of windows closed so far)."""
        return self._window

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return bool(self._handles)

    def _sync(self) -> bool:
        if self.sync_dist is None:
            return distributed_world_size() > 1
        if self.sync_dist and distributed_world_size() == 1 and not dist.is_initialized():
            raise RelumonError("`sync_dist=True` needs an initialised torch.distributed process group")
        return self.sync_dist

    def report(self, *, reset: bool = True, step: Optional[int] = None) -> Report:
        """Read the current window's statistics to the host and, by default, close the window.

        This is the only place relumon reads device state on the host (one transfer for all sites). Under
        ``torch.distributed`` every rank must call it: the figures are reduced across ranks and every rank returns
        the same global report.

        Args:
            reset: close the window (start a new one), update the death history and run the ``on_dead`` alerts.
                ``False`` peeks and changes nothing.
            step: the step to record in the death history (``first_dead_step``); defaults to the number of
                training steps seen so far. [`log()`][relumon.Monitor.log] passes its ``step``.

        Returns:
            A [`Report`][relumon.Report] with one [`LayerReport`][relumon.LayerReport] per call site, in forward order.

        Raises:
            RelumonError: with ``on_dead="raise"``, when a layer's every unit is dead for the first time.
        """
        step = self._steps_seen if step is None else step
        gathered = gather([site.stats for site in self._sites], self._sync())
        layers = [self._layer_report(site, g, step, reset) for site, g in zip(self._sites, gathered)]
        # Compiled steps are measured but not counted (see the forward hook): count them by their forwards then.
        steps = max(self._steps_seen - self._window_start, max((x.forwards for x in layers), default=0))
        report = Report(layers, window=self._window, steps=steps)
        if reset:
            for site in self._sites:
                site.stats.reset()
            self._window += 1
            self._window_start = self._steps_seen
            self._timeline.append((step, {x.name: x.dead_fraction for x in layers if x.samples > 0}))
            self.last_report = report
            self._alert(report)
        return report

    @property
    def timeline(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, {call site: dead fraction})`` for each closed window, oldest first (the last 500 windows)."""
        return list(self._timeline)

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
        if _global_rank() != 0:
            return
        writer.add_figure(FIGURE_TAGS["grad_flow"], grad_flow_figure(self.last_report), global_step=step)
        writer.add_figure(FIGURE_TAGS["dead_heatmap"], dead_heatmap_figure(self.timeline), global_step=step)

    def _layer_report(self, site: _Site, g: Any, step: int, update_history: bool) -> LayerReport:
        units = site.stats.units
        seen = g.samples > 0
        dead_mask = g.peak <= 0 if seen else torch.zeros(units, dtype=torch.bool)
        dead_fraction = float(dead_mask.sum()) / units if seen else math.nan
        if seen and update_history:
            history = site.history.update(dead_mask, step, self.permanent_after)
        else:
            history = site.history.view(0, self.permanent_after)
        dormant_units = dormant_scores = None
        if self.dormant_tau is not None and g.abs_sum is not None and g.positions > 0:
            mean_abs = g.abs_sum / g.positions
            layer_mean = float(mean_abs.mean())
            dormant_scores = (mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)).float()
            dormant_units = int((dormant_scores <= self.dormant_tau).sum())
        blamed = None
        producer = site.producer() if site.producer is not None else None
        jumped = seen and dead_fraction - site.last_dead_fraction >= BLAME_JUMP
        if producer is not None and site.fed_by and (jumped or (seen and bool(dead_mask.all()))):
            blamed = blame(site.name, site.fed_by, producer, dead_mask)
        if seen and update_history:
            site.last_dead_fraction = dead_fraction
        return LayerReport(
            name=site.name,
            module=site.module_name,
            call=site.call,
            kind=site.kind,
            units=units,
            unit_dim=site.stats.unit_dim,
            fed_by=site.fed_by,
            samples=g.samples,
            forwards=g.forwards,
            backward_passes=g.backwards,
            dead_units=int(dead_mask.sum()),
            nonfinite_units=int(g.peak.isnan().sum()) if seen else 0,
            grad_norm=g.grad_norm_sum / g.backwards if g.backwards else math.nan,
            grad_through_norm=g.through_sum / g.through_passes if g.through_passes else math.nan,
            negative_regime=site.negative_regime,
            dead_mask=dead_mask,
            revived_units=history.revived_units,
            revived_total=history.revived_total,
            permanently_dead_units=history.permanently_dead_units,
            first_dead_step=history.first_dead_step,
            dead_streak=history.dead_streak,
            dormant_units=dormant_units,
            dormant_scores=dormant_scores,
            blame=blamed,
        )

    def log(self, writer: Any, step: int) -> Report:
        """Close the window with [`report()`][relumon.Monitor.report]; write its scalars to a ``SummaryWriter``.

        Tags are ``relumon/dead_fraction/<name>``, ``relumon/dead_units/<name>``, ``relumon/grad_norm/<name>``,
        ``relumon/nonfinite_units/<name>`` (when non-zero) and ``relumon/summary/dead_fraction``. The first call
        for a writer also writes a custom-scalars layout: one multi-line chart per metric across layers. Under
        ``torch.distributed`` call it on every rank; only global rank 0 writes.

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
        if _global_rank() == 0:
            write_layout_once(writer, self._layout_written)
            write_scalars(writer, report.scalars(), step)
        return report

    def _alert(self, report: Report) -> None:
        for layer in report.dead_layers:
            if layer.name in self._alerted or layer.samples < self.min_samples:
                continue
            self._alerted.add(layer.name)
            if callable(self.on_dead):
                self.on_dead(layer)
            elif self.on_dead == "raise":
                raise RelumonError(dead_layer_message(layer, report.steps))
            elif self.on_dead == "warn" and _global_rank() == 0:
                warn(dead_layer_message(layer, report.steps), DeadUnitsWarning)

    @property
    def alerted(self) -> frozenset[str]:
        """Names of the call sites already alerted on (each alerts at most once)."""
        return frozenset(self._alerted)

    # ------------------------------------------------------------------ state and lifetime

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state to checkpoint: the alert history, the window count and each site's death history."""
        history = dict(self._pending_history)
        history.update({site.name: site.history.state_dict() for site in self._sites})
        timeline = [
            [step, {k: v for k, v in fractions.items() if not math.isnan(v)}] for step, fractions in self._timeline
        ]
        return {"alerted": sorted(self._alerted), "window": self._window, "history": history, "timeline": timeline}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict()`][relumon.Monitor.state_dict] output; missing keys keep their defaults.

        Death histories of sites not discovered yet are applied when those sites are first called.
        """
        self._alerted = set(state.get("alerted", ()))
        self._window = int(state.get("window", 0))
        self._pending_history = dict(state.get("history", {}))
        self._timeline.clear()
        self._timeline.extend((int(step), dict(fractions)) for step, fractions in state.get("timeline", []))
        for site in self._sites:
            if site.name in self._pending_history:
                site.history.load_state_dict(self._pending_history.pop(site.name))

    def remove(self) -> None:
        """Remove every hook relumon put on the model. Idempotent; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tracer is not None:
            self._tracer.remove()
        if self._capture is not None:  # removed in the middle of a forward
            capture, self._capture = self._capture, None
            capture.__exit__(None, None, None)
        self._module_stack.clear()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        model = self._model_ref()
        what = type(model).__name__ if model is not None else "<collected model>"
        state = "active" if self.active else "removed"
        return (
            f"Monitor({what}, watched={len(self._watched)}, sites={len(self._sites)}, window={self._window}, {state})"
        )


def watch(
    model: nn.Module,
    *,
    types: Iterable[type[nn.Module]] = DEFAULT_TYPES,
    unit_dim: Union[int, Mapping[str, int], None] = None,
    track_grad: bool = True,
    grad_scaler: Optional[Any] = None,
    on_dead: OnDead = "warn",
    min_samples: int = 1,
    sync_dist: Optional[bool] = None,
    measure_every: int = 4,
    permanent_after: int = 3,
    dormant_tau: Optional[float] = None,
    functional: bool = False,
    grad_through: bool = False,
) -> Monitor:
    """Attach relumon's hooks to every activation module of ``types`` in ``model``.

    Args:
        model: any ``nn.Module``. Watch it before the first ``torch.compile``-d call.
        types: activation classes to watch. Default ``(nn.ReLU, nn.LeakyReLU)``.
        unit_dim: the dimension that indexes units. ``None`` infers it per call site from the activation's rank and
            the module that fed it (dim 1 for conv feature maps, the last dim otherwise); an int applies to every
            site; a mapping from module path to int overrides single modules (key ``"*"`` for the rest).
        track_grad: also record the gradient norm at each activation's output.
        grad_scaler: a ``torch.amp.GradScaler`` in use, so that gradient norms are reported unscaled.
        on_dead: what to do the first time a closed window finds every unit of a layer dead: ``"warn"`` (a
            [`DeadUnitsWarning`][relumon.DeadUnitsWarning]), ``"raise"`` (a [`RelumonError`][relumon.RelumonError]),
            ``"ignore"``, or a callable that receives the [`LayerReport`][relumon.LayerReport].
        min_samples: a window must have seen at least this many samples of a layer before it can alert.
        sync_dist: reduce reports across ``torch.distributed`` ranks. ``None`` does so whenever a process group of
            more than one rank is initialised.
        measure_every: measure one training step in every ``measure_every``: steps 0, n, 2n... of the run. The
            default 4 keeps the overhead near zero (see ``docs/benchmarks.md``); "dead" then means 0 for every
            *measured* sample, and ``samples`` counts only those. ``measure_every=1`` measures every step exactly.
        permanent_after: a unit dead for this many closed windows in a row counts as permanently dead.
        dormant_tau: also report tau-dormant units (Sokar et al., ICML 2023): a unit whose mean ``|activation|``,
            divided by the layer's mean of the same, is ``<= tau``. Costs one more reduction per measured call.
        functional: also watch ``F.relu``, ``torch.relu``, ``x.relu()`` and ``F.leaky_relu`` calls made inside
            the model's forward (see [`relumon.functional`][relumon.functional] for the mechanism and its limits).
            Eager only.
        grad_through: also measure the gradient that flows *through* each ReLU/LeakyReLU to the layer below,
            ``dL/d(output)`` times the activation's derivative (1 where the output is positive, 0 or alpha
            elsewhere), as ``grad_through_norm``. A dead layer shows a gradient at its output and none through it.
            Costs two elementwise passes over the gradient per measured call.

    Returns:
        The [`Monitor`][relumon.Monitor], already watching. Use it as a context manager or call ``remove()``.

    Raises:
        ValueError: when ``model`` has no module of ``types``, or on a bad argument.

    Example:
        >>> import torch, relumon
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with relumon.watch(model) as monitor:
        ...     model(torch.randn(16, 4)).sum().backward()
        >>> report = monitor.report()
        >>> report["1"].units, report["1"].samples
        (8, 16)
    """
    return Monitor(
        model,
        types=types,
        unit_dim=unit_dim,
        track_grad=track_grad,
        grad_scaler=grad_scaler,
        on_dead=on_dead,
        min_samples=min_samples,
        sync_dist=sync_dist,
        measure_every=measure_every,
        permanent_after=permanent_after,
        dormant_tau=dormant_tau,
        functional=functional,
        grad_through=grad_through,
    )


def _global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _slope_of(module: nn.Module) -> Optional[float]:
    """The derivative of ``module`` for non-positive outputs, if it is a ReLU or LeakyReLU; else None."""
    if type(module) is nn.ReLU:
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    return None


def _check_unit_dim(
    unit_dim: Union[int, Mapping[str, int], None], names: list[str], functional: bool
) -> dict[str, int]:
    if unit_dim is None:
        return {}
    if isinstance(unit_dim, int) and not isinstance(unit_dim, bool):
        return {"*": unit_dim}
    if isinstance(unit_dim, Mapping):
        functional_site = re.compile(r"(.+\.)?F\.(relu|leaky_relu)$")
        unknown = [k for k in unit_dim if k != "*" and k not in names and not (functional and functional_site.match(k))]
        if unknown:
            raise ValueError(f"`unit_dim` names modules that are not watched: {unknown}; watched: {names}")
        bad = {k: v for k, v in unit_dim.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise TypeError(f"expected `unit_dim` values to be ints, got {bad}")
        return dict(unit_dim)
    raise TypeError(f"expected `unit_dim` to be None, an int or a mapping of module path to int, got {unit_dim!r}")
