"""Comparison results as tables (Markdown, CSV) and the accuracy-versus-speed plot."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Columns of compare.csv, in order.
CSV_FIELDS = (
    "label",
    "optimizer",
    "seeds",
    "acc_mean",
    "acc_std",
    "best_acc_mean",
    "images_per_s",
    "images_per_s_std",
    "images_per_s_median",
    "speed_vs_sam",
    "speed_vs_sgd",
    "train_time_s",
    "final_train_loss",
)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for the std of a single value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def aggregate(entries: Sequence[tuple[str, str]], runs: Sequence[dict[str, Any]]) -> list[dict]:
    """One row per optimizer: accuracy and images/s over seeds, speeds relative to SAM and SGD.

    Args:
        entries: (label, registered optimizer name) in table order.
        runs: run summaries, each with ``label``, ``final_test_acc``, ``images_per_s``, ….

    Accuracy is the mean ± sample std over seeds; images/s is the median over seeds of each
    run's images/s (with their std), so the speed ratios are robust to one disturbed run.
    """
    rows: list[dict[str, Any]] = []
    for label, name in entries:
        mine = [r for r in runs if r["label"] == label]
        acc, acc_std = mean_std([r["final_test_acc"] for r in mine])
        best, _ = mean_std([r["best_test_acc"] for r in mine])
        rates = [r["images_per_s"] for r in mine if r["images_per_s"] is not None]
        # the median over seeds: one run that shared a busy machine does not move it
        ips = statistics.median(rates) if rates else None
        _, ips_std = mean_std(rates)
        med, _ = mean_std([r.get("images_per_s_median") for r in mine])
        time_s, _ = mean_std([r["train_time_s"] for r in mine])
        loss, _ = mean_std([r["final_train_loss"] for r in mine])
        rows.append(
            {
                "label": label,
                "optimizer": name,
                "seeds": len(mine),
                "acc_mean": acc,
                "acc_std": acc_std,
                "best_acc_mean": best,
                "images_per_s": ips,
                "images_per_s_std": ips_std,
                "images_per_s_median": med,
                "train_time_s": time_s,
                "final_train_loss": loss,
            }
        )
    for ref in ("sam", "sgd"):
        base = next((r for r in rows if r["optimizer"] == ref and r["images_per_s"]), None)
        for r in rows:
            ok = base is not None and r["images_per_s"] is not None
            r[f"speed_vs_{ref}"] = r["images_per_s"] / base["images_per_s"] if ok else None
    return rows


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _acc(row: dict[str, Any]) -> str:
    if row["acc_mean"] is None:
        return "—"
    if row["acc_std"] is None:
        return _pct(row["acc_mean"])
    return f"{_pct(row['acc_mean'])} ± {_pct(row['acc_std'])}"


def _rate(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:,.0f}"


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The ESAM paper's Table 1 layout: accuracy, images/s, speed relative to SAM and SGD."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| Optimizer | Test accuracy (%) | Images/s | vs SAM | vs SGD | Train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_sam = "—" if r["speed_vs_sam"] is None else f"{_pct(r['speed_vs_sam'], 1)}%"
        vs_sgd = "—" if r["speed_vs_sgd"] is None else f"{_pct(r['speed_vs_sgd'], 1)}%"
        train_time = "—" if r["train_time_s"] is None else f"{r['train_time_s']:.1f}"
        lines.append(
            f"| {r['label']} | {_acc(r)} | {_rate(r['images_per_s'])} | {vs_sam} | {vs_sgd} "
            f"| {train_time} |"
        )
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV (fractions, not percentages; empty cells for missing values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_FIELDS})
    return buf.getvalue()


def plot_accuracy_speed(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test accuracy against training images/s, one labelled point per optimizer (with
    error bars over seeds): the ESAM paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works on headless machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for r in rows:
        if r["acc_mean"] is None or r["images_per_s"] is None:
            continue
        x, y = r["images_per_s"], 100 * r["acc_mean"]
        ax.errorbar(
            x,
            y,
            xerr=r["images_per_s_std"] or 0.0,
            yerr=100 * (r["acc_std"] or 0.0),
            fmt="o",
            capsize=3,
        )
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xlabel("training images/s")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs. training speed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
