"""A tiny OPT with a forced ground truth and a Trainer that runs offline on the CPU, for relumon.huggingface tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers import kill_units

VOCAB, SEQ, FFN = 64, 8, 32
#: Where a tiny OPT's FFN activations are: ``ACT2FN["relu"]`` modules, one per decoder layer.
ACTS = ("model.decoder.layers.0.activation_fn", "model.decoder.layers.1.activation_fn")


def tiny_opt(dead_layer0: bool = True, dead_units_layer1: int = 4, ffn: int = FFN, activation: str = "relu") -> Any:
    """A 2-layer OPT (hidden 16, FFN ``ffn`` (32), ``activation`` (ReLU)) built from its config, no download.

    Ground truth, forced by construction: layer 0's FFN is dead (fc1 bias -1e3: every unit's pre-activation is
    below -900, since the LayerNorm output times 0.02-scale weights is far smaller); in layer 1 exactly
    ``dead_units_layer1`` units are dead (zero rows, bias -1e3) and the others alive (bias +10). Plain SGD at the
    Trainer's default learning rate cannot move a bias by 900 or 10 in a few steps.
    """
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=ffn,
        num_attention_heads=2,
        max_position_embeddings=SEQ * 2,
        word_embed_proj_dim=16,
        activation_function=activation,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = OPTForCausalLM(config)
    layers = model.model.decoder.layers
    if dead_layer0:
        kill_units(layers[0].fc1, list(range(ffn)))
    with torch.no_grad():
        layers[1].fc1.bias.fill_(10.0)
    kill_units(layers[1].fc1, list(range(dead_units_layer1)))
    return model


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``n`` random token sequences of length ``SEQ``, their own labels (causal LM)."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: Path, **overrides: Any) -> Any:
    """Offline, quick, CPU ``TrainingArguments``: TensorBoard only, no checkpoints unless asked."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        per_device_train_batch_size=2,
        max_steps=6,
        logging_steps=2,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(out), **kwargs)


def trainer(
    out: Path, callbacks: list[Any], model: Any = None, n: int = 16, eval_dataset: Any = None, **overrides: Any
) -> Any:
    """A ``transformers.Trainer`` on a tiny OPT; TensorBoard event files somewhere under ``out`` (`event_dir`)."""
    from transformers import Trainer

    return Trainer(
        model=model if model is not None else tiny_opt(),
        args=training_args(out, **overrides),
        train_dataset=Tokens(n),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )


def event_dir(out: Path) -> Path:
    """The one directory under ``out`` holding TensorBoard event files (the Trainer names it by date and host)."""
    dirs = {path.parent for path in out.rglob("events.out.tfevents.*")}
    assert len(dirs) == 1, f"expected one TensorBoard run under {out}, found {sorted(dirs)}"
    return dirs.pop()
