"""Checkpoints: atomic writes (a crash leaves the previous one intact), weights_only loading,
random-generator state round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from effsam.train import checkpoint as ck


def test_save_then_load_weights_only(tmp_path):
    state = {"epoch": 2, "model": {"w": torch.arange(4.0)}, "metrics": [{"acc": 0.5}]}
    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint(path, state)
    loaded = ck.load_checkpoint(path)
    assert loaded["epoch"] == 2 and loaded["metrics"] == [{"acc": 0.5}]
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    path = tmp_path / "rng.pt"
    ck.save_checkpoint(path, {"rng": ck.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.set_rng_state(ck.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_changed_keys():
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}}
    new = {"a": 1, "b": {"c": 3, "d": [1, 2]}, "e": None}
    assert ck.changed_keys(old, new) == {"b.c"}
    assert ck.changed_keys(old, {**old, "b": {"c": 2, "d": [2]}}) == {"b.d"}
