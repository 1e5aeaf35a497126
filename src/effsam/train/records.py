"""The files of a run directory: resolved config, environment, per-epoch metrics, summary.

run_dir/
  config.yaml      the resolved config
  env.json         versions, device, threads, world size
  metrics.jsonl    one JSON object per epoch
  metrics.csv      the same, as a table
  summary.json     the final (or latest) results
  checkpoint.pt    the resumable state after the last finished epoch
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Per-epoch fields that measure time; everything else must repeat exactly across a resume.
TIMING_FIELDS = (
    "images_per_s",
    "images_per_s_median",
    "train_time_s",
    "timed_images",
    "timed_steps",
    "eval_time_s",
    "epoch_time_s",
)

METRIC_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "steps",
    "skipped_steps",
    "nonfinite_steps",
    "selected_fraction",
    "kept_fraction",
    "mask_refreshes",
    "sharpness_aware_steps",
    *TIMING_FIELDS,
)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when writing failed


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def environment(device: torch.device, world_size: int, amp: str, compiled: bool) -> dict[str, Any]:
    """Versions, hardware and threading: what a throughput number depends on; and the
    code (``code``: the git commit of effsam's checkout, whether it had uncommitted
    changes, a digest of the package; see :mod:`effsam._provenance`)."""
    from effsam._provenance import code_stamp
    from effsam.environment import environment as machine

    env = machine(device)
    code = code_stamp()
    env.update(
        {
            "torch_interop_threads": torch.get_num_interop_threads(),
            "world_size": world_size,
            "amp": amp,
            "compile": compiled,
            "cuda": torch.version.cuda,
            "code": {k: code[k] for k in ("commit", "dirty", "text", "src")},
        }
    )
    return env


def code_line(run_dirs: list[Path]) -> str:
    """ "Code: ..." for a table of runs: the code each run was (last) launched with, from
    its env.json; one commit for all, or each with its runs."""
    by_code: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        try:
            code = json.loads((Path(run_dir) / "env.json").read_text()).get("code") or {}
        except (OSError, ValueError, AttributeError):
            code = {}
        if code.get("commit"):
            text = f"commit {code['commit']}" + ("+dirty" if code.get("dirty") else "")
        else:
            text = code.get("text") or "not recorded"
        by_code.setdefault(text, []).append(Path(run_dir).name)
    if not by_code:
        return ""
    if len(by_code) == 1:
        return f"Code: {next(iter(by_code))} (each run's env.json)"
    parts = [f"{text} ({', '.join(names)})" for text, names in by_code.items()]
    return "Code: " + "; ".join(parts) + " (each run's env.json)"


def label_noise_record(data: Any) -> dict[str, Any]:
    """The training labels' noise, for a run's summary: ``label_noise`` (0.0 when clean) and,
    with noise, ``label_noise_seed``, ``noisy_samples`` (how many labels were redrawn),
    ``changed_labels`` (how many of those differ from the true one) and
    ``noisy_indices_sha256`` (see :func:`effsam.data.indices_digest`), so that the
    corruption can be recomputed and checked."""
    noise = getattr(data, "label_noise", None)
    return {"label_noise": 0.0} if noise is None else noise.as_dict()


def write_metrics(run_dir: Path, metrics: list[dict[str, Any]]) -> None:
    """Rewrites metrics.jsonl and metrics.csv from the full list (consistent after a resume)."""
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    write_text_atomic(run_dir / "metrics.jsonl", lines)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for m in metrics:
        writer.writerow({k: "" if m.get(k) is None else m.get(k) for k in METRIC_FIELDS})
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(metrics: list[dict[str, Any]], info: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The run's results: final and best accuracy, overall images/s (timed steps only)."""
    last = metrics[-1] if metrics else {}
    timed = sum(m.get("timed_images") or 0 for m in metrics)
    # records written before timed_steps existed: unknown (None), not 0
    timed_steps = (
        sum(m["timed_steps"] for m in metrics)
        if metrics and all("timed_steps" in m for m in metrics)
        else None
    )
    seconds = sum(m.get("train_time_s") or 0.0 for m in metrics)
    medians = [m["images_per_s_median"] for m in metrics if m.get("images_per_s_median")]
    accs = [m["test_acc"] for m in metrics if m.get("test_acc") is not None]
    return {
        **info,
        "epochs": epochs,
        "completed_epochs": len(metrics),
        "finished": len(metrics) >= epochs,
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max(accs) if accs else None,
        "final_test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "images_per_s": timed / seconds if seconds > 0 else None,
        "timed_steps": timed_steps,
        "images_per_s_median": float(np.median(medians)) if medians else None,
        "train_time_s": seconds,
        "wall_time_s": sum(m.get("epoch_time_s") or 0.0 for m in metrics),
        "steps": sum(m.get("steps") or 0 for m in metrics),
        "skipped_steps": sum(m.get("skipped_steps") or 0 for m in metrics),
        "nonfinite_steps": sum(m.get("nonfinite_steps") or 0 for m in metrics),
        "sharpness_aware_fraction": _share(metrics, "sharpness_aware_steps"),
    }


def _share(metrics: list[dict[str, Any]], key: str) -> float | None:
    """``key`` summed over epochs, as a share of all steps (None if never recorded)."""
    steps = sum(m.get("steps") or 0 for m in metrics)
    if not steps or any(m.get(key) is None for m in metrics):
        return None
    return sum(m[key] for m in metrics) / steps
