"""The ``effsam`` command: ``compare``, ``train``, ``analyze`` and ``list``.

Every option is a config key (see :mod:`effsam.train.config`). Precedence, lowest first:
defaults, ``--config FILE``, explicit flags, ``--set key=value`` (any key, e.g.
``--set optim.args.beta=0.5``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config


def _or_text(kind: type) -> Any:
    """A flag type that passes text it cannot read on unchanged, so that the config check
    reports the value in one line (``invalid data.label_noise: 'abc' (expected a number)``)
    rather than argparse's usage block."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


# (flag, config key, type or "flag", help); type "flag" is a store_true switch
_COMMON_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "data.dataset", str, "digits, synthetic, cifar10, cifar100, imagefolder"),
    ("--data-dir", "data.data_dir", str, "data root (default $EFFSAM_DATA_DIR, then ./data)"),
    ("--download", "data.download", "flag", "download CIFAR if it is missing"),
    ("--allow-unverified", "data.allow_unverified", "flag", "skip CIFAR checksum checks"),
    ("--train-subset", "data.train_subset", int, "train on a class-balanced subset of N images"),
    ("--subset-seed", "data.subset_seed", int, "seed of the subset (default: the run's seed)"),
    (
        "--label-noise",
        "data.label_noise",
        _or_text(float),
        "replace the labels of this fraction of training images by uniformly random classes",
    ),
    (
        "--label-noise-seed",
        "data.label_noise_seed",
        _or_text(int),
        "seed of the label noise (default 0, the same for every run's seed)",
    ),
    ("--image-size", "data.image_size", int, "image side for imagefolder data"),
    ("--batch-size", "data.batch_size", int, "training batch size per worker"),
    ("--augment", "data.augment", str, "none, flip or cifar (default: the data set's own)"),
    ("--cutout", "data.cutout", int, "Cutout square side (0 = off)"),
    ("--model", "model.name", str, "model name (see `effsam list`)"),
    ("--width", "model.width", float, "channel-width multiplier"),
    ("--base", "optim.base", str, "base optimizer: sgd, adamw, adam"),
    ("--lr", "optim.lr", float, "peak learning rate"),
    ("--momentum", "optim.momentum", float, "SGD momentum"),
    ("--nesterov", "optim.nesterov", "flag", "Nesterov momentum"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay"),
    ("--rho", "optim.args.rho", float, "neighbourhood radius ρ"),
    ("--beta", "optim.args.beta", float, "ESAM SWP keep probability β"),
    ("--gamma", "optim.args.gamma", float, "ESAM SDS selection ratio γ"),
    ("--sparsity", "optim.args.sparsity", float, "SSAM sparsity s"),
    ("--epochs", "train.epochs", int, "training epochs"),
    ("--eval-every", "train.eval_every", int, "evaluate every N epochs (and after the last)"),
    ("--schedule", "train.schedule", str, "cosine or constant (per step)"),
    ("--warmup-epochs", "train.warmup_epochs", float, "linear LR warm-up"),
    ("--label-smoothing", "train.label_smoothing", float, "label smoothing of the loss"),
    ("--amp", "train.amp", str, "mixed precision: off, bf16, fp16"),
    ("--accumulation-steps", "train.accumulation_steps", int, "micro-batches per step"),
    ("--clip-grad-norm", "train.clip_grad_norm", float, "clip the update's gradient norm"),
    ("--sync-ascent", "train.sync_ascent", "flag", "data parallel: all-reduce pass 1"),
    ("--compile", "train.compile", "flag", "torch.compile the model"),
    ("--device", "train.device", str, "auto, cpu, cuda, cuda:N"),
    ("--threads", "train.threads", int, "torch CPU threads (default: one per free core)"),
    (
        "--max-skipped",
        "train.max_skipped_fraction",
        float,
        "stop a run once more than this fraction of its steps were skipped (default 0.1)",
    ),
    ("--name", "name", str, "run (or comparison) directory name"),
    ("--out", "out_dir", str, "parent directory of runs (default ./runs)"),
]


_PRECEDENCE = (
    "Config values, lowest precedence first: defaults, --config FILE, explicit flags, "
    "--set key=value. See docs/toolkit.md."
)


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"seeds must be integers like 0,1,2: {text!r}") from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (may `extends:` another)")
    p.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set optim.args.beta=0.5 (repeatable)",
    )
    group = p.add_argument_group("config keys")
    for flag, key, kind, text in _COMMON_FLAGS:
        if kind == "flag":
            group.add_argument(
                flag, dest=key, action="store_true", default=None, help=f"{text} [{key}]"
            )
        else:
            metavar = flag.lstrip("-").upper().replace("-", "_")
            group.add_argument(
                flag, dest=key, type=kind, default=None, metavar=metavar, help=f"{text} [{key}]"
            )
    group.add_argument("--seed", dest="seed", type=int, default=None, help="random seed [seed]")
    group.add_argument(
        "--no-checkpoint", dest="checkpoint", action="store_false", default=None,
        help="do not save a checkpoint every epoch",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate everything, print the resolved config and an estimate of the duration "
        "from a few timed steps, and exit (writes nothing)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``effsam`` command."""
    parser = argparse.ArgumentParser(
        prog="effsam",
        description="Train with SGD, SAM, ESAM, SSAM and compare their accuracy and speed.",
        epilog=_PRECEDENCE,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        epilog=_PRECEDENCE,
        help="train several optimizers on the same budget and print a table",
        description="Train several optimizers (default SGD, SAM, ESAM) on the same data, model, "
        "seeds and budget; write a table (Markdown, CSV), a JSON summary and a plot. Without "
        "--config: scikit-learn's digits, a small CNN, 10 epochs, seeds 0,1,2.",
    )
    _add_common(c)
    c.add_argument(
        "--optimizers", dest="compare.optimizers", type=_list, default=None,
        help="comma-separated optimizer names, e.g. sgd,sam,esam [compare.optimizers]",
    )  # fmt: skip
    c.add_argument(
        "--seeds", dest="compare.seeds", type=_seeds, default=None,
        help="comma-separated seeds, e.g. 0,1,2 [compare.seeds]",
    )  # fmt: skip
    c.add_argument("--resume", action="store_true", help="reuse finished runs, resume others")
    c.add_argument("--no-plot", action="store_true", help="skip the PNG plot")

    t = sub.add_parser(
        "train", help="one training run from a config and overrides", epilog=_PRECEDENCE
    )
    _add_common(t)
    t.add_argument(
        "--optimizer", dest="optim.name", default=None, help="optimizer name [optim.name]"
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue the run from its checkpoint (the config's run directory, or RUN_DIR, "
        "whose config.yaml is used when no --config is given)",
    )
    t.add_argument(
        "--stop-after", type=int, default=None, metavar="EPOCHS",
        help="stop once this many epochs are done, leaving a resumable run",
    )  # fmt: skip
    a = sub.add_parser(
        "analyze",
        help="Hessian sharpness and loss landscape of a trained run",
        description="Load a run's config and checkpoint and measure, on training batches "
        "without augmentation: the Hessian's top eigenvalue and trace, and a loss landscape "
        "along filter-normalised random directions. Writes analysis.json and landscape.png. "
        "See docs/analysis.md.",
    )
    a.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    a.add_argument(
        "--batches", type=_positive, default=1, metavar="N", help="training batches (default 1)"
    )
    a.add_argument("--landscape", choices=("1d", "2d", "none"), default="1d", help="default 1d")
    a.add_argument("--out", type=Path, default=None, metavar="DIR", help="default RUN_DIR")
    a.add_argument("--quiet", action="store_true", help="no progress lines")
    sub.add_parser("list", help="list data sets, models, optimizers and configs")
    sub.add_parser(
        "frontier",
        add_help=False,
        help="SGD, SAM and the efficient methods on your config: does a cheaper method keep "
        "SAM's accuracy, and at what speed (effsam frontier --help)",
    )
    return parser


def _version() -> str:
    import platform

    from effsam import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = "missing"
    return f"effsam {__version__} (torch {torch_version}, Python {platform.python_version()})"


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config: defaults ← --config ← flags ← --set."""
    from .config import load_config
    from .configs import find_config

    overrides = {
        key: value
        for key, value in vars(args).items()
        if value is not None and ("." in key or key in ("seed", "name", "out_dir", "checkpoint"))
    }
    config_path = args.config
    resume_dir = getattr(args, "resume", None)
    if config_path is None and isinstance(resume_dir, str) and resume_dir:
        from .config import ConfigError

        run_dir = Path(resume_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {resume_dir}: run directory not found")
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"--resume {resume_dir}: not a run directory (no config.yaml)")
    elif config_path is not None:
        config_path = find_config(config_path)
    if args.command == "compare" and config_path is None:
        from .compare import builtin_compare_config

        return builtin_compare_config(overrides, args.assignments)
    return load_config(config_path, overrides, args.assignments)


def _cmd_list() -> int:
    from effsam.data import DATASETS
    from effsam.models import MODELS
    from effsam.optim import available_optimizers, get_spec

    print("data sets:  " + ", ".join(DATASETS))
    print("models:     " + ", ".join(MODELS))
    print("optimizers:")
    for name in available_optimizers():
        spec = get_spec(name)
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(f"  {name:<13} {spec.description}{f'  ({defaults})' if defaults else ''}")
    from .configs import packaged_configs

    for title, root in (("here, in configs/", Path("configs")), ("shipped", packaged_configs())):
        if root is None or not root.is_dir():
            continue
        print(f"configs ({title}; pass --config configs/<folder>/<name>.yaml):")
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "_"):
            names = sorted(f.stem for f in folder.glob("*.yaml") if not f.name.startswith("_"))
            if names:
                print(f"  {folder.name}/: {', '.join(names)}")
        break  # the local folder, else the copy shipped with the package
    return 0


def _cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from .loop import train

    run_dir = Path(args.resume) if args.resume else None
    s = train(
        cfg,
        run_dir=run_dir,
        resume=args.resume is not None,
        overwrite=args.overwrite,
        quiet=args.quiet,
        stop_after=args.stop_after,
    )
    if s.get("world_size", 1) > 1 and _rank() != 0:
        return 0
    state = "finished" if s["finished"] else f"stopped after epoch {s['completed_epochs']}"
    steps = f"{s['steps']} step{'s' if s['steps'] != 1 else ''}"
    skipped = f", {s['skipped_steps']} of {steps} skipped" if s["skipped_steps"] else ""
    if s["images_per_s"] is None:
        warmup = cfg.train.timing_warmup_steps
        rate = (
            f"speed not measured (too few steps: the first {warmup} "
            f"{'is' if warmup == 1 else 'are'} untimed warm-up)"
        )
    else:
        rate = f"{_rate(s['images_per_s'])} images/s"
    print(
        f"{s['name']}: {state}; test accuracy {_percent(s['final_test_acc'])} "
        f"(best {_percent(s['best_test_acc'])}), {rate}{skipped}"
    )
    return 0


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _cmd_compare(args: argparse.Namespace, cfg: Config) -> int:
    from .compare import run_compare

    result = run_compare(
        cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, plot=not args.no_plot
    )
    print()
    print(result["markdown"])
    files = "compare.md, compare.csv, compare.json" + ("" if args.no_plot else ", compare.png")
    print(f"written to {result['dir']}: {files}")
    failed = result["failed"]
    if failed:
        names = ", ".join(f.split(":", 1)[0] for f in failed)
        print(
            f"effsam compare: error: {len(failed)} of {len(result['runs'])} "
            f"run{'s' if len(result['runs']) != 1 else ''} failed: "
            f"{names} (marked in the table; the reasons are listed under it)",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_run

    r = analyze_run(
        args.run_dir,
        batches=args.batches,
        landscape=args.landscape,
        out_dir=args.out,
        quiet=args.quiet,
    )
    trace = f"{r['hessian_trace']:.4g}"
    if r["hessian_trace_stderr"] is not None:
        trace += f" ± {r['hessian_trace_stderr']:.2g}"
    print(
        f"{r['run']} ({r['optimizer']}, epoch {r['epoch']}/{r['epochs']}): loss {r['loss']:.4f}, "
        f"accuracy {_percent(r['accuracy'])} on {r['samples_analysed']} training images; "
        f"Hessian top eigenvalue {r['hessian_top_eigenvalue']:.4g}, trace {trace}"
    )
    files = "analysis.json" + ("" if r["landscape"] is None else ", landscape.png")
    print(f"written to {args.out or args.run_dir}: {files}")
    return 0


def _dry_run(args: argparse.Namespace, cfg: Config) -> int:
    from .config import dump_yaml
    from .estimate import estimate_duration, format_estimate
    from .preflight import preflight

    compare = args.command == "compare"
    if compare:
        from .compare import plan_compare

        plan_compare(cfg, resume=args.resume, overwrite=args.overwrite)
    else:
        run_dir = Path(args.resume) if args.resume else None
        preflight(cfg, run_dir=run_dir, resume=args.resume is not None, overwrite=args.overwrite)
    print(dump_yaml(cfg), end="", flush=True)
    print(format_estimate(estimate_duration(cfg, compare=compare)), end="")
    return 0


class Terminated(Exception):
    """SIGTERM arrived (e.g. ``kill``, a job scheduler's time limit): raised in the main
    thread, so the run stops between two statements and its checkpoint is left intact (a
    checkpoint being written is either complete or not there: writes are atomic)."""


def _on_sigterm() -> Any:
    """Turns SIGTERM into :class:`Terminated` (like Ctrl-C into KeyboardInterrupt) while the
    command runs; returns the previous handler (None where signals cannot be set)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a library call): leave signals alone
        return None


def _resume_advice(args: argparse.Namespace, cfg: Config | None) -> str:
    """Where the checkpoint of an interrupted run is and how to continue it."""
    if cfg is None:  # stopped before the config was read: nothing ran
        return "nothing was started"
    if args.command == "compare":
        from .compare import compare_name

        where = Path(cfg.out_dir) / compare_name(cfg)
        return (
            f"each run's last finished epoch is checkpointed under {where}/runs; continue "
            "with the same command and --resume"
        )
    if not cfg.checkpoint:
        return "no checkpoint is written (--no-checkpoint): the run cannot be continued"
    run_dir = Path(args.resume) if args.resume else Path(cfg.out_dir) / cfg.run_name()
    return (
        f"the last finished epoch is checkpointed in {run_dir / 'checkpoint.pt'}; continue "
        f"with: effsam train --resume {run_dir}"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None, *, command=""):
    """Toolkit warnings as one clean line; others as Python shows them."""
    from .preflight import ToolkitWarning

    if issubclass(category, ToolkitWarning):
        print(f"effsam {command}: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``effsam`` and ``python -m effsam``; returns the exit status.

    Exit status: 0 done; 2 bad input (a config value, device, output folder, data or
    checkpoint: nothing was trained); 1 a run failed (it diverged, or its files could not
    be written; the last checkpoint is intact); 130 interrupted (Ctrl-C, SIGINT); 143
    terminated (SIGTERM).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["frontier"]:  # its own parser and exit statuses
        from effsam.frontier.command import main as frontier_main

        return frontier_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except BrokenPipeError:
        # the reader went away (effsam list | head): not an error of ours; keep Python from
        # complaining again while it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(args: argparse.Namespace) -> int:
    from effsam.data import DatasetError

    from .config import ConfigError
    from .loop import RunFailed

    if args.command == "list":
        return _cmd_list()
    previous = warnings.showwarning
    warnings.showwarning = lambda *a, **k: _show_warning(*a, **k, command=args.command)
    previous_term = _on_sigterm()
    cfg = None
    try:
        if args.command == "analyze":
            return _cmd_analyze(args)
        if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
            raise ConfigError(f"invalid --stop-after: {args.stop_after} (must be >= 1)")
        cfg = config_from_args(args)
        if args.dry_run:
            return _dry_run(args, cfg)
        if args.command == "compare":
            return _cmd_compare(args, cfg)
        return _cmd_train(args, cfg)
    except (ConfigError, DatasetError) as exc:
        print(f"effsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"effsam {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        how, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        if args.command == "analyze":  # writes nothing until it has finished
            print(f"effsam analyze: {how}; nothing was written", file=sys.stderr)
            return status
        print(f"effsam {args.command}: {how}; {_resume_advice(args, cfg)}", file=sys.stderr)
        return status
    finally:
        warnings.showwarning = previous
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
