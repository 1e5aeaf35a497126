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


def _row(label: str, name: str, acc: float, rate: float) -> dict:
    return {
        "label": label,
        "optimizer": name,
        "acc_mean": acc,
        "acc_std": 0.004,
        "images_per_s": rate,
        "images_per_s_std": 150.0,
        "seeds": 3,
    }


def test_the_plot_has_a_legend_and_labels_that_do_not_overlap(tmp_path):
    from effsam.train.report import _overlap, accuracy_speed_figure, plot_accuracy_speed

    # SAM and ESAM almost on the same spot, as in the default digits demo
    rows = [
        _row("SGD", "sgd", 0.9815, 16605),
        _row("SAM", "sam", 0.9843, 8338),
        _row("ESAM", "esam", 0.9843, 8165),
        _row("SSAM-F", "ssam-f", 0.9841, 8300),
    ]
    fig = accuracy_speed_figure(rows, "digits, small_cnn, 10 epochs")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "SGD: 98.15 ± 0.40 %, 16,605 img/s",
        "SAM: 98.43 ± 0.40 %, 8,338 img/s",
        "ESAM: 98.43 ± 0.40 %, 8,165 img/s",
        "SSAM-F: 98.41 ± 0.40 %, 8,300 img/s",
    ]
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert sorted(labels) == ["ESAM", "SAM", "SGD", "SSAM-F"]
    boxes = list(labels.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert _overlap(a, b) == 0
        assert _overlap(a, ax.get_legend().get_window_extent(renderer)) == 0
    assert ax.get_xlabel() == "training images/s (median over seeds)"
    assert ax.get_ylabel() == "test accuracy (%, mean ± std over seeds)"
    single = accuracy_speed_figure([{**r, "seeds": 1, "acc_std": None} for r in rows])
    assert single.axes[0].get_ylabel() == "test accuracy (%)"
    assert ax.get_title() == "digits, small_cnn, 10 epochs"
    plot_accuracy_speed(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_title_says_what_was_run():
    from effsam.train.compare import describe_comparison
    from effsam.train.config import load_config

    cfg = load_config(
        None,
        {
            "data.dataset": "cifar10",
            "data.train_subset": 1000,
            "model.name": "resnet18",
            "model.width": 0.125,
            "train.epochs": 1,
        },
    )
    assert describe_comparison(cfg, [0]) == (
        "cifar10 (1,000-image subset), resnet18 at width 0.125, 1 epoch, batch 128, seed 0"
    )
    cfg = load_config(None, {"train.epochs": 10})
    assert describe_comparison(cfg, [0, 1, 2]) == (
        "digits, small_cnn, 10 epochs, batch 128, seeds 0, 1, 2"
    )
    cfg = load_config(None, {"train.epochs": 10, "data.label_noise": 0.3})
    assert describe_comparison(cfg, [0]) == (
        "digits, 30% noisy labels, small_cnn, 10 epochs, batch 128, seed 0"
    )


def test_failed_runs_are_left_out_and_marked_in_table_csv_and_plot():
    from effsam.train.report import accuracy_speed_figure, csv_table

    failed = {**_run("SAM", 0.10, 9000.0), "name": "SAM_s1", "failed": "the run diverged"}
    runs = [_run("SGD", 0.9, 1000.0), _run("SAM", 0.8, 500.0), failed]
    runs += [{**_run("ESAM", 0.1, 700.0), "name": "ESAM_s0", "failed": "the run diverged"}]
    rows = aggregate([("SGD", "sgd"), ("SAM", "sam"), ("ESAM", "esam")], runs)
    by = {r["label"]: r for r in rows}
    # the failed SAM run's 10% and 9,000 img/s are in no number
    assert by["SAM"]["acc_mean"] == pytest.approx(0.8) and by["SAM"]["images_per_s"] == 500.0
    assert (by["SAM"]["seeds"], by["SAM"]["failed"]) == (1, 1)
    assert by["SAM"]["failed_runs"] == {"SAM_s1": "the run diverged"}
    assert by["ESAM"]["acc_mean"] is None and by["ESAM"]["speed_vs_sam"] is None
    md = markdown_table(rows)
    assert "| SAM | 80.00 (**1 of 2 runs failed**) | 500 |" in md
    assert "| ESAM | **failed** (1 run diverged) | — |" in md
    assert "**Failed:** SAM_s1 (left out of the numbers): the run diverged" in md
    assert "**Failed:** ESAM_s0" in md
    assert csv_table(rows).splitlines()[0].endswith(",timed_steps,failed")
    assert [line.rsplit(",", 1)[1] for line in csv_table(rows).splitlines()[1:]] == ["0", "1", "1"]
    fig = accuracy_speed_figure(rows)
    notes = [t.get_text() for t in fig.texts]
    assert "SAM: 1 of 2 runs failed (diverged; left out)" in notes
    assert "ESAM: 1 of 1 run failed (diverged; not shown)" in notes
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [x.split(":")[0] for x in legend] == ["SGD", "SAM"]


def test_speeds_from_few_timed_steps_carry_a_caveat():
    from effsam.train.report import MIN_TIMED_STEPS, accuracy_speed_figure

    runs = [{**_run("SAM", 0.5, 100.0), "timed_steps": 2}]
    runs += [{**_run("ESAM", 0.5, 210.0), "timed_steps": 2}]
    rows = aggregate([("SAM", "sam"), ("ESAM", "esam")], runs)
    md = markdown_table(rows)
    assert "| ESAM | 50.00 | 210† | 210.0%† |" in md
    assert "† Speed measured over only 2 timed steps per run" in md
    assert "a rough figure, and so is every ratio built on it" in md
    fig = accuracy_speed_figure(rows)
    assert "† speed from only 2 timed steps per run: rough" in [t.get_text() for t in fig.texts]
    assert "ESAM: 50.00 %, 210† img/s" in [
        t.get_text() for t in fig.axes[0].get_legend().get_texts()
    ]
    # enough timed steps, or runs that did not record them: no caveat
    for steps in (MIN_TIMED_STEPS, None):
        runs = [{**_run("SAM", 0.5, 100.0), "timed_steps": steps}]
        md = markdown_table(aggregate([("SAM", "sam")], runs))
        assert "†" not in md
