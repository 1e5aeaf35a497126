"""Data sets held in memory as tensors, and a seeded batch loader with batched augmentation.

Example:
    >>> from effsam.data import load_dataset, BatchLoader
    >>> data = load_dataset("digits")
    >>> loader = BatchLoader(data.train_x, data.train_y, 64, shuffle=True, drop_last=False,
    ...                      seed=0, augment=data.augment, mean=data.mean, std=data.std)
    >>> loader.set_epoch(0)
    >>> x, y = next(iter(loader))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from effsam.data.augment import augment_batch, cutout_batch
from effsam.data.cifar import download_cifar, load_cifar, resolve_data_dir
from effsam.data.digits import load_digits
from effsam.data.imagefolder import load_imagefolder
from effsam.data.loader import (
    AUGMENTATIONS,
    BatchLoader,
    ChecksumError,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
    ImageData,
    stratified_indices,
)
from effsam.data.noise import (
    LabelNoise,
    check_label_noise,
    indices_digest,
    symmetric_label_noise,
)
from effsam.data.synthetic import make_synthetic

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder")
#: Image side each data set has natively; ``image_size`` may only restate it.
_NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BatchLoader",
    "ChecksumError",
    "CorruptDatasetError",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageData",
    "LabelNoise",
    "augment_batch",
    "cutout_batch",
    "download_cifar",
    "indices_digest",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_imagefolder",
    "make_synthetic",
    "resolve_data_dir",
    "stratified_indices",
    "symmetric_label_noise",
]


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    download: bool = False,
    allow_unverified: bool = False,
    image_size: int | None = None,
    synthetic_shape: Sequence[int] = (3, 32, 32),
    synthetic_classes: int = 10,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    label_noise: float = 0.0,
    label_noise_seed: int = 0,
) -> ImageData:
    """Loads a data set by name into memory.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Where CIFAR is looked for (else ``$EFFSAM_DATA_DIR``, else ``./data``), or the
            root of an image folder (holding ``train/`` and ``val/``).
        train_subset: Keep a class-balanced subset of this many training images, drawn from
            ``seed``; None keeps all.
        seed: Seed of the subset and of the synthetic data. The digits split does not depend on
            it.
        download: Download CIFAR if it is missing (not possible for an image folder; ignored by
            the built-in data sets).
        allow_unverified: Skip CIFAR's checksum checks.
        image_size: Side of image-folder images (default 224). Other data sets have a fixed size
            that this may only restate.
        synthetic_shape: ``(C, H, W)`` of synthetic images.
        synthetic_classes: Number of synthetic classes.
        synthetic_train: Number of synthetic training images.
        synthetic_test: Number of synthetic test images.
        label_noise: Fraction in ``[0, 1)`` of the training images (after the subset is taken)
            whose label is replaced by a uniformly random class, which may be the true one
            (:func:`symmetric_label_noise`); 0 leaves the labels untouched. The test set is
            never changed.
        label_noise_seed: Seed of that choice and of the new labels, independent of ``seed``.

    Returns:
        The data set as an :class:`ImageData`; with label noise, its ``label_noise`` says what
        was done.

    Raises:
        ValueError: For an unknown name or invalid options.
        DatasetError: If the files are missing, corrupted or fail their checksums.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    check_label_noise(label_noise, label_noise_seed)  # before any loading
    if image_size is not None and name in _NATIVE_SIZE and image_size != _NATIVE_SIZE[name]:
        raise ValueError(
            f"image_size {image_size} does not apply to {name}, whose images are "
            f"{_NATIVE_SIZE[name]}x{_NATIVE_SIZE[name]}"
        )
    if name == "digits":
        data = load_digits()
    elif name == "synthetic":
        if image_size is not None and tuple(synthetic_shape)[1:] != (image_size, image_size):
            raise ValueError(f"image_size {image_size} disagrees with synthetic_shape")
        data = make_synthetic(
            synthetic_shape, synthetic_classes, synthetic_train, synthetic_test, seed=seed
        )
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, data_dir, download=download, allow_unverified=allow_unverified)
    else:
        if download:
            raise ValueError("download=True is not possible for imagefolder: copy the files")
        data = load_imagefolder(resolve_data_dir(data_dir), image_size or 224)
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, int):
            raise ValueError(f"train_subset must be an integer, got {train_subset!r}")
        size = len(data.train_y)
        if not 1 <= train_subset <= size:
            raise ValueError(
                f"train_subset {train_subset} is out of range: {name} has {size} training images"
            )
        keep = stratified_indices(data.train_y, train_subset, seed)
        data = dataclasses.replace(
            data, train_x=data.train_x[keep].contiguous(), train_y=data.train_y[keep].contiguous()
        )
    if label_noise:
        noisy, record = symmetric_label_noise(
            data.train_y, data.num_classes, label_noise, label_noise_seed
        )
        data = dataclasses.replace(data, train_y=noisy, label_noise=record)
    return data
