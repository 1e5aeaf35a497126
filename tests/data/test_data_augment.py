import pytest
import torch

from effsam.data.augment import augment_batch, cutout_batch


def _images(n: int = 32, c: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    # Random uint8 content: every window of a padded image is distinct with near certainty.
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(7)).to(
        torch.uint8
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_output_and_different_seed_different():
    x = _images()
    a = augment_batch(x, _gen(1), cutout=4)
    b = augment_batch(x, _gen(1), cutout=4)
    c = augment_batch(x, _gen(2), cutout=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_keeps_shape_dtype_and_leaves_input_alone():
    x = _images()
    before = x.clone()
    out = augment_batch(x, _gen(0), cutout=3)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(x, before)
    xf = x.float() / 255
    assert augment_batch(xf, _gen(0)).dtype == torch.float32


def test_crop_is_a_window_of_the_zero_padded_image():
    x, pad = _images(), 4
    out = augment_batch(x, _gen(3), crop=True, padding=pad, flip=False)
    padded = torch.zeros(x.shape[0], 3, x.shape[2] + 2 * pad, x.shape[3] + 2 * pad, dtype=x.dtype)
    padded[:, :, pad:-pad, pad:-pad] = x
    h, w = x.shape[2:]
    offsets = set()
    for i in range(x.shape[0]):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(hits) == 1, f"image {i} is not a unique window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets vary across the batch


def test_flip_mirrors_exactly_and_about_half_the_time():
    x = _images(n=64)
    out = augment_batch(x, _gen(4), crop=False, flip=True)
    flipped = 0
    for i in range(64):
        if torch.equal(out[i], x[i]):
            continue
        assert torch.equal(out[i], x[i, :, :, torch.arange(x.shape[3] - 1, -1, -1)])
        flipped += 1
    assert 10 < flipped < 54


def test_no_crop_no_flip_is_identity():
    x = _images()
    assert torch.equal(augment_batch(x, _gen(0), crop=False, flip=False), x)
    assert torch.equal(augment_batch(x, _gen(0), padding=0, flip=False), x)


def test_cutout_zeroes_one_clipped_square_per_image():
    n, size, h, w = 200, 5, 12, 10
    x = torch.ones(n, 3, h, w)
    out = augment_batch(x, _gen(5), crop=False, flip=False, cutout=size)
    cut = 0
    full_squares = 0
    for i in range(n):
        zero = out[i] == 0
        assert torch.equal(zero, zero[:1].expand_as(zero)), "all channels share the square"
        mask = zero[0]
        if not mask.any():
            continue
        cut += 1
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        # A rectangle: the mask is the outer product of its row and column spans, both contiguous.
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        assert torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))
        assert mask.sum() == len(rows) * len(cols)
        assert len(rows) <= size and len(cols) <= size
        touches_border = rows[0] == 0 or rows[-1] == h - 1 or cols[0] == 0 or cols[-1] == w - 1
        if not touches_border:
            assert (len(rows), len(cols)) == (size, size)
            full_squares += 1
        assert torch.all(out[i][~zero] == 1)
    assert 60 < cut < 140  # applied with probability 0.5
    assert full_squares > 0


def test_cutout_probability_extremes():
    x = torch.ones(16, 1, 8, 8)
    assert torch.equal(cutout_batch(x.clone(), _gen(0), 4, p=0.0), x)
    always = cutout_batch(x.clone(), _gen(0), 4, p=1.0)
    assert bool((always == 0).flatten(1).any(1).all())


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_cutout_rejects_bad_size(bad):
    with pytest.raises(ValueError, match=str(bad)):
        cutout_batch(torch.ones(2, 1, 4, 4), _gen(0), bad)


def test_rejects_non_batch_input():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        augment_batch(torch.zeros(3, 8, 8), _gen(0))
    with pytest.raises(ValueError, match="-1"):
        augment_batch(torch.zeros(1, 3, 8, 8), _gen(0), padding=-1)
