"""Small CNNs for CPU-scale experiments, and the channel-scaling rule shared by all models."""

from __future__ import annotations

import torch
from torch import nn


def scaled_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, int(round(channels * width)))


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding, no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers for 8x8 digits, about 24k parameters at width 1.

    Global average pooling before the head lets it take any image size.

    Args:
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Multiplier of the widths 16-32-64.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (scaled_channels(c, width) for c in (16, 32, 64))
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, c1),
            conv_bn_relu(c1, c2),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(c2, c3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class CifarCNN(nn.Module):
    """Five conv-BN-ReLU layers of widths 16-32-32-64-64 with three max-poolings.

    About 71k parameters at width 1; on 32x32 inputs the last two convolutions see 8x8 and 4x4
    maps, then global average pooling feeds the linear head.

    Args:
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Multiplier of the widths.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled_channels(w, width) for w in (16, 32, 32, 64, 64)]
        pool = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, c[0]),
            conv_bn_relu(c[0], c[1]),
            pool,
            conv_bn_relu(c[1], c[2]),
            pool,
            conv_bn_relu(c[2], c[3]),
            pool,
            conv_bn_relu(c[3], c[4]),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(c[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))
