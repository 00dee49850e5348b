"""The per-step path: hooks that fold each training forward and backward into on-device statistics.

**Everything in this module runs inside the user's training step**, so it stays cheap: per watched call it does a
few Python checks and, on measured steps, launches in-place kernels on state that lives on the activation's device.
It never reads device memory on the host. It knows nothing about reports: [`Monitor`][relumon.Monitor] turns the
recorded state into a [`Report`][relumon.Report] when a window closes.

The `Recorder`'s own job is the per-call fold; the rest of the per-step path has a module each: where steps begin
and which are measured (`relumon.steps`), which site a call never placed before is (`relumon.discovery`), the sites
and watched modules themselves (`relumon.site`), functional calls (`relumon.functional`), which forwards count
(`relumon.hooks`) and the statistics a site keeps (`relumon.state`).

- **Hooks.** A forward hook on every watched module, a forward pre-hook on the root module (a step boundary), and,
  with ``functional=True``, module-tracking hooks that enter a `relumon.functional.ActivationCapture` while the model
  runs. Facts about which forwards count are in `relumon.hooks`.
- **The per-call fold.** A counted call takes the next call index of its module in the step (a call index never seen
  is discovered first, eagerly even under torch.compile: `relumon.discovery.SiteDiscovery`). On a measured step
  (`relumon.steps.StepClock`), on a site's first call of a window, and on every call of a site marked `Site.exact`,
  its output is folded into the site's `relumon.state.SiteStats` (`SiteStats.observe`) and gets a tensor hook for its
  gradient; other calls are only counted. A call of another rank or layout than its site's is folded along the site's
  units where they can be found; a site whose model moved to another device follows it; a call of a dtype that is not
  watched is skipped, and takes no call index.
- **Calls the data skips.** Once a module has several sites, each measured call is matched to its site by its call
  signature (`relumon.wiring.call_signature`: one node's parameter inputs, recorded at discovery), not by its call
  index, so experts that get no token or layers that LayerDrop skips do not shift later calls into other sites. A
  signature never seen is discovered like a new call index (one walk). Unmeasured calls, and calls whose signature is
  empty or shared by two sites, keep the call index.
- **Never breaking the training step.** An unexpected exception inside these hooks disables the call site it
  happened in (or the module, before its site exists), with one `RelumonWarning` naming both; the report marks the
  site ``disabled``. ``RELUMON_STRICT=1`` re-raises instead. Calls under ``torch.func`` transforms are skipped, with
  one warning. The module hooks are `relumon.hooks.OwnHook` objects, inert in pickled and copied models.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from relumon.diagnosis import WeightGradNorms
from relumon.discovery import SiteDiscovery
from relumon.errors import RelumonWarning, is_strict, warn
from relumon.functional import FunctionalCalls
from relumon.hooks import (
    OwnHook,
    OwnPreHook,
    hookable_modules,
    in_checkpoint_recompute,
    in_functorch_transform,
    is_compiling,
    scripted_modules,
)
from relumon.options import Options
from relumon.site import NEGATIVE_REGIME_TYPES, ZERO_FLOOR_TYPES, Site, Watched, counts_dead
from relumon.state import batch_rows
from relumon.steps import MAX_CALLS_PER_STEP, StepClock, is_measured_step
from relumon.wiring import WiringBook, call_signature

# `Site`, the activation types, `MAX_CALLS_PER_STEP` and `is_measured_step` moved out in issue 28 (to relumon.site
# and relumon.steps); they stay importable from here.
__all__ = [
    "Recorder",
    "Site",
    "NEGATIVE_REGIME_TYPES",
    "ZERO_FLOOR_TYPES",
    "counts_dead",
    "MAX_CALLS_PER_STEP",
    "is_measured_step",
]

#: Integer activation dtypes that are watched (others, such as bool or complex, are skipped with a warning).
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)

#: A call signature not seen yet (`Recorder._match_site`).
_UNSEEN: Any = object()

_FUNCTIONAL_SITE = re.compile(r"(.+\.)?F\.(relu|relu6|leaky_relu)$")


class Recorder:
    """Attaches relumon's hooks to ``model`` and records every counted training forward into per-site statistics.

    Runs inside the training step (see the module docstring); reads nothing to the host.

    Args:
        model: the model to watch.
        options: validated options; ``types``, ``unit_dim``, ``track_grad``, ``grad_scaler``, ``measure_every``,
            ``dormant_tau``, ``functional`` and ``grad_through`` apply here.

    Raises:
        ValueError: when ``model`` has no module of the watched types (and ``functional`` is off), or ``unit_dim``
            names modules that are not watched.
    """

    def __init__(self, model: nn.Module, options: Options) -> None:
        self.options = options
        types = options.types
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError(
                f"relumon cannot watch a TorchScript module ({type(model).__name__}): PyTorch allows no hooks on "
                "modules made by torch.jit.script or torch.jit.trace. Watch the eager model, before scripting it."
            )
        watched_modules = [(name, m) for name, m in hookable_modules(model) if isinstance(m, types)]
        if not watched_modules and not options.functional:
            looked_for = ", ".join(t.__name__ for t in types)
            scripted = ", ".join(f"`{name}`" for name in scripted_modules(model))
            inside = (
                f" Its TorchScript submodules ({scripted}) cannot be looked inside (PyTorch allows no hooks on them): "
                "watch the eager modules before scripting them."
                if scripted
                else ""
            )
            raise ValueError(
                f"relumon found no module of the watched types ({looked_for}) in {type(model).__name__}.{inside} "
                "Pass `types=` to watch other activation classes, or `functional=True` to watch F.relu calls."
            )
        _warn_scripted(model)
        self._unit_dims = _unit_dim_overrides(options, [name for name, _ in watched_modules])
        self._track_grad = options.track_grad
        self._grad_scaler = options.grad_scaler
        self._watched: dict[Union[nn.Module, str], Watched] = {}  # modules, and functional call sites by name
        self._handles: list[RemovableHandle] = []
        #: Names of the call sites to measure on every call (the monitor confirms sampled deaths with them).
        self.confirming: set[str] = set()
        self._warned_transform = False
        #: Where training steps begin, and whether the open one is measured (`relumon.steps`).
        self.clock = clock = StepClock(options.measure_every, self._restart)
        #: The window's weight-gradient norms of the modules that feed watched activations (for blame).
        self.weight_grads = WeightGradNorms(lambda: clock.measuring, self._grad_scale)
        #: Which site a call never placed before is, and the first training forward's records (`relumon.discovery`).
        self.discovery = SiteDiscovery(
            model,
            options,
            grad_scale=self._grad_scale,
            on_backward=clock.on_backward,
            guard=self._guard_grad_hook,
            weight_grads=self.weight_grads,
            is_confirming=self._is_confirming,
        )
        #: Call sites in the order they were first called.
        self.sites: list[Site] = self.discovery.sites
        #: With ``functional=True``: functional activation calls, caught while a module of the model runs.
        self.functional = FunctionalCalls(self._on_functional_call, skip=self._watched)
        try:
            for name, module in watched_modules:
                watched = Watched.of_module(name, module, self._unit_dims.get(name, self._unit_dims.get("*")))
                self._watched[module] = watched
                hook = OwnHook(functools.partial(self._observe, watched), module)
                self._handles.append(module.register_forward_hook(hook))
            on_layout = self.discovery.on_layout_output
            for name, module in hookable_modules(model):
                if name in self.discovery.batch_first:  # what a layout module's output says of the samples
                    self._handles.append(module.register_forward_hook(OwnHook(on_layout, module)))
            self._handles.append(model.register_forward_pre_hook(OwnPreHook(clock.on_root_forward, model)))
            self._handles.append(model.register_forward_hook(OwnHook(clock.on_root_done, model)))
            self.discovery.trace(model, transparent={m for m in self._watched if isinstance(m, nn.Module)})
            if options.functional:
                self._handles.extend(self.functional.attach(model))
        except BaseException:
            self.remove()  # never leave half the hooks behind
            raise

    # ------------------------------------------------------------------ the per-call fold

    def _observe(self, watched: Watched, module: nn.Module, args: Any, out: Any) -> None:
        """One call of a watched activation (``module`` decides whether it is a training forward)."""
        # `is_counted_forward`, unrolled: whether we compile and which backward runs are asked once per call (each
        # costs a Python call, which shows on models of thousands of tiny layers).
        if not isinstance(out, Tensor) or watched.disabled is not None:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        compiling = is_compiling()
        task = -1 if compiling else torch._C._current_graph_task_id()  # -1: outside any backward pass
        if task != -1 and in_checkpoint_recompute():
            return
        if not compiling and in_functorch_transform():
            self._skip_transformed(watched)
            return
        if not (out.is_floating_point() or out.dtype in _INTEGER_DTYPES):
            self._skip_dtype(watched, out)  # before the call index: a skipped call never shifts later sites' names
            return
        clock = self.clock
        if clock.step_pending and task == -1:
            clock.start_step()
        elif task != -1 and clock.in_step and clock.step_task != task and not clock.root_step:
            # A counted forward inside a backward pass other than the one this step's forwards ran in: a reentrant
            # checkpoint recomputing the next step of a model driven through its methods. (When a call of the root
            # module began the step, such a forward is the recompute of this very step: the root call marks steps.)
            clock.forward_done = True
            clock.start_step()
        call = watched.calls
        if call >= len(watched.sites):  # a new call index: read its wiring (eagerly, even under compile)
            _add_site_eagerly(self, watched, call, args, out, compiling)
        if call < len(watched.sites):
            site: Optional[Site] = watched.sites[call]
            # A repeat of a site already called in this step, not fed by it: a new step when no backward can tell
            # (the output carries no gradient: a frozen trunk), or after MAX_CALLS_PER_STEP calls.
            boundary = watched.restart[call] and (call >= MAX_CALLS_PER_STEP or not out.requires_grad)
        else:  # no site: an error disabled the module, or a new site would pass the bound
            site = None
            boundary = call >= MAX_CALLS_PER_STEP and watched.disabled is None
        if boundary and task == -1:
            if out.requires_grad:
                clock.warn_no_boundary(watched.name)
            clock.forward_done = True  # the step before ran to its end: its wiring is all read
            clock.start_step()
            call = 0
            site = watched.sites[0] if watched.sites else None
        if not clock.in_step:  # the first counted forward of a step decides whether the step is measured
            clock.begin(task, compiling)
        watched.calls = call + 1
        if site is None or site.disabled is not None or out.numel() == 0:  # an empty batch adds no sample
            return
        stats = site.stats
        rows = watched.rows[call]
        # A module with several sites: a call that may be measured is matched to its site by what fed it (on sampled
        # steps only while some site is measured on every call, so that such a site misses none of its calls).
        if (
            watched.keyed
            and not compiling
            and (clock.measuring or self.confirming or site.exact or stats.n_forwards == 0)
        ):
            matched, rows = self._match_site(watched, call, args, out, site, rows)
            if matched is None or matched.disabled is not None:
                return
            site, stats = matched, matched.stats
        # Sampled out, unless the site is confirming a death (exact) or has no measured call in this window yet, so
        # that every window measures every site that ran in it.
        if not (clock.measuring or site.exact or stats.n_forwards == 0):
            stats.n_unmeasured += 1  # unmatched on most sampled steps: the call index decides which site counts it
            # Any backward ends the step, measured or not: a tiny hook tells, unless a call of the model itself
            # marks the steps (the common `model(x)` loop pays nothing for it).
            if out.requires_grad and not (clock.step_pending or clock.root_step):
                out.register_hook(clock.backward_seen)  # type: ignore[no-untyped-call]
            return
        try:
            regime = None
            if watched.regime_from_input and args and isinstance(args[0], Tensor) and args[0].shape == out.shape:
                regime = args[0]  # PReLU: the input's sign tells the regime, whatever the learned slope
            if out.ndim == stats.ndim and (not out.ndim or out.shape[stats.unit_dim] == stats.units):
                stats.observe(out, rows, regime)
            elif not self._observe_other_layout(watched, site, out, rows, regime):
                self._warn_shape(watched, site, out)
                return
            if out.requires_grad:
                if not self._track_grad:
                    if not (compiling or clock.root_step):
                        out.register_hook(clock.backward_seen)  # type: ignore[no-untyped-call]
                elif compiling and stats.through_slope is None:
                    out.register_hook(site.grad_hook)  # type: ignore[no-untyped-call]
                else:  # its first firing also marks the end of the step
                    hook = self._guard_grad_hook(watched, site, stats.grad_hook_for(out))
                    out.register_hook(hook)  # type: ignore[no-untyped-call]
        except Exception as err:
            if not compiling and stats.peak.device != out.device:  # the model moved after the site was found
                self._follow_device(watched, site, out)
                return
            self._disable(watched, site, err)

    def _match_site(
        self, watched: Watched, call: int, args: Any, out: Tensor, site: Site, rows: bool
    ) -> tuple[Optional[Site], bool]:
        """The site of a call of a module with several sites, matched by what fed it (its call signature) rather than
        by its call index, and whether its rows count. A signature never seen is read from the wiring once."""
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        signature = call_signature(inp, out)
        if not signature:
            return site, rows  # nothing tells: the call index decides
        found = watched.signatures.get(signature, _UNSEEN)
        if found is site or found is None:
            return site, rows
        if found is _UNSEEN:
            found = _add_site_eagerly(self, watched, call, args, out, False, append=False)
            if found is None or found is site:
                return site, rows
        assert isinstance(found, Site)
        recurrent = any(r for known, r in zip(watched.sites, watched.recurrent) if known is found)
        return found, not recurrent

    def _follow_device(self, watched: Watched, site: Site, out: Tensor) -> None:
        """Move a site's state to its activation's new device (``model.cuda()`` after a first call on the CPU), and
        fold the call again there. The window's figures so far move with it."""
        try:
            site.stats.move_to(out.device)
            site.grad_hook = self._guard_grad_hook(watched, site, site.stats.grad_hook)
            call = watched.calls - 1
            stats = site.stats
            if out.ndim == stats.ndim and (not out.ndim or out.shape[stats.unit_dim] == stats.units):
                stats.observe(out, watched.rows[call])
            elif not self._observe_other_layout(watched, site, out, watched.rows[call]):
                self._warn_shape(watched, site, out)
                return
            if out.requires_grad and self._track_grad:
                out.register_hook(self._guard_grad_hook(watched, site, site.stats.grad_hook_for(out)))  # type: ignore[no-untyped-call]
        except Exception as err:
            self._disable(watched, site, err)

    def _observe_other_layout(
        self, watched: Watched, site: Site, out: Tensor, rows: bool, regime: Optional[Tensor] = None
    ) -> bool:
        """Fold a call whose rank or layout differs from the site's, when its units can be found; False if not.

        - A site first seen with at most 1 dim (a batch-of-one dry run through ``pool(x).squeeze()``) takes the first
          batched call's layout for good: a 1-D call is one unbatched sample, not the site's shape.
        - A `unit_dim=` the user gave applies to every call: a negative one counts from the end of each call's dims;
          a call with fewer dims than it names is an unbatched call (its units one dim lower), one sample.
        - A feature-last site (units in the last dim) keeps them there in calls of any rank; dim 0 holds the rows
          (a 2-D ``(B, C)`` call at a site first seen as ``(B, L, C)`` has B samples).
        - A channels site (units in dim 1) called with one dim fewer is an unbatched call: units in dim 0, one
          sample.
        """
        stats = site.stats
        ndim = out.ndim
        if ndim == 0:
            return False
        given = watched.unit_dim
        if given is not None:
            dim = given % ndim if -ndim <= given < ndim else given - 1
        else:
            dim = ndim - 1 if ndim == 2 or site.feature_last else 1
        if stats.ndim <= 1 < ndim and (given is None or -ndim <= given < ndim):
            if out.shape[dim] != stats.units:
                return False
            stats.relayout(ndim, dim)
            site.feature_last = dim == ndim - 1
            stats.observe(out, rows, regime)
            return True
        if given is not None:
            samples = batch_rows(out, dim) if ndim > 1 and given < ndim else 1
        elif site.feature_last:
            dim = ndim - 1
            samples = out.shape[0] if ndim > 1 else 1
        elif ndim == stats.ndim - 1:
            dim, samples = stats.unit_dim - 1, 1
        else:
            return False
        if not 0 <= dim < ndim or out.shape[dim] != stats.units:
            return False
        stats.observe_as(out, dim, samples if rows else 0, regime)
        return True

    def _disable(self, watched: Watched, site: Optional[Site], err: Exception) -> None:
        """Contain an unexpected error of relumon's per-step path: disable the call site (or, before it exists, the
        module), say so once, and let training go on. ``RELUMON_STRICT=1`` re-raises instead."""
        if is_strict():
            raise err
        reason = f"{type(err).__name__}: {err}"
        if site is not None:
            if site.disabled is not None:
                return
            site.disabled = reason
            name = site.name
        else:
            if watched.disabled is not None:
                return
            watched.disabled = reason
            for known in watched.sites:
                known.disabled = known.disabled or reason
            name = watched.name or "root"
        warn(
            f"relumon: an error inside relumon's hooks at call site `{name}` ({reason}); relumon stops measuring this "
            "site and training goes on. The report marks it `disabled`. Please report this; set RELUMON_STRICT=1 to "
            "raise such errors instead.",
            RelumonWarning,
        )

    def _guard_grad_hook(
        self, watched: Watched, site: Site, hook: Callable[[Tensor], None]
    ) -> Callable[[Tensor], None]:
        """``hook``, with its errors contained like the forward hook's (it runs inside the user's backward)."""

        def guarded_grad_hook(grad: Tensor) -> None:
            if site.disabled is not None:
                return None
            try:
                hook(grad)
            except Exception as err:
                self._disable(watched, site, err)
            return None

        return guarded_grad_hook

    def _skip_transformed(self, watched: Watched) -> None:
        if self._warned_transform:
            return
        self._warned_transform = True
        warn(
            f"relumon: `{watched.name or 'root'}` ran under a torch.func transform (vmap, grad, jacrev...). relumon "
            "does not measure calls under transforms (their tensors are batched or wrapped views of the real "
            "samples); ordinary training forwards before and after are measured as usual.",
            RelumonWarning,
        )

    def _skip_dtype(self, watched: Watched, out: Tensor) -> None:
        if watched.skipped:  # said once per module
            return
        watched.skipped = True
        warn(
            f"relumon: `{watched.name}` produced a {out.dtype} tensor; only real-valued activations are watched, so "
            "such calls are skipped (they take no call index)."
        )

    def _warn_shape(self, watched: Watched, site: Site, out: Tensor) -> None:
        if watched.warned_shape:
            return
        watched.warned_shape = True
        warn(
            f"relumon: call site `{site.name}` first had {site.stats.units} units along dim "
            f"{site.stats.unit_dim} of a {site.stats.ndim}-D output, now it produced shape {tuple(out.shape)}; "
            "calls with the new shape are skipped. Pass `unit_dim=` to relumon.watch if the unit dim was guessed "
            "wrong."
        )

    def _on_functional_call(
        self, path: str, fn: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """A call of ``F.<fn>`` caught inside ``module`` (`relumon.functional.FunctionalCalls`), at site ``path``."""
        watched = self._watched.get(path)
        if watched is None:
            watched = Watched.of_function(path, fn, args, kwargs, self._unit_dims.get(path, self._unit_dims.get("*")))
            self._watched[path] = watched
        self._observe(watched, module, args, out)

    # ------------------------------------------------------------------ asked by the clock and discovery

    def _restart(self, forward_done: bool) -> None:
        """A step boundary (`relumon.steps.StepClock.start_step`): call counters restart, so the n-th call of a module
        maps to the same site; discovery lets go of the first training forward's records once it is over."""
        for watched in self._watched.values():
            watched.calls = 0
        self.discovery.step_started(forward_done)

    def _is_confirming(self, name: str) -> bool:
        return name in self.confirming

    def _grad_scale(self) -> Optional[Tensor]:
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale: Optional[Tensor] = getattr(scaler, "_scale", None)  # the live scale tensor: a host read would sync
        return scale

    # ------------------------------------------------------------------ lifetime

    def idle_modules(self) -> list[str]:
        """Paths of the watched modules that never ran in a training forward."""
        return [
            w.name for key, w in self._watched.items() if isinstance(key, nn.Module) and not w.sites and not w.skipped
        ]

    def leave_stale_capture(self) -> None:
        """Leave the functional capture if a forward ended by a ``BaseException`` left it entered
        (`relumon.functional.FunctionalCalls.leave_stale_capture`)."""
        self.functional.leave_stale_capture()

    @property
    def wiring_book(self) -> WiringBook:
        """The producer and reader record of the first training forward (`relumon.wiring.WiringBook`)."""
        book = self.discovery.wiring_book
        assert book is not None  # made in __init__, before any hook can run
        return book

    @property
    def _graph_nodes(self) -> Optional[dict[Any, str]]:
        """Discovery's record of the first training forward's site outputs, under its name before issue 28."""
        return self.discovery.graph_nodes

    @property
    def watched_count(self) -> int:
        """Watched modules, plus functional call sites found so far."""
        return len(self._watched)

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook. Idempotent; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.weight_grads.remove()
        self.discovery.remove()
        self.functional.remove()  # removed in the middle of a forward


# Allocation runs eagerly even inside a torch.compile trace: state created in a graph would not persist. This costs
# a graph break per new call site, on the first compiled training step only.
@torch._dynamo.disable  # type: ignore[untyped-decorator]
def _add_site_eagerly(
    recorder: Recorder, watched: Watched, call: int, args: Any, out: Tensor, compiled: bool, append: bool = True
) -> Optional[Site]:
    try:
        return recorder.discovery.discover(watched, call, args, out, compiled, append)
    except Exception as err:
        recorder._disable(watched, None, err)
        return None


def _warn_scripted(model: nn.Module) -> None:
    """Say once which TorchScript submodules relumon cannot look inside (PyTorch allows no hooks on them)."""
    scripted = scripted_modules(model)
    if not scripted:
        return
    shown = ", ".join(f"`{name}`" for name in scripted[:5]) + (
        f" and {len(scripted) - 5} more" if len(scripted) > 5 else ""
    )
    warn(
        f"relumon: {shown} {'is a TorchScript module' if len(scripted) == 1 else 'are TorchScript modules'} "
        "(torch.jit.script or trace), on which PyTorch allows no hooks: activations inside are not watched, and a "
        "layer fed by one has no `fed_by`. The rest of the model is watched. To measure them, watch the eager "
        "module before scripting it.",
        RelumonWarning,
    )


def _unit_dim_overrides(options: Options, names: list[str]) -> dict[str, int]:
    """``options.unit_dim`` as ``{module path or "*": dim}``, after checking that the paths are watched."""
    unit_dim = options.unit_dim
    if unit_dim is None:
        return {}
    if isinstance(unit_dim, int):
        return {"*": unit_dim}
    unknown = [k for k in unit_dim if k != "*" and k not in names and not (options.functional and _is_functional(k))]
    if unknown:
        raise ValueError(f"`unit_dim` names modules that are not watched: {unknown}; watched: {names}")
    return dict(unit_dim)


def _is_functional(path: str) -> bool:
    """Whether ``path`` names a functional call site, ``[<module path>.]F.relu``, ``F.relu6`` or ``F.leaky_relu``."""
    return _FUNCTIONAL_SITE.match(path) is not None
