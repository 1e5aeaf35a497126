"""The checks of the machine a run needs, made before any work: the device exists, the
output folder can be written, the data are there, the checkpoint to resume can be read.

:func:`preflight` runs them after :func:`~effsam.train.validate.validate` (the config
itself); ``effsam train``, ``effsam compare`` and their ``--dry-run`` all go through it, so
a run that a dry run passes does not fail on any of these later. Each failure is a
:class:`~effsam.train.config.ConfigError` naming the value (exit status 2 on the command
line).
"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .validate import validate


class ToolkitWarning(UserWarning):
    """A setting that works but is probably not what was meant (e.g. fp16 on a CPU)."""


def check_device(name: str, key: str = "train.device") -> None:
    """The device ``name`` (auto, cpu, mps, cuda, cuda:N) exists on this machine."""
    if name in ("auto", "cpu"):
        return
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"invalid {key}: 'mps' (this machine has no MPS device); use cpu")
        return
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible to this torch build"
        )
        raise ConfigError(f"invalid {key}: {name!r} ({why}); use --device cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"invalid {key}: {name!r} (this machine has {count} CUDA device(s))")


def check_out_dir(path: str | Path, key: str = "out_dir") -> None:
    """``path`` is, or can be made, a directory that this process can write to.

    Nothing is left behind: the nearest existing ancestor is probed with a temporary file.
    """
    path = Path(path).expanduser()
    absolute = path.absolute()
    for part in absolute.parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > 255:  # NAME_MAX of most file systems
            raise ConfigError(
                f"invalid {key}: its part {part[:20] + '…' + part[-8:]!r} is {size} bytes long "
                "(a directory name may have at most 255)"
            )
    probe = absolute
    try:
        while not probe.exists():
            if probe.is_symlink():
                raise ConfigError(f"invalid {key}: {str(path)!r} ({probe} is a broken symlink)")
            probe = probe.parent
    except OSError as exc:
        raise ConfigError(f"invalid {key}: {str(path)!r} ({exc.strerror or exc})") from None
    if not probe.is_dir():
        where = "is a file" if probe == absolute else f"is under {probe}, which is a file"
        raise ConfigError(f"invalid {key}: {str(path)!r} ({where}, not a directory)")
    try:
        fd, name = tempfile.mkstemp(prefix=".effsam-write-test-", dir=probe)
    except OSError as exc:
        why = {
            errno.EROFS: "is on a read-only file system",
            errno.EACCES: "is not writable by this user",
            errno.EPERM: "is not writable by this user",
            errno.ENOSPC: "is on a full disk",
        }.get(exc.errno, f"cannot be written: {exc.strerror or exc}")
        if probe == absolute:
            raise ConfigError(f"invalid {key}: {str(path)!r} ({why})") from None
        raise ConfigError(
            f"invalid {key}: {str(path)!r} (cannot be created: {probe} {why})"
        ) from None
    os.close(fd)
    os.unlink(name)


def check_data(cfg: Config) -> None:
    """The files of the data set are where the loader will look (not read or verified:
    loading does that, before any training)."""
    from effsam.data import DatasetNotFoundError
    from effsam.data.cifar import SPECS, _missing_message, find_cifar, resolve_data_dir

    d = cfg.data
    if d.dataset in ("cifar10", "cifar100"):
        root = resolve_data_dir(d.data_dir)
        if find_cifar(d.dataset, root) is None and not d.download:
            raise DatasetNotFoundError(_missing_message(SPECS[d.dataset], d.dataset, root))
    elif d.dataset == "imagefolder":
        root = resolve_data_dir(d.data_dir)
        if not (root / "train").is_dir() or not any((root / s).is_dir() for s in ("val", "test")):
            raise DatasetNotFoundError(
                f"image folder {root} not found: expected {root}/train/<class>/<images> and "
                f"{root}/val/<class>/<images> (set the root with --data-dir)"
            )


def check_precision(cfg: Config) -> None:
    """Warns about fp16 autocast on a CPU: it works but is emulated, tens of times slower."""
    from .distributed import resolve_device

    if cfg.train.amp == "fp16" and resolve_device(cfg.train.device).type == "cpu":
        warnings.warn(
            "train.amp 'fp16' on the CPU runs emulated half-precision kernels, often tens of "
            "times slower than fp32; use --amp bf16 (or off) on a CPU",
            ToolkitWarning,
            stacklevel=4,  # the caller of train() / run_compare()
        )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(cfg: Config) -> None:
    """Warns about ``train.threads`` above the cores this process may use: the threads then
    take turns on the cores, and every step waits for the slowest of them (64 threads on 2
    cores trained the digits CNN about 100 times slower than one thread)."""
    threads, cores = cfg.train.threads, available_cores()
    if threads is not None and threads > cores:
        warnings.warn(
            f"train.threads {threads} is more than the {cores} CPU core"
            f"{'s' if cores != 1 else ''} this process may use: the threads compete for the "
            f"cores and the run is slower, not faster; use --threads {cores} or fewer",
            ToolkitWarning,
            stacklevel=4,
        )


def preflight(
    cfg: Config,
    *,
    compare: bool = False,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Every check before a run or comparison starts; raises ``ConfigError``/``DatasetError``.

    Args:
        cfg: the resolved config.
        compare: check it as an ``effsam compare`` config.
        run_dir: the run directory (default ``out_dir/run_name``; train only).
        resume: the run is to continue: its checkpoint, if any, must load and match.
        overwrite: an existing run may be replaced.

    Returns:
        The checkpoint the run continues from (train with ``resume``), else None.
    """
    validate(cfg, compare=compare)
    check_device(cfg.train.device)
    check_out_dir(cfg.out_dir)
    state = None
    if not compare:
        from .checkpoint import resume_state

        target = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.run_name()
        if target.exists() and not target.is_dir():
            raise ConfigError(f"invalid run directory {str(target)!r} (it is a file)")
        check_out_dir(target, "run directory")
        state = resume_state(cfg, target, resume, overwrite)
    check_data(cfg)
    check_precision(cfg)
    check_threads(cfg)
    return state
