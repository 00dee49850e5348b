"""Networks for the benchmarks, built here with the layer plans of torchvision's models (torchvision's wheel does not
load with the CPU torch build on this machine kind, see FIELD_NOTES): ResNet-18, DenseNet-121 and a stress of many
tiny layers. Scripts in this folder import it as ``nets`` (their own folder is first on ``sys.path``)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ``nn.ReLU(inplace=True)`` called twice, the second after ``out += x``.

    The one definition: the tests build their small ResNet from it too (``tests/nets.py``).
    """

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inp != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet18(num_classes: int = 1000) -> nn.Sequential:
    """ResNet-18: BasicBlock [2, 2, 2, 2], widths 64 to 512 (11.7 M parameters with 1000 classes)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inp = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(inp, width, stride), BasicBlock(width, width, 1)]
        inp = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    """torchvision's DenseNet layer: BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3 over the concatenated inputs."""

    def __init__(self, inp: int, growth: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inp, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, inp: int, growth: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(inp + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


def densenet121(num_classes: int = 1000) -> nn.Sequential:
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), bottleneck 4, 64 stem channels, transitions halving the
    channels (7.0 M parameters with 1000 classes; 121 ReLU call sites)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    channels = 64
    for i, count in enumerate((6, 12, 24, 16)):
        layers.append(DenseBlock(count, channels))
        channels += count * 32
        if i < 3:
            layers += [
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels // 2, 1, bias=False),
                nn.AvgPool2d(2, 2),
            ]
            channels //= 2
    layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


def tiny_layers(count: int = 2000, width: int = 4) -> nn.Sequential:
    """A stress of per-call cost: ``count`` × (Linear(width, width) + ReLU), where hooks dominate the step."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))
