import dataclasses

import pytest
import torch

from effsam.data import DATASETS, BatchLoader, ImageData, load_dataset, stratified_indices


def _toy(n: int = 50, c: int = 3, hw: int = 6, dtype=torch.uint8):
    x = torch.randint(0, 256, (n, c, hw, hw), generator=torch.Generator().manual_seed(0))
    # Label = index, so the labels of a batch reveal exactly which samples it holds.
    return x.to(dtype), torch.arange(n)


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_uint8_is_scaled_then_normalised():
    x, y = _toy()
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)
    loader = BatchLoader(x, y, 16, shuffle=False, mean=mean, std=std)
    xb, yb = next(iter(loader))
    expected = (x[:16].double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    torch.testing.assert_close(xb.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(yb, torch.arange(16))


def test_float_data_is_only_normalised():
    x, y = _toy(dtype=torch.float32)
    loader = BatchLoader(x, y, 50, mean=(1.0, 2.0, 3.0), std=(2.0, 2.0, 2.0))
    xb, _ = next(iter(loader))
    torch.testing.assert_close(xb, (x - torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)) / 2)


@pytest.mark.parametrize("drop_last,expected", [(False, [16, 16, 16, 2]), (True, [16, 16, 16])])
def test_len_and_batch_sizes(drop_last, expected):
    x, y = _toy()
    loader = BatchLoader(x, y, 16, shuffle=True, drop_last=drop_last, seed=1)
    batches = _collect(loader)
    assert len(loader) == len(expected)
    assert [len(b[1]) for b in batches] == expected
    if not drop_last:
        assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(50))


def test_epoch_order_depends_only_on_seed_and_epoch():
    x, y = _toy()
    a = BatchLoader(x, y, 8, shuffle=True, seed=3, augment="cifar", cutout=2)
    b = BatchLoader(x, y, 8, shuffle=True, seed=3, augment="cifar", cutout=2)
    a.set_epoch(4)
    _collect(a)  # iterating an epoch twice must not advance any hidden state
    first = _collect(a)
    b.set_epoch(4)
    second = _collect(b)
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(5)
    assert not torch.equal(_collect(b)[0][1], first[0][1])
    c = BatchLoader(x, y, 8, shuffle=True, seed=4)
    c.set_epoch(4)
    assert not torch.equal(_collect(c)[0][1], first[0][1])


def test_single_batch_reproduces_the_epoch_for_resuming():
    x, y = _toy()
    loader = BatchLoader(x, y, 8, shuffle=True, seed=0, augment="cifar")
    loader.set_epoch(2)
    batches = _collect(loader)
    xb, yb = loader.batch(3)
    assert torch.equal(xb, batches[3][0]) and torch.equal(yb, batches[3][1])


def test_augmentation_changes_images_but_not_labels():
    x, y = _toy(n=32)
    plain = BatchLoader(x, y, 32, seed=0)
    aug = BatchLoader(x, y, 32, seed=0, augment="cifar")
    (xp, yp), (xa, ya) = next(iter(plain)), next(iter(aug))
    assert torch.equal(yp, ya)
    assert not torch.equal(xp, xa)


def test_no_shuffle_keeps_stored_order():
    x, y = _toy()
    loader = BatchLoader(x, y, 20, shuffle=False)
    loader.set_epoch(7)
    assert torch.cat([b for _, b in loader]).tolist() == list(range(50))


@pytest.mark.parametrize(
    "n,world,batch,drop_last", [(50, 3, 4, False), (50, 3, 4, True), (5, 8, 2, False)]
)
def test_ranks_get_disjoint_shards_of_one_permutation(n, world, batch, drop_last):
    x, y = _toy(n=n)
    shards = []
    lengths = set()
    for rank in range(world):
        loader = BatchLoader(
            x, y, batch, shuffle=True, drop_last=drop_last, seed=9, rank=rank, world_size=world
        )
        loader.set_epoch(1)
        labels = [b for _, b in loader]
        lengths.add(len(labels))
        assert len(labels) == len(loader)
        shards.append(torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))
    assert len(lengths) == 1, "every rank must run the same number of batches"
    assert len({len(s) for s in shards}) == 1
    # The same global permutation, dealt round-robin.
    single = BatchLoader(x, y, n, shuffle=True, seed=9)
    single.set_epoch(1)
    perm = single.indices()
    per_rank = len(shards[0])
    if drop_last:
        assert per_rank == (n // world) // batch * batch
        union = torch.cat(shards)
        assert len(set(union.tolist())) == len(union), "shards overlap"
        assert set(union.tolist()) <= set(perm.tolist())
    else:
        padded = perm.repeat(-(-world * per_rank // n))[: world * per_rank]
        for rank in range(world):
            assert torch.equal(shards[rank], padded[rank::world])
        assert set(torch.cat(shards).tolist()) == set(range(n))


def test_loader_rejects_bad_arguments():
    x, y = _toy()
    with pytest.raises(ValueError, match="rank 3"):
        BatchLoader(x, y, 4, rank=3, world_size=3)
    with pytest.raises(ValueError, match="0"):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError, match="'fancy'"):
        BatchLoader(x, y, 4, augment="fancy")
    with pytest.raises(ValueError, match=r"\[49\]|49"):
        BatchLoader(x, y[:49], 4)
    with pytest.raises(ValueError, match="mean"):
        BatchLoader(x, y, 4, mean=(0.5,), std=(0.5,))


def test_stratified_subset_is_balanced_and_seeded():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_indices(labels, 20, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert len(set(idx.tolist())) == 20
    assert torch.equal(idx, stratified_indices(labels, 20, seed=1))
    assert not torch.equal(idx, stratified_indices(labels, 20, seed=2))
    # Remainders go to the largest fractional parts: 7 * (0.6, 0.3, 0.1) = 4.2, 2.1, 0.7.
    assert torch.bincount(labels[stratified_indices(labels, 7, 0)], minlength=3).tolist() == [
        4,
        2,
        1,
    ]


def test_digits_fixed_split_and_stats():
    data = load_dataset("digits", seed=5)
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.augment == "none"
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    assert data.num_classes == 10
    assert torch.bincount(data.test_y).min() >= 35  # stratified: 36 or 37 per class
    other = load_dataset("digits", seed=6)
    assert torch.equal(data.test_y, other.test_y) and torch.equal(data.test_x, other.test_x)
    assert data.mean[0] == pytest.approx(float(data.train_x.mean()), rel=1e-5)
    assert data.std[0] == pytest.approx(float(data.train_x.std(correction=0)), rel=1e-4)


def test_train_subset_of_digits():
    data = load_dataset("digits", train_subset=100, seed=0)
    assert data.train_x.shape[0] == 100
    counts = torch.bincount(data.train_y, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert data.test_x.shape[0] == 360
    for bad in (0, 1438, -3):
        with pytest.raises(ValueError, match=str(bad)):
            load_dataset("digits", train_subset=bad)


def test_synthetic_shape_seed_and_learnability():
    data = load_dataset(
        "synthetic",
        seed=2,
        synthetic_shape=(2, 5, 4),
        synthetic_classes=4,
        synthetic_train=400,
        synthetic_test=200,
    )
    assert data.train_x.shape == (400, 2, 5, 4) and data.test_x.shape == (200, 2, 5, 4)
    assert data.train_x.dtype == torch.float32 and data.num_classes == 4
    assert torch.bincount(data.train_y).tolist() == [100] * 4
    again = load_dataset(
        "synthetic",
        seed=2,
        synthetic_shape=(2, 5, 4),
        synthetic_classes=4,
        synthetic_train=400,
        synthetic_test=200,
    )
    assert torch.equal(again.train_x, data.train_x)
    assert not torch.equal(load_dataset("synthetic", seed=3).train_x[:1], data.train_x[:1])
    # Nearest class mean, fitted on the training split, must beat chance (25%) on the test split.
    means = torch.stack([data.train_x[data.train_y == k].mean(0) for k in range(4)])
    dist = ((data.test_x[:, None] - means[None]) ** 2).flatten(2).sum(2)
    accuracy = (dist.argmin(1) == data.test_y).float().mean()
    assert accuracy > 0.5


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    assert "mnist" in str(info.value)
    for name in DATASETS:
        assert name in str(info.value)


def test_image_data_is_frozen_and_validated():
    x, y = _toy(n=4)
    data = ImageData("synthetic", x, y, x, y, 50, (0.5,) * 3, (0.5,) * 3, "cifar")
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.name = "other"
    with pytest.raises(ValueError, match="channel"):
        ImageData("synthetic", x, y, x, y, 50, (0.5,), (0.5,))


def test_cutout_erases_to_the_mean_colour_after_normalising():
    x = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    y = torch.zeros(64, dtype=torch.long)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)
    loader = BatchLoader(x, y, 64, seed=0, cutout=4, mean=mean, std=std)
    xb, _ = next(iter(loader))
    untouched = (200 / 255 - torch.tensor(mean)) / 0.5
    erased = xb == 0
    assert erased.any() and not erased.all()
    for c in range(3):
        kept = xb[:, c][~erased[:, c]]
        assert torch.allclose(kept, untouched[c].expand_as(kept))
