"""``effsam frontier`` on the digits default and on a CIFAR config (synthetic images of the
same shape): the folder it writes, the verdicts by the rule it states, resuming, the
automatic criterion, and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effsam.frontier import command

ROOT = Path(__file__).resolve().parents[2]


def _frontier(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "effsam", "frontier", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def _runs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("**/runs/*/summary.json"))


def test_the_digits_default_writes_speeds_runs_report_and_plot_and_resumes(tmp_path):
    args = ("--epochs", "1", "--seeds", "0,1", "--methods", "rst", "--out", str(tmp_path))
    proc = _frontier(*args, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "frontier_digits_small_cnn"
    for name in ("speeds.json", "frontier.md", "frontier.json", "frontier.png"):
        assert (folder / name).is_file(), name
    speeds = {r["variant"]: r for r in json.loads((folder / "speeds.json").read_text())["rows"]}
    assert set(speeds) == {"sgd", "sam", "rst"} and speeds["sam"]["vs_sam"] == 1.0
    runs = _runs(folder)
    # SGD and SAM on both seeds (every seed), RST on the base seeds (both, with two seeds)
    assert sorted(p.name for p in runs) == [
        "RST_s0",
        "RST_s1",
        "SAM_s0",
        "SAM_s1",
        "SGD_s0",
        "SGD_s1",
    ]
    for run in runs:
        assert json.loads((run / "frontier-stamp.json").read_text())["launches"]
        assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    report = (folder / "frontier.md").read_text()
    assert "## The rule" in report and "Seeds needed for a verdict: 2" in report
    assert "| RST | 1 | 2 |" in report  # the RST row: 1 epoch, 2 seeds
    data = json.loads((folder / "frontier.json").read_text())
    verdict = data["verdicts"]["rst"]
    assert verdict["rule"] in ("share", "std") and verdict["status"] in (
        "keeps", "does not keep",
    )  # fmt: skip
    mtimes = {p: (p / "summary.json").stat().st_mtime for p in runs}
    # again: nothing is trained twice, and the report is the same
    again = _frontier(*args, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (p / "summary.json").stat().st_mtime for p in _runs(folder)} == mtimes
    assert json.loads((folder / "frontier.json").read_text())["verdicts"]["rst"] == verdict


def test_a_cifar_config_runs_with_its_own_labels_and_settings(tmp_path):
    config = ROOT / "configs" / "compare" / "cifar10_cpu_frontier.yaml"
    proc = _frontier(
        "--config", str(config), "--epochs", "1", "--seeds", "0,1", "--methods", "sam-stale",
        "--rule", "std", "--out", str(tmp_path), "--name", "cifar", "--quiet",
        "--set", "data.dataset=synthetic", "--set", "data.train_subset=null",
        "--set", "data.synthetic_train=64", "--set", "data.synthetic_test=32",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "cifar"
    names = sorted(p.name for p in _runs(folder))
    assert names == ["SAM-stale_s0", "SAM-stale_s1", "SAM_s0", "SAM_s1", "SGD_s0", "SGD_s1"]
    cfg = folder / "seed0" / "cifar10_cpu_frontier" / "runs" / "SAM_s0" / "config.yaml"
    text = cfg.read_text()
    assert "cifar_cnn" in text and "synthetic" in text  # the config's model, the --set data
    workload = json.loads((folder / "speeds.json").read_text())["workload"]
    assert workload["model_name"] == "cifar_cnn" and list(workload["image_shape"]) == [3, 32, 32]
    report = (folder / "frontier.md").read_text()
    assert "within SAM's seed std" in report and "chosen with --rule" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "3"], "at least two"),
        (["--methods", "sam,nonsense"], "nonsense"),
        (["--config", "no/such.yaml"], "no such file"),
        (["--epochs", "0"], "--epochs 0"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_write_nothing(tmp_path, args, message, capsys):
    assert command.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _row(name: str, accs: list[float]) -> dict:
    import statistics

    return {
        "optimizer": name,
        "acc": statistics.fmean(accs),
        "acc_std": statistics.stdev(accs),
        "seeds": list(range(len(accs))),
    }


def test_the_automatic_criterion_is_the_share_only_when_sams_gain_exceeds_the_noise():
    # SAM +8 points, seed stds ~0.5: the share of SAM's gain can be told
    rule, why = command.auto_rule(
        [_row("sgd", [0.45, 0.44, 0.455]), _row("sam", [0.53, 0.52, 0.525])]
    )
    assert rule == "share" and "+7.67" in why
    # SAM +0.5 point with seed stds ~0.4: inside the noise (2 x 0.4 = 0.8 > 0.5)
    rule, _ = command.auto_rule(
        [_row("sgd", [0.60, 0.608, 0.592]), _row("sam", [0.605, 0.613, 0.597])]
    )
    assert rule == "std"
    # SAM below SGD: never the share
    rule, _ = command.auto_rule(
        [_row("sgd", [0.60, 0.61, 0.605]), _row("sam", [0.50, 0.51, 0.505])]
    )
    assert rule == "std"
    # SGD or SAM missing: the seed-std criterion, said so
    rule, why = command.auto_rule([_row("sam", [0.5, 0.51])])
    assert rule == "std" and "not both finished" in why


def test_a_partial_run_with_a_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    from effsam.frontier.runs import prepare_partial
    from effsam.train.checkpoint import CHECKPOINT_KEYS, save_checkpoint

    def state(epoch):
        return {k: {} for k in CHECKPOINT_KEYS} | {"epoch": epoch}

    run = tmp_path / "cmp" / "runs" / "SAM_s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    save_checkpoint(run / "checkpoint.pt", state(1))
    save_checkpoint(run / "checkpoint.pt", state(2))  # epoch 1 kept as checkpoint.prev.pt
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (run / "checkpoint.pt").write_bytes(bytes(data))
    prepare_partial(tmp_path)
    out = capsys.readouterr().out
    assert "1 epoch(s) done: resumes from the previous checkpoint (checkpoint.prev.pt)" in out
    assert run.is_dir()
    # the previous one damaged too: the run is moved aside, to be trained afresh
    (run / "checkpoint.prev.pt").write_bytes(b"not a checkpoint")
    prepare_partial(tmp_path)
    assert "checkpoint unreadable" in capsys.readouterr().out
    assert not run.exists() and len(list((tmp_path / "cmp" / "stale").iterdir())) == 1
