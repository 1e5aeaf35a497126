"""Atomic, ``weights_only``-loadable checkpoints and the random-number state they carry.

A checkpoint holds only tensors and plain containers (dicts, lists, numbers, strings), so it
loads with ``torch.load(..., weights_only=True)``: no pickled code runs on load.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import distributed as ddp
from .config import Config, ConfigError, deep_merge, to_dict

CHECKPOINT_NAME = "checkpoint.pt"

#: What every toolkit checkpoint holds (see :func:`checkpoint_state`).
CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "scaler", "metrics", "rng")


class CheckpointError(ConfigError):
    """A checkpoint cannot be read (empty, truncated, not a checkpoint) or does not fit the run."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, lost permissions); the previous one is intact."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed to disk, and the file
    is renamed over ``path`` (``os.replace`` is atomic within one file system): a crash at any
    moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ...")
        raise CheckpointWriteError(_write_failure(path, exc)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _write_failure(path: Path, exc: BaseException) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
        space = f"{free / 2**20:,.1f} MiB free on that file system"
    except OSError:
        space = "free space unknown"
    previous = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint"
    return (
        f"cannot write the checkpoint {path} ({space}; the disk may be full): {exc}. "
        f"Nothing was lost: {previous}; free space and continue with --resume"
    )


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU with ``weights_only=True``.

    Args:
        path: the file.
        keys: entries the checkpoint must hold (a run's: :data:`CHECKPOINT_KEYS`).

    Raises:
        CheckpointError: naming the file and what is wrong with it (missing, empty,
            truncated, not a checkpoint, or holding objects other than tensors and plain
            containers, which are refused rather than unpickled).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): it was not written completely. Delete it "
            "to start the run afresh, or restore a copy"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running the file's pickled code:
        # never the right fix for a file that should hold tensors only
        raise CheckpointError(
            f"checkpoint {path} is not an effsam checkpoint: it is damaged, or it holds "
            "objects other than tensors and plain containers, which are not loaded for safety"
        ) from None
    except (
        RuntimeError,
        EOFError,
        KeyError,
        ValueError,
        IndexError,  # the weights-only unpickler on some random bytes (its stack underflows)
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
        OSError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} ({size:,} bytes) cannot be read: it is truncated or damaged "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else None
    if missing is None or missing:
        what = f"lacks {', '.join(missing)}" if missing else f"holds a {type(state).__name__}"
        raise CheckpointError(f"checkpoint {path} is not an effsam run checkpoint: it {what}")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"


def rng_state() -> dict[str, Any]:
    """Every random generator a run touches, as tensors and plain numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Config keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "out_dir",
    "data.data_dir",
    "data.download",
    "data.allow_unverified",
    "train.device",
    "train.threads",
    "train.compile",
    "train.timing_warmup_steps",
    "train.max_skipped_fraction",
    "compare.optimizers",  # a comparison may grow; each run's own settings are in optim
    "compare.seeds",
}


def checkpoint_state(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    metrics: list[dict[str, Any]],
    rngs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything a resumed run needs; only tensors and plain containers (weights_only)."""
    return {
        "epoch": len(metrics),
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "metrics": metrics,
        "rng": rngs,
    }


def gather_rng(ctx: ddp.DistContext) -> list[dict[str, Any]]:
    """The random-generator states of all workers, in rank order (on every worker)."""
    rng = rng_state()
    if not ctx.enabled:
        return [rng]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, rng)
    return gathered


def resume_state(
    cfg: Config, run_dir: Path, resume: bool, overwrite: bool
) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: start afresh).

    Raises:
        ConfigError: when a fresh start would overwrite a run (without ``overwrite``), or the
            config differs from the checkpoint's in a key that changes the computation.
    """
    ckpt = run_dir / CHECKPOINT_NAME
    if not resume:
        if not overwrite and (ckpt.exists() or (run_dir / "metrics.jsonl").exists()):
            raise ConfigError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                "--overwrite to start it afresh, or choose another --name / --out"
            )
        return None
    if not ckpt.exists():
        return None
    state = load_checkpoint(ckpt, CHECKPOINT_KEYS)
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {ckpt} is not an effsam run checkpoint: bad config")
    changed = changed_since(state["config"], cfg)
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(sorted(changed))}"
        )
    return state


def changed_since(saved: dict[str, Any], cfg: Config) -> set[str]:
    """The keys that changed the computation between a saved run's config and ``cfg``.

    A key the saved config lacks was added to the schema after that run was made: it ran
    with the key's default (a new key's default keeps the old behaviour), so it counts as
    that default, not as a change.
    """
    full = deep_merge(to_dict(Config()), saved)
    return changed_keys(full, to_dict(cfg)) - RESUMABLE_CHANGES


def changed_keys(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for key in set(old) | set(new):
            out |= changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return set() if old == new else {prefix.rstrip(".")}
