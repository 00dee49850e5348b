"""Real code no one here wrote: Hugging Face ``transformers`` models with ReLU feed-forward layers (issue 24).

Each model is built offline from a tiny config, some units of one feed-forward layer are killed by construction (the
first Linear's weight rows zeroed and its bias set to -1e3), and relumon's units, samples and dead units are compared
with plain forward hooks on every ReLU module. Samples are batch rows: the batch size times the calls (attention
padding is not honoured, by either side), except where the model flattens its tokens to 2-D rows (OPT). FSMT runs its
layers sequence-first, ``(T, B, C)``, after a batch-first embedding.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor, nn

import relumon

transformers = pytest.importorskip("transformers")

BATCH, LENGTH, STEPS = 3, 7, 2
KILLED = [1, 4, 5]


def _opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16, activation_function="relu", dropout=0.0,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, feed_forward_proj="relu",
        dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        hidden_act="relu", max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def _seq2seq(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        common: dict[str, Any] = dict(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32, activation_function="relu",
        )  # fmt: skip
        if name == "fsmt":
            config = transformers.FSMTConfig(
                src_vocab_size=50, tgt_vocab_size=50, langs=["en", "de"], pad_token_id=1, decoder_start_token_id=2,
                **common,
            )  # fmt: skip
            return transformers.FSMTForConditionalGeneration(config)
        configs = {
            "marian": (transformers.MarianConfig, transformers.MarianMTModel),
            "m2m100": (transformers.M2M100Config, transformers.M2M100ForConditionalGeneration),
            "blenderbot_small": (
                transformers.BlenderbotSmallConfig,
                transformers.BlenderbotSmallForConditionalGeneration,
            ),
        }
        config_class, model_class = configs[name]
        return model_class(config_class(vocab_size=50, pad_token_id=0, decoder_start_token_id=2, **common))

    return make


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    # the model, and the Linear feeding the ReLU whose units are killed
    "opt": (_opt, "model.decoder.layers.1.fc1"),
    "t5": (_t5, "encoder.block.1.layer.1.DenseReluDense.wi"),
    "bert": (_bert, "bert.encoder.layer.0.intermediate.dense"),
    "marian": (_seq2seq("marian"), "model.decoder.layers.0.fc1"),
    "m2m100": (_seq2seq("m2m100"), "model.encoder.layers.0.fc1"),
    "fsmt": (_seq2seq("fsmt"), "model.encoder.layers.0.fc1"),
    "blenderbot_small": (_seq2seq("blenderbot_small"), "model.decoder.layers.0.fc1"),
}


class PlainHook:
    """Units along the last dim, dead when never positive; samples: the batch size per call."""

    def __init__(self, module: nn.Module) -> None:
        self.peak: Optional[Tensor] = None
        self.samples = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, out: Tensor) -> None:
        peak = out.detach().flatten(0, -2).amax(0)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        # OPT flattens its tokens, ``reshape(-1, D)``, before its feed-forward layer: the rows of a 2-D activation are
        # what relumon counts there (a documented limit: the batch is merged into them).
        self.samples += out.shape[0] if out.ndim == 2 else BATCH

    def figures(self) -> tuple[int, int, list[int]]:
        assert self.peak is not None
        return len(self.peak), self.samples, [int(i) for i in torch.nonzero(self.peak <= 0).flatten()]


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_models_match_plain_hooks(name: str) -> None:
    torch.manual_seed(0)
    make, killed_layer = MODELS[name]
    model = make()
    model.train()
    fc = model.get_submodule(killed_layer)
    with torch.no_grad():
        fc.weight[KILLED] = 0.0
        if fc.bias is not None:
            fc.bias[KILLED] = -1e3
        else:  # T5's feed-forward has no bias: a -1e3 weight column on a constant input would be needed, so rows of 0
            fc.weight[KILLED] = 0.0
    relus = {n: PlainHook(m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert relus, name
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relumon.watch(model, measure_every=1) as monitor:
            for _ in range(STEPS):
                ids = torch.randint(3, 50, (BATCH, LENGTH))
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
            report = monitor.report()
    said = [str(w.message) for w in caught if "does not tell" in str(w.message) or "skipped" in str(w.message)]
    assert not said, said
    killed_relu = None
    for relu_name, hook in relus.items():
        units, samples, dead = hook.figures()
        layer = report[relu_name]
        assert (layer.units, layer.samples, layer.dead_indices) == (units, samples, dead), relu_name
        if relu_name.startswith(killed_layer.rsplit(".", 1)[0]):
            killed_relu = layer
    assert killed_relu is not None and set(KILLED) <= set(killed_relu.dead_indices)
