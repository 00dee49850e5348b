"""TensorBoard output: scalars and the custom-scalars chart layout.

Works with any ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one).
Nothing here imports tensorboard; the writer brings it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "ALERTS",
    "METRICS",
    "alerts_text",
    "custom_scalars_layout",
    "logged_metrics",
    "write_alerts",
    "write_layout_once",
    "write_scalars",
]

#: The text tag (under the prefix) of the alerts, each with its cause: ``relumon/alerts``.
ALERTS = "alerts"

#: Per-layer metrics, with the chart title of each in the custom-scalars layout.
METRICS: Mapping[str, str] = {
    "dead_fraction": "dead fraction per layer",
    "dead_units": "dead units per layer",
    "grad_norm": "gradient norm at the activation output (L2 over the batch tensor)",
    "grad_through_norm": "gradient norm through the activation (L2 over the batch tensor)",
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
#: The chart of the overall dead fraction, for the tags ``<prefix>/summary/...``.
_SUMMARY = "summary"
#: The chart of root and consequence deaths, for the tags ``<prefix>/summary/..._deaths``.
_CASCADES = "cascades"


def logged_metrics(tags: Iterable[str], prefix: str = "relumon") -> set[str]:
    """The metrics (``dead_fraction``, ``grad_norm``..., ``summary``) that ``<prefix>/<metric>/...`` tags name."""
    start = f"{prefix}/"
    names = {tag[len(start) :].split("/", 1)[0] for tag in tags if tag.startswith(start)} & {*METRICS, _SUMMARY}
    if any(tag.startswith(f"{start}{_SUMMARY}/") and tag.endswith("_deaths") for tag in tags):
        names.add(_CASCADES)
    return names


def custom_scalars_layout(
    prefix: str = "relumon", metrics: Optional[Iterable[str]] = None
) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: one multi-line chart per metric, across layers.

    Args:
        prefix: the tag prefix.
        metrics: the metrics to chart (names from ``METRICS``, and ``"summary"`` for the overall dead fraction);
            None charts them all.
    """
    wanted = {*METRICS, _SUMMARY, _CASCADES} if metrics is None else set(metrics)
    charts = {title: ["Multiline", [rf"{prefix}/{metric}/.*"]] for metric, title in METRICS.items() if metric in wanted}
    if _SUMMARY in wanted:
        charts["overall dead fraction"] = ["Multiline", [rf"{prefix}/{_SUMMARY}/dead_fraction"]]
    if _CASCADES in wanted:
        charts["dead cascades: roots and consequences"] = ["Multiline", [rf"{prefix}/{_SUMMARY}/.*_deaths"]]
    return {prefix: charts}


def write_layout_once(writer: Any, prefix: str = "relumon", tags: Optional[Iterable[str]] = None) -> None:
    """Write the custom-scalars layout for the metrics logged under ``prefix`` to ``writer``, once per metric set.

    Only metrics that ``tags`` (the tags about to be written) name get a chart, so a run without ``grad_through``,
    ``dormant_tau`` or NaN units shows no empty chart for them. When a later call brings a metric with no chart yet
    (the first NaN unit, say), the layout is written again with that chart added: TensorBoard shows the latest.
    ``tags=None`` charts every metric. The writer itself remembers what it was given (an attribute), so every
    monitor and callback that logs to one writer shares the knowledge, and none of them holds a reference to it.
    """
    if not hasattr(writer, "add_custom_scalars"):
        return
    wanted = {*METRICS, _SUMMARY} if tags is None else logged_metrics(tags, prefix)
    written: dict[str, frozenset[str]] = getattr(writer, _LAYOUT_ATTRIBUTE, {})
    charted = written.get(prefix, frozenset())
    if not wanted or wanted <= charted:
        return
    charted = charted | wanted
    writer.add_custom_scalars(custom_scalars_layout(prefix, charted))
    try:
        setattr(writer, _LAYOUT_ATTRIBUTE, {**written, prefix: charted})
    except AttributeError:  # a writer with __slots__: it may get the layout again, which TensorBoard tolerates
        pass


def write_scalars(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """Write each ``tag -> value`` with ``writer.add_scalar`` at ``step``."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)


def alerts_text(alerts: Iterable[str]) -> str:
    """The alerts of one window as one Markdown text (TensorBoard's text plugin renders Markdown): a paragraph each."""
    return "\n\n".join(alerts)


def write_alerts(writer: Any, alerts: Iterable[str], step: int, prefix: str = "relumon") -> None:
    """Write the window's alerts as one text at ``step`` under ``<prefix>/alerts`` (nothing when there are none, or
    the writer takes no text)."""
    text = alerts_text(alerts)
    if text and hasattr(writer, "add_text"):
        writer.add_text(f"{prefix}/{ALERTS}", text, global_step=step)
