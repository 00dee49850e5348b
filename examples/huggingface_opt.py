"""Dead FFN units in a small OPT, watched by relumon while a Hugging Face ``Trainer`` trains it.

OPT's feed-forward blocks use ReLU (``fc1 -> activation_fn -> fc2``); Voita et al. (2023, "Neurons in Large
Language Models: Dead, N-gram, Positional") found that many of them never fire in the pretrained OPT models, most of
all in the early layers. This example builds a small OPT from its config (random weights, nothing downloaded),
trains it as a byte-level language model on text that ships with Python (the standard library's docstrings, read
from its source files), and
lets `relumon.huggingface.ReluMonitorCallback` watch ``model.decoder.layers.N.activation_fn``:

    python examples/huggingface_opt.py --out runs/huggingface_opt/docs   # about 1 to 3 minutes on a CPU
    tensorboard --logdir runs/huggingface_opt           # train/relumon/dead_fraction/... next to train/loss
    relumon summary runs/huggingface_opt                # the same per layer, at the terminal

It prints the share of dead FFN units per layer at each of the Trainer's logging steps, read from the callback's
public ``history`` after training. With ``--out DIR`` it also writes that table as Markdown
(``huggingface_opt_table.txt``), a line chart of it (``huggingface_opt_dead.png``) and relumon's dead-unit heatmap
(``huggingface_opt_dead_heatmap.png``) into DIR; ``--out docs/img`` regenerates the pictures and the table of
docs/huggingface.md, and nothing is written there unless asked. The run is seeded (``--seed``), so it repeats on one
machine; another CPU may round differently and move units at the edge.
A unit counts as dead in a window when its output was 0 for every token of every sequence the window measured
(about one micro-batch in four by default: see "Measured steps" in the README).
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import relumon
from relumon.huggingface import ReluMonitorCallback


def stdlib_text(limit: int) -> bytes:
    """Up to ``limit`` bytes of the docstrings of Python's standard library: a corpus that needs no download.

    Read from the source files with ``ast`` (nothing is imported), in file-name order.
    """
    chunks: list[bytes] = []
    size = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node)  # type: ignore[arg-type]
            if doc:
                chunks.append(doc.encode("utf-8", "replace") + b"\n\n")
                size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


class ByteBlocks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Consecutive blocks of ``length`` bytes; each is its own label (the model shifts it for next-byte loss)."""

    def __init__(self, data: bytes, length: int) -> None:
        ids = torch.tensor(list(data), dtype=torch.long)
        self.blocks = ids[: len(ids) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def small_opt(layers: int, hidden: int) -> Any:
    """A small OPT with ReLU FFNs (as every OPT size has), random weights, a byte vocabulary."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=hidden,
        activation_function="relu",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return OPTForCausalLM(config)


#: The names of the files ``--out`` writes.
TABLE, LINES, HEATMAP = "huggingface_opt_table.txt", "huggingface_opt_dead.png", "huggingface_opt_dead_heatmap.png"


def build_parser() -> argparse.ArgumentParser:
    """The example's command line (docs/huggingface.md names a command the tests parse with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs/huggingface_opt", help="the Trainer's output_dir")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and dropout")
    parser.add_argument("--picture", default=None, help="save the dead share per layer over training as a PNG")
    parser.add_argument("--out", default=None, help=f"write {TABLE}, {LINES} and {HEATMAP} into this directory")
    parser.add_argument("--quick", action="store_true", help="a tiny run for the tests")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.logging_steps, args.layers, args.hidden = 8, 4, 2, 32

    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    model = small_opt(args.layers, args.hidden)
    data = ByteBlocks(stdlib_text(200_000 if not args.quick else 20_000), length=64)
    callback = ReluMonitorCallback(on_dead="warn")
    training = TrainingArguments(
        args.logdir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20),
        logging_steps=args.logging_steps,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("always", relumon.DeadUnitsWarning)
        trainer.train()

    # The callback's timeline: (step, {layer: dead fraction}) per closed window, oldest first.
    history = callback.history
    layers = [f"model.decoder.layers.{i}.activation_fn" for i in range(args.layers)]
    print("\nshare of dead FFN units per layer (relumon, per logging window)")
    print("step  " + "  ".join(f"layer {i:<2}" for i in range(args.layers)))
    for step, fractions in history:
        cells = (f"{100 * fractions[name]:7.1f}%" if name in fractions else "      - " for name in layers)
        print(f"{step:>4}  " + "  ".join(cells))
    print(f"\nlast window:\n{callback.last_report}")
    print(f"\ntensorboard --logdir {args.logdir}")
    if args.picture:
        draw(history, layers, args.picture)
        print(f"picture: {args.picture}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / TABLE).write_text(markdown_table(history, layers))
        draw(history, layers, str(out / LINES))
        from relumon.figures import dead_heatmap_figure

        dead_heatmap_figure(history).savefig(out / HEATMAP)
        print(f"table and pictures: {out / TABLE}, {out / LINES}, {out / HEATMAP}")
    return {"timeline": history, "layers": layers, "report": callback.last_report}


def markdown_table(history: list[Any], layers: list[str]) -> str:
    """The share of dead FFN units per layer and logging step, as the Markdown table of docs/huggingface.md."""
    lines = ["| step | " + " | ".join(f"layer {i}" for i in range(len(layers))) + " |"]
    lines.append("|---:|" + "---:|" * len(layers))
    for step, fractions in history:
        cells = (f"{100 * fractions[name]:.1f}%" if name in fractions else "-" for name in layers)
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(timeline: list[Any], layers: list[str], path: str) -> None:
    """The dead share per layer over training, one line per layer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=110)
    axes = figure.subplots()
    steps = [step for step, _ in timeline]
    for i, name in enumerate(layers):
        shares = [100 * fractions.get(name, math.nan) for _, fractions in timeline]
        axes.plot(steps, shares, marker="o", markersize=3, label=f"layer {i}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("dead FFN units (%)")
    axes.set_title("Small OPT from scratch: dead FFN units per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


if __name__ == "__main__":
    main()
