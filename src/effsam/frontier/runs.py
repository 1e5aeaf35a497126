"""The frontier's runs on disk: stamps (the code that trained each run), collecting the
finished runs, partial runs, the stale checks (a run's first epoch replayed with the code as
it is now) and running ``effsam compare`` processes a few at a time.

Every run is an ordinary ``effsam compare`` run directory; :data:`STAMP` records in it the
code each launch used (the git commit when effsam runs from a git checkout, "+dirty" with
uncommitted changes, a digest of the effsam package and the torch version).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._provenance import CHECKOUT, PACKAGE, _git, code_stamp, src_digest  # noqa: F401 (re-exported)

#: The stamp frontier.py writes into a run directory when it launches the run's training.
STAMP = "frontier-stamp.json"
#: The stale checks' results, per run and per code (next to a protocol's runs).
STALE_CACHE = "stale-check.json"
#: First-epoch fields a replay must reproduce (relative tolerance REPLAY_RTOL): the outcome
#: (always compared) and the bookkeeping (compared when both records hold it).
OUTCOME_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc")
BOOKKEEPING_FIELDS = (
    "lr", "steps", "skipped_steps", "sharpness_aware_steps", "selected_fraction",
    "kept_fraction",
)  # fmt: skip
REPLAY_RTOL = 1e-6

# ----------------------------------------------------------------------------- stamps


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_stamp(run_dir: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((Path(run_dir) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def stamp_launch(
    run_dirs: list[Path], protocol: str, stage: str, head: dict[str, Any] | None = None
) -> None:
    """Add a launch (the code now, ``head`` or :func:`code_stamp`; the time) to the stamp of
    each run that is not finished."""
    code = code_stamp() if head is None else head
    entry = {k: code[k] for k in ("text", "commit", "dirty", "src", "torch")}
    entry.update(time=_now(), protocol=protocol, stage=stage)
    for d in run_dirs:
        if _finished(d):
            continue
        d.mkdir(parents=True, exist_ok=True)
        stamp = read_stamp(d) or {"launches": []}
        stamp.setdefault("launches", []).append(entry)
        _write_json(d / STAMP, stamp)


def stamp_finish(run_dirs: list[Path]) -> None:
    """Record the finish time (summary.json's last write) in the stamp of each finished run."""
    for d in run_dirs:
        stamp = read_stamp(d)
        if stamp is None or stamp.get("finished") or not _finished(d):
            continue
        stamp["finished"] = _iso((d / "summary.json").stat().st_mtime)
        _write_json(d / STAMP, stamp)


def run_code(run_dir: Path) -> dict[str, Any]:
    """A run's code: the commit(s) it was launched with ("commit unknown" without a stamp;
    "a, then b" when it was resumed with other code) and its finish time."""
    stamp = read_stamp(run_dir) or {}
    launches = [x for x in stamp.get("launches", []) if isinstance(x, dict)]
    texts: list[str] = []
    for x in launches:
        if x.get("text") and x["text"] not in texts:
            texts.append(x["text"])
    finished = stamp.get("finished")
    if finished is None and (run_dir / "summary.json").exists():
        finished = _iso((run_dir / "summary.json").stat().st_mtime)
    return {
        "text": ", then ".join(texts) if texts else "commit unknown",
        "launches": launches,
        "finished_at": finished,
    }


# ----------------------------------------------------------------------------- collecting


def collect(work: Path) -> list[dict[str, Any]]:
    """Every finished run summary under ``work`` (any stage), with its run directory, code
    and finish time."""
    runs = []
    for path in sorted(work.glob("**/runs/*/summary.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(s, dict) or not s.get("finished"):
            continue
        run_dir = path.parent
        rel = run_dir.relative_to(work)
        s["stage"] = "equal-time" if "equal-time" in rel.parts else "protocol"
        s["run_dir"] = str(run_dir)
        s["run"] = rel.as_posix()
        code = run_code(run_dir)
        s["code"] = code["text"]
        s["launches"] = code["launches"]
        s["finished_at"] = code["finished_at"]
        s.setdefault("code_status", "not checked")
        runs.append(s)
    return runs


def partial_runs(work: Path) -> list[tuple[Path, int]]:
    """Run directories holding an unfinished run, with the epochs it completed."""
    out = []
    for d in sorted(p for p in work.glob("**/runs/*") if p.is_dir()):
        if _finished(d) or not ((d / "checkpoint.pt").exists() or (d / "metrics.jsonl").exists()):
            continue
        try:
            epochs = len([x for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()])
        except OSError:
            epochs = 0
        out.append((d, epochs))
    return out


def move_aside(run_dir: Path, why: str) -> Path:
    """Move a run directory to ``<comparison>/stale/`` (out of the reports' reach)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = run_dir.parent.parent / "stale" / f"{run_dir.name}-{why}-{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, dest)
    return dest


# ----------------------------------------------------------------------------- stale runs


def first_epoch(run_dir: Path) -> dict[str, Any] | None:
    try:
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                return json.loads(line)
    except (OSError, ValueError):
        return None
    return None


def fingerprint(record: dict[str, Any]) -> dict[str, Any]:
    """The first epoch's fields a replay must reproduce."""
    keys = OUTCOME_FIELDS + BOOKKEEPING_FIELDS
    return {k: record[k] for k in keys if record.get(k) is not None}


def fingerprint_diff(saved: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    """The fields that differ beyond REPLAY_RTOL (an outcome field the replay lacks differs;
    a bookkeeping field is compared only when both records hold it)."""
    out = []
    for k, a in fingerprint(saved).items():
        b = replayed.get(k)
        if b is None and k in BOOKKEEPING_FIELDS:
            continue
        if b is None or not math.isclose(a, b, rel_tol=REPLAY_RTOL, abs_tol=1e-12):
            out.append(f"{k} {a:.9g} -> {'missing' if b is None else f'{b:.9g}'}")
    return out


class ReplayError(RuntimeError):
    """A replay could not run (missing data, a config the code no longer reads...)."""


def replay_first_epoch(run: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """Train the run's first epoch again with the code as it is now: its saved config and
    seed, its thread count, into a temporary directory; returns that epoch's record."""
    run_dir = Path(run["run_dir"])
    with tempfile.TemporaryDirectory(prefix="frontier-replay-") as tmp:
        cmd = [
            sys.executable, "-m", "effsam", "train", "--config", str(run_dir / "config.yaml"),
            "--out", tmp, "--name", "replay", "--stop-after", "1",
            "--threads", str(run.get("threads") or 1), "--no-checkpoint", "--quiet",
        ]  # fmt: skip
        if data_dir:
            cmd += ["--data-dir", data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        record = first_epoch(Path(tmp) / "replay")
        if proc.returncode or record is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise ReplayError(tail[-1] if tail else f"exit {proc.returncode}")
        return record


def check_stale(
    runs: list[dict[str, Any]],
    work: Path,
    head: dict[str, Any],
    *,
    check: bool = False,
    replay: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Set each run's ``code_status``: "at HEAD" (its stamp's code is the code now, or its
    first epoch replayed with the code now matches), "stale" (the replay differs), or "not
    checked". Results are cached in ``work``/stale-check.json per run and per code (the
    digest of src/ and the torch version), so a check is made once; with ``check`` the runs
    not in the cache are replayed (``jobs`` at a time). Returns the stale runs."""
    cache_path = work / STALE_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = head["key"]
    todo = []
    for r in runs:
        launches = r.get("launches") or []
        if launches and all(
            x.get("src") == head["src"] and x.get("torch") == head["torch"] for x in launches
        ):
            r["code_status"] = "at HEAD"
            continue
        hit = cache.get(r["run"], {}).get(key)
        if hit:
            r["code_status"] = hit["status"]
            r["stale_diff"] = hit.get("differs", [])
            continue
        r["code_status"] = "not checked"
        if check:
            todo.append(r)
    if todo:
        replay = replay or replay_first_epoch

        def one(r: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            try:
                return r, replay(r)
            except ReplayError as exc:
                return r, exc

        print(f"frontier: replaying the first epoch of {len(todo)} run(s) in {work}")
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(one, todo))
        for r, got in results:
            if isinstance(got, Exception):
                r["code_status"] = f"not checked (replay failed: {got})"
                print(f"frontier: {r['run']}: replay failed: {got}", file=sys.stderr)
                continue
            saved = first_epoch(Path(r["run_dir"])) or {}
            diff = fingerprint_diff(saved, got)
            r["code_status"] = "stale" if diff else "at HEAD"
            r["stale_diff"] = diff
            cache.setdefault(r["run"], {})[key] = {
                "status": r["code_status"],
                "head": head["text"],
                "checked": _now(),
                "saved": fingerprint(saved),
                "replayed": fingerprint(got),
                "differs": diff,
            }
        work.mkdir(parents=True, exist_ok=True)
        _write_json(cache_path, cache)
    return [r for r in runs if r["code_status"] == "stale"]


def run_jobs(
    commands: list[list[str]],
    jobs: int,
    logs: list[Path],
    on_start: Callable[[int], None] | None = None,
    on_end: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Run the commands, ``jobs`` at a time, each logging to its own file; ``on_start(i)``
    just before command i starts, ``on_end(i, exit code)`` once it has ended. Returns the
    exit codes."""
    pending = list(range(len(commands)))
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    codes = [0] * len(commands)
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            if on_start:
                on_start(i)
            logs[i].parent.mkdir(parents=True, exist_ok=True)
            log = logs[i].open("a")
            proc = subprocess.Popen(commands[i], stdout=log, stderr=subprocess.STDOUT)
            running[i] = (proc, log)
        ended = [i for i, (proc, _) in running.items() if proc.poll() is not None]
        if not ended:
            if len(running) == 1:
                next(iter(running.values()))[0].wait()
            else:
                time.sleep(0.5)
            continue
        for i in ended:
            proc, log = running.pop(i)
            log.close()
            codes[i] = proc.returncode
            if on_end:
                on_end(i, proc.returncode)
    return codes


def prepare_partial(work: Path) -> None:
    """Say what an interrupted benchmark left; a partial run whose checkpoint (and the
    previous one kept beside it) cannot be read is moved aside (to be trained afresh), the
    others continue from their checkpoint (or the previous one, as ``--resume`` does)."""
    import warnings

    from effsam.train.checkpoint import CheckpointError, load_run_checkpoint

    for d, epochs in partial_runs(work):
        rel = d.relative_to(work)
        ckpt = d / "checkpoint.pt"
        if not ckpt.exists():
            print(f"frontier: {rel}: {epochs} epoch(s) recorded, no checkpoint: restarts")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said below, in one line
                state, used = load_run_checkpoint(ckpt)
        except CheckpointError as exc:
            dest = move_aside(d, "unreadable")
            print(f"frontier: {rel}: checkpoint unreadable ({exc}); moved to {dest}, restarts")
        else:
            done = state.get("epoch", epochs)
            where = "its checkpoint" if used == ckpt else f"the previous checkpoint ({used.name})"
            print(f"frontier: {rel}: partial, {done} epoch(s) done: resumes from {where}")


def _fresh(runs: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["stage"] == stage and r.get("code_status") != "stale"]


def forget_checks(work: Path, run: str) -> None:
    """Drop a run's cached stale checks (it was moved aside and is trained again)."""
    path = work / STALE_CACHE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if cache.pop(run, None) is not None:
        _write_json(path, cache)
