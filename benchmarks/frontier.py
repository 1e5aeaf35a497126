"""The frontier: which method keeps SAM's accuracy at near-SGD cost, side by side.

    python benchmarks/frontier.py --data-dir DIR --protocol all   # noisy, frontier, augment
    python benchmarks/frontier.py --data-dir DIR --jobs 3          # runs in parallel processes
    python benchmarks/frontier.py --data-dir DIR --equal-time      # + SGD and the cheap methods
                                                                   #   given SAM's training time
    python benchmarks/frontier.py --protocol all --report-only     # reports from the saved runs
    python benchmarks/frontier.py --protocol all --check-stale     # replay each run's first epoch
    python benchmarks/frontier.py --data-dir DIR --rerun-stale     # ... and rerun the stale ones
    python benchmarks/frontier.py --smoke                          # synthetic data, tiny model

Three protocols (configs/compare/), all on the accuracy benchmark's CPU setting (the CIFAR
CNN, a fixed class-balanced subset, the full test set, rho 0.1):

* ``noisy`` (cifar10_cpu_noisy.yaml): the frontier protocol with 30% of the training labels
  replaced by uniformly random classes, where SAM's gain over SGD is ~8 points;
* ``frontier`` (cifar10_cpu_frontier.yaml): 5,000 images without augmentation, 30 epochs,
  every method (SGD, SAM, ESAM, SSAM-F, the schedules, LookSAM, MSAM, K-SAM, ESAM's
  selection variants);
* ``augment`` (cifar10_cpu_augment.yaml): 1,000 augmented images, 150 epochs, until SAM fits
  the training set (ESAM where its paper makes its claim).

``--protocol all`` runs and reports them in that order. The rule (``RULE`` below): a method
keeps SAM's accuracy only if it keeps it on all three protocols. The targets (``TARGETS``)
are printed PASS, FAIL or UNDECIDED (the runs needed are missing) in a cross-protocol
summary, benchmarks/results/frontier-summary-<environment>.md.

Runs, their order and resuming: every run is an ordinary ``effsam compare`` run directory,
written epoch by epoch with a checkpoint. Within a protocol, SGD and SAM (5 seeds) and the
cheap methods (side-by-side speed >= 1.5x SAM's, 3 seeds) run first, then the cheap methods
that keep SAM's accuracy on their 3 seeds get seeds 3 and 4, then the other methods (3
seeds), then those of them that keep it (seeds 3 and 4). Finished runs are reused, partial
ones continue from their checkpoint (or restart, if the checkpoint cannot be read), so an
interrupted benchmark continues where it stopped (``--resume`` says so explicitly; it is
also the default).

Stamps: each run directory gets a ``frontier-stamp.json`` when its training is launched (the
git commit, "+dirty" when src/, configs/ or benchmarks/ hold uncommitted changes, a digest
of src/ and the torch version); a run without one is "commit unknown". ``--check-stale``
replays each saved run's first epoch with the code as it is now and marks a run whose first
epoch differs STALE: stale runs are left out of the verdicts and targets (listed apart), and
``--rerun-stale`` moves them aside and trains them again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from effsam.environment import environment_tag
from effsam.frontier import driver as _driver
from effsam.frontier import rule as _rule
from effsam.frontier.driver import (  # noqa: F401  (the benchmark's names, used by its tests)
    SMOKE_METHODS,
    SMOKE_SEEDS,
    Protocol,
    cheap_methods,
    equal_time_items,
    equal_time_plan,
    protocol_phases,
)
from effsam.frontier.report import (  # noqa: F401
    newest,
    pareto,
    plot,
    runs_section,
    stale_section,
    table,
)
from effsam.frontier.rule import (  # noqa: F401
    BASE_SEEDS,
    CHEAP,
    DIAGNOSIS,
    FULL_SEEDS,
    NOISY_SHARE,
    SCHEDULED,
    STRETCH_SPEED,
    TARGET_SPEED,
    TARGETS,
    apply_speeds,
    beats_sam,
    common_seeds,
    keeps_sam_accuracy,
    method_speeds,
    paired,
    rows_of,
    share_of_gain,
    speed_target,
    t95,
    t_interval,
)
from effsam.frontier.runs import (  # noqa: F401
    STALE_CACHE,
    STAMP,
    _fresh,
    check_stale,
    code_stamp,
    collect,
    fingerprint_diff,
    first_epoch,
    move_aside,
    partial_runs,
    read_stamp,
    replay_first_epoch,
    src_digest,
    stamp_finish,
    stamp_launch,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
#: protocol name -> (config, tag of the result files and the run directory)
PROTOCOLS = {
    "noisy": ("cifar10_cpu_noisy.yaml", "cifar10-noisy"),
    "frontier": ("cifar10_cpu_frontier.yaml", "cifar10"),
    "augment": ("cifar10_cpu_augment.yaml", "cifar10-augment"),
}
#: The three protocols of the rule, in the order ``--protocol all`` runs and reports them:
#: noisy first (SAM's gain is large there, so its verdicts are the most informative).
ALL = ("noisy", "frontier", "augment")
#: Each protocol's criterion (effsam.frontier.rule) and why.
RULES = {"noisy": "share", "frontier": "std", "augment": "std"}
NOTES = {
    "noisy": "SAM's gain ~8 points",
    "frontier": "SAM's gain ~1 point, inside the seed noise",
    "augment": "SAM's gain ~1 point, inside the seed noise",
}
SHARE_PROTOCOLS = tuple(p for p in ALL if RULES[p] == "share")
CONFIG = ROOT / "configs" / "compare" / PROTOCOLS["frontier"][0]  # set by use_protocol()
#: The speeds file's default: the CIFAR CNN at batch 128, one thread (the protocols' runs).
SPEEDS_GLOB = "throughput-cifar_cnn-w1-b128-*1t*.json"


def protocol(key: str, smoke: bool = False) -> Protocol:
    """The benchmark's protocol ``key`` (or the smoke protocol)."""
    if smoke:
        return Protocol("smoke", None, "smoke")
    config, tag = PROTOCOLS[key]
    return Protocol(key, ROOT / "configs" / "compare" / config, tag, RULES[key], NOTES[key])


# The names the benchmark's tests and scripts use, on the protocol use_protocol() chose.
def use_protocol(name: str) -> None:
    """Point the module at a protocol's config."""
    global CONFIG
    CONFIG = ROOT / "configs" / "compare" / PROTOCOLS[name][0]


def _current() -> Protocol:
    key = next(k for k, (c, _) in PROTOCOLS.items() if CONFIG.name == c)
    return protocol(key)


def protocol_name() -> str:
    return _current().name


def protocol_title(smoke: bool) -> str:
    return protocol("smoke", True).title() if smoke else _current().title()


def method_order(smoke: bool) -> list[str]:
    return protocol("smoke", True).order() if smoke else _current().order()


def shared_args_for(*names: str) -> dict[str, Any]:
    return _current().shared_args_for(*names)


def protocol_verdicts(p: str, rows: list[dict[str, Any]], full: int = len(FULL_SEEDS),
                      base: int = len(BASE_SEEDS)) -> dict[str, dict[str, Any]]:  # fmt: skip
    return _rule.protocol_verdicts(p, rows, full, base, RULES.get(p, "std"))


def overall_verdicts(per_protocol, members=None, protocols=ALL):  # noqa: ANN001, ANN201
    return _rule.overall_verdicts(per_protocol, members, protocols)


def equal_time_target(per_protocol, protocols=ALL, labels=None):  # noqa: ANN001, ANN201
    return _rule.equal_time_target(per_protocol, protocols, labels)


def equal_pool(g: dict[str, Any], full: int = len(FULL_SEEDS), base: int = len(BASE_SEEDS)):
    return _driver.equal_pool(g, full, base)


def summarize(gathered: dict[str, dict[str, Any] | None], throughput: dict[str, Any] | None,
              full: int = len(FULL_SEEDS), base: int = len(BASE_SEEDS)) -> dict[str, Any]:  # fmt: skip
    for key, g in gathered.items():
        if g is not None:
            g.setdefault("rule", RULES.get(key, "std"))
            g.setdefault("rules", RULES)
            g.setdefault("notes", NOTES)
    return _driver.summarize(gathered, throughput, full, base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 location (default $EFFSAM_DATA_DIR)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="run directories (default benchmarks/results/frontier-runs: each run's records "
        "are results, kept with the code; its checkpoints are not; with --smoke, "
        "runs/frontier-smoke)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="reports (default benchmarks/results; with --smoke, the --work folder)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs (or replays) in this many processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--protocol",
        choices=[*ALL, "all"],
        default="frontier",
        help="noisy: 30%% of the training labels random; frontier: the CPU accuracy protocol, "
        "every method (default); augment: augmentation, trained until SAM fits the set; all: "
        "the three, in that order",
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted benchmark: finished runs are reused, partial ones "
        "continue from their checkpoint (restart if it cannot be read); also the default",
    )
    p.add_argument(
        "--check-stale",
        action="store_true",
        help="replay the first epoch of each saved run of the selected protocol(s) with the "
        "code now (cached per run and code) and mark the runs whose first epoch differs stale",
    )
    p.add_argument(
        "--rerun-stale",
        action="store_true",
        help="--check-stale, then move the stale runs aside and train them again",
    )
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny model")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--speeds",
        type=Path,
        default=None,
        help=f"throughput JSON of the protocol's model (default: benchmarks/results/"
        f"{SPEEDS_GLOB}, the newest)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        print("frontier: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.rerun_stale and args.report_only:
        print("frontier: --rerun-stale trains: not with --report-only", file=sys.stderr)
        return 2
    if args.work is None:
        args.work = Path("runs") / "frontier-smoke" if args.smoke else RESULTS / "frontier-runs"
    if args.out is None:
        # a smoke run writes only under its --work folder, never into the source tree
        args.out = args.work / "reports" if args.smoke else RESULTS
    if args.smoke:
        protos: dict[str, Protocol | None] = {"smoke": protocol("smoke", True)}
        selected: tuple[str, ...] = ("smoke",)
    else:
        selected = ALL if args.protocol == "all" else (args.protocol,)
        protos = {
            q: protocol(q) if (ROOT / "configs" / "compare" / PROTOCOLS[q][0]).exists() else None
            for q in ALL
        }
        missing = [q for q in selected if protos[q] is None]
        if missing and not args.report_only:
            print(f"frontier: no config for {', '.join(missing)}", file=sys.stderr)
            return 2
        selected = tuple(q for q in selected if q not in missing)
    known = {n for q in selected for n in protos[q].order()}
    unknown = sorted(set(args.only or []) - known)
    if unknown:
        print(
            f"frontier: --only {unknown} not in the protocol ({', '.join(sorted(known))})",
            file=sys.stderr,
        )
        return 2
    speeds_file = args.speeds or newest(RESULTS.glob(SPEEDS_GLOB))
    throughput = None
    if speeds_file is not None and speeds_file.exists() and not args.smoke:
        throughput = json.loads(speeds_file.read_text())
    speeds = (
        _speeds_line(speeds_file)
        if throughput is not None
        else "none measured side by side (run benchmarks/throughput.py --model cifar_cnn "
        "--threads 1 first)"
    )
    env_tag = environment_tag({**_env(), "torch_threads": args.threads})
    command = "python benchmarks/frontier.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    smoke = "smoke-" if args.smoke else ""
    return _driver.run_frontier(
        args,
        protos,
        selected,
        throughput,
        speeds,
        command,
        args.out,
        stems={q: f"frontier-{protos[q].tag}-{env_tag}" for q in selected},
        summary_stem=f"frontier-summary-{smoke}{env_tag}",
        summary_title="The frontier across protocols: which method keeps SAM's accuracy at "
        "near-SGD cost",
        head=code_stamp(),
    )


def _env() -> dict[str, Any]:
    from effsam.environment import environment

    return environment("cpu")


def _speeds_line(path: Path) -> str:
    try:
        shown = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(path)
    return (
        f"side by side from `{shown}` (interleaved rounds in one process on the protocol's "
        "model and batch); scheduled methods priced at their own share of sharpness-aware steps"
    )


if __name__ == "__main__":
    sys.exit(main())
