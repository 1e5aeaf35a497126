"""Random, learnable image-shaped data of any size, for tests and timing runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effsam.data.loader import ImageData, channel_stats, derive_seed

#: How far apart the class means are, relative to the unit noise. Low enough that a model must
#: learn, high enough that a few steps of a small network beat chance clearly.
SIGNAL = 0.5


def make_synthetic(
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    num_train: int = 512,
    num_test: int = 256,
    seed: int = 0,
) -> ImageData:
    """Draws Gaussian images whose mean depends on the class.

    Each class has a fixed random prototype image; a sample is ``SIGNAL * prototype + noise`` with
    standard normal noise. Labels cycle through the classes before shuffling, so every class is
    equally represented (up to one sample).

    Args:
        shape: ``(C, H, W)`` of one image.
        num_classes: Number of classes, >= 2.
        num_train: Training samples, >= 1.
        num_test: Test samples, >= 1.
        seed: Everything is a function of this seed.

    Returns:
        float32 images with mean and std measured on the training split, augment ``"none"``.
    """
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"synthetic shape must be three positive integers (C, H, W), got {shape}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"synthetic classes must be an integer >= 2, got {num_classes!r}")
    for label, value in (("train", num_train), ("test", num_test)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic {label} size must be a positive integer, got {value!r}")
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x5E7))
    prototypes = torch.randn((num_classes, *shape), generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = SIGNAL * prototypes[y] + torch.randn((n, *shape), generator=gen)
        return x.float(), y.long()

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    mean, std = channel_stats(train_x)
    return ImageData(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment="none",
        classes=tuple(str(c) for c in range(num_classes)),
    )
