"""Symmetric label noise on a training set, fixed by its own seed.

The recipe, exactly (so that anyone can recompute it from the seed)::

    n = len(labels); k = round(rate * n)          # Python's round: halves to even
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k].sort().values
    new = torch.randint(0, num_classes, (k,), generator=gen)
    labels[chosen] = new                          # the i-th draw to the i-th smallest index

Each chosen sample's label is *replaced* by a class drawn uniformly from all classes, so it may
coincide with the true one (the symmetric noise of Zhang et al., 2017, and Foret et al., 2021):
about ``rate * (1 - 1 / num_classes)`` of the labels actually change.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Hex digits kept of the SHA-256 of the chosen indices.
DIGEST_CHARS = 16


@dataclass(frozen=True, eq=False)
class LabelNoise:
    """What :func:`symmetric_label_noise` did to a training set.

    Attributes:
        rate: The fraction of samples whose label was redrawn.
        seed: Seed of the generator that chose them and drew their labels.
        indices: The chosen sample indices, sorted ascending (int64).
        changed: How many of them got a label other than their true one.
        digest: :func:`indices_digest` of ``indices``.
    """

    rate: float
    seed: int
    indices: torch.Tensor
    changed: int
    digest: str

    @property
    def chosen(self) -> int:
        """How many samples had their label redrawn: ``round(rate * n)``."""
        return int(self.indices.numel())

    def as_dict(self) -> dict[str, Any]:
        """The record of a run: everything but the indices themselves."""
        return {
            "label_noise": self.rate,
            "label_noise_seed": self.seed,
            "noisy_samples": self.chosen,
            "changed_labels": self.changed,
            "noisy_indices_sha256": self.digest,
        }


def check_label_noise(rate: Any, seed: Any) -> None:
    """Raises ValueError naming the value unless ``0 <= rate < 1`` and ``seed`` is an int >= 0."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, numbers.Real)
        or not math.isfinite(rate)
        or not 0 <= rate < 1
    ):
        raise ValueError(f"label_noise {rate!r} must be a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"label_noise_seed {seed!r} must be an integer >= 0")


def indices_digest(indices: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the sorted indices as little-endian int64."""
    flat = np.sort(indices.detach().cpu().numpy().astype("<i8").ravel())
    return hashlib.sha256(flat.tobytes()).hexdigest()[:DIGEST_CHARS]


def symmetric_label_noise(
    labels: torch.Tensor, num_classes: int, rate: float, seed: int
) -> tuple[torch.Tensor, LabelNoise]:
    """Replaces the labels of ``round(rate * n)`` samples by uniformly random classes.

    The recipe is the module's docstring. It depends on ``labels``' length, ``num_classes``,
    ``rate`` and ``seed`` only (not on the labels' values, nor on any global random state).

    Args:
        labels: int64 labels ``[n]`` (not modified).
        num_classes: Number of classes C; new labels are drawn from ``0 .. C - 1``.
        rate: Fraction of samples to redraw, in ``[0, 1)``.
        seed: Seed of the draw, an integer >= 0.

    Returns:
        The new labels (a copy) and the record of what was done.

    Raises:
        ValueError: For a rate outside ``[0, 1)``, a bad seed or fewer than 2 classes.
    """
    check_label_noise(rate, seed)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes!r}")
    n = int(labels.numel())
    k = round(float(rate) * n)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:k].sort().values
    new = torch.randint(0, num_classes, (k,), generator=gen, dtype=torch.int64)
    noisy = labels.clone()
    noisy[chosen] = new.to(noisy.dtype)
    changed = int((noisy[chosen] != labels[chosen]).sum())
    record = LabelNoise(float(rate), int(seed), chosen, changed, indices_digest(chosen))
    return noisy, record
