"""Reports: what one closed window found, per call site, in forward order."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union, overload

import torch

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
        samples: batch rows seen in the window (training forwards only).
        forwards: training forwards seen in the window.
        backward_passes: backward passes through this site in the window.
        dead_units: units whose output was ``<= 0`` for every sample and position: 0 for ReLU (dead), negative
            for LeakyReLU (stuck in the negative regime). 0 when ``samples == 0``.
        nonfinite_units: units that produced NaN in the window; they count neither as dead nor alive.
        grad_norm: mean over the window's backward passes of ``||dL/d(output)||_2``; NaN without a backward pass.
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
        disabled: None, or why relumon stopped measuring this site: an unexpected error inside its hooks (e.g.
            ``"RuntimeError: ..."``), contained so that training goes on. Its figures cover the time before.
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
    disabled: Optional[str] = None

    @property
    def dead_fraction(self) -> float:
        """``dead_units / units``; NaN when the window saw no sample of this site."""
        if self.samples == 0:
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
        return self.samples > 0 and self.dead_units == self.units

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
            "dead_units": self.dead_units,
            "dead_fraction": _nan_to_none(self.dead_fraction),
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
            "disabled": self.disabled,
        }


class Report:
    """The layers of one closed window, in forward order.

    Iterable over [`LayerReport`][relumon.LayerReport], indexable by position or by name (``report["features.3"]``),
    and printable as a table.

    Attributes:
        window: 0-based index of the window this report closed.
        steps: training steps (with at least one counted forward) in the window, measured or not.
        layers: the per-call-site reports, in the order the sites were first called.
    """

    def __init__(self, layers: list[LayerReport], window: int, steps: int = 0) -> None:
        self.layers: tuple[LayerReport, ...] = tuple(layers)
        self.window = window
        self.steps = steps
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
        """Layers whose every unit was dead in this window."""
        return [layer for layer in self.layers if layer.all_dead]

    @property
    def samples(self) -> int:
        """The largest sample count of any site: the window's samples as the first layer saw them."""
        return max((layer.samples for layer in self.layers), default=0)

    @property
    def dead_fraction(self) -> float:
        """Dead units over all units of the sites that saw samples; NaN if none did."""
        seen = [layer for layer in self.layers if layer.samples > 0]
        units = sum(layer.units for layer in seen)
        return sum(layer.dead_units for layer in seen) / units if units else math.nan

    def scalars(self, prefix: str = "relumon") -> dict[str, float]:
        """Scalar values keyed by TensorBoard tag.

        Per site ``<prefix>/dead_fraction/<name>``, ``<prefix>/dead_units/<name>``, ``<prefix>/revived/<name>``,
        ``<prefix>/permanently_dead/<name>`` and, when a backward pass ran, ``<prefix>/grad_norm/<name>``;
        ``<prefix>/grad_through_norm/<name>`` with ``grad_through``; ``<prefix>/nonfinite_units/<name>`` when
        non-zero; ``<prefix>/dormant_fraction/<name>`` with ``dormant_tau``; and ``<prefix>/summary/dead_fraction``
        over all units. Sites that saw no sample in the
        window are left out, so no NaN is ever logged.
        """
        out: dict[str, float] = {}
        for layer in self.layers:
            if layer.samples == 0:
                continue
            out[f"{prefix}/dead_fraction/{layer.tag}"] = layer.dead_fraction
            out[f"{prefix}/dead_units/{layer.tag}"] = float(layer.dead_units)
            if layer.backward_passes > 0 and math.isfinite(layer.grad_norm):
                out[f"{prefix}/grad_norm/{layer.tag}"] = layer.grad_norm
            if math.isfinite(layer.grad_through_norm):
                out[f"{prefix}/grad_through_norm/{layer.tag}"] = layer.grad_through_norm
            if layer.nonfinite_units:
                out[f"{prefix}/nonfinite_units/{layer.tag}"] = float(layer.nonfinite_units)
            out[f"{prefix}/revived/{layer.tag}"] = float(layer.revived_units)
            out[f"{prefix}/permanently_dead/{layer.tag}"] = float(layer.permanently_dead_units)
            if layer.dormant_units is not None:
                out[f"{prefix}/dormant_fraction/{layer.tag}"] = layer.dormant_fraction
        if out:
            out[f"{prefix}/summary/dead_fraction"] = self.dead_fraction
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {"window": self.window, "steps": self.steps, "layers": [layer.to_dict() for layer in self.layers]}

    def __repr__(self) -> str:
        return f"Report(window={self.window}, layers={len(self)}, dead_layers={[x.name for x in self.dead_layers]})"

    def __str__(self) -> str:
        show_nan = any(layer.nonfinite_units for layer in self.layers)
        header: tuple[str, ...] = ("layer", "kind", "units", "samples", "dead", "dead %", "grad norm", "fed by")
        header += ("NaN units",) if show_nan else ()
        rows = []
        for layer in self.layers:
            dead = f"{layer.dead_units}" + ("*" if layer.all_dead else "") + ("!" if layer.disabled else "")
            frac = "-" if layer.samples == 0 else f"{100 * layer.dead_fraction:.1f}%"
            grad = "-" if layer.backward_passes == 0 else f"{layer.grad_norm:.3e}"
            row = (layer.name, layer.kind, str(layer.units), str(layer.samples), dead, frac, grad, layer.fed_by or "-")
            rows.append(row + ((str(layer.nonfinite_units),) if show_nan else ()))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {2, 3, 4, 5, 6, 8}

        def fmt(row: tuple[str, ...]) -> str:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        measured = max((layer.forwards for layer in self.layers), default=0)
        steps = f"{self.steps} steps" + (f", {measured} measured" if measured < self.steps else "")
        lines = [f"relumon report, window {self.window}: {len(self)} call sites, {steps}", fmt(header)]
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(r) for r in rows)
        if any(layer.all_dead for layer in self.layers):
            lines.append("* every unit dead (or stuck negative) in this window")
        for layer in self.layers:
            if layer.disabled is not None:
                lines.append(f"! `{layer.name}` disabled after an error inside relumon: {layer.disabled}")
        return "\n".join(lines)


def _nan_to_none(x: float) -> Optional[float]:
    """NaN as None, for strict JSON."""
    return None if math.isnan(x) else x


def dead_layer_message(layer: LayerReport, steps: Optional[int] = None) -> str:
    """The alert text for a layer whose every unit died: names the layer, the window and what to try.

    Args:
        layer: the layer's report.
        steps: training steps in the window; defaults to the layer's measured forwards.
    """
    steps = layer.forwards if not steps else steps
    what = "stuck in the negative regime" if layer.negative_regime else "dead (output 0)"
    window = f"{layer.samples} samples over {steps} step{'s' if steps != 1 else ''}"
    if layer.forwards < steps:
        window += f", {layer.forwards} of them measured"
    feeder = f"`{layer.fed_by}`" if layer.fed_by else "the layer feeding it"
    if layer.negative_regime:
        why = (
            f"Its units still pass alpha*gradient, but the layer carries no positive signal. "
            f"Try a lower learning rate, or the init or bias of {feeder}."
        )
    else:
        why = (
            f"Dead ReLU units get no gradient, so the weights feeding them stop learning. "
            f"Try a lower learning rate, LeakyReLU, or the init or bias of {feeder}."
        )
    message = (
        f"relumon: all {layer.units} units of `{layer.name}` ({layer.kind}) were {what} for the last window "
        f"({window}). {why}"
    )
    if layer.blame:
        message += f" Blame: {layer.blame}."
    return message
