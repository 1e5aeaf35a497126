"""The training loop: one run, readable top to bottom.

setup → data → model → optimizer → schedule → (resume) → for each epoch: train, evaluate,
record, checkpoint → summary. Single process, or data parallel under torchrun.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from effsam.optim import SharpnessAware

from . import distributed as ddp
from .build import (
    build_model,
    build_optimizer,
    build_scheduler,
    load_data,
    make_loaders,
    make_loss_fn,
)
from .checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_state,
    gather_rng,
    resume_state,
    save_checkpoint,
    set_rng_state,
)
from .config import Config, ConfigError, dump_yaml
from .epoch import evaluate, train_epoch
from .records import environment, summarize, write_json, write_metrics, write_text_atomic
from .validate import validate


def train(
    cfg: Config,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Trains one model as ``cfg`` says and returns the run's summary.

    Args:
        cfg: the run's config (validated here before anything is loaded).
        run_dir: where the run's files go (default ``out_dir/run_name``).
        resume: continue from the run directory's checkpoint, if there is one.
        overwrite: start afresh even if the run directory holds a run.
        quiet: no progress bars or per-epoch lines.
        stop_after: stop once this many epochs are done, leaving a resumable run (for jobs
            with a time limit; the LR schedule still spans ``train.epochs``).
        label: shown in front of the progress bar.
    """
    validate(cfg)
    threads = torch.get_num_threads()
    ctx = ddp.setup(cfg.train.device)
    try:
        return _train(cfg, ctx, run_dir, resume, overwrite, quiet, stop_after, label)
    finally:
        ddp.cleanup(ctx)
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(
    cfg: Config,
    ctx: ddp.DistContext,
    run_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    stop_after: int | None,
    label: str,
) -> dict[str, Any]:
    t = cfg.train
    device = ctx.device
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.run_name()
    ckpt_path = run_dir / CHECKPOINT_NAME
    state = resume_state(cfg, run_dir, resume, overwrite)
    if resume and state is None and ctx.is_main and not quiet:
        print(f"effsam: no checkpoint in {run_dir}; starting the run afresh", file=sys.stderr)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            # a later --resume must not pick up the replaced run's state
            for old in (CHECKPOINT_NAME, "metrics.jsonl", "metrics.csv", "summary.json"):
                (run_dir / old).unlink(missing_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
        env = environment(device, ctx.world_size, t.amp, t.compile)
        write_json(run_dir / "env.json", env)
    ddp.barrier(ctx)

    # ---- data: rank 0 downloads first, the others read what it wrote
    _seed_everything(cfg.seed)
    if ctx.is_main or not cfg.data.download:
        data = _user_errors(load_data, cfg)
    ddp.barrier(ctx)
    if not ctx.is_main and cfg.data.download:
        data = _user_errors(load_data, cfg)
    train_loader, test_loader = make_loaders(cfg, data, ctx.rank, ctx.world_size, device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"invalid data.batch_size: {cfg.data.batch_size} (larger than the "
            f"{train_loader.samples_per_rank} training images per worker with drop_last)"
        )

    # ---- model, optimizer, schedule, loss
    model = _user_errors(build_model, cfg, data.num_classes, data.train_x.shape[1]).to(device)
    optimizer = build_optimizer(cfg, model, steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    loss_fn = make_loss_fn(t.label_smoothing)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout etc. differ per worker, as data do

    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        metrics = list(state["metrics"])
        start_epoch = int(state["epoch"])
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])

    net: nn.Module = model
    if t.compile:
        # (sharpness_aware_step warns once about SWP and compile recompilations)
        net = torch.compile(net)
    eval_net = net
    if ctx.enabled:
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    info = {
        "name": run_dir.name,
        "optimizer": cfg.optim.name,
        "label": label or cfg.optim.name,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world_size,
        "device": str(device),
    }
    step_kwargs = {
        "scaler": scaler if scaler.is_enabled() else None,
        "autocast": None if t.amp == "off" else t.amp,
        "accumulation_steps": t.accumulation_steps,
        "clip_grad_norm": t.clip_grad_norm,
        "sync_ascent": t.sync_ascent,
    }
    diagnostics = None
    selects = isinstance(optimizer, SharpnessAware) and optimizer.selection.needs_per_sample
    if t.sds_diagnostics and selects and ctx.world_size > 1:
        raise ConfigError("train.sds_diagnostics works in a single process only")
    if t.sds_diagnostics and not selects and ctx.is_main and not quiet:
        print(
            f"effsam: {cfg.optim.name} selects no samples: no SDS diagnostics for this run",
            file=sys.stderr,
        )
    if t.sds_diagnostics and selects:
        from effsam.analysis.sds import SDSDiagnostics

        diagnostics = SDSDiagnostics(
            data.train_x.shape[0],
            optimizer.selection.gamma,
            optimizer.defaults["rho"],
            t.sds_diagnostics,
            seed=cfg.seed,
        )
    untimed = t.timing_warmup_steps  # the first steps of a process pay one-off costs
    last_epoch = t.epochs if stop_after is None else min(t.epochs, stop_after)

    for epoch in range(start_epoch, last_epoch):
        epoch_start = time.perf_counter()
        record, untimed = train_epoch(
            net, optimizer, scheduler, train_loader, loss_fn, step_kwargs,
            epoch, t.epochs, untimed, ctx, quiet or not ctx.is_main, label, diagnostics,
        )  # fmt: skip
        eval_start = time.perf_counter()
        test_loss = test_acc = None
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            ddp.broadcast_buffers(model, ctx)  # every worker evaluates the checkpointed model
            test_loss, test_acc = evaluate(eval_net, test_loader, t.amp, ctx)
        record.update(
            epoch=epoch + 1,
            test_loss=test_loss,
            test_acc=test_acc,
            eval_time_s=time.perf_counter() - eval_start,
            epoch_time_s=time.perf_counter() - epoch_start,
        )
        metrics.append(record)
        if diagnostics is not None:
            from effsam.analysis.sds import plot_records, write_record

            write_record(run_dir, epoch + 1, diagnostics.end_epoch())
            plot_records(run_dir, f"{label or cfg.optim.name}, seed {cfg.seed}: SDS diagnostics")
        rngs = gather_rng(ctx)  # collective: every worker's generators
        if ctx.is_main:
            if cfg.checkpoint:
                save_checkpoint(
                    ckpt_path,
                    checkpoint_state(cfg, model, optimizer, scheduler, scaler, metrics, rngs),
                )
            write_metrics(run_dir, metrics)
            write_json(run_dir / "summary.json", summarize(metrics, info, t.epochs))
            if not quiet:
                _print_epoch(record, t.epochs, label)
        ddp.barrier(ctx)

    summary = summarize(metrics, info, t.epochs)
    if ctx.is_main:
        write_metrics(run_dir, metrics)
        write_json(run_dir / "summary.json", summary)
    return summary


def _user_errors(fn: Any, *args: Any) -> Any:
    """Runs a builder, reporting a bad option (ValueError/TypeError) as a config error."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _print_epoch(record: dict[str, Any], epochs: int, label: str) -> None:
    from tqdm.auto import tqdm

    ips = record["images_per_s"]
    tqdm.write(
        f"{label + '  ' if label else ''}epoch {record['epoch']:>3}/{epochs}  "
        f"lr {record['lr']:.4g}  train loss {record['train_loss']:.4f} "
        f"acc {100 * record['train_acc']:.2f}%  "
        + (
            f"test loss {record['test_loss']:.4f} acc {100 * record['test_acc']:.2f}%  "
            if record["test_acc"] is not None
            else ""
        )
        + f"{'-' if ips is None else f'{ips:,.0f}'} img/s"
    )
