"""ResNet-50/101 for ImageNet-sized inputs: 7x7 stem, max-pooling, bottleneck blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from effsam.models.small import scaled_channels


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetImageNet(nn.Module):
    """ImageNet ResNet with bottleneck blocks.

    Args:
        blocks: Number of blocks in each of the four stages.
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Multiplier of the base widths 64-128-256-512 (times 4 at the block outputs).
        zero_init_residual: Start each block's last BatchNorm at zero, so every block begins as
            the identity (helps large-batch training).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        widths = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        current = widths[0]
        for i, (count, channels) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(count):
                layers.append(Bottleneck(current, channels, 2 if i > 0 and j == 0 else 1))
                current = channels * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))
