"""``effsam compare``: several optimizers, same data, model, seeds and budget, one table.

out_dir/<name>/
  config.yaml, env.json
  compare.md, compare.csv   the table (ESAM paper, Table 1 layout)
  compare.json              rows + every run's summary
  compare.png               accuracy against images/s (ESAM paper, Figure 1)
  runs/<label>_s<seed>/     one ordinary run directory per optimizer and seed
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import changed_since, resume_state
from .config import Config, ConfigError, dump_yaml, load_config, load_yaml_text, to_dict
from .distributed import resolve_device
from .loop import RunDiverged, train
from .preflight import preflight
from .progress import format_duration
from .records import code_line, environment, write_json, write_text_atomic
from .report import aggregate, csv_table, markdown_table, plot_accuracy_speed
from .validate import compare_entries, compare_seeds

#: ``effsam compare`` without ``--config``: the config defaults (digits, small CNN, SGD vs
#: SAM vs ESAM) plus these values.
DEFAULT_COMPARE: dict[str, Any] = {
    "train": {"epochs": 10},
    "compare": {"optimizers": ["sgd", "sam", "esam"], "seeds": [0, 1, 2]},
}


def builtin_compare_config(
    overrides: dict[str, Any] | None = None, assignments: list[str] | None = None
) -> Config:
    """The config of ``effsam compare`` without ``--config``, with flags and ``--set`` applied.

    Threads follow the toolkit's one policy (:mod:`effsam.train.threads`), as in
    ``effsam train``.
    """
    return load_config(None, overrides, assignments, base=DEFAULT_COMPARE)


def compare_name(cfg: Config) -> str:
    """The comparison's directory name."""
    return cfg.name or f"compare_{cfg.data.dataset}_{cfg.model.name}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


#: One run of a comparison: label, seed, config, directory, and its summary if finished.
PlannedRun = tuple[str, int, Config, Path, "dict[str, Any] | None"]


def plan_compare(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> list[PlannedRun]:
    """Every check of a comparison before its first run, and its runs in order.

    On top of :func:`~effsam.train.preflight.preflight`: each run directory must not hold
    a run (without ``resume`` or ``overwrite``), and with ``resume`` a finished run must
    have the same config and an unfinished one a checkpoint that loads and matches. Used
    by :func:`run_compare` and by ``effsam compare --dry-run``; writes nothing.
    """
    preflight(cfg, compare=True)
    root = Path(cfg.out_dir) / compare_name(cfg)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"invalid comparison directory {str(root)!r} (it is a file)")
    plan: list[PlannedRun] = []
    for seed in compare_seeds(cfg):
        for label, optim in compare_entries(cfg):
            run_name = f"{_slug(label)}_s{seed}"
            run_cfg = dataclasses.replace(cfg, name=run_name, seed=seed, optim=optim)
            run_dir = root / "runs" / run_name
            done = _finished_summary(run_dir, run_cfg) if resume else None
            if done is None:
                resume_state(run_cfg, run_dir, resume, overwrite)
            plan.append((label, seed, run_cfg, run_dir, done))
    return plan


def run_compare(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    plot: bool = True,
) -> dict[str, Any]:
    """Trains every optimizer of ``cfg.compare`` for every seed and writes the table.

    Runs go one after another in this process, so they share the machine's state equally;
    a finished run is not repeated with ``resume`` (a partial or failed one continues from
    its checkpoint, and fails again unless what made it fail changed). A run that diverges
    does not end the comparison: it is marked failed in every output.

    Returns:
        ``{"rows": [...], "runs": [...], "dir": str, "markdown": str, "failed": [...]}``,
        ``failed`` naming each failed run with the reason.
    """
    plan = plan_compare(cfg, resume=resume, overwrite=overwrite)
    entries = compare_entries(cfg)
    seeds = compare_seeds(cfg)
    root = Path(cfg.out_dir) / compare_name(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the comparison directory {root}: {exc}") from exc
    write_text_atomic(root / "config.yaml", dump_yaml(cfg))
    env = environment(resolve_device(cfg.train.device), 1, cfg.train.amp, cfg.train.compile)
    write_json(root / "env.json", env)

    runs: list[dict[str, Any]] = []
    total = len(plan)
    trained = 0
    started = time.perf_counter()
    for i, (label, seed, run_cfg, run_dir, done) in enumerate(plan):
        if done is not None:
            runs.append(done)
            continue
        if not quiet:
            left = sum(1 for p in plan[i:] if p[4] is None)
            eta = ""
            if trained:  # the runs differ in cost per step, but not by more than ~2x
                per_run = (time.perf_counter() - started) / trained
                eta = f"; about {format_duration(per_run * left)} left for the comparison"
            print(f"[{i + 1}/{total}] {label} (seed {seed}){eta}", flush=True)
        try:
            summary = train(
                run_cfg,
                run_dir=run_dir,
                resume=resume,
                overwrite=overwrite,
                quiet=quiet,
                label=label,
            )
        except RunDiverged as exc:  # recorded as failed; the other runs go on
            summary = {**exc.summary, "label": label}
            if not quiet:
                print(f"{label} (seed {seed}): failed: {exc}", flush=True)
        runs.append(summary)
        trained += 1
    # each run applies the thread policy to the same model, so they agree
    threads = sorted({r["threads"] for r in runs if "threads" in r})
    if threads:
        env["torch_threads"] = threads[0] if len(threads) == 1 else threads
        write_json(root / "env.json", env)

    rows = aggregate([(label, o.name) for label, o in entries], runs)
    title = describe_comparison(cfg, seeds)
    md = markdown_table(rows, title)
    note = (
        "\nAccuracy: final test accuracy (mean ± std over seeds). Images/s: training steps "
        "only (evaluation and data loading excluded): each run's total images / total step time, "
        "median over seeds.\n"
    )
    code = code_line([p[3] for p in plan])
    if code:
        note += f"\n{code}\n"
    write_text_atomic(root / "compare.md", md + note)
    write_text_atomic(root / "compare.csv", csv_table(rows))
    write_json(
        root / "compare.json",
        {"title": title, "seeds": seeds, "rows": rows, "runs": runs, "config": to_dict(cfg)},
    )
    if plot:
        plot_accuracy_speed(rows, root / "compare.png", title)
    failed = [f"{r['name']}: {r['failed']}" for r in runs if r.get("failed")]
    return {"rows": rows, "runs": runs, "dir": str(root), "markdown": md, "failed": failed}


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def describe_comparison(cfg: Config, seeds: list[int]) -> str:
    """What a comparison ran, for the table's and the plot's title, e.g.
    ``cifar10 (1,000-image subset), resnet18 at width 0.125, 1 epoch, batch 128, seed 0``."""
    d, m = cfg.data, cfg.model
    data = d.dataset
    if d.train_subset is not None:
        data += f" ({d.train_subset:,}-image subset)"
    if d.label_noise:
        data += f", {d.label_noise:.0%} noisy labels"
    model = m.name if m.width == 1 else f"{m.name} at width {m.width:g}"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (
        f"{data}, {model}, {_plural(cfg.train.epochs, 'epoch')}, batch {d.batch_size}, {seed_text}"
    )


def _finished_summary(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config (None: train or continue it)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        if not summary.get("finished") or summary.get("failed"):
            return None  # continued (a failed run fails again, or goes on if e.g. the limit rose)
        saved = load_yaml_text((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"cannot reuse the run {run_dir}: its summary.json or config.yaml cannot be read "
            f"({type(exc).__name__}: {exc}); use --overwrite to train it again"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot reuse the run {run_dir}: its config.yaml is not a mapping")
    changed = changed_since(saved, cfg)
    if changed:
        raise ConfigError(
            f"cannot reuse the finished run {run_dir}: its config differs in "
            f"{', '.join(sorted(changed))} (use --overwrite to train it again)"
        )
    return summary
