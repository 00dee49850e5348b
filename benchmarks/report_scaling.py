"""How report time and call-site discovery grow with the number of call sites.

A chain of ``N`` tiny ``Linear(4, 4) -> ReLU`` layers (every site is a real call site with an upstream site, so the
cascade rule and the blame lookups run for each), one training step under ``relumon.watch(measure_every=1)``, then
``monitor.report()``. Prints, per ``N``: the first (discovering) step, a later step, the first report, the median of
five later reports (each after a step), and the first report's time per site, which stays flat when report time is
linear in the sites.

    python benchmarks/report_scaling.py                     # N = 500, 1000, 2000, 4000
    python benchmarks/report_scaling.py --sites 1000 4000 --dead
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import relumon

#: Reports after the first one, each after a training step; the median is printed.
LATER_REPORTS = 5


def chain(sites: int, dead: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(sites):
        layers += [nn.Linear(4, 4), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(4, 1))
    if dead:  # the first layer dies, and every later one with it: one root, N - 1 consequences
        with torch.no_grad():
            model[0].bias.fill_(-1e3)
            for layer in model[2:-1:2]:
                layer.bias.zero_()
    return model


def measure(sites: int, dead: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = chain(sites, dead)
    x = torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
            start = time.perf_counter()
            model(x).sum().backward()
            first = time.perf_counter() - start
            start = time.perf_counter()
            model(x).sum().backward()
            later = time.perf_counter() - start
            start = time.perf_counter()
            report = monitor.report()
            took = time.perf_counter() - start
            later_reports = []
            for _ in range(LATER_REPORTS):  # a step, then a report: the steady state of a long run
                model(x).sum().backward()
                start = time.perf_counter()
                monitor.report()
                later_reports.append(time.perf_counter() - start)
    assert len(report.layers) == sites
    return {
        "first_step_s": first,
        "step_s": later,
        "report_s": took,
        "later_report_s": statistics.median(later_reports),
        "report_us_per_site": 1e6 * took / sites,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--dead", action="store_true", help="kill the first layer: one cascade through every site")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"relumon {relumon.__version__}, torch {torch.__version__}, dead cascade: {args.dead}")
    print(
        f"{'sites':>6} {'first step s':>13} {'step s':>8} {'first report s':>15} {'later report s':>15} "
        f"{'first report µs/site':>21}"
    )
    for sites in args.sites:
        m = measure(sites, args.dead)
        print(
            f"{sites:>6} {m['first_step_s']:>13.3f} {m['step_s']:>8.3f} {m['report_s']:>15.3f} "
            f"{m['later_report_s']:>15.3f} {m['report_us_per_site']:>21.1f}"
        )


if __name__ == "__main__":
    main()
