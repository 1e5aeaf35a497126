"""Throughput of every optimizer side by side, with the papers' speed targets.

    python benchmarks/throughput.py                      # ResNet-18, batch 128, all variants
    python benchmarks/throughput.py --model wrn --width 0.25 --batch 128
    python benchmarks/throughput.py --smoke              # tiny model, two rounds (tests)

Writes Markdown and JSON to benchmarks/results/ (file names carry model and environment;
each file records its command and the git commit it was run on, "+dirty" when the tree
held uncommitted changes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from effsam.bench.throughput import (
    PASSES,
    PERIODS,
    SHARE_STEP,
    SHARES,
    VARIANTS,
    Workload,
    evaluate_targets,
    pass_costs,
    predicted_speeds,
    ratios,
    registry_name,
    run,
)
from effsam.environment import environment, environment_tag
from effsam.optim.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def code_stamp() -> dict[str, object]:
    """``git rev-parse HEAD`` and whether the tree differs from it (``git status
    --porcelain``, the results under benchmarks/results/ excluded): "<commit>+dirty"."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    dirty = bool(status and status.strip())
    text = "commit unknown" if commit is None else commit + ("+dirty" if dirty else "")
    return {"commit": commit, "dirty": dirty, "text": text}


def last_layers(layers: str) -> int | float:
    """The count of ``"last:K"`` (an int, or a fraction of the layers)."""
    kind, _, arg = layers.partition(":")
    if kind != "last":
        raise ValueError(f"the cost model times the last layers, not {layers!r}")
    return int(arg) if arg.isdigit() else float(arg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if registry_name(v) in REGISTRY]
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny model, two rounds: checks it runs")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-pass-costs",
        dest="pass_costs",
        action="store_false",
        help="skip timing each pass alone (the cost model that explains the ratios)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.width, args.batch, args.rounds, args.steps, args.warmup = (
            "cifar_cnn",
            0.25,
            16,
            2,
            1,
            1,
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    workload = Workload(
        model_name=args.model,
        width=args.width,
        batch_size=args.batch,
        num_classes=args.classes,
        device=args.device,
    )
    stats = run(
        args.variants,
        workload,
        rounds=args.rounds,
        steps_per_round=args.steps,
        warmup=args.warmup,
        compile_model=args.compile,
        progress=say,
    )
    costs = predicted = None
    if args.pass_costs and not args.compile:
        say("timing each pass alone (cost model)")
        costs = pass_costs(
            workload,
            beta=VARIANTS["esam"]["beta"],
            gamma=VARIANTS["esam"]["gamma"],
            ascent_fraction=VARIANTS["sam-slice"]["ascent_fraction"],
            layers=last_layers(VARIANTS["sam-layers"]["layers"]),
            rounds=max(3, args.rounds),
            warmup=args.warmup,
        )
        predicted = predicted_speeds(costs, refresh_every=VARIANTS["sam-stale"]["refresh_every"])
    env = environment(args.device)
    code = code_stamp()
    command = "python benchmarks/throughput.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    rows = []
    for name, s in stats.items():
        step = statistics.median(s.amortised)
        rows.append(
            {
                "variant": name,
                "step_ms": step * 1e3,
                "images_per_s": args.batch / step,
                "vs_sam": ratios(stats, name, "sam") if "sam" in stats else None,
                "vs_sgd": ratios(stats, name, "sgd") if "sgd" in stats else None,
                "forward_passes": s.forward_samples,
                "backward_passes": s.backward_samples,
                "refresh_ms": s.refresh_time * 1e3,
                "overhead_ms": s.overhead[0] * 1e3 if s.overhead else None,
                "optimizer_mb": s.optimizer_mb,
                "step_peak_mb": s.peak_mb,
                "ascent_x_params": s.ascent_ratio,
                "ascent_transient_x_params": s.ascent_transient,
            }
        )
    targets = evaluate_targets(stats)
    md = [
        f"# Throughput: {args.model} (width {args.width}), batch {args.batch}",
        "",
        f"Command: `{command}`  ",
        f"Commit: {code['text']}  ",
        f"Date: {env['date']}  ",
        f"Environment: torch {env['torch']}, {env['device']}, {env['cpu']}, "
        f"{env['torch_threads']} threads, Python {env['python']}  ",
        f"Protocol: {args.warmup} warm-up steps, {args.rounds} interleaved rounds of "
        f"{args.steps} steps per variant; median per round, ratios within a round, median "
        "over rounds. SSAM times include the mask refresh amortised over its interval. "
        f"{', '.join(f'{k} runs {v}' for k, v in PERIODS.items())} steps per round (whole "
        "cycles; their mean). "
        f"{', '.join(f'{k} at {v:.0%}' for k, v in SHARES.items())} sharpness-aware steps: "
        "their own plain step and SAM's, mixed at that share"
        + "".join(
            f"; {k} with {v}'s step instead of SAM's" for k, v in SHARE_STEP.items() if k in stats
        )
        + ". "
        "Step peak MB: the most memory one more step (profiled, untimed) holds at once beyond "
        "what was allocated before it. Ascent ×params: the extra memory of the ascent — the "
        "wrapper's θ backup and masks plus first_step's transient peak (allocation events) — "
        "over the parameters' bytes; the floor is 1 (the backup), the targets 1.1 (SAM, "
        "ASAM, ESAM) and 1.3 (SSAM); transient: first_step's share of it.",
        "",
        "| variant | ms/step | images/s | vs SAM | vs SGD | fwd passes | bwd passes | "
        "refresh ms | opt. overhead ms | opt. MB | step peak MB | ascent ×params | "
        "transient ×params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        md.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
            f"{fmt(r['vs_sam'], '.3f')} | {fmt(r['vs_sgd'], '.3f')} | "
            f"{r['forward_passes']:.2f} | {r['backward_passes']:.2f} | "
            f"{r['refresh_ms']:.1f} | {fmt(r['overhead_ms'], '.2f')} | "
            f"{r['optimizer_mb']:.1f} | {fmt(r['step_peak_mb'], '.0f')} | "
            f"{fmt(r['ascent_x_params'], '.3f')} | {fmt(r['ascent_transient_x_params'], '.3f')} |"
        )
    md += ["", "| target | measured | result | paper |", "|---|---:|---|---|"]
    for t in targets:
        md.append(
            f"| {t['target']} | {t['value']:.3f} | {'PASS' if t['pass'] else 'FAIL'} | "
            f"{t['paper']} |"
        )
    if costs is not None and predicted is not None:
        sam_step = 2 * (costs["forward"] + costs["backward"])
        md += [
            "",
            "## Cost model: each pass timed alone",
            "",
            "The same model and batch; each pass a step is made of, one by one (median over "
            f"{max(3, args.rounds)} interleaved rounds): ESAM's, the cheap ascents' pass 1 "
            "(on a slice of the batch, with weight gradients for the norm layers or the last "
            f"{VARIANTS['sam-layers']['layers'].partition(':')[2]} of the layers only) and a "
            "stale step's copy/restore. A variant's predicted speed against "
            "SAM is SAM's passes over its own; a measured ratio near the prediction means the "
            "hardware's pass costs, not the optimizer, set the speed.",
            "",
            "| pass | ms | share of a SAM step |",
            "|---|---:|---:|",
        ]
        for name, what in PASSES.items():
            if name in costs:
                md.append(f"| {what} | {costs[name] * 1e3:.1f} | {costs[name] / sam_step:.3f} |")
        md += [
            "",
            f"Backward / forward: {costs['backward'] / costs['forward']:.2f} (the papers' GPUs: "
            "~2); no-grad forward / forward: "
            f"{costs['forward_no_grad'] / costs['forward']:.2f}.",
            "",
            "The cheap ascents' predictions (F, B: the full batch's forward and backward; "
            "pass 2 is always F + B): sam-slice = F_slice + B_slice + F + B (sam-slice@0.5: "
            "the b/2 slice); sam-on = F_norm + B_norm + F + B; sam-layers = F_last + B_last "
            f"+ F + B; sam-stale (k = {VARIANTS['sam-stale']['refresh_every']}) = SAM/k + "
            "(k − 1)/k · (F + B + C), C the copy/restore; a composition at share q of "
            "sharpness-aware steps = q · its cheap step + (1 − q)(F + B).",
            "",
            "| variant | measured vs SAM | predicted from the passes | measured / predicted |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            if r["variant"] in predicted and r["vs_sam"] is not None:
                pred = predicted[r["variant"]]
                md.append(
                    f"| {r['variant']} | {r['vs_sam']:.3f} | {pred:.3f} | "
                    f"{r['vs_sam'] / pred:.3f} |"
                )
    text = "\n".join(md) + "\n"
    print(text)
    if not args.smoke or args.out != RESULTS:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"throughput-{args.model}-w{args.width:g}-b{args.batch}-{environment_tag(env)}"
        if args.compile:
            stem += "-compiled"
        (args.out / f"{stem}.md").write_text(text)
        payload = {
            "command": command,
            "code": code,
            "environment": env,
            "rows": rows,
            "targets": targets,
            "pass_costs_s": costs,
            "predicted_vs_sam": predicted,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
        }
        (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
        say(f"wrote {args.out / stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
