"""Bad input a new user meets: each class gets a clear message and an exit status, never a
traceback, and nothing already written is lost."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import yaml

from effsam.train import checkpoint as ck
from effsam.train.cli import main
from effsam.train.config import load_config
from train.tiny_runs import TINY_ARGS


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def clean(err: str) -> None:
    assert "Traceback" not in err
    assert "weights_only" not in err  # never suggest unsafe loading


# ---------------------------------------------------------------- device
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("dry", [False, True])
def test_a_missing_cuda_device_is_a_config_error(tmp_path, capsys, device, command, dry):
    argv = [command, *TINY_ARGS, "--device", device, "--out", str(tmp_path / "o"), "--quiet"]
    code, _, err = run(argv + (["--dry-run"] if dry else []), capsys)
    assert code == 2
    assert f"invalid train.device: '{device}'" in err and "CUDA" in err
    clean(err)
    assert not (tmp_path / "o").exists()  # checked before anything is written


# ---------------------------------------------------------------- output folder
@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_output_folder_that_is_a_file(tmp_path, capsys, command):
    target = tmp_path / "file"
    target.write_text("x")
    for out, why in ((target, "is a file"), (target / "sub", "which is a file")):
        code, _, err = run([command, *TINY_ARGS, "--out", str(out), "--quiet"], capsys)
        assert code == 2 and f"invalid out_dir: '{out}'" in err and why in err
        clean(err)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_an_output_folder_that_cannot_be_created(capsys):
    code, _, err = run(["train", *TINY_ARGS, "--out", "/proc/effsam_runs", "--quiet"], capsys)
    assert code == 2 and "invalid out_dir: '/proc/effsam_runs'" in err
    clean(err)


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("dry", [False, True])
@pytest.mark.parametrize(
    "code_, text", [(errno.EROFS, "read-only file system"), (errno.EACCES, "not writable")]
)
def test_an_unwritable_output_folder(tmp_path, capsys, monkeypatch, command, dry, code_, text):
    # (the tests may run as root, for whom permission bits do not apply: simulate the refusal)
    real = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(tmp_path)):
            raise OSError(code_, os.strerror(code_))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    argv = [command, *TINY_ARGS, "--out", str(tmp_path), "--quiet"]
    code, _, err = run(argv + (["--dry-run"] if dry else []), capsys)
    assert code == 2 and f"invalid out_dir: '{tmp_path}'" in err and text in err
    clean(err)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- data
@pytest.mark.parametrize("dataset", ["cifar10", "imagefolder"])
def test_a_dry_run_checks_that_the_data_exist(tmp_path, capsys, dataset):
    argv = ["train", "--dataset", dataset, "--data-dir", str(tmp_path / "none"), "--dry-run"]
    code, out, err = run([*argv, "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and str(tmp_path / "none") in err and out == ""
    clean(err)


def test_a_train_subset_smaller_than_the_classes_warns(tmp_path, capsys):
    argv = ["train", "--train-subset", "5", "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 0
    assert "warning: data.train_subset 5 is smaller than the 10 classes" in err


# ---------------------------------------------------------------- precision
def test_fp16_on_the_cpu_warns_and_suggests_bf16(tmp_path, capsys):
    code, _, err = run(["train", *TINY_ARGS, "--amp", "fp16", "--dry-run"], capsys)
    assert code == 0
    assert "effsam train: warning: train.amp 'fp16' on the CPU" in err and "bf16" in err
    code, _, err = run(["train", *TINY_ARGS, "--amp", "bf16", "--dry-run"], capsys)
    assert code == 0 and "warning" not in err


# ---------------------------------------------------------------- divergence
def test_a_run_that_skips_most_steps_fails_with_exit_1(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--lr", "1e6", "--out", str(tmp_path), "--name", "d"]
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 1
    assert "were skipped for non-finite gradients: the run diverged" in err
    assert "train.max_skipped_fraction = 0.1" in err and "finished" not in out
    clean(err)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["skipped_steps"] > 3 and "diverged" in summary["failed"]
    done = summary["completed_epochs"]
    assert done < 3 and not summary["finished"]  # stopped early, at an epoch's end
    assert ck.load_checkpoint(tmp_path / "d" / "checkpoint.pt")["epoch"] == done
    # the limit is configurable: 1 allows every step to be skipped
    code, out, err = run([*argv, "--overwrite", "--max-skipped", "1", "--quiet"], capsys)
    assert code == 0 and "d: finished" in out and "steps skipped" in out


def test_skipped_steps_do_not_warn_once_per_step(tmp_path, capsys, recwarn):
    argv = ["train", *TINY_ARGS, "--lr", "1e6", "--max-skipped", "1", "--out", str(tmp_path)]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert not [w for w in recwarn if "non-finite gradient norm" in str(w.message)]
    assert "steps skipped)" in out  # counted in the epoch line instead


def test_max_skipped_is_validated(capsys):
    code, _, err = run(["train", "--max-skipped", "1.5", "--dry-run"], capsys)
    assert code == 2 and "invalid train.max_skipped_fraction: 1.5" in err


def test_too_few_steps_to_time_is_explained(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--batch-size", "1000", "--epochs", "1", "--out", str(tmp_path)]
    code, out, _ = run([*argv, "--quiet"], capsys)
    assert code == 0
    assert "speed not measured (too few steps: the first 2 are untimed warm-up)" in out
    assert "images/s" not in out  # no "— (...) images/s"


# ---------------------------------------------------------------- checkpoints
#: random.Random(2).randbytes(4096) makes torch's weights-only unpickler raise IndexError
_UNDERFLOW_SEED = 2


def _finished_run(tmp_path, capsys, name="r"):
    argv = ["train", *TINY_ARGS, "--epochs", "2", "--stop-after", "1", "--quiet"]
    code, _, err = run([*argv, "--out", str(tmp_path), "--name", name], capsys)
    assert code == 0, err
    return tmp_path / name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"", "is empty (0 bytes)"),
        (lambda b: b[: len(b) // 2], "cannot be read: it is truncated or damaged"),
        (lambda b: os.urandom(4096), "damaged"),
        # bytes that make the weights-only unpickler fail with an IndexError
        (lambda b: random.Random(_UNDERFLOW_SEED).randbytes(4096), "damaged"),
        (lambda b: b"not a checkpoint\n" * 40, "damaged"),
    ],
    ids=["empty", "truncated", "garbage", "underflow", "text"],
)
@pytest.mark.parametrize("dry", [False, True])
def test_a_damaged_checkpoint_on_resume(tmp_path, capsys, damage, message, dry):
    run_dir = _finished_run(tmp_path, capsys)
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    before = ckpt.read_bytes()
    argv = ["train", "--resume", str(run_dir), "--quiet"] + (["--dry-run"] if dry else [])
    code, _, err = run(argv, capsys)
    assert code == 2 and str(ckpt) in err and message in err
    clean(err)
    assert ckpt.read_bytes() == before  # left as it was


def test_a_checkpoint_of_unsafe_objects_is_refused_without_loading_it(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, capsys)
    torch.save({"epoch": 1, "payload": tempfile.TemporaryDirectory}, run_dir / "checkpoint.pt")
    code, _, err = run(["train", "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 2 and "not loaded for safety" in err
    clean(err)


def test_a_checkpoint_of_another_optimizer_is_a_clear_error(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, capsys)
    ckpt = run_dir / "checkpoint.pt"
    state = ck.load_checkpoint(ckpt)
    state["optimizer"] = {"state": {}, "param_groups": []}  # from a different optimizer
    ck.save_checkpoint(ckpt, state)
    code, _, err = run(["train", "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 2 and "does not fit this run's model and optimizer" in err
    clean(err)


def test_resume_of_a_missing_run_directory(tmp_path, capsys):
    code, _, err = run(["train", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "run directory not found" in err


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run_dir = _finished_run(tmp_path, capsys)
    before = (run_dir / "checkpoint.pt").read_bytes()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 100)  # part of the file, then the device is full
        raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 107008")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    code, _, err = run(["train", "--resume", str(run_dir), "--quiet"], capsys)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert code == 1
    assert "cannot write the checkpoint" in err and "the disk may be full" in err
    assert "the previous checkpoint is intact" in err and "--resume" in err
    clean(err)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    # once there is space again, the run continues from the intact checkpoint
    code, out, err = run(["train", "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 0 and "r: finished" in out, err


# ---------------------------------------------------------------- compare
def test_a_second_compare_stops_before_announcing_a_run(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0"]
    argv += ["--out", str(tmp_path), "--name", "c", "--no-plot"]
    assert run([*argv, "--quiet"], capsys)[0] == 0
    code, out, err = run(argv, capsys)
    assert code == 2 and "already holds a run" in err and "[1/" not in out


def test_a_shared_arg_that_is_not_a_number(capsys):
    code, _, err = run(["train", "--set", "optim.args.rho=[1, 2]", "--dry-run"], capsys)
    assert code == 2 and "invalid optim.args.rho: [1, 2] (must be a number)" in err
    code, _, err = run(["train", "--rho", "nan", "--dry-run"], capsys)
    assert code == 2 and "invalid optim.args.rho: nan (must be finite and >= 0)" in err


# ---------------------------------------------------------------- analyze
def test_analyze_a_damaged_checkpoint(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, capsys)
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    code, _, err = run(["analyze", str(run_dir)], capsys)
    assert code == 2 and str(ckpt) in err and "truncated" in err
    clean(err)


def test_analyze_checks_out_before_computing(tmp_path, capsys, monkeypatch):
    import effsam.train.analyze as analysis_run

    run_dir = _finished_run(tmp_path, capsys)
    target = tmp_path / "file"
    target.write_text("x")

    def never(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(analysis_run, "hessian_top_eigenvalue", never)
    code, _, err = run(["analyze", str(run_dir), "--out", str(target / "sub")], capsys)
    assert code == 2 and f"invalid --out: '{target / 'sub'}'" in err
    clean(err)


# ---------------------------------------------------------------- the command itself
def test_list_into_a_closed_pipe():
    proc = subprocess.run(
        f"{sys.executable} -m effsam list | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.startswith("data sets:")
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr


def test_without_the_toolkit_extra_the_command_says_what_to_install():
    code = (
        "import sys; sys.modules['yaml'] = None\n"  # as if PyYAML were not installed
        "from effsam.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for argv, status in ((["compare"], 2), (["--version"], 0)):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == status, proc.stderr
        assert "pip install 'effsam[toolkit]'" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr


def test_version(capsys):
    import effsam

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"effsam {effsam.__version__} (torch ")


def test_a_dry_run_prints_an_estimate_and_writes_nothing(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--optimizers", "sgd,esam", "--seeds", "0,1"]
    code, out, err = run([*argv, "--out", str(tmp_path), "--dry-run"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out)["compare"]["optimizers"] == ["sgd", "esam"]  # still YAML
    assert "# estimated duration on this machine" in out
    assert "18 steps × " in out and "× 2 seeds" in out and "#   total: about " in out
    assert not any(tmp_path.iterdir())


def test_damaged_data_leave_no_run_directory_and_keep_an_overwritten_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(os.urandom(2048))  # there, but damaged
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(data), "--allow-unverified"]
    argv += ["--out", str(tmp_path / "runs"), "--name", "r", "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "damaged" in err
    clean(err)
    assert not (tmp_path / "runs" / "r").exists()
    # an existing run is not deleted by --overwrite when the new run's data fail to load
    run_dir = _finished_run(tmp_path / "runs", capsys)
    before = sorted(p.name for p in run_dir.iterdir())
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 2 and sorted(p.name for p in run_dir.iterdir()) == before


def test_augment_choices_do_not_show_none(capsys):
    code, _, err = run(["train", "--augment", "foo", "--dry-run"], capsys)
    assert code == 2 and "choose from none, flip, cifar" in err


def test_a_compare_dry_run_checks_its_run_directories(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0"]
    argv += ["--out", str(tmp_path), "--name", "c", "--no-plot", "--quiet"]
    assert run(argv, capsys)[0] == 0
    code, out, err = run([*argv, "--dry-run"], capsys)
    assert code == 2 and "already holds a run" in err and out == ""
    # with --resume, a damaged summary or checkpoint of a run is reported, not a traceback
    (tmp_path / "c" / "runs" / "SGD_s0" / "summary.json").write_text("{not json")
    ckpt = tmp_path / "c" / "runs" / "SAM_s0" / "checkpoint.pt"
    for dry in ([], ["--dry-run"]):
        code, _, err = run([*argv, "--resume", *dry], capsys)
        assert code == 2 and "SGD_s0: its summary.json or config.yaml cannot be read" in err
        clean(err)
    (tmp_path / "c" / "runs" / "SGD_s0" / "summary.json").unlink()
    ckpt.write_bytes(b"")
    (tmp_path / "c" / "runs" / "SAM_s0" / "summary.json").unlink()
    code, _, err = run([*argv, "--resume", "--dry-run"], capsys)
    assert code == 2 and f"checkpoint {ckpt} is empty" in err


# ---------------------------------------------------------------- label noise
@pytest.mark.parametrize(
    "args, message",
    [
        (["--label-noise", "-0.1"], "invalid data.label_noise: -0.1 (must be a number in [0, 1))"),
        (["--label-noise", "1"], "invalid data.label_noise: 1.0 (must be a number in [0, 1))"),
        (["--label-noise", "1.5"], "invalid data.label_noise: 1.5 (must be a number in [0, 1))"),
        (["--label-noise", "nan"], "invalid data.label_noise: nan (must be a number in [0, 1))"),
        (["--label-noise", "inf"], "invalid data.label_noise: inf (must be a number in [0, 1))"),
        (["--label-noise", "abc"], "invalid data.label_noise: 'abc' (expected a number)"),
        (["--set", "data.label_noise=true"], "invalid data.label_noise: True (expected a number)"),
        (
            ["--set", "data.label_noise=[0.1]"],
            "invalid data.label_noise: [0.1] (expected a number)",
        ),
        (
            ["--label-noise", "0.3", "--label-noise-seed", "1.5"],
            "invalid data.label_noise_seed: '1.5' (expected an integer)",
        ),
        (
            ["--label-noise", "0.3", "--set", "data.label_noise_seed=0.5"],
            "invalid data.label_noise_seed: 0.5 (expected an integer)",
        ),
        (
            ["--set", "data.label_noise_seed=true"],
            "invalid data.label_noise_seed: True (expected an integer)",
        ),
        (
            ["--set", "data.label_noise_seed=-1"],
            "invalid data.label_noise_seed: -1 (must be an integer >= 0)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("dry", [False, True])
def test_a_bad_label_noise_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, args, message, command, dry
):
    import effsam.data

    def never(*a, **k):
        raise AssertionError("data loaded before the label noise was checked")

    monkeypatch.setattr(effsam.data, "load_dataset", never)  # what every run loads with
    argv = [command, *TINY_ARGS, *args, "--out", str(tmp_path / "o"), "--quiet"]
    code, out, err = run(argv + (["--dry-run"] if dry else []), capsys)
    assert code == 2 and out == ""
    assert err == f"effsam {command}: error: {message}\n"  # one line, naming the value
    clean(err)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- checkpoints prove their content
def _flip_a_weight(ckpt) -> None:
    """Changes one byte in the middle of the first convolution's weights, as a bad disk or
    copy would: torch's zip reader does not notice it."""
    state = ck.load_checkpoint(ckpt)
    weight = next(v for k, v in state["model"].items() if k.endswith("weight") and v.dim() == 4)
    data = bytearray(ckpt.read_bytes())
    offset = bytes(data).find(weight.numpy().tobytes())
    assert offset > 0
    data[offset + weight.numel() * 2] ^= 0x7F
    ckpt.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["train", "analyze"])
def test_a_checkpoint_with_a_changed_byte_is_refused(tmp_path, capsys, command):
    run_dir = _finished_run(tmp_path, capsys)  # one checkpoint: no previous one to fall back on
    ckpt = run_dir / "checkpoint.pt"
    _flip_a_weight(ckpt)
    before = ckpt.read_bytes()
    argv = ["train", "--resume", str(run_dir), "--quiet"] if command == "train" else []
    code, out, err = run(argv or ["analyze", str(run_dir), "--quiet"], capsys)
    assert code == 2 and f"checkpoint {ckpt} is damaged: its content does not match" in err
    assert len(err.strip().splitlines()) == 1 and "finished" not in out
    clean(err)
    assert ckpt.read_bytes() == before
    assert not (run_dir / "analysis.json").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--stop-after", "2", "--out", str(tmp_path), "--name", "r"]
    assert run([*argv, "--quiet"], capsys)[0] == 0
    run_dir = tmp_path / "r"
    prev = run_dir / "checkpoint.prev.pt"
    assert ck.load_checkpoint(prev)["epoch"] == 1
    _flip_a_weight(run_dir / "checkpoint.pt")
    code, out, err = run(["train", "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 0 and "r: finished" in out, err
    assert "is damaged" in err and f"Using the previous checkpoint {prev}" in err
    assert "(epoch 1)" in err
    clean(err)
    assert [m["epoch"] for m in json_lines(run_dir / "metrics.jsonl")] == [1, 2, 3]
    # the damaged file is set aside, not kept as the previous checkpoint
    assert (run_dir / "checkpoint.damaged.pt").exists()
    assert ck.load_checkpoint(prev)["epoch"] == 2
    assert ck.load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 3


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- one divergence rule
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_plain_optimizer_that_diverges_fails_with_exit_1(tmp_path, capsys, optimizer):
    base = (
        ["--optimizer", "sgd"] if optimizer == "sgd" else ["--optimizer", "sgd", "--base", "adam"]
    )
    argv = ["train", *TINY_ARGS, *base, "--lr", "1e6", "--out", str(tmp_path), "--name", "d"]
    if optimizer == "adam":
        argv[argv.index("1e6")] = "1e30"
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 1, err
    assert "the run diverged" in err and "optim.lr" in err and "finished" not in out
    clean(err)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert "diverged" in summary["failed"] and summary["finished"] is False
    # nothing non-finite was checkpointed
    ckpt = tmp_path / "d" / "checkpoint.pt"
    if ckpt.exists():
        state = ck.load_checkpoint(ckpt)
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
@pytest.mark.parametrize("what", ["weight", "running_var"])
def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, optimizer, what
):
    import effsam.train.loop as loop

    real = loop.train_epoch

    def diverge_in_epoch_2(net, *args, **kwargs):
        record, untimed = real(net, *args, **kwargs)
        if args[5] == 1:  # the epoch index
            tensor = dict(net.named_parameters(), **dict(net.named_buffers()))
            name = next(n for n in tensor if n.endswith(what))
            with torch.no_grad():
                tensor[name].view(-1)[0] = float("inf")
        return record, untimed

    monkeypatch.setattr(loop, "train_epoch", diverge_in_epoch_2)
    argv = ["train", *TINY_ARGS, "--optimizer", optimizer, "--out", str(tmp_path), "--name", "d"]
    code, _, err = run([*argv, "--quiet"], capsys)
    assert code == 1 and "the run diverged and was stopped after epoch 2 of 3" in err
    assert "optim.lr" in err and "the last good checkpoint, of epoch 1, is kept" in err
    clean(err)
    state = ck.load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["failed"] and not summary["finished"] and summary["completed_epochs"] == 2


def test_a_run_that_diverges_in_its_last_epoch_is_not_finished(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--epochs", "1", "--lr", "1e6", "--out", str(tmp_path)]
    code, _, err = run([*argv, "--name", "d", "--quiet"], capsys)
    assert code == 1
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["failed"] and summary["finished"] is False
    # resumed, it stays failed (the limit still holds), and says so again
    code, out, err = run(["train", "--resume", str(tmp_path / "d"), "--quiet"], capsys)
    assert code == 1 and "skipped for non-finite gradients" in err and "finished" not in out


# ---------------------------------------------------------------- compare marks failed runs
def test_compare_marks_failed_runs_everywhere_and_exits_1(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0"]
    argv += ["--lr", "1e6", "--out", str(tmp_path), "--name", "c", "--quiet"]
    for extra in ([], ["--resume"]):
        code, out, err = run(argv + extra, capsys)
        assert code == 1, err
        assert "2 of 2 runs failed: SGD_s0, SAM_s0" in err
        clean(err)
        root = tmp_path / "c"
        for label in ("SGD", "SAM"):
            line = next(x for x in out.splitlines() if x.startswith(f"| {label} |"))
            assert "**failed**" in line and "10.00" not in line
        assert "**Failed:** SAM_s0" in out and "**Failed:** SGD_s0" in out
        assert "**failed**" in (root / "compare.md").read_text()
        with open(root / "compare.csv") as f:
            rows = list(csv.DictReader(f))
        assert [(r["failed"], r["acc_mean"], r["seeds"]) for r in rows] == [("1", "", "0")] * 2
        result = json.loads((root / "compare.json").read_text())
        assert [r["failed"] for r in result["rows"]] == [1, 1]
        assert all(r["failed"] and r["finished"] is False for r in result["runs"])
        for summary in root.glob("runs/*/summary.json"):
            data = json.loads(summary.read_text())
            assert not (data["finished"] and data.get("failed"))
    # a failed run is continued, not reused, on --resume: with the limit raised, SAM's run
    # (whose steps were skipped, its weights finite) goes on and is no longer failed, even
    # when its summary says both finished and failed (as older versions wrote)
    summary = root / "runs" / "SAM_s0" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "finished": True}))
    code, out, err = run([*argv, "--resume", "--max-skipped", "1"], capsys)
    assert code == 1 and "1 of 2 runs failed: SGD_s0" in err
    assert "failed" not in next(x for x in out.splitlines() if x.startswith("| SAM |"))


# ---------------------------------------------------------------- tracebacks become messages
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "1180591620717411303424"], "invalid seed: 1180591620717411303424"),
        (["--name", "x" * 300], "invalid name: 'xxxxxxxxxxxxxxxxxxxx…xxxxxxxx' is 300 bytes long"),
        (["--out", "y" * 300], "invalid out_dir: its part 'yyyyyyyyyyyyyyyyyyyy…yyyyyyyy' is 300"),
        (["--set", "data.subset_seed=36893488147419103232"], "invalid data.subset_seed"),
    ],
    ids=["seed", "name", "out", "subset_seed"],
)
def test_oversized_values_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["train", *TINY_ARGS, "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    clean(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, where",
    [
        (random.Random(7).randbytes(2000), "byte 0x"),
        (b'optim:\n  name: "\xff\xfe"\n', "byte 0xff at offset 16"),
    ],
    ids=["binary", "not-utf8"],
)
def test_a_config_file_that_is_not_text(tmp_path, capsys, content, where):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    code, _, err = run(["train", "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{config} is not a YAML text file: {where}" in err
    assert len(err.strip().splitlines()) == 1
    clean(err)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- YAML: repeated keys, 1e-3
@pytest.mark.parametrize(
    "text, key, line",
    [
        ("optim: {name: esam, lr: 0.2}\ntrain: {epochs: 1}\noptim: {name: sam}\n", "optim", 3),
        ("optim:\n  name: sam\n  args:\n    rho: 0.1\n    rho: 0.2\n", "optim.args.rho", 5),
        (
            "compare:\n  optimizers:\n    - {name: sam, lr: 1, lr: 2}\n",
            "compare.optimizers[0].lr",
            3,
        ),
    ],
    ids=["top", "nested", "in-a-list"],
)
def test_a_repeated_yaml_key_is_an_error(tmp_path, capsys, text, key, line):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "o"), "--dry-run"]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert f"{config}: duplicate key {key!r} at line {line}" in err
    clean(err)


def test_a_repeated_key_in_a_set_value_is_an_error(capsys):
    code, _, err = run(["train", "--set", "model.kwargs={a: 1, a: 2}", "--dry-run"], capsys)
    assert code == 2 and "--set model.kwargs: duplicate key 'a'" in err


def test_numbers_written_with_an_exponent_are_numbers(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 2e-2\n  args: {rho: 5E-2}\n")
    argv = ["train", "--config", str(config), "--set", "optim.weight_decay=1e-3", "--dry-run"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    optim = yaml.safe_load(out)["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["args"]["rho"]) == (0.02, 0.001, 0.05)
    assert isinstance(optim["weight_decay"], float)


# ---------------------------------------------------------------- options the base does not take
@pytest.mark.parametrize(
    "args, option",
    [
        (["--momentum", "0.5", "--nesterov"], "momentum: 0.5"),
        (["--nesterov"], "nesterov: True"),
    ],
)
@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_sgd_options_with_another_base_are_an_error(tmp_path, capsys, args, option, base):
    argv = ["train", "--base", base, *args, "--out", str(tmp_path)]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert f"invalid optim.{option} (the {base!r} base optimizer takes no" in err
    clean(err)
    assert not any(tmp_path.iterdir())
    assert run(["train", "--base", base, "--dry-run"], capsys)[0] == 0  # defaults are fine


# ---------------------------------------------------------------- a bad model option
def test_a_bad_model_option_leaves_no_run_directory(tmp_path, capsys):
    for dry in ([], ["--dry-run"]):
        argv = ["train", "--set", "model.kwargs.foo=1", "--out", str(tmp_path), "--name", "r"]
        code, out, err = run(argv + dry, capsys)
        assert code == 2 and "model 'small_cnn' got unexpected options ['foo']" in err
        clean(err)
        assert not any(tmp_path.iterdir()) and out == ""


# ---------------------------------------------------------------- threads and width
def test_more_threads_than_cores_warn(capsys, monkeypatch):
    import importlib

    pf = importlib.import_module("effsam.train.preflight")  # (the package exports a function
    monkeypatch.setattr(pf, "available_cores", lambda: 2)  # of the same name)
    code, _, err = run(["train", *TINY_ARGS, "--threads", "3", "--dry-run"], capsys)
    assert code == 0
    assert "warning: train.threads 3 is more than the 2 CPU cores" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many threads as cores: no warning
        pf.check_threads(load_config(None, {"train.threads": 2}))


@pytest.mark.parametrize("width", ["1e-9", "0.01"])
def test_a_width_that_leaves_layers_without_channels_is_refused(tmp_path, capsys, width):
    code, _, err = run(["train", "--width", width, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"invalid model.width: {float(width):g}" in err
    assert "use a width of at least 1/16 = 0.0625" in err
    clean(err)
    assert not any(tmp_path.iterdir())
    assert run(["train", "--width", "0.0625", "--dry-run"], capsys)[0] == 0


# ---------------------------------------------------------------- grammar
def test_one_epoch_is_singular_in_the_start_line(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--epochs", "1", "--batch-size", "96", "--out", str(tmp_path)]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert ", 1 epoch of 1 step, cpu" in out and "1 epochs" not in out


# ---------------------------------------------------------------- SIGTERM
def test_sigterm_stops_a_run_with_a_message_and_an_intact_checkpoint(tmp_path):
    import signal
    import time

    out = tmp_path / "o"
    argv = [sys.executable, "-m", "effsam", "train", *TINY_ARGS, "--epochs", "400"]
    argv += ["--out", str(out), "--name", "r", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ckpt = out / "r" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 143, err
    assert "effsam train: terminated; the last finished epoch is checkpointed in" in err
    assert f"continue with: effsam train --resume {out / 'r'}" in err
    clean(err)
    epoch = ck.load_checkpoint(ckpt)["epoch"]
    assert 1 <= epoch < 400
    assert not [p.name for p in (out / "r").iterdir() if p.name.startswith(".")]
