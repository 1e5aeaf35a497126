"""Image classification folders in the ImageNet layout, decoded once into memory.

Layout::

    root/train/<class>/*.jpg|jpeg|png|...
    root/val/<class>/...        (``root/test/`` is used when there is no ``val/``)

Classes are the sorted subfolder names of ``train/``. Each image is converted to RGB, resized so
its shorter side is ``image_size`` and center-cropped to ``image_size`` x ``image_size``, then
stored as uint8. Everything is held in memory (``3 * image_size**2`` bytes per image, about
150 KB at 224), so this suits small sets: subsets of ImageNet, Imagenette, custom data. Decoding
uses Pillow, imported only when this loader runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from effsam.data.loader import CorruptDatasetError, DatasetNotFoundError, ImageData

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _list_split(split_dir: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    samples = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name not in class_index:
            raise CorruptDatasetError(
                f"{class_dir} is a class that {split_dir.parent / 'train'} does not have"
            )
        label = class_index[class_dir.name]
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((file, label))
    if not samples:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {split_dir}"
        )
    return samples


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """Decodes one image to uint8 ``[3, image_size, image_size]`` (shorter side, then center)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("the imagefolder data set needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = image_size / min(w, h)
            # Round, but never below the crop size, so the crop always fits.
            new_w = max(image_size, round(w * scale))
            new_h = max(image_size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left = (new_w - image_size) // 2
            top = (new_h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            return np.array(img, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as exc:
        raise CorruptDatasetError(f"cannot decode the image {path}: {exc}") from exc


def _decode_all(samples: list[tuple[Path, int]], image_size: int) -> tuple[torch.Tensor, ...]:
    x = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        x[i] = torch.from_numpy(decode_image(path, image_size))
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return x, y


def load_imagefolder(root: str | os.PathLike, image_size: int = 224) -> ImageData:
    """Loads ``root/train`` and ``root/val`` (or ``root/test``) into uint8 tensors.

    Args:
        root: Folder holding ``train/`` and ``val/``.
        image_size: Side of the square images after resizing and cropping.

    Returns:
        uint8 images with ImageNet's mean and std and ``augment="flip"``.

    Raises:
        DatasetNotFoundError: If a split folder or its images are missing.
        CorruptDatasetError: If an image cannot be decoded or ``val/`` has unknown classes.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    root = Path(root).expanduser()
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), root / "val")
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise DatasetNotFoundError(
                f"image folder {split_dir} not found: expected {root}/train/<class>/<images> and "
                f"{root}/val/<class>/<images> (set the root with data_dir / --data-dir)"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{train_dir} has no class subfolders")
    class_index = {name: i for i, name in enumerate(classes)}
    train_x, train_y = _decode_all(_list_split(train_dir, class_index), image_size)
    test_x, test_y = _decode_all(_list_split(test_dir, class_index), image_size)
    return ImageData(
        name="imagefolder",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment="flip",
        classes=tuple(classes),
    )
