"""What a run shows while it works: start and resume lines, epoch lines, clean logs."""

from __future__ import annotations

import io

from effsam.train.cli import main
from effsam.train.progress import RunProgress, format_duration
from effsam.train.threads import resolve_threads
from train.tiny_runs import TINY_ARGS


def test_a_run_in_a_log_prints_start_epoch_and_resume_lines_without_bars(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--out", str(tmp_path), "--name", "p", "--stop-after", "1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'p'}: small_cnn (")
    assert (
        "parameters) on synthetic (96 training, 40 test images), sam, 3 epochs of 6 steps"
        in (lines[0])
    )
    assert lines[0].endswith(", cpu, 1 thread")
    assert lines[1].startswith("epoch   1/3  lr ")
    assert "\r" not in out.out + out.err and "it/s" not in out.err  # no bar in a log
    assert main(["train", "--resume", str(tmp_path / "p")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"resumed from epoch 1 of 3 ({tmp_path / 'p' / 'checkpoint.pt'})"
    assert [line[:11] for line in lines[2:4]] == ["epoch   2/3", "epoch   3/3"]


def test_quiet_prints_only_the_result(tmp_path, capsys):
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and "finished" in out.out and out.err == ""


def test_log_lines_carry_the_run_level_eta():
    stream = io.StringIO()
    p = RunProgress(10, stream=stream, log_interval=0.0)
    p.epoch(1, 2)
    for _ in range(4):
        p.step(lambda: "loss 0.5")
    list(p.evaluating(range(3), 3))
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/2: step 1/10 of the run (10%)") and "ETA" in lines[0]
    assert lines[3].startswith("epoch 1/2: step 4/10 of the run (40%)")
    assert lines[3].endswith("loss 0.5")
    assert lines[4].startswith("epoch 1/2: evaluating, batch 1/3")
    assert "\r" not in stream.getvalue()


def test_quiet_progress_writes_nothing(capsys):
    stream = io.StringIO()
    p = RunProgress(5, quiet=True, stream=stream, log_interval=0.0)
    p.epoch(1, 1)
    p.step(lambda: "x")
    p.write("a line")
    assert list(p.evaluating(iter([1, 2]), 2)) == [1, 2]
    assert stream.getvalue() == "" and capsys.readouterr().out == ""


def test_format_duration():
    assert format_duration(4.25) == "4.2 s"
    assert format_duration(95) == "1 min 35 s"
    assert format_duration(3725) == "1 h 02 min"
    assert format_duration(200 * 3600) == "8.3 days"


def test_the_thread_policy(monkeypatch):
    import effsam.train.threads as threads

    assert resolve_threads(3, 10) == (3, "train.threads")  # given: always wins
    assert resolve_threads(None, 24_058)[0] == 1  # a small model: one thread
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 7)
    n, why = resolve_threads(None, 11_000_000)
    assert n == 7 and "torch's default" in why  # a large one: torch's default


def test_train_compare_and_analyze_follow_the_same_thread_policy(tmp_path, capsys):
    import json

    import torch

    from effsam.train import analyze as analysis_run

    before = torch.get_num_threads()
    args = [a for a in TINY_ARGS if a not in ("--threads", "1")]  # the policy decides
    assert main(["train", *args, "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    argv = ["compare", *args, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0"]
    assert main([*argv, "--no-plot", "--quiet", "--out", str(tmp_path), "--name", "c"]) == 0
    envs = [
        json.loads(next(tmp_path.glob("synthetic_*/env.json")).read_text()),
        json.loads((tmp_path / "c" / "runs" / "SGD_s0" / "env.json").read_text()),
        json.loads((tmp_path / "c" / "runs" / "SAM_s0" / "env.json").read_text()),
    ]
    for env in envs:
        assert env["torch_threads"] == 1 and "under 1,000,000 weights" in env["threads_policy"]
    assert json.loads((tmp_path / "c" / "env.json").read_text())["torch_threads"] == 1
    seen = []
    real = analysis_run.hessian_top_eigenvalue

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    analysis_run.hessian_top_eigenvalue = spy
    try:
        assert (
            main(["analyze", str(tmp_path / "c" / "runs" / "SAM_s0"), "--landscape", "none"]) == 0
        )
    finally:
        analysis_run.hessian_top_eigenvalue = real
    assert seen == [1]
    err = capsys.readouterr().err  # analyze reports each stage as it starts, then its time
    assert "effsam analyze: Hessian top eigenvalue on " in err
    assert "effsam analyze: Hessian trace (10 Hutchinson samples)" in err and "  ... " in err
    assert torch.get_num_threads() == before  # each command restores the process's setting


def test_compare_announces_each_run_with_the_time_left(tmp_path, capsys):
    argv = ["compare", *TINY_ARGS, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0"]
    assert main([*argv, "--no-plot", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines[0] == "[1/2] SGD (seed 0)"
    assert lines[1].startswith("[2/2] SAM (seed 0); about ")
    assert lines[1].endswith(" left for the comparison")
