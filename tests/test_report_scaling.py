"""Report time and discovery grow linearly with the number of call sites: counted, not timed.

A wall-clock test would depend on the machine's load. Instead this counts the Python lines relumon executes (a
`sys.settrace` tracer limited to relumon's own files): deterministic for a given model. A chain 4 times as long must
execute about 4 times the lines; a scan over every site per site (the consequence scan that made ``report()`` take
3.3 s at 4,000 sites) would execute about 16 times as many. Wall-clock figures are in docs/benchmarks.md
(``benchmarks/report_scaling.py``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

import torch
from torch import nn

import relumon

RELUMON_DIR = str(Path(relumon.__file__).parent)


def relumon_lines(fn: Callable[[], Any]) -> int:
    """The number of lines of relumon's own code that ``fn()`` executes."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Optional[Callable[..., Any]]:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Optional[Callable[..., Any]]:
        return local if frame.f_code.co_filename.startswith(RELUMON_DIR) else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def dead_chain(sites: int) -> nn.Sequential:
    """``sites`` Linear -> ReLU layers; the first dies and every later one dies with it (one root, the rest its
    consequences): the cascade rule, the consequence lists and blame all run for every site."""
    layers: list[nn.Module] = []
    for _ in range(sites):
        layers += [nn.Linear(4, 4), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(-1e3)
        for layer in model[2:-1:2]:
            layer.bias.zero_()
    return model


def lines_to_discover_and_report(sites: int) -> tuple[int, int]:
    model = dead_chain(sites)
    x = torch.randn(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            discover = relumon_lines(lambda: model(x).sum().backward())
            report: list[relumon.Report] = []
            lines = relumon_lines(lambda: report.append(monitor.report()))
    assert len(report[0].layers) == sites and len(report[0].roots) == 1
    assert len(report[0].roots[0].consequences) == sites - 1
    return discover, lines


def test_discovery_and_report_run_a_number_of_lines_linear_in_the_sites() -> None:
    small_discover, small_report = lines_to_discover_and_report(60)
    large_discover, large_report = lines_to_discover_and_report(240)
    assert large_report / small_report < 4.3  # linear: about 4; a per-site scan over all sites: about 16
    assert large_discover / small_discover < 4.3
