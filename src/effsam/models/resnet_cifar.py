"""ResNet for 32x32 inputs: a 3x3 stem without max-pooling, as commonly used on CIFAR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from effsam.models.small import scaled_channels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            # A projection where the identity would not match in shape.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with four stages of basic blocks and a 3x3 stem.

    Args:
        blocks: Number of blocks in each of the four stages.
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Multiplier of the stage widths 64-128-256-512.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        current = widths[0]
        for i, (count, channels) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(current, channels, stride))
                current = channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNetCifar:
    """CIFAR ResNet-18: 11,173,962 parameters at width 1 with 10 classes."""
    return ResNetCifar((2, 2, 2, 2), num_classes, in_channels, width)
