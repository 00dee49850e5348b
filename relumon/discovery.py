"""Call-site discovery: which site a call never placed before is, read from the wiring in the autograd graph.

Runs inside the training step, but only for calls the recorder cannot place yet: the first call of each call index
of a module (and, for a module with several sites, of each call signature). Later calls of a site cost nothing here.

- **Call-site discovery.** The first time a call index of a module runs, its wiring is read from the autograd graph
  (`relumon.wiring.read_wiring`): the unit dim, and the weights that feed the call. A call fed by the same weights
  as an earlier site of the module is that site (a recurrent cell unrolled T times is one site; its later time steps
  add no samples); otherwise a new `Site` is made with its `relumon.state.SiteStats`. Without a graph (no gradient
  tracked) the module that fed the call decides (`relumon.units`). The sample dim comes from the graph too
  (`relumon.wiring.Wiring.batch_dim`; modules that declare a ``batch_first`` layout note their outputs' nodes in the
  first training forward for it).
  In the first training forward discovery also records the site's nearest upstream sites in the autograd graph
  (`relumon.cascade.upstream_sites`, once per site; later steps add nothing).
- **Call signatures.** Each discovered call notes its signature (`relumon.wiring.call_signature`: one node's
  parameter inputs) with its site, so that the recorder can match later calls of a module with several sites by
  what fed them rather than by their call index.
- **The records of the first training forward**: the output nodes of its calls (a wiring walk stops at an earlier
  call's output and takes its units), the outputs of modules that declare their layout, the producer tracer
  (`relumon.hooks.ProducerTracer`: the module that fed each call) and the wiring book that recycling and the proofs
  read (`relumon.wiring.WiringBook`). They are let go at the first step boundary after that forward is over.
- **What the graph does not tell is said once**: a guessed unit dim (relumon counts its fallback dim), samples
  counted by the input convention alone, a ``unit_dim=`` that names no dim of a call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from relumon.cascade import node_key, upstream_sites
from relumon.diagnosis import WeightGradNorms
from relumon.errors import RelumonWarning, warn
from relumon.hooks import ProducerTracer, is_compiling
from relumon.options import Options
from relumon.site import Site, Watched
from relumon.state import SiteStats
from relumon.steps import MAX_CALLS_PER_STEP
from relumon.units import infer_unit_dim
from relumon.wiring import UNBATCHED, Wiring, WiringBook, batch_first_of, call_signature, read_wiring

__all__ = ["SiteDiscovery"]

#: Why a site found inside a torch.compile graph has no wiring (its output's graph is one opaque compiled node).
_COMPILED = "torch.compile leaves no eager autograd graph to read; this is said once for all such sites"


class SiteDiscovery:
    """Finds the call site of a watched module's call the recorder cannot place, from the autograd graph.

    The recorder calls `discover` (eagerly, even under torch.compile) for a call index or signature never seen;
    everything else here serves that call, or keeps the first training forward's records it reads.

    Args:
        model: the watched model.
        options: validated options; ``batch_dim``, ``dormant_tau``, ``grad_through`` and ``track_grad`` apply here.
        grad_scale: returns the live loss scale tensor or None (new sites report unscaled gradient norms with it).
        on_backward: called after each backward pass through a site (`relumon.steps.StepClock.on_backward`).
        guard: wraps a site's gradient hook so that its errors are contained like the forward hook's.
        weight_grads: the window's weight-gradient norms, told about each new site's producer (for blame).
        is_confirming: whether the monitor has a site, by name, measured on every call (`Site.exact`).
    """

    def __init__(
        self,
        model: nn.Module,
        options: Options,
        *,
        grad_scale: Callable[[], Optional[Tensor]],
        on_backward: Callable[[], None],
        guard: Callable[[Watched, Site, Callable[[Tensor], None]], Callable[[Tensor], None]],
        weight_grads: WeightGradNorms,
        is_confirming: Callable[[str], bool],
    ) -> None:
        self._options = options
        self._grad_through = options.grad_through and options.track_grad
        self._grad_scale = grad_scale
        self._on_backward = on_backward
        self._guard = guard
        self._weight_grads = weight_grads
        self._is_confirming = is_confirming
        #: Call sites in the order they were first called.
        self.sites: list[Site] = []
        self._warned_compiled_units = False
        #: Output nodes of the calls seen in the first training forward: ``node_key -> (site name, unit dim)``, so a
        #: wiring walk stops at an earlier call's output and takes its units (None once that forward is over).
        self._wiring_nodes: Optional[dict[Any, tuple[str, int]]] = {}
        #: Modules with a ``batch_first`` layout (LSTM, Transformer layers), by path.
        self.batch_first = batch_first_of(model)
        #: Output nodes of those modules in the first training forward: ``node_key -> the dim holding the samples``
        #: (None once that forward is over), for `relumon.wiring.batch_walk`.
        self._layout_nodes: Optional[dict[Any, int]] = {}
        self._warned_rows = False  # samples counted by the input convention alone: said once
        self._tracer: Optional[ProducerTracer] = None
        #: Output autograd nodes of the sites discovered in the first training forward (None once it is over).
        self.graph_nodes: Optional[dict[Any, str]] = {}
        #: Producer and reader facts of the first training forward's sites (recycling reads them); made by `trace`.
        self.wiring_book: Optional[WiringBook] = None

    def trace(self, model: nn.Module, transparent: set[nn.Module]) -> None:
        """Attach the producer tracer and the wiring book, whose hooks record the first training forward.

        ``transparent``: the watched activation modules, through which a tensor keeps its producer.
        """
        self._tracer = ProducerTracer(model, transparent=transparent)
        self.wiring_book = WiringBook(model)

    def step_started(self, forward_done: bool) -> None:
        """A step boundary (`relumon.steps.StepClock.start_step`); ``forward_done``: whether a training forward has
        run to its end (or reached a backward pass) since discovery began."""
        # The first training forward that ran to its end (or reached a backward) has been traced: producers are known.
        # One ended by an exception leaves the tracing on for the next, so later sites still get their producer.
        traced = bool(self.sites) and forward_done
        tracer = self._tracer
        if tracer is not None and tracer.active:
            if traced:
                tracer.remove()
            else:
                tracer.clear()
        if self.graph_nodes is not None:  # the same for the autograd graph: its walk is done once
            self.graph_nodes = None if traced else {}
        if self._wiring_nodes is not None:
            self._wiring_nodes = None if traced else {}
        if self._layout_nodes is not None:
            self._layout_nodes = None if traced else {}

    def remove(self) -> None:
        """Take off the tracer's and the wiring book's hooks, and let go of the first training forward's records."""
        if self._tracer is not None:
            self._tracer.remove()
        if self.wiring_book is not None:
            self.wiring_book.remove()
        self.graph_nodes = None
        self._wiring_nodes = None
        self._layout_nodes = None

    def discover(
        self, watched: Watched, call: int, args: Any, out: Tensor, compiled: bool = False, append: bool = True
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
                self._weight_grads.track(fed_by, producer)  # blame's gradient fact, about the window
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
            if not recurrent and watched.sites and watched.sites[-1] is site and self.graph_nodes is None:
                recurrent = watched.recurrent[-1]  # no graph record any more: a longer sequence than before
        book = self.wiring_book
        if not compiled and book is not None:  # made by `trace`, before any call can be discovered
            book.discovered(site.name, inp, out, site.stats.unit_dim)
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

    def _later_call_site(self, watched: Watched, tensor: Tensor, out: Tensor) -> tuple[Optional[Site], bool]:
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
        watched: Watched,
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
            track_abs=self._options.dormant_tau is not None,
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
        site.exact = self._is_confirming(site.name)
        site.grad_hook = self._guard(watched, site, stats.grad_hook)
        watched.distinct.append(site)
        self.sites.append(site)
        return site

    def _unit_dim_for(
        self, watched: Watched, out: Tensor, wiring: Optional[Wiring], producer: Optional[nn.Module]
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

    def _batch_dim_for(self, watched: Watched, ndim: int, unit_dim: int, wiring: Optional[Wiring] = None) -> int:
        """The dim that holds the samples: as the option `batch_dim` says; else as the graph says (a convolution's
        dim 0 wherever the walk carried it, an unbatched call being one sample, told by a batch dim equal to the unit
        dim; or the rows followed back to the output of a module that declares its layout, such as an ``nn.LSTM`` with
        ``batch_first=False``); else, inside a module that declares its layout, as it says (dim 1 of a 3-D activation
        when sequence-first); else dim 0."""
        given = self._options.batch_dim
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
        if ndim != 3 or unit_dim != 2 or not self.batch_first:
            return 0
        inside = [p for p in self.batch_first if not p or watched.name.startswith(p + ".")]
        if inside:  # the innermost enclosing module that says
            return 0 if self.batch_first[max(inside, key=len)] else 1
        return 0

    def _note_signature(self, watched: Watched, args: Any, out: Tensor, site: Site) -> None:
        """Record which site a call signature belongs to (None when two sites share it) at discovery."""
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        signature = call_signature(inp, out)
        if not signature:
            return
        known = watched.signatures.get(signature, site)
        watched.signatures[signature] = site if known is site else None
        watched.keyed = watched.keyed or len(watched.distinct) > 1

    def _record_upstream(self, site: Site, out: Tensor, compiled: bool) -> None:
        """In the first training forward, walk the autograd graph from ``out`` to the nearest upstream sites.

        Under torch.compile there is no eager graph to walk: the upstream stays unknown.
        """
        known = self.graph_nodes
        if known is None or compiled:
            return
        grad_fn = out.grad_fn
        site.upstream, site.from_input = upstream_sites(grad_fn, known)
        if grad_fn is not None:
            known[node_key(grad_fn)] = site.name

    def _join_upstream(self, site: Site, out: Tensor, compiled: bool) -> bool:
        """A later call of an existing site in the first training forward: its upstream sites join the site's, and
        True when it is fed by the site's own earlier output (a recurrent cell)."""
        known = self.graph_nodes
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

    def _warn_units(self, watched: Watched, site: Site, out: Tensor, why: str) -> None:
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

    def _warn_given_dim(self, watched: Watched, out: Tensor) -> None:
        if watched.warned_shape:
            return
        watched.warned_shape = True
        warn(
            f"relumon: `unit_dim={watched.unit_dim}` names no dim of `{watched.name}`'s output {tuple(out.shape)}; "
            "relumon infers the unit dim of such calls instead. Pass a dim that exists in every call (a negative "
            "one counts from the end).",
            RelumonWarning,
        )

    def on_layout_output(self, module: nn.Module, args: Any, out: Any) -> None:
        """A module that declares its layout ran: in the first training forward, note which dim of its output holds
        the samples (dim 1 of a 3-D output with ``batch_first=False``)."""
        layouts = self._layout_nodes
        if layouts is None or is_compiling():
            return None
        first = out[0] if isinstance(out, tuple) and out else out
        if isinstance(first, Tensor) and first.grad_fn is not None and first.ndim == 3:
            layouts[node_key(first.grad_fn)] = 0 if getattr(module, "batch_first", True) else 1
        return None


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
