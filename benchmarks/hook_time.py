"""Time spent inside relumon's hooks per training step: this tree's per-call fold against another revision's.

The step ratios of `overhead.py` carry the whole step's noise; this times only what relumon's hooks do, per step, in
one process. With ``--against REV`` it loads ``relumon/state.py`` as it was at git revision ``REV`` and swaps its
per-call fold (`HOT_PATH`: `SiteStats._fold`, `_fold_values` and `grad_hook_for`, those it defines) with this tree's
every step, in a shuffled order, on one monitored model: both folds meet the same machine state, and the paired
differences say what the change did. Only the per-call fold is swapped; everything else is this tree's.

    python benchmarks/hook_time.py --workload densenet121 --steps 12
    python benchmarks/hook_time.py --workload densenet121 --steps 12 --against 4c37748^

Prints the median time inside the hooks per step (forward hooks and gradient hooks, `measure_every=1`), and with
``--against``, the median paired difference with its interquartile range. With ``--optimizer`` the monitor is given
the optimizer (``optimizer=``), and the time inside the cause of death's optimizer step hooks is printed too.

    python benchmarks/hook_time.py --workload mlp --steps 40 --optimizer
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from nets import densenet121, resnet18, tiny_layers  # benchmarks/nets.py: this script's folder is first on sys.path
from overhead import WORKLOADS

import relumon
import relumon.cause
import relumon.recorder
import relumon.state

NETS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]] = {
    "densenet121": lambda: (densenet121(10), (32, 3, 64, 64)),
    "resnet18": lambda: (resnet18(10), (32, 3, 64, 64)),
    "tiny2000": lambda: (tiny_layers(2000, 4), (2, 4)),
    "cnn": lambda: (WORKLOADS["cpu-cnn"].build(), (64, 3, 32, 32)),
    "mlp": lambda: (WORKLOADS["cpu-mlp"].build(), (256, 1024)),
}


#: The methods of `SiteStats` that run in every measured call, swapped together between the trees compared.
HOT_PATH = ("_fold", "_fold_values", "grad_hook_for")


def hot_path(stats_class: Any) -> dict[str, Any]:
    """The hot-path methods that ``stats_class`` (a `SiteStats`) defines."""
    return {name: vars(stats_class)[name] for name in HOT_PATH if name in vars(stats_class)}


def folds_at(revision: str) -> dict[str, Any]:
    """The hot-path methods of `SiteStats` in ``relumon/state.py`` at git ``revision``."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{revision}:relumon/state.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "state_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("relumon.state_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return hot_path(module.SiteStats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=list(NETS), default="densenet121")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per fold")
    parser.add_argument("--against", default=None, help="a git revision whose per-call fold to compare with")
    parser.add_argument("--optimizer", action="store_true", help="give relumon the optimizer; time its step hooks")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.workload == "tiny2000":
        torch.set_num_threads(1)
    model, shape = NETS[args.workload]()
    x, y = torch.randn(*shape), torch.randint(0, 4, (shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    inside = [0.0]
    clock = time.perf_counter
    observe = relumon.recorder.Recorder._observe
    guard = relumon.recorder.Recorder._guard_grad_hook

    def timed_observe(*a: Any) -> None:
        start = clock()
        observe(*a)
        inside[0] += clock() - start

    def timed_guard(self: Any, watched: Any, site: Any, hook: Any) -> Callable[[torch.Tensor], None]:
        guarded = guard(self, watched, site, hook)

        def timed(grad: torch.Tensor) -> None:
            start = clock()
            guarded(grad)
            inside[0] += clock() - start

        return timed

    in_optimizer = [0.0]
    optimizer_hook = relumon.cause._Hook.__call__

    def timed_optimizer_hook(self: Any, *a: Any) -> None:
        start = clock()
        optimizer_hook(self, *a)
        in_optimizer[0] += clock() - start

    relumon.cause._Hook.__call__ = timed_optimizer_hook  # type: ignore[method-assign]
    relumon.recorder.Recorder._observe = timed_observe  # type: ignore[method-assign]
    relumon.recorder.Recorder._guard_grad_hook = timed_guard  # type: ignore[method-assign]
    folds = {"this tree": hot_path(relumon.state.SiteStats)}
    if args.against:
        folds[args.against] = folds_at(args.against)

    def use(name: str) -> None:
        for method, function in folds[name].items():
            setattr(relumon.state.SiteStats, method, function)

    def step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {name: [] for name in folds}
    optimizer_times: list[float] = []
    rng = random.Random(0)
    with relumon.watch(model, on_dead="ignore", measure_every=1, optimizer=opt if args.optimizer else None):
        for name in folds:  # warm-up: discovery, and each fold once
            use(name)
            step()
            step()
        for _ in range(args.steps):
            order = list(folds)
            rng.shuffle(order)
            for name in order:
                use(name)
                inside[0] = in_optimizer[0] = 0.0
                step()
                times[name].append(inside[0])
                optimizer_times.append(in_optimizer[0])
    print(f"relumon {relumon.__version__}, torch {torch.__version__}, {args.workload}, {args.steps} steps per fold")
    for name, values in times.items():
        print(f"{name:>12}: {1e3 * statistics.median(values):8.2f} ms per step inside relumon's hooks")
    if args.optimizer:
        print(f"{'optimizer':>12}: {1e3 * statistics.median(optimizer_times):8.2f} ms per step inside its step hooks")
    if args.against:
        diffs = sorted(b - a for a, b in zip(times[args.against], times["this tree"]))
        q1, q3 = diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4]
        print(
            f"  this tree - {args.against}: {1e3 * statistics.median(diffs):+.2f} ms per step "
            f"[{1e3 * q1:+.2f}, {1e3 * q3:+.2f}] (paired, median and IQR)"
        )


if __name__ == "__main__":
    main()
