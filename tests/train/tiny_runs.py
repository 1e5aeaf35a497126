"""Tiny runs shared by the toolkit tests: synthetic 8x8 images, a small CNN, one thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effsam.train.config import Config, load_config
from effsam.train.records import TIMING_FIELDS

#: A run that takes well under a second per epoch on one CPU thread.
TINY: dict[str, Any] = {
    "data.dataset": "synthetic",
    "data.synthetic_shape": [3, 8, 8],
    "data.synthetic_classes": 4,
    "data.synthetic_train": 96,
    "data.synthetic_test": 40,
    "data.batch_size": 16,
    "data.eval_batch_size": 32,
    "model.name": "small_cnn",
    "model.width": 0.5,
    "train.epochs": 3,
    "train.threads": 1,
}

#: The same as command-line arguments.
TINY_ARGS: list[str] = [
    "--dataset", "synthetic",
    "--set", "data.synthetic_shape=[3, 8, 8]",
    "--set", "data.synthetic_classes=4",
    "--set", "data.synthetic_train=96",
    "--set", "data.synthetic_test=40",
    "--batch-size", "16",
    "--set", "data.eval_batch_size=32",
    "--model", "small_cnn",
    "--width", "0.5",
    "--epochs", "3",
    "--threads", "1",
]  # fmt: skip


def tiny_config(out_dir: Path, **overrides: Any) -> Config:
    """The tiny run, written under ``out_dir``; keyword keys use ``__`` for dots."""
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(None, {**TINY, "out_dir": str(out_dir), **extra})


def without_timing(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]
