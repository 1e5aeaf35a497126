"""The throughput benchmark runs (smoke mode) and its measurements hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effsam.bench.throughput import evaluate_targets, run

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_script_writes_results(tmp_path):
    variants = ["sgd", "sam", "esam", "esam-sds"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--smoke",
            "--quiet",
            "--out",
            str(tmp_path),
            "--variants",
            *variants,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (json_file,) = tmp_path.glob("throughput-*.json")
    data = json.loads(json_file.read_text())
    assert [r["variant"] for r in data["rows"]] == variants
    assert data["command"].startswith("python benchmarks/throughput.py --smoke")
    assert data["environment"]["torch"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["sam"]["vs_sam"] == pytest.approx(1.0)
    assert rows["sgd"]["vs_sgd"] == pytest.approx(1.0)
    md = json_file.with_suffix(".md").read_text()
    assert "| esam |" in md and ("PASS" in md or "FAIL" in md)


def test_pass_counts_reflect_the_algorithms():
    stats = run(
        ["sgd", "sam", "esam", "esam-loss"],
        model_name="cifar_cnn",
        width=0.25,
        batch_size=8,
        rounds=1,
        steps_per_round=1,
        warmup=0,
    )
    # sample-passes per step, in units of the batch
    assert (stats["sgd"].forward_samples, stats["sgd"].backward_samples) == (1.0, 1.0)
    assert (stats["sam"].forward_samples, stats["sam"].backward_samples) == (2.0, 2.0)
    # ESAM γ = 0.5: full pass 1, a no-grad forward of the batch, pass 2 on half of it
    assert (stats["esam"].forward_samples, stats["esam"].backward_samples) == (2.5, 1.5)
    assert (stats["esam-loss"].forward_samples, stats["esam-loss"].backward_samples) == (1.5, 1.5)
    assert stats["sam"].overhead and stats["sam"].overhead[0] > 0
    targets = {t["target"]: t for t in evaluate_targets(stats)}
    assert "esam speed vs sam >= 1.40x" in targets


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="'nope'"):
        run(["nope"], model_name="cifar_cnn", width=0.25, batch_size=4, rounds=1)
