"""The frontier's reports: tables, verdict lines, ESAM's diagnosis, the runs and stale
sections, the plot (accuracy against training time with the Pareto front, and the
equal-time panel) and the summary across protocols."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .rule import (
    BASE_SEEDS,
    DIAGNOSIS,
    FULL_SEEDS,
    SHARE,
    TARGETS,
    beats_sam,
    keeps_sam_accuracy,
    paired,
    protocol_verdicts,
    rule_text,
)


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _share_text(share: dict[str, Any] | None) -> str:
    if not share or share.get("mean") is None:
        return "–"
    if share.get("half") is None:
        return f"{share['mean']:.2f}"
    return f"{share['mean']:.2f} [{share['lo']:.2f}, {share['hi']:.2f}]"


def table(rows: list[dict[str, Any]], shares: dict[str, dict[str, Any]] | None = None) -> list[str]:
    shares = shares or {}
    out = [
        "| method | epochs | seeds | test acc. (%) | Δ vs SAM, paired by seed "
        "| share of SAM's gain, mean [90% CI] | train acc. (%) | train time (s), as run "
        "| images/s, as run | speed vs SAM, side by side | sharpness-aware steps | code |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = "–" if r["acc"] is None else f"{100 * r['acc']:.2f} ± {100 * (r['acc_std'] or 0):.2f}"
        pairs = "–" if not r["paired"] else ", ".join(f"{d:+.2f}" for d in r["paired"])
        time_s = "–" if r["time_s"] is None else f"{r['time_s']:.0f} ± {r['time_std'] or 0:.0f}"
        ips = "–" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        speed = "–" if r.get("speed") is None else f"{r['speed']:.2f}"
        sa = "–" if r["sa_share"] is None else f"{100 * r['sa_share']:.0f}%"
        share = _share_text(shares.get(r["label"]))
        out.append(
            f"| {r['label']} | {r['epochs']} | {len(r['seeds'])} | {acc} | {pairs} | {share} | "
            f"{_pct(r['train_acc'], 1)} | {time_s} | {ips} | {speed} | {sa} | "
            f"{r.get('code', 'commit unknown')} |"
        )
    return out


def _status_text(v: dict[str, Any]) -> str:
    if v["status"] == "undecided":
        return f"undecided ({v['reason']})"
    return {"keeps": "KEEPS SAM's accuracy", "does not keep": "does NOT keep SAM's accuracy"}.get(
        v["status"], v["status"]
    )


def verdict_lines(
    protocol: str,
    rows: list[dict[str, Any]],
    equal: list[dict[str, Any]],
    full: int = len(FULL_SEEDS),
    base: int = len(BASE_SEEDS),
    rule: str = "std",
) -> list[str]:
    """The protocol's verdicts under ``rule``: SAM over SGD, each method's (with the share
    of SAM's gain), the equal wall-clock comparison and ESAM's diagnosis."""
    by = {r["optimizer"]: r for r in rows}
    sam, sgd = by.get("sam"), by.get("sgd")
    if sam is None or sam["acc"] is None:
        return ["SAM has not finished: no verdicts yet."]
    out = []
    criterion = (
        f"mean share of SAM's gain >= {SHARE:.2f}"
        if rule == "share"
        else "mean paired delta within SAM's seed std, paired deltas not all negative"
    )
    out.append(
        f"Criterion on this protocol: {criterion}; {full} seeds for SGD, SAM and a method that "
        f"keeps SAM's accuracy, {base} for one that does not."
    )
    if sgd and sgd["acc"] is not None:
        d = paired(sgd, sam) or []
        out.append(
            f"SAM over SGD: {100 * (sam['acc'] - sgd['acc']):+.2f} points "
            f"(SGD − SAM by seed: {', '.join(f'{x:+.2f}' for x in d)}; SAM {len(sam['seeds'])} "
            f"seeds, SGD {len(sgd['seeds'])})."
        )
        noise = 100 * max(sam["acc_std"] or 0.0, sgd["acc_std"] or 0.0)
        if 100 * (sam["acc"] - sgd["acc"]) <= noise:
            out.append(
                f"SAM does not beat SGD beyond the seed noise here (largest seed std "
                f"{noise:.2f}): keeping SAM's accuracy means little, and SGD is the cheapest "
                "answer."
            )
    verdicts = protocol_verdicts(protocol, rows, full, base, rule)
    for r in rows:
        v = verdicts.get(r["optimizer"])
        if v is None or r["acc"] is None:
            continue
        share = v["share"]
        shares = ", ".join("n/a" if x is None else f"{x:.2f}" for x in share["by_seed"].values())
        speed = r.get("speed")
        out.append(
            f"{r['label']}: {100 * r['acc']:.2f} ± {100 * (r['acc_std'] or 0):.2f}; paired vs "
            f"SAM {', '.join(f'{x:+.2f}' for x in v['deltas']) or '–'}"
            + (
                f" (mean {v['mean_delta']:+.2f}, SAM's seed std {v['sam_std']:.2f})"
                if v["deltas"]
                else ""
            )
            + f"; share of SAM's gain {shares or '–'}"
            + (f" -> mean {_share_text(share)}" if share["mean"] is not None else "")
            + f" -> {_status_text(v)}"
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
        v = beats_sam(r, sam, full, base)
        text = {
            "beats": "more accurate than SAM for the same time (beyond SAM's seed std, on every seed)",
            "does not beat": "as accurate as SAM for the same time"
            if keeps_sam_accuracy(r, sam)
            else "below SAM for the same time",
        }.get(v["status"], f"undecided ({v['reason']})")
        out.append(
            f"At SAM's training time, {r['label']} ({len(r['seeds'])} seed(s)): "
            f"{100 * (r['acc'] - sam['acc']):+.2f} points vs SAM at {sam['epochs']} epochs "
            f"(paired {', '.join(f'{x:+.2f}' for x in r['paired'] or [])}) -> {text}."
        )
    out.append(diagnosis(by, sam))
    return out


def diagnosis(by: dict[str, dict[str, Any]], sam: dict[str, Any]) -> str:
    """Selection or data reduction: ESAM against its random control and the mix."""
    esam, rand, mix, whole = (by.get(n) for n in DIAGNOSIS)
    if not (esam and rand and esam["acc"] is not None and rand["acc"] is not None):
        return "ESAM's diagnosis: ESAM and its random-subset control have not both finished."
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
        f"ESAM's diagnosis (not a target): SAM {_pct(sam['acc'])}%, ESAM-random "
        f"{_pct(rand['acc'])}% (same data reduction, no selection), ESAM {_pct(esam['acc'])}%: "
        f"the loss against SAM is {gap_red:+.2f} points from halving the data and "
        f"{gap_sel:+.2f} from choosing the half by sharpness -> ESAM's loss comes from {cause} "
        f"(largest seed std {100 * spread:.2f})."
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


def runs_section(runs: list[dict[str, Any]], with_protocol: bool = False) -> list[str]:
    """Every run (stale ones too), in finish order, with the code that trained it."""
    if not runs:
        return ["No finished runs."]
    runs = sorted(runs, key=lambda r: (r.get("finished_at") or "", r["run"]))
    head = (
        "| # | "
        + ("protocol | " if with_protocol else "")
        + ("run | stage | seed | commit | code now | finished (UTC) |")
    )
    out = [head, "|---:|" + ("---|" if with_protocol else "") + "---|---|---:|---|---|---|"]
    for i, r in enumerate(runs, 1):
        stage = r["stage"] + (f" @{r['epochs']} ep" if r["stage"] == "equal-time" else "")
        out.append(
            f"| {i} | "
            + (f"{r.get('protocol', '')} | " if with_protocol else "")
            + f"{r['run']} | {stage} | {r['seed']} | {r.get('code', 'commit unknown')} | "
            f"{r.get('code_status', 'not checked')} | {r.get('finished_at') or '–'} |"
        )
    return out


def stale_section(stale: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    if not stale:
        unchecked = sum(1 for r in runs if r.get("code_status", "").startswith("not checked"))
        if not unchecked:
            return ["None: every run is at HEAD (its stamp's code, or its first epoch replayed)."]
        return [
            f"None known: {unchecked} run(s) not checked against the code now ('not checked' "
            "in the code column; `--check-stale` replays their first epoch)."
        ]
    out = [
        "| run | method | seed | commit | first epoch: saved -> replayed now |",
        "|---|---|---:|---|---|",
    ]
    for r in stale:
        out.append(
            f"| {r['run']} | {r['label']} | {r['seed']} | {r.get('code', 'commit unknown')} | "
            f"{'; '.join(r.get('stale_diff') or []) or '–'} |"
        )
    return out


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
            # fewer seeds than a verdict needs: hollow, and left out of the front
            mfc="tab:blue" if _seeds(r) >= MIN_SEEDS else "white",
            **bars,
        )
    front = pareto([r for r in pts if _seeds(r) >= MIN_SEEDS])
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
    if any(_seeds(r) < MIN_SEEDS for r in pts):
        ax.plot([], [], "o", color="tab:blue", mfc="white", label=f"< {MIN_SEEDS} seeds")
    ax.margins(x=0.15)  # room for the labels of the outermost points
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
    labels = [(_plot_label(r), r["x"], 100 * r["acc"], 100 * (r["acc_std"] or 0)) for r in pts]
    place_labels(ax, fig, labels)
    fig.savefig(path)
    plt.close(fig)


#: seeds a point needs to be drawn solid and to enter the plot's Pareto front (a verdict
#: that a method does not keep SAM's accuracy needs this many)
MIN_SEEDS = 3


def _seeds(row: dict[str, Any]) -> int:
    return len(row.get("seeds") or [])


def _plot_label(row: dict[str, Any]) -> str:
    n = _seeds(row)
    return row["label"] if n >= MIN_SEEDS else f"{row['label']} ({n} seed{'s' if n != 1 else ''})"


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


def header(
    title: str,
    command: str,
    head: dict[str, Any],
    env: dict[str, Any],
    runs_text: str,
    speeds_text: str,
    protocol: str | None = None,
) -> list[str]:
    """The top of a report: the command, the code (:func:`runs.code_stamp`), the date, how
    the runs were made (``runs_text``) and where the speeds come from (``speeds_text``)."""
    if head.get("commit"):
        code = (
            f"{head['commit']}{'+dirty' if head['dirty'] else ''} (`git rev-parse HEAD`; "
            "+dirty: uncommitted changes under src/, configs/ or benchmarks/, results "
            f"excepted; package digest {head['src']})"
        )
    else:
        code = f"{head['text']} (package digest {head['src']})"
    return [
        f"# {title}",
        "",
        f"Command: `{command.strip()}`  ",
        *([f"Protocol: {protocol}  "] if protocol else []),
        f"Code: {code}  ",
        f"Date: {env['date']}  ",
        f"Environment: torch {env['torch']}, {env['cpu']}, {runs_text}  ",
        f"Speeds: {speeds_text}  ",
        "",
    ]


def speeds_text(source: str | None, file: Path | None = None) -> str:
    """Where the verdicts' speeds come from (``source``: a description of the measurement,
    None when nothing was measured side by side)."""
    if source is None:
        return "none measured side by side"
    where = f" from `{os.path.relpath(file)}`" if file is not None else ""
    return (
        f"side by side{where} ({source}); scheduled methods priced at their own share of "
        "sharpness-aware steps"
    )


def protocol_report(
    g: dict[str, Any], top: list[str], summary_name: str, full: int, base: int
) -> str:
    verdicts = protocol_verdicts(g["protocol"], g["rows"], full, base, g["rule"])
    shares = {v["label"]: v["share"] for v in verdicts.values()}
    lines = [
        *top,
        "## The rule",
        "",
        *[f"- {x}" for x in rule_text(full, base, g["rules"], g.get("notes"))],
        "",
        "## At equal epochs",
        "",
        *table(g["rows"], shares),
        "",
    ]
    if g["equal"]:
        lines += ["## At equal wall-clock (SAM's training time)", "", *table(g["equal"]), ""]
    lines += [
        "## Verdicts on this protocol",
        "",
        *[
            f"- {v}"
            for v in verdict_lines(g["protocol"], g["rows"], g["equal"], full, base, g["rule"])
        ],
        "",
        f"The verdict over every protocol and the targets: `{summary_name}`.",
        "",
        "## Stale runs (left out of the tables, verdicts and targets)",
        "",
        *stale_section(g["stale"], g["runs"]),
        "",
        "## Runs (in finish order)",
        "",
        *runs_section(g["runs"]),
        "",
    ]
    return "\n".join(lines)


def _cell(v: dict[str, Any] | None, member: bool) -> str:
    if v is None:
        return "not run" if member else "not in the protocol"
    if v["rule"] == "share":
        detail = f"share {_share_text(v['share'])}"
    else:
        detail = "Δ –" if v["mean_delta"] is None else f"Δ {v['mean_delta']:+.2f}"
    status = {"keeps": "keeps", "does not keep": "does NOT keep"}.get(
        v["status"], f"undecided ({v['reason']})"
    )
    return f"{status}; {detail}, {v['n']} seeds"


def _eq_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "not run"
    mean = f"{v['mean_delta']:+.2f}, " if v.get("mean_delta") is not None else ""
    status = {"beats": "beats SAM", "does not beat": "does not beat SAM"}.get(
        v["status"], f"undecided ({v['reason']})"
    )
    return f"{status} ({mean}{len(v['deltas'])} seeds)"


def summary_report(
    s: dict[str, Any], gathered: dict[str, Any], top: list[str], full: int, base: int
) -> str:
    protocols = s["protocols"]
    sgd_speed = s["speeds"].get("sgd")
    rules = rule_text(full, base, s["rules"], s.get("notes"))
    lines = [*top, "## The rule", "", *[f"- {x}" for x in rules], ""]
    lines += ["## Protocols", ""]
    for p in protocols:
        g = gathered[p]
        if g is None:
            lines.append(f"- {p}: its config was not found: no runs.")
            continue
        rows = {r["optimizer"]: r for r in g["rows"]}
        sam, sgd = rows.get("sam"), rows.get("sgd")
        gain = (
            f"SAM over SGD {100 * (sam['acc'] - sgd['acc']):+.2f} points "
            f"(SAM {len(sam['seeds'])} seeds, SGD {len(sgd['seeds'])})"
            if sam and sgd
            else "SGD and SAM not both finished"
        )
        n_stale = len(g["stale"])
        unchecked = sum(1 for r in g["runs"] if r["code_status"].startswith("not checked"))
        lines.append(
            f"- {p} (`{g['config']}`; {g['title']}): {len(g['runs'])} finished runs, {gain}; "
            f"{n_stale} stale, {unchecked} not checked against the code now."
        )
    lines += [
        "",
        "## Does a method keep SAM's accuracy?",
        "",
        "| method | speed vs SAM, side by side (lowest) | cost in SGD steps | "
        + " | ".join(protocols)
        + " | overall |",
        "|---|---:|---:|" + "---|" * len(protocols) + "---|",
    ]
    labels = s["labels"]
    for n, v in s["overall"].items():
        speed = s["speeds"].get(n)
        cost = f"{sgd_speed / speed:.2f}" if speed and sgd_speed else "–"
        cells = [_cell(v["cells"][p], n in s["members"].get(p, [])) for p in protocols]
        status = {"keeps": "KEEPS", "does not keep": "does NOT keep"}.get(v["status"], "undecided")
        reason = f" ({v['reason']})" if v["reason"] else ""
        lines.append(
            f"| {labels.get(n, n)} | {'–' if speed is None else f'{speed:.2f}'} | {cost} | "
            + " | ".join(cells)
            + f" | {status}{reason} |"
        )
    lines += ["", "## Targets", "", *[f"- {t}" for t in TARGETS], "", "Results:", ""]
    lines += [f"- {text}" for _, text in s["targets"]]
    names: list[str] = []
    for p in protocols:
        names += [n for n in s["equal_time"].get(p, {}) if n not in names]
    if names:
        lines += [
            "",
            "### At equal wall-clock (target 3)",
            "",
            "| method | " + " | ".join(protocols) + " |",
            "|---|" + "---|" * len(protocols),
        ]
        for n in names:
            lines.append(
                f"| {labels.get(n, n)} | "
                + " | ".join(_eq_cell(s["equal_time"].get(p, {}).get(n)) for p in protocols)
                + " |"
            )
    runs = [r for g in gathered.values() if g is not None for r in g["runs"]]
    lines += ["", "## Runs (every protocol, in finish order)", "", *runs_section(runs, True), ""]
    return "\n".join(lines)


def _json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "x"} for r in rows]


def _json_run(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("run", "protocol", "stage", "label", "optimizer", "seed", "epochs", "final_test_acc",
            "code", "code_status", "finished_at", "launches", "stale_diff")  # fmt: skip
    return {k: r.get(k) for k in keys}
