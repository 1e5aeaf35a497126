"""The frontier's driver: a protocol (a compare config and its criterion), the runs it
still needs in the order that decides soonest, the equal wall-clock runs, and gathering the
finished runs into rows, verdicts and targets.

Used by ``effsam frontier`` (any config: the user's model and data) and by the project's
benchmark (benchmarks/frontier.py: three CIFAR-10 protocols).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rule import (
    BASE_SEEDS,
    CHEAP,
    FULL_SEEDS,
    SCHEDULED,
    STRETCH_SPEED,
    TARGET_SPEED,
    apply_speeds,
    beats_sam,
    equal_time_target,
    method_speeds,
    overall_verdicts,
    paired,
    protocol_verdicts,
    rows_of,
    speed_target,
)
from .runs import (
    _fresh,
    check_stale,
    collect,
    prepare_partial,
    replay_first_epoch,
    run_jobs,
    stamp_finish,
    stamp_launch,
)

#: The smoke protocol: synthetic data and a tiny CNN, two epochs (tests and a quick look).
SMOKE_ARGS = (
    "--dataset synthetic --model cifar_cnn --width 0.25 --epochs 2 --batch-size 32 "
    "--set data.synthetic_train=64 --set data.synthetic_test=32 "
    "--set train.timing_warmup_steps=1 --set train.eval_every=1"
).split()
SMOKE_METHODS = (
    "sgd", "sam", "sam-late", "sam-interval", "rst", "ae-sam", "looksam", "msam", "ksam",
    "esam", "esam-mix", "esam-random", "esam-wholebatch",
)  # fmt: skip
SMOKE_SEEDS = (0, 1)


@dataclass
class Protocol:
    """A protocol: a compare config (None: the smoke protocol), the criterion it is judged
    by ("share" or "std", :mod:`effsam.frontier.rule`) and why, the tag of its run and
    results directories, and optionally its methods (default: the config's
    ``compare.optimizers``)."""

    key: str
    config: Path | None
    tag: str
    rule: str = "std"
    note: str | None = None
    methods: list[str] | None = None
    base_seeds: tuple[int, ...] = BASE_SEEDS
    full_seeds: tuple[int, ...] = FULL_SEEDS
    #: ``key=value`` settings over the config (``--set``) and the epochs (``--epochs``),
    #: applied to every run
    assignments: list[str] = field(default_factory=list)
    epochs: int | None = None
    _cfg: Any = field(default=None, repr=False, compare=False)

    @property
    def smoke(self) -> bool:
        return self.config is None

    def load(self) -> Any:
        if self._cfg is None and self.config is not None:
            from ..train.config import load_config

            overrides = {} if self.epochs is None else {"train.epochs": self.epochs}
            self._cfg = load_config(self.config, overrides, self.assignments)
        return self._cfg

    @property
    def name(self) -> str:
        """The config's own ``name`` (the directory ``effsam compare`` writes)."""
        if self.smoke:
            return "smoke"
        return self.load().name or Path(self.config).stem

    def title(self) -> str:
        """What ran, from the resolved config: data, model, set size, augmentation, epochs."""
        if self.smoke:
            return "smoke: synthetic data, tiny CNN, 2 epochs"
        cfg = self.load()
        d = cfg.data
        aug = "no augmentation" if d.augment in (None, "none") else f"augmentation {d.augment}"
        noise = getattr(d, "label_noise", 0) or 0
        noise_text = f", {100 * noise:.0f}% of the training labels random" if noise else ""
        size = f"{d.train_subset:,} images" if d.train_subset else "the whole training set"
        return (
            f"{d.dataset.upper().replace('CIFAR', 'CIFAR-')}, {cfg.model.name} (width "
            f"{cfg.model.width:g}), {size}{noise_text}, {aug}, {cfg.train.epochs} epochs"
        )

    def order(self) -> list[str]:
        """The optimizer names in table order."""
        if self.methods is not None:
            return list(self.methods)
        if self.smoke:
            return list(SMOKE_METHODS)
        entries = self.load().compare.optimizers
        return [e["name"] if isinstance(e, dict) else e for e in entries]

    def entry_of(self, name: str) -> Any:
        """The config's compare entry for ``name`` (with its own args), or the bare name."""
        if not self.smoke:
            for entry in self.load().compare.optimizers:
                if isinstance(entry, dict) and entry.get("name") == name:
                    return dict(entry)
        return name

    def label_of(self, name: str) -> str:
        """The label a method's runs carry (its compare entry's, else the name in capitals)."""
        entry = self.entry_of(name)
        return str(entry.get("label", name.upper())) if isinstance(entry, dict) else name.upper()

    def shared_args_for(self, *names: str) -> dict[str, Any]:
        """The config's shared ``optim.args`` that any of the optimizers ``names`` takes."""
        from ..optim.registry import accepted_kwargs

        taken = set().union(*(accepted_kwargs(n) for n in names))
        return {k: v for k, v in self.load().optim.args.items() if k in taken}

    def subset_config(self, names: list[str], path: Path) -> list[str]:
        """Write a config at ``path`` that extends the protocol with only the entries
        ``names`` (their labels and own args kept); returns the ``--set`` that narrows the
        shared args."""
        import yaml

        # relative to the file, so that the run folder can move (it is kept with results)
        parent = os.path.relpath(Path(self.config).resolve(), path.parent.resolve())
        cfg = {
            "extends": parent,
            "compare": {"optimizers": [self.entry_of(n) for n in names]},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return ["--set", "optim.args=" + json.dumps(self.shared_args_for(*names))]

    def seeds(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(every method's seeds, the seeds of SGD, SAM and the methods that claim)."""
        if self.smoke:
            return SMOKE_SEEDS, SMOKE_SEEDS
        return self.base_seeds, self.full_seeds


def compare_command(
    args: argparse.Namespace,
    proto: Protocol,
    seed: int | None,
    work: Path,
    extra: list[str],
    config: Path | None = None,
    methods: list[str] | None = None,
) -> list[str]:
    import sys

    cmd = [sys.executable, "-m", "effsam", "compare"]
    if proto.smoke:
        cmd += [*SMOKE_ARGS, "--optimizers", ",".join(methods or SMOKE_METHODS)]
    else:
        cmd += ["--config", _here(config or proto.config)]
        for a in proto.assignments:
            cmd += ["--set", a]
        if proto.epochs is not None:
            cmd += ["--epochs", str(proto.epochs)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
    if seed is not None:
        cmd += ["--seeds", str(seed)]
    cmd += ["--threads", str(args.threads), "--out", _here(work), "--name", proto.name]
    cmd += ["--resume"]
    cmd += ["--quiet"] if proto.smoke or args.quiet else []
    return cmd + extra


def _here(path: Path | str) -> str:
    """``path`` relative to the working folder when it lies inside it (the runs record the
    paths they were given: relative ones keep a results folder free of one machine's
    layout), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _slug(label: str) -> str:
    from effsam.train.compare import _slug as slug

    return slug(label)


def cheap_methods(
    order: list[str],
    rows: list[dict[str, Any]],
    throughput: dict[str, Any] | None,
) -> set[str]:
    """The methods at >= TARGET_SPEED x SAM's speed side by side (those that can decide
    targets 1 and 2). A scheduled method is priced at its share of sharpness-aware steps in
    ``rows`` (this protocol's first, then the others'); without runs it counts as cheap."""
    if throughput is None:
        return set()
    vs = {r["variant"]: r for r in throughput.get("rows", [])}
    out = set()
    for n in order:
        if n in ("sgd", "sam"):
            continue
        if n in SCHEDULED:
            speed = next((r["speed"] for r in rows if r["optimizer"] == n and r.get("speed")), None)
            if speed is None or speed >= TARGET_SPEED:
                out.add(n)
        elif (vs.get(n) or {}).get("vs_sam", 0) >= TARGET_SPEED:
            out.add(n)
    return out


def protocol_phases(
    order: list[str],
    done: set[tuple[str, int]],
    cheap: set[str],
    claims: set[str],
    base: tuple[int, ...] = BASE_SEEDS,
    full: tuple[int, ...] = FULL_SEEDS,
) -> list[tuple[str, list[tuple[str, int]]]]:
    """A protocol's runs (name, seed) still to make, in phases, in order: SGD and SAM on
    every seed with the cheap methods on the base seeds; the cheap methods that keep SAM's
    accuracy so far (``claims``) on the other seeds; the other methods on the base seeds;
    those of them that keep it so far on the other seeds. Within a phase, seed by seed."""
    refs = [n for n in ("sgd", "sam") if n in order]
    cheap_ = [n for n in order if n in cheap and n not in refs]
    rest = [n for n in order if n not in refs and n not in cheap_]
    extra = [s for s in full if s not in base]
    phases = [
        (
            "SGD, SAM and the cheap methods",
            [(n, s) for s in base for n in refs + cheap_] + [(n, s) for s in extra for n in refs],
        ),
        (
            "more seeds for the cheap methods that keep SAM's accuracy so far",
            [(n, s) for s in extra for n in cheap_ if n in claims],
        ),
        ("the other methods", [(n, s) for s in base for n in rest]),
        (
            "more seeds for the other methods that keep SAM's accuracy so far",
            [(n, s) for s in extra for n in rest if n in claims],
        ),
    ]
    return [(title, [i for i in items if i not in done]) for title, items in phases]


def train_protocol(
    args: argparse.Namespace,
    proto: Protocol,
    throughput: dict[str, Any] | None,
    head: dict[str, Any],
    hints: list[dict[str, Any]],
) -> list[str]:
    """Make a protocol's missing runs, phase by phase (the claims are re-read after each
    phase); returns the failures."""
    p = proto.key
    work = args.work / proto.tag
    order = proto.order()
    only = set(args.only or order)
    base, full = proto.seeds()
    prepare_partial(work)
    attempted: set[tuple[str, int]] = set()
    failures: list[str] = []
    while True:
        runs = collect(work)
        check_stale(runs, work, head)  # cached results only: stale rows make no claims
        done = {(r["optimizer"], r["seed"]) for r in runs if r["stage"] == "protocol"}
        rows = rows_of(_fresh(runs, "protocol"), order)
        apply_speeds(rows, throughput)
        cheap = cheap_methods(order, rows + hints, throughput)
        verdicts = protocol_verdicts(p, rows, len(full), len(base), proto.rule)
        claims = {n for n, v in verdicts.items() if v["provisional"]}
        phases = protocol_phases(order, done | attempted, cheap, claims, base, full)
        phases = [(t, [i for i in items if i[0] in only]) for t, items in phases]
        phase = next(((t, items) for t, items in phases if items), None)
        if phase is None:
            return failures
        title, items = phase
        print(f"frontier: {p}: {title}: {len(items)} run(s)", flush=True)
        attempted |= set(items)
        by_seed: dict[int, list[str]] = {}
        for n, s in items:
            by_seed.setdefault(s, []).append(n)
        cmds, logs, dirs = [], [], []
        for s, names in by_seed.items():
            config, extra = None, []
            if not proto.smoke:
                digest = hashlib.sha1(",".join(names).encode()).hexdigest()[:10]
                config = work / "configs" / f"methods-{digest}.yaml"
                extra = proto.subset_config(names, config)
            cmds.append(compare_command(args, proto, s, work / f"seed{s}", extra, config, names))
            logs.append(work / f"seed{s}.log")
            root = work / f"seed{s}" / proto.name / "runs"
            dirs.append([root / f"{_slug(proto.label_of(n))}_s{s}" for n in names])
        codes = run_jobs(
            cmds,
            args.jobs,
            logs,
            on_start=lambda i, d=dirs: stamp_launch(d[i], p, "protocol", head),
            on_end=lambda i, _, d=dirs: stamp_finish(d[i]),
        )
        for (s, names), code, log in zip(by_seed.items(), codes, logs):
            if code:
                failures.append(f"{p}: seed {s} ({', '.join(names)}): exit {code}; see {log}")


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


def _equal_rows(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Rows of the equal-time runs, labelled with their epochs."""
    return rows_of([dict(r, label=f"{r['label']} @{r['epochs']} ep") for r in runs], order)


def equal_time_items(
    plan: list[tuple[str, str, int]],
    done: set[tuple[str, int, int]],
    refuted: set[tuple[str, int]],
    claims: set[tuple[str, int]],
    base: tuple[int, ...] = BASE_SEEDS,
    full: tuple[int, ...] = FULL_SEEDS,
) -> list[tuple[str, str, int, int]] | None:
    """The next equal-time runs (name, label, epochs, seed): the first seed, in ``full``'s
    order, on which a planned method still needs a run. A method that fell short of SAM on
    a seed (``refuted``) gets no more; past the base seeds only the methods that beat SAM
    on them so far (``claims``) go on. None when nothing is left."""
    for s in full:
        todo = [
            (n, lab, ep, s)
            for n, lab, ep in plan
            if (n, ep, s) not in done
            and (n, ep) not in refuted
            and (s in base or (n, ep) in claims)
        ]
        if todo:
            return todo
    return None


def train_equal_time(
    args: argparse.Namespace,
    proto: Protocol,
    throughput: dict[str, Any] | None,
    head: dict[str, Any],
) -> list[str]:
    """One compare per cheap method and seed at its equal-time epochs: a small config that
    extends the protocol with only that entry (so its own args, e.g. MSAM's rho, stay). Seed
    by seed: every planned method on the first seed, then the next seed for those that have
    not fallen short of SAM on any seed yet (the base seeds, then every seed for those that
    beat SAM on them)."""
    p = proto.key
    work = args.work / proto.tag
    order = proto.order()
    base, full = proto.seeds()
    runs = collect(work)
    check_stale(runs, work, head)
    rows = rows_of(_fresh(runs, "protocol"), order)
    apply_speeds(rows, throughput)
    sam = next((r for r in rows if r["optimizer"] == "sam"), None)
    plan = [
        x for x in equal_time_plan(rows, throughput is not None) if x[0] in (args.only or order)
    ]
    attempted: set[tuple[str, int, int]] = set()
    failures: list[str] = []
    while True:
        runs = collect(work)
        check_stale(runs, work, head)
        done = {
            (r["optimizer"], r["epochs"], r["seed"]) for r in runs if r["stage"] == "equal-time"
        }
        eq = _equal_rows(_fresh(runs, "equal-time"), order)
        claims = {
            (r["optimizer"], r["epochs"]) for r in eq if sam and beats_sam(r, sam)["provisional"]
        }
        # Seed by seed: a method that falls short of SAM on a seed cannot beat it on every
        # seed, so it gets no more seeds; one that is ahead goes on to the base seeds, and
        # one that beats SAM on them so far to every seed.
        refuted = {(r["optimizer"], r["epochs"]) for r in eq
                   if sam and beats_sam(r, sam)["status"] == "does not beat"}  # fmt: skip
        items = equal_time_items(plan, done | attempted, refuted, claims, base, full)
        if not items:
            return failures
        print(f"frontier: {p}: at SAM's training time: {len(items)} run(s)", flush=True)
        attempted |= {(n, ep, s) for n, _, ep, s in items}
        cmds, logs, dirs = [], [], []
        for name, label, epochs, s in items:
            out = work / "equal-time" / f"{label}-{epochs}ep"
            extra = ["--epochs", str(epochs)]
            config = None
            if not proto.smoke:
                # the protocol's shared optim.args narrowed to what this method takes
                # (compare refuses shared args that none of its optimizers takes)
                config = out / "config.yaml"
                extra += proto.subset_config([name], config)
            cmds.append(compare_command(args, proto, s, out / f"seed{s}", extra, config, [name]))
            logs.append(out / f"seed{s}.log")
            dirs.append([out / f"seed{s}" / proto.name / "runs" / f"{_slug(label)}_s{s}"])
        codes = run_jobs(
            cmds,
            args.jobs,
            logs,
            on_start=lambda i, d=dirs: stamp_launch(d[i], p, "equal-time", head),
            on_end=lambda i, _, d=dirs: stamp_finish(d[i]),
        )
        for (name, _, epochs, s), code, log in zip(items, codes, logs):
            if code:
                failures.append(f"{p}: {name} @{epochs} ep seed {s}: exit {code}; see {log}")


def gather(
    args: argparse.Namespace,
    proto: Protocol,
    throughput: dict[str, Any] | None,
    head: dict[str, Any],
    check: bool,
    rules: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A protocol's saved runs, their code status, rows and equal-time rows (``rules`` and
    ``notes``: every protocol's criterion and why, for the report's statement of the rule;
    default, this protocol's)."""
    p = proto.key
    work = args.work / proto.tag
    runs = collect(work)
    for r in runs:
        r["protocol"] = p
    stale = check_stale(
        runs,
        work,
        head,
        check=check,
        replay=lambda r: replay_first_epoch(r, args.data_dir),
        jobs=args.jobs,
    )
    order = proto.order()
    rows = rows_of(_fresh(runs, "protocol"), order)
    apply_speeds(rows, throughput)
    equal = _equal_rows(_fresh(runs, "equal-time"), order)
    apply_speeds(equal, throughput)
    sam = next((r for r in rows if r["optimizer"] == "sam"), None)
    for r in equal:  # equal-time rows compare with SAM at the protocol's epochs
        r["paired"] = paired(r, sam) if sam is not None else None
    return {
        "protocol": p,
        "tag": proto.tag,
        "work": work,
        "config": "smoke" if proto.smoke else _shown(proto.config),
        "title": proto.title(),
        "rule": proto.rule,
        "rules": rules or {p: proto.rule},
        "notes": notes if notes is not None else ({p: proto.note} if proto.note else {}),
        "order": order,
        "labels": {n: proto.label_of(n) for n in order},
        "runs": runs,
        "stale": stale,
        "checked": check,
        "rows": rows,
        "equal": equal,
        "planned": [n for n, _, _ in equal_time_plan(rows, throughput is not None)],
    }


def equal_pool(
    g: dict[str, Any], full: int = len(FULL_SEEDS), base: int = len(BASE_SEEDS)
) -> dict[str, dict[str, Any]]:
    """Target 3 on one protocol: optimizer -> beats_sam, for each method given SAM's time
    (its row with the most seeds) and, once equal-time runs exist, each method that costs
    between SAM and the equal-time bar at its own epochs (conservative for it)."""
    sam = next((r for r in g["rows"] if r["optimizer"] == "sam"), None)
    planned = g.get("planned", [])
    if not g["equal"]:
        return {n: _not_run(n) for n in planned}
    best: dict[str, dict[str, Any]] = {}
    for r in g["equal"]:
        n = r["optimizer"]
        if n not in best or (len(r["seeds"]), r["epochs"]) > (
            len(best[n]["seeds"]),
            best[n]["epochs"],
        ):
            best[n] = r
    pool = {n: beats_sam(r, sam, full, base) for n, r in best.items()}
    for r in g["rows"]:
        if (
            r["optimizer"] not in pool
            and r["optimizer"] != "sam"
            and 1.0 <= (r.get("speed") or 0) < 1 / CHEAP
        ):
            pool[r["optimizer"]] = beats_sam(r, sam, full, base)
    for n in planned:
        pool.setdefault(n, _not_run(n))
    return pool


def _not_run(name: str) -> dict[str, Any]:
    return {"label": name, "deltas": [], "provisional": None, "status": "undecided",
            "reason": "not run at SAM's time"}  # fmt: skip


def summarize(
    gathered: dict[str, dict[str, Any] | None],
    throughput: dict[str, Any] | None,
    full: int = len(FULL_SEEDS),
    base: int = len(BASE_SEEDS),
) -> dict[str, Any]:
    """The verdicts over the protocols and the targets, from each protocol's gathered runs
    (None: its config does not exist)."""
    protocols = tuple(gathered)
    have = {p: g for p, g in gathered.items() if g is not None}
    per = {p: protocol_verdicts(p, g["rows"], full, base, g["rule"]) for p, g in have.items()}
    members = {p: g["order"] for p, g in have.items()}
    overall = overall_verdicts(per, members, protocols)
    speeds = method_speeds({p: g["rows"] for p, g in have.items()}, throughput)
    sgd_speed = speeds.get("sgd")
    eq = {p: equal_pool(g, full, base) for p, g in have.items()}
    labels: dict[str, str] = {}
    for g in have.values():
        for r in g["rows"]:
            labels.setdefault(r["optimizer"], r["label"])
        for n, label in g.get("labels", {}).items():
            labels.setdefault(n, label)
    targets = [
        speed_target(1, TARGET_SPEED, overall, speeds, sgd_speed, labels),
        speed_target(2, STRETCH_SPEED, overall, speeds, sgd_speed, labels),
        equal_time_target(eq, protocols, labels),
    ]
    return {
        "protocols": protocols,
        "per_protocol": per,
        "members": members,
        "overall": overall,
        "speeds": speeds,
        "equal_time": eq,
        "targets": targets,
        "labels": labels,
        "rules": next((g["rules"] for g in have.values()), {}),
        "notes": next((g.get("notes") for g in have.values()), {}),
    }


def _shown(path: Path | None) -> str:
    """A config's path as a report shows it: relative to the working directory when it is
    below it."""
    if path is None:
        return "smoke"
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def run_frontier(
    args: argparse.Namespace,
    protos: dict[str, Protocol | None],
    selected: tuple[str, ...],
    throughput: dict[str, Any] | None,
    speeds: str,
    command: str,
    out: Path,
    stems: dict[str, str],
    summary_stem: str,
    summary_title: str,
    head: dict[str, Any] | None = None,
) -> int:
    """Train what the selected protocols still need (unless ``args.report_only``), then
    write each selected protocol's report (``out/<stems[key]>.md/.json/.png``) and the
    summary over every protocol of ``protos`` (None: its config is missing). ``speeds``:
    the header's line on where the speeds come from; ``head``: the code now (default
    :func:`runs.code_stamp`). Returns 1 when a run failed."""
    import sys

    from ..environment import environment
    from .report import _json_rows, _json_run, header, plot, protocol_report, summary_report
    from .rule import rule_text
    from .runs import code_stamp, forget_checks, move_aside

    have = {k: p for k, p in protos.items() if p is not None}
    rules = {k: p.rule for k, p in have.items()}
    notes = {k: p.note for k, p in have.items() if p.note}
    any_proto = next(iter(have.values()), None)
    base, full = any_proto.seeds() if any_proto is not None else (BASE_SEEDS, FULL_SEEDS)
    head = code_stamp() if head is None else head
    failures: list[str] = []

    def gathered_of(key: str, check: bool) -> dict[str, Any]:
        return gather(args, have[key], throughput, head, check, rules, notes)

    if not args.report_only:
        if args.rerun_stale:
            for q in selected:
                g = gathered_of(q, True)
                for r in g["stale"]:
                    dest = move_aside(Path(r["run_dir"]), "stale")
                    forget_checks(g["work"], r["run"])
                    print(f"frontier: {q}: {r['run']} is stale: moved to {dest}, trained again")
        hints: list[dict[str, Any]] = []  # every protocol's rows: scheduled methods' shares
        for q in have:
            hints += gathered_of(q, False)["rows"]
        for q in selected:
            failures += train_protocol(args, have[q], throughput, head, hints)
        if args.equal_time:
            for q in selected:
                failures += train_equal_time(args, have[q], throughput, head)
    env = environment("cpu")
    env["torch_threads"] = args.threads  # what each run used (the file names say so)
    check = args.check_stale or args.rerun_stale
    gathered: dict[str, dict[str, Any] | None] = {
        q: (gathered_of(q, check and q in selected) if q in have else None) for q in protos
    }
    runs_text = (
        "the runs as they were made (each run's env.json records its threads)"
        if args.report_only
        else f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time"
    )
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for q in selected:
        g = gathered[q]
        if g is None:
            continue
        if not g["runs"]:
            print(f"frontier: {q}: no finished runs in {g['work']}: no report written")
            continue
        stem = stems[q]
        top = header(f"The frontier: {g['title']}", command, head, env, runs_text, speeds,
                     g["config"])  # fmt: skip
        text = protocol_report(g, top, f"{summary_stem}.md", len(full), len(base))
        texts.append(text)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(
            json.dumps(
                {
                    "command": command,
                    "code": head,
                    "environment": env,
                    "protocol": q,
                    "config": g["config"],
                    "rule": rule_text(len(full), len(base), rules, notes),
                    "rows": _json_rows(g["rows"]),
                    "equal_time": _json_rows(g["equal"]),
                    "verdicts": protocol_verdicts(q, g["rows"], len(full), len(base), g["rule"]),
                    "stale": [_json_run(r) for r in g["stale"]],
                    "runs": [_json_run(r) for r in g["runs"]],
                },
                indent=2,
                default=str,
            )
        )
        plot(g["rows"], g["equal"], out / f"{stem}.png", g["title"])
    s = summarize(gathered, throughput, len(full), len(base))
    top = header(summary_title, command, head, env, runs_text, speeds)
    text = summary_report(s, gathered, top, len(full), len(base))
    texts.append(text)
    (out / f"{summary_stem}.md").write_text(text)
    runs = [r for g in gathered.values() if g is not None for r in g["runs"]]
    (out / f"{summary_stem}.json").write_text(
        json.dumps(
            {
                "command": command,
                "code": head,
                "environment": env,
                "rule": rule_text(len(full), len(base), rules, notes),
                "targets": [{"status": st, "text": t} for st, t in s["targets"]],
                "overall": {
                    n: {k: v for k, v in o.items() if k != "cells"} for n, o in s["overall"].items()
                },
                "per_protocol": s["per_protocol"],
                "equal_time": s["equal_time"],
                "speeds": s["speeds"],
                "runs": [
                    _json_run(r) for r in sorted(runs, key=lambda r: r.get("finished_at") or "")
                ],
            },
            indent=2,
            default=str,
        )
    )
    if not getattr(args, "quiet_report", False):
        print("\n\n".join(texts))
    for f in failures:
        print(f"frontier: FAILED {f}", file=sys.stderr)
    return 1 if failures else 0
