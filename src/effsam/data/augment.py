"""Batched, seeded image augmentation: random crop with zero padding, horizontal flip, Cutout.

All random numbers are drawn on the CPU from the given generator, in a fixed order, and only then
moved to the batch's device, so the result depends on the generator state alone, not on where the
batch lives.
"""

from __future__ import annotations

import torch


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch [N, C, H, W], got {shape}")


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator | None,
    *,
    crop: bool = True,
    padding: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> torch.Tensor:
    """Augments a whole batch at once.

    Crop: each image is zero-padded by ``padding`` on every side and a window of the original
    size is cut at a uniformly random offset. Flip: each image is mirrored left-right with
    probability 0.5. Both are done with one gather, without a per-image loop. Cutout: see
    :func:`cutout_batch`.

    Args:
        x: Images ``[N, C, H, W]`` of any dtype (uint8 or float).
        generator: Source of randomness (a CPU generator); None uses the global one.
        crop: Apply the random crop.
        padding: Zero padding of the crop, in pixels.
        flip: Apply the random horizontal flip.
        cutout: Side of the Cutout square; 0 disables it.

    Returns:
        A new tensor of the same shape, dtype and device as ``x``.
    """
    _check_batch(x)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    n, _, h, w = x.shape
    rows = torch.arange(h).expand(n, h)
    cols = torch.arange(w).expand(n, w)
    if crop and padding:
        dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
        rows = rows + dy
        cols = cols + dx
        pad = padding
    else:
        pad = 0
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        # Mirroring the output equals reading the window's columns right to left.
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    if (crop and padding) or flip:
        source = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
        b = torch.arange(n, device=x.device)[:, None, None]
        r = rows.to(x.device)[:, :, None]
        c = cols.to(x.device)[:, None, :]
        # Advanced indices around a slice put the indexed dims first: [N, H, W, C].
        out = source[b, :, r, c].permute(0, 3, 1, 2).contiguous()
    else:
        out = x.clone()
    if cutout:
        out = cutout_batch(out, generator, cutout)
    return out


def cutout_batch(
    x: torch.Tensor, generator: torch.Generator | None, size: int, p: float = 0.5
) -> torch.Tensor:
    """Zeroes a ``size`` x ``size`` square in each image with probability ``p`` (Cutout).

    As in the Cutout used by the SAM and ESAM reference training code, the square's top-left
    corner is drawn uniformly from ``[-size // 2, H - size // 2)`` (and likewise for columns), so
    the square may stick out of the image and is then clipped to it.

    Args:
        x: Images ``[N, C, H, W]``; modified in place and returned.
        generator: Source of randomness (a CPU generator); None uses the global one.
        size: Side of the square, >= 1.
        p: Probability of applying Cutout to an image.

    Returns:
        ``x``, with the squares zeroed.
    """
    _check_batch(x)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"cutout size must be a positive integer, got {size!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutout probability must be in [0, 1], got {p!r}")
    n, _, h, w = x.shape
    half = size // 2
    apply = torch.rand(n, generator=generator) < p
    top = torch.randint(-half, h - half, (n, 1), generator=generator)
    left = torch.randint(-half, w - half, (n, 1), generator=generator)
    r = torch.arange(h)[None, :]
    c = torch.arange(w)[None, :]
    in_rows = (r >= top) & (r < top + size)
    in_cols = (c >= left) & (c < left + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    x.masked_fill_(mask[:, None].to(x.device), 0)
    return x
