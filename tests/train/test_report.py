"""The comparison table's aggregation over seeds."""

from __future__ import annotations

import statistics

import pytest

from effsam.train.report import aggregate, markdown_table


def _run(label: str, acc: float, rate: float | None) -> dict:
    return {
        "label": label,
        "final_test_acc": acc,
        "best_test_acc": acc,
        "images_per_s": rate,
        "images_per_s_median": rate,
        "train_time_s": 10.0,
        "final_train_loss": 0.5,
    }


def test_accuracy_is_mean_and_sample_std_over_seeds():
    runs = [_run("SGD", a, 100.0) for a in (0.60, 0.62, 0.67)]
    (row,) = aggregate([("SGD", "sgd")], runs)
    assert row["seeds"] == 3
    assert row["acc_mean"] == pytest.approx(statistics.fmean([0.60, 0.62, 0.67]))
    assert row["acc_std"] == pytest.approx(statistics.stdev([0.60, 0.62, 0.67]))


def test_speed_is_the_median_over_seeds_so_one_disturbed_run_does_not_move_it():
    runs = [_run("SAM", 0.7, r) for r in (900.0, 930.0, 300.0)]  # one run on a busy machine
    runs += [_run("ESAM", 0.7, r) for r in (1000.0, 990.0, 1010.0)]
    rows = {r["label"]: r for r in aggregate([("SAM", "sam"), ("ESAM", "esam")], runs)}
    assert rows["SAM"]["images_per_s"] == 900.0
    assert rows["SAM"]["images_per_s_std"] == pytest.approx(statistics.stdev([900, 930, 300]))
    assert rows["ESAM"]["speed_vs_sam"] == pytest.approx(1000.0 / 900.0)
    assert rows["SAM"]["speed_vs_sam"] == pytest.approx(1.0)
    assert rows["ESAM"]["speed_vs_sgd"] is None  # no SGD row: no ratio, not an error
    assert "| ESAM | 70.00 ± 0.00 | 1,000 |" in markdown_table(list(rows.values()))


def test_runs_without_a_measured_speed_give_no_rate():
    (row,) = aggregate([("SGD", "sgd")], [_run("SGD", 0.5, None)])
    assert row["images_per_s"] is None and row["speed_vs_sam"] is None
