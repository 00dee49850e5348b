"""The per-step path: hooks that fold each training forward and backward into on-device statistics.

**Everything in this module runs inside the user's training step**, so it stays cheap: per watched call it does a
few Python checks and, on measured steps, launches in-place kernels on state that lives on the activation's device.
It never reads device memory on the host. It knows nothing about reports: [`Monitor`][relumon.Monitor] turns the
recorded state into a [`Report`][relumon.Report] when a window closes.

What the `Recorder` does:

- **Hooks.** A forward hook on every watched module, a forward pre-hook on the root module (a step boundary), and,
  with ``functional=True``, module-tracking hooks that enter a `relumon.functional.ActivationCapture` while the model
  runs. Facts about which forwards count are in `relumon.hooks`.
- **Step boundaries.** A call of the root module, ``new_step()``, or the first forward after a backward pass starts
  a training step; call counters restart there, so the n-th call of a module in a step maps to the same call site.
  So do a counted forward inside another backward pass than the step's (a reentrant checkpoint's recompute in a
  model driven through its methods), and a repeat of a site already called in the step, not fed by it, whose output
  carries no gradient (a frozen trunk: no backward can mark its steps), or after `MAX_CALLS_PER_STEP` calls.
- **The measurement schedule.** About one training step in ``measure_every`` is measured, picked by a golden-ratio
  sequence (`is_measured_step`): spread evenly, never periodic, so loops that alternate phases get every phase
  measured. On top of it, each call site's first call of every window is measured (so no window is left without
  figures), and a site the monitor marked `Site.exact` (a sampled death being confirmed) is measured on every call.
  Compiled code measures every step (a step counter read inside a graph would recompile it every step).
- **Call-site discovery.** The first time a call index of a module runs, its wiring is read from the autograd graph
  (`relumon.wiring.read_wiring`): the unit dim, and the weights that feed the call. A call fed by the same weights
  as an earlier site of the module is that site (a recurrent cell unrolled T times is one site; its later time steps
  add no samples); otherwise a new `Site` is made with its `relumon.state.SiteStats`. Without a graph (no gradient
  tracked) the module that fed the call decides (`relumon.units`). The sample dim comes from the graph too
  (`relumon.wiring.Wiring.batch_dim`; modules that declare a ``batch_first`` layout note their outputs' nodes in the
  first training forward for it).
  In the first training forward discovery also records the site's nearest upstream sites in the autograd graph
  (`relumon.cascade.upstream_sites`, once per site; later steps add nothing).
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
import sys
from types import FrameType
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from relumon.cascade import node_key, upstream_sites
from relumon.diagnosis import WeightGradNorms
from relumon.errors import RelumonWarning, is_strict, warn
from relumon.functional import ActivationCapture, leave_mode
from relumon.hooks import (
    OwnHook,
    OwnPreHook,
    ProducerTracer,
    frame_running,
    hookable_modules,
    in_checkpoint_recompute,
    in_functorch_transform,
    is_compiling,
    is_counted_forward,
    scripted_modules,
)
from relumon.options import Options
from relumon.state import SiteLayout, SiteStats, batch_rows, layout_of
from relumon.units import infer_unit_dim
from relumon.wiring import UNBATCHED, Wiring, WiringBook, batch_first_of, call_signature, read_wiring

__all__ = ["Recorder", "Site", "NEGATIVE_REGIME_TYPES", "ZERO_FLOOR_TYPES", "counts_dead"]

#: Activations whose output is 0 for non-positive inputs: a unit is dead when its output was 0 everywhere.
ZERO_FLOOR_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

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

#: Calls of one watched module within one step beyond which relumon assumes it missed a step boundary (a model driven
#: through its methods whose outputs are detached, with no backward through them): it starts a new step and warns.
MAX_CALLS_PER_STEP = 256

#: Integer activation dtypes that are watched (others, such as bool or complex, are skipped with a warning).
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)

#: Why a site found inside a torch.compile graph has no wiring (its output's graph is one opaque compiled node).
_COMPILED = "torch.compile leaves no eager autograd graph to read; this is said once for all such sites"

#: A call signature not seen yet (`Recorder._match_site`).
_UNSEEN: Any = object()

_FUNCTIONAL_SITE = re.compile(r"(.+\.)?F\.(relu|relu6|leaky_relu)$")


class Site:
    """A call site: the n-th call of a watched module within one training step, with its on-device statistics.

    Attributes:
        name: ``<module path>`` for the first call, then ``<module path>.call2``, ``.call3``...
        module_name: the module's path (for functional calls, the enclosing module's path plus ``F.<fn>``).
        call: 0-based call index within a step.
        kind: the activation's class name (``"ReLU"``) or ``"F.relu"``.
        fed_by: path of the module whose output fed the activation in its first training forward, if any.
        negative_regime: whether the activation passes negative values (LeakyReLU...).
        stats: the window's statistics.
        counts_dead: whether dead units are counted (the ReLU family and activations with a negative regime); else
            gradient flow only.
        upstream: names of the nearest upstream sites in the autograd graph of the first training forward; None when
            unknown (discovered later, or under torch.compile).
        from_input: whether a path from the site reaches the data input without crossing another site.
        disabled: why relumon stopped measuring this site (an error inside its hooks), or None.
        grad_hook: the tensor hook registered on the site's outputs (``stats.grad_hook``, errors contained).
    """

    __slots__ = (
        "name",
        "module_name",
        "call",
        "kind",
        "fed_by",
        "negative_regime",
        "stats",
        "counts_dead",
        "upstream",
        "from_input",
        "exact",
        "disabled",
        "grad_hook",
        "feature_last",
    )

    def __init__(
        self,
        name: str,
        module_name: str,
        call: int,
        kind: str,
        fed_by: Optional[str],
        negative_regime: bool,
        stats: SiteStats,
        counts_dead: bool = True,
    ) -> None:
        self.name = name
        self.module_name = module_name
        self.call = call
        self.kind = kind
        self.fed_by = fed_by
        self.negative_regime = negative_regime
        self.stats = stats
        #: Measure every call, whatever the schedule: set by the monitor while a sampled death is being confirmed.
        self.exact = False
        self.counts_dead = counts_dead
        self.upstream: Optional[tuple[str, ...]] = None
        self.from_input = True
        self.disabled: Optional[str] = None
        self.grad_hook: Callable[[Tensor], None] = stats.grad_hook
        #: Whether the units are the last dim (Linear-like), so calls of another rank keep them there.
        self.feature_last = stats.ndim <= 2 or stats.unit_dim == stats.ndim - 1

    def layout(self) -> SiteLayout:
        """What other ranks need to pair this site with theirs, and to report it if they never ran it."""
        info = {
            "module_name": self.module_name,
            "call": self.call,
            "kind": self.kind,
            "fed_by": self.fed_by,
            "negative_regime": self.negative_regime,
            "unit_dim": self.stats.unit_dim,
            "counts_dead": self.counts_dead,
            "cap": self.stats.cap,
            "upstream": self.upstream,
            "from_input": self.from_input,
            "disabled": self.disabled,
        }
        return layout_of(self.name, self.stats, info)


class _Watched:
    """A watched module: its path, its call counter for the current step and its sites by call index."""

    __slots__ = (
        "name",
        "kind",
        "negative_regime",
        "unit_dim",
        "slope",
        "calls",
        "sites",
        "warned_shape",
        "cap",
        "counts_dead",
        "skipped",
        "disabled",
        "regime_from_input",
        "distinct",
        "by_key",
        "rows",
        "restart",
        "recurrent",
        "warned_units",
        "signatures",
        "keyed",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        negative_regime: bool,
        unit_dim: Optional[int],
        slope: Optional[float],
        cap: Optional[float] = None,
        counts_dead: bool = True,
        regime_from_input: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.negative_regime = negative_regime
        self.unit_dim = unit_dim
        #: The activation's derivative for non-positive outputs (0 for ReLU, alpha for LeakyReLU); None if it is not
        #: that simple (GELU...), which leaves the gradient through the activation unmeasured.
        self.slope = slope
        #: The activation's upper cap (6 for ReLU6): a unit whose output was the cap everywhere is saturated.
        self.cap = cap
        self.counts_dead = counts_dead
        self.calls = 0
        self.sites: list[Site] = []
        self.warned_shape = False
        self.skipped = False  # ran in a training forward with a dtype that is not watched
        #: Why the whole module was disabled (an error before its call site existed), or None.
        self.disabled: Optional[str] = None
        #: Decide the regime from the input's sign (PReLU: a learned slope below 0 makes a negative input's output
        #: positive, so the output's sign says nothing).
        self.regime_from_input = regime_from_input
        # ``sites`` is indexed by call index within a step; calls fed by the same weights share one site, so a site
        # can appear at several indices. Per call index: whether it adds batch rows (a recurrent cell's later time
        # steps are the same rows), whether it repeats a site already called in the step without being fed by it (a
        # possible missed step boundary), and whether it is fed by the same site's earlier output.
        self.distinct: list[Site] = []
        self.by_key: dict[Any, Site] = {}
        self.rows: list[bool] = []
        self.restart: list[bool] = []
        self.recurrent: list[bool] = []
        self.warned_units = False
        #: The site of each call signature (`relumon.wiring.call_signature`) seen at discovery; None where two sites
        #: share one. Once the module has several sites (``keyed``), each call is matched by its signature, so calls
        #: skipped by the data (experts with no token, LayerDrop) do not shift later calls into other sites.
        self.signatures: dict[Any, Optional[Site]] = {}
        self.keyed = False


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
        self._grad_through = options.grad_through and options.track_grad
        self._measure_every = options.measure_every
        self._grad_scaler = options.grad_scaler
        self._watched: dict[Union[nn.Module, str], _Watched] = {}  # modules, and functional call sites by name
        #: Call sites in the order they were first called.
        self.sites: list[Site] = []
        self._handles: list[RemovableHandle] = []
        self._step_pending = False  # a backward finished: the next forward outside backward starts a step
        self._in_step = False  # a counted forward happened since the last step boundary
        self._measuring = True  # this step is one of the measured ones
        #: Training steps with a counted forward since the recorder was attached (or since the run began, on resume).
        self.steps_seen = 0
        #: Names of the call sites to measure on every call (the monitor confirms sampled deaths with them).
        self.confirming: set[str] = set()
        #: Running modules, with the frame of each module call (None under compile), for functional capture.
        self._module_stack: list[tuple[str, nn.Module, Optional[FrameType]]] = []
        self._warned_transform = False
        self._warned_compiled_units = False
        self._warned_boundary = False
        self._root_step = False  # the open step began with a call of the root module
        #: Whether a training forward has run to its end (or reached a backward pass) since discovery began.
        self._forward_done = False
        #: The autograd graph task the open step's first counted forward ran in (-1: outside any backward).
        self._step_task = -1
        #: Output nodes of the calls seen in the first training forward: ``node_key -> (site name, unit dim)``, so a
        #: wiring walk stops at an earlier call's output and takes its units (None once that forward is over).
        self._wiring_nodes: Optional[dict[Any, tuple[str, int]]] = {}
        #: Modules with a ``batch_first`` layout (LSTM, Transformer layers), by path.
        self._batch_first = batch_first_of(model)
        #: Output nodes of those modules in the first training forward: ``node_key -> the dim holding the samples``
        #: (None once that forward is over), for `relumon.wiring.batch_walk`.
        self._layout_nodes: Optional[dict[Any, int]] = {}
        self._warned_rows = False  # samples counted by the input convention alone: said once
        self._capture: Optional[ActivationCapture] = None
        self._tracer: Optional[ProducerTracer] = None
        #: Output autograd nodes of the sites discovered in the first training forward (None once it is over).
        self._graph_nodes: Optional[dict[Any, str]] = {}
        #: Whether a training forward of the root module, or a ``new_step()`` with grad enabled, has happened.
        self.training_seen = False
        #: Whether compiled code ran a counted forward: its steps are not counted in ``steps_seen`` as they run.
        self.compiled_seen = False
        #: The window's weight-gradient norms of the modules that feed watched activations (for blame).
        self.weight_grads = WeightGradNorms(lambda: self._measuring, self._grad_scale)
        try:
            for name, module in watched_modules:
                unit = self._unit_dims.get(name, self._unit_dims.get("*"))
                negative = _is_negative_regime(module)
                watched = _Watched(
                    name,
                    type(module).__name__,
                    negative,
                    unit,
                    _slope_of(module),
                    _cap_of(module),
                    counts_dead(module),
                    regime_from_input=isinstance(module, nn.PReLU),
                )
                self._watched[module] = watched
                hook = OwnHook(functools.partial(self._observe, watched), module)
                self._handles.append(module.register_forward_hook(hook))
            for name, module in hookable_modules(model):
                if name in self._batch_first:  # what a layout module's output says of the samples, at discovery
                    self._handles.append(module.register_forward_hook(OwnHook(self._on_layout_output, module)))
            self._handles.append(model.register_forward_pre_hook(OwnPreHook(self._on_root_forward, model)))
            self._handles.append(model.register_forward_hook(OwnHook(self._on_root_done, model)))
            self._tracer = ProducerTracer(model, transparent={m for m in self._watched if isinstance(m, nn.Module)})
            #: Producer and reader facts of the first training forward's sites (recycling reads them).
            self.wiring_book = WiringBook(model)
            if options.functional:
                self._attach_functional(model)
        except BaseException:
            self.remove()  # never leave half the hooks behind
            raise

    # ------------------------------------------------------------------ module hooks

    def _observe(self, watched: _Watched, module: nn.Module, args: Any, out: Any) -> None:
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
        if self._step_pending and task == -1:
            self.start_step()
        elif task != -1 and self._in_step and self._step_task != task and not self._root_step:
            # A counted forward inside a backward pass other than the one this step's forwards ran in: a reentrant
            # checkpoint recomputing the next step of a model driven through its methods. (When a call of the root
            # module began the step, such a forward is the recompute of this very step: the root call marks steps.)
            self._forward_done = True
            self.start_step()
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
                self._warn_no_boundary(watched)
            self._forward_done = True  # the step before ran to its end: its wiring is all read
            self.start_step()
            call = 0
            site = watched.sites[0] if watched.sites else None
        if not self._in_step:  # the first counted forward of a step decides whether the step is measured
            self._in_step = True
            if compiling:
                # A step counter read inside a compiled graph would be guarded on and recompile every step, so
                # compiled code measures every step; inductor fuses the reductions into its kernels. Its steps are
                # counted at report time, from the sites' compiled forward counters (`Monitor.report`).
                self._measuring = True
                self.compiled_seen = True
            else:
                self._step_task = task
                self._measuring = is_measured_step(self.steps_seen, self._measure_every)
                self.steps_seen += 1
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
            and (self._measuring or self.confirming or site.exact or stats.n_forwards == 0)
        ):
            matched, rows = self._match_site(watched, call, args, out, site, rows)
            if matched is None or matched.disabled is not None:
                return
            site, stats = matched, matched.stats
        # Sampled out, unless the site is confirming a death (exact) or has no measured call in this window yet, so
        # that every window measures every site that ran in it.
        if not (self._measuring or site.exact or stats.n_forwards == 0):
            stats.n_unmeasured += 1  # unmatched on most sampled steps: the call index decides which site counts it
            # Any backward ends the step, measured or not: a tiny hook tells, unless a call of the model itself
            # marks the steps (the common `model(x)` loop pays nothing for it).
            if out.requires_grad and not (self._step_pending or self._root_step):
                out.register_hook(self._backward_seen)  # type: ignore[no-untyped-call]
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
                    if not (compiling or self._root_step):
                        out.register_hook(self._backward_seen)  # type: ignore[no-untyped-call]
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
        self, watched: _Watched, call: int, args: Any, out: Tensor, site: Site, rows: bool
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

    def _note_signature(self, watched: _Watched, args: Any, out: Tensor, site: Site) -> None:
        """Record which site a call signature belongs to (None when two sites share it) at discovery."""
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        signature = call_signature(inp, out)
        if not signature:
            return
        known = watched.signatures.get(signature, site)
        watched.signatures[signature] = site if known is site else None
        watched.keyed = watched.keyed or len(watched.distinct) > 1

    def _follow_device(self, watched: _Watched, site: Site, out: Tensor) -> None:
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
        self, watched: _Watched, site: Site, out: Tensor, rows: bool, regime: Optional[Tensor] = None
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

    # ------------------------------------------------------------------ errors and transforms

    def _disable(self, watched: _Watched, site: Optional[Site], err: Exception) -> None:
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
        self, watched: _Watched, site: Site, hook: Callable[[Tensor], None]
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

    def _skip_transformed(self, watched: _Watched) -> None:
        if self._warned_transform:
            return
        self._warned_transform = True
        warn(
            f"relumon: `{watched.name or 'root'}` ran under a torch.func transform (vmap, grad, jacrev...). relumon "
            "does not measure calls under transforms (their tensors are batched or wrapped views of the real "
            "samples); ordinary training forwards before and after are measured as usual.",
            RelumonWarning,
        )

    # ------------------------------------------------------------------ functional calls (opt-in)

    def _attach_functional(self, model: nn.Module) -> None:
        """Track the running module on a stack; while any runs, a TorchFunctionMode catches F.relu calls."""
        for name, module in hookable_modules(model):
            self._handles.append(module.register_forward_pre_hook(OwnPreHook(self._make_enter(name), module)))
            self._handles.append(module.register_forward_hook(OwnHook(self._exit_module, module), always_call=True))

    def _make_enter(self, name: str) -> Callable[[nn.Module, Any], None]:
        def enter(module: nn.Module, args: Any) -> None:
            stack = self._module_stack
            if is_compiling():  # frames do not trace; the mode is eager-only anyway
                stack.append((name, module, None))
                return None
            if stack and not self._stack_running():
                self.leave_stale_capture()  # a forward ended by a BaseException left its modules on the stack
            if not stack:
                self._capture = ActivationCapture(self._on_functional_call)
                self._capture.__enter__()  # type: ignore[no-untyped-call]
            stack.append((name, module, _module_call_frame()))
            return None

        return enter

    def _exit_module(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._module_stack:
            self._module_stack.pop()
        if not self._module_stack:
            self._exit_capture()
        return None

    def _exit_capture(self) -> None:
        if self._capture is not None:
            capture, self._capture = self._capture, None
            leave_mode(capture)

    def _stack_running(self) -> bool:
        """Whether the innermost module call on the stack still runs (False after a BaseException ended it)."""
        frame = self._module_stack[-1][2]
        return frame is None or frame_running(frame)

    def leave_stale_capture(self) -> None:
        """Leave the functional capture if the forward that entered it ended without leaving it.

        Python runs no hook when a ``BaseException`` such as ``KeyboardInterrupt`` unwinds a forward, so the mode
        stays on the stack until relumon runs again: the next forward of the model, ``report()``, ``new_step()`` or
        ``remove()`` call this. Calls caught meanwhile are not recorded.
        """
        if self._module_stack and not self._stack_running():
            self._module_stack.clear()
            self._exit_capture()

    def _on_functional_call(self, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not self._module_stack or not self._stack_running():
            return
        path, module, _ = self._module_stack[-1]
        if module in self._watched:  # nn.ReLU calling F.relu: the module's own hook counts it
            return
        site_path = f"{path}.F.{fn}" if path else f"F.{fn}"
        watched = self._watched.get(site_path)
        if watched is None:
            unit = self._unit_dims.get(site_path, self._unit_dims.get("*"))
            if fn == "leaky_relu":
                slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
            else:
                slope = 0.0
            watched = _Watched(site_path, f"F.{fn}", fn == "leaky_relu", unit, slope, 6.0 if fn == "relu6" else None)
            self._watched[site_path] = watched
        self._observe(watched, module, args, out)

    # ------------------------------------------------------------------ step boundaries

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        try:
            self.start_step()
            self._root_step = True  # this step's boundary is the root call: no backward detection needed
            if not self.training_seen and not is_compiling() and is_counted_forward(module):
                self.training_seen = True
        except Exception as err:  # pragma: no cover - start_step only resets counters
            if is_strict():
                raise
            warn(f"relumon: an error inside relumon's step boundary ({type(err).__name__}: {err})", RelumonWarning)
        return None

    def _on_root_done(self, module: nn.Module, args: Any, out: Any) -> None:
        if not is_compiling():
            self._forward_done = True  # the step's forward ended without an exception: its wiring is all read

    def _on_layout_output(self, module: nn.Module, args: Any, out: Any) -> None:
        """A module that declares its layout ran: in the first training forward, note which dim of its output holds
        the samples (dim 1 of a 3-D output with ``batch_first=False``)."""
        layouts = self._layout_nodes
        if layouts is None or is_compiling():
            return None
        first = out[0] if isinstance(out, tuple) and out else out
        if isinstance(first, Tensor) and first.grad_fn is not None and first.ndim == 3:
            layouts[node_key(first.grad_fn)] = 0 if getattr(module, "batch_first", True) else 1
        return None

    def _on_backward(self) -> None:
        self._step_pending = True
        self._forward_done = True

    def _backward_seen(self, grad: Tensor) -> None:
        """Tensor hook: a backward pass reached this step's graph, so the next forward outside it starts a step."""
        self._step_pending = True
        self._forward_done = True
        return None

    def start_step(self) -> None:
        """A new training step: call counters restart, so the n-th call of a module maps to the same site.

        A step starts at a call of the root module, at ``Monitor.new_step()``, or at the first counted forward after
        a backward pass reached the step's graph, whether or not the step was measured and whether or not gradients
        are tracked (unmeasured calls carry a tiny hook for that alone). Idempotent until a counted forward happens,
        so these can all mark the same boundary.
        """
        self._step_pending = False
        self._root_step = False
        self._in_step = False
        for watched in self._watched.values():
            watched.calls = 0
        # The first training forward that ran to its end (or reached a backward) has been traced: producers are known.
        # One ended by an exception leaves the tracing on for the next, so later sites still get their producer.
        traced = bool(self.sites) and self._forward_done
        tracer = self._tracer
        if tracer is not None and tracer.active:
            if traced:
                tracer.remove()
            else:
                tracer.clear()
        if self._graph_nodes is not None:  # the same for the autograd graph: its walk is done once
            self._graph_nodes = None if traced else {}
        if self._wiring_nodes is not None:
            self._wiring_nodes = None if traced else {}
        if self._layout_nodes is not None:
            self._layout_nodes = None if traced else {}

    # ------------------------------------------------------------------ call-site discovery

    def _grad_scale(self) -> Optional[Tensor]:
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale: Optional[Tensor] = getattr(scaler, "_scale", None)  # the live scale tensor: a host read would sync
        return scale

    def _make_site(
        self, watched: _Watched, call: int, args: Any, out: Tensor, compiled: bool = False, append: bool = True
    ) -> Optional[Site]:
        """The site of a new call index, read from the wiring (`relumon.wiring`): an existing site of the module fed
        by the same weights, or a new one. Records the call index in ``watched`` (unless ``append`` is False: a call
        matched by its signature, not its index); returns None, recording nothing, when a new site would pass
        `MAX_CALLS_PER_STEP` (a missed step boundary)."""
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        fed_by, producer = (None, None)
        if inp is not None and self._tracer is not None:
            fed_by, producer = self._tracer.producer_of(inp)
        # An in-place activation's input is its output: the walk steps over the activation's own node.
        wiring = (
            None
            if compiled
            else read_wiring(inp if inp is not None else out, self._wiring_nodes, node_key, self._layout_nodes)
        )
        ndim = out.ndim
        unit_dim, why_guessed = self._unit_dim_for(watched, out, wiring, producer)
        units = out.shape[unit_dim] if ndim else 1
        key = _wiring_key(wiring, producer, {s.name for s in watched.distinct})
        site = watched.by_key.get(key) if key is not None else None
        looped = False
        if site is None and wiring is not None and self._wiring_nodes is None and append and watched.sites:
            site, looped = self._later_call_site(watched, inp if inp is not None else out, out)
        if site is not None and (site.stats.ndim, site.stats.unit_dim, site.stats.units) != (ndim, unit_dim, units):
            site = None  # the same weights in another shape: a site of its own
        if site is None:
            if call >= MAX_CALLS_PER_STEP:
                return None
            site = self._new_site(watched, call, out, fed_by, unit_dim, units, wiring)
            if fed_by is not None and producer is not None and watched.counts_dead:
                self.weight_grads.track(fed_by, producer)  # blame's gradient fact, about the window
            if key is not None:
                watched.by_key[key] = site
            self._record_upstream(site, out, compiled)
            earlier = recurrent = False
            if why_guessed is not None:
                self._warn_units(watched, site, out, why_guessed)
            if wiring is not None and wiring.batch_by_input and site.stats.batch_dim == wiring.batch_dim:
                self._warn_rows(site, out)
        elif not append:
            earlier = recurrent = False
        else:
            earlier = any(known is site for known in watched.sites)  # the indices so far are this step's calls
            recurrent = looped or self._join_upstream(site, out, compiled)
            if not recurrent and watched.sites and watched.sites[-1] is site and self._graph_nodes is None:
                recurrent = watched.recurrent[-1]  # no graph record any more: a longer sequence than before
        if not compiled:
            self.wiring_book.discovered(site.name, inp, out, site.stats.unit_dim)
        nodes = self._wiring_nodes
        if nodes is not None and out.grad_fn is not None:
            nodes[node_key(out.grad_fn)] = (site.name, site.stats.unit_dim)
        if not compiled:
            self._note_signature(watched, args, out, site)
        if not append:
            return site
        watched.sites.append(site)
        watched.rows.append(not (earlier and recurrent))  # a recurrent cell's later time steps are the same rows
        watched.restart.append(earlier and not recurrent)
        watched.recurrent.append(recurrent)
        return site

    def _later_call_site(self, watched: _Watched, tensor: Tensor, out: Tensor) -> tuple[Optional[Site], bool]:
        """The site of a call index first seen after the first training forward, whose full walk matched no site.

        Without the first forward's record of earlier outputs, the walk runs past the module's own earlier calls (a
        loop run more times than in the first step) to every weight behind them, and the key matches nothing. A
        second walk stops at nodes of the activation's own op: when its weights are those of exactly one site of the
        module, the call is that site's; when that site is also the previous call's and the walk met such a node, the
        call continues it (a loop over the same weights: its rows are not new samples). Discovery only."""
        own = out.grad_fn
        if own is None:
            return None, False
        kind = type(own).__name__
        for suffix in ("Backward0", "Backward1"):
            kind = kind[: -len(suffix)] if kind.endswith(suffix) else kind
        stopped = read_wiring(tensor, None, None, None, stop_kind=kind)
        if not stopped.weights:
            return None, False
        found = {id(s): s for k, s in watched.by_key.items() if isinstance(k, tuple) and k[0] == stopped.weights}
        if len(found) != 1:
            return None, False
        site = next(iter(found.values()))
        return site, "?" in stopped.met and watched.sites[-1] is site

    def _new_site(
        self,
        watched: _Watched,
        call: int,
        out: Tensor,
        fed_by: Optional[str],
        unit_dim: int,
        units: int,
        wiring: Optional[Wiring] = None,
    ) -> Site:
        ndim = out.ndim
        stats = SiteStats(
            units=units,
            unit_dim=unit_dim,
            ndim=ndim,
            device=out.device,
            grad_scale=self._grad_scale,
            on_backward=self._on_backward,
            track_abs=self.options.dormant_tau is not None,
            through_slope=watched.slope if self._grad_through else None,
            cap=watched.cap,
            peak_dtype=torch.float64 if out.dtype == torch.float64 else torch.float32,
            batch_dim=self._batch_dim_for(watched, ndim, unit_dim, wiring),
        )
        path = watched.name or "root"
        number = len(watched.distinct)  # sites are numbered per module in the order they are found
        site = Site(
            name=path if number == 0 else f"{path}.call{number + 1}",
            module_name=watched.name,
            call=call,
            kind=watched.kind,
            fed_by=fed_by,
            negative_regime=watched.negative_regime,
            stats=stats,
            counts_dead=watched.counts_dead,
        )
        site.exact = site.name in self.confirming
        site.grad_hook = self._guard_grad_hook(watched, site, stats.grad_hook)
        watched.distinct.append(site)
        self.sites.append(site)
        return site

    def _unit_dim_for(
        self, watched: _Watched, out: Tensor, wiring: Optional[Wiring], producer: Optional[nn.Module]
    ) -> tuple[int, Optional[str]]:
        """The unit dim of a new site's first call, and why it was guessed (None when known)."""
        ndim = out.ndim
        given = watched.unit_dim
        if given is not None:
            if -max(ndim, 1) <= given < max(ndim, 1):
                return given % max(ndim, 1), None
            if ndim and 0 <= given - 1 < ndim:  # an unbatched call: one dim fewer than `unit_dim` counts on
                return given - 1, None
            self._warn_given_dim(watched, out)
        if ndim <= 1:
            return 0, None
        if wiring is not None and wiring.unit_dim is not None:
            return wiring.unit_dim, None
        if (wiring is None or wiring.weights is None) and producer is not None:
            return infer_unit_dim(ndim, producer), None  # no graph (no gradient tracked): the module that fed it
        why = wiring.why_not if wiring is not None else _COMPILED
        unknown = wiring is not None and bool(wiring.unknown)  # an op the walk does not know: said for 2-D too
        return infer_unit_dim(ndim), (why if ndim >= 3 or unknown else None)

    def _batch_dim_for(self, watched: _Watched, ndim: int, unit_dim: int, wiring: Optional[Wiring] = None) -> int:
        """The dim that holds the samples: as the option `batch_dim` says; else as the graph says (a convolution's
        dim 0 wherever the walk carried it, an unbatched call being one sample, told by a batch dim equal to the unit
        dim; or the rows followed back to the output of a module that declares its layout, such as an ``nn.LSTM`` with
        ``batch_first=False``); else, inside a module that declares its layout, as it says (dim 1 of a 3-D activation
        when sequence-first); else dim 0."""
        given = self.options.batch_dim
        if isinstance(given, Mapping):
            given = given.get(watched.name, given.get("*"))
        if given is not None:
            return given % ndim if ndim and -ndim <= given < ndim else 0
        said = wiring.batch_dim if wiring is not None else None
        if said == UNBATCHED:
            if wiring is not None and wiring.unit_dim == unit_dim:
                return unit_dim
        elif said is not None and said != unit_dim and said < ndim:
            return said
        if ndim != 3 or unit_dim != 2 or not self._batch_first:
            return 0
        inside = [p for p in self._batch_first if not p or watched.name.startswith(p + ".")]
        if inside:  # the innermost enclosing module that says
            return 0 if self._batch_first[max(inside, key=len)] else 1
        return 0

    def _warn_units(self, watched: _Watched, site: Site, out: Tensor, why: str) -> None:
        if watched.warned_units or (why == _COMPILED and self._warned_compiled_units):
            return
        watched.warned_units = True
        self._warned_compiled_units = self._warned_compiled_units or why == _COMPILED  # said once for all sites
        warn(
            f"relumon: the autograd graph does not tell which dim of `{site.name}`'s output {tuple(out.shape)} holds "
            f"its units ({why}), so relumon counts dim {site.stats.unit_dim} (its fallback: dim 1 of a 4-D or 5-D "
            f"output, the last dim of a 2-D or 3-D one). If that is wrong, pass "
            f"`unit_dim={{{watched.name!r}: <dim>}}`.",
            RelumonWarning,
        )

    def _warn_rows(self, site: Site, out: Tensor) -> None:
        """Samples counted on a dim that only the convention "dim 0 of the model's input is the batch" names."""
        if self._warned_rows:
            return
        self._warned_rows = True
        warn(
            f"relumon: the autograd graph does not tell which dim of `{site.name}`'s output {tuple(out.shape)} holds "
            f"the samples: its rows come from a Linear fed by the model's input and then move to dim "
            f"{site.stats.batch_dim}, so relumon counts that dim, taking dim 0 of the input as the batch (as a "
            "DataLoader stacks it). If the input is sequence-first, pass `batch_dim=` (e.g. "
            f"`batch_dim={{{site.module_name!r}: 0}}`).",
            RelumonWarning,
        )

    def _warn_given_dim(self, watched: _Watched, out: Tensor) -> None:
        if watched.warned_shape:
            return
        watched.warned_shape = True
        warn(
            f"relumon: `unit_dim={watched.unit_dim}` names no dim of `{watched.name}`'s output {tuple(out.shape)}; "
            "relumon infers the unit dim of such calls instead. Pass a dim that exists in every call (a negative "
            "one counts from the end).",
            RelumonWarning,
        )

    def _warn_no_boundary(self, watched: _Watched) -> None:
        if self._warned_boundary:
            return
        self._warned_boundary = True
        warn(
            f"relumon: `{watched.name or 'root'}` ran {MAX_CALLS_PER_STEP} times without a step boundary (no call of "
            "the watched model, no backward pass through its activations, no `monitor.new_step()`), so relumon "
            "starts a new step every "
            f"{MAX_CALLS_PER_STEP} calls to bound its call sites. Call `monitor.new_step()` at the start of each "
            "training step (e.g. for a model driven through its methods whose outputs are detached).",
            RelumonWarning,
        )

    def _skip_dtype(self, watched: _Watched, out: Tensor) -> None:
        if watched.skipped:  # said once per module
            return
        watched.skipped = True
        warn(
            f"relumon: `{watched.name}` produced a {out.dtype} tensor; only real-valued activations are watched, so "
            "such calls are skipped (they take no call index)."
        )

    def _record_upstream(self, site: Site, out: Tensor, compiled: bool) -> None:
        """In the first training forward, walk the autograd graph from ``out`` to the nearest upstream sites.

        Under torch.compile there is no eager graph to walk: the upstream stays unknown.
        """
        known = self._graph_nodes
        if known is None or compiled:
            return
        grad_fn = out.grad_fn
        site.upstream, site.from_input = upstream_sites(grad_fn, known)
        if grad_fn is not None:
            known[node_key(grad_fn)] = site.name

    def _join_upstream(self, site: Site, out: Tensor, compiled: bool) -> bool:
        """A later call of an existing site in the first training forward: its upstream sites join the site's, and
        True when it is fed by the site's own earlier output (a recurrent cell)."""
        known = self._graph_nodes
        if known is None or compiled:
            return False
        grad_fn = out.grad_fn
        ups, from_input = upstream_sites(grad_fn, known)
        if grad_fn is not None:
            known[node_key(grad_fn)] = site.name
        if site.upstream is not None:
            joined = dict.fromkeys(site.upstream + tuple(u for u in ups if u != site.name))
            site.upstream = tuple(joined)
            site.from_input = site.from_input or from_input
        return site.name in ups

    def idle_modules(self) -> list[str]:
        """Paths of the watched modules that never ran in a training forward."""
        return [
            w.name for key, w in self._watched.items() if isinstance(key, nn.Module) and not w.sites and not w.skipped
        ]

    def _warn_shape(self, watched: _Watched, site: Site, out: Tensor) -> None:
        if watched.warned_shape:
            return
        watched.warned_shape = True
        warn(
            f"relumon: call site `{site.name}` first had {site.stats.units} units along dim "
            f"{site.stats.unit_dim} of a {site.stats.ndim}-D output, now it produced shape {tuple(out.shape)}; "
            "calls with the new shape are skipped. Pass `unit_dim=` to relumon.watch if the unit dim was guessed "
            "wrong."
        )

    # ------------------------------------------------------------------ lifetime

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
        if self._tracer is not None:
            self._tracer.remove()
        if getattr(self, "wiring_book", None) is not None:
            self.wiring_book.remove()
        self._exit_capture()  # removed in the middle of a forward
        self._module_stack.clear()
        self._graph_nodes = None
        self._wiring_nodes = None
        self._layout_nodes = None


# Allocation runs eagerly even inside a torch.compile trace: state created in a graph would not persist. This costs
# a graph break per new call site, on the first compiled training step only.
@torch._dynamo.disable  # type: ignore[untyped-decorator]
def _add_site_eagerly(
    recorder: Recorder, watched: _Watched, call: int, args: Any, out: Tensor, compiled: bool, append: bool = True
) -> Optional[Site]:
    try:
        return recorder._make_site(watched, call, args, out, compiled, append)
    except Exception as err:
        recorder._disable(watched, None, err)
        return None


_CALL_IMPL = nn.Module._call_impl.__code__


def _module_call_frame() -> Optional[FrameType]:
    """The frame of the ``nn.Module._call_impl`` that is running our forward (pre-)hook, if found nearby."""
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(8):
        if frame is None or frame.f_code is _CALL_IMPL:
            return frame
        frame = frame.f_back
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


def _wiring_key(wiring: Optional[Wiring], producer: Optional[nn.Module], own: set[str]) -> Any:
    """What makes calls of one module one site: the weights that feed them (and the other sites whose outputs they
    read directly), read from the autograd graph; without a graph, the module that fed them. None when nothing
    tells (each call index is then a site of its own)."""
    if wiring is not None and wiring.weights is not None:
        met = frozenset(wiring.met - own)
        if not wiring.weights and not met:
            return None
        return (wiring.weights, met)
    if producer is not None and next(producer.parameters(), None) is not None:
        return ("module", id(producer))
    return None


def counts_dead(module: nn.Module) -> bool:
    """Whether relumon counts dead units of ``module``: the ReLU family, and activations with a negative regime.

    Other activations (Tanh, Sigmoid...) get gradient flow only: "dead" has no meaning for them.
    """
    return isinstance(module, ZERO_FLOOR_TYPES + NEGATIVE_REGIME_TYPES)


def _is_negative_regime(module: nn.Module) -> bool:
    """Whether ``module`` passes negative values. RReLU does while its random slope can be above 0 (the default)."""
    if isinstance(module, nn.RReLU):
        return float(module.upper) > 0
    return isinstance(module, NEGATIVE_REGIME_TYPES)


def _cap_of(module: nn.Module) -> Optional[float]:
    """The upper cap of a capped activation (6 for ReLU6), else None."""
    if isinstance(module, nn.ReLU6):
        return float(module.max_val)
    return None


#: The golden ratio's fractional part: steps ``s`` with ``frac(s * phi) < 1/n`` are about one in ``n``, spread
#: evenly, and never periodic, so a loop that alternates phases (GAN D and G steps) gets every phase measured.
_PHI = 0.6180339887498949


def is_measured_step(step: int, measure_every: int) -> bool:
    """Whether training step ``step`` (0-based) is one of the measured ones: about one in ``measure_every``.

    Step 0 always is; ``measure_every=1`` measures every step.
    """
    return (step * _PHI) % 1.0 < 1.0 / measure_every


def _slope_of(module: nn.Module) -> Optional[float]:
    """The derivative of ``module`` for non-positive outputs, if it is a ReLU, ReLU6 or LeakyReLU; else None.

    ReLU6 also passes no gradient at its cap, which `relumon.state.SiteStats` handles with the site's cap. RReLU's
    training slope is random and PReLU's is learned: their gradient through is left unmeasured.
    """
    if type(module) is nn.ReLU or type(module) is nn.ReLU6:
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    return None


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
