"""Atomic, ``weights_only``-loadable checkpoints that prove their content, and the
random-number state they carry.

A checkpoint holds only tensors and plain containers (dicts, lists, numbers, strings), so it
loads with ``torch.load(..., weights_only=True)``: no pickled code runs on load.

Every checkpoint carries a SHA-256 digest of its content (each tensor's dtype, shape and
bytes, and every other value), recomputed and compared on load: torch's zip reader does not
check its CRCs, so bytes damaged on disk or in a copy would otherwise load as different
weights. The checkpoint written before the latest one is kept as ``checkpoint.prev.pt``: a
damaged latest checkpoint falls back to it (with a warning) instead of ending the run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import distributed as ddp
from .config import Config, ConfigError, deep_merge, to_dict
from .preflight import ToolkitWarning

CHECKPOINT_NAME = "checkpoint.pt"
#: The checkpoint before the latest one (same directory), the fallback of a damaged latest.
PREVIOUS_NAME = "checkpoint.prev.pt"
#: The key of a checkpoint's content digest (next to the state's own keys).
DIGEST_KEY = "sha256"

#: What every toolkit checkpoint holds (see :func:`checkpoint_state`).
CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "scaler", "metrics", "rng")


class CheckpointError(ConfigError):
    """A checkpoint cannot be read (empty, truncated, not a checkpoint) or does not fit the run."""


class CheckpointWarning(ToolkitWarning):
    """A checkpoint was loaded with a caveat: unverified (no digest), or the previous one
    was loaded because the latest is damaged."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, lost permissions); the previous one is intact."""


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept (``checkpoint.pt`` → ``checkpoint.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Writes ``state`` and its content digest to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed to disk, and the file
    is renamed over ``path`` (``os.replace`` is atomic within one file system): a crash at any
    moment leaves either the previous checkpoint or the new one, never a torn file. With
    ``keep_previous``, the checkpoint being replaced is kept as :func:`previous_path` (a hard
    link where the file system has them, else a copy), so ``path`` exists at every moment.
    """
    path = Path(path)
    if DIGEST_KEY in state:
        raise ValueError(f"a checkpoint's state may not use the key {DIGEST_KEY!r}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    prev_tmp = path.with_name(f".{previous_path(path).name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, DIGEST_KEY: content_digest(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links here (some network and FUSE file systems)
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ...")
        raise CheckpointWriteError(_write_failure(path, exc)) from exc
    finally:
        for leftover in (tmp, prev_tmp):
            if leftover.exists():
                leftover.unlink()
    _fsync_dir(path.parent)


def content_digest(state: Any) -> str:
    """SHA-256 over everything ``state`` holds, as it loads back: for each tensor its dtype,
    shape and bytes; for every other value its type and exact value; containers in order.

    Two states with the same digest hold the same values (a byte changed anywhere, a tensor
    reshaped or retyped, a key renamed or a number changed gives another digest).
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    def tag(kind: str, text: str = "") -> None:
        data = text.encode("utf-8", "surrogatepass")
        h.update(f"{kind}:{len(data)}:".encode())
        h.update(data)

    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"cannot digest a {t.layout} tensor; checkpoints hold dense tensors")
        t = t.cpu().contiguous()
        tag("tensor", f"{t.dtype}{tuple(t.shape)}")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        h.update(struct.pack("<Q", raw.numel()))
        h.update(raw.numpy().tobytes())
    elif isinstance(value, dict):
        tag(type(value).__name__, str(len(value)))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        tag(type(value).__name__, str(len(value)))
        for item in value:
            _feed(h, item)
    elif isinstance(value, float):
        tag("float", value.hex())
    elif value is None or isinstance(value, (bool, int, str)):
        tag(type(value).__name__, str(value))
    elif isinstance(value, bytes):
        tag("bytes", value.hex())
    else:  # torch.dtype, torch.Size, torch.device ...: what weights_only loads beside these
        tag(type(value).__qualname__, repr(value))


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


def load_checkpoint(
    path: str | Path, keys: tuple[str, ...] = (), *, legacy: bool = True
) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU with ``weights_only=True`` and checks its digest.

    Args:
        path: the file.
        keys: entries the checkpoint must hold (a run's: :data:`CHECKPOINT_KEYS`).
        legacy: accept a run checkpoint written before checkpoints carried a digest
            (exactly the :data:`CHECKPOINT_KEYS`, no digest), with a warning that its
            content cannot be verified, so that runs begun with an older effsam resume.
            Any other file without a digest is refused.

    Returns:
        The state as saved (without the digest).

    Raises:
        CheckpointError: naming the file and what is wrong with it (missing, empty,
            truncated, damaged: its content does not match its digest, not a checkpoint, or
            holding objects other than tensors and plain containers, which are refused
            rather than unpickled).
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
    except Exception as exc:  # any failure to decode the bytes means they are damaged
        raise CheckpointError(
            f"checkpoint {path} ({size:,} bytes) cannot be read: it is truncated or damaged "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} is not an effsam run checkpoint: it holds a {type(state).__name__}"
        )
    saved = state.pop(DIGEST_KEY, None)
    if saved is None:
        if not (legacy and set(state) == set(CHECKPOINT_KEYS)):
            raise CheckpointError(
                f"checkpoint {path} has no content digest: it is damaged, or it is not an "
                "effsam checkpoint"
            )
        warnings.warn(
            f"checkpoint {path} was written by an effsam without checkpoint digests: its "
            "content cannot be verified (the next checkpoint of the run will carry one)",
            CheckpointWarning,
            stacklevel=2,
        )
    else:
        try:
            actual = content_digest(state)
        except Exception as exc:  # e.g. a damaged tensor header that still loaded
            actual = f"not computable ({type(exc).__name__})"
        if actual != saved:
            raise CheckpointError(
                f"checkpoint {path} is damaged: its content does not match the digest it was "
                "saved with (bytes changed on disk or in a copy), so it is not loaded. "
                "Restore a copy, or delete it to start the run afresh"
            )
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not an effsam run checkpoint: it lacks {', '.join(missing)}"
        )
    return state


def load_run_checkpoint(
    path: str | Path, keys: tuple[str, ...] = CHECKPOINT_KEYS
) -> tuple[dict[str, Any], Path]:
    """The run checkpoint at ``path``, or, when it cannot be loaded (damaged, truncated,
    empty), the previous one (:func:`previous_path`) if that one loads, with a warning
    saying so.

    Returns:
        The state and the file it came from.

    Raises:
        CheckpointError: ``path`` cannot be loaded and there is no good previous checkpoint
            (the message names both files).
    """
    path = Path(path)
    try:
        return load_checkpoint(path, keys, legacy=True), path
    except CheckpointError as exc:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev, keys, legacy=True)
        except CheckpointError as prev_exc:
            raise CheckpointError(
                f"{exc}; the previous one cannot be used either: {prev_exc}"
            ) from None
        warnings.warn(
            f"{exc}. Using the previous checkpoint {prev} instead (epoch "
            f"{state.get('epoch', '?')}): the epochs after it are trained again",
            CheckpointWarning,
            stacklevel=2,
        )
        return state, prev


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
    prev = previous_path(ckpt)
    if not resume:
        if not overwrite and any(p.exists() for p in (ckpt, prev, run_dir / "metrics.jsonl")):
            raise ConfigError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                "--overwrite to start it afresh, or choose another --name / --out"
            )
        return None
    if not ckpt.exists() and not prev.exists():
        return None
    state, source = load_run_checkpoint(ckpt)
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {source} is not an effsam run checkpoint: bad config")
    state[LOADED_FROM] = str(source)
    changed = changed_since(state["config"], cfg)
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(sorted(changed))}"
        )
    return state


#: Set by :func:`resume_state` on the state it returns: the file it was loaded from.
LOADED_FROM = "loaded_from"


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
