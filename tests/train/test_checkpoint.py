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


# ---------------------------------------------------------------- content digest
def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "epoch": 3,
        "model": {"w": torch.randn(64, 16, generator=g), "b": torch.zeros(16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "metrics": [{"acc": 0.5, "loss": 1.25, "note": "x"}],
        "rng": torch.arange(32, dtype=torch.uint8),
    }


def _equal(a, b) -> bool:
    """The same values and types, tensor by tensor (dtype, shape and every element)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    offset = data.find(tensor.numpy().tobytes())
    assert offset > 0
    return offset


def test_a_changed_byte_inside_a_tensor_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _state()
    ck.save_checkpoint(path, state)
    data = bytearray(path.read_bytes())
    data[_tensor_offset(bytes(data), state["model"]["w"]) + 101] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="is damaged: its content does not match") as e:
        ck.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_a_checkpoint_without_a_digest_is_refused_unless_it_is_an_older_run_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(_state(), path)  # no digest: not written by save_checkpoint
    with pytest.raises(ck.CheckpointError, match="has no content digest"):
        ck.load_checkpoint(path)
    legacy = {k: _state().get(k, {}) for k in ck.CHECKPOINT_KEYS}  # an older run's checkpoint
    torch.save(legacy, path)
    with pytest.warns(ck.CheckpointWarning, match="cannot be verified"):
        assert _equal(ck.load_checkpoint(path, ck.CHECKPOINT_KEYS, legacy=True), legacy)


def test_the_previous_checkpoint_is_kept_and_used_when_the_latest_is_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    first, second = _state(), {**_state(), "epoch": 4}
    ck.save_checkpoint(path, first)
    ck.save_checkpoint(path, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert ck.load_checkpoint(ck.previous_path(path))["epoch"] == 3
    data = bytearray(path.read_bytes())
    data[_tensor_offset(bytes(data), second["model"]["w"]) + 7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(ck.CheckpointWarning, match="Using the previous checkpoint"):
        state, source = ck.load_run_checkpoint(path, ("epoch", "model"))
    assert source == ck.previous_path(path) and _equal(state, first)
    # both damaged: one error naming both files
    ck.previous_path(path).write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="the previous one cannot be used either") as e:
        ck.load_run_checkpoint(path, ("epoch",))
    assert str(path) in str(e.value) and str(ck.previous_path(path)) in str(e.value)


def test_random_byte_flips_load_the_same_state_or_fail_clearly(tmp_path):
    """Seeded fuzz: whatever bytes of a checkpoint change, loading gives exactly the saved
    state or a CheckpointError, never another state (and never another exception)."""
    path = tmp_path / "checkpoint.pt"
    state = _state()
    ck.save_checkpoint(path, state, keep_previous=False)
    original = path.read_bytes()
    rng = random.Random(1234)
    outcomes = {"same": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:  # half of them inside the weights, where torch checks nothing
            start = _tensor_offset(original, state["model"]["w"])
            places = [start + rng.randrange(64 * 16 * 4) for _ in range(rng.randint(1, 3))]
        else:
            places = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
        for place in places:
            data[place] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        try:
            loaded = ck.load_checkpoint(path)
        except ck.CheckpointError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1
            continue
        assert _equal(loaded, state), f"trial {trial}: flips at {places} loaded another state"
        outcomes["same"] += 1
    assert outcomes["refused"] > 100  # the fuzz hit the content, not only slack bytes
