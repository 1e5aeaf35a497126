"""The training loop: one run, readable top to bottom.

setup → data → model → optimizer → schedule → (resume) → for each epoch: train, evaluate,
record, checkpoint → summary. Single process, or data parallel under torchrun.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from effsam.bn import norm_buffers, recompute_bn_stats
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
    LOADED_FROM,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_state,
    gather_rng,
    previous_path,
    save_checkpoint,
    set_rng_state,
)
from .config import Config, ConfigError, dump_yaml
from .epoch import evaluate, train_epoch
from .preflight import ToolkitWarning, preflight
from .progress import RunProgress
from .records import (
    environment,
    label_noise_record,
    summarize,
    write_json,
    write_metrics,
    write_text_atomic,
)
from .threads import set_threads


class RunFailed(RuntimeError):
    """A run stopped because its result cannot be trusted (e.g. most steps were skipped as
    non-finite) or its files cannot be written. The last checkpoint is intact."""


class RunDiverged(RunFailed):
    """A run diverged (non-finite loss or weights, or too many skipped steps): its
    ``summary.json`` says ``failed`` and its last good checkpoint is intact."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


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

    Every check (config, device, output folder, data files, the checkpoint to resume) is
    made before anything is loaded or written: see :func:`effsam.train.preflight.preflight`.

    Args:
        cfg: the run's config.
        run_dir: where the run's files go (default ``out_dir/run_name``).
        resume: continue from the run directory's checkpoint, if there is one.
        overwrite: start afresh even if the run directory holds a run.
        quiet: no progress bars or per-epoch lines.
        stop_after: stop once this many epochs are done, leaving a resumable run (for jobs
            with a time limit; the LR schedule still spans ``train.epochs``).
        label: shown in front of the progress bar.

    Raises:
        ConfigError: a bad config value, device, output folder or checkpoint (nothing done).
        effsam.data.DatasetError: the data are missing or damaged (nothing trained).
        RunFailed: more than ``train.max_skipped_fraction`` of the steps were skipped as
            non-finite, or a checkpoint could not be written; the last checkpoint is intact.
    """
    state = preflight(cfg, run_dir=run_dir, resume=resume, overwrite=overwrite)
    threads = torch.get_num_threads()
    ctx = ddp.setup(cfg.train.device)
    try:
        return _train(cfg, ctx, state, run_dir, resume, overwrite, quiet, stop_after, label)
    finally:
        ddp.cleanup(ctx)
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(
    cfg: Config,
    ctx: ddp.DistContext,
    state: dict[str, Any] | None,
    run_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    stop_after: int | None,
    label: str,
) -> dict[str, Any]:
    t = cfg.train
    device = ctx.device
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.run_name()
    ckpt_path = run_dir / CHECKPOINT_NAME
    if resume and state is None and ctx.is_main and not quiet:
        print(f"effsam: no checkpoint in {run_dir}; starting the run afresh", file=sys.stderr)
    # ---- data: rank 0 downloads first, the others read what it wrote
    _seed_everything(cfg.seed)
    if ctx.is_main or not cfg.data.download:
        data = _user_errors(load_data, cfg)
    ddp.barrier(ctx)
    if not ctx.is_main and cfg.data.download:
        data = _user_errors(load_data, cfg)
    if cfg.data.train_subset is not None and cfg.data.train_subset < data.num_classes:
        warnings.warn(
            f"data.train_subset {cfg.data.train_subset} is smaller than the "
            f"{data.num_classes} classes of {cfg.data.dataset}: some classes are not trained on",
            ToolkitWarning,
            stacklevel=3,
        )
    train_loader, test_loader = make_loaders(cfg, data, ctx.rank, ctx.world_size, device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"invalid data.batch_size: {cfg.data.batch_size} (larger than the "
            f"{train_loader.samples_per_rank} training images per worker with drop_last)"
        )
    model = _user_errors(build_model, cfg, data.num_classes, data.train_x.shape[1]).to(device)

    # ---- the run directory, once the data and the model are built: bad data or a bad
    # model option leave nothing behind, and an --overwrite'd run is kept until then
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # checked before; the file system changed since
            raise ConfigError(f"cannot create the run directory {run_dir}: {exc}") from exc
        if overwrite and not resume:
            # a later --resume must not pick up the replaced run's state
            for old in (CHECKPOINT_NAME, previous_path(CHECKPOINT_NAME).name, "metrics.jsonl",
                        "metrics.csv", "summary.json"):  # fmt: skip
                (run_dir / old).unlink(missing_ok=True)
        _set_aside_damaged(state, ckpt_path)
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    ddp.barrier(ctx)

    # ---- optimizer, schedule, loss
    threads, why_threads = set_threads(t.threads, model)
    if ctx.is_main:
        env = environment(device, ctx.world_size, t.amp, t.compile)
        env["threads_policy"] = why_threads
        write_json(run_dir / "env.json", env)
    optimizer = build_optimizer(cfg, model, steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    loss_fn = make_loss_fn(t.label_smoothing)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout etc. differ per worker, as data do

    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            metrics = list(state["metrics"])
            start_epoch = int(state["epoch"])
            rngs = state["rng"]
            set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            # a checkpoint whose config was edited, or one from another optimizer or model
            raise CheckpointError(
                f"checkpoint {state.get(LOADED_FROM, ckpt_path)} does not fit this run's model "
                f"and optimizer "
                f"({cfg.model.name}, {cfg.optim.name}): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else 'no details'}"
            ) from None

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
        **label_noise_record(data),
        "model": cfg.model.name,
        "seed": cfg.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world_size,
        "device": str(device),
        "threads": threads,
    }
    step_kwargs = {
        "scaler": scaler if scaler.is_enabled() else None,
        "autocast": None if t.amp == "off" else t.amp,
        "accumulation_steps": t.accumulation_steps,
        "clip_grad_norm": t.clip_grad_norm,
        "sync_ascent": t.sync_ascent,
    }
    diagnostics = _sds_diagnostics(cfg, optimizer, data, ctx, quiet)
    untimed = t.timing_warmup_steps  # the first steps of a process pay one-off costs
    last_epoch = t.epochs if stop_after is None else min(t.epochs, stop_after)
    progress = RunProgress(
        (last_epoch - start_epoch) * steps_per_epoch, quiet=quiet or not ctx.is_main, label=label
    )
    progress.write(
        f"{label + ': ' if label else ''}{run_dir}: {cfg.model.name} "
        f"({info['params']:,} parameters) on {cfg.data.dataset} ({len(data.train_y):,} training, "
        f"{len(data.test_y):,} test images), {cfg.optim.name}, {_plural(t.epochs, 'epoch')} "
        f"of {_plural(steps_per_epoch, 'step')}, {device}"
        + (f" × {ctx.world_size} workers" if ctx.world_size > 1 else "")
        + f", {threads} thread{'s' if threads != 1 else ''}"
    )
    if state is not None:
        progress.write(
            f"{label + ': ' if label else ''}resumed from epoch {start_epoch} of {t.epochs} "
            f"({state.get(LOADED_FROM, ckpt_path)})"
        )
        # a run that failed stays failed on resume (unless e.g. --max-skipped was raised)
        diverged = _divergence(metrics, model, t.max_skipped_fraction, t.epochs, cfg.optim.lr)
        if diverged:
            progress.close()
            note = _checkpoint_note(start_epoch, Path(state[LOADED_FROM]), True)
            _fail(run_dir, metrics, info, t.epochs, diverged[0] + note, ctx)

    saved_epoch = start_epoch if state is not None else None
    try:
        for epoch in range(start_epoch, last_epoch):
            epoch_start = time.perf_counter()
            progress.epoch(epoch + 1, t.epochs)
            record, untimed = train_epoch(
                net, optimizer, scheduler, train_loader, loss_fn, step_kwargs, epoch, untimed,
                ctx, progress, diagnostics,
            )  # fmt: skip
            eval_start = time.perf_counter()
            test_loss = test_acc = None
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                _recompute_bn(optimizer, model, train_loader, ctx)  # MSAM: BN statistics at θ
                ddp.broadcast_buffers(model, ctx)  # every worker evaluates the checkpointed model
                test_loss, test_acc = evaluate(eval_net, test_loader, t.amp, ctx, progress)
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
                plot_records(
                    run_dir, f"{label or cfg.optim.name}, seed {cfg.seed}: SDS diagnostics"
                )
            rngs = gather_rng(ctx)  # collective: every worker's generators
            diverged = _divergence(metrics, model, t.max_skipped_fraction, t.epochs, cfg.optim.lr)
            failure, keep = diverged if diverged else (None, True)
            if cfg.checkpoint and keep:
                saved_epoch = epoch + 1
            if failure:
                failure += _checkpoint_note(saved_epoch, ckpt_path, cfg.checkpoint)
            summary = summarize(metrics, info, t.epochs)
            if failure:
                summary.update(finished=False, failed=failure)
            if ctx.is_main:
                ckpt = (
                    checkpoint_state(cfg, model, optimizer, scheduler, scaler, metrics, rngs)
                    if cfg.checkpoint and keep
                    else None
                )
                _write_epoch(run_dir, ckpt_path, ckpt, summary, metrics)
                progress.write(_epoch_line(record, t.epochs, label))
            ddp.barrier(ctx)
            if failure:
                raise RunDiverged(f"{run_dir.name}: {failure}", summary)
    finally:
        progress.close()

    summary = summarize(metrics, info, t.epochs)
    if ctx.is_main:
        _write_files(run_dir, lambda: (write_metrics(run_dir, metrics),
                                       write_json(run_dir / "summary.json", summary)))  # fmt: skip
    return summary


def _recompute_bn(optimizer: Any, model: nn.Module, loader: Any, ctx: ddp.DistContext) -> None:
    """Before an evaluation, when the optimizer asks for it (``recompute_bn_before_eval``,
    e.g. MSAM, whose passes run at a moved point): the BatchNorm running statistics
    recomputed at θ from the training batches of the epoch just trained (at most
    ``bn_recompute_batches``), and averaged over the workers, which all use as many
    batches. The weights, the generators and the training that follows are unchanged."""
    if not getattr(optimizer, "recompute_bn_before_eval", False):
        return
    used = recompute_bn_stats(model, loader, getattr(optimizer, "bn_recompute_batches", None))
    if used and ctx.world_size > 1:
        for buf in norm_buffers(model):
            if buf.is_floating_point():
                ddp.all_reduce(buf, ctx).div_(ctx.world_size)


def _set_aside_damaged(state: dict[str, Any] | None, ckpt_path: Path) -> None:
    """After a resume from the previous checkpoint because the latest is damaged: the damaged
    file moves to ``checkpoint.damaged.pt`` (kept for a look), so that the next checkpoint
    does not keep it as the previous one."""
    if state is None or Path(state.get(LOADED_FROM, ckpt_path)) == ckpt_path:
        return
    if ckpt_path.exists():
        ckpt_path.replace(ckpt_path.with_name(f"{ckpt_path.stem}.damaged{ckpt_path.suffix}"))


def _fail(
    run_dir: Path,
    metrics: list[dict[str, Any]],
    info: dict[str, Any],
    epochs: int,
    failure: str,
    ctx: ddp.DistContext,
) -> None:
    """Records ``failure`` in summary.json (the checkpoint is left as it is) and raises."""
    summary = summarize(metrics, info, epochs)
    summary.update(finished=False, failed=failure)
    if ctx.is_main:
        _write_files(run_dir, lambda: write_json(run_dir / "summary.json", summary))
    raise RunDiverged(f"{run_dir.name}: {failure}", summary)


def _divergence(
    metrics: list[dict[str, Any]], model: nn.Module, limit: float, epochs: int, lr: float
) -> tuple[str, bool] | None:
    """Why the run must stop and whether its state may still be checkpointed, or None; one
    rule for every optimizer:

    * the weights or the BatchNorm statistics are not finite (no checkpoint: the last good
      one stays);
    * a step applied an update from a non-finite loss, as a plain optimizer does (no
      checkpoint either);
    * more than ``limit`` of the steps so far were skipped as non-finite (the
      sharpness-aware optimizers skip such steps and leave the weights finite, so the
      state is checkpointed: a resume with a higher --max-skipped continues from it).
    """
    done = len(metrics)
    hint = f"is optim.lr = {lr:g} too high? it is set with --lr"
    bad, total = _nonfinite_values(model)
    if bad:
        return (
            f"the run diverged and was stopped after epoch {done} of {epochs}: {bad:,} of the "
            f"model's {total:,} weights and statistics are not finite ({hint})",
            False,
        )
    applied = sum(m.get("nonfinite_steps") or 0 for m in metrics)
    if applied:
        return (
            f"the run diverged and was stopped after epoch {done} of {epochs}: "
            f"{_plural(applied, 'training step')} had a non-finite loss and updated the "
            f"weights all the same ({hint})",
            False,
        )
    skipped = _too_many_skipped(metrics, limit, epochs)
    return None if skipped is None else (skipped, True)


def _checkpoint_note(epoch: int | None, path: Path, checkpointing: bool) -> str:
    """Where the run's last good checkpoint is, for a failure message."""
    if not checkpointing:
        return "; no checkpoint is written (--no-checkpoint)"
    if epoch is None:
        return "; no checkpoint was written (the first epoch already diverged)"
    return f"; the last good checkpoint, of epoch {epoch}, is kept in {path}"


def _nonfinite_values(model: nn.Module) -> tuple[int, int]:
    """(non-finite values, all values) over the model's floating-point weights and buffers."""
    bad = total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point() or tensor.is_complex():
            bad += int((~torch.isfinite(tensor.detach())).sum())
            total += tensor.numel()
    return bad, total


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _too_many_skipped(metrics: list[dict[str, Any]], limit: float, epochs: int) -> str | None:
    """Why the run must stop (more than ``limit`` of its steps so far skipped), or None.

    A few skips are tolerated whatever the fraction: an fp16 GradScaler skips its first
    steps while it finds its scale.
    """
    skipped = sum(m.get("skipped_steps") or 0 for m in metrics)
    steps = sum(m.get("steps") or 0 for m in metrics)
    if skipped <= SKIP_GRACE or skipped <= limit * steps:
        return None
    return (
        f"{skipped} of the {steps} training steps so far ({100 * skipped / steps:.0f}%) were "
        f"skipped for non-finite gradients: the run diverged (is optim.lr too high?) and was "
        f"stopped after epoch {len(metrics)} of {epochs}; the "
        f"limit is train.max_skipped_fraction = {limit:g} (--max-skipped)"
    )


#: Skipped steps that never end a run, whatever their fraction (fp16 loss-scale search).
SKIP_GRACE = 3


def _write_epoch(
    run_dir: Path,
    ckpt_path: Path,
    state: dict[str, Any] | None,
    summary: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> None:
    """The checkpoint first, then metrics and summary: a failure leaves the last set whole."""

    def write() -> None:
        if state is not None:
            save_checkpoint(ckpt_path, state)
        write_metrics(run_dir, metrics)
        write_json(run_dir / "summary.json", summary)

    _write_files(run_dir, write)


def _write_files(run_dir: Path, write: Any) -> None:
    try:
        write()
    except CheckpointWriteError as exc:
        raise RunFailed(str(exc)) from None
    except OSError as exc:
        raise RunFailed(
            f"cannot write the run's files in {run_dir}: {exc.strerror or exc} "
            f"({exc.filename or run_dir}); the last checkpoint is intact, continue with --resume"
        ) from None


def _sds_diagnostics(cfg: Config, optimizer: Any, data: Any, ctx: Any, quiet: bool) -> Any:
    """ESAM's selection diagnostics (``train.sds_diagnostics``) for an optimizer that
    selects samples; None otherwise (with a note, so that a comparison of several
    optimizers can switch them on for the ones that select)."""
    every = cfg.train.sds_diagnostics
    if not every:
        return None
    selects = isinstance(optimizer, SharpnessAware) and optimizer.selection.needs_per_sample
    if not selects:
        if ctx.is_main and not quiet:
            print(
                f"effsam: {cfg.optim.name} selects no samples: no SDS diagnostics for this run",
                file=sys.stderr,
            )
        return None
    if ctx.world_size > 1:
        raise ConfigError("train.sds_diagnostics works in a single process only")
    from effsam.analysis.sds import SDSDiagnostics

    return SDSDiagnostics(
        data.train_x.shape[0],
        optimizer.selection.gamma,
        optimizer.defaults["rho"],
        every,
        seed=cfg.seed,
    )


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


def _loss(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


def _epoch_line(record: dict[str, Any], epochs: int, label: str) -> str:
    ips = record["images_per_s"]
    skipped = record["skipped_steps"]
    return (
        f"{label + '  ' if label else ''}epoch {record['epoch']:>3}/{epochs}  "
        f"lr {record['lr']:.4g}  train loss {_loss(record['train_loss'])} "
        f"acc {100 * record['train_acc']:.2f}%  "
        + (
            f"test loss {_loss(record['test_loss'])} acc {100 * record['test_acc']:.2f}%  "
            if record["test_acc"] is not None
            else ""
        )
        + f"{'-' if ips is None else f'{ips:,.0f}'} img/s"
        + (f"  ({skipped} of {_plural(record['steps'], 'step')} skipped)" if skipped else "")
    )
