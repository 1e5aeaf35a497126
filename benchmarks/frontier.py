"""The frontier: which method keeps SAM's accuracy at near-SGD cost, side by side.

    python benchmarks/frontier.py --data-dir DIR             # 14 methods x 3 seeds (hours on 2 cores)
    python benchmarks/frontier.py --data-dir DIR --jobs 3    # the seeds in parallel processes
    python benchmarks/frontier.py --data-dir DIR --equal-time  # + SGD and the cheap methods
                                                             #   given SAM's training time
    python benchmarks/frontier.py --report-only              # tables from the finished runs
    python benchmarks/frontier.py --data-dir DIR --protocol augment   # the second protocol
    python benchmarks/frontier.py --smoke                    # synthetic data, tiny model (tests)

The protocol is configs/compare/cifar10_cpu_frontier.yaml: the accuracy benchmark's CPU
protocol (cifar10_cpu_accuracy.yaml: the CIFAR CNN, a fixed 5,000-image subset without
augmentation, the full test set, 30 epochs, rho 0.1, seeds 0, 1, 2) with SGD, SAM, ESAM,
SSAM-F, the schedules (interval, late, RST, AE-SAM), LookSAM, MSAM, K-SAM and ESAM's
selection variants (the random-subset and whole-batch controls and the clean-gradient mix).
`--protocol augment` is the second protocol, configs/compare/cifar10_cpu_augment.yaml: ESAM
where its paper makes its claim, with augmentation and trained until SAM fits the training
set (>= 98% training accuracy), for SGD, SAM, ESAM, its two controls and the two fastest
methods that keep SAM's accuracy in the first protocol. Every run is an
ordinary `effsam compare` run directory, written when it finishes; `--resume` (implied
here) reuses finished runs and continues partial ones, so an interrupted benchmark
continues where it stopped.

Reported per method: test accuracy mean ± std, deltas against SAM paired by seed, training
accuracy, images/s and training wall-clock, the share of sharpness-aware steps; the
comparison at equal wall-clock (`--equal-time`); a plot of accuracy against training time
with the Pareto front; the verdicts and the issue's targets as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from effsam.environment import environment, environment_tag

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
#: protocol name -> (config, tag of the result files and the run directory)
PROTOCOLS = {
    "frontier": ("cifar10_cpu_frontier.yaml", "cifar10"),
    "augment": ("cifar10_cpu_augment.yaml", "cifar10-augment"),
}
CONFIG = ROOT / "configs" / "compare" / PROTOCOLS["frontier"][0]  # set by main()
SMOKE = (
    "--dataset synthetic --model cifar_cnn --width 0.25 --epochs 2 --batch-size 32 "
    "--set data.synthetic_train=64 --set data.synthetic_test=32 "
    "--set train.timing_warmup_steps=1 --set train.eval_every=1"
).split()
SMOKE_METHODS = [
    "sgd", "sam", "sam-late", "sam-interval", "rst", "ae-sam", "looksam", "msam", "ksam",
    "esam", "esam-mix", "esam-random", "esam-wholebatch",
]  # fmt: skip

#: Methods the equal-time stage gives SAM's training time (SGD, and every method cheaper
#: than SAM by at least a quarter); the others cost about as much as SAM already.
CHEAP = 0.75  # training time at most this share of SAM's

#: ESAM's diagnosis: the paper's selection, its random-subset control, the clean-gradient
#: mix and the whole-batch control (SDS's subset back-propagated from a whole-batch forward).
DIAGNOSIS = ("esam", "esam-random", "esam-mix", "esam-wholebatch")

#: Methods whose steps are plain or sharpness-aware: their speed is priced from the run's
#: own share of sharpness-aware steps and the side-by-side cost of a plain and a SAM step.
SCHEDULED = ("sam-interval", "sam-late", "rst", "ae-sam", "looksam")


# ----------------------------------------------------------------------------- running


def compare_command(
    args: argparse.Namespace,
    seed: int | None,
    work: Path,
    extra: list[str],
    config: Path | None = None,
    methods: list[str] | None = None,
):
    cmd = [sys.executable, "-m", "effsam", "compare"]
    if args.smoke:
        cmd += [*SMOKE, "--optimizers", ",".join(methods or SMOKE_METHODS)]
    else:
        cmd += ["--config", str(config or CONFIG)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
    if seed is not None:
        cmd += ["--seeds", str(seed)]
    cmd += ["--threads", str(args.threads), "--out", str(work), "--name", protocol_name()]
    cmd += ["--resume"]
    cmd += ["--quiet"] if args.smoke or args.quiet else []
    return cmd + extra


def run_jobs(commands: list[list[str]], jobs: int, logs: list[Path]) -> int:
    """Run the commands, ``jobs`` at a time, each logging to its own file."""
    pending = list(zip(commands, logs))
    running: list[subprocess.Popen] = []
    code = 0
    while pending or running:
        while pending and len(running) < jobs:
            cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            running.append(
                subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT)
            )
        proc = running.pop(0)
        code = proc.wait() or code
    return code


def seeds_of(args: argparse.Namespace) -> list[int]:
    return [0, 1] if args.smoke else [0, 1, 2]


# ----------------------------------------------------------------------------- collecting


def collect(work: Path) -> list[dict[str, Any]]:
    """Every finished run summary under ``work`` (any stage)."""
    runs = []
    for path in sorted(work.glob("**/runs/*/summary.json")):
        s = json.loads(path.read_text())
        if s.get("finished"):
            s["stage"] = "equal-time" if "equal-time" in path.parts else "protocol"
            runs.append(s)
    return runs


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def protocol_name() -> str:
    """The protocol config's own ``name`` (the run directory compare writes)."""
    import yaml

    return yaml.safe_load(CONFIG.read_text())["name"]


def protocol_title(smoke: bool) -> str:
    """What ran, from the resolved config: data, model, set size, augmentation, epochs."""
    if smoke:
        return "smoke: synthetic data, tiny CNN, 2 epochs"
    from effsam.train.config import load_config

    cfg = load_config(CONFIG)
    d = cfg.data
    aug = "no augmentation" if d.augment in (None, "none") else f"augmentation {d.augment}"
    seeds = len(cfg.compare.seeds)
    return (
        f"{d.dataset.upper().replace('CIFAR', 'CIFAR-')}, {cfg.model.name} (width "
        f"{cfg.model.width:g}), {d.train_subset:,} images, {aug}, {cfg.train.epochs} epochs, "
        f"{seeds} seeds"
    )


def method_order(smoke: bool) -> list[str]:
    """The protocol's optimizer names in table order."""
    if smoke:
        return SMOKE_METHODS
    import yaml

    entries = yaml.safe_load(CONFIG.read_text())["compare"]["optimizers"]
    return [e["name"] if isinstance(e, dict) else e for e in entries]


def rows_of(runs: list[dict[str, Any]], order: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per method (label), in ``order`` of optimizer names, then as they appear."""
    rank = {n: i for i, n in enumerate(order or [])}
    runs = sorted(runs, key=lambda r: (rank.get(r["optimizer"], len(rank)), r["epochs"]))
    labels: list[str] = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        acc, acc_std = _mean_std([r["final_test_acc"] for r in mine])
        train_acc, _ = _mean_std([r.get("final_train_acc") for r in mine])
        time_s, time_std = _mean_std([r["train_time_s"] for r in mine])
        rates = [r["images_per_s"] for r in mine if r.get("images_per_s")]
        share, _ = _mean_std([r.get("sharpness_aware_fraction") for r in mine])
        rows.append(
            {
                "label": label,
                "optimizer": mine[0]["optimizer"],
                "epochs": mine[0]["epochs"],
                "seeds": sorted(r["seed"] for r in mine),
                "acc": acc,
                "acc_std": acc_std,
                "train_acc": train_acc,
                "time_s": time_s,
                "time_std": time_std,
                "images_per_s": statistics.median(rates) if rates else None,
                "sa_share": share,
                "by_seed": {r["seed"]: r["final_test_acc"] for r in mine},
            }
        )
    sam = next((r for r in rows if r["optimizer"] == "sam"), None)
    for r in rows:
        r["paired"] = paired(r, sam) if sam is not None and r is not sam else None
    return rows


def paired(row: dict[str, Any], ref: dict[str, Any]) -> list[float] | None:
    """Per-seed accuracy differences (points) against ``ref`` on the seeds both ran."""
    seeds = sorted(set(row["by_seed"]) & set(ref["by_seed"]))
    if not seeds:
        return None
    return [100 * (row["by_seed"][s] - ref["by_seed"][s]) for s in seeds]


def apply_speeds(rows: list[dict[str, Any]], throughput: dict[str, Any] | None) -> None:
    """``speed``: the speed against SAM measured side by side (benchmarks/throughput.py on
    the protocol's model and batch, interleaved rounds in one process), which the verdicts
    use. The accuracy runs' own images/s stay in the table, but runs that follow one
    another on a shared machine see different loads, so their ratios are not comparable.
    A scheduled method's speed is 1 / (q + (1 − q) t_SGD / t_SAM) with q its own measured
    share of sharpness-aware steps."""
    vs = {r["variant"]: r for r in (throughput or {}).get("rows", [])}
    sgd, sam = vs.get("sgd"), vs.get("sam")
    for r in rows:
        r["speed"] = None
        name = r["optimizer"]
        if name in SCHEDULED and sgd and sam and r["sa_share"] is not None:
            q = r["sa_share"]
            r["speed"] = 1.0 / (q + (1 - q) * sgd["step_ms"] / sam["step_ms"])
        elif name in vs and vs[name].get("vs_sam"):
            r["speed"] = vs[name]["vs_sam"]


def keeps_sam_accuracy(row: dict[str, Any], sam: dict[str, Any]) -> bool:
    """The issue's rule: the mean within SAM's seed std, and paired deltas not all negative."""
    if row["acc"] is None or sam["acc"] is None or not row["paired"]:
        return False
    within = row["acc"] >= sam["acc"] - (sam["acc_std"] or 0.0)
    return within and not all(d < 0 for d in row["paired"])


# ----------------------------------------------------------------------------- report


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| method | epochs | seeds | test acc. (%) | Δ vs SAM, paired by seed | train acc. (%) "
        "| train time (s), as run | images/s, as run | speed vs SAM, side by side "
        "| sharpness-aware steps |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "–" if r["acc"] is None else f"{100 * r['acc']:.2f} ± {100 * (r['acc_std'] or 0):.2f}"
        pairs = "–" if not r["paired"] else ", ".join(f"{d:+.2f}" for d in r["paired"])
        time_s = "–" if r["time_s"] is None else f"{r['time_s']:.0f} ± {r['time_std'] or 0:.0f}"
        ips = "–" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        speed = "–" if r.get("speed") is None else f"{r['speed']:.2f}"
        share = "–" if r["sa_share"] is None else f"{100 * r['sa_share']:.0f}%"
        out.append(
            f"| {r['label']} | {r['epochs']} | {len(r['seeds'])} | {acc} | {pairs} | "
            f"{_pct(r['train_acc'], 1)} | {time_s} | {ips} | {speed} | {share} |"
        )
    return out


def verdicts(rows: list[dict[str, Any]], equal: list[dict[str, Any]]) -> list[str]:
    by = {r["optimizer"]: r for r in rows}
    sam = by.get("sam")
    if sam is None or sam["acc"] is None:
        return ["SAM has not finished: no verdicts yet."]
    out = []
    sgd = by.get("sgd")
    if sgd and sgd["acc"] is not None:
        d = paired(sgd, sam) or []
        out.append(
            f"SAM over SGD: {100 * (sam['acc'] - sgd['acc']):+.2f} points "
            f"(SGD − SAM by seed: {', '.join(f'{x:+.2f}' for x in d)})."
        )
    keepers = []
    for r in rows:
        if r is sam or r["optimizer"] == "sgd" or r["acc"] is None:
            continue
        delta = 100 * (r["acc"] - sam["acc"])
        speed = r.get("speed")
        keeps = keeps_sam_accuracy(r, sam)
        if keeps:
            keepers.append(r)
        out.append(
            f"{r['label']}: {delta:+.2f} points vs SAM (SAM's seed std "
            f"{100 * (sam['acc_std'] or 0):.2f}; paired {', '.join(f'{x:+.2f}' for x in r['paired'] or [])})"
            f" -> {'keeps SAM accuracy' if keeps else 'does NOT keep SAM accuracy'}"
            + (f", at {speed:.2f}x SAM's speed (side by side)" if speed else "")
            + (
                f"; {100 * r['sa_share']:.0f}% of steps sharpness-aware"
                if r["sa_share"] is not None
                else ""
            )
            + "."
        )
    for r in equal:
        if r["acc"] is None:
            continue
        keeps = keeps_sam_accuracy(r, sam)
        out.append(
            f"At SAM's training time, {r['label']} ({len(r['seeds'])} seed(s)): "
            f"{100 * (r['acc'] - sam['acc']):+.2f} points vs SAM at {sam['epochs']} epochs "
            f"(paired {', '.join(f'{x:+.2f}' for x in r['paired'] or [])}) -> "
            + (
                "more accurate than SAM for the same time (beyond SAM's seed std, on every seed)"
                if keeps
                and r["acc"] - sam["acc"] > (sam["acc_std"] or 0)
                and all(d > 0 for d in r["paired"])
                else "as accurate as SAM for the same time"
                if keeps
                else "below SAM for the same time"
            )
            + "."
        )
    return out + targets(rows, keepers, equal, sam)


def targets(rows, keepers, equal, sam) -> list[str]:
    out = []
    fast = [r for r in keepers if (r.get("speed") or 0) >= 1.5]
    if fast:
        best = max(fast, key=lambda r: r["speed"])
        out.append(
            f"PASS target 1: {', '.join(r['label'] for r in fast)} keep SAM's accuracy at >= 1.5x "
            f"SAM's speed (fastest: {best['label']}, {best['speed']:.2f}x)."
        )
    else:
        out.append("FAIL target 1: no method keeps SAM's accuracy at >= 1.5x SAM's speed.")
    late = next((r for r in rows if r["optimizer"] == "sam-late"), None)
    if late is None and "sam-late" not in method_order(False):
        out.append("Target 2: SAM-late is not in this protocol (see the first protocol).")
    elif late is None:
        out.append("FAIL target 2: the late-SAM schedule has not finished.")
    else:
        # at equal wall-clock where measured, else at the protocol's epochs
        # At SAM's training time: the equal-time runs, and every other method at the
        # protocol's epochs — at or below SAM's cost, so comparing it there is conservative
        # for it (more time would not be given to SAM-late's rivals only).
        pool = equal + rows if equal else rows
        late_eq = next((r for r in equal if r["optimizer"] == "sam-late"), late)
        cands = [
            r for r in pool if r["optimizer"] not in ("sgd", "sam-late") and r["acc"] is not None
        ]
        best = max(cands, key=lambda r: r["acc"], default=None)
        where = (
            f"at equal wall-clock: SAM-late given SAM's time ({late_eq['epochs']} epochs, "
            f"{len(late_eq['seeds'])} seed(s)), the others at their own cost <= SAM's"
            if equal
            else "at equal epochs (equal-time runs not done)"
        )
        if best is None:
            out.append("target 2: no other method to compare with late SAM.")
        elif best["acc"] >= late_eq["acc"]:
            out.append(
                f"PASS target 2 ({where}): the most accurate method, {best['label']} "
                f"({_pct(best['acc'])}%, {best['epochs']} epochs), is at least as accurate as "
                f"SAM-late ({_pct(late_eq['acc'])}%)."
            )
        else:
            out.append(
                f"FAIL target 2 ({where}): no method is as accurate as SAM-late "
                f"({_pct(late_eq['acc'])}%); the best other is {best['label']} ({_pct(best['acc'])}%)."
            )
    out.append(diagnosis({r["optimizer"]: r for r in rows}, sam))
    return out


def diagnosis(by: dict[str, dict[str, Any]], sam: dict[str, Any]) -> str:
    """Selection or data reduction: ESAM against its random control and the mix."""
    esam, rand, mix, whole = (by.get(n) for n in DIAGNOSIS)
    if not (esam and rand and esam["acc"] is not None and rand["acc"] is not None):
        return "Target 3 (diagnosis): ESAM and its random-subset control have not both finished."
    spread = max(esam["acc_std"] or 0, rand["acc_std"] or 0, sam["acc_std"] or 0)
    gap_sel = 100 * (rand["acc"] - esam["acc"])
    gap_red = 100 * (sam["acc"] - rand["acc"])
    if gap_red > 100 * spread and gap_red >= gap_sel:
        cause = "the DATA REDUCTION (a random half loses as much or more)"
    elif gap_sel > 100 * spread:
        cause = "the SELECTION (a random half of the same size does better than SDS's half)"
    else:
        cause = "neither alone beyond the seed spread"
    text = (
        f"Target 3 (diagnosis): SAM {_pct(sam['acc'])}%, ESAM-random {_pct(rand['acc'])}% "
        f"(same data reduction, no selection), ESAM {_pct(esam['acc'])}%: the loss against SAM "
        f"is {gap_red:+.2f} points from halving the data and {gap_sel:+.2f} from choosing the "
        f"half by sharpness -> ESAM's loss comes from {cause} (largest seed std {100 * spread:.2f})."
    )
    if mix and mix["acc"] is not None:
        text += (
            f" ESAM-mix, which keeps every sample in the update at no extra pass: {_pct(mix['acc'])}%"
            f" ({100 * (mix['acc'] - sam['acc']):+.2f} vs SAM)."
        )
    if whole and whole["acc"] is not None:
        gap_bn = 100 * (whole["acc"] - esam["acc"])
        text += (
            f" ESAM-wholebatch (SDS's half back-propagated from a whole-batch forward, SAM's "
            f"cost): {_pct(whole['acc'])}% ({100 * (whole['acc'] - sam['acc']):+.2f} vs SAM): "
            f"{gap_bn:+.2f} points of ESAM's loss come from pass 2 normalising by the "
            f"selected half's BatchNorm statistics, "
            f"{100 * (sam['acc'] - whole['acc']):+.2f} from back-propagating that half only."
        )
    return text


def newest(paths: Any) -> Path | None:
    found = sorted(paths, key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def plot(rows: list[dict[str, Any]], equal: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: test accuracy against training wall-clock at the protocol's epochs, error bars
    over seeds, labels that do not overlap, the Pareto front (no other point both faster
    and more accurate). Right (with equal-time runs): each method given SAM's training
    time beside SAM, SAM's mean and seed std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sam = next((r for r in rows if r["optimizer"] == "sam"), None)
    side = sam is not None and all(r.get("speed") for r in rows if r["acc"] is not None)
    for r in rows:
        # with side-by-side speeds: SAM's training time over the method's speed (one load
        # for every method, all at the protocol's epochs); otherwise the time as run
        r["x"] = sam["time_s"] / r["speed"] if side else r["time_s"]
    pts = [r for r in rows if r["acc"] is not None and r["x"]]
    eq = sorted((r for r in equal if r["acc"] is not None), key=lambda r: r["acc"])
    if not pts:
        return
    if eq and sam is not None and sam["acc"] is not None:
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(13, 6), dpi=120, gridspec_kw={"width_ratios": [2, 1]}
        )
    else:
        fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
        ax2 = None
    bars = {"ecolor": "0.6", "capsize": 3, "ms": 6}  # both panels' error bars
    for r in pts:
        ax.errorbar(
            r["x"],
            100 * r["acc"],
            xerr=0 if side else (r["time_std"] or 0),
            yerr=100 * (r["acc_std"] or 0),
            fmt="o",
            color="tab:blue",
            **bars,
        )
    front = pareto(pts)
    ax.plot(
        [r["x"] for r in front],
        [100 * r["acc"] for r in front],
        "--",
        color="tab:green",
        lw=1.2,
        drawstyle="steps-post",
        label="Pareto front",
    )
    ax.plot([], [], "o", color="tab:blue", label=f"{rows[0]['epochs'] if rows else ''} epochs")
    ax.set_xlabel(
        "training time per run (s): SAM's, divided by the speed measured side by side"
        if side
        else "training wall-clock per run, as run (s; evaluation excluded)"
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if ax2 is not None:
        mean, std = 100 * sam["acc"], 100 * (sam["acc_std"] or 0)
        ax2.axhspan(mean - std, mean + std, color="tab:blue", alpha=0.12, lw=0)
        ax2.axhline(mean, color="tab:blue", lw=1, ls="--", label=f"SAM, {sam['epochs']} epochs")
        for i, r in enumerate(eq):
            ax2.errorbar(
                i,
                100 * r["acc"],
                yerr=100 * (r["acc_std"] or 0),
                fmt="s",
                color="tab:orange",
                **bars,
            )
        ax2.set_xticks(range(len(eq)), [r["label"] for r in eq], rotation=35, ha="right")
        ax2.set_xlim(-0.6, len(eq) - 0.4)
        ax2.set_ylabel("test accuracy (%)")
        ax2.set_title("given SAM's training time (mean ± std over seeds)", fontsize=10)
        ax2.grid(alpha=0.3, axis="y")
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    labels = [(r["label"], r["x"], 100 * r["acc"], 100 * (r["acc_std"] or 0)) for r in pts]
    place_labels(ax, fig, labels)
    fig.savefig(path)
    plt.close(fig)


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r.get("x", r["time_s"]), -r["acc"])):
        if r["acc"] > best:
            front.append(r)
            best = r["acc"]
    return front


def place_labels(ax, fig, labels: list[tuple[str, float, float, float]]) -> None:
    """Each label (text, x, y, y error) at the first of 16 offsets around its point whose
    box overlaps no other label, no point and no error bar (display coordinates):
    deterministic, no extra dependency."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    for _, x, y, err in labels:
        px, py = ax.transData.transform((x, y))
        _, lo = ax.transData.transform((x, y - err))
        _, hi = ax.transData.transform((x, y + err))
        taken.append((px - 4, py - 4, px + 4, py + 4))
        taken.append((px - 2, min(lo, py - 4), px + 2, max(hi, py + 4)))
    offsets = [(8, 6), (8, -14), (-8, 6), (-8, -14), (0, 12), (0, -20), (16, -4), (-16, -4)]
    offsets += [(dx * 2, dy * 2) for dx, dy in offsets]
    for text, x, y, _ in labels:
        placed = None
        for dx, dy in offsets:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=8,
                ha="left" if dx >= 0 else "right",
                arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.6} if abs(dx) > 10 else None,
            )
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            if not any(_overlap(box, t) for t in taken):
                placed = box
                break
            ann.remove()
        if placed is None:  # every slot taken: the last candidate, still readable
            ann = ax.annotate(text, (x, y), xytext=(24, 24), textcoords="offset points", fontsize=8)
            bb = ann.get_window_extent(renderer)
            placed = (bb.x0, bb.y0, bb.x1, bb.y1)
        taken.append(placed)


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


# ----------------------------------------------------------------------------- equal time


def equal_time_plan(
    rows: list[dict[str, Any]], side_by_side: bool = False
) -> list[tuple[str, str, int]]:
    """(optimizer, label, epochs): SGD and the cheap methods given SAM's training time.

    With ``side_by_side`` (a throughput file was given) a method's cost is its side-by-side
    speed, and a method without one is left out: the runs' own times are not comparable
    (runs made at different times see different loads). Without it (smoke) the times as
    run are used."""
    by = {r["optimizer"]: r for r in rows}
    sam = by.get("sam")
    if sam is None or not sam["time_s"]:
        return []
    plan = []
    for r in rows:
        if r["optimizer"] == "sam" or not r["time_s"]:
            continue
        if side_by_side and not r.get("speed"):
            print(f"frontier: {r['label']} has no side-by-side speed: not planned at equal time")
            continue
        share = 1.0 / r["speed"] if r.get("speed") else r["time_s"] / sam["time_s"]
        if share <= CHEAP:
            plan.append(
                (r["optimizer"], r["label"], max(r["epochs"] + 1, round(r["epochs"] / share)))
            )
    return plan


def entry_of(name: str) -> Any:
    """The protocol's compare entry for ``name`` (with its own args), or the bare name."""
    import yaml

    for entry in yaml.safe_load(CONFIG.read_text())["compare"]["optimizers"]:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return name


def shared_args_for(*names: str) -> dict[str, Any]:
    """The protocol's shared ``optim.args`` that any of the optimizers ``names`` takes."""
    from effsam.optim.registry import accepted_kwargs
    from effsam.train.config import load_config

    taken = set().union(*(accepted_kwargs(n) for n in names))
    return {k: v for k, v in load_config(CONFIG).optim.args.items() if k in taken}


def subset_config(names: list[str], path: Path) -> list[str]:
    """Write a config at ``path`` that extends the protocol with only the entries ``names``
    (their labels and own args kept); returns the ``--set`` that narrows the shared args."""
    import yaml

    cfg = {"extends": str(CONFIG), "compare": {"optimizers": [entry_of(n) for n in names]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ["--set", "optim.args=" + json.dumps(shared_args_for(*names))]


def run_equal_time(
    args: argparse.Namespace, work: Path, rows: list[dict[str, Any]], side_by_side: bool
) -> int:
    """One compare per cheap method at its equal-time epochs: a small config that extends
    the protocol with only that entry (so its own args, e.g. MSAM's rho, stay)."""
    cmds, logs = [], []
    for name, label, epochs in equal_time_plan(rows, side_by_side):
        if args.only and name not in args.only:
            continue
        out = work / "equal-time" / f"{label}-{epochs}ep"
        extra = ["--epochs", str(epochs)]
        config = None
        if not args.smoke:
            # the protocol's shared optim.args narrowed to what this method takes (compare
            # refuses shared args that none of its optimizers takes)
            config = out / "config.yaml"
            extra += subset_config([name], config)
        for s in seeds_of(args):
            cmds.append(compare_command(args, s, out / f"seed{s}", extra, config, [name]))
            logs.append(out / f"seed{s}.log")
    return run_jobs(cmds, args.jobs, logs)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 location (default $EFFSAM_DATA_DIR)")
    p.add_argument("--work", type=Path, default=Path("runs") / "frontier", help="run directories")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="frontier",
        help="frontier: the CPU accuracy protocol, every method (default); augment: the "
        "second protocol (augmentation, trained until SAM fits the training set)",
    )
    p.add_argument("--equal-time", action="store_true", help="+ the equal wall-clock runs")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="train only these of the protocol's methods (both stages); the report still "
        "shows every finished run",
    )
    p.add_argument("--report-only", action="store_true", help="no training: report what finished")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny model")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--speeds",
        type=Path,
        default=None,
        help="throughput JSON of the protocol's model (default: benchmarks/results/"
        "throughput-cifar_cnn-w1-b128-*1t*.json, the newest)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        print("frontier: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    global CONFIG
    CONFIG = ROOT / "configs" / "compare" / PROTOCOLS[args.protocol][0]
    tag = "smoke" if args.smoke else PROTOCOLS[args.protocol][1]
    work = args.work / tag
    order = method_order(args.smoke)
    unknown = sorted(set(args.only or []) - set(order))
    if unknown:
        print(
            f"frontier: --only {unknown} not in the protocol ({', '.join(order)})", file=sys.stderr
        )
        return 2
    if not args.report_only:
        seeds = seeds_of(args)
        config, extra = None, []
        if args.only and not args.smoke:
            config = work / "only.yaml"
            extra = subset_config(args.only, config)
        cmds = [
            compare_command(args, s, work / f"seed{s}", extra, config, args.only) for s in seeds
        ]
        logs = [work / f"seed{s}.log" for s in seeds]
        code = run_jobs(cmds, args.jobs, logs)
        if code:
            print(f"frontier: a compare run failed (exit {code}); see {work}/seed*.log")
            return code
    rows = rows_of([r for r in collect(work) if r["stage"] == "protocol"], order)
    speeds_file = args.speeds or newest(RESULTS.glob("throughput-cifar_cnn-w1-b128-*1t*.json"))
    throughput = None
    if speeds_file is not None and speeds_file.exists() and not args.smoke:
        throughput = json.loads(speeds_file.read_text())
    apply_speeds(rows, throughput)
    if args.equal_time and not args.report_only:
        code = run_equal_time(args, work, rows, throughput is not None)
        if code:
            return code
    equal_runs = [r for r in collect(work) if r["stage"] == "equal-time"]
    for r in equal_runs:
        r["label"] = f"{r['label']} @{r['epochs']} ep"
    equal = rows_of(equal_runs, order)
    apply_speeds(equal, throughput)
    sam = next((r for r in rows if r["optimizer"] == "sam"), None)
    if sam is not None:
        for r in equal:  # equal-time rows compare with SAM at the protocol's epochs
            r["paired"] = paired(r, sam)
    env = environment("cpu")
    env["torch_threads"] = args.threads  # what each run used (the file name says so)
    command = "python benchmarks/frontier.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    title = protocol_title(args.smoke)
    lines = [
        f"# The frontier: {title}",
        "",
        f"Command: `{command.strip()}`  ",
        f"Protocol: {'smoke' if args.smoke else os.path.relpath(CONFIG, ROOT)}  ",
        f"Date: {env['date']}  ",
        f"Environment: torch {env['torch']}, {env['cpu']}, "
        + (
            "the runs as they were made (each run's env.json records its threads)  "
            if args.report_only
            else f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time  "
        ),
        "Speeds: "
        + (
            f"side by side from `{os.path.relpath(speeds_file, ROOT)}` (interleaved rounds "
            "in one process on the protocol's model and batch); scheduled methods priced at "
            "their own share of sharpness-aware steps"
            if throughput is not None
            else "none measured side by side (run benchmarks/throughput.py --model cifar_cnn "
            "--threads 1 first)"
        )
        + "  ",
        "",
        "## At equal epochs",
        "",
        *table(rows),
        "",
    ]
    if equal:
        lines += ["## At equal wall-clock (SAM's training time)", "", *table(equal), ""]
    lines += ["## Verdicts", "", *[f"- {v}" for v in verdicts(rows, equal)], ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"frontier-{tag}-{environment_tag(env)}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"command": command, "environment": env, "rows": rows, "equal_time": equal},
            indent=2,
            default=str,
        )
    )
    plot(rows, equal, args.out / f"{stem}.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
