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
    "timed_steps",
    "failed",
)

#: A run's speed from fewer timed steps than this is marked rough (†) in tables and plots.
MIN_TIMED_STEPS = 20

#: The footnote marker of a rough speed.
ROUGH = "†"


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

    A failed run (``failed`` in its summary: it diverged) is left out of every number and
    counted in the row's ``failed`` (its run names and reasons in ``failed_runs``): a
    diverged run's 10% accuracy is not a result. ``timed_steps`` is the fewest timed steps
    of the row's runs (None when a run did not record it); a speed from fewer than
    :data:`MIN_TIMED_STEPS` is rough.
    """
    rows: list[dict[str, Any]] = []
    for label, name in entries:
        everyone = [r for r in runs if r["label"] == label]
        mine = [r for r in everyone if not r.get("failed")]
        failed = [r for r in everyone if r.get("failed")]
        timed = [r.get("timed_steps") for r in mine]
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
                "timed_steps": None if None in timed or not timed else min(timed),
                "failed": len(failed),
                "failed_runs": {r.get("name", label): r["failed"] for r in failed},
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


def is_rough(row: dict[str, Any]) -> bool:
    """The row's speed comes from fewer than :data:`MIN_TIMED_STEPS` timed steps per run."""
    steps = row.get("timed_steps")
    return row.get("images_per_s") is not None and steps is not None and steps < MIN_TIMED_STEPS


def _ratio_is_rough(row: dict[str, Any], rows: Sequence[dict[str, Any]], ref: str) -> bool:
    base = next((r for r in rows if r.get("optimizer") == ref and r.get("images_per_s")), None)
    return is_rough(row) or (base is not None and is_rough(base))


def _accuracy_cell(row: dict[str, Any]) -> str:
    failed = row.get("failed") or 0
    if not failed:
        return _acc(row)
    total = failed + (row.get("seeds") or 0)
    if failed == total:
        return f"**failed** ({'all ' if total > 1 else ''}{_runs(total)} diverged)"
    return f"{_acc(row)} (**{failed} of {_runs(total)} failed**)"


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The ESAM paper's Table 1 layout: accuracy, images/s, speed relative to SAM and SGD.

    Failed runs are marked in the accuracy column and listed under the table; a speed from
    too few timed steps (and every ratio built on it) carries a † and a note."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| Optimizer | Test accuracy (%) | Images/s | vs SAM | vs SGD | Train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = {ref: ROUGH if _ratio_is_rough(r, rows, ref) else "" for ref in ("sam", "sgd")}
        vs_sam = "—" if r["speed_vs_sam"] is None else f"{_pct(r['speed_vs_sam'], 1)}%"
        vs_sgd = "—" if r["speed_vs_sgd"] is None else f"{_pct(r['speed_vs_sgd'], 1)}%"
        vs_sam += mark["sam"] if r["speed_vs_sam"] is not None else ""
        vs_sgd += mark["sgd"] if r["speed_vs_sgd"] is not None else ""
        rate = _rate(r["images_per_s"]) + (ROUGH if is_rough(r) else "")
        train_time = "—" if r["train_time_s"] is None else f"{r['train_time_s']:.1f}"
        lines.append(
            f"| {r['label']} | {_accuracy_cell(r)} | {rate} | {vs_sam} | {vs_sgd} | {train_time} |"
        )
    notes = table_notes(rows)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def table_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The notes under a table: failed runs with their reasons, rough speeds."""
    notes = []
    for r in rows:
        for run, why in (r.get("failed_runs") or {}).items():
            notes.append(f"**Failed:** {run} (left out of the numbers): {why}")
    rough = [r for r in rows if is_rough(r)]
    if rough:
        fewest = min(r["timed_steps"] for r in rough)
        notes.append(
            f"{ROUGH} Speed measured over only {fewest} timed step{'s' if fewest != 1 else ''} "
            f"per run (fewer than {MIN_TIMED_STEPS}; each run's first steps are warm-up and "
            "not timed): a rough figure, and so is every ratio built on it. Train longer "
            "(--epochs) for a speed worth comparing."
        )
    return notes


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
    notes = []
    for r in rows:
        failed = r.get("failed") or 0
        if failed:
            total = failed + (r.get("seeds") or 0)
            shown = "not shown" if failed == total else "left out"
            notes.append(f"{r['label']}: {failed} of {_runs(total)} failed (diverged; {shown})")
    rough = [r for r in rows if is_rough(r)]
    if rough:
        fewest = min(r["timed_steps"] for r in rough)
        notes.append(
            f"{ROUGH} speed from only {fewest} timed step{'s' if fewest != 1 else ''} per run: rough"
        )
    for i, r in enumerate(rows):
        if r["acc_mean"] is None or r["images_per_s"] is None:
            continue
        x, y = r["images_per_s"], 100 * r["acc_mean"]
        acc = _acc(r)
        rate = _rate(x) + (ROUGH if is_rough(r) else "")
        ax.errorbar(
            x,
            y,
            xerr=r["images_per_s_std"] or 0.0,
            yerr=100 * (r["acc_std"] or 0.0),
            fmt=_MARKERS[i % len(_MARKERS)],
            color=f"C{i % 10}",
            markersize=7,
            capsize=3,
            label=f"{r['label']}: {acc} %, {rate} img/s",
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
    if not points and notes:
        ax.text(0.5, 0.5, "no run to show", ha="center", va="center", transform=ax.transAxes)
    for k, note in enumerate(notes):
        fig.text(0.01, 0.01 + 0.035 * (len(notes) - 1 - k), note, fontsize=7, color="C3")
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))
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
