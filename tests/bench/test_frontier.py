"""The frontier benchmark's smoke mode: compare runs, the table, verdicts and the plot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frontier_smoke_writes_table_verdicts_and_plot(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "frontier.py"),
            "--smoke",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    md = next((tmp_path / "out").glob("frontier-smoke-*.md")).read_text()
    for label in ("SGD", "SAM", "SAM-LATE", "SAM-INTERVAL", "RST", "AE-SAM", "LOOKSAM", "MSAM",
                  "KSAM", "ESAM", "ESAM-MIX", "ESAM-RANDOM", "ESAM-WHOLEBATCH"):  # fmt: skip
        assert f"| {label} | 2 | 2 |" in md, label
    assert "target 1" in md and "target 2" in md and "Target 3 (diagnosis)" in md
    assert next((tmp_path / "out").glob("frontier-smoke-*.png")).stat().st_size > 10_000


def _row(label, name, accs, time_s, ips, epochs=30):
    return {
        "label": label,
        "optimizer": name,
        "epochs": epochs,
        "seed": None,
        "accs": accs,
        "time_s": time_s,
        "ips": ips,
    }


def _runs(rows):
    runs = []
    for r in rows:
        for seed, acc in enumerate(r["accs"]):
            runs.append(
                {
                    "label": r["label"],
                    "optimizer": r["optimizer"],
                    "epochs": r["epochs"],
                    "seed": seed,
                    "final_test_acc": acc,
                    "final_train_acc": 1.0,
                    "train_time_s": r["time_s"],
                    "images_per_s": r["ips"],
                    "sharpness_aware_fraction": 1.0,
                }
            )
    return runs


def test_keeps_sam_accuracy_rule_pareto_front_and_equal_time_plan():
    fr = _module()
    rows = fr.rows_of(
        _runs(
            [
                _row("SGD", "sgd", [0.60, 0.61, 0.62], 100, 2000),
                _row("SAM", "sam", [0.65, 0.66, 0.67], 200, 1000),
                # mean 0.655 is within SAM's std (0.01) and one paired delta is positive
                _row("A", "looksam", [0.66, 0.65, 0.655], 120, 1700),
                # within the std on the mean but below SAM on every seed
                _row("B", "msam", [0.6495, 0.6595, 0.6695], 110, 1800),
                _row("C", "esam", [0.60, 0.60, 0.60], 190, 1050),
            ]
        ),
        ["sgd", "sam", "looksam", "msam", "esam"],
    )
    # speeds side by side: SGD 2x SAM, A 1.7x, B 1.8x, C 1.05x
    step_ms = {"sgd": 50.0, "sam": 100.0, "looksam": 100 / 1.7, "msam": 100 / 1.8, "esam": 95.0}
    fr.apply_speeds(
        rows,
        {"rows": [{"variant": k, "step_ms": v, "vs_sam": 100 / v} for k, v in step_ms.items()]},
    )
    by = {r["label"]: r for r in rows}
    sam = by["SAM"]
    # LookSAM is a scheduled method: priced at its own share q = 1 of sharpness-aware steps
    assert by["A"]["speed"] == pytest.approx(1.0) and by["B"]["speed"] == pytest.approx(1.8)
    assert fr.keeps_sam_accuracy(by["A"], sam)
    assert not fr.keeps_sam_accuracy(by["B"], sam)
    assert not fr.keeps_sam_accuracy(by["C"], sam)
    assert [round(d, 2) for d in by["A"]["paired"]] == [1.0, -1.0, -1.5]
    front = fr.pareto(rows)
    # A (0.655 at 120 s) is slower and less accurate than B (0.6595 at 110 s)
    assert [r["label"] for r in front] == ["SGD", "B", "SAM"]
    # SGD at half SAM's cost gets 2x the epochs, B (1/1.8 of SAM's cost) 54; A is not cheap
    plan = {name: epochs for name, _, epochs in fr.equal_time_plan(rows)}
    assert plan == {"sgd": 60, "msam": 54}
    # a method without a side-by-side speed is not planned from its time as run
    by["B"]["speed"] = None
    plan = {name: epochs for name, _, epochs in fr.equal_time_plan(rows, side_by_side=True)}
    assert plan == {"sgd": 60}
    by["B"]["speed"] = 1.8
    text = "\n".join(fr.verdicts(rows, []))
    assert "FAIL target 1" in text  # A keeps SAM's accuracy but at SAM's speed
    # at SAM's training time: SGD given 60 epochs, paired with SAM at 30 by seed
    equal = fr.rows_of(_runs([_row("SGD @60 ep", "sgd", [0.66, 0.655, 0.67], 200, 2000, 60)]))
    for r in equal:
        r["paired"] = fr.paired(r, sam)
    text = "\n".join(fr.verdicts(rows, equal))
    assert (
        "At SAM's training time, SGD @60 ep (3 seed(s)): +0.17 points vs SAM at 30 epochs "
        "(paired +1.00, -0.50, +0.00) -> as accurate as SAM for the same time." in text
    )


@pytest.mark.parametrize("protocol", ["frontier", "augment"])
def test_protocols_name_their_runs_and_narrow_shared_args_per_method(protocol):
    import yaml

    fr = _module()
    config, _ = fr.PROTOCOLS[protocol]
    fr.CONFIG = ROOT / "configs" / "compare" / config
    assert fr.protocol_name() == yaml.safe_load(fr.CONFIG.read_text())["name"]
    aug = "no augmentation" if protocol == "frontier" else "augmentation cifar"
    assert aug in fr.protocol_title(False)
    # an equal-time run of one method passes only the shared args it takes: compare
    # refuses shared args none of its optimizers takes (SGD takes none of rho/beta/gamma)
    assert fr.shared_args_for("sgd") == {}
    assert fr.shared_args_for("rst") == {"rho": 0.1}
    assert fr.shared_args_for("esam-random") == {"rho": 0.1, "beta": 0.6, "gamma": 0.5}


def test_only_names_outside_the_protocol_exit_2_before_any_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--only", "sam", "adamw"]
        + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--only ['adamw'] not in the protocol" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
