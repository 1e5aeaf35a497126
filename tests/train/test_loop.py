"""The training loop on tiny synthetic runs: files, metrics, determinism and resume."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
import yaml

from effsam.train.build import load_data
from effsam.train.checkpoint import load_checkpoint
from effsam.train.config import ConfigError, load_config
from effsam.train.loop import train
from effsam.train.records import METRIC_FIELDS, read_metrics
from train.tiny_runs import without_timing


def test_run_writes_config_env_metrics_summary_and_checkpoint(tiny, tmp_path):
    cfg = tiny(optim__name="esam", name="r")
    summary = train(cfg, quiet=True)
    run = tmp_path / "r"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.prev.pt",  # epoch 2's, kept in case the latest is damaged
        "checkpoint.pt",
        "config.yaml",
        "env.json",
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
    ]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["name"] == "esam"
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1
    assert env["torch_threads"] == 1
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(METRIC_FIELDS)
    assert [float(r["test_acc"]) for r in rows] == [m["test_acc"] for m in metrics]
    for m in metrics:
        assert m["steps"] == 6  # 96 images in batches of 16
        assert 0 <= m["train_acc"] <= 1 and 0 <= m["test_acc"] <= 1
        assert m["selected_fraction"] == pytest.approx(0.5)  # ESAM's gamma
        assert 0 < m["kept_fraction"] <= 1  # SWP
        # accuracies are whole counts over 96 training / 40 test images
        assert m["train_acc"] * 96 == pytest.approx(round(m["train_acc"] * 96))
        assert m["test_acc"] * 40 == pytest.approx(round(m["test_acc"] * 40))
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    # the first two steps of the process are left out of the timing
    assert metrics[0]["timed_images"] == 4 * 16 and metrics[1]["timed_images"] == 96
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert summary["finished"] and summary["completed_epochs"] == 3
    assert summary["final_test_acc"] == metrics[-1]["test_acc"]
    assert summary["best_test_acc"] == max(m["test_acc"] for m in metrics)
    assert summary["images_per_s"] > 0 and summary["steps"] == 18
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["metrics"] == metrics


def test_training_learns_the_synthetic_classes(tiny):
    summary = train(tiny(optim__name="sgd", train__epochs=8, optim__lr=0.1), quiet=True)
    assert summary["final_train_acc"] > 0.6  # chance is 0.25


def test_same_seed_same_run_and_other_seed_other_run(tiny, tmp_path):
    a = train(tiny(optim__name="esam", name="a"), quiet=True)
    b = train(tiny(optim__name="esam", name="b"), quiet=True)
    c = train(tiny(optim__name="esam", name="c", seed=1), quiet=True)
    ma, mb, mc = (without_timing(read_metrics(tmp_path / n)) for n in "abc")
    assert ma == mb
    assert ma != mc
    assert a["final_test_loss"] == b["final_test_loss"] != c["final_test_loss"]


@pytest.mark.parametrize("optimizer", ["esam", "ssam-d", "sgd"])
def test_resume_ends_as_an_uninterrupted_run(tiny, tmp_path, optimizer):
    straight = tiny(optim__name=optimizer, name="straight")
    train(straight, quiet=True)
    parts = tiny(optim__name=optimizer, name="parts")
    first = train(parts, quiet=True, stop_after=2)
    assert not first["finished"] and first["completed_epochs"] == 2
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["epoch"] == 2
    train(parts, quiet=True, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert without_timing(a["metrics"]) == without_timing(b["metrics"])
    assert without_timing(read_metrics(tmp_path / "parts")) == without_timing(a["metrics"])
    assert b["epoch"] == 3


def test_resuming_a_finished_run_changes_nothing(tiny, tmp_path):
    cfg = tiny(optim__name="sam", name="r", train__epochs=2)
    train(cfg, quiet=True)
    before = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    summary = train(cfg, quiet=True, resume=True)
    after = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert summary["finished"] and after["metrics"] == before["metrics"]


def test_an_existing_run_is_not_overwritten_by_accident(tiny):
    cfg = tiny(optim__name="sgd", name="r", train__epochs=1)
    train(cfg, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        train(cfg, quiet=True)
    assert train(cfg, quiet=True, overwrite=True)["finished"]


def test_resume_refuses_a_changed_config(tiny):
    train(tiny(optim__name="sgd", name="r"), quiet=True, stop_after=1)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in optim\.lr"):
        train(tiny(optim__name="sgd", name="r", optim__lr=0.2), quiet=True, resume=True)
    # threads do not change what is computed
    assert train(tiny(optim__name="sgd", name="r", train__threads=2), quiet=True, resume=True)[
        "finished"
    ]


def test_step_options_are_passed_through(tiny):
    summary = train(
        tiny(
            optim__name="sam",
            train__epochs=1,
            train__amp="bf16",
            train__accumulation_steps=2,
            train__clip_grad_norm=1.0,
            train__label_smoothing=0.1,
            train__warmup_epochs=0.5,
        ),
        quiet=True,
    )
    assert summary["finished"] and summary["skipped_steps"] == 0
    assert summary["final_train_loss"] > 0


def test_fp16_uses_a_grad_scaler_saved_in_the_checkpoint(tiny, tmp_path):
    from effsam.train.preflight import ToolkitWarning

    with pytest.warns(ToolkitWarning, match="use --amp bf16") as caught:  # on a CPU
        train(tiny(optim__name="esam", name="r", train__epochs=1, train__amp="fp16"), quiet=True)
    assert caught[0].filename == __file__  # the warning points at the caller
    scaler = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["scaler"]
    assert "scale" in scaler and scaler["scale"] > 0


def test_a_train_subset_larger_than_the_data_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="train_subset 500 is out of range"):
        train(tiny(data__train_subset=500), quiet=True)


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_the_plain_module(tiny, tmp_path):
    summary = train(tiny(optim__name="sam", name="c", train__compile=True), quiet=True)
    assert summary["finished"]
    state = load_checkpoint(tmp_path / "c" / "checkpoint.pt")["model"]
    assert not any(k.startswith("_orig_mod") for k in state)  # loadable without compile


def test_eval_every_and_a_fixed_subset(tmp_path):
    """Evaluation every N epochs (always after the last); the subset can stay fixed across
    run seeds so that the seed-to-seed spread measures the optimizer, not the data."""
    cfg = load_config(
        assignments=[
            "data.dataset=digits",
            "data.train_subset=200",
            "data.subset_seed=5",
            "model.name=small_cnn",
            "optim.name=sgd",
            "train.epochs=3",
            "train.eval_every=2",
            f"out_dir={tmp_path}",
            "checkpoint=false",
        ],
    )
    summary = train(cfg, quiet=True)
    metrics = read_metrics(tmp_path / cfg.run_name())
    assert [m["test_acc"] is not None for m in metrics] == [False, True, True]
    assert summary["final_test_acc"] == metrics[-1]["test_acc"]
    a = load_data(cfg)
    b = load_data(dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert torch.equal(a.train_x, b.train_x)
    c = load_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, subset_seed=6)))
    assert not torch.equal(a.train_x, c.train_x)
