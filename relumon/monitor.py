"""The monitor: attaches hooks to a model's activations and turns their statistics into reports."""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from relumon.errors import DeadUnitsWarning, RelumonError, warn
from relumon.hooks import ProducerTracer, in_backward, is_compiling, is_counted_forward
from relumon.report import LayerReport, Report, dead_layer_message
from relumon.state import SiteStats, distributed_world_size, gather
from relumon.tensorboard import custom_scalars_layout, write_scalars
from relumon.units import infer_unit_dim

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
_ON_DEAD_CHOICES = ("warn", "raise", "ignore")


class _Site:
    """A call site: the n-th call of a watched module within one forward, with its statistics."""

    __slots__ = ("name", "module_name", "call", "kind", "fed_by", "negative_regime", "stats")

    def __init__(
        self,
        name: str,
        module_name: str,
        call: int,
        kind: str,
        fed_by: Optional[str],
        negative_regime: bool,
        stats: SiteStats,
    ) -> None:
        self.name = name
        self.module_name = module_name
        self.call = call
        self.kind = kind
        self.fed_by = fed_by
        self.negative_regime = negative_regime
        self.stats = stats


class _Watched:
    """A watched module: its path, its call counter for the current forward and its sites by call index."""

    __slots__ = ("name", "kind", "negative_regime", "unit_dim", "calls", "sites", "warned_shape")

    def __init__(self, name: str, module: nn.Module, unit_dim: Optional[int]) -> None:
        self.name = name
        self.kind = type(module).__name__
        self.negative_regime = isinstance(module, NEGATIVE_REGIME_TYPES)
        self.unit_dim = unit_dim
        self.calls = 0
        self.sites: list[_Site] = []
        self.warned_shape = False


class Monitor:
    """Watches the ReLU-family activations of a model during training. Create one with :func:`relumon.watch`.

    Between reports the hooks only launch in-place kernels on state that lives on the activations' device; nothing
    is read to the host until :meth:`report`. A *window* is the set of training forwards since the last report.

    The monitor is a context manager: leaving the ``with`` block, normally or by an exception, removes every hook.
    The statistics gathered so far stay readable with :meth:`report`.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected `model` to be a torch.nn.Module, got {type(model).__name__}")
        self._types = _check_types(types)
        if not (on_dead in _ON_DEAD_CHOICES or callable(on_dead)):
            raise ValueError(f"expected `on_dead` to be one of {_ON_DEAD_CHOICES} or a callable, got {on_dead!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"expected `min_samples` to be an int >= 1, got {min_samples!r}")
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise TypeError(
                f"expected `grad_scaler` to be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        if isinstance(measure_every, bool) or not isinstance(measure_every, int) or measure_every < 1:
            raise ValueError(f"expected `measure_every` to be an int >= 1, got {measure_every!r}")
        if sync_dist is not None and not isinstance(sync_dist, bool):
            raise TypeError(f"expected `sync_dist` to be True, False or None, got {sync_dist!r}")

        watched_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, self._types)]
        if not watched_modules:
            looked_for = ", ".join(t.__name__ for t in self._types)
            raise ValueError(
                f"relumon found no module of the watched types ({looked_for}) in {type(model).__name__}. "
                "Pass `types=` to watch other activation classes."
            )
        overrides = _check_unit_dim(unit_dim, [name for name, _ in watched_modules])

        self.track_grad = track_grad
        self.on_dead = on_dead
        self.min_samples = min_samples
        self.sync_dist = sync_dist
        self._grad_scaler = grad_scaler
        self._model_ref = weakref.ref(model)
        self._watched: dict[nn.Module, _Watched] = {}
        self._sites: list[_Site] = []
        self._handles: list[RemovableHandle] = []
        self.measure_every = measure_every
        self._step_pending = False  # a backward finished: the next forward outside backward starts a step
        self._in_step = False  # a counted forward happened since the last step boundary
        self._measuring = True  # this step is one of the measured ones
        self._steps_seen = 0  # training steps with a counted forward, since watch()
        self._window_start = 0  # _steps_seen when the open window started
        self._window = 0
        self._alerted: set[str] = set()
        self._layout_written: "weakref.WeakSet[Any]" = weakref.WeakSet()

        for name, module in watched_modules:
            watched = _Watched(name, module, overrides.get(name, overrides.get("*")))
            self._watched[module] = watched
            self._handles.append(module.register_forward_hook(self._make_forward_hook(watched)))
        self._handles.append(model.register_forward_pre_hook(self._on_root_forward))
        self._tracer = ProducerTracer(model, skip=set(self._watched))

    # ------------------------------------------------------------------ hooks (the per-step path)

    def _make_forward_hook(self, watched: _Watched) -> Callable[[nn.Module, Any, Any], None]:
        def forward_hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, Tensor) or not is_counted_forward(module):
                return None
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
                return None
            stats = site.stats
            if out.ndim != stats.ndim and stats.unit_dim > 0 and out.ndim == stats.ndim - 1:
                obs = out.unsqueeze(0)  # an unbatched call (e.g. Linear on a 1-D input): one sample
            else:
                obs = out
            if obs.ndim != stats.ndim or (obs.ndim and obs.shape[stats.unit_dim] != stats.units):
                self._warn_shape(watched, site, out)
                return None
            stats.observe(obs)
            if self.track_grad and out.requires_grad:
                out.register_hook(stats.grad_hook)
            return None

        return forward_hook

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
        if self._tracer.active:
            if self._sites:  # the first training forward has been traced: producers are known
                self._tracer.remove()
            else:
                self._tracer.clear()

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
        fed_by, producer = self._tracer.producer_of(args[0]) if args else (None, None)
        ndim = out.ndim
        unit_dim = watched.unit_dim
        if unit_dim is None:
            unit_dim = infer_unit_dim(ndim, producer)
        elif not -max(ndim, 1) <= unit_dim < max(ndim, 1):
            raise ValueError(
                f"`unit_dim={unit_dim}` is out of range for `{watched.name}`, whose output has shape "
                f"{tuple(out.shape)}"
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
        )
        path = watched.name or "root"
        site = _Site(
            name=path if call == 0 else f"{path}.call{call + 1}",
            module_name=watched.name,
            call=call,
            kind=watched.kind,
            fed_by=fed_by,
            negative_regime=watched.negative_regime,
            stats=stats,
        )
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

    def report(self, *, reset: bool = True) -> Report:
        """Read the current window's statistics to the host and, by default, close the window.

        This is the only place relumon reads device state on the host (one transfer for all sites). Under
        ``torch.distributed`` every rank must call it: the figures are reduced across ranks and every rank returns
        the same global report.

        Args:
            reset: close the window (start a new one) and run the ``on_dead`` alerts. ``False`` peeks.

        Returns:
            A :class:`Report` with one :class:`LayerReport` per call site, in forward order.

        Raises:
            RelumonError: with ``on_dead="raise"``, when a layer's every unit is dead for the first time.
        """
        gathered = gather([site.stats for site in self._sites], self._sync())
        layers = []
        for site, g in zip(self._sites, gathered):
            dead_mask = g.peak <= 0 if g.samples > 0 else torch.zeros(site.stats.units, dtype=torch.bool)
            layers.append(
                LayerReport(
                    name=site.name,
                    module=site.module_name,
                    call=site.call,
                    kind=site.kind,
                    units=site.stats.units,
                    unit_dim=site.stats.unit_dim,
                    fed_by=site.fed_by,
                    samples=g.samples,
                    forwards=g.forwards,
                    backward_passes=g.backwards,
                    dead_units=int(dead_mask.sum()),
                    nonfinite_units=int(g.peak.isnan().sum()) if g.samples > 0 else 0,
                    grad_norm=g.grad_norm_sum / g.backwards if g.backwards else math.nan,
                    negative_regime=site.negative_regime,
                    dead_mask=dead_mask,
                )
            )
        # Compiled steps are measured but not counted (see the forward hook): count them by their forwards then.
        steps = max(self._steps_seen - self._window_start, max((x.forwards for x in layers), default=0))
        report = Report(layers, window=self._window, steps=steps)
        if reset:
            for site in self._sites:
                site.stats.reset()
            self._window += 1
            self._window_start = self._steps_seen
            self._alert(report)
        return report

    def log(self, writer: Any, step: int) -> Report:
        """Close the window with :meth:`report` and write its scalars to a ``SummaryWriter`` at ``step``.

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
        report = self.report()
        if _global_rank() == 0:
            if hasattr(writer, "add_custom_scalars") and writer not in self._layout_written:
                writer.add_custom_scalars(custom_scalars_layout())
                self._layout_written.add(writer)
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
        """Plain-data state to checkpoint: the alert history and the window count."""
        return {"alerted": sorted(self._alerted), "window": self._window}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys keep their defaults."""
        self._alerted = set(state.get("alerted", ()))
        self._window = int(state.get("window", 0))

    def remove(self) -> None:
        """Remove every hook relumon put on the model. Idempotent; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracer.remove()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        model = self._model_ref()
        what = type(model).__name__ if model is not None else "<collected model>"
        state = "active" if self.active else "removed"
        return f"Monitor({what}, watched={len(self._watched)}, sites={len(self._sites)}, window={self._window}, {state})"


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
            :class:`~relumon.DeadUnitsWarning`), ``"raise"`` (a :class:`~relumon.RelumonError`), ``"ignore"``,
            or a callable that receives the :class:`~relumon.LayerReport`.
        min_samples: a window must have seen at least this many samples of a layer before it can alert.
        sync_dist: reduce reports across ``torch.distributed`` ranks. ``None`` does so whenever a process group of
            more than one rank is initialised.
        measure_every: measure one training step in every ``measure_every``: steps 0, n, 2n... of the run. The
            default 4 keeps the overhead near zero (see ``docs/benchmarks.md``); "dead" then means 0 for every
            *measured* sample, and ``samples`` counts only those. ``measure_every=1`` measures every step exactly.

    Returns:
        The :class:`Monitor`, already watching. Use it as a context manager or call ``remove()``.

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
    )


def _global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _check_types(types: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    if isinstance(types, type):
        types = (types,)
    try:
        checked = tuple(types)
    except TypeError:
        raise TypeError(f"expected `types` to be a tuple of nn.Module subclasses, got {types!r}") from None
    bad = [t for t in checked if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not checked:
        raise TypeError(f"expected `types` to be a non-empty tuple of nn.Module subclasses, got {types!r}")
    return checked


def _check_unit_dim(unit_dim: Union[int, Mapping[str, int], None], names: list[str]) -> dict[str, int]:
    if unit_dim is None:
        return {}
    if isinstance(unit_dim, int) and not isinstance(unit_dim, bool):
        return {"*": unit_dim}
    if isinstance(unit_dim, Mapping):
        unknown = [k for k in unit_dim if k != "*" and k not in names]
        if unknown:
            raise ValueError(f"`unit_dim` names modules that are not watched: {unknown}; watched: {names}")
        bad = {k: v for k, v in unit_dim.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise TypeError(f"expected `unit_dim` values to be ints, got {bad}")
        return dict(unit_dim)
    raise TypeError(f"expected `unit_dim` to be None, an int or a mapping of module path to int, got {unit_dim!r}")
