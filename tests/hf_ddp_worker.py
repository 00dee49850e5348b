"""One rank of a 2-process DDP ``transformers.Trainer`` run on the CPU (gloo), launched by torchrun.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_worker.py OUT_DIR``. Each rank writes
``OUT_DIR/rank<r>.json``: its callback's last report, the DeadUnitsWarnings it issued, and the ground truth taken by
a plain forward hook on layer 1's activation (this rank's per-unit peak over every training forward, and the
peak over both ranks, all-reduced with MAX at the end).
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import relumon  # noqa: E402
from relumon.huggingface import ReluMonitorCallback  # noqa: E402
from tests.hf_helpers import ACTS, Tokens, tiny_opt, trainer  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    torch.manual_seed(0)  # the same model on both ranks, as DDP requires
    model = tiny_opt(dead_units_layer1=4)
    with torch.no_grad():
        # Unit 4 of layer 1 fires on rank 1's tokens only: their embeddings carry +5 in dim 0, rank 0's -5, which
        # dominates the pre-FFN LayerNorm (about +-3.9 after it); the unit reads dim 0 alone, with a bias of -1.
        model.model.decoder.embed_tokens.weight[:32, 0] = -5.0
        model.model.decoder.embed_tokens.weight[32:, 0] = 5.0
        fc1 = model.model.decoder.layers[1].fc1
        fc1.weight[4].zero_()
        fc1.weight[4, 0] = 1.0
        fc1.bias[4] = -1.0
    peak = torch.full((32,), -float("inf"))

    def ground_truth(module: Any, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            peak.copy_(torch.maximum(peak, output.detach().reshape(-1, 32).amax(0)))

    model.model.decoder.layers[1].activation_fn.register_forward_hook(ground_truth)
    callback = ReluMonitorCallback(measure_every=1)
    run = trainer(out, [callback], model=model, max_steps=4, logging_steps=2, ddp_backend="gloo", ddp_timeout=60)
    run.train_dataset = RankTokens(16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train()
    rank = dist.get_rank()
    local_peak = peak.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    report = callback.last_report
    assert report is not None
    result = {
        "world_size": dist.get_world_size(),
        "steps": report.steps,
        "layers": {name: {"dead_units": report[name].dead_units, "samples": report[name].samples} for name in ACTS},
        "dead_warnings": [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)],
        "local_dead_layer1": int((local_peak <= 0).sum()),
        "global_dead_layer1": int((peak <= 0).sum()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


class RankTokens(Tokens):
    """Tokens whose range depends on the rank that reads them: the ranks' activations differ."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i] % 32 + 32 * dist.get_rank()
        return {"input_ids": ids, "labels": ids}


if __name__ == "__main__":
    main(sys.argv[1])
    # Teardown in an order that cannot deadlock (see tests/launch.py): main's Trainer, which holds the DDP wrapper, is
    # gone with main's frame; collect cycles, then destroy the group while nothing else holds it.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
