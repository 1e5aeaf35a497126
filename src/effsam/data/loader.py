"""In-memory data sets and a seeded, shardable batch loader.

Every data set is held as whole tensors, and batches are cut from them by index: no worker
processes, no per-sample Python objects. All randomness of an epoch (order and augmentation) is
derived from ``(seed, epoch)`` alone, so a run resumed at an epoch boundary, or at any batch of an
epoch, sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from effsam.data.augment import augment_batch, cutout_batch

if TYPE_CHECKING:
    from effsam.data.noise import LabelNoise

#: Augmentation recipes understood by :class:`BatchLoader`.
AUGMENTATIONS = ("none", "flip", "cifar")


class DatasetError(RuntimeError):
    """A data set could not be loaded: missing, corrupted or failing its checksum."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a data set are not where they were looked for."""


class ChecksumError(DatasetError):
    """A data file's checksum matches none of the accepted values."""


class CorruptDatasetError(DatasetError):
    """A data file is present but cannot be read (truncated, bad pickle, wrong shapes)."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image data set held in memory.

    Attributes:
        name: Data set name, one of ``effsam.data.DATASETS``.
        train_x: Training images ``[N, C, H, W]``, uint8 (0..255) or float32.
        train_y: Training labels, int64 ``[N]``.
        test_x: Test images, same layout and dtype as ``train_x``.
        test_y: Test labels, int64.
        num_classes: Number of classes.
        mean: Per-channel mean in the scale of the float images (uint8 images are divided by 255).
        std: Per-channel standard deviation, same scale as ``mean``.
        augment: Training augmentation recipe, one of ``AUGMENTATIONS``.
        classes: Class names, index-aligned with the labels.
        label_noise: What symmetric label noise did to ``train_y`` (None: the labels are
            clean); see :mod:`effsam.data.noise`.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    classes: tuple[str, ...] = ()
    label_noise: LabelNoise | None = None

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dim() != 4:
                raise ValueError(
                    f"{self.name} {split}_x must be [N, C, H, W], got {tuple(x.shape)}"
                )
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{self.name} {split}_y has shape {tuple(y.shape)}, expected [{x.shape[0]}]"
                )
        channels = self.train_x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean {self.mean} / std {self.std} need {channels} channel values"
            )
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment {self.augment!r} is not one of {AUGMENTATIONS}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


def derive_seed(*parts: int) -> int:
    """Mixes integers into one 63-bit seed, so nearby inputs give unrelated streams."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Chooses ``n`` indices whose class proportions match those of ``labels``.

    Each class gets ``floor(n * share)`` slots, and the slots left over go to the classes with the
    largest remainders (ties to the lower class index), so the counts are reproducible without
    floating-point surprises. Within a class the members are drawn at random from ``seed``.

    Args:
        labels: int64 labels ``[N]``.
        n: Number of indices to choose, ``1 <= n <= N``.
        seed: Seed of the draw.

    Returns:
        The chosen indices, sorted ascending.

    Raises:
        ValueError: If ``n`` is out of range.
    """
    total = int(labels.numel())
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"subset size {n!r} must be an integer between 1 and {total}")
    classes, counts = torch.unique(labels, return_counts=True)
    # Integer arithmetic: quota = n*count/total, split into whole and remainder parts.
    scaled = counts * n
    quota = scaled // total
    remainder = scaled % total
    short = n - int(quota.sum())
    if short:
        order = sorted(range(len(classes)), key=lambda i: (-int(remainder[i]), i))
        for i in order[:short]:
            quota[i] += 1
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x5B5E7))
    chosen = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.sort(torch.cat(chosen)).values


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of float images ``[N, C, H, W]``."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    std = flat.std(dim=1, correction=0).clamp_min(1e-8)
    return tuple(flat.mean(dim=1).tolist()), tuple(std.tolist())


class BatchLoader:
    """Iterates over in-memory tensors in batches, with seeded shuffling and augmentation.

    Sharding across ``world_size`` ranks follows ``torch.utils.data.DistributedSampler``: all ranks
    draw the same permutation for an epoch; it is padded by wrapping around (or, with
    ``drop_last``, truncated) to a multiple of ``world_size``, and rank ``r`` takes every
    ``world_size``-th index starting at ``r``. Every rank therefore yields the same number of
    batches.

    Augmentation of batch ``b`` uses a generator seeded from ``(seed, epoch, rank, b)``, so any
    batch of any epoch can be reproduced on its own. Crop and flip act on the raw images (zero
    padding is black), Cutout on the normalised ones (the erased square becomes the mean colour),
    matching the usual CIFAR pipelines.

    Args:
        x: Images ``[N, C, H, W]``, uint8 (converted to float in [0, 1]) or float.
        y: Labels ``[N]``.
        batch_size: Samples per batch on this rank.
        shuffle: Draw a new permutation each epoch; otherwise keep the stored order.
        drop_last: Drop the tail that does not fill a whole batch (and the samples that do not
            split evenly across ranks) instead of yielding a short last batch.
        seed: Base seed of order and augmentation.
        augment: ``"none"``, ``"flip"`` (horizontal flip) or ``"cifar"`` (pad-4 crop and flip).
        cutout: Side of the Cutout square (0 disables), applied with probability 0.5.
        mean: Per-channel mean to subtract (float scale); None leaves the data unnormalised.
        std: Per-channel standard deviation to divide by; None leaves the data unnormalised.
        rank: Index of this process among ``world_size``.
        world_size: Number of processes sharing the data.
        device: Where batches are delivered.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: str = "none",
        cutout: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y has shape {tuple(y.shape)}, expected [{x.shape[0]}]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment {augment!r} is not one of {AUGMENTATIONS}")
        if not isinstance(cutout, int) or cutout < 0:
            raise ValueError(f"cutout must be a non-negative integer, got {cutout!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} must satisfy 0 <= rank < world_size={world_size}")
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together")
        channels = x.shape[1]
        self._mean = self._std = None
        if mean is not None and std is not None:
            if len(mean) != channels or len(std) != channels:
                raise ValueError(f"mean {tuple(mean)} / std {tuple(std)} need {channels} values")
            if any(s <= 0 for s in std):
                raise ValueError(f"std values must be positive, got {tuple(std)}")
            self._mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
            self._std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.x, self.y = x, y.long()
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.augment, self.cutout = seed, augment, cutout
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        n = x.shape[0]
        if drop_last:
            self.samples_per_rank = n // world_size
            self._num_batches = self.samples_per_rank // batch_size
        else:
            self.samples_per_rank = -(-n // world_size)
            self._num_batches = -(-self.samples_per_rank // batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order and augmentation the next iteration reproduces."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def indices(self) -> torch.Tensor:
        """Sample indices this rank visits in the current epoch, in order."""
        n = self.x.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            # Wrap around (repeatedly if the data set is smaller than world_size).
            order = order.repeat(-(-total // n))
        order = order[:total]
        return order[self.rank :: self.world_size]

    def batch(
        self, index: int, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Builds batch ``index`` of the current epoch (random access, for resuming mid-epoch)."""
        if not 0 <= index < self._num_batches:
            raise IndexError(f"batch {index} out of range for {self._num_batches} batches")
        if indices is None:
            indices = self.indices()
        idx = indices[index * self.batch_size : (index + 1) * self.batch_size]
        xb = self.x[idx].to(self.device, non_blocking=True)
        yb = self.y[idx].to(self.device, non_blocking=True)
        gen = None
        if self.augment != "none" or self.cutout:
            gen = torch.Generator().manual_seed(
                derive_seed(self.seed, self.epoch, self.rank, index, 0xA06)
            )
        if self.augment != "none":
            xb = augment_batch(xb, gen, crop=self.augment == "cifar", flip=True)
        xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
        if self._mean is not None:
            xb = (xb - self._mean.to(xb.device)) / self._std.to(xb.device)
        if self.cutout:
            xb = cutout_batch(xb, gen, self.cutout)
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.indices()
        for b in range(self._num_batches):
            yield self.batch(b, indices)
