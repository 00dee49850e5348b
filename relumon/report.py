"""Reports: what one closed window found, per call site, in forward order."""

from __future__ import annotations

import html
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union, overload

import torch

from relumon.cause import Cause
from relumon.figures import grad_flow_figure
from relumon.proof import Certification

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LayerReport", "Report", "sanitize_tag", "dead_layer_message"]

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


def sanitize_tag(name: str) -> str:
    """Make ``name`` safe for a TensorBoard tag: characters outside ``[A-Za-z0-9_./-]`` become ``_``."""
    return _TAG_UNSAFE.sub("_", name) or "root"


@dataclass(frozen=True)
class LayerReport:
    """What one call site of a watched activation saw in one window.

    Attributes:
        name: the call site: the module path for its first call in a forward, then ``<path>.call2``, ``.call3``...
        module: the module path (``""`` for the root module).
        call: 0-based index of this call of the module within one forward.
        kind: the activation's class name, e.g. ``"ReLU"`` or ``"LeakyReLU"``.
        units: number of units (features or channels).
        unit_dim: the activation dimension that indexes units.
        fed_by: path of the module whose output fed this activation in the first training forward, if it was a
            module's output.
        samples: batch rows measured in the window (training forwards only).
        forwards: training forwards measured in the window (``unmeasured_calls`` counts the others).
        backward_passes: backward passes through this site in the window.
        dead_units: units whose output was ``<= 0`` for every measured sample and position: 0 for ReLU and ReLU6 (dead),
            negative for LeakyReLU, PReLU and RReLU (stuck in the negative regime). 0 when ``samples == 0`` or
            ``counts_dead`` is False.
        nonfinite_units: units that produced NaN in the window; they count neither as dead nor alive.
        grad_norm: mean over the window's backward passes of ``||dL/d(output)||_2``; NaN without a backward pass.
            Each forward contributes the first gradient that reaches its output, once: later passes through the
            same forward's graph (second-order steps, ``retain_graph`` re-runs) neither add nor count (eager mode;
            under ``torch.compile`` every pass counts).
        negative_regime: True for activations that pass negative values (LeakyReLU...), where "dead" means "stuck
            in the negative regime" and the units still pass ``alpha * gradient``.
        dead_mask: CPU bool tensor of shape ``(units,)``, True where the unit is dead.
        revived_units: units that were dead in the previous closed window and are alive in this one.
        revived_total: revivals since monitoring began (or since the checkpoint's run began).
        permanently_dead_units: units dead for ``permanent_after`` closed windows in a row: the textbook dead neuron.
        first_dead_step: CPU int64 per unit, the step of the window in which it was first seen dead; -1 if never.
        dead_streak: CPU int64 per unit, how many closed windows in a row it has been dead.
        dormant_units: with ``dormant_tau`` set, units whose tau-dormant score (mean ``|activation|`` over the
            layer's mean of the same, Sokar et al. 2023) is ``<= tau``; else None.
        dormant_scores: CPU float per unit, the scores themselves, with ``dormant_tau`` set.
        blame: for a layer that died or whose dead fraction jumped, facts about the module that fed it.
        grad_through_norm: with ``grad_through=True``, the mean over backward passes of the L2 norm of the gradient
            that flows through the activation to the layer below (``dL/d(pre-activation)``); else NaN.
        skipped_passes: under a ``GradScaler``, backward passes whose gradient norm was inf or NaN (overflow steps,
            which the scaler skips); they are left out of ``grad_norm`` (and counted in ``backward_passes``).
        unmeasured_calls: training calls of this site in the window that the sampling schedule did not measure;
            0 means the figures are exact (`exact`).
        confirming: the window was sampled and found every unit dead, or a jump in the dead fraction, in a layer not
            alerted on yet; relumon measures this site on every call of the next window and alerts only if that
            exact window agrees.
        saturated_units: for a capped activation (ReLU6), units whose output was the cap for every sample and
            position: like dead units they pass no gradient. 0 for activations without a cap.
        cap: the activation's cap (6.0 for ReLU6), or None.
        counts_dead: False for activations outside the ReLU family (Tanh, Sigmoid...), which get gradient flow only:
            their ``dead_units`` and ``saturated_units`` are 0 and ``dead_fraction`` is NaN.
        caused_by: for a layer whose every unit was dead or saturated because an upstream death left it no signal,
            the name of the cascade's **root** (the first dead site no upstream death explains); None for roots and
            for live layers. See `relumon.cascade` for the rule.
        consequences: for a root, the names of the dead sites it explains, in forward order.
        blocked_by: for a layer whose output gradient was exactly 0, the dead (or saturated) layer downstream that
            passes no gradient back to it, where one explains it; else None.
        disabled: None, or why relumon stopped measuring this site: an unexpected error inside its hooks (e.g.
            ``"RuntimeError: ..."``), contained so that training goes on. Its figures cover the time before.
        cause: for a layer that alerts (the root of a dead cascade) or whose dead fraction jumps, the
            [`Cause`][relumon.cause.Cause]: the learning rate, the largest update of the module that fed it, how far
            the dead units' biases moved, and advice built from those facts; else None.
        recycled_units: units re-initialised right after this window closed (``recycle=`` or
            [`Monitor.recycle`][relumon.Monitor.recycle]); None when no recycling followed this window.
        recycled_total: units of this site recycled since monitoring began (this window's included).
        recycled_checked: units recycled after the previous window, seen for the first time in this one.
        recycled_dead_again: of those, the units dead again in this window (ReDo's "share of reset units dead
            again" is `dead_again_fraction`).
        certified: with ``certify=True``, the [`Certification`][relumon.proof.Certification] of this site: the units
            *proven* dead for every input and every later step, each with its proof (``certified.units``), the units
            whose closing inequality holds but whose permanence could not be proven, with the reason
            (``certified.refused``), and why no proof applies at all (``certified.why_not``); None without
            ``certify``. Units only counted dead (``dead_units``) looked dead on the window's samples; certified
            units are dead for every input.
    """

    name: str
    module: str
    call: int
    kind: str
    units: int
    unit_dim: int
    fed_by: Optional[str]
    samples: int
    forwards: int
    backward_passes: int
    dead_units: int
    nonfinite_units: int
    grad_norm: float
    negative_regime: bool
    dead_mask: torch.Tensor = field(repr=False, compare=False)
    revived_units: int = 0
    revived_total: int = 0
    permanently_dead_units: int = 0
    first_dead_step: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    dead_streak: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    dormant_units: Optional[int] = None
    dormant_scores: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    blame: Optional[str] = None
    grad_through_norm: float = math.nan
    skipped_passes: int = 0
    unmeasured_calls: int = 0
    confirming: bool = False

    saturated_units: int = 0
    cap: Optional[float] = None
    counts_dead: bool = True
    caused_by: Optional[str] = None
    consequences: tuple[str, ...] = ()
    blocked_by: Optional[str] = None
    disabled: Optional[str] = None
    cause: Optional[Cause] = field(default=None, compare=False)
    recycled_units: Optional[int] = None
    recycled_total: int = 0
    recycled_checked: int = 0
    recycled_dead_again: int = 0
    certified: Optional[Certification] = field(default=None, compare=False)

    @property
    def certified_units(self) -> Optional[int]:
        """How many units are proven dead (``len(certified)``), or None without ``certify=True``."""
        return None if self.certified is None else len(self.certified)

    @property
    def dead_again_fraction(self) -> float:
        """Share of the units recycled after the previous window that are dead again in this one; NaN if none."""
        return self.recycled_dead_again / self.recycled_checked if self.recycled_checked else math.nan

    @classmethod
    def _from_fields(cls, **values: Any) -> LayerReport:
        """``LayerReport(**values)``, the same object, without the frozen dataclass's ``__init__`` (one
        ``object.__setattr__`` per field): report time builds one per call site. Unknown and missing fields raise the
        ``TypeError`` that ``__init__`` raises."""
        unknown, missing = values.keys() - _REPORT_FIELDS, _REQUIRED_REPORT_FIELDS - values.keys()
        if unknown or missing:
            return cls(**values)  # raises the dataclass's own TypeError
        report = object.__new__(cls)
        report.__dict__.update(_REPORT_DEFAULTS, **values)
        return report

    def replace(self, **changes: Any) -> LayerReport:
        """A copy with ``changes``, as ``dataclasses.replace`` makes, without running ``__init__`` again: a report adds
        its cascades, blame and cause to each site's figures as it builds them, at thousands of sites, and a frozen
        dataclass's ``__init__`` sets its forty fields one ``object.__setattr__`` at a time."""
        unknown = changes.keys() - self.__dataclass_fields__.keys()
        if unknown:
            raise TypeError(f"LayerReport has no field {', '.join(sorted(unknown))}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    @property
    def exact(self) -> bool:
        """True when every training call of the window was measured: the figures are exact, not sampled."""
        return self.unmeasured_calls == 0

    @property
    def dead_fraction(self) -> float:
        """``dead_units / units``; NaN when the window saw no sample of this site, or it does not count dead units."""
        if self.samples == 0 or not self.counts_dead:
            return math.nan
        return self.dead_units / self.units

    @property
    def dormant_fraction(self) -> float:
        """``dormant_units / units``; NaN without ``dormant_tau`` or samples."""
        if self.dormant_units is None or self.samples == 0:
            return math.nan
        return self.dormant_units / self.units

    @property
    def all_dead(self) -> bool:
        """True when the window saw samples and every unit was dead."""
        return self.samples > 0 and self.counts_dead and self.dead_units == self.units

    @property
    def all_dead_or_saturated(self) -> bool:
        """True when the window saw samples and every unit was dead (or stuck negative) or saturated at its cap."""
        return self.samples > 0 and self.counts_dead and self.dead_units + self.saturated_units == self.units

    @property
    def carries_no_signal(self) -> bool:
        """Every unit output a constant (0, or the cap) for the whole window: nothing passes forward or back.

        A layer stuck in the negative regime still passes a (scaled) signal, so it is not silent.
        """
        return self.all_dead_or_saturated and not self.negative_regime

    @property
    def is_root(self) -> bool:
        """Every unit dead or saturated, and no upstream death explains it: the root of a (possibly 1-site) cascade."""
        return self.all_dead_or_saturated and self.caused_by is None

    @property
    def dead_indices(self) -> list[int]:
        """Indices of the dead units along ``unit_dim``."""
        return self.dead_mask.nonzero().flatten().tolist()

    @property
    def tag(self) -> str:
        """``name`` made safe for TensorBoard tags."""
        return sanitize_tag(self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (strict JSON: NaN becomes None), without the tensors but with the dead indices."""
        return {
            "name": self.name,
            "module": self.module,
            "call": self.call,
            "kind": self.kind,
            "units": self.units,
            "unit_dim": self.unit_dim,
            "fed_by": self.fed_by,
            "samples": self.samples,
            "forwards": self.forwards,
            "backward_passes": self.backward_passes,
            "counts_dead": self.counts_dead,
            "dead_units": self.dead_units if self.counts_dead else None,
            "dead_fraction": _nan_to_none(self.dead_fraction),
            "saturated_units": self.saturated_units if self.counts_dead else None,
            "nonfinite_units": self.nonfinite_units,
            "grad_norm": _nan_to_none(self.grad_norm),
            "grad_through_norm": _nan_to_none(self.grad_through_norm),
            "negative_regime": self.negative_regime,
            "dead_indices": self.dead_indices,
            "revived_units": self.revived_units,
            "revived_total": self.revived_total,
            "permanently_dead_units": self.permanently_dead_units,
            "dormant_units": self.dormant_units,
            "dormant_fraction": _nan_to_none(self.dormant_fraction),
            "blame": self.blame,
            "skipped_passes": self.skipped_passes,
            "unmeasured_calls": self.unmeasured_calls,
            "exact": self.exact,
            "confirming": self.confirming,
            "caused_by": self.caused_by,
            "consequences": list(self.consequences),
            "blocked_by": self.blocked_by,
            "disabled": self.disabled,
            "cause": self.cause.to_dict() if self.cause is not None else None,
            "recycled_units": self.recycled_units,
            "recycled_total": self.recycled_total,
            "recycled_checked": self.recycled_checked,
            "recycled_dead_again": self.recycled_dead_again,
            "certified_units": self.certified_units,
            "certified": self.certified.to_dict() if self.certified is not None else None,
        }

    def _repr_html_(self) -> str:
        """Jupyter's view: the layer's facts as a two-column table, highlighted like its row in the report."""
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(label)}</th><td style='text-align:left'>"
            f"{html.escape(value(self))}</td></tr>"
            for label, value in _HTML_FACTS
            if value(self)
        )
        style = _row_style(self)
        title = f"{html.escape(self.name)} ({html.escape(self.kind)})"
        return f"<table><caption style='{style}'>relumon: call site {title}</caption>{rows}</table>"


#: Every field of `LayerReport`, the defaults of those that have one, and those that must be given.
_REPORT_FIELDS = frozenset(f.name for f in fields(LayerReport))
_REPORT_DEFAULTS = {f.name: f.default for f in fields(LayerReport) if f.default is not MISSING}
_REQUIRED_REPORT_FIELDS = _REPORT_FIELDS - _REPORT_DEFAULTS.keys()


class Report:
    """The layers of one closed window, in forward order.

    Iterable over [`LayerReport`][relumon.LayerReport], indexable by position or by name (``report["features.3"]``),
    and printable as a table.

    Attributes:
        window: 0-based index of the window this report closed.
        steps: training steps (with at least one counted forward) in the window, measured or not.
        layers: the per-call-site reports, in the order the sites were first called.
        recycled: the [`RecycleResult`][relumon.recycle.RecycleResult] of the recycling that followed this window
            (``recycle=``), or None.
    """

    def __init__(self, layers: list[LayerReport], window: int, steps: int = 0, recycled: Optional[Any] = None) -> None:
        self.layers: tuple[LayerReport, ...] = tuple(layers)
        self.window = window
        self.steps = steps
        self.recycled = recycled
        self._by_name = {layer.name: layer for layer in self.layers}

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @overload
    def __getitem__(self, key: int) -> LayerReport: ...
    @overload
    def __getitem__(self, key: str) -> LayerReport: ...
    def __getitem__(self, key: Union[int, str]) -> LayerReport:
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"no watched call site named {key!r}; sites: {list(self._by_name)}") from None
        return self.layers[key]

    @property
    def names(self) -> list[str]:
        """Call-site names in forward order."""
        return [layer.name for layer in self.layers]

    @property
    def dead_layers(self) -> list[LayerReport]:
        """Layers whose every unit was dead (or stuck negative, or saturated at its cap) in this window."""
        return [layer for layer in self.layers if layer.all_dead_or_saturated]

    @property
    def roots(self) -> list[LayerReport]:
        """Dead layers that no upstream death explains: one per dead cascade, each with its ``consequences``."""
        return [layer for layer in self.layers if layer.is_root]

    @property
    def samples(self) -> int:
        """The largest sample count of any site: the window's samples as the first layer saw them."""
        return max((layer.samples for layer in self.layers), default=0)

    @property
    def dead_fraction(self) -> float:
        """Dead units over all units of the sites that saw samples and count dead units; NaN if none did."""
        seen = [layer for layer in self.layers if layer.samples > 0 and layer.counts_dead]
        units = sum(layer.units for layer in seen)
        return sum(layer.dead_units for layer in seen) / units if units else math.nan

    def scalars(self, prefix: str = "relumon") -> dict[str, float]:
        """Scalar values keyed by TensorBoard tag.

        Per site that counts dead units: ``<prefix>/dead_fraction/<name>``, ``<prefix>/dead_units/<name>``,
        ``<prefix>/revived/<name>``, ``<prefix>/permanently_dead/<name>``, ``<prefix>/root_death/<name>`` (1 when every
        unit was dead or saturated and no upstream death explains it, else 0), ``<prefix>/consequence/<name>`` (1
        when an upstream death explains it) and, for a capped activation (ReLU6), ``<prefix>/saturated_units/<name>``.
        Per site, when a backward pass ran: ``<prefix>/grad_norm/<name>`` and ``<prefix>/blocked/<name>`` (1 when a
        dead layer downstream blocked its gradient). ``<prefix>/grad_through_norm/<name>`` with ``grad_through``;
        ``<prefix>/nonfinite_units/<name>`` when non-zero; ``<prefix>/dormant_fraction/<name>`` with ``dormant_tau``.
        With ``certify=True``: ``<prefix>/certified_units/<name>`` (units proven dead). With recycling:
        ``<prefix>/recycled/<name>`` (units re-initialised after this window) and
        ``<prefix>/recycled_dead_again/<name>`` (the share of the last recycled units dead again, when there were).
        Over the window: ``<prefix>/summary/dead_fraction`` over all counted units, ``<prefix>/summary/root_deaths``
        and ``<prefix>/summary/consequence_deaths``. Sites that saw no sample in the window are left out, so no NaN
        is ever logged; activations outside the ReLU family (``counts_dead`` False) get the gradient scalars only.
        """
        out: dict[str, float] = {}
        for layer in self.layers:
            if layer.samples == 0:
                continue
            if layer.counts_dead:
                out[f"{prefix}/dead_fraction/{layer.tag}"] = layer.dead_fraction
                out[f"{prefix}/dead_units/{layer.tag}"] = float(layer.dead_units)
                if layer.cap is not None:
                    out[f"{prefix}/saturated_units/{layer.tag}"] = float(layer.saturated_units)
            if layer.backward_passes > 0 and math.isfinite(layer.grad_norm):
                out[f"{prefix}/grad_norm/{layer.tag}"] = layer.grad_norm
                out[f"{prefix}/blocked/{layer.tag}"] = float(layer.blocked_by is not None)
            if math.isfinite(layer.grad_through_norm):
                out[f"{prefix}/grad_through_norm/{layer.tag}"] = layer.grad_through_norm
            if layer.nonfinite_units:
                out[f"{prefix}/nonfinite_units/{layer.tag}"] = float(layer.nonfinite_units)
            if layer.counts_dead:
                out[f"{prefix}/revived/{layer.tag}"] = float(layer.revived_units)
                out[f"{prefix}/permanently_dead/{layer.tag}"] = float(layer.permanently_dead_units)
                out[f"{prefix}/root_death/{layer.tag}"] = float(layer.is_root)
                out[f"{prefix}/consequence/{layer.tag}"] = float(layer.caused_by is not None)
            if layer.dormant_units is not None:
                out[f"{prefix}/dormant_fraction/{layer.tag}"] = layer.dormant_fraction
            if layer.recycled_units is not None:
                out[f"{prefix}/recycled/{layer.tag}"] = float(layer.recycled_units)
            if layer.recycled_checked:
                out[f"{prefix}/recycled_dead_again/{layer.tag}"] = layer.dead_again_fraction
            if layer.certified is not None and layer.counts_dead:
                out[f"{prefix}/certified_units/{layer.tag}"] = float(len(layer.certified))
        if out:
            if any(layer.samples > 0 and layer.counts_dead for layer in self.layers):
                out[f"{prefix}/summary/dead_fraction"] = self.dead_fraction
            roots = self.roots
            out[f"{prefix}/summary/root_deaths"] = float(len(roots))
            out[f"{prefix}/summary/consequence_deaths"] = float(sum(len(r.consequences) for r in roots))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {"window": self.window, "steps": self.steps, "layers": [layer.to_dict() for layer in self.layers]}

    def plot(self) -> Figure:
        """The gradient-flow chart of this window ([`grad_flow_figure`][relumon.figures.grad_flow_figure]).

        A notebook cell ending in ``report.plot()`` shows it inline, with or without pyplot. Needs matplotlib (the
        ``notebook`` or ``tensorboard`` extra).
        """
        return grad_flow_figure(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: the table of ``str(report)``, with dead and mostly dead layers highlighted."""
        columns = [c for c in _HTML_COLUMNS if c.shown(self)]
        head = "".join(
            f"<th title='{html.escape(c.help)}' style='text-align:{c.align}'>{html.escape(c.header)}</th>"
            for c in columns
        )
        body = "".join(
            f"<tr class='{' '.join(_row_classes(layer))}' style='{_row_style(layer)}'>"
            + "".join(f"<td style='text-align:{c.align}'>{html.escape(c.cell(layer))}</td>" for c in columns)
            + "</tr>"
            for layer in self.layers
        )
        notes = self._footnotes()
        legend = " ".join(
            f"<span style='{style};padding:0 4px'>{html.escape(state)}</span>"
            for state, style in _STATE_STYLES.items()
            if any(state in _row_classes(layer) for layer in self.layers)
        )
        foot = "<br>".join(html.escape(note) for note in notes) + (f"<br>{legend}" if legend else "")
        return (
            f"<table class='relumon-report'><caption style='text-align:left'>{html.escape(self._title())}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p style='font-size:smaller'>{foot}</p>"
        )

    def _title(self) -> str:
        # A site being confirmed is measured on every call: the sampled sites tell how many steps were measured.
        sampled = [layer.forwards for layer in self.layers if layer.unmeasured_calls > 0]
        measured = f", {max(sampled)} measured" if sampled else ""
        return (
            f"relumon report, window {self.window} (0-based): {_plural(len(self), 'call site')}, "
            f"{_plural(self.steps, 'step')}{measured}"
        )

    def __repr__(self) -> str:
        return f"Report(window={self.window}, layers={len(self)}, dead_layers={[x.name for x in self.dead_layers]})"

    def __str__(self) -> str:
        show_nan = any(layer.nonfinite_units for layer in self.layers)
        show_sat = any(layer.cap is not None for layer in self.layers)
        show_dormant = _shows_dormant(self)
        show_through = _shows_grad_through(self)
        show_recycled = any(layer.recycled_units is not None for layer in self.layers)
        show_proven = _shows_proven(self)
        notes = [_note(layer) for layer in self.layers]
        header: tuple[str, ...] = ("layer", "kind", "units", "samples", "dead", "dead %")
        header += ("proven",) if show_proven else ()
        header += ("saturated",) if show_sat else ()
        header += ("dormant",) if show_dormant else ()
        header += ("grad norm",) + (("grad through",) if show_through else ()) + ("fed by",)
        header += (("NaN units",) if show_nan else ()) + (("recycled",) if show_recycled else ())
        header += ("note",) if any(notes) else ()
        rows = []
        for layer, note in zip(self.layers, notes):
            counted = layer.counts_dead and layer.samples > 0
            mark = ("?" if layer.confirming else "*") if layer.all_dead_or_saturated else ""
            dead = (f"{layer.dead_units}{mark}" if counted else "-") + ("!" if layer.disabled else "")
            frac = f"{100 * layer.dead_fraction:.1f}%" if counted else "-"
            grad = "-" if layer.backward_passes == 0 or math.isnan(layer.grad_norm) else f"{layer.grad_norm:.3e}"
            kind = _kind_cell(layer)
            row: tuple[str, ...] = (layer.name, kind, str(layer.units), str(layer.samples), dead, frac)
            row += (_proven_cell(layer),) if show_proven else ()
            if show_sat:
                row += (str(layer.saturated_units) if counted and layer.cap is not None else "-",)
            if show_dormant:
                row += (_dormant_cell(layer),)
            row += (grad,) + ((_norm(layer.grad_through_norm),) if show_through else ()) + (layer.fed_by or "-",)
            row += (str(layer.nonfinite_units),) if show_nan else ()
            row += (_recycled_cell(layer),) if show_recycled else ()
            rows.append(row + ((note,) if any(notes) else ()))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {i for i, h in enumerate(header) if h not in ("layer", "kind", "fed by", "note", "recycled")}

        def fmt(row: tuple[str, ...]) -> str:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        lines = [self._title(), fmt(header)]
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(r) for r in rows)
        lines.extend(self._footnotes())
        return "\n".join(lines)

    def _footnotes(self) -> list[str]:
        """The notes under the table, the same in the text and the HTML view."""
        notes = []
        if any(layer.all_dead_or_saturated and not layer.confirming for layer in self.layers):
            notes.append("* every unit dead (or stuck negative, or saturated) in this window")
        if any(layer.all_dead_or_saturated and layer.confirming for layer in self.layers):
            notes.append(
                "? every measured unit dead in a sampled window: relumon measures every call of the next window to "
                "confirm before alerting"
            )
        if any(layer.negative_regime and layer.counts_dead for layer in self.layers):
            notes.append(_NEGATIVE_REGIME_NOTE)
        for layer in self.layers:
            if layer.disabled is not None:
                notes.append(f"! `{layer.name}` disabled after an error inside relumon: {layer.disabled}")
        notes.append(_GRAD_NORM_NOTE)
        if _shows_grad_through(self):
            notes.append(_GRAD_THROUGH_NOTE)
        if _shows_dormant(self):
            notes.append(_DORMANT_NOTE)
        if _shows_proven(self):
            notes.append(_PROVEN_NOTE)
        return notes


#: Under every table: what "grad norm" is.
_GRAD_NORM_NOTE = (
    "grad norm: mean L2 norm of dL/d(output) over the whole batch tensor (it scales with the batch size and the "
    "loss reduction)"
)


#: Under tables with a LeakyReLU-like row: what "dead" means for it.
_NEGATIVE_REGIME_NOTE = (
    "(neg.) negative regime: dead counts units stuck below 0 for every measured sample; they still pass alpha * "
    "gradient"
)
#: Under tables with ``grad_through=True``.
_GRAD_THROUGH_NOTE = (
    "grad through: mean L2 norm of dL/d(pre-activation), the gradient that flows through the activation to the "
    "layer below"
)
#: Under tables with ``dormant_tau`` set.
_DORMANT_NOTE = "dormant: units whose mean |activation| over the layer's mean is <= dormant_tau (Sokar et al., 2023)"


#: Under tables with ``certify=True``.
_PROVEN_NOTE = (
    "proven: units certified dead for every input and every later step (certify=True; see LayerReport.certified); "
    "other dead units only looked dead on the window's samples"
)


def _shows_proven(report: Report) -> bool:
    return any(layer.certified is not None for layer in report.layers)


def _proven_cell(layer: LayerReport) -> str:
    return "-" if layer.certified is None or not layer.counts_dead else str(len(layer.certified))


def _shows_dormant(report: Report) -> bool:
    return any(layer.dormant_units is not None for layer in report.layers)


def _shows_grad_through(report: Report) -> bool:
    return any(not math.isnan(layer.grad_through_norm) for layer in report.layers)


def _kind_cell(layer: LayerReport) -> str:
    return f"{layer.kind} (neg.)" if layer.negative_regime and layer.counts_dead else layer.kind


def _dormant_cell(layer: LayerReport) -> str:
    return "-" if layer.dormant_units is None else str(layer.dormant_units)


@dataclass(frozen=True)
class _Column:
    """One column of the HTML table: its header, the hover help, the cell text and when the column is shown."""

    header: str
    help: str
    cell: Callable[[LayerReport], str]
    align: str = "right"
    shown: Callable[[Report], bool] = lambda report: True


def _dead_cell(x: LayerReport) -> str:
    if not (x.counts_dead and x.samples > 0):
        return "-"
    mark = ("?" if x.confirming else "*") if x.all_dead_or_saturated else ""
    return f"{x.dead_units} of {x.units}{mark}"


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f} %"


def _norm(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3e}"


# The columns of str(report), in its order. Adding a column is one line here.
_HTML_COLUMNS: tuple[_Column, ...] = (
    _Column("layer", "the call site", lambda x: x.name, "left"),
    _Column("kind", "the activation class; (neg.): dead means stuck in the negative regime", _kind_cell, "left"),
    _Column("units", "features or channels", lambda x: str(x.units)),
    _Column("samples", "batch rows measured in the window", lambda x: str(x.samples)),
    _Column("dead", "units with output <= 0 for every measured sample", _dead_cell),
    _Column("dead %", "dead units over units", lambda x: _percent(x.dead_fraction)),
    _Column("proven", _PROVEN_NOTE, _proven_cell, shown=_shows_proven),
    _Column(
        "saturated",
        "units at the cap (6 for ReLU6) for every measured sample: like dead units they pass no gradient",
        lambda x: str(x.saturated_units) if x.counts_dead and x.samples > 0 and x.cap is not None else "-",
        shown=lambda report: any(layer.cap is not None for layer in report),
    ),
    _Column("dormant", _DORMANT_NOTE, _dormant_cell, shown=_shows_dormant),
    _Column("grad norm", _GRAD_NORM_NOTE, lambda x: "-" if x.backward_passes == 0 else _norm(x.grad_norm)),
    _Column("grad through", _GRAD_THROUGH_NOTE, lambda x: _norm(x.grad_through_norm), shown=_shows_grad_through),
    _Column("fed by", "the module whose output fed the activation", lambda x: x.fed_by or "-", "left"),
    _Column(
        "NaN units",
        "units that produced NaN in the window",
        lambda x: str(x.nonfinite_units),
        shown=lambda report: any(layer.nonfinite_units for layer in report),
    ),
    _Column(
        "recycled",
        "units re-initialised right after this window (recycle=), and how many of the last recycled died again",
        lambda x: _recycled_cell(x),
        "left",
        shown=lambda report: any(layer.recycled_units is not None for layer in report),
    ),
    _Column(
        "note",
        "a dead layer's place in its cascade (root or caused by), or the dead layer that blocks a zero gradient",
        lambda x: _note(x),
        "left",
        shown=lambda report: any(_note(layer) for layer in report),
    ),
)

# Row states, highlighted in the HTML table: a CSS class and its inline style. Adding a state is one line in each.
_ROW_STATES: tuple[tuple[str, Callable[[LayerReport], bool]], ...] = (
    ("dead", lambda x: x.all_dead_or_saturated and not x.negative_regime and x.caused_by is None),
    ("negative regime", lambda x: x.all_dead and x.negative_regime),
    ("consequence", lambda x: x.caused_by is not None),
    ("half or more dead", lambda x: x.samples > 0 and not x.all_dead and x.dead_fraction >= 0.5),
    ("no samples", lambda x: x.samples == 0),
    ("disabled", lambda x: x.disabled is not None),
)
_STATE_STYLES: dict[str, str] = {
    "dead": "background-color:#f4c7c9",
    "negative regime": "background-color:#ddd5ec",
    "consequence": "background-color:#fbe7e8",
    "half or more dead": "background-color:#f8dcc6",
    "no samples": "color:#888888",
    "disabled": "font-style:italic",
}

# The facts of LayerReport._repr_html_: a label and the value's text ("" leaves the row out).
_HTML_FACTS: tuple[tuple[str, Callable[[LayerReport], str]], ...] = (
    ("state", lambda x: ", ".join(_row_classes(x)) or "alive"),
    ("units", lambda x: f"{x.units} (dim {x.unit_dim})"),
    ("samples", lambda x: f"{x.samples} over {x.forwards} measured forwards, {x.backward_passes} backward passes"),
    ("dead", lambda x: f"{x.dead_units} of {x.units} ({_percent(x.dead_fraction)})"),
    ("dead units", lambda x: _indices(x.dead_indices)),
    ("proven dead", lambda x: _certified_fact(x)),
    (
        "negative regime",
        lambda x: "yes: dead means stuck negative; alpha * gradient still flows" if x.negative_regime else "",
    ),
    ("grad norm", lambda x: f"{_norm(x.grad_norm)} (L2 over the whole batch tensor)"),
    ("grad through", lambda x: "" if math.isnan(x.grad_through_norm) else _norm(x.grad_through_norm)),
    ("NaN units", lambda x: str(x.nonfinite_units) if x.nonfinite_units else ""),
    ("revived", lambda x: f"{x.revived_units} this window, {x.revived_total} in all"),
    ("permanently dead", lambda x: str(x.permanently_dead_units)),
    ("dormant", lambda x: "" if x.dormant_units is None else f"{x.dormant_units} ({_percent(x.dormant_fraction)})"),
    ("saturated", lambda x: f"{x.saturated_units} of {x.units} at {x.cap:g}" if x.cap is not None else ""),
    ("caused by", lambda x: f"the death of `{x.caused_by}` upstream" if x.caused_by else ""),
    ("consequences", lambda x: ", ".join(x.consequences)),
    ("blocked by", lambda x: f"`{x.blocked_by}`" if x.blocked_by else ""),
    ("fed by", lambda x: x.fed_by or ""),
    ("blame", lambda x: x.blame or ""),
    ("cause", lambda x: x.cause.advice if x.cause is not None else ""),
    ("disabled", lambda x: f"after an error inside relumon: {x.disabled}" if x.disabled else ""),
    (
        "recycled",
        lambda x: (
            ""
            if x.recycled_units is None and not x.recycled_total
            else f"{_recycled_cell(x)}, {x.recycled_total} in all"
        ),
    ),
)


def _certified_fact(layer: LayerReport) -> str:
    """The certificates of a layer in words: how many units, which proofs, or why none applies."""
    cert = layer.certified
    if cert is None:
        return ""
    if cert.why_not is not None and not cert.units:
        return f"none: {cert.why_not}"
    kinds: dict[str, int] = {}
    for proof in cert.units.values():
        kinds[proof.kind] = kinds.get(proof.kind, 0) + 1
    text = f"{len(cert.units)} ({', '.join(f'{n} by {k}' for k, n in kinds.items()) or 'none'}): "
    text += _indices(cert.indices) if cert.units else "-"
    if cert.refused:
        text += f"; {len(cert.refused)} refused (e.g. unit {min(cert.refused)}: {cert.refused[min(cert.refused)]})"
    return text


def _recycled_cell(layer: LayerReport) -> str:
    """The table's recycled cell: units recycled after this window, and the last recycled ones dead again."""
    text = "-" if layer.recycled_units is None else str(layer.recycled_units)
    if layer.recycled_checked:
        text += f" ({layer.recycled_dead_again} of {layer.recycled_checked} dead again)"
    return text


def _indices(indices: list[int], limit: int = 32) -> str:
    text = ", ".join(str(i) for i in indices[:limit])
    return text + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def _row_classes(layer: LayerReport) -> list[str]:
    return [state for state, applies in _ROW_STATES if applies(layer)]


def _row_style(layer: LayerReport) -> str:
    return ";".join(_STATE_STYLES[state] for state in _row_classes(layer))


def _note(layer: LayerReport) -> str:
    """The table's note on a layer: its place in a dead cascade, or what blocks its gradient."""
    notes = []
    if layer.caused_by is not None:
        notes.append(f"caused by `{layer.caused_by}`")
    elif layer.consequences:
        notes.append(f"root: {len(layer.consequences)} downstream dead")
    if layer.blocked_by is not None and layer.caused_by is None:
        notes.append(f"blocked by `{layer.blocked_by}`")
    return "; ".join(notes)


def _nan_to_none(x: float) -> Optional[float]:
    """NaN as None, for strict JSON."""
    return None if math.isnan(x) else x


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def dead_layer_message(
    layer: LayerReport,
    steps: Optional[int] = None,
    optimizer_steps: Optional[int] = None,
    *,
    window: Optional[int] = None,
    step: Optional[int] = None,
) -> str:
    """The alert text for a layer whose every unit died (or saturated): names the layer, the window, what to try and
    the call sites downstream that died with it.

    Args:
        layer: the layer's report (a root, see [`LayerReport.caused_by`][relumon.LayerReport]).
        steps: training steps in the window; defaults to the calls of the layer in the window (measured or not).
        optimizer_steps: optimizer steps in the window, when they differ from training steps (gradient
            accumulation in Lightning, where a training step is a micro-batch).
        window: the window's number (0-based), named in the message when given.
        step: the step at which the window closed, named in the message when given.
    """
    steps = steps or (layer.forwards + layer.unmeasured_calls)
    cap = f"{layer.cap:g}" if layer.cap is not None else ""
    if layer.negative_regime:
        what = "stuck in the negative regime"
    elif layer.saturated_units == layer.units:
        what = f"saturated at {cap} (output {cap} everywhere)"
    elif layer.saturated_units:
        what = f"dead (output 0) or saturated at {cap} ({layer.dead_units} dead, {layer.saturated_units} saturated)"
    else:
        what = "dead (output 0)"
    measured = f", {layer.forwards} of them measured" if layer.forwards < steps else ""
    window_index = window
    if optimizer_steps and optimizer_steps != steps:
        span = (
            f"{layer.samples} samples over {_plural(optimizer_steps, 'optimizer step')}: "
            f"{_plural(steps, 'micro-batch')}{measured}"
        ).replace("micro-batchs", "micro-batches")
    else:
        span = f"{layer.samples} samples over {_plural(steps, 'step')}{measured}"
    feeder = f"`{layer.fed_by}`" if layer.fed_by else "the layer feeding it"
    if layer.negative_regime:
        why = (
            f"Its units still pass alpha*gradient, but the layer carries no positive signal. "
            f"Try a lower learning rate, or the init or bias of {feeder}."
        )
    elif layer.saturated_units:
        why = (
            f"Saturated {layer.kind} units pass no gradient, like dead ones, so the weights feeding them stop "
            f"learning. Try a lower learning rate, or the init, bias or normalisation of {feeder}."
        )
    else:
        why = (
            f"Dead ReLU units get no gradient, so the weights feeding them stop learning. "
            f"Try a lower learning rate, LeakyReLU, or the init or bias of {feeder}."
        )
    which = "the last window" if window_index is None else f"window {window_index} (0-based)"
    ended = "" if step is None else f", which closed at step {step}"
    message = (
        f"relumon: all {layer.units} units of `{layer.name}` ({layer.kind}) were {what} for {which}{ended} "
        f"({span}). {why}"
    )
    if layer.certified is not None:
        proven = len(layer.certified)
        message += (
            f" Proven dead for every input: {proven} of {layer.units} units (certificates);"
            f" the other {layer.units - proven} only looked dead on the window's samples."
            if proven
            else " None of its units is proven dead for every input: they looked dead on the window's samples."
        )
    if layer.blame:
        message += f" Blame: {layer.blame}."
    if layer.cause is not None:
        message += f" Cause (step {layer.cause.step}): {layer.cause.advice}"
    if layer.consequences:
        n = len(layer.consequences)
        shown = ", ".join(f"`{name}`" for name in layer.consequences[:3])
        more = f" and {n - 3} more" if n > 3 else ""
        message += f" {n} call site{'s' if n != 1 else ''} downstream died with it, left without signal: {shown}{more}."
    return message
