"""Pictures of a run: the gradient-flow chart and the dead-unit heatmap.

Both are matplotlib ``Figure`` objects made without pyplot: no display is needed, nothing stays open in pyplot once
they are dropped, and the matplotlib backend a notebook chose is left alone. matplotlib comes with the
``tensorboard`` extra: ``pip install relumon[tensorboard]``. Write them with ``SummaryWriter.add_figure`` (Lightning's
``TensorBoardLogger.experiment`` is a ``SummaryWriter``), or through [`log_figures()`][relumon.Monitor.log_figures].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from relumon.errors import RelumonError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from relumon.report import Report

__all__ = ["grad_flow_figure", "dead_heatmap_figure", "FIGURE_TAGS"]

#: Image tags written to TensorBoard, for a tag prefix of "relumon".
FIGURE_TAGS = {"grad_flow": "relumon/grad_flow", "dead_heatmap": "relumon/dead_heatmap"}

_ALIVE, _PARTLY, _DEAD, _NEGATIVE = "#4C72B0", "#DD8452", "#C44E52", "#8172B3"
_CONSEQUENCE = "#EDB8B9"  # a lighter red: dead because an upstream death left it no signal


def _pyplot() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (pyplot's global state is avoided on purpose)
    except ImportError:
        raise RelumonError("relumon's pictures need matplotlib: `pip install relumon[tensorboard]`") from None
    show_inline_in_notebooks()
    return matplotlib


def grad_flow_figure(report: Report, title: str = "relumon: gradient flow per activation layer") -> Figure:
    """One bar per call site, in forward order: the mean gradient norm at its output, on a log scale.

    The gradient norm is the L2 norm of ``dL/d(output)`` over the whole batch tensor, averaged over the window's
    backward passes: it scales with the batch size and the loss reduction (sum or mean).

    With ``grad_through=True``, a black triangle per bar marks the gradient that flows through the activation to the
    layer below (at the bottom of the axis when it is 0).

    Bars are coloured by the layer's state in the window: blue alive, orange half or more of the units dead, red
    every unit dead or saturated (the root of a dead cascade), light red with cross-hatching a dead layer that an
    upstream death explains (a consequence, see [`LayerReport.caused_by`][relumon.LayerReport]), purple every unit
    stuck in the negative regime (LeakyReLU). A gradient norm of 0 (nothing flows back, as behind a dead layer) is
    drawn as a hatched stub at the bottom of the axis and labelled "0", with the dead layer that blocks it when
    relumon knows it ("0, blocked by `5`"). Each bar is labelled with the layer's dead percentage (none for
    activations outside the ReLU family, which get gradient flow only) and, with ``certify=True``, the percentage
    proven dead for every input ("27% dead, 11% proven"), apart from the units that only looked dead.
    """
    _pyplot()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = [layer for layer in report if layer.samples > 0]
    fig = Figure(figsize=(max(6.5, 0.55 * len(layers) + 3.5), 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if not layers:
        ax.text(0.5, 0.5, "no measured samples in this window", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    norms = [layer.grad_norm for layer in layers]
    positive = [n for n in norms if math.isfinite(n) and n > 0]
    floor = min(positive) / 30 if positive else 1e-8
    heights, colors, hatches = [], [], []
    for layer, norm in zip(layers, norms):
        zero = not (math.isfinite(norm) and norm > 0)
        heights.append(floor * 1.5 if zero else norm)
        hatches.append("xx" if layer.caused_by is not None else "//" if zero else "")
        if layer.caused_by is not None:
            colors.append(_CONSEQUENCE)
        elif layer.all_dead_or_saturated:
            colors.append(_NEGATIVE if layer.negative_regime else _DEAD)
        elif layer.counts_dead and layer.dead_fraction >= 0.5:
            colors.append(_PARTLY)
        else:
            colors.append(_ALIVE)
    x = range(len(layers))
    bars = ax.bar(x, heights, color=colors, hatch=hatches, edgecolor="black", linewidth=0.4)
    ax.set_yscale("log")
    decades = math.log10(max(heights) / floor)
    rotated = len(layers) > 12
    ax.set_ylim(bottom=floor, top=max(heights) * 10 ** ((0.3 if rotated else 0.12) * decades))  # room for labels
    for bar, layer, norm in zip(bars, layers, norms):
        zero = not (math.isfinite(norm) and norm > 0)
        parts = [f"0, blocked by {layer.blocked_by}" if zero and layer.blocked_by else "0"] if zero else []
        if layer.counts_dead:
            parts.append(f"{100 * layer.dead_fraction:.0f}% dead")
            if layer.certified is not None:  # certify=True: proven dead apart from looked dead
                parts.append(f"{100 * len(layer.certified) / layer.units:.0f}% proven")
        # One line per fact, so that neighbouring labels do not run into each other (rotated: one line).
        label = ", ".join(parts) if rotated else "\n".join(parts)
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=90 if rotated else 0,
            xytext=(0, 2),
            textcoords="offset points",
        )
    through = [layer.grad_through_norm for layer in layers]
    if any(math.isfinite(t) for t in through):  # with grad_through: what passes on to the layer below
        ax.scatter(
            list(x),
            [t if math.isfinite(t) and t > 0 else floor * 1.5 for t in through],
            marker="v",
            color="black",
            zorder=3,
            label="gradient through",
        )
    ax.set_xticks(
        list(x),
        [layer.name for layer in layers],
        rotation=45 if len(layers) > 4 else 0,
        ha="right" if len(layers) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel("grad norm: mean L2 norm of dL/d(output)\nover the batch tensor (log)", fontsize=8)
    ax.set_title(f"{title}\nwindow {report.window}, {report.steps} steps", fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(
        handles=[
            Patch(color=_ALIVE, label="alive"),
            Patch(color=_PARTLY, label="≥ 50% dead"),
            Patch(color=_DEAD, label="all dead or saturated (root)"),
            Patch(facecolor=_CONSEQUENCE, hatch="xx", edgecolor="black", label="dead: caused upstream"),
            Patch(color=_NEGATIVE, label="all negative regime"),
            *ax.get_legend_handles_labels()[0],
        ],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    return fig


def dead_heatmap_figure(
    timeline: Sequence[tuple[int, Mapping[str, float]]],
    names: Sequence[str] | None = None,
    title: str = "relumon: dead fraction per layer and window",
) -> Figure:
    """Layers × windows, coloured by dead fraction (white 0 to dark red 1); grey where a layer had no sample.

    Args:
        timeline: ``(step, {layer name: dead fraction})`` per closed window, oldest first
            ([`relumon.Monitor.timeline`][relumon.Monitor.timeline]).
        names: the layers to show, top to bottom; defaults to every name in the timeline, in order of appearance.
    """
    _pyplot()
    import numpy as np
    from matplotlib.figure import Figure

    if names is None:
        seen: dict[str, None] = {}
        for _, fractions in timeline:
            seen.update(dict.fromkeys(fractions))
        names = list(seen)
    grid = np.full((len(names), len(timeline)), np.nan)
    for j, (_, fractions) in enumerate(timeline):
        for i, name in enumerate(names):
            value = fractions.get(name)
            if value is not None and math.isfinite(value):
                grid[i, j] = value
    fig = Figure(
        figsize=(min(14.0, 3.5 + 0.12 * len(timeline)), 1.2 + 0.32 * max(len(names), 1)), dpi=100, layout="constrained"
    )
    ax = fig.add_subplot()
    if not timeline or not names:
        ax.text(0.5, 0.5, "no closed window yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    import matplotlib

    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    steps = [step for step, _ in timeline]
    ticks = sorted(set(np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int).tolist()))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=8)
    ax.set_xlabel("step (end of window)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="dead fraction", shrink=0.9)
    return fig


def show_inline_in_notebooks() -> None:
    """Let IPython show relumon's figures as PNG, as it does pyplot's, when a notebook shell is running.

    relumon draws without pyplot, so IPython knows no way to show its ``Figure`` objects until pyplot's inline
    backend has been loaded. This registers the same PNG formatter that backend would, and changes nothing else (no
    backend switch). Outside IPython it does nothing.
    """
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, _png)


def _png(figure: Figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()
