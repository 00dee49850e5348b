"""Blame: facts about the module that fed a dying activation, found from the forward pass.

The feeding module is the one whose output tensor the activation received in the first training forward (see
`relumon.hooks.ProducerTracer`), not a guess from names. The facts are read at report time only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["describe_module", "blame"]


def describe_module(module: nn.Module) -> str:
    """A short description: ``Linear 512→256``, ``Conv2d 64→128 3×3``, ``BatchNorm2d(64)``."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{kind} {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "×".join(str(k) for k in module.kernel_size)
        return f"{kind} {module.in_channels}→{module.out_channels} {kernel}"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{kind}({module.num_features})"
    return kind


def _bias_facts(bias: Tensor, dead_mask: Tensor) -> list[str]:
    b = bias.detach().float().cpu()
    facts = [f"{100 * float((b < 0).float().mean()):.0f}% of its biases are negative, mean {float(b.mean()):+.3g}"]
    if 0 < int(dead_mask.sum()) < b.numel():
        dead_b = b[dead_mask]
        facts.append(
            f"the dead units' biases: {100 * float((dead_b < 0).float().mean()):.0f}% negative, "
            f"mean {float(dead_b.mean()):+.3g}"
        )
    return facts


def blame(layer_name: str, fed_by: str, module: nn.Module, dead_mask: Tensor) -> Optional[str]:
    """Explain a layer's dead units by the module that fed it.

    Args:
        layer_name: the activation's call-site name.
        fed_by: the feeding module's path.
        module: the feeding module.
        dead_mask: CPU bool per unit of the activation.

    Returns:
        e.g. "`fc2` (Linear 512→256) feeds `act2`: 98% of its biases are negative, mean -3.1; its weight gradient
        norm is 0", or None when the module has nothing to say.
    """
    facts: list[str] = []
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.numel() == dead_mask.numel():
        facts += _bias_facts(bias, dead_mask)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.grad is not None:
        with torch.no_grad():
            facts.append(f"its weight gradient norm is {float(weight.grad.float().norm()):.3g}")
    if not facts:
        return None
    return f"`{fed_by}` ({describe_module(module)}) feeds `{layer_name}`: " + "; ".join(facts)
