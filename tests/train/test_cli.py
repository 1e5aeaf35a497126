"""The `effsam` command end to end: exit codes, files written, tables parsed back."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from effsam.train.cli import main
from effsam.train.records import read_metrics
from train.tiny_runs import TINY_ARGS


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_writes_table_csv_json_and_plot(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "2", "--optimizers", "sgd,sam,esam"]
    argv += ["--seeds", "0,1", "--out", str(tmp_path), "--name", "cmp", "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    root = tmp_path / "cmp"
    assert "| Optimizer | Test accuracy (%) | Images/s | vs SAM | vs SGD |" in out
    with open(root / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["SGD", "SAM", "ESAM"]
    assert [r["seeds"] for r in rows] == ["2", "2", "2"]
    by = {r["label"]: r for r in rows}
    assert float(by["SGD"]["speed_vs_sgd"]) == 1.0 and float(by["SAM"]["speed_vs_sam"]) == 1.0
    assert float(by["ESAM"]["speed_vs_sam"]) == pytest.approx(
        float(by["ESAM"]["images_per_s"]) / float(by["SAM"]["images_per_s"])
    )
    result = json.loads((root / "compare.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 6
    for row in result["rows"]:
        mine = [r for r in result["runs"] if r["label"] == row["label"]]
        accs = [r["final_test_acc"] for r in mine]
        assert row["acc_mean"] == pytest.approx(sum(accs) / 2)
        assert row["acc_std"] is not None and row["acc_std"] >= 0
        assert {r["seed"] for r in mine} == {0, 1}
    # each run is an ordinary run directory with its own seed and optimizer
    esam1 = root / "runs" / "ESAM_s1"
    assert yaml.safe_load((esam1 / "config.yaml").read_text())["seed"] == 1
    assert len(read_metrics(esam1)) == 2
    md = (root / "compare.md").read_text()
    sam_line = next(line for line in md.splitlines() if line.startswith("| SAM |"))
    assert "100.0%" in sam_line and " ± " in sam_line
    assert (root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the code that trained the runs: the checkout's commit, in every env.json and the table
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    codes = {
        json.loads((d / "env.json").read_text())["code"]["commit"]
        for d in (root / "runs").iterdir()
    }
    assert codes == {head or None}
    assert f"\nCode: commit {head}" in md if head else "\nCode: effsam" in md
    # --resume reuses finished runs instead of training again
    code, out, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((root / "compare.json").read_text())["runs"] == result["runs"]
    # ... but not when the settings of a finished run changed
    code, _, err = run([*argv, "--resume", "--lr", "0.2"], capsys)
    assert code == 2 and "differs in optim.lr" in err
    # a run saved before a config key existed ran with its default: still reused ...
    saved = yaml.safe_load((esam1 / "config.yaml").read_text())
    del saved["train"]["sds_diagnostics"]
    (esam1 / "config.yaml").write_text(yaml.safe_dump(saved))
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((root / "compare.json").read_text())["runs"] == result["runs"]
    # ... and a value other than the default is still a change
    code, _, err = run([*argv, "--resume", "--set", "train.sds_diagnostics=5"], capsys)
    assert code == 2 and "differs in train.sds_diagnostics" in err


def test_compare_on_digits(tmp_path, capsys):
    argv = ["compare", "--epochs", "1", "--optimizers", "sgd,esam", "--seeds", "0"]
    argv += ["--train-subset", "300", "--out", str(tmp_path), "--quiet", "--no-plot"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    root = tmp_path / "compare_digits_small_cnn"
    result = json.loads((root / "compare.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["SGD", "ESAM"]
    assert all(r["dataset"] == "digits" and r["params"] > 0 for r in result["runs"])
    assert result["rows"][0]["speed_vs_sam"] is None  # no SAM in this comparison
    assert "| ESAM |" in out and "—" in out
    assert not (root / "compare.png").exists()


def test_train_with_config_and_overrides_then_resume_from_the_run_dir(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  name: esam\n  args: {rho: 0.1, beta: 0.7}\n")
    argv = ["train", "--config", str(config), *TINY_ARGS, "--gamma", "0.75"]
    argv += ["--out", str(tmp_path), "--name", "r", "--quiet", "--stop-after", "2"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "r: stopped after epoch 2" in out
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["optim"]["args"] == {"rho": 0.1, "beta": 0.7, "gamma": 0.75}
    code, out, err = run(["train", "--resume", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    assert "r: finished; test accuracy" in out
    assert [m["epoch"] for m in read_metrics(tmp_path / "r")] == [1, 2, 3]


def test_dry_run_prints_the_resolved_config(capsys):
    code, out, _ = run(["train", "--optimizer", "esam", "--set", "optim.args.beta=0.5",
                        "--dry-run"], capsys)  # fmt: skip
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["optim"]["name"] == "esam" and cfg["optim"]["args"] == {"beta": 0.5}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--optimizer", "adamsam"], "unknown optimizer 'adamsam'"),
        (["train", "--model", "vgg"], "unknown model 'vgg'"),
        (["train", "--dataset", "mnist"], "unknown data set 'mnist'"),
        (["compare", "--optimizers", "sgd,foo"], "unknown optimizer 'foo'"),
        (["train", "--lr", "-1"], "invalid optim.lr: -1.0"),
        (["train", "--epochs", "0"], "invalid train.epochs: 0"),
        (["train", "--optimizer", "esam", "--beta", "1.2"], "invalid optim.args.beta: 1.2"),
        (["train", "--rho", "-0.5"], "invalid optim.args.rho: -0.5"),
        (["train", "--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
    ],
)
def test_bad_input_fails_before_training_with_exit_code_2(tmp_path, capsys, argv, message):
    code, out, err = run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was started
    if "unknown optimizer" in message:
        assert "choose from sgd, sam, asam, esam" in err


def test_missing_cifar_is_reported_without_a_traceback(tmp_path, capsys):
    code, _, err = run(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                        "--out", str(tmp_path / "runs"), "--quiet"], capsys)  # fmt: skip
    assert code == 2 and "cifar10" in err.lower() and "Traceback" not in err


def test_list(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0
    assert "esam" in out and "small_cnn" in out and "digits" in out


def test_python_dash_m_effsam_runs_the_same_command():
    proc = subprocess.run(
        [sys.executable, "-m", "effsam", "compare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "--optimizers" in proc.stdout and "--seeds" in proc.stdout


def test_the_code_line_names_each_code_with_its_runs(tmp_path):
    from effsam.train.records import code_line

    for name, code in [
        ("A_s0", {"commit": "aaa", "dirty": False}),
        ("B_s0", {"commit": "bbb", "dirty": True}),
        ("C_s0", {"commit": "aaa", "dirty": False}),
        ("D_s0", None),
    ]:
        (tmp_path / name).mkdir()
        env = {} if code is None else {"code": code}
        (tmp_path / name / "env.json").write_text(json.dumps(env))
    line = code_line(sorted(tmp_path.iterdir()))
    assert line == (
        "Code: commit aaa (A_s0, C_s0); commit bbb+dirty (B_s0); not recorded (D_s0) "
        "(each run's env.json)"
    )
    assert code_line([tmp_path / "A_s0"]) == "Code: commit aaa (each run's env.json)"
