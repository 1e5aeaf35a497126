"""How long a run or comparison will take, from a few training steps timed on this machine
(``--dry-run``). Nothing is written; the data are loaded, which also proves they read."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from effsam.step import sharpness_aware_step

from .build import build_model, build_optimizer, load_data, make_loaders, make_loss_fn
from .config import Config, ConfigError
from .distributed import resolve_device
from .progress import format_duration
from .threads import set_threads
from .validate import compare_entries, compare_seeds


def estimate_duration(cfg: Config, *, compare: bool = False, steps: int = 3) -> dict[str, Any]:
    """Times ``steps`` training steps (after one untimed warm-up step) and one evaluation
    batch per optimizer, and scales them to the whole run.

    Returns:
        ``{"runs": [{label, step_s, steps, eval_s, evals, run_s, seeds}], "total_s", "threads"}``.
        The figures leave out data loading, checkpointing and periodic costs such as SSAM's
        mask refreshes; on a shared machine they vary with the load.
    """
    saved_threads = torch.get_num_threads()
    try:
        return _estimate(cfg, compare, steps)
    finally:
        torch.set_num_threads(saved_threads)


def _estimate(cfg: Config, compare: bool, steps: int) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    data = load_data(cfg)
    train_loader, test_loader = make_loaders(cfg, data, 0, 1, device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"invalid data.batch_size: {cfg.data.batch_size} (larger than the "
            f"{train_loader.samples_per_rank} training images with drop_last)"
        )
    t = cfg.train
    entries = compare_entries(cfg) if compare else [(cfg.optim.name, cfg.optim)]
    seeds = len(compare_seeds(cfg)) if compare else 1
    evals = sum(1 for e in range(t.epochs) if (e + 1) % t.eval_every == 0 or e + 1 == t.epochs)
    train_loader.set_epoch(0)
    batches = [train_loader.batch(i, train_loader.indices()) for i in range(min(steps + 1, 4))]
    test_batch = next(iter(test_loader))
    test_batches = len(test_loader)
    runs = []
    for label, optim in entries:
        run_cfg = dataclasses.replace(cfg, optim=optim)
        torch.manual_seed(cfg.seed)
        model = build_model(run_cfg, data.num_classes, data.train_x.shape[1]).to(device)
        threads, _ = set_threads(t.threads, model)  # as the run will
        optimizer = build_optimizer(run_cfg, model, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
        kwargs = {
            "scaler": scaler if scaler.is_enabled() else None,
            "autocast": None if t.amp == "off" else t.amp,
            "accumulation_steps": t.accumulation_steps,
            "clip_grad_norm": t.clip_grad_norm,
        }
        loss_fn = make_loss_fn(t.label_smoothing)
        model.train()
        times = []
        for i in range(steps + 1):
            batch = batches[i % len(batches)]
            _sync(device)
            start = time.perf_counter()
            sharpness_aware_step(model, optimizer, batch, loss_fn, **kwargs)
            _sync(device)
            if i > 0:  # the first step pays one-off costs
                times.append(time.perf_counter() - start)
        step_s = sorted(times)[len(times) // 2]
        model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            model(test_batch[0])
            _sync(device)
            eval_s = (time.perf_counter() - start) * test_batches
        run_s = t.epochs * steps_per_epoch * step_s + evals * eval_s
        runs.append(
            {
                "label": label,
                "step_s": step_s,
                "steps": t.epochs * steps_per_epoch,
                "eval_s": eval_s,
                "evals": evals,
                "run_s": run_s,
                "seeds": seeds,
            }
        )
    total = sum(r["run_s"] * r["seeds"] for r in runs)
    return {"runs": runs, "total_s": total, "threads": threads, "device": str(device)}


def format_estimate(estimate: dict[str, Any]) -> str:
    """The estimate as YAML comment lines (the dry run's output stays valid YAML)."""
    runs = estimate["runs"]
    lines = [
        f"# estimated duration on this machine ({estimate['device']}, "
        f"{estimate['threads']} thread{'s' if estimate['threads'] != 1 else ''}), "
        "from a few timed steps:"
    ]
    width = max(len(r["label"]) for r in runs)
    for r in runs:
        seeds = f" × {r['seeds']} seeds" if r["seeds"] > 1 else ""
        lines.append(
            f"#   {r['label']:<{width}}  {r['steps']:,} step{'s' if r['steps'] != 1 else ''} × "
            f"{_seconds(r['step_s'])} + "
            f"{r['evals']} evaluation{'s' if r['evals'] != 1 else ''} × "
            f"{_seconds(r['eval_s'])} = {format_duration(r['run_s'])} per run{seeds}"
        )
    total = estimate["total_s"]
    lines.append(f"#   total: about {format_duration(total)}" + _scale_note(total))
    return "\n".join(lines) + "\n"


def _seconds(s: float) -> str:
    return f"{s * 1000:.3g} ms" if s < 1 else f"{s:.3g} s"


def _scale_note(total: float) -> str:
    if total > 86400:
        return " (a GPU-scale job: shorten it with --epochs, --width or --train-subset)"
    if total > 4 * 3600:
        return " (hours: consider --epochs, --width or --train-subset for a first look)"
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
