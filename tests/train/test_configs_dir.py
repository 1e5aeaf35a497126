"""Every YAML in configs/ parses and validates, and the paper settings are the papers'."""

from __future__ import annotations

from pathlib import Path

import pytest

from effsam.train.build import optimizer_args
from effsam.train.compare import builtin_compare_config
from effsam.train.config import load_config, to_dict
from effsam.train.validate import compare_entries, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_the_configs_directory_is_found():
    assert len(ALL) > 40


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_and_validates(path):
    cfg = load_config(path)
    validate(cfg, compare=path.parent.name == "compare")


def esam(name: str):
    return load_config(CONFIGS / "esam" / f"{name}.yaml")


@pytest.mark.parametrize(
    "name, optimizer, batch, lr, wd, epochs, args",
    [
        ("cifar10_resnet18_sgd", "sgd", 128, 0.05, 5e-4, 200, {}),
        ("cifar10_resnet18_sam", "sam", 128, 0.05, 1e-3, 200, {"rho": 0.05}),
        (
            "cifar10_resnet18_esam",
            "esam",
            128,
            0.05,
            1e-3,
            200,
            {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
        ),
        ("cifar10_resnet18_esam_swp", "esam-swp", 128, 0.05, 1e-3, 200, {"rho": 0.05, "beta": 0.6}),
        (
            "cifar10_resnet18_esam_sds",
            "esam-sds",
            128,
            0.05,
            1e-3,
            200,
            {"rho": 0.05, "gamma": 0.5},
        ),
        (
            "cifar100_wrn28_10_esam",
            "esam",
            256,
            0.05,
            1e-3,
            200,
            {"rho": 0.1, "beta": 0.5, "gamma": 0.5},
        ),
        (
            "cifar100_pyramidnet110_esam",
            "esam",
            256,
            0.1,
            5e-4,
            300,
            {"rho": 0.2, "beta": 0.6, "gamma": 0.5},
        ),
        (
            "imagenet_resnet50_esam",
            "esam",
            128,
            0.2,
            1e-4,
            90,
            {"rho": 0.05, "beta": 0.6, "gamma": 0.7},
        ),
        ("imagenet_resnet101_sgd", "sgd", 128, 0.2, 1e-4, 90, {}),
    ],
)
def test_esam_paper_settings(name, optimizer, batch, lr, wd, epochs, args):
    cfg = esam(name)
    assert cfg.optim.name == optimizer
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (batch, lr, wd)
    assert cfg.train.epochs == epochs and cfg.train.schedule == "cosine"
    assert cfg.optim.momentum == 0.9
    assert cfg.optim.args == args
    assert cfg.name == name


def test_cifar_configs_use_the_paper_augmentation():
    cfg = esam("cifar100_resnet18_sam")
    assert (cfg.data.dataset, cfg.data.augment, cfg.data.cutout) == ("cifar100", "cifar", 16)


def test_every_table1_row_has_a_config():
    for dataset in ("cifar10", "cifar100"):
        for model in ("resnet18", "wrn28_10", "pyramidnet110"):
            for optimizer in ("sgd", "sam", "esam"):
                cfg = esam(f"{dataset}_{model}_{optimizer}")
                assert (cfg.data.dataset, cfg.model.name) == (dataset, model)


def test_ssam_settings_fill_in_the_schedule():
    cfg = load_config(CONFIGS / "ssam" / "cifar10_resnet18_ssam_d.yaml")
    assert cfg.optim.name == "ssam-d"
    assert cfg.optim.args == {"rho": 0.1, "sparsity": 0.5, "drop_rate": 0.5}
    args = optimizer_args(cfg.optim, steps_per_epoch=391, epochs=cfg.train.epochs, seed=3)
    assert args["total_steps"] == 200 * 391
    assert args["update_interval"] == 391  # the mask is refreshed every epoch
    f = load_config(CONFIGS / "ssam" / "cifar10_resnet18_ssam_f.yaml")
    assert f.optim.args == {"rho": 0.1, "sparsity": 0.5, "num_samples": 16}
    args = optimizer_args(f.optim, steps_per_epoch=391, epochs=200, seed=0)
    # SSAM-F draws nothing at random: the run's seed is not one of its arguments
    assert args["update_interval"] == 391 and "seed" not in args


def test_compare_config_gives_sgd_its_own_weight_decay():
    cfg = load_config(CONFIGS / "compare" / "cifar10_resnet18.yaml")
    entries = dict(compare_entries(cfg))
    assert list(entries) == ["SGD", "SAM", "ESAM"]
    assert entries["SGD"].weight_decay == 5e-4 and entries["SGD"].args == {}
    assert entries["SAM"].weight_decay == 1e-3 and entries["SAM"].args == {"rho": 0.05}
    assert entries["ESAM"].args == {"rho": 0.05, "beta": 0.6, "gamma": 0.5}


def test_the_digits_config_is_the_built_in_default():
    file_cfg = load_config(CONFIGS / "compare" / "digits_small_cnn.yaml")
    assert to_dict(file_cfg) == to_dict(builtin_compare_config())
    # one thread is for the tiny demo model only
    assert builtin_compare_config({"model.name": "cifar_cnn"}).train.threads is None
    assert builtin_compare_config({"train.threads": 2}).train.threads == 2
