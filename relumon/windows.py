"""Closing a window: the recorded state read to the host once, turned into a `Report`, and the next window begun.

Report-time only: nothing here runs in the training step except what the recorder does (see `relumon.recorder`).
Closing a window reads the recorded state to the host once (`relumon.state.gather`, reduced across ranks under
``torch.distributed``), builds one `LayerReport` per call site with the death history of `relumon.diagnosis`,
explains dead cascades, blocked gradients and blame (`relumon.cascade`, `relumon.diagnosis.blame`), and starts the
next window: the statistics restart, the timeline of dead fractions grows by one window, and the sites that the next
window measures on every call are named (sampled deaths to confirm, dead cascades, recycling candidates). The cause
(`relumon.cause`), the alerts (`relumon.alerts`) and recycling (`relumon.recycle_policy`) take the report from there;
``Monitor.report`` runs them in that order.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Any, Iterable, Optional

import torch
from torch import nn

from relumon.cascade import consequences_of, find_blockers, find_roots
from relumon.diagnosis import Blamed, Diagnosis, WindowHistory, blame_many
from relumon.options import Options
from relumon.proof import Certification, Certifier
from relumon.recorder import Recorder, Site
from relumon.report import LayerReport
from relumon.segments import segment_counts
from relumon.state import GatheredSite, SiteLayout, sum_over_ranks

__all__ = ["WindowCloser", "TIMELINE_WINDOWS", "cascade_sites"]

#: Closed windows kept in [`Monitor.timeline`][relumon.Monitor.timeline] (and checkpoints) for the dead-unit heatmap.
TIMELINE_WINDOWS = 500


class WindowCloser:
    """Builds the report of the open window from the recorder's state, and closes the window.

    Args:
        model_ref: a weak reference to the watched model (blame and certificates read its modules; its gradients
            tell whether training happened).
        recorder: the per-step recorder, whose sites, step clock and weight-gradient norms it reads.
        options: ``dormant_tau`` and ``permanent_after`` apply here.
    """

    def __init__(self, model_ref: weakref.ref[nn.Module], recorder: Recorder, options: Options) -> None:
        self._model_ref = model_ref
        self._recorder = recorder
        self._options = options
        #: Each site's death history and last dead fraction, across windows (`relumon.diagnosis.Diagnosis`).
        self.diagnosis = Diagnosis(options.permanent_after)
        #: ``(step, {call site: dead fraction})`` per closed window, oldest first (`Monitor.timeline`).
        self.timeline: deque[tuple[int, dict[str, float]]] = deque(maxlen=TIMELINE_WINDOWS)
        self.start = 0  # the step clock's steps_seen when the open window started
        self._compiled_counted = 0  # compiled steps of the open window already added to the clock's steps_seen

    def count_compiled_steps(self) -> None:
        """Add the open window's compiled steps not counted yet to the step clock's ``steps_seen``.

        Compiled code cannot count steps as they run (a Python counter read in a graph would recompile it every step),
        but it measures every call: each site's compiled forward counter (``SiteStats.forwards``, on the device) is
        the number of compiled steps it ran in, and the largest is the window's compiled steps. One small read, at
        report time, and only once compiled code has run; a peek (``reset=False``) counts each step once.
        """
        recorder = self._recorder
        if not recorder.clock.compiled_seen or not recorder.sites:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for site in recorder.sites:
            by_device.setdefault(site.stats.forwards.device, []).append(site.stats.forwards)
        compiled = max(int(torch.cat(counters).max()) for counters in by_device.values())
        if compiled > self._compiled_counted:
            recorder.clock.steps_seen += compiled - self._compiled_counted
            self._compiled_counted = compiled

    # ------------------------------------------------------------------ building the report

    def layer_reports(
        self, gathered: list[tuple[SiteLayout, GatheredSite]], step: int, close: bool, alerted: set[str]
    ) -> list[LayerReport]:
        """One `LayerReport` per gathered site, in forward order; ``alerted``: the sites already alerted on."""
        # Every site's dead units and NaN peaks at once: one comparison over all peaks, and the counts per site from
        # one cumulative sum (a few kernels per site add up at thousands of sites).
        lengths = [layout.units for layout, _ in gathered]
        peaks = torch.cat([g.peak for _, g in gathered]) if gathered else torch.zeros(0, dtype=torch.float64)
        flags = torch.stack([peaks <= 0, peaks.isnan()])
        dead_counts, nan_counts = segment_counts(flags, lengths)
        # A site that saw no sample, or whose activation is not ReLU-like, has no dead mask. Each mask is a copy of
        # its own, not a view of every site's (see `fold_histories`).
        dead_masks = [
            mask.clone() if g.samples > 0 and layout.info["counts_dead"] else None
            for (layout, g), mask in zip(gathered, torch.split(flags[0], lengths))
        ]
        sites = [(layout.name, layout.units, mask) for (layout, _), mask in zip(gathered, dead_masks)]
        histories = self.diagnosis.update_many(sites, step, close)
        return [
            self._layer_report(layout, g, close, alerted, mask, dead, nans, history)
            for (layout, g), mask, dead, nans, history in zip(gathered, dead_masks, dead_counts, nan_counts, histories)
        ]

    def _layer_report(
        self,
        layout: SiteLayout,
        g: GatheredSite,
        close: bool,
        alerted: set[str],
        dead_mask: Optional[torch.Tensor],
        dead_units: int,
        nonfinite_units: int,
        history: WindowHistory,
    ) -> LayerReport:
        """One site's figures, from its description (``layout.info``: this rank's or, for a site only another rank
        ran, that rank's), its gathered statistics, its dead mask (None where dead units are not counted: no sample,
        or an activation that is not ReLU-like) with the counts of its dead and NaN peaks, and its history. Cascades
        and blame come after, in `explain`."""
        info: dict[str, Any] = layout.info
        name, units = layout.name, layout.units
        seen = g.samples > 0
        counted = dead_mask is not None
        if dead_mask is None:
            dead_mask, dead_units = torch.zeros(units, dtype=torch.bool), 0
        cap: Optional[float] = info["cap"]
        saturated = int((g.floor >= cap).sum()) if counted and g.floor is not None and cap is not None else 0
        dead_fraction = dead_units / units if counted else math.nan
        dormant_units = dormant_scores = None
        tau = self._options.dormant_tau
        if tau is not None and g.abs_sum is not None and g.positions > 0:
            mean_abs = g.abs_sum / g.positions
            finite = mean_abs.isfinite()  # a NaN unit must not make every unit dormant: leave it out of the mean
            layer_mean = float(mean_abs[finite].mean()) if bool(finite.any()) else math.nan
            dormant_scores = (mean_abs / layer_mean if layer_mean > 0 else torch.zeros_like(mean_abs)).float()
            dormant_units = int((dormant_scores <= tau).sum())
        # Blame is decided once the cascades are known (`explain`): only roots and jumps get it.
        all_dead = counted and dead_units + saturated == units
        jumped = counted and self.diagnosis.jumped(name, dead_fraction)
        if counted and close:
            self.diagnosis.remember(name, dead_fraction)
        finite_passes = g.backwards - g.nonfinite_passes
        fed_by: Optional[str] = info["fed_by"]
        return LayerReport._from_fields(
            name=name,
            module=info["module_name"],
            call=info["call"],
            kind=info["kind"],
            units=units,
            unit_dim=info["unit_dim"],
            fed_by=fed_by,
            samples=g.samples,
            forwards=g.forwards,
            backward_passes=g.backwards,
            dead_units=dead_units,
            nonfinite_units=nonfinite_units if seen else 0,
            grad_norm=g.grad_norm_sum / finite_passes if finite_passes > 0 else math.nan,
            skipped_passes=g.nonfinite_passes,
            unmeasured_calls=g.unmeasured,
            # An alert is decided once per layer: a layer already alerted on needs no second confirmation.
            confirming=g.unmeasured > 0 and (all_dead or jumped) and name not in alerted,
            grad_through_norm=g.through_sum / g.through_passes if g.through_passes else math.nan,
            negative_regime=info["negative_regime"],
            dead_mask=dead_mask,
            revived_units=history.revived_units,
            revived_total=history.revived_total,
            permanently_dead_units=history.permanently_dead_units,
            first_dead_step=history.first_dead_step,
            dead_streak=history.dead_streak,
            dormant_units=dormant_units,
            dormant_scores=dormant_scores,
            recycled_total=history.recycled_total,
            recycled_checked=history.recycled_checked,
            recycled_dead_again=history.recycled_dead_again,
            blame="" if all_dead or jumped else None,  # a placeholder that `explain` fills in or clears
            saturated_units=saturated,
            cap=cap,
            counts_dead=bool(info["counts_dead"]),
            disabled=info.get("disabled"),
        )

    def _module_at(self, path: str) -> Optional[nn.Module]:
        """The model's submodule at ``path`` (found by path, so every rank finds it, whichever rank traced it)."""
        model = self._model_ref()
        if model is None:
            return None
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    def explain(
        self, layers: list[LayerReport], layouts: list[SiteLayout], gather_sharded: bool = True
    ) -> list[LayerReport]:
        """Dead cascades (``caused_by``, ``consequences``), blocked gradients (``blocked_by``) and blame for roots.

        Uses the upstream sites recorded once at discovery (see `relumon.cascade`); host-side, O(sites).
        """
        order = [x.name for x in layers]
        upstream = {x.name: x.info["upstream"] for x in layouts}
        from_input = {x.name: x.info["from_input"] for x in layouts}
        dead = {x.name for x in layers if x.all_dead_or_saturated}
        silent = {x.name for x in layers if x.carries_no_signal}
        zero_grad = {x.name for x in layers if x.backward_passes > 0 and x.grad_norm == 0}
        # Silence is known only where every call was measured: an upstream left unmeasured on some call may have fired
        # then. Dead sites below a silent one, and that one, are measured on every call while they last
        # (`cascade_sites`), so a cascade's consequences do not become roots (and alert) in sampled windows.
        known_silent = {x.name for x in layers if x.exact}
        root_of = find_roots(order, upstream, from_input, dead, silent, known_silent)
        blocked_by = find_blockers(order, upstream, dead, silent, zero_grad)
        consequences = consequences_of(order, root_of)
        # Blame every root that asks for it at once: one read of all their biases and weight-gradient norms.
        to_blame = [
            (i, Blamed(layer.name, layer.fed_by, module, layer.dead_mask))
            for i, layer in enumerate(layers)
            if layer.blame is not None
            and root_of.get(layer.name) is None
            and layer.fed_by
            and (module := self._module_at(layer.fed_by)) is not None
        ]
        grad_norms = self._recorder.weight_grads.norms([item.fed_by for _, item in to_blame])
        sentences = blame_many(
            [item._replace(weight_grad_norm=norm) for (_, item), norm in zip(to_blame, grad_norms)],
            gather_sharded=gather_sharded,
        )
        blamed_at = {i: sentence for (i, _), sentence in zip(to_blame, sentences)}
        explained = []
        for i, layer in enumerate(layers):
            caused_by = root_of.get(layer.name)
            blamed = blamed_at.get(i)
            follows = consequences.get(layer.name, ())
            blocker = blocked_by.get(layer.name)
            if caused_by is None and not follows and blocker is None and blamed is None and layer.blame is None:
                explained.append(layer)  # nothing to add: no copy (at thousands of sites, copies add up)
                continue
            explained.append(
                layer.replace(
                    caused_by=caused_by,
                    consequences=follows,
                    blocked_by=blocker,
                    blame=blamed,
                    # A consequence never alerts (its root does), so it is not worth measuring every call for.
                    confirming=layer.confirming and caused_by is None,
                )
            )
        return explained

    def certify(self, layers: list[LayerReport], certifier: Certifier, optimizers: list[Any]) -> list[LayerReport]:
        """``certify=True``: attach each site's certificates (`relumon.proof`), from the weights and optimizers now."""
        model = self._model_ref()
        if model is None:
            return layers
        certs = certifier.certify(model, [x.name for x in layers], optimizers or None)
        for x in layers:  # certificates index channels (dim 1): only where the report's units are the same
            if x.unit_dim != 1 and x.name in certs:
                certs[x.name] = Certification(x.name, why_not=f"its units are along dim {x.unit_dim}, not dim 1")
        return [x.replace(certified=certs.get(x.name)) for x in layers]

    def steps(self, layers: list[LayerReport], synced: bool) -> int:
        """The training steps of the open window (summed over ranks when ``synced``)."""
        # Under torch.distributed, steps add up over ranks, like samples and forwards. Compiled steps are counted by
        # `count_compiled_steps`; the forwards bound a window whose steps began elsewhere (another rank's only site).
        steps = self._recorder.clock.steps_seen - self.start
        if synced:
            steps = sum_over_ranks(steps)
        return max(steps, max((x.forwards for x in layers), default=0))

    # ------------------------------------------------------------------ closing the window

    def before_training(self, steps: int, synced: bool) -> bool:
        """Whether the open window has seen no step of a watched site: before any training, or a model whose watched
        modules never run (training happened: the idle warning says so). Under sync the summed ``steps`` decide
        alike on every rank."""
        clock = self._recorder.clock
        return steps == 0 and (synced or not (clock.training_seen or self.model_has_gradients()))

    def trained(self, steps: int) -> bool:
        """Whether training has happened: the window has steps, or the model was trained some other way."""
        return steps > 0 or self._recorder.clock.training_seen or self.model_has_gradients()

    def model_has_gradients(self) -> bool:
        """Whether any parameter of the model has a gradient: training happened, even through methods that neither
        call the model nor any watched module (a host-side check of ``.grad``, no device read)."""
        model = self._model_ref()
        return model is not None and any(p.grad is not None for p in model.parameters())

    def close(
        self,
        sites: Iterable[Site],
        layers: list[LayerReport],
        layouts: list[SiteLayout],
        step: int,
        also_confirm: set[str],
    ) -> None:
        """Start the next window: reset the sites' statistics, record the closed window's dead fractions at ``step``,
        and name the sites to measure on every call of the next window. A sampled window never alerts on its own: its
        suspects are measured on every call of the next one, as are dead cascades (`cascade_sites`) and
        ``also_confirm`` (recycling's candidates)."""
        recorder = self._recorder
        sites = list(sites)
        for site in sites:
            site.stats.reset()
        recorder.weight_grads.reset()
        self.start = recorder.clock.steps_seen
        self._compiled_counted = 0
        self.timeline.append((step, {x.name: x.dead_fraction for x in layers if x.samples > 0 and x.counts_dead}))
        recorder.confirming = {x.name for x in layers if x.confirming} | also_confirm | cascade_sites(layers, layouts)
        for site in sites:
            site.exact = site.name in recorder.confirming


def cascade_sites(layers: list[LayerReport], layouts: list[SiteLayout]) -> set[str]:
    """Dead sites whose nearest upstream site carried no signal, and those upstream sites: measured on every call of
    the next window, so that the cascade rule knows whether the upstream really stayed silent (a sampled upstream may
    fire on a call that is not measured, and then explains nothing). Costs kernels on dead cascades only."""
    upstream = {layout.name: layout.info.get("upstream") or () for layout in layouts}
    silent = {x.name for x in layers if x.carries_no_signal}
    sites: set[str] = set()
    for layer in layers:
        if not layer.all_dead_or_saturated:
            continue
        quiet = [u for u in upstream.get(layer.name, ()) if u in silent]
        if quiet:
            sites.add(layer.name)
            sites.update(quiet)
    return sites
