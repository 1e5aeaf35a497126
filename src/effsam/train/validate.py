"""Every check of a configuration, in one place, run before any data is loaded."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch

from effsam.optim import available_optimizers
from effsam.optim.registry import BASES, accepted_kwargs, get_spec

from .config import CompareConfig, Config, ConfigError, OptimConfig, from_dict, to_dict

SCHEDULES = ("cosine", "constant")
AMP_MODES = ("off", "bf16", "fp16")
AUGMENT_CHOICES = (None, "none", "flip", "cifar")

# Range checks of the common wrapper arguments, so the message names the config key; the
# wrapper's own validation (a dry build) catches the rest.
_ARG_RANGES: dict[str, tuple[str, Any]] = {
    "rho": ("must be >= 0", lambda v: v >= 0),
    "beta": ("must be in (0, 1]", lambda v: 0 < v <= 1),
    "gamma": ("must be in (0, 1]", lambda v: 0 < v <= 1),
    "sparsity": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    "num_samples": ("must be an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
    "update_interval": ("must be an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
    "total_steps": ("must be an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
}


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"invalid {key}: {value!r} ({why})")


def _choice(key: str, value: Any, choices: Any, what: str) -> None:
    if value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)  # None: the default
        raise ConfigError(f"unknown {what} {value!r} for {key}; choose from {shown}")


def _number(key: str, value: Any, low: float | None = None, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    if low is not None and (value <= low if strict else value < low):
        _fail(key, value, f"must be {'>' if strict else '>='} {low}")


def _integer(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"must be an integer >= {low}")


#: The largest seed: torch's generators take 64-bit seeds, and a worker adds its rank.
MAX_SEED = 2**63 - 1


def _seed(key: str, value: Any) -> None:
    _integer(key, value, 0)
    if value > MAX_SEED:
        _fail(key, value, "must be at most 2**63 - 1")


#: The longest file name most file systems allow (bytes, POSIX NAME_MAX).
MAX_NAME_BYTES = 255


def check_name(key: str, name: str) -> None:
    """``name`` can be a directory name: not empty, no path separator or NUL, not . or ..,
    at most :data:`MAX_NAME_BYTES` bytes."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        _fail(key, name, "must be a plain directory name")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        shown = name[:20] + "…" + name[-8:]
        raise ConfigError(
            f"invalid {key}: {shown!r} is {size} bytes long (a directory name may have at most "
            f"{MAX_NAME_BYTES})"
        )


def validate_optim(o: OptimConfig, where: str = "optim") -> None:
    """Checks one optimizer section, including a dry build of the optimizer."""
    _choice(f"{where}.name", o.name, available_optimizers(), "optimizer")
    _choice(f"{where}.base", o.base, tuple(BASES), "base optimizer")
    _number(f"{where}.lr", o.lr, 0.0, strict=True)
    _number(f"{where}.momentum", o.momentum, 0.0)
    if o.momentum >= 1:
        _fail(f"{where}.momentum", o.momentum, "must be < 1")
    _number(f"{where}.weight_decay", o.weight_decay, 0.0)
    if o.nesterov and o.momentum <= 0:
        _fail(f"{where}.nesterov", o.nesterov, "Nesterov momentum needs momentum > 0")
    _base_options(o, where)
    for key, value in o.args.items():
        if key in _ARG_RANGES:
            why, ok = _ARG_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(f"{where}.args.{key}", value, "must be a number")
            if isinstance(value, float) and not math.isfinite(value):
                _fail(
                    f"{where}.args.{key}",
                    value,
                    f"must be finite and {why.removeprefix('must be ')}",
                )
            if not ok(value):
                _fail(f"{where}.args.{key}", value, why)
    _dry_build(o, where)


def _base_options(o: OptimConfig, where: str) -> None:
    """``momentum`` and ``nesterov`` are options of the SGD base: given to a base that does
    not take them (Adam, AdamW), they would be recorded and ignored.

    The config cannot tell an explicit ``momentum: 0.9`` from the default 0.9, so only a
    value other than the default counts as given."""
    takes = inspect.signature(BASES[o.base].__init__).parameters
    default = OptimConfig()
    given = {"momentum": o.momentum != default.momentum, "nesterov": bool(o.nesterov)}
    for option, is_given in given.items():
        if is_given and option not in takes:
            users = ", ".join(n for n, cls in BASES.items() if option in _init_params(cls))
            raise ConfigError(
                f"invalid {where}.{option}: {getattr(o, option)!r} (the {o.base!r} base "
                f"optimizer takes no {option}; it is an option of {users or 'none'}: drop "
                f"--{option} or use --base sgd)"
            )


def _init_params(cls: type) -> Any:
    return inspect.signature(cls.__init__).parameters


def _dry_build(o: OptimConfig, where: str) -> None:
    """Builds the optimizer over one dummy tensor so the wrapper checks its own arguments."""
    from .build import optimizer_args, optimizer_from

    unknown = sorted(set(o.args) - accepted_kwargs(o.name))
    if unknown:
        takes = ", ".join(sorted(accepted_kwargs(o.name))) or "none"
        raise ConfigError(
            f"invalid {where}.args: {o.name!r} does not take {unknown}; it takes: {takes}"
        )
    args = optimizer_args(o, steps_per_epoch=1, epochs=1, seed=0)
    # an entry that picks its tensors from the model's layers (SAM-ON) gets a tiny model
    # with a normalisation layer; the others one dummy tensor
    dummy: Any = (
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        if get_spec(o.name).needs_model
        else [torch.nn.Parameter(torch.zeros(2))]
    )
    try:
        optimizer_from(o, dummy, args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where} ({o.name}): {exc}") from exc


def validate(cfg: Config, *, compare: bool = False) -> None:
    """Checks names and ranges of the whole config; raises :class:`ConfigError` naming the key.

    Args:
        cfg: the config.
        compare: also check the ``compare`` section and every optimizer it lists.
    """
    from effsam.data import DATASETS
    from effsam.models import MODELS

    _seed("seed", cfg.seed)
    if cfg.name is not None:
        check_name("name", cfg.name)
    d = cfg.data
    _choice("data.dataset", d.dataset, DATASETS, "data set")
    _integer("data.batch_size", d.batch_size, 1)
    _integer("data.eval_batch_size", d.eval_batch_size, 1)
    _integer("data.cutout", d.cutout, 0)
    if d.train_subset is not None:
        _integer("data.train_subset", d.train_subset, 1)
    if d.subset_seed is not None:
        _seed("data.subset_seed", d.subset_seed)
    if (
        isinstance(d.label_noise, bool)
        or not isinstance(d.label_noise, (int, float))
        or not math.isfinite(d.label_noise)
        or not 0 <= d.label_noise < 1
    ):
        _fail("data.label_noise", d.label_noise, "must be a number in [0, 1)")
    _seed("data.label_noise_seed", d.label_noise_seed)
    if d.image_size is not None:
        _integer("data.image_size", d.image_size, 1)
    _choice("data.augment", d.augment, AUGMENT_CHOICES, "augmentation")
    if len(d.synthetic_shape) != 3 or any(s < 1 for s in d.synthetic_shape):
        _fail("data.synthetic_shape", d.synthetic_shape, "must be three positive integers C, H, W")
    _integer("data.synthetic_classes", d.synthetic_classes, 2)
    _integer("data.synthetic_train", d.synthetic_train, 1)
    _integer("data.synthetic_test", d.synthetic_test, 1)

    _choice("model.name", cfg.model.name, MODELS, "model")
    _number("model.width", cfg.model.width, 0.0, strict=True)
    check_model(cfg.model.name, cfg.model.width, cfg.model.kwargs)

    if compare:
        _validate_compare(cfg)
    else:
        validate_optim(cfg.optim)

    t = cfg.train
    _integer("train.epochs", t.epochs, 1)
    _choice("train.schedule", t.schedule, SCHEDULES, "LR schedule")
    _number("train.warmup_epochs", t.warmup_epochs, 0.0)
    if t.warmup_epochs > t.epochs:
        _fail("train.warmup_epochs", t.warmup_epochs, f"must not exceed epochs ({t.epochs})")
    _number("train.label_smoothing", t.label_smoothing, 0.0)
    if t.label_smoothing >= 1:
        _fail("train.label_smoothing", t.label_smoothing, "must be < 1")
    _choice("train.amp", t.amp, AMP_MODES, "AMP mode")
    _integer("train.accumulation_steps", t.accumulation_steps, 1)
    if t.accumulation_steps > d.batch_size:
        _fail(
            "train.accumulation_steps",
            t.accumulation_steps,
            f"must not exceed data.batch_size ({d.batch_size})",
        )
    if t.clip_grad_norm is not None:
        _number("train.clip_grad_norm", t.clip_grad_norm, 0.0, strict=True)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        _fail("train.device", t.device, "use auto, cpu, cuda or cuda:N")
    if t.threads is not None:
        _integer("train.threads", t.threads, 1)
    _integer("train.timing_warmup_steps", t.timing_warmup_steps, 0)
    _integer("train.eval_every", t.eval_every, 1)
    _integer("train.sds_diagnostics", t.sds_diagnostics, 0)
    if t.sds_diagnostics and t.accumulation_steps > 1:
        _fail("train.sds_diagnostics", t.sds_diagnostics, "needs train.accumulation_steps 1")
    _number("train.max_skipped_fraction", t.max_skipped_fraction, 0.0)
    if t.max_skipped_fraction > 1:
        _fail("train.max_skipped_fraction", t.max_skipped_fraction, "must be in [0, 1]")


def _validate_compare(cfg: Config) -> None:
    """The compare section: every listed optimizer with its merged settings, and the seeds.

    The top-level ``optim`` section is only the shared default here, so its ``args`` must
    each be taken by at least one of the optimizers (a typo would otherwise vanish).
    """

    entries = compare_entries(cfg)
    for label, o in entries:
        validate_optim(o, f"compare.optimizers[{label}]")
    taken = set().union(*(accepted_kwargs(o.name) for _, o in entries))
    unused = sorted(set(cfg.optim.args) - taken)
    if unused:
        names = ", ".join(o.name for _, o in entries)
        raise ConfigError(
            f"invalid optim.args: {unused} taken by none of the compared optimizers ({names})"
        )
    seeds = compare_seeds(cfg)
    for s in seeds:
        _seed("compare.seeds", s)
    for label, _ in entries:
        check_name(f"compare.optimizers[{label}].label", label)
    if len(set(seeds)) != len(seeds):
        _fail("compare.seeds", seeds, "must not repeat")


def compare_seeds(cfg: Config) -> list[int]:
    """The seeds of a comparison (``compare.seeds``, else the run's seed)."""
    seeds = cfg.compare.seeds
    if seeds is None:
        return [cfg.seed]
    if not seeds:
        _fail("compare.seeds", seeds, "must not be empty")
    return list(seeds)


def compare_entries(cfg: Config) -> list[tuple[str, OptimConfig]]:
    """(label, optimizer section) for each optimizer of a comparison.

    A bare name is labelled in upper case (``esam`` → ``ESAM``), as in the papers' tables.

    An entry's own keys override ``cfg.optim``; ``args`` merge, and shared ``cfg.optim.args``
    that an optimizer does not take are dropped for it (SGD has no ``rho``), while the entry's
    own args must all be accepted.
    """

    c: CompareConfig = cfg.compare
    if not c.optimizers:
        _fail("compare.optimizers", c.optimizers, "must list at least one optimizer")
    out: list[tuple[str, OptimConfig]] = []
    for i, entry in enumerate(c.optimizers):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            _fail(f"compare.optimizers[{i}]", entry, "must be a name or a mapping with 'name'")
        entry = dict(entry)
        label = str(entry.pop("label", str(entry["name"]).upper()))
        _choice(f"compare.optimizers[{i}].name", entry["name"], available_optimizers(), "optimizer")
        shared = {
            k: v for k, v in cfg.optim.args.items() if k in accepted_kwargs(str(entry["name"]))
        }
        merged = {**to_dict(cfg.optim), **entry, "args": {**shared, **entry.get("args", {})}}
        out.append((label, from_dict(merged, OptimConfig, f"compare.optimizers[{i}]")))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        _fail("compare.optimizers", labels, "labels must be unique (add 'label:' to repeats)")
    return out


#: Output channels of each convolution at width 1, per (model, options): models are built
#: once per process for this check.
_CONV_CHANNELS: dict[tuple[str, str], list[int]] = {}


def check_model(name: str, width: float, kwargs: dict[str, Any]) -> None:
    """The model's options (``model.kwargs``) are ones it takes, with valid values, and
    ``model.width`` is not so small that convolutions would have under one channel: they
    are kept at one, so the model is not the architecture at that width but a degenerate
    one (``small_cnn`` at width 1e-9 has 53 weights and trains at chance).

    The model is built at width 1 on the meta device (no memory, no initialisation), once
    per process; without options and at widths of 0.5 and more there is nothing to check.
    """
    if not kwargs and width >= 0.5:
        return
    from effsam.models import create_model

    key = (name, repr(sorted(kwargs.items())))
    channels = _CONV_CHANNELS.get(key)
    if channels is None:
        try:
            with torch.device("meta"):
                full = create_model(name, width=1.0, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid model.kwargs: {exc}") from None
        channels = [m.out_channels for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
        _CONV_CHANNELS[key] = channels
    if not channels or width >= 0.5:
        return
    narrowest = min(channels)
    lost = sum(1 for c in channels if round(c * width) < 1)
    if lost:
        raise ConfigError(
            f"invalid model.width: {width:g} (so small that {lost} of the {len(channels)} "
            f"convolutions of {name} would have no channel left and are kept at one: the "
            f"model is degenerate; its narrowest layer has {narrowest} channels at width 1, "
            f"so use a width of at least 1/{narrowest} = {1 / narrowest:.4g})"
        )
