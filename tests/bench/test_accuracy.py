"""The accuracy benchmark's smoke mode drives `effsam compare` end to end."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

from effsam.train.report import aggregate

ROOT = Path(__file__).resolve().parents[2]


def _accuracy(tmp_path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "accuracy.py"),
            "--smoke",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_accuracy_smoke_writes_table_and_verdicts_and_the_ablation_reuses_runs(tmp_path):
    _accuracy(tmp_path)
    (json_file,) = (tmp_path / "out").glob("accuracy-smoke-*.json")
    data = json.loads(json_file.read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["sgd", "sam", "esam"]
    assert all(r["seeds"] == 2 for r in data["rows"])
    assert len(data["runs"]) == 6
    assert data["verdicts"][0].startswith("SAM over SGD")
    md = json_file.with_suffix(".md").read_text()
    assert "| ESAM |" in md and "## Verdicts" in md

    # the ablation adds SWP alone and SDS alone and reuses the finished SGD, SAM, ESAM runs
    runs = tmp_path / "work" / "smoke" / "runs"
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}
    _accuracy(tmp_path, "--ablation", "--resume")
    (json_file,) = (tmp_path / "out").glob("accuracy-smoke-ablation-*.json")
    data = json.loads(json_file.read_text())
    names = ["sgd", "sam", "esam", "esam-swp", "esam-sds"]
    assert [r["optimizer"] for r in data["rows"]] == names
    assert all(r["seeds"] == 2 for r in data["rows"])
    after = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}
    assert len(after) == 10 and all(after[k] == v for k, v in stamps.items())
    assert any(v.startswith("ESAM-SDS vs SAM") for v in data["verdicts"])
    assert "ESAM ablation" in json_file.with_suffix(".md").read_text()


def _script():
    spec = importlib.util.spec_from_file_location(
        "accuracy_bench", ROOT / "benchmarks" / "accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdicts_compare_the_gain_with_the_spread_and_pair_by_seed():
    bench = _script()
    accs = {"SGD": [0.6777, 0.6866, 0.6702], "SAM": [0.6822, 0.6886, 0.6857]}
    runs = [
        {"label": label, "seed": seed, "final_test_acc": a}
        for label, values in accs.items()
        for seed, a in enumerate(values)
    ]
    rows = aggregate([("SGD", "sgd"), ("SAM", "sam")], [dict(r, **_speed()) for r in runs])
    (line,) = bench.verdicts(rows, runs)
    gain = 100 * (statistics.fmean(accs["SAM"]) - statistics.fmean(accs["SGD"]))
    assert f"{gain:+.2f} points" in line and "NOT larger than the spread" in line
    diffs = [100 * (b - a) for a, b in zip(accs["SGD"], accs["SAM"])]
    assert ", ".join(f"{d:+.2f}" for d in diffs) in line
    assert f"± {statistics.stdev(diffs):.2f}; ahead on 3 of 3 seeds" in line
    # a single shared seed gives no paired figure
    assert bench.paired(runs[:1] + runs[3:4], "SAM", "SGD") is None


def _speed() -> dict:
    return {
        "best_test_acc": 0.0,
        "images_per_s": 1.0,
        "images_per_s_median": 1.0,
        "train_time_s": 1.0,
        "final_train_loss": 1.0,
    }
