"""``relumon summary LOGDIR``: what relumon logged, per run and layer, read back with tensorboard's own reader.

    relumon summary runs/
    relumon summary runs/ --json
    relumon summary runs/opt            # a Hugging Face Trainer run: finds its train/relumon/... scalars

For each run (a directory holding TensorBoard event files) it prints one row per layer: the last and the highest dead
percentage over the logged windows ("max dead %"), the first step at which every unit was dead, and the last
gradient norm (the L2 norm of dL/d(output) over the whole batch tensor) and a note on the last window: a dead layer
is the ``root`` of its cascade or ``caused by`` an upstream death (named when one root died in that window), and a
zero gradient is ``blocked`` by a dead layer downstream. Activations outside the ReLU family (Tanh, Sigmoid...) show
their gradient only. With recycling on (`recycle=`), a "recycled" column sums the units re-initialised per layer. A
run is named by its path under LOGDIR, or
by the directory's own name when LOGDIR is itself the run. Under each run's table come its alerts, with their cause
(the text relumon logged under ``relumon/alerts``: the learning rate, the update size, the bias shift and advice).
``--json`` prints the same facts as JSON, with dead shares as fractions in [0, 1] (not percentages), plus each
layer's number of logged windows and its last step, and the alerts per run under ``"alerts"``. A missing
or empty directory, or one without relumon scalars, gets a one-line error and a non-zero exit status.

A run is read the way TensorBoard shows it: one value per tag and step, the latest written winning, across all the
event files of the run (a script re-run into the same directory adds a second event file; its values replace the
first run's at the same steps rather than doubling the windows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

__all__ = ["main", "summarize", "read_alerts", "detect_prefix", "detect_prefixes"]

EXIT_USAGE, EXIT_NO_DATA = 2, 1


class _CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _runs(logdir: str) -> list[str]:
    """Directories under ``logdir`` (itself included) that hold event files, sorted."""
    runs = []
    for directory, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            runs.append(directory)
    return sorted(runs)


def _per_step(events: list[Any]) -> list[Any]:
    """One event per step, the latest written winning (as TensorBoard shows a run of several event files), by step."""
    latest: dict[int, Any] = {}
    for event in sorted(events, key=lambda e: e.wall_time):  # stable: ties keep the order they were read in
        latest[event.step] = event
    return [latest[step] for step in sorted(latest)]


def summarize(logdir: str, prefix: str = "relumon") -> dict[str, list[dict[str, Any]]]:
    """Per run, one summary dict per layer, in the order the layers were logged.

    A run is keyed by its path relative to ``logdir``, or by the directory's name when ``logdir`` is the run itself.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        LookupError: no event files, or none with relumon scalars.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise _CliError("relumon summary needs tensorboard: pip install relumon[tensorboard]", EXIT_USAGE) from None
    if not os.path.isdir(logdir):
        raise FileNotFoundError(logdir)
    runs = _runs(logdir)
    if not runs:
        raise LookupError(f"no TensorBoard event files under {logdir}")
    dead_prefix, grad_prefix = f"{prefix}/dead_fraction/", f"{prefix}/grad_norm/"
    summary: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))

        def scalars(tag: str, acc: Any = acc, tags: set[str] = tags) -> list[Any]:
            return _per_step(acc.Scalars(tag)) if tag in tags else []

        def last(metric: str, name: str) -> Optional[Any]:
            events = scalars(f"{prefix}/{metric}/{name}")
            return events[-1] if events else None

        names: dict[str, None] = {}
        for tag in acc.Tags().get("scalars", []):
            for metric_prefix in (dead_prefix, grad_prefix):
                if tag.startswith(metric_prefix):
                    names[tag[len(metric_prefix) :]] = None
        # The roots of the last window of each step, to name the root of a consequence when there was only one.
        roots_at: dict[int, list[str]] = {}
        for name in names:
            root = last("root_death", name)
            if root is not None and root.value >= 1.0:
                roots_at.setdefault(root.step, []).append(name)
        layers = []
        for name in names:
            dead_tag = dead_prefix + name
            dead = scalars(dead_tag)
            grads = scalars(grad_prefix + name)
            fully_dead = [e.step for e in dead if e.value >= 1.0]
            recycled_tag = f"{prefix}/recycled/{name}"
            recycled = acc.Scalars(recycled_tag) if recycled_tag in tags else None
            events = dead or grads
            note = None
            root, consequence, blocked = last("root_death", name), last("consequence", name), last("blocked", name)
            if root is not None and root.value >= 1.0:
                note = "root of a dead cascade"
            elif consequence is not None and consequence.value >= 1.0:
                roots = roots_at.get(consequence.step, [])
                note = f"caused by `{roots[0]}`" if len(roots) == 1 else "caused by an upstream death"
            elif blocked is not None and blocked.value >= 1.0:
                note = "gradient blocked by a dead layer downstream"
            layers.append(
                {
                    "layer": name,
                    "counts_dead": bool(dead),
                    "windows": len(events),
                    "last_step": events[-1].step,
                    "last_dead_fraction": dead[-1].value if dead else None,
                    "max_dead_fraction": max(e.value for e in dead) if dead else None,
                    "first_step_fully_dead": fully_dead[0] if fully_dead else None,
                    "last_grad_norm": grads[-1].value if grads else None,
                    "note": note,
                    "recycled_units": int(sum(e.value for e in recycled)) if recycled is not None else None,
                }
            )
        if layers:
            name = os.path.relpath(run, logdir)
            summary[os.path.basename(os.path.abspath(run)) if name == "." else name] = layers
    if not summary:
        raise LookupError(f"no relumon scalars ({dead_prefix}...) in the event files under {logdir}")
    return summary


#: Pairs of metrics relumon always writes together for a layer: a tag head carrying one of these pairs is relumon's.
_SIGNATURES = (("dead_fraction", "dead_units"), ("grad_norm", "blocked"))


def _heads(tags: Sequence[str]) -> set[str]:
    """The prefixes under which ``tags`` hold relumon's per-layer scalars: ``relumon`` and ``.../relumon`` (such as
    ``train/relumon``), and a custom ``prefix=`` (``train/<prefix>``...) with both metrics of a `_SIGNATURES` pair
    for one layer."""
    tag_set = set(tags)
    heads = set()
    for tag in tag_set:
        for metric, partner in _SIGNATURES:
            marker = f"/{metric}/"
            if marker in tag:
                head, layer = tag.split(marker, 1)
                if head == "relumon" or head.endswith("/relumon") or f"{head}/{partner}/{layer}" in tag_set:
                    heads.add(head)
    return heads


def detect_prefixes(logdir: str) -> list[str]:
    """The tag prefixes of relumon's scalars under ``logdir``, one per run, sorted: ``relumon`` for plain loops and
    Lightning, ``train/relumon`` for a Hugging Face Trainer run, or a custom ``prefix=`` (``train/<prefix>``).
    Runs may differ (a plain run and a Trainer run under one directory each get their own).

    Raises:
        LookupError: a run holds relumon scalars under several prefixes (``--prefix`` must choose).
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return ["relumon"]  # summarize() says what to install
    found: set[str] = set()
    for run in _runs(logdir):
        acc = EventAccumulator(run, size_guidance={"scalars": 1})
        acc.Reload()
        heads = _heads(acc.Tags().get("scalars", []))
        if len(heads) > 1:
            raise LookupError(
                f"relumon scalars under several prefixes {sorted(heads)} in {run}: pass --prefix to choose one"
            )
        found |= heads
    return sorted(found)


def detect_prefix(logdir: str) -> str:
    """The one tag prefix relumon's scalars carry under ``logdir`` (see `detect_prefixes`); ``relumon`` when none is
    found.

    Raises:
        LookupError: several prefixes (in one run, or across runs): ``--prefix`` must choose.
    """
    found = detect_prefixes(logdir)
    if len(found) > 1:
        raise LookupError(f"relumon scalars under several prefixes {found} in {logdir}: pass --prefix")
    return found[0] if found else "relumon"


def read_alerts(logdir: str, prefix: str = "relumon") -> dict[str, list[dict[str, Any]]]:
    """Per run (named as in `summarize`), the alert texts relumon logged under ``<prefix>/alerts``, by step.

    Returns:
        ``{run: [{"step": int, "text": str}, ...]}``, only for runs with alerts, oldest first.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise _CliError("relumon summary needs tensorboard: pip install relumon[tensorboard]", EXIT_USAGE) from None
    found: dict[str, list[dict[str, Any]]] = {}
    for run in _runs(logdir):
        acc = EventAccumulator(run, size_guidance={"tensors": 0, "scalars": 1})
        acc.Reload()
        # SummaryWriter.add_text writes `<tag>/text_summary`.
        tags = [t for t in acc.Tags().get("tensors", []) if t.split("/text_summary")[0] == f"{prefix}/alerts"]
        alerts = []
        for tag in tags:
            for event in acc.Tensors(tag):
                text = b"\n\n".join(event.tensor_proto.string_val).decode("utf-8", "replace")
                alerts.append({"step": event.step, "text": text})
        if alerts:
            name = os.path.relpath(run, logdir)
            found[os.path.basename(os.path.abspath(run)) if name == "." else name] = sorted(
                alerts, key=lambda a: a["step"]
            )
    return found


def _table(layers: list[dict[str, Any]]) -> str:
    show_recycled = any(x.get("recycled_units") is not None for x in layers)
    header: tuple[str, ...] = ("layer", "last dead %", "max dead %", "first step fully dead", "last grad norm")
    header += ("recycled",) if show_recycled else ()
    header += ("note",)
    rows = []
    for x in layers:
        grad = x["last_grad_norm"]
        last, peak = x["last_dead_fraction"], x["max_dead_fraction"]
        rows.append(
            (
                x["layer"],
                "-" if last is None else f"{100 * last:.1f}%",
                "-" if peak is None else f"{100 * peak:.1f}%",
                "-" if x["first_step_fully_dead"] is None else str(x["first_step_fully_dead"]),
                "-" if grad is None or (isinstance(grad, float) and math.isnan(grad)) else f"{grad:.3e}",
            )
            + ((str(x["recycled_units"]) if x.get("recycled_units") is not None else "-",) if show_recycled else ())
            + (x["note"] or ("gradient only (not ReLU-family)" if not x["counts_dead"] else ""),)
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    left = (0, len(header) - 1)
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``relumon`` console script. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="relumon", description="relumon's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    summary_parser = commands.add_parser("summary", help="summarise relumon's scalars in TensorBoard logs")
    summary_parser.add_argument("logdir", help="a TensorBoard log directory (searched recursively for runs)")
    summary_parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of tables: fractions in [0, 1], plus windows and last step per layer",
    )
    summary_parser.add_argument(
        "--prefix",
        default=None,
        help="the tag prefix relumon logged with (default: relumon, or the one prefix found, e.g. train/relumon)",
    )
    from relumon import check as check_command  # `relumon check PATH`: relumon/check.py

    check_command.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "check":
        return check_command.run(args)

    try:
        prefixes = [args.prefix] if args.prefix is not None else None
        if prefixes is None and os.path.isdir(args.logdir):
            prefixes = detect_prefixes(args.logdir)
        summary, alerts = {}, {}
        for prefix in prefixes or ["relumon"]:  # runs under different prefixes (a plain run, a Trainer run) each
            summary.update(summarize(args.logdir, prefix))
            alerts.update(read_alerts(args.logdir, prefix))
        summary = dict(sorted(summary.items()))
    except FileNotFoundError:
        print(f"relumon summary: no such directory: {args.logdir}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as err:
        hint = ""
        if args.prefix is not None and os.path.isdir(args.logdir):
            try:
                found = detect_prefixes(args.logdir)
            except LookupError as several:
                found = [str(several)]
            hint = f" (relumon scalars found under {', '.join(found)}: pass --prefix {found[0]})" if found else ""
        print(f"relumon summary: {err}{hint}", file=sys.stderr)
        return EXIT_NO_DATA
    except _CliError as err:
        print(err, file=sys.stderr)
        return err.code
    if args.json:
        print(json.dumps({"logdir": args.logdir, "runs": summary, "alerts": alerts}, indent=2))
        return 0
    for run, layers in summary.items():
        last = max(x["last_step"] for x in layers)
        print(f"run {run}  (last step {last})")
        print(_table(layers))
        for alert in alerts.get(run, []):
            print(f"alert at step {alert['step']}:")
            for paragraph in alert["text"].split("\n\n"):
                print(f"  {paragraph}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
