"""Symmetric label noise (``data.label_noise``): the documented recipe exactly, fixed by its
own seed, the test set clean, and recorded in the run."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from effsam.data import load_dataset, symmetric_label_noise
from effsam.train.build import load_data, make_loaders
from effsam.train.cli import main
from effsam.train.config import load_config
from train.tiny_runs import TINY_ARGS

SMALL = {"synthetic_shape": (1, 2, 2), "synthetic_classes": 5, "synthetic_train": 300}


def synthetic(**kw):
    return load_dataset("synthetic", **SMALL, **kw)


def expected_noise(clean: torch.Tensor, num_classes: int, rate: float, seed: int):
    """The recipe of docs/toolkit.md, written out: the chosen indices and the new labels."""
    n = len(clean)
    k = round(rate * n)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k].sort().values
    new = torch.randint(0, num_classes, (k,), generator=gen)
    labels = clean.clone()
    labels[chosen] = new
    return chosen, labels


def digest(indices) -> str:
    raw = np.sort(np.asarray(indices, dtype="<i8")).tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize("rate, seed", [(0.3, 0), (0.25, 7), (0.9, 123)])
def test_the_documented_recipe_exactly(rate, seed):
    clean = synthetic()
    noisy = synthetic(label_noise=rate, label_noise_seed=seed)
    chosen, labels = expected_noise(clean.train_y, 5, rate, seed)
    assert len(chosen) == round(rate * 300)
    assert torch.equal(noisy.train_y, labels)
    record = noisy.label_noise
    assert torch.equal(record.indices, chosen)
    assert record.chosen == round(rate * 300)
    assert record.changed == int((labels != clean.train_y).sum()) > 0
    assert record.digest == digest(chosen.tolist())
    assert record.as_dict() == {
        "label_noise": rate,
        "label_noise_seed": seed,
        "noisy_samples": round(rate * 300),
        "changed_labels": record.changed,
        "noisy_indices_sha256": digest(chosen.tolist()),
    }


def test_only_the_chosen_training_labels_change_and_the_test_set_is_clean():
    clean = synthetic()
    noisy = synthetic(label_noise=0.4, label_noise_seed=3)
    chosen = noisy.label_noise.indices
    outside = torch.ones(300, dtype=torch.bool)
    outside[chosen] = False
    assert int(outside.sum()) == 300 - 120
    assert torch.equal(noisy.train_y[outside], clean.train_y[outside])
    assert torch.equal(noisy.train_x, clean.train_x)
    assert torch.equal(noisy.test_y, clean.test_y) and torch.equal(noisy.test_x, clean.test_x)
    assert noisy.train_y.dtype == torch.int64
    assert int(noisy.train_y.min()) >= 0 and int(noisy.train_y.max()) < 5
    # every label outside the chosen set is untouched, so every change is inside it
    changed = torch.nonzero(noisy.train_y != clean.train_y).flatten()
    assert set(changed.tolist()) <= set(chosen.tolist())
    assert len(changed) == noisy.label_noise.changed


def test_same_seed_same_noise_another_seed_other_noise():
    a = synthetic(label_noise=0.3, label_noise_seed=1)
    b = synthetic(label_noise=0.3, label_noise_seed=1)
    c = synthetic(label_noise=0.3, label_noise_seed=2)
    assert torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.label_noise.indices, b.label_noise.indices)
    assert a.label_noise.digest == b.label_noise.digest
    assert not torch.equal(a.label_noise.indices, c.label_noise.indices)
    assert not torch.equal(a.train_y, c.train_y)
    assert a.label_noise.digest != c.label_noise.digest


def test_the_noise_does_not_depend_on_the_global_random_state():
    torch.manual_seed(1)
    a = synthetic(label_noise=0.3, label_noise_seed=4)
    torch.manual_seed(2)
    torch.rand(100)
    b = synthetic(label_noise=0.3, label_noise_seed=4)
    assert torch.equal(a.train_y, b.train_y)


@pytest.mark.parametrize("subset", [None, 500])
def test_the_noise_does_not_depend_on_the_runs_seed(tmp_path, subset):
    """A run's seed changes its initialisation and data order, never its noisy labels."""
    base = {"data.dataset": "digits", "data.label_noise": 0.3, "data.label_noise_seed": 5}
    if subset is not None:
        base |= {"data.train_subset": subset, "data.subset_seed": 0}
    runs = [load_data(load_config(None, {**base, "seed": s})) for s in (0, 1, 2)]
    clean = load_data(load_config(None, {**base, "data.label_noise": 0.0}))
    for data in runs:
        assert torch.equal(data.train_y, runs[0].train_y)
        assert torch.equal(data.label_noise.indices, runs[0].label_noise.indices)
    assert runs[0].label_noise.chosen == round(0.3 * len(clean.train_y))
    _, labels = expected_noise(clean.train_y, 10, 0.3, 5)
    assert torch.equal(runs[0].train_y, labels)
    other = load_data(load_config(None, {**base, "data.label_noise_seed": 6}))
    assert not torch.equal(other.train_y, runs[0].train_y)


def test_the_noise_is_applied_after_the_subset():
    clean = load_dataset("digits", train_subset=400, seed=3)
    noisy = load_dataset("digits", train_subset=400, seed=3, label_noise=0.5, label_noise_seed=9)
    assert torch.equal(noisy.train_x, clean.train_x)
    _, labels = expected_noise(clean.train_y, 10, 0.5, 9)
    assert torch.equal(noisy.train_y, labels) and noisy.label_noise.chosen == 200


def test_zero_noise_is_the_path_without_the_option():
    plain = load_dataset("digits")
    zero = load_dataset("digits", label_noise=0.0, label_noise_seed=17)
    assert zero.label_noise is None and plain.label_noise is None
    for field in dataclasses.fields(plain):
        a, b = getattr(plain, field.name), getattr(zero, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_changed_fraction_is_about_rate_times_one_minus_one_over_c():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 10, (50_000,), generator=gen)
    before = clean.clone()
    noisy, record = symmetric_label_noise(clean, 10, 0.3, 0)
    assert record.chosen == 15_000
    assert torch.equal(clean, before)  # the input is not modified
    fraction = float((noisy != clean).float().mean())
    assert fraction == pytest.approx(0.3 * (1 - 1 / 10), abs=0.01)  # sd ~0.0012
    assert record.changed == int((noisy != clean).sum())
    # the redrawn labels are uniform over all classes, the true one included
    counts = torch.bincount(noisy[record.indices], minlength=10).float() / record.chosen
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.015)


def test_the_loaders_deliver_the_noisy_labels_whatever_the_augmentation():
    cfg = load_config(
        None,
        {
            "data.dataset": "synthetic",
            "data.synthetic_shape": [3, 8, 8],
            "data.synthetic_train": 64,
            "data.label_noise": 0.5,
            "data.augment": "cifar",
            "data.cutout": 4,
            "data.batch_size": 16,
        },
    )
    data = load_data(cfg)
    clean = load_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_noise=0)))
    assert not torch.equal(data.train_y, clean.train_y)
    train, test = make_loaders(cfg, data, 0, 1, torch.device("cpu"))
    train.set_epoch(1)
    seen = torch.cat([y for _, y in train])
    assert torch.equal(seen, data.train_y[train.indices()])
    assert torch.equal(torch.cat([y for _, y in test]), clean.test_y)


def _cifar_like(tmp_path, name):
    from data.test_data_cifar import make_cifar_folder

    make_cifar_folder(tmp_path / name, name)
    return {"data_dir": tmp_path, "allow_unverified": True}


def _image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("a", "b", "c")):
            for i in range(count):
                (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
                pixels = np.full((6, 6, 3), 40 * c + i, dtype=np.uint8)
                pil.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    return {"data_dir": tmp_path, "image_size": 6}


@pytest.mark.parametrize("name", ["digits", "synthetic", "cifar10", "cifar100", "imagefolder"])
def test_every_data_set_takes_label_noise(tmp_path, name):
    kwargs = {
        "cifar10": lambda: _cifar_like(tmp_path, "cifar10"),
        "cifar100": lambda: _cifar_like(tmp_path, "cifar100"),
        "imagefolder": lambda: _image_folder(tmp_path),
    }.get(name, dict)()
    clean = load_dataset(name, **kwargs)
    noisy = load_dataset(name, **kwargs, label_noise=0.5, label_noise_seed=1)
    chosen, labels = expected_noise(clean.train_y, clean.num_classes, 0.5, 1)
    assert torch.equal(noisy.train_y, labels)
    assert torch.equal(noisy.label_noise.indices, chosen)
    assert torch.equal(noisy.test_y, clean.test_y)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"label_noise": -0.1}, "label_noise -0.1 must be a number in [0, 1)"),
        ({"label_noise": 1.0}, "label_noise 1.0 must be a number in [0, 1)"),
        ({"label_noise": float("nan")}, "label_noise nan must be"),
        ({"label_noise": "0.3"}, "label_noise '0.3' must be"),
        ({"label_noise": True}, "label_noise True must be"),
        ({"label_noise": 0.3, "label_noise_seed": 1.5}, "label_noise_seed 1.5 must be an integer"),
        ({"label_noise": 0.3, "label_noise_seed": -2}, "label_noise_seed -2 must be an integer"),
    ],
)
def test_bad_values_are_refused_before_loading(tmp_path, kwargs, fragment):
    # the CIFAR files are missing: the bad value is reported first
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", data_dir=tmp_path / "none", **kwargs)
    assert fragment in str(err.value)


# ---------------------------------------------------------------- recorded in the run
def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


def test_a_train_run_records_its_label_noise(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    _run([*argv, "--name", "noisy", "--label-noise", "0.25", "--label-noise-seed", "3"], capsys)
    _run([*argv, "--name", "clean"], capsys)
    summary = json.loads((tmp_path / "noisy" / "summary.json").read_text())
    cfg = load_config(tmp_path / "noisy" / "config.yaml")
    saved = yaml.safe_load((tmp_path / "noisy" / "config.yaml").read_text())
    assert saved["data"]["label_noise"] == 0.25 and saved["data"]["label_noise_seed"] == 3
    clean = load_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_noise=0)))
    chosen, labels = expected_noise(clean.train_y, 4, 0.25, 3)
    assert summary["label_noise"] == 0.25 and summary["label_noise_seed"] == 3
    assert summary["noisy_samples"] == len(chosen) == 24  # round(0.25 * 96)
    assert summary["changed_labels"] == int((labels != clean.train_y).sum())
    assert summary["noisy_indices_sha256"] == digest(chosen.tolist())
    plain = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert plain["label_noise"] == 0.0 and "noisy_indices_sha256" not in plain


def test_a_comparison_records_the_same_noise_for_every_method_and_seed(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0,1"]
    argv += ["--subset-seed", "0", "--label-noise", "0.5", "--out", str(tmp_path)]
    _run([*argv, "--name", "c", "--quiet", "--no-plot"], capsys)
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert result["config"]["data"]["label_noise"] == 0.5
    records = {
        (r["label"], r["seed"]): {k: r[k] for k in r if "nois" in k or k == "changed_labels"}
        for r in result["runs"]
    }
    assert sorted(records) == [("SAM", 0), ("SAM", 1), ("SGD", 0), ("SGD", 1)]
    first = records["SGD", 0]
    assert first["noisy_samples"] == 48 and first["label_noise_seed"] == 0
    assert all(record == first for record in records.values())
