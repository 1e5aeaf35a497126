"""The UCI handwritten digits shipped with scikit-learn: 1,797 images of 8x8 pixels, 10 classes.

Small enough to train on a CPU in seconds and available offline, which makes it the data set of
quick checks and tests.
"""

from __future__ import annotations

import torch

from effsam.data.loader import ImageData, channel_stats, stratified_indices

#: Images held out for testing (about 20%, stratified by class).
DIGITS_TEST_SIZE = 360
#: Seed of the train/test split. Fixed, so every run, whatever its own seed, tests on the same
#: images.
DIGITS_SPLIT_SEED = 20_240_501


def load_digits() -> ImageData:
    """Loads the digits as float32 images in [0, 1] with a fixed stratified split.

    Returns:
        1,437 training and 360 test images ``[N, 1, 8, 8]``; mean and std come from the
        training split.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # scikit-learn belongs to the optional toolkit extra
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'effsam[toolkit]'"
        ) from exc
    bunch = sklearn_digits()
    # Pixel values are counts 0..16 of the original 32x32 bitmap's 4x4 blocks.
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    test_idx = stratified_indices(y, DIGITS_TEST_SIZE, seed=DIGITS_SPLIT_SEED)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    train_x, train_y = x[~is_test].contiguous(), y[~is_test].contiguous()
    mean, std = channel_stats(train_x)
    return ImageData(
        name="digits",
        train_x=train_x,
        train_y=train_y,
        test_x=x[is_test].contiguous(),
        test_y=y[is_test].contiguous(),
        num_classes=10,
        mean=mean,
        std=std,
        augment="none",
        classes=tuple(str(c) for c in range(10)),
    )
