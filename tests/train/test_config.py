"""Config tree: YAML loading, extends, precedence of flags and --set, key and type errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from effsam.train.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    load_config,
    parse_assignment,
    to_dict,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_digits_demo():
    cfg = load_config()
    assert (cfg.data.dataset, cfg.model.name, cfg.optim.name) == ("digits", "small_cnn", "sam")
    assert cfg.run_name() == "digits_small_cnn_sam_s0"


def test_yaml_extends_deep_merges_parent_first(tmp_path):
    write(tmp_path / "base.yaml", "data: {dataset: cifar10, cutout: 16}\noptim: {lr: 0.1}\n")
    child = write(
        tmp_path / "child.yaml",
        "extends: base.yaml\ndata: {batch_size: 64}\noptim: {args: {rho: 0.2}}\n",
    )
    cfg = load_config(child)
    assert cfg.data.dataset == "cifar10" and cfg.data.cutout == 16  # from the parent
    assert cfg.data.batch_size == 64  # from the child
    assert cfg.optim.lr == 0.1 and cfg.optim.args == {"rho": 0.2}


def test_precedence_file_then_flags_then_set(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.3, momentum: 0.5}\ntrain: {epochs: 7}\n")
    cfg = load_config(
        path,
        {"optim.lr": 0.2, "train.epochs": 4},
        ["optim.lr=0.01", "optim.args.beta=0.5", "data.synthetic_shape=[1, 4, 4]"],
    )
    assert cfg.optim.lr == 0.01  # --set beats the flag, which beats the file
    assert cfg.train.epochs == 4  # the flag beats the file
    assert cfg.optim.momentum == 0.5  # the file beats the default
    assert cfg.optim.args == {"beta": 0.5}
    assert cfg.data.synthetic_shape == [1, 4, 4]


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*valid keys in optim: args, base, lr"):
        load_config(None, None, ["optim.lrr=0.1"])
    path = write(tmp_path / "bad.yaml", "trian: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(path)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("train.epochs=abc", "invalid train.epochs: 'abc' (expected an integer)"),
        ("train.epochs=2.5", "invalid train.epochs: 2.5"),
        ("optim.nesterov=1", "invalid optim.nesterov: 1 (expected true or false)"),
        ("optim.lr=fast", "invalid optim.lr: 'fast' (expected a number)"),
        ("data.synthetic_shape=3", "expected a list"),
    ],
)
def test_wrong_types_are_named(assignment, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, None, [assignment])
    assert message in str(info.value)


def test_ints_are_accepted_for_floats_and_null_for_optionals():
    cfg = load_config(None, None, ["optim.lr=1", "train.clip_grad_norm=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.clip_grad_norm is None


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_assignment("a=[1, 2]") == (["a"], [1, 2])
    assert parse_assignment("a=null") == (["a"], None)
    assert parse_assignment("a=esam") == (["a"], "esam")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("novalue")


def test_extends_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_yaml_round_trips():
    cfg = load_config(None, {"optim.name": "esam", "optim.args.beta": 0.5, "name": "x"})
    text = dump_yaml(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert to_dict(again)["optim"]["args"] == {"beta": 0.5}
    assert isinstance(again, Config)
