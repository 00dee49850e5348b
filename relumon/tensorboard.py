"""TensorBoard output: scalars and the custom-scalars chart layout.

Works with any ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one).
Nothing here imports tensorboard; the writer brings it.
"""

from __future__ import annotations

import weakref
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
}


def custom_scalars_layout(prefix: str = "relumon") -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: one multi-line chart per metric, across layers."""
    charts = {title: ["Multiline", [rf"{prefix}/{metric}/.*"]] for metric, title in METRICS.items()}
    charts["overall dead fraction"] = ["Multiline", [rf"{prefix}/summary/.*"]]
    return {prefix: charts}


def write_layout_once(writer: Any, written: weakref.WeakSet[Any], prefix: str = "relumon") -> None:
    """Write the custom-scalars layout to ``writer`` unless ``written`` already holds it; then remember it."""
    if hasattr(writer, "add_custom_scalars") and writer not in written:
        writer.add_custom_scalars(custom_scalars_layout(prefix))
        written.add(writer)


def write_scalars(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """Write each ``tag -> value`` with ``writer.add_scalar`` at ``step``."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)
