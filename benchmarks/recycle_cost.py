"""The cost of one `Monitor.recycle` call on a ResNet-18-sized model (11.7 M parameters), with Adam state.

Recycling runs at report time, not in the training step, so its cost is per call: the first call after the wiring
was recorded also derives the wiring from the recorded autograd graph; later calls reuse it. Each round forces 10 %
of the channels of every BasicBlock's first BatchNorm dead (bias -1e3), takes one training step, closes the window
and times the recycle call alone. torchvision is not needed: the network is built in benchmarks/nets.py
(BasicBlock [2, 2, 2, 2], widths 64 to 512, a 1000-way head).

    python benchmarks/recycle_cost.py --rounds 5 --size 64 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from nets import BasicBlock, resnet18  # benchmarks/nets.py: this script's folder is first on sys.path
from torch import nn

import relumon


def main() -> None:
    torch.set_num_threads(1)  # a steady figure on a shared machine; recycling itself is mostly small copies
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="input image side")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))

    def step() -> None:
        for block in blocks:
            with torch.no_grad():
                block.bn1.bias[: block.bn1.num_features // 10] = -1e3
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        step()
        monitor.report()
        monitor.recycle(opt)  # arms the wiring probe: the next forward is recorded
        timings = {"report": [], "recycle": []}
        first = None
        for _ in range(args.rounds + 1):
            step()
            start = time.perf_counter()
            monitor.report()
            timings["report"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = monitor.recycle(opt)
            elapsed = time.perf_counter() - start
            if first is None:
                first = elapsed
                first_result = result
            else:
                timings["recycle"].append(elapsed)
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-18-like: {params / 1e6:.1f} M parameters, {len(monitor.names)} call sites, Adam state")
    print(
        f"recycled {first_result.total} units in {len(first_result.units)} sites; "
        f"skipped {len(first_result.skipped)} sites with candidates"
    )
    print(f"first recycle call (derives the wiring): {1e3 * first:.1f} ms")
    print(f"later recycle calls, median of {args.rounds}: {1e3 * statistics.median(timings['recycle']):.1f} ms")
    print(f"report(), median: {1e3 * statistics.median(timings['report']):.1f} ms")


if __name__ == "__main__":
    main()
