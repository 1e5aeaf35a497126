"""PyramidNet (Han, Kim & Kim, 2017) for 32x32 inputs, with additive widening.

Block ``i`` of the ``N = 3n`` residual blocks has ``round(16 + alpha * i / N)`` channels, so the
width grows linearly from 16 to ``16 + alpha``. Blocks have no ReLU at their input and end with
BatchNorm; the shortcut is the identity (average-pooled where the block strides) zero-padded to
the new channel count, so shortcuts add no parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from effsam.models.small import scaled_channels


def _zero_padded_shortcut(x: torch.Tensor, channels: int, stride: int) -> torch.Tensor:
    if stride != 1:
        x = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
    extra = channels - x.shape[1]
    # F.pad pads from the last dimension backwards: (W, W, H, H, C_front, C_back).
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra > 0 else x


class PyramidBasicBlock(nn.Module):
    """BN, conv3x3, BN, ReLU, conv3x3, BN."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = channels
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + _zero_padded_shortcut(x, self.out_channels, self.stride)


class PyramidBottleneck(nn.Module):
    """BN, conv1x1, BN, ReLU, conv3x3, BN, ReLU, conv1x1 (x4 channels), BN."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = channels * self.expansion
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, self.out_channels, 1, bias=False),
            nn.BatchNorm2d(self.out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + _zero_padded_shortcut(x, self.out_channels, self.stride)


class PyramidNet(nn.Module):
    """PyramidNet with additive widening.

    Args:
        depth: Total depth; ``depth - 2`` must be divisible by 6 (basic blocks) or 9
            (bottlenecks).
        alpha: Total width increase over the network.
        bottleneck: Use bottleneck blocks instead of basic blocks.
        num_classes: Outputs of the linear head.
        in_channels: Channels of the input images.
        width: Multiplier of the stem width 16 and of ``alpha``.
    """

    def __init__(
        self,
        depth: int = 110,
        alpha: float = 270,
        bottleneck: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        per_block = 9 if bottleneck else 6
        if not isinstance(depth, int) or depth < 2 + per_block or (depth - 2) % per_block:
            kind = "bottleneck" if bottleneck else "basic"
            raise ValueError(
                f"PyramidNet depth must be {per_block}n + 2 with n >= 1 for {kind} blocks, "
                f"got {depth!r}"
            )
        if alpha < 0:
            raise ValueError(f"PyramidNet alpha must be non-negative, got {alpha!r}")
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        n = (depth - 2) // per_block
        total = 3 * n
        start = 16 * width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, scaled_channels(16, width), 3, 1, 1, bias=False),
            nn.BatchNorm2d(scaled_channels(16, width)),
        )
        blocks = []
        current = scaled_channels(16, width)
        for i in range(1, total + 1):
            # Computed from i directly rather than accumulated, so no rounding drift builds up.
            channels = max(1, int(round(start + alpha * width * i / total)))
            stride = 2 if i in (n + 1, 2 * n + 1) else 1
            blocks.append(block(current, channels, stride))
            current = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(current), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(current, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))
