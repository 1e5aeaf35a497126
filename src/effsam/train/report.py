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


#: Marker per row, in table order (colours follow matplotlib's default cycle).
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

#: Where a point's label may go, in points from the point: (dx, dy, horizontal alignment).
_LABEL_SPOTS = (
    (7, 5, "left"),
    (7, -13, "left"),
    (-7, 5, "right"),
    (-7, -13, "right"),
    (0, 9, "center"),
    (0, -19, "center"),
    (12, -4, "left"),
    (-12, -4, "right"),
)


def accuracy_speed_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Test accuracy against training images/s, one point per optimizer with error bars over
    seeds (the ESAM paper's Figure 1), as a matplotlib ``Figure``.

    Each optimizer has its own colour and marker and a legend entry with its numbers; the
    labels next to the points are placed where they overlap neither each other nor the
    markers (points that almost coincide, as SAM and ESAM often do on a small model, get
    their labels on opposite sides).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)  # off-screen: no display, pyplot's state left alone
    ax = fig.add_subplot()
    points = []
    for i, r in enumerate(rows):
        if r["acc_mean"] is None or r["images_per_s"] is None:
            continue
        x, y = r["images_per_s"], 100 * r["acc_mean"]
        acc = _acc(r)
        ax.errorbar(
            x,
            y,
            xerr=r["images_per_s_std"] or 0.0,
            yerr=100 * (r["acc_std"] or 0.0),
            fmt=_MARKERS[i % len(_MARKERS)],
            color=f"C{i % 10}",
            markersize=7,
            capsize=3,
            label=f"{r['label']}: {acc} %, {_rate(x)} img/s",
        )
        points.append((r["label"], x, y, f"C{i % 10}"))
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    several = any((r.get("seeds") or 1) > 1 for r in rows)
    ax.set_xlabel("training images/s" + (" (median over seeds)" if several else ""))
    ax.set_ylabel("test accuracy (%" + (", mean ± std over seeds)" if several else ")"))
    ax.set_title(title or "test accuracy against training speed", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    if points:
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    _place_labels(fig, ax, points)
    return fig


def _place_labels(fig: Any, ax: Any, points: list[tuple[str, float, float, str]]) -> None:
    """Annotates each point at the first spot that overlaps no placed label, no marker, the
    legend or the axes' edge (else the spot with the least overlap)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    markers = [ax.transData.transform((x, y)) for _, x, y, _ in points]
    pad = 6 * to_px
    taken = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in markers]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    frame = ax.get_window_extent(renderer)
    for label, x, y, color in points:
        best = None
        for dx, dy, ha in _LABEL_SPOTS:
            text = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                fontsize=9, color=color, fontweight="bold",
            )  # fmt: skip
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in taken)
            cost += box.width * box.height - _overlap(box, frame)  # outside the axes
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def plot_accuracy_speed(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Writes :func:`accuracy_speed_figure` to ``path`` (PNG, PDF, SVG, … by extension)."""
    accuracy_speed_figure(rows, title).savefig(path)
