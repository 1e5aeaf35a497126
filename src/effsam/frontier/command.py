"""``effsam frontier``: SGD, SAM and the efficient methods on your own model and data — does
a cheaper method keep SAM's accuracy here, and is it worth the time?

    effsam frontier                                    # the digits default, ~10 min on 2 cores
    effsam frontier --config my.yaml --data-dir DIR    # your compare or train config
    effsam frontier --config my.yaml --methods sam-slice,rst --seeds 0,1,2 --equal-time
    effsam frontier --config my.yaml --report-only     # the report from the finished runs

Everything goes to one folder (``--out``/``--name``, default ``runs/frontier_<config name>``),
resumable (run it again to continue, or with more ``--seeds``):

1. the speeds, measured side by side on the config's model and batch (interleaved rounds in
   one process, :mod:`effsam.bench.throughput`): ``speeds.json``;
2. the runs, ordinary ``effsam compare`` run directories, in the order that decides soonest
   (SGD and SAM on every seed and the cheap methods on the base seeds, then more seeds for
   the methods that keep SAM's accuracy so far, then the others);
3. with ``--equal-time``, SGD and the methods cheaper than SAM by a quarter given SAM's
   training time, seed by seed;
4. the report: ``frontier.md`` (the table, the verdicts with the rule and its seeds, the
   targets), ``frontier.json``, ``frontier.png``.

The criterion (``--rule``; effsam.frontier.rule): "share" judges a method by its mean share
of SAM's gain over SGD (>= 0.90), "std" by its paired delta against SAM within SAM's seed
std. ``auto`` (the default) takes "share" when SAM's gain over SGD on the base seeds is
larger than twice the larger of their seed stds (the gain can be told from the noise), else
"std"; it is decided from SGD's and SAM's runs alone, before any other method is judged.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from .driver import Protocol, run_frontier, train_protocol
from .rule import BASE_SEEDS, FULL_SEEDS, rows_of
from .runs import _fresh, code_stamp, collect

#: The methods ``effsam frontier`` compares by default: the references and the efficient
#: methods that need no setting tied to a model (each at its registry default).
DEFAULT_METHODS = (
    "sgd", "sam", "esam", "rst", "ae-sam", "sam-slice", "sam-stale", "sam-layers",
    "looksam-rel", "msam-rel",
)  # fmt: skip
#: The config ``effsam frontier`` runs without ``--config`` (shipped with the package).
DEFAULT_CONFIG = "configs/compare/digits_small_cnn.yaml"
#: ``--rule auto``: "share" when SAM's gain over SGD exceeds this many seed stds.
AUTO_GAIN_STDS = 2.0


class UsageError(ValueError):
    """A bad argument: the command prints it and exits 2."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effsam frontier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help=f"compare or train config ({DEFAULT_CONFIG})")
    p.add_argument("--data-dir", default=None, help="where the data set is")
    p.add_argument(
        "--methods",
        default=None,
        help=f"registry names, comma-separated (default {','.join(DEFAULT_METHODS)}); SGD and "
        "SAM are always added",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="the seeds a verdict that keeps SAM's accuracy needs (SGD and SAM run all of "
        "them; default 0,1,2,3,4); the first three (or all, if fewer) are every method's",
    )
    p.add_argument("--rule", choices=("auto", "share", "std"), default="auto")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run, e.g. --set data.train_subset=2000",
    )
    p.add_argument("--equal-time", action="store_true", help="+ the runs at SAM's training time")
    p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder (default runs)")
    p.add_argument("--name", default=None, help="the folder's name (default frontier_<config>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in this many processes at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--speeds", type=Path, default=None, help="a throughput JSON to use instead")
    p.add_argument("--report-only", action="store_true", help="no training: report what finished")
    p.add_argument("--check-stale", action="store_true", help="replay each run's first epoch")
    p.add_argument("--rerun-stale", action="store_true", help="... and train the stale ones again")
    p.add_argument("--quiet", action="store_true", help="no per-epoch output from the runs")
    return p


def _seeds(text: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if text is None:
        return BASE_SEEDS, FULL_SEEDS
    try:
        full = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected integers separated by commas") from None
    if len(full) < 2 or len(set(full)) != len(full) or any(s < 0 for s in full):
        raise UsageError(f"--seeds {text!r}: at least two distinct seeds >= 0")
    return full[: min(3, len(full))], full


def _methods(text: str | None) -> list[str]:
    from ..optim.registry import REGISTRY

    names = list(DEFAULT_METHODS) if text is None else [m.strip() for m in text.split(",")]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown} (effsam list shows the registry)")
    for ref in ("sam", "sgd"):
        if ref not in names:
            names.insert(0, ref)
    return list(dict.fromkeys(names))


def measure_speeds(proto: Protocol, methods: list[str], threads: int) -> dict[str, Any]:
    """Each method's step time on the config's model and batch, side by side (interleaved
    rounds in one process), as the throughput benchmark's JSON rows."""
    import torch

    from ..bench.throughput import SHARES, Workload, ratios, run
    from ..train.build import load_data

    cfg = proto.load()
    data = load_data(cfg)
    workload = Workload(
        model_name=cfg.model.name,
        width=cfg.model.width,
        batch_size=cfg.data.batch_size,
        num_classes=data.num_classes,
        image_shape=tuple(data.train_x.shape[1:]),
    )
    variants = [m for m in methods if m not in SHARES or m in ("rst", "ae-sam", "sam-late")]
    torch.set_num_threads(threads)
    stats = run(variants, workload, rounds=5, steps_per_round=3, warmup=2)
    rows = []
    for name, s in stats.items():
        step = statistics.median(s.amortised)
        rows.append(
            {
                "variant": name,
                "step_ms": step * 1e3,
                "vs_sam": ratios(stats, name, "sam"),
                "vs_sgd": ratios(stats, name, "sgd"),
            }
        )
    return {"workload": workload.__dict__, "threads": threads, "rows": rows}


def auto_rule(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """("share" or "std", why), from SGD's and SAM's rows alone."""
    by = {r["optimizer"]: r for r in rows}
    sgd, sam = by.get("sgd"), by.get("sam")
    if not (sgd and sam and sgd["acc"] is not None and sam["acc"] is not None):
        return "std", "SGD and SAM have not both finished: the seed-std criterion"
    gain = 100 * (sam["acc"] - sgd["acc"])
    noise = 100 * max(sgd["acc_std"] or 0.0, sam["acc_std"] or 0.0)
    if gain > AUTO_GAIN_STDS * noise and gain > 0:
        return "share", f"SAM's gain {gain:+.2f} points > {AUTO_GAIN_STDS:g} x seed std {noise:.2f}"
    return "std", f"SAM's gain {gain:+.2f} points <= {AUTO_GAIN_STDS:g} x seed std {noise:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args, argv)
    except UsageError as exc:
        print(f"effsam frontier: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from ..train.configs import find_config

    if args.jobs < 1 or args.threads < 1:
        raise UsageError("--jobs and --threads must be >= 1")
    if args.rerun_stale and args.report_only:
        raise UsageError("--rerun-stale trains: not with --report-only")
    config = find_config(args.config or DEFAULT_CONFIG)
    if not Path(config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    base, full = _seeds(args.seeds)
    methods = _methods(args.methods)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    proto = Protocol("frontier", Path(config), ".", "std", None, methods, base, full,
                     list(args.set), args.epochs)  # fmt: skip
    try:
        cfg = proto.load()
    except Exception as exc:  # the config loader's own message names the problem
        raise UsageError(f"--config {config}: {exc}") from None
    proto.key = proto.name
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    folder = args.out / (args.name or f"frontier_{proto.name}")
    args.work = folder
    args.only = None
    args.smoke = False
    args.quiet_report = False
    speeds_path = args.speeds or folder / "speeds.json"
    if speeds_path.exists():
        throughput = json.loads(speeds_path.read_text())
        source = f"measured on {cfg.model.name} at batch {cfg.data.batch_size}"
    elif args.report_only:
        throughput, source = None, None
    else:
        print(f"frontier: measuring the speeds side by side ({', '.join(methods)})", flush=True)
        throughput = measure_speeds(proto, methods, args.threads)
        folder.mkdir(parents=True, exist_ok=True)
        speeds_path.write_text(json.dumps(throughput, indent=2) + "\n")
        source = f"measured on {cfg.model.name} at batch {cfg.data.batch_size}"
    head = code_stamp()
    # the criterion, from SGD's and SAM's runs before any other method is judged
    if args.rule == "auto":
        if not args.report_only:
            refs = argparse.Namespace(**{**vars(args), "only": ["sgd", "sam"]})
            train_protocol(refs, proto, throughput, head, [])
        rows = rows_of(_fresh(collect(folder), "protocol"), proto.order())
        proto.rule, proto.note = auto_rule([r for r in rows if r["seeds"]])
    else:
        proto.rule, proto.note = args.rule, "chosen with --rule"
    from .report import speeds_text

    command = "effsam frontier " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    return run_frontier(
        args,
        {proto.key: proto},
        (proto.key,),
        throughput,
        speeds_text(source, speeds_path if throughput is not None else None),
        command,
        folder,
        stems={proto.key: "frontier"},
        summary_stem="frontier-targets",
        summary_title=f"The frontier on {proto.name}: targets",
        head=head,
    )
