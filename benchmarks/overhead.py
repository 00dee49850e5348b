"""relumon's overhead benchmark: step time with and without monitoring, in one process, as median ratios.

Every variant trains its own copy of the workload's model. The copies take turns one training step (forward,
backward, optimizer step) at a time, in a shuffled order each turn, so that the machine's drifts in speed, which are
larger than relumon's cost, hit every variant alike. A *round* is ``--steps`` turns; a variant's ratio in a round is
its median step time over the unmonitored copy's, and the figure reported is the median of those ratios over
``--rounds`` rounds, with their interquartile range.

Variants:
- ``none``: no monitor. ``none-aa``: a second unmonitored copy, whose ratio shows the method's own noise.
- ``relumon``: ``relumon.watch(model)`` as users get it (one step in four measured), with a ``report()`` every
  ``--report-every`` steps, whose one host transfer is part of the cost.
- ``relumon-exact``: ``measure_every=1``, every step measured. ``relumon-every2/4/8``: other schedules.
- ``relumon-opt`` and ``relumon-opt-exact``: the same two with ``optimizer=`` given, so that the cause of death
  measures every optimizer step (``||Δw|| / ||w||`` of each producer, on the device).
- ``floor`` and ``floor-2step``: the bare fold of the exact mode and nothing else (a forward hook folding the per-unit
  peak with ``amax``, in one reduction or two, and a gradient hook folding the squared norm with ``dot``): the floor of
  relumon's own algorithm, to show how far ``relumon-exact`` is from it.
- ``naive-item``: the home-made monitor: a forward hook that reads the dead count and a gradient hook that reads the
  gradient norm with ``.item()`` on every step, as many hand-written monitors do.

On a GPU the script also runs relumon's steps between two reports under
``torch.cuda.set_sync_debug_mode("error")``, which turns any host sync into an error, and compares peak memory.

    python benchmarks/overhead.py                                   # the CPU workloads: MLP and small CNN
    python benchmarks/overhead.py --workloads cpu-resnet18,cpu-densenet121,cpu-tiny2000 --threads 1
    python benchmarks/overhead.py --workloads gpu-resnet50,gpu-mlp  # on a CUDA machine, with torchvision
    python benchmarks/overhead.py --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from nets import densenet121, resnet18, tiny_layers  # benchmarks/nets.py: this script's folder is first on sys.path
from torch import nn

import relumon

# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    device: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    autocast: Optional[torch.dtype] = None
    channels_last: bool = False


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def classification_batch(shape: tuple[int, ...]) -> Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]:
    def make(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen).to(device)
        return x, torch.randint(0, 10, (shape[0],), generator=gen).to(device)

    return make


WORKLOADS = {
    "cpu-mlp": Workload("cpu-mlp", "cpu", lambda: mlp(1024, 6), classification_batch((256, 1024))),
    "cpu-cnn": Workload("cpu-cnn", "cpu", small_cnn, classification_batch((64, 3, 32, 32))),
    "cpu-resnet18": Workload("cpu-resnet18", "cpu", lambda: resnet18(10), classification_batch((32, 3, 64, 64))),
    "cpu-densenet121": Workload(
        "cpu-densenet121", "cpu", lambda: densenet121(10), classification_batch((32, 3, 64, 64))
    ),
    "cpu-tiny2000": Workload("cpu-tiny2000", "cpu", lambda: tiny_layers(2000, 4), classification_batch((2, 4))),
    "gpu-resnet50": Workload(
        "gpu-resnet50", "cuda", resnet50, classification_batch((128, 3, 224, 224)), torch.bfloat16, True
    ),
    "gpu-mlp": Workload("gpu-mlp", "cuda", lambda: mlp(4096, 8), classification_batch((4096, 4096)), torch.bfloat16),
}

# --------------------------------------------------------------------------- variants


# Every variant takes the model and the optimizer that trains it; only the `-opt` ones hand the optimizer to relumon.


@contextmanager
def no_monitor(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Optional[Callable[[], Any]]]:
    yield None


@contextmanager
def relumon_default(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], Any]]:
    with relumon.watch(model, on_dead="ignore") as monitor:
        yield monitor.report


@contextmanager
def relumon_exact(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], Any]]:
    with relumon.watch(model, on_dead="ignore", measure_every=1) as monitor:
        yield monitor.report


def relumon_every(n: int, with_optimizer: bool = False) -> Callable[[nn.Module, torch.optim.Optimizer], Any]:
    @contextmanager
    def variant(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], Any]]:
        optimizer = opt if with_optimizer else None
        with relumon.watch(model, on_dead="ignore", measure_every=n, optimizer=optimizer) as monitor:
            yield monitor.report

    return variant


@contextmanager
def naive_item(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], Any]]:
    """The home-made monitor most people write first: host reads in every hook, every step."""
    dead: dict[str, float] = {}
    grads: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):

            def hook(m: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                dims = [d for d in range(out.ndim) if d != (1 if out.ndim > 2 else out.ndim - 1)]
                dead[name] = (out.detach().amax(dims) <= 0).sum().item()
                if out.requires_grad:
                    out.register_hook(lambda g: grads.__setitem__(name, g.norm().item()))

            handles.append(module.register_forward_hook(hook))
    try:
        yield lambda: (dict(dead), dict(grads))
    finally:
        for h in handles:
            h.remove()


def floor(two_step: bool) -> Callable[[nn.Module, torch.optim.Optimizer], Any]:
    """The bare fold relumon's exact mode does, with nothing else: its algorithm's floor.

    A forward hook on every ReLU-family module folds the per-unit peak of the training-mode output into a running
    maximum (``amax`` over every dim but the unit dim, 1 for 3-D and wider outputs, the last one otherwise), and a
    gradient hook on the output folds the squared gradient norm with ``dot``; no host reads. ``two_step`` reduces
    the spatial dims first, then the batch (``amax(2, 3).amax(0)``), which reads the activation once and a small
    tensor a second time.
    """

    family = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)

    @contextmanager
    def variant(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], Any]]:
        peaks: dict[int, torch.Tensor] = {}
        norms: dict[int, torch.Tensor] = {}
        handles = []

        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            t = out.detach()
            unit = 1 if t.ndim > 2 else t.ndim - 1
            if two_step and t.ndim > 2:
                peak = t.amax(tuple(range(2, t.ndim))).amax(0)
            else:
                peak = t.amax(tuple(d for d in range(t.ndim) if d != unit))
            acc = peaks.get(id(module))
            if acc is None or acc.shape != peak.shape:
                peaks[id(module)] = peak.float()
                norms[id(module)] = torch.zeros((), device=t.device)
            else:
                torch.maximum(acc, peak, out=acc)
            if out.requires_grad:
                total = norms[id(module)]

                def fold(grad: torch.Tensor) -> None:
                    flat = grad.reshape(-1).float()
                    total.add_(torch.dot(flat, flat))

                out.register_hook(fold)

        for module in model.modules():
            if isinstance(module, family):
                handles.append(module.register_forward_hook(hook))
        try:
            yield lambda: (peaks, norms)
        finally:
            for handle in handles:
                handle.remove()

    return variant


VARIANTS = {
    "none": no_monitor,
    "none-aa": no_monitor,
    "relumon": relumon_default,
    "relumon-exact": relumon_exact,
    "relumon-every2": relumon_every(2),
    "relumon-every4": relumon_every(4),
    "relumon-every8": relumon_every(8),
    "relumon-opt": relumon_every(4, with_optimizer=True),
    "relumon-opt-exact": relumon_every(1, with_optimizer=True),
    "naive-item": naive_item,
    "floor": floor(two_step=False),
    "floor-2step": floor(two_step=True),
}

# --------------------------------------------------------------------------- timing


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3)


def make_step(
    workload: Workload, model: nn.Module, device: torch.device, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    x, y = workload.batch(device)
    if workload.channels_last:
        x = x.to(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=workload.autocast, enabled=workload.autocast is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None], steps: int, device: torch.device, report: Optional[Callable[[], Any]], report_every: int
) -> list[float]:
    times = []
    for i in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        if report is not None and (i + 1) % report_every == 0:
            report()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def sync_check(workload: Workload, device: torch.device, steps: int) -> str:
    """Run relumon steps between two reports with CUDA sync debugging set to error (optimizer steps measured too)."""
    model = workload.build().to(device)
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model)
    step = make_step(workload, model, device, opt)
    with relumon.watch(model, on_dead="ignore", optimizer=opt) as monitor:
        step()
        monitor.report()
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                step()
        except RuntimeError as err:
            return f"FAILED: {err}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        monitor.report()
    return f"ok ({steps} steps, no host sync)"


def peak_memory(workload: Workload, device: torch.device, variant: str, steps: int = 5) -> int:
    model = workload.build().to(device)
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model)
    step = make_step(workload, model, device, opt)
    with VARIANTS[variant](model, opt):
        step()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)


def run_workload(
    workload: Workload, variants: list[str], rounds: int, steps: int, warmup: int, report_every: int
) -> dict[str, Any]:
    """Time every variant on its own copy of one model, one step of each in turn (in a shuffled order each time).

    Alternating single steps puts every variant under the same machine conditions, which drift by far more than
    relumon costs. A round is ``steps`` such turns; a variant's ratio in a round is its median step time over the
    unmonitored copy's. The ``none-aa`` variant, a second unmonitored copy, measures the method's own noise floor.
    """
    device = torch.device(workload.device)
    torch.manual_seed(0)
    base = workload.build().to(device)
    if workload.channels_last:
        base = base.to(memory_format=torch.channels_last)
    rng = random.Random(0)
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    with ExitStack() as stack:
        runs = {}
        for variant in variants:
            model = copy.deepcopy(base)
            opt = make_optimizer(model)
            report = stack.enter_context(VARIANTS[variant](model, opt))
            runs[variant] = (make_step(workload, model, device, opt), report)
        for step, _ in runs.values():
            for _ in range(warmup):
                step()
        counts = dict.fromkeys(variants, 0)
        for _ in range(rounds):
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(steps):
                order = variants[:]
                rng.shuffle(order)
                for variant in order:
                    step, report = runs[variant]
                    counts[variant] += 1
                    times[variant] += time_steps(
                        step, 1, device, report if counts[variant] % report_every == 0 else None, 1
                    )
            for variant in variants:
                per_round[variant].append(statistics.median(times[variant]))
    result: dict[str, Any] = {"workload": workload.name, "step_ms": 1e3 * statistics.median(per_round["none"])}
    for variant in variants:
        ratios = sorted(m / b for m, b in zip(per_round[variant], per_round["none"]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        result[variant] = {
            "ratio": statistics.median(ratios),
            "iqr": [q1, q3],
            "ratios": ratios,
            "step_ms": 1e3 * statistics.median(per_round[variant]),
        }
    if device.type == "cuda":
        result["sync_check"] = sync_check(workload, device, steps=10)
        unmonitored = peak_memory(workload, device, "none")
        result["peak_memory_ratio"] = peak_memory(workload, device, "relumon") / unmonitored
    return result


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="cpu-mlp,cpu-cnn", help=f"comma-separated, from {list(WORKLOADS)}")
    parser.add_argument(
        "--variants", default="none,none-aa,relumon,relumon-exact,relumon-opt,relumon-opt-exact,naive-item"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--report-every", type=int, default=50, help="relumon report() every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU workloads")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if variants[0] != "none":
        variants = ["none"] + [v for v in variants if v != "none"]

    print(
        f"relumon {relumon.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    results = []
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        if workload.device == "cuda" and not torch.cuda.is_available():
            print(f"{name}: skipped (no CUDA device)")
            continue
        result = run_workload(workload, variants, args.rounds, args.steps, args.warmup, args.report_every)
        results.append(result)
        cells = "  ".join(
            f"{v} {result[v]['ratio']:.3f}x [{result[v]['iqr'][0]:.3f}, {result[v]['iqr'][1]:.3f}]"
            for v in variants[1:]
        )
        extra = ""
        if "sync_check" in result:
            extra = f"  sync check: {result['sync_check']}  peak memory {result['peak_memory_ratio']:.4f}x"
        print(f"{name:<14} {result['step_ms']:8.2f} ms/step unmonitored  {cells}{extra}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
