"""Accuracy and speed on real CIFAR-10 at CPU scale: SGD, SAM, ESAM, SSAM-F side by side.

    python benchmarks/accuracy.py --data-dir DIR             # the protocol below (~32 min on 2 cores)
    python benchmarks/accuracy.py --data-dir DIR --ablation  # + SWP alone, SDS alone (~17 min more)
    python benchmarks/accuracy.py --smoke                    # synthetic data, tiny model (tests)

The protocol is configs/compare/cifar10_cpu_accuracy.yaml (why these numbers: see
benchmarks/README.md): the 5-convolution CIFAR CNN on a fixed class-balanced subset of
5,000 CIFAR-10 training images without augmentation, the full 10,000-image test set, 30
epochs, SGD vs SAM vs ESAM vs SSAM-F at rho 0.1, seeds 0, 1, 2. ``--ablation`` (configs/compare/
cifar10_cpu_ablation.yaml) adds ESAM's two halves on the same protocol and reuses the finished
SGD, SAM and ESAM runs. It drives ``effsam compare`` and writes the table and verdicts to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from effsam.environment import environment, environment_tag
from effsam.train.cli import main as effsam_main

RESULTS = Path(__file__).resolve().parent / "results"

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    False: ROOT / "configs" / "compare" / "cifar10_cpu_accuracy.yaml",
    True: ROOT / "configs" / "compare" / "cifar10_cpu_ablation.yaml",
}
SMOKE = (
    "--dataset synthetic --model cifar_cnn --width 0.25 --epochs 2 --batch-size 64 "
    "--optimizers sgd,sam,esam --seeds 0,1 --set data.synthetic_train=128 "
    "--set data.synthetic_test=64 --set train.timing_warmup_steps=1"
).split()
ABLATION = ["sgd", "sam", "esam", "esam-swp", "esam-sds"]


def paired(runs: list[dict], label: str, ref: str) -> str | None:
    """Per-seed differences of ``label`` against ``ref`` (the same seed: the same
    initialisation and data order), or None when they share fewer than two seeds."""
    acc = {(r["label"], r["seed"]): r["final_test_acc"] for r in runs}
    seeds = sorted(s for (lab, s) in acc if lab == label and (ref, s) in acc)
    if len(seeds) < 2:
        return None
    diffs = [100 * (acc[label, s] - acc[ref, s]) for s in seeds]
    ahead = sum(d > 0 for d in diffs)
    return (
        f"paired by seed: {', '.join(f'{d:+.2f}' for d in diffs)} (mean "
        f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}; ahead on {ahead} of "
        f"{len(diffs)} seeds)"
    )


def verdicts(rows: list[dict], runs: list[dict] | None = None) -> list[str]:
    """Plain-language checks of the papers' claims against the measured spread."""
    by = {r["optimizer"]: r for r in rows}
    runs = runs or []
    out = []
    sam, sgd = by.get("sam"), by.get("sgd")
    if sam and sgd:
        gain = (sam["acc_mean"] - sgd["acc_mean"]) * 100
        spread = max(sam["acc_std"], sgd["acc_std"]) * 100
        larger = "gain larger than the spread" if gain > spread else "NOT larger than the spread"
        pairs = paired(runs, sam["label"], sgd["label"])
        out.append(
            f"SAM over SGD: {gain:+.2f} points; seed-to-seed spread (largest std) "
            f"{spread:.2f} -> {larger}" + (f"; {pairs}" if pairs else "")
        )
    if sam:
        for name in ("esam", "ssam-f", "ssam-d", "esam-swp", "esam-sds", "esam-loss"):
            r = by.get(name)
            if not r:
                continue
            diff = (r["acc_mean"] - sam["acc_mean"]) * 100
            spread = max(r["acc_std"], sam["acc_std"]) * 100
            keeps = diff >= -spread
            speed = r.get("speed_vs_sam")
            out.append(
                f"{r['label']} vs SAM: {diff:+.2f} points (spread {spread:.2f}) -> "
                f"{'keeps SAM accuracy' if keeps else 'below SAM beyond the spread'}; "
                + (f"speed {speed * 100:.1f}% of SAM" if speed else "speed not measured")
                + (f"; {pairs}" if (pairs := paired(runs, r["label"], sam["label"])) else "")
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 location (default $EFFSAM_DATA_DIR)")
    p.add_argument("--work", type=Path, default=Path("runs") / "accuracy", help="run directories")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="reuse finished runs, resume others")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny model")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="SGD, SAM, ESAM, SWP alone and SDS alone (reuses finished runs with --resume)",
    )
    p.add_argument("extra", nargs="*", help="further `effsam compare` arguments (after --)")
    args = p.parse_args(argv)
    # one work directory for the protocol and its ablation: the shared runs are reused
    name = "smoke" if args.smoke else "cifar10_cpu"
    config = CONFIGS[args.ablation]
    if args.smoke:
        protocol = SMOKE + (["--optimizers", ",".join(ABLATION)] if args.ablation else [])
    else:
        protocol = ["--config", str(config)]
    compare_args = [
        "compare",
        *protocol,
        "--threads",
        str(args.threads),
        "--out",
        str(args.work),
        "--name",
        name,
    ]
    if args.data_dir and not args.smoke:
        compare_args += ["--data-dir", args.data_dir]
    if args.resume:
        compare_args.append("--resume")
    compare_args += args.extra
    code = effsam_main(compare_args + ["--quiet"] if args.smoke else compare_args)
    if code:
        return code
    root = args.work / name
    result = json.loads((root / "compare.json").read_text())
    env = environment("cpu")
    command = " ".join(
        ["python benchmarks/accuracy.py"]
        + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]
    )
    wall = sum(r.get("wall_time_s") or 0.0 for r in result["runs"])
    checks = verdicts(result["rows"], result["runs"])
    # the files name the config relative to the repository, not where it was checked out
    shown = [os.path.relpath(a, ROOT) if a == str(config) else a for a in compare_args]
    md = [
        f"# Accuracy at CPU scale{', ESAM ablation' if args.ablation else ''}: {result['title']}",
        "",
        f"Command: `{command}`  ",
        f"Equivalent (from the repository root): `effsam {' '.join(shlex.quote(a) for a in shown)}`  ",
        f"Date: {env['date']}  ",
        "Data: CIFAR-10 from `--data-dir` or `$EFFSAM_DATA_DIR` (the training subset and the "
        "full test set)  ",
        f"Environment: torch {env['torch']}, {env['cpu']}, {args.threads} threads  ",
        f"Wall time: {wall / 60:.0f} min for {len(result['runs'])} runs (training and "
        "evaluation, as run; reused runs count their own time)  ",
        "",
        (root / "compare.md").read_text().strip(),
        "",
        "## Verdicts",
        "",
    ]
    md += [f"- {c}" for c in checks]
    text = "\n".join(md) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = ("smoke" if args.smoke else "cifar10") + ("-ablation" if args.ablation else "")
    stem = f"accuracy-{kind}-{environment_tag(env)}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": command,
                "compare_args": shown,
                "environment": env,
                "rows": result["rows"],
                "runs": result["runs"],
                "verdicts": checks,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
