"""Real-network shapes built here (no torchvision): a small ResNet of BasicBlocks and a MobileNetV2-style stack.

Both follow their model-zoo originals where it matters to relumon: BasicBlock calls one ``nn.ReLU(inplace=True)``
twice, the second time after an in-place residual add, with a conv + BatchNorm downsample shortcut when the shape
changes; MobileNetV2 uses Conv-BN-``nn.ReLU6(inplace=True)`` and inverted residual blocks whose residual add is not a
module. Ground truth is forced with BatchNorm biases (``-1e3``: dead; ``+1e3``: saturated ReLU6). `BasicBlock` is
benchmarks/nets.py's (its ResNet-18 is built from it), re-exported here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from benchmarks.nets import BasicBlock  # the one definition, shared with the benchmarks


class SmallResNet(nn.Module):
    """stem (conv-bn-relu) -> layer1 (2 blocks, 8 ch) -> layer2 (8->16 stride 2, 16) -> layer3 (16->32 stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


RESNET_SITES = [
    "relu",
    "layer1.0.relu",
    "layer1.0.relu.call2",
    "layer1.1.relu",
    "layer1.1.relu.call2",
    "layer2.0.relu",
    "layer2.0.relu.call2",
    "layer2.1.relu",
    "layer2.1.relu.call2",
    "layer3.0.relu",
    "layer3.0.relu.call2",
]


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [conv_bn_relu6(inp, hidden, 1)] if expand != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class SmallMobileNetV2(nn.Module):
    """features: stem, four inverted residual blocks (two with residual adds), a 1x1 head; then pool and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(3, 8, stride=2),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 12, 1, 4),
            conv_bn_relu6(12, 24, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


MOBILENET_SITES = [
    "features.0.2",
    "features.1.conv.0.2",
    "features.2.conv.0.2",
    "features.2.conv.1.2",
    "features.3.conv.0.2",
    "features.3.conv.1.2",
    "features.4.conv.0.2",
    "features.4.conv.1.2",
    "features.5.2",
]


def set_bias(bn: nn.Module, value: float, channels: Optional[slice] = None) -> None:
    """Set a BatchNorm's bias (all channels, or ``channels``) to ``value``."""
    with torch.no_grad():
        bn.bias[channels if channels is not None else slice(None)] = value  # type: ignore[index]


def train(model: nn.Module, steps: int = 2, batch: int = 6, size: int = 12) -> None:
    """Forward + backward on random images, without an optimizer step (forced weights stay as set)."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(batch, 3, size, size, generator=gen)).sum().backward()
