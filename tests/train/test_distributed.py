"""Data parallel under torchrun: two CPU processes (gloo), metrics reduced once per epoch,
rank 0 checkpoints, and a killed run resumes to the same end as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effsam.train.build import build_model, load_data, make_loaders
from effsam.train.checkpoint import load_checkpoint
from effsam.train.config import load_config
from effsam.train.distributed import DistContext
from effsam.train.epoch import evaluate
from effsam.train.records import read_metrics
from train.tiny_runs import TINY_ARGS, without_timing


def torchrun(args: list[str]) -> subprocess.Popen:
    """Launches ``effsam train`` on two local workers, in a session of its own (so the
    launcher and its workers can be stopped together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "effsam", "train", *TINY_ARGS, "--quiet", *args]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def children(pid: int) -> list[int]:
    """The launcher's worker processes (torchrun gives each a session of its own)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the workers, then the launcher: a crash, with no chance to clean up."""
    if proc.poll() is None:
        for child in children(proc.pid):
            os.kill(child, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def test_two_process_run_reduces_metrics_once_per_epoch(tmp_path):
    out = finish(torchrun(["--optimizer", "esam", "--out", str(tmp_path), "--name", "d"]))
    run = tmp_path / "d"
    assert out.count("d: finished") == 1  # rank 0 reports
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # 96 images split over 2 workers in batches of 16: 3 steps each; the sums cover all
        # 96 images exactly once (reduced once, not compounded)
        assert m["steps"] == 3
        assert m["train_acc"] * 96 == pytest.approx(round(m["train_acc"] * 96))
        assert m["selected_fraction"] == pytest.approx(0.5)
    # the reduced test accuracy is that of the checkpointed model on the whole test set
    cfg = load_config(run / "config.yaml")
    data = load_data(cfg)
    model = build_model(cfg, data.num_classes, data.train_x.shape[1])
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    _, test = make_loaders(cfg, data, 0, 1, torch.device("cpu"))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    loss, acc = evaluate(model, test, "off", ctx)
    assert acc == metrics[-1]["test_acc"]
    assert loss == pytest.approx(metrics[-1]["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_end(tmp_path):
    common = ["--optimizer", "esam", "--epochs", "30", "--out", str(tmp_path)]
    straight = torchrun([*common, "--name", "straight"])
    finish(straight, timeout=600)

    victim = torchrun([*common, "--name", "killed"])
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.02)
    stop(victim)  # the launcher and both workers, mid-training
    killed_at = load_checkpoint(ckpt)["epoch"]  # the last checkpoint is intact
    assert 2 <= killed_at < 30

    finish(torchrun([*common, "--name", "killed", "--resume"]), timeout=600)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert without_timing(a["metrics"]) == without_timing(b["metrics"])
    assert without_timing(read_metrics(tmp_path / "killed")) == without_timing(a["metrics"])
    assert not list(Path(tmp_path / "killed").glob(".*tmp*"))
