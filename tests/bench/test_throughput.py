"""The throughput benchmark runs (smoke mode) and its measurements hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effsam.bench.throughput import (
    PASSES,
    SHARES,
    Workload,
    evaluate_targets,
    pass_costs,
    predicted_speeds,
    run,
)

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
    md = json_file.with_suffix(".md").read_text()
    # the Markdown table prints the measured ratios and memory of each variant (no timing
    # is asserted: the machine may be loaded)
    for r in data["rows"]:
        # the first table is the measurements (the cost model's table comes later)
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['variant']} |"))
        assert r["vs_sam"] > 0 and f"| {r['vs_sam']:.3f} |" in line
        if r["ascent_x_params"] is not None:
            assert f"| {r['ascent_x_params']:.3f} |" in line
    target_rows = [line for line in md.splitlines() if "speed vs sam >=" in line]
    assert target_rows and all(("| PASS |" in t) != ("| FAIL |" in t) for t in target_rows)
    assert all(r["ascent_x_params"] is None for r in data["rows"] if r["variant"] == "sgd")
    assert rows["sam"]["ascent_x_params"] == pytest.approx(1.0, abs=0.1)
    assert set(data["pass_costs_s"]) == set(PASSES)
    assert all(v > 0 for v in data["pass_costs_s"].values())
    assert set(data["predicted_vs_sam"]) >= set(variants)
    assert "## Cost model" in md
    assert all(r["step_peak_mb"] > 0 for r in data["rows"])


def test_predicted_speeds_follow_the_pass_counts():
    # F = 1, B = 2: SAM = 6; ESAM = F + B_swp + F_ng + F_k + B_k = 1 + 1.2 + 0.8 + 0.5 + 1
    costs = {
        "forward": 1.0,
        "backward": 2.0,
        "backward_swp": 1.2,
        "forward_no_grad": 0.8,
        "forward_subset": 0.5,
        "backward_subset": 1.0,
    }
    got = predicted_speeds(costs)
    assert got["sam"] == 1.0 and got["sgd"] == 2.0
    assert got["esam"] == pytest.approx(6 / 4.5)
    assert got["esam-swp"] == pytest.approx(6 / 5.2)
    assert got["esam-sds"] == pytest.approx(6 / 5.3)
    assert got["esam-loss"] == pytest.approx(6 / 3.7)


#: the cheap ascents (and their compositions) the benchmark times beside the others
CHEAP = ["sam-slice", "sam-on", "sam-layers", "sam-stale", "esam-bn", "rst-slice"]


def test_smoke_script_prints_the_cheap_ascents_measured_and_predicted(tmp_path):
    variants = ["sgd", "sam", *CHEAP]
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
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == variants
    # the code it ran on: the commit, "+dirty" when the tree differs from it
    code = data["code"]
    assert code["commit"] and len(code["commit"]) == 40
    assert code["text"] == code["commit"] + ("+dirty" if code["dirty"] else "")
    md = json_file.with_suffix(".md").read_text()
    assert f"Commit: {code['text']}" in md
    costs = data["pass_costs_s"]
    for name in ("forward_slice", "backward_slice", "forward_slice_half", "backward_slice_half",
                 "forward_norm", "backward_norm", "forward_layers", "backward_layers",
                 "perturb_restore"):  # fmt: skip
        assert costs[name] > 0
    # the cost model's table: each cheap ascent with its measured and predicted speed
    table = md[md.index("| variant | measured vs SAM |") :].splitlines()
    for name in CHEAP:
        measured, predicted = rows[name]["vs_sam"], data["predicted_vs_sam"][name]
        assert measured > 0 and predicted > 0
        line = next(x for x in table if x.startswith(f"| {name} |"))
        assert line.startswith(f"| {name} | {measured:.3f} | {predicted:.3f} |")
    # sample-passes per step: the slice's pass 1 is a quarter of the batch; the stale
    # ascent 1 + 1/3 passes; RST with the slice at half its steps sharpness-aware
    assert rows["sam-slice"]["forward_passes"] == pytest.approx(1.25)
    assert rows["sam-stale"]["backward_passes"] == pytest.approx(4 / 3)
    assert rows["rst-slice"]["forward_passes"] == pytest.approx(1.125)


def test_predicted_speeds_of_the_cheap_ascents():
    # F = 1, B = 2: SAM = 2 (F + B) = 6, a plain step F + B = 3; pass 2 always F + B
    costs = {
        "forward": 1.0,
        "backward": 2.0,
        "backward_swp": 1.2,
        "forward_no_grad": 0.8,
        "forward_subset": 0.5,
        "backward_subset": 1.0,
        "forward_slice": 0.3,  # the f*b slice
        "backward_slice": 0.5,
        "forward_slice_half": 0.55,
        "backward_slice_half": 1.05,
        "forward_norm": 1.0,
        "backward_norm": 1.4,
        "forward_layers": 0.9,
        "backward_layers": 0.7,
        "perturb_restore": 0.3,  # C, a stale step's copy/restore
    }
    got = predicted_speeds(costs)
    # sam-slice = F_slice + B_slice + F + B = 0.3 + 0.5 + 3
    assert got["sam-slice"] == pytest.approx(6 / 3.8)
    assert got["sam-slice@0.5"] == pytest.approx(6 / (0.55 + 1.05 + 3))
    assert got["sam-on"] == pytest.approx(6 / (1.0 + 1.4 + 3))
    assert got["sam-layers"] == pytest.approx(6 / (0.9 + 0.7 + 3))
    # sam-stale = SAM / k + (k - 1) / k * (F + B + C), k = 3: 6/3 + 2/3 * 3.3 = 4.2
    assert got["sam-stale"] == pytest.approx(6 / (6 / 3 + 2 / 3 * (3 + 0.3)))
    assert got["sam-stale"] == pytest.approx(6 / 4.2)
    k2 = predicted_speeds(costs, refresh_every=2)["sam-stale"]
    assert k2 == pytest.approx(6 / (6 / 2 + 1 / 2 * 3.3))
    # a composition at share q: q * its cheap step + (1 - q) * (F + B)
    assert SHARES["rst-slice"] == 0.5 and SHARES["late-slice"] == 0.125
    assert got["rst-slice"] == pytest.approx(6 / (0.5 * 3.8 + 0.5 * 3))
    assert got["late-slice"] == pytest.approx(6 / (0.125 * 3.8 + 0.875 * 3))
    assert got["rst-stale"] == pytest.approx(6 / (0.5 * 4.2 + 0.5 * 3))
    assert got["rst-on"] == pytest.approx(6 / (0.5 * 5.4 + 0.5 * 3))
    # the existing rows are unchanged by the composition rule (SAM's step at share q)
    assert got["rst"] == pytest.approx(6 / 4.5) and got["sam-late"] == pytest.approx(6 / 3.375)
    # same passes as ESAM, MSAM and LookSAM
    assert got["esam-bn"] == got["esam"]
    assert got["msam-rel"] == got["msam"] and got["looksam-rel"] == got["looksam"]
    # without a pass's cost, the method it predicts is left out (sam-stale's C counts 0)
    old = {k: v for k, v in costs.items() if not k.endswith(("_norm", "_layers", "restore"))}
    partial = predicted_speeds(old)
    assert "sam-on" not in partial and "sam-layers" not in partial
    assert partial["sam-stale"] == pytest.approx(6 / 4.0)


def test_a_composition_needs_its_cheap_step_in_the_run():
    with pytest.raises(ValueError, match=r"rst-slice \(needs sam-slice\)"):
        run(["sam", "rst-slice"], Workload("cifar_cnn", width=0.25, batch_size=4), rounds=1)


def test_pass_costs_time_every_pass():
    costs = pass_costs(Workload("cifar_cnn", width=0.25, batch_size=8), rounds=1, warmup=0)
    assert set(costs) == set(PASSES) and all(v > 0 for v in costs.values())


def test_pass_counts_reflect_the_algorithms():
    workload = Workload("cifar_cnn", width=0.25, batch_size=8)
    stats = run(
        ["sgd", "sam", "esam", "esam-loss"],
        workload,
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
    # a step re-creates every gradient (zero_grad sets them to None): its peak holds them all
    model, _ = workload.build()
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for name in ("sgd", "sam", "esam"):
        assert stats[name].peak_mb is not None and stats[name].peak_mb >= grads_mb
    # the ascent's extra memory: the θ backup (1x the parameters) and almost nothing else
    assert stats["sgd"].ascent_ratio is None
    for name in ("sam", "esam", "esam-loss"):
        assert stats[name].ascent_persistent is not None
        assert 0.0 <= stats[name].ascent_transient <= 0.1
    assert stats["sam"].ascent_persistent == 1.0
    targets = {t["target"]: t for t in evaluate_targets(stats)}
    assert "esam speed vs sam >= 1.40x" in targets
    memory = targets["sam ascent memory <= 1.1x params"]
    assert memory["value"] == stats["sam"].ascent_ratio and memory["pass"]
    assert "sgd ascent memory <= 1.1x params" not in targets


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="'nope'"):
        run(["nope"], Workload("cifar_cnn", width=0.25, batch_size=4), rounds=1)
