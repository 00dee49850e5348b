"""TensorBoard output: scalars and the custom-scalars chart layout.

Works with any ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one).
Nothing here imports tensorboard; the writer brings it.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["METRICS", "custom_scalars_layout", "write_layout_once", "write_scalars"]

#: Per-layer metrics, with the chart title of each in the custom-scalars layout.
METRICS: Mapping[str, str] = {
    "dead_fraction": "dead fraction per layer",
    "dead_units": "dead units per layer",
    "grad_norm": "gradient norm at the activation output",
    "grad_through_norm": "gradient norm through the activation",
    "nonfinite_units": "units with NaN output",
    "revived": "units revived in the window",
    "permanently_dead": "permanently dead units",
    "dormant_fraction": "tau-dormant fraction per layer",
    "saturated_units": "units saturated at the cap (ReLU6)",
    "root_death": "dead layers that start a cascade (roots)",
    "consequence": "dead layers an upstream death explains",
    "blocked": "layers whose gradient a dead layer blocks",
}


_LAYOUT_ATTRIBUTE = "_relumon_layouts"


def custom_scalars_layout(prefix: str = "relumon") -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: one multi-line chart per metric, across layers."""
    charts = {title: ["Multiline", [rf"{prefix}/{metric}/.*"]] for metric, title in METRICS.items()}
    charts["overall dead fraction"] = ["Multiline", [rf"{prefix}/summary/dead_fraction"]]
    charts["dead cascades: roots and consequences"] = ["Multiline", [rf"{prefix}/summary/.*_deaths"]]
    return {prefix: charts}


def write_layout_once(writer: Any, prefix: str = "relumon") -> None:
    """Write the custom-scalars layout for ``prefix`` to ``writer``, once per writer and prefix.

    The writer itself remembers it (an attribute), so every monitor and callback that logs to one writer shares the
    knowledge, and none of them holds a reference to the writer.
    """
    if not hasattr(writer, "add_custom_scalars"):
        return
    written: set[str] = getattr(writer, _LAYOUT_ATTRIBUTE, set())
    if prefix in written:
        return
    writer.add_custom_scalars(custom_scalars_layout(prefix))
    try:
        setattr(writer, _LAYOUT_ATTRIBUTE, written | {prefix})
    except AttributeError:  # a writer with __slots__: it may get the layout again, which TensorBoard tolerates
        pass


def write_scalars(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """Write each ``tag -> value`` with ``writer.add_scalar`` at ``step``."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)
