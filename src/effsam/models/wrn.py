"""Wide residual networks (Zagoruyko & Komodakis, 2016) for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from effsam.models.small import scaled_channels


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, (dropout), BN-ReLU-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution of the pre-activated input, as in
    the reference implementation.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen: three stages of ``(depth - 4) / 6`` pre-activation blocks.

    Args:
        depth: Total depth; ``depth - 4`` must be divisible by 6 (e.g. 16, 28, 40).
        widen: Widening factor k; stage widths are 16k, 32k, 64k.
        dropout: Dropout probability between the convolutions of a block.
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Extra multiplier of every width (the stem's too).
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth!r}")
        if not widen > 0:
            raise ValueError(f"WideResNet widen must be positive, got {widen!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        stem = scaled_channels(16, width)
        widths = [scaled_channels(c * widen, width) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        blocks = []
        current = stem
        for i, channels in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(current, channels, 2 if i > 0 and j == 0 else 1, dropout))
                current = channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(current)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
