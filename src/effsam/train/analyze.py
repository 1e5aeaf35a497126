"""``effsam analyze``: load a run directory, measure its sharpness, write ``analysis.json``.

The run is rebuilt with the toolkit's own functions (config, data, model, checkpoint,
loader, loss), so the analysed loss is exactly the training objective of the run (label
smoothing included) at the checkpointed weights, on training batches without augmentation.
The measurements are :mod:`effsam.analysis`'s, which knows nothing of the toolkit.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from effsam.analysis.evaluation import check_int, check_positive, eval_mode
from effsam.analysis.hessian import hessian_top_eigenvalue, hessian_trace_samples
from effsam.analysis.landscape import loss_landscape_1d, loss_landscape_2d
from effsam.analysis.plot import plot_landscape
from effsam.data import DatasetError

from .build import build_model, load_data, make_loaders, make_loss_fn
from .checkpoint import CHECKPOINT_NAME, load_run_checkpoint
from .config import Config, ConfigError, load_config
from .distributed import resolve_device
from .preflight import check_device, check_out_dir
from .progress import format_duration
from .records import write_json
from .threads import set_threads

__all__ = ["LANDSCAPES", "analyze_run"]

#: Values of ``analyze_run(landscape=...)``.
LANDSCAPES = ("1d", "2d", "none")


def analyze_run(
    run_dir: str | Path,
    *,
    batches: int = 1,
    landscape: str = "1d",
    out_dir: str | Path | None = None,
    iters: int = 20,
    tol: float = 1e-4,
    samples: int = 10,
    steps: int | None = None,
    span: float = 1.0,
    seed: int = 0,
    quiet: bool = True,
) -> dict[str, Any]:
    """Measures the sharpness of a run's checkpointed model and writes the results.

    The first ``batches`` training batches of epoch 0 (the run's own shuffled order and
    per-worker batch size, augmentation and Cutout off) are joined into one batch; in eval mode the
    samples do not interact, so this is the mean loss over all of them. On it: the loss and
    accuracy, the Hessian's top eigenvalue and trace, and a loss landscape.

    Writes ``analysis.json`` and (unless ``landscape="none"``) ``landscape.png`` into
    ``out_dir`` (default: the run directory).

    Args:
        run_dir: A run directory of ``effsam train`` or ``effsam compare``, holding
            ``config.yaml`` and ``checkpoint.pt``.
        batches: Training batches to analyse (≥ 1).
        landscape: ``"1d"``, ``"2d"`` or ``"none"``.
        out_dir: Where the files go.
        iters: Power iterations for the top eigenvalue.
        tol: Relative tolerance of the power iteration.
        samples: Hutchinson samples for the trace.
        steps: Landscape grid points per axis (default 21 in 1D, 11 in 2D).
        span: Landscape half-width, in filter norms.
        seed: Seed of the random vectors and directions.
        quiet: No progress lines (on stderr: one as each stage starts, with its time when
            it ends).

    Returns:
        What ``analysis.json`` holds.

    Raises:
        ValueError: For an invalid option (the message names it).
        ConfigError: If ``run_dir`` holds no config or checkpoint, its model cannot be
            rebuilt from them, or an epoch has fewer than ``batches`` batches.
        effsam.data.DatasetError: If the run's data cannot be loaded.
    """
    # every option is checked before the (possibly slow) loading and measuring starts
    check_int("batches", batches, 1)
    check_int("iters", iters, 1)
    check_positive("tol", tol)
    check_int("samples", samples, 1)
    check_positive("span", span)
    if steps is not None:
        check_int("steps", steps, 2)
    if landscape not in LANDSCAPES:
        raise ValueError(f"landscape must be one of {', '.join(LANDSCAPES)}, got {landscape!r}")
    run_dir = Path(run_dir)
    config_path, ckpt_path = run_dir / "config.yaml", run_dir / CHECKPOINT_NAME
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.yaml")
    if not ckpt_path.is_file() and not ckpt_path.with_suffix(".prev.pt").is_file():
        raise ConfigError(
            f"{run_dir} has no {CHECKPOINT_NAME} (was it trained with --no-checkpoint?)"
        )
    cfg = load_config(config_path)
    check_device(cfg.train.device)
    # where the results go is checked before minutes of Hessian products, not after
    check_out_dir(out_dir if out_dir is not None else run_dir, "--out")
    threads = torch.get_num_threads()
    try:
        return _analyze(
            cfg, run_dir, ckpt_path, batches, landscape, out_dir, iters, tol, samples, steps,
            span, seed, _Stages(quiet),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _analyze(
    cfg: Config,
    run_dir: Path,
    ckpt_path: Path,
    batches: int,
    landscape: str,
    out_dir: str | Path | None,
    iters: int,
    tol: float,
    samples: int,
    steps: int | None,
    span: float,
    seed: int,
    stage: _Stages,
) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    stage(f"loading {run_dir}: {cfg.model.name} on {cfg.data.dataset}")
    state, ckpt_path = load_run_checkpoint(ckpt_path, ("epoch", "model"))
    try:
        data = load_data(cfg)
        model = build_model(cfg, data.num_classes, data.train_x.shape[1]).to(device)
        model.load_state_dict(state["model"])
        set_threads(cfg.train.threads, model)  # the toolkit's one policy
    except DatasetError:
        raise  # (a RuntimeError, but not a config problem)
    except (ValueError, TypeError, RuntimeError) as exc:
        # a config edited or a code change since training: report it, not a traceback
        raise ConfigError(f"cannot rebuild the run in {run_dir}: {exc}") from exc

    bad, total = _nonfinite(model)
    if bad:
        raise ConfigError(
            f"nothing to analyse: {bad:,} of the {total:,} weights and statistics in "
            f"{ckpt_path} (epoch {int(state['epoch'])}) are not finite, so the run diverged "
            "(its summary.json says why); analyse a run that trained"
        )

    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment="none", cutout=0))
    loader, _ = make_loaders(plain, data, 0, 1, device)
    if batches > len(loader):
        raise ConfigError(
            f"--batches {batches} is more than the {len(loader)} training batches of an epoch"
        )
    loader.set_epoch(0)
    order = loader.indices()
    parts = [loader.batch(b, order) for b in range(batches)]
    batch = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    loss_fn = make_loss_fn(cfg.train.label_smoothing)

    with eval_mode(model), torch.no_grad():
        losses, logits = loss_fn(model, batch)
        loss = float(losses.mean())
        accuracy = float((logits.argmax(1) == batch[1]).double().mean())
    n = int(batch[1].numel())
    if not math.isfinite(loss):
        raise ConfigError(
            f"nothing to analyse: the loss of {ckpt_path} (epoch {int(state['epoch'])}) on "
            f"{n:,} training images is {loss}, so the run diverged; analyse a run that trained"
        )
    stage(
        f"Hessian top eigenvalue on {n:,} images (power iteration, up to {iters} step{'s' if iters != 1 else ''})"
    )
    top = hessian_top_eigenvalue(model, batch, loss_fn, iters=iters, tol=tol, seed=seed)
    stage(f"Hessian trace ({samples} Hutchinson samples)")
    traces = hessian_trace_samples(model, batch, loss_fn, samples=samples, seed=seed)
    stderr = float(traces.std() / math.sqrt(samples)) if samples > 1 else None
    if not (math.isfinite(top) and bool(torch.isfinite(traces).all())):
        raise ConfigError(
            f"the Hessian of {ckpt_path} (epoch {int(state['epoch'])}) overflows: top "
            f"eigenvalue {top}, trace samples {traces.tolist()[:3]}…; the loss surface is too "
            "steep to measure (the run was probably diverging). Nothing was written"
        )

    result: dict[str, Any] = {
        "run": run_dir.name,
        "optimizer": cfg.optim.name,
        "seed": cfg.seed,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "epoch": int(state["epoch"]),
        "epochs": cfg.train.epochs,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batches": batches,
        "samples_analysed": int(batch[1].numel()),
        "loss": loss,
        "accuracy": accuracy,
        "hessian_top_eigenvalue": top,
        "hessian_trace": float(traces.mean()),
        "hessian_trace_stderr": stderr,
        "settings": {
            "iters": iters,
            "tol": tol,
            "trace_samples": samples,
            "seed": seed,
            "label_smoothing": cfg.train.label_smoothing,
        },
        "landscape": None,
    }
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    if landscape != "none":
        compute = loss_landscape_1d if landscape == "1d" else loss_landscape_2d
        grid = {} if steps is None else {"steps": steps}
        points = (steps or 21) if landscape == "1d" else (steps or 11) ** 2
        stage(f"{landscape.upper()} loss landscape ({points} points)")
        surface = compute(model, batch, loss_fn, span=span, seed=seed, **grid)
        result["landscape"] = surface.to_dict()
        model_name = cfg.model.name + (f" ×{cfg.model.width:g}" if cfg.model.width != 1 else "")
        title = (
            f"{run_dir.name}: {cfg.optim.name}, epoch {result['epoch']}/{cfg.train.epochs}\n"
            f"{cfg.data.dataset}, {model_name}; loss on {n:,} training images"
        )
        plot_landscape(surface, out / "landscape.png", title=title)
    write_json(out / "analysis.json", result)
    stage(None)
    return result


def _nonfinite(model: torch.nn.Module) -> tuple[int, int]:
    """(non-finite values, all values) over the model's floating-point weights and buffers."""
    bad = total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            bad += int((~torch.isfinite(tensor.detach())).sum())
            total += tensor.numel()
    return bad, total


class _Stages:
    """One stderr line as each stage starts, and its duration once the next one starts."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()
        self.name: str | None = None

    def __call__(self, name: str | None) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if self.name is not None:
            print(f"  ... {format_duration(now - self.start)}", file=sys.stderr, flush=True)
        self.name, self.start = name, now
        if name is not None:
            print(f"effsam analyze: {name}", file=sys.stderr, flush=True)
