"""Loss of plasticity on real data, and what recycling dead units does about it.

A continual stream of tasks on scikit-learn's handwritten digits (``load_digits``: 1,797 8x8 images that ship inside
the package, so this runs offline). Each task permutes the 64 pixels anew (Permuted MNIST, as in Dohare et al., Nature
2024, "Loss of plasticity in deep continual learning") or, with ``--stream labels``, reshuffles which digit maps to
which class. The same network keeps training from task to task, with no reset. Two runs start from the same weights
and see the same data: plain training, and the same training with ``relumon.watch(model, recycle="dead")``, which
re-initialises the units each window confirmed dead.

Per task it prints and saves the accuracy on the new task's held-out images after the task's training budget, and the
dead fraction at the end of the task. Run from the repository root:

    pip install -e ".[examples]"
    python examples/plasticity.py                 # about two minutes on a laptop CPU
    python examples/plasticity.py --quick         # seconds: what the tests run

It writes ``docs/img/plasticity.png`` (``--plot``) and a JSON of the figures (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import relumon


@dataclass
class Run:
    """One run's figures, per task."""

    name: str
    accuracy: list[float] = field(default_factory=list)  #: on the new task's held-out images, after its budget
    dead_fraction: list[float] = field(default_factory=list)  #: over all hidden units, the task's last window
    recycled: list[int] = field(default_factory=list)  #: units recycled during the task
    dead_again: list[float] = field(default_factory=list)  #: share of recycled units dead again in the next window
    #: Held-out logits compared right before and after each recycling: how many, how many moved, predictions flipped.
    held_out: list[int] = field(default_factory=lambda: [0, 0, 0])


def load_digits_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits, scaled to [0, 1], split 1,400 / 397 by a seeded shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_model(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    inp = 64
    for _ in range(depth):
        layers += [nn.Linear(inp, width), nn.ReLU()]
        inp = width
    layers.append(nn.Linear(inp, 10))
    return nn.Sequential(*layers)


def tasks(stream: str, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per task: a pixel permutation and a label permutation (one of them the identity)."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(count):
        pixels = torch.randperm(64, generator=gen) if stream == "pixels" else torch.arange(64)
        labels = torch.randperm(10, generator=gen) if stream == "labels" else torch.arange(10)
        out.append((pixels, labels))
    return out


def train_stream(
    name: str,
    recycle: Optional[str],
    args: argparse.Namespace,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> Run:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)  # the same initial weights and batches in both runs
    model = make_model(args.width, args.depth)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    run = Run(name)
    batches = torch.Generator().manual_seed(args.seed + 2)
    # measure_every=1: every step measured, so every window is exact and recycling may act on it.
    with relumon.watch(model, measure_every=1, on_dead="ignore", recycle=recycle) as monitor:
        monitor.optimizers = [opt]
        for pixels, labels in tasks(args.stream, args.tasks, args.seed):
            xt, yt = x_train[:, pixels], labels[y_train]
            recycled, dead_again = 0, []
            for step in range(1, args.steps + 1):
                idx = torch.randint(0, len(yt), (args.batch,), generator=batches)
                model.train()
                opt.zero_grad()
                loss_fn(model(xt[idx]), yt[idx]).backward()
                opt.step()
                if step % args.window == 0:
                    # The promise is "the same function on the window's samples": measure what moves elsewhere.
                    model.eval()
                    with torch.no_grad():
                        before = model(x_test[:, pixels])
                    report = monitor.report()
                    if report.recycled is not None and report.recycled.total:
                        with torch.no_grad():
                            after = model(x_test[:, pixels])
                        run.held_out[0] += before.numel()
                        run.held_out[1] += int((after != before).sum())
                        run.held_out[2] += int((after.argmax(1) != before.argmax(1)).sum())
                    recycled += sum(layer.recycled_units or 0 for layer in report)
                    checked = sum(layer.recycled_checked for layer in report)
                    if checked:
                        dead_again.append(sum(layer.recycled_dead_again for layer in report) / checked)
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_test[:, pixels]).argmax(1) == labels[y_test]).float().mean().item()
            run.accuracy.append(accuracy)
            run.dead_fraction.append(report.dead_fraction)
            run.recycled.append(recycled)
            run.dead_again.append(sum(dead_again) / len(dead_again) if dead_again else math.nan)
    return run


def plot(runs: list[Run], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_dead) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"plain": "#c0392b", "recycle": "#2471a3"}
    for run in runs:
        tasks_axis = range(1, len(run.accuracy) + 1)
        ax_acc.plot(tasks_axis, [100 * a for a in run.accuracy], label=run.name, color=colors.get(run.name))
        ax_dead.plot(tasks_axis, [100 * d for d in run.dead_fraction], label=run.name, color=colors.get(run.name))
    ax_acc.set(xlabel="task", ylabel="accuracy on the new task (%)", title="Plasticity: accuracy on each new task")
    ax_dead.set(xlabel="task", ylabel="dead hidden units (%)", title="Dead units at the end of each task")
    for ax in (ax_acc, ax_dead):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"load_digits, {args.stream} stream: MLP {args.depth}x{args.width}, Adam lr {args.lr}, "
        f"{args.steps} steps of {args.batch} per task",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", choices=("pixels", "labels"), default="pixels", help="what changes per task")
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300, help="training steps per task")
    parser.add_argument("--window", type=int, default=50, help="steps per relumon window (recycling follows each)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write the figure here (e.g. docs/img/plasticity.png)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-task figures here")
    parser.add_argument("--quick", action="store_true", help="4 tasks of 40 steps: a smoke run for tests and CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps, args.window, args.width = 4, 40, 20, 32
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread, and a busy machine is not oversubscribed
    torch.use_deterministic_algorithms(True)  # with one thread: the same figures for a seed on a machine kind
    try:
        data = load_digits_tensors(args.seed)
        start = time.perf_counter()
        runs = [train_stream("plain", None, args, data), train_stream("recycle", "dead", args, data)]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    print(f"{args.stream} stream, {args.tasks} tasks x {args.steps} steps, {seconds:.0f} s")
    print("task  plain acc  recycle acc  plain dead  recycle dead  recycled")
    for t in range(args.tasks):
        plain, recycled = runs[0], runs[1]
        print(
            f"{t + 1:>4}  {100 * plain.accuracy[t]:>8.1f}%  {100 * recycled.accuracy[t]:>10.1f}%  "
            f"{100 * plain.dead_fraction[t]:>9.1f}%  {100 * recycled.dead_fraction[t]:>11.1f}%  "
            f"{recycled.recycled[t]:>8}"
        )
    last = max(1, args.tasks // 4)
    for run in runs:
        acc = sum(run.accuracy[-last:]) / last
        print(
            f"{run.name:>8}: mean accuracy over the last {last} tasks {100 * acc:.1f}%, dead at the end "
            f"{100 * run.dead_fraction[-1]:.1f}%"
        )
    compared, moved, flipped = runs[1].held_out
    if compared:
        print(
            f"held-out logits right before and after each recycling: {moved:,} of {compared:,} moved, "
            f"{flipped:,} predictions flipped"
        )
    if args.plot is not None:
        plot(runs, args.plot, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "seconds": seconds,
                    "runs": [asdict(r) for r in runs],
                },
                indent=1,
            )
        )
    return runs


if __name__ == "__main__":
    main()
