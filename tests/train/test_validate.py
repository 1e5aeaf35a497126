"""One place validates a config before training: values, names (with the choices listed),
optimizer arguments, and the compare section."""

from __future__ import annotations

import pytest

from effsam.train.config import ConfigError, load_config
from effsam.train.validate import compare_entries, validate


def check(overrides: dict, compare: bool = False) -> None:
    validate(load_config(None, overrides), compare=compare)


def test_the_defaults_are_valid():
    check({})
    check({}, compare=True)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.lr", -0.1, "invalid optim.lr: -0.1"),
        ("optim.lr", 0.0, "invalid optim.lr: 0.0"),
        ("optim.momentum", 1.0, "invalid optim.momentum: 1.0"),
        ("optim.weight_decay", -1e-4, "invalid optim.weight_decay: -0.0001"),
        ("train.epochs", 0, "invalid train.epochs: 0"),
        ("train.label_smoothing", 1.0, "invalid train.label_smoothing: 1.0"),
        ("train.warmup_epochs", 20.0, "invalid train.warmup_epochs: 20.0"),
        ("train.accumulation_steps", 0, "invalid train.accumulation_steps: 0"),
        ("train.accumulation_steps", 256, "must not exceed data.batch_size"),
        ("train.clip_grad_norm", 0.0, "invalid train.clip_grad_norm: 0.0"),
        ("train.device", "gpu0", "invalid train.device: 'gpu0'"),
        ("train.threads", 0, "invalid train.threads: 0"),
        ("data.batch_size", 0, "invalid data.batch_size: 0"),
        ("data.cutout", -1, "invalid data.cutout: -1"),
        ("data.train_subset", 0, "invalid data.train_subset: 0"),
        ("model.width", 0.0, "invalid model.width: 0.0"),
        ("seed", -1, "invalid seed: -1"),
        ("name", "a/b", "invalid name: 'a/b'"),
    ],
)
def test_invalid_values_name_key_and_value(key, value, message):
    with pytest.raises(ConfigError) as info:
        check({key: value})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "optimizer, args, message",
    [
        ("sam", {"rho": -0.1}, "invalid optim.args.rho: -0.1 (must be >= 0)"),
        ("esam", {"beta": 1.5}, "invalid optim.args.beta: 1.5 (must be in (0, 1])"),
        ("esam", {"gamma": 0.0}, "invalid optim.args.gamma: 0.0"),
        ("ssam-f", {"sparsity": 1.0}, "invalid optim.args.sparsity: 1.0"),
        ("ssam-f", {"num_samples": 0}, "invalid optim.args.num_samples: 0"),
        ("sam", {"beta": 0.5}, "'sam' does not take ['beta']"),
        ("sgd", {"rho": 0.05}, "'sgd' does not take ['rho']"),
    ],
)
def test_invalid_optimizer_arguments(optimizer, args, message):
    with pytest.raises(ConfigError) as info:
        check({"optim.name": optimizer, "optim.args": args})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("data.dataset", "cifar11", ["digits", "synthetic", "cifar10", "cifar100", "imagefolder"]),
        ("model.name", "resnet19", ["resnet18", "wrn28_10", "pyramidnet110", "small_cnn"]),
        ("optim.name", "esamm", ["sgd", "sam", "esam", "esam-swp", "esam-sds", "ssam-f"]),
        ("optim.base", "lion", ["sgd", "adamw"]),
        ("train.amp", "fp8", ["off", "bf16", "fp16"]),
        ("train.schedule", "linear", ["cosine", "constant"]),
    ],
)
def test_unknown_names_list_the_choices(key, value, choices):
    with pytest.raises(ConfigError) as info:
        check({key: value})
    text = str(info.value)
    assert "unknown" in text and repr(value) in text and key in text
    listed = text.split("choose from ")[1]
    for choice in choices:
        assert choice in listed


def test_compare_entries_merge_overrides_and_filter_shared_args():
    cfg = load_config(
        None,
        {
            "optim.weight_decay": 1e-3,
            "optim.args": {"rho": 0.1, "beta": 0.5},
            "compare.optimizers": [
                {"name": "sgd", "weight_decay": 5e-4},
                "sam",
                {"name": "esam", "label": "ESAM b=0.7", "args": {"beta": 0.7}},
            ],
        },
    )
    validate(cfg, compare=True)
    entries = dict(compare_entries(cfg))
    assert list(entries) == ["SGD", "SAM", "ESAM b=0.7"]
    assert entries["SGD"].weight_decay == 5e-4 and entries["SGD"].args == {}
    assert entries["SAM"].weight_decay == 1e-3 and entries["SAM"].args == {"rho": 0.1}
    assert entries["ESAM b=0.7"].args == {"rho": 0.1, "beta": 0.7}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"compare.optimizers": ["sgd", "nadam"]}, "unknown optimizer 'nadam'"),
        ({"compare.optimizers": []}, "must list at least one optimizer"),
        ({"compare.optimizers": ["sam", "sam"]}, "labels must be unique"),
        ({"compare.seeds": [0, 0]}, "invalid compare.seeds"),
        ({"compare.optimizers": ["sgd", "sam"], "optim.args": {"gamma": 0.5}}, "['gamma']"),
        (
            {"compare.optimizers": [{"name": "esam", "args": {"beta": 2.0}}]},
            "invalid compare.optimizers[ESAM].args.beta: 2.0",
        ),
    ],
)
def test_compare_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        check(overrides, compare=True)
    assert message in str(info.value)
