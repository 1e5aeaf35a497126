"""The run configuration: a tree of dataclasses, loaded from YAML, overridden from the command
line, validated in one place and saved with every run.

Precedence, lowest first: the dataclass defaults, the YAML file (and the files it ``extends``),
explicit command-line flags, then ``--set section.key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it."""


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    dataset: str = "digits"
    data_dir: str | None = None  # None: $EFFSAM_DATA_DIR, then the data package's default
    download: bool = False
    allow_unverified: bool = False
    train_subset: int | None = None  # a stratified subset of N training images
    subset_seed: int | None = None  # seed of the subset's choice (None: the run's seed)
    label_noise: float = 0.0  # fraction of training labels redrawn uniformly at random, 0 = off
    label_noise_seed: int = 0  # seed of that draw: fixed, the same for every run's seed
    image_size: int | None = None  # resize (imagefolder) or None for the native size
    augment: str | None = None  # None: the data set's own recipe ("cifar" = crop + flip)
    cutout: int = 0  # side of the Cutout square, 0 = off
    batch_size: int = 128  # per worker
    eval_batch_size: int = 512
    drop_last: bool = False
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10
    synthetic_train: int = 512
    synthetic_test: int = 256


@dataclass
class ModelConfig:
    """Which network, from ``effsam.models``."""

    name: str = "small_cnn"
    width: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model arguments


@dataclass
class OptimConfig:
    """The optimizer: a registered name over a base optimizer.

    ``args`` holds the sharpness-aware wrapper's own arguments (``rho``, ``beta``, ``gamma``,
    ``sparsity``, ``num_samples``, ``update_interval``, …); the registry's paper defaults fill
    in the rest.
    """

    name: str = "sam"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The budget and the step's options."""

    epochs: int = 10
    schedule: str = "cosine"  # per step: "cosine" or "constant", after the warm-up
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr
    label_smoothing: float = 0.0
    amp: str = "off"  # "off", "bf16" or "fp16" (fp16 adds a GradScaler)
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    sync_ascent: bool = False  # data parallel: all-reduce the pass-1 gradient
    compile: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", …
    threads: int | None = None  # torch.set_num_threads; None: one per free core (threads.py)
    timing_warmup_steps: int = 2  # steps at the start of each process left out of images/s
    eval_every: int = 1  # evaluate every N epochs (and always after the last one)
    sds_diagnostics: int = 0  # ESAM's selection diagnostics every N steps (0: off)
    max_skipped_fraction: float = 0.1  # stop (exit 1) once more of the steps so far skip


@dataclass
class CompareConfig:
    """``effsam compare``: the optimizers to train side by side.

    Each entry of ``optimizers`` is a registered name or a mapping with ``name``, an optional
    ``label`` and any ``optim`` keys to override for that optimizer (e.g. SGD's
    ``weight_decay: 5.0e-4`` against SAM's ``1.0e-3``; ``args`` are merged).
    """

    optimizers: list[Any] = field(default_factory=lambda: ["sgd", "sam", "esam"])
    seeds: list[int] | None = None  # None: [seed]


@dataclass
class Config:
    """One run (``effsam train``) or one comparison (``effsam compare``)."""

    name: str | None = None  # run directory name; None: derived from dataset/model/optimizer
    seed: int = 0
    out_dir: str = "runs"
    checkpoint: bool = True  # save a resumable checkpoint after every epoch
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def run_name(self) -> str:
        """The run directory's name."""
        if self.name:
            return self.name
        return f"{self.data.dataset}_{self.model.name}_{self.optim.name}_s{self.seed}"


# ---------------------------------------------------------------------------- dict <-> config
def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able containers."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type = Config, where: str = "") -> Any:
    """Builds a dataclass tree from nested mappings, checking keys and value types.

    Raises:
        ConfigError: for an unknown key (the valid ones are listed) or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {_join(where, unknown[0])!r}; valid keys"
            f"{' in ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    if dataclasses.is_dataclass(tp):
        return from_dict(value if value is not None else {}, tp, where)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"invalid {where}: {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid {where}: {value!r} (expected a list)")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid {where}: {value!r} (expected a mapping)")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid {where}: {value!r} (expected true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid {where}: {value!r} (expected an integer)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid {where}: {value!r} (expected a number)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid {where}: {value!r} (expected a string)")
        return value
    raise ConfigError(f"cannot read {where}: unsupported type {tp!r}")


# ---------------------------------------------------------------------------- YAML files
class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key (YAML would keep the last value and drop the first silently)."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


#: Floats as YAML 1.2 (and a person) writes them, which YAML 1.1 reads as strings: an
#: exponent without a decimal point (``1e-3``, ``5E4``) or a point without digits before it
#: (``.5``). YAML 1.1's own floats (``0.5``, ``1.0e-3``, ``.inf``) resolve as before.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), with two changes for configs:

    * ``1e-3`` is the number 0.001, as a person means it (YAML 1.1 reads it as a string);
    * a repeated key in any mapping is a :class:`DuplicateKeyError`, not a silent overwrite.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_duplicates(node, set())
        return super().construct_document(node)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _check_duplicates(node: yaml.Node, seen: set[int], where: str = "") -> None:
    """Raises :class:`DuplicateKeyError` for the first mapping (at any depth) that repeats a
    key, naming it by its dotted path (``optim.args.rho``)."""
    if id(node) in seen:  # an alias to a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            inner = where
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                inner = f"{where}.{key_node.value}" if where else key_node.value
                if ident in first:
                    raise DuplicateKeyError(inner, line, first[ident])
                first[ident] = line
            _check_duplicates(key_node, seen, where)
            _check_duplicates(value_node, seen, inner)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, seen, f"{where}[{i}]")


def load_yaml_text(text: str) -> Any:
    """YAML text read with :class:`ConfigLoader` (numbers like ``1e-3``, no repeated keys)."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds no Python objects


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file read with :class:`ConfigLoader`, every failure as one :class:`ConfigError`
    naming the file: not UTF-8 text (e.g. a binary file), invalid YAML, a repeated key."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a YAML text file: byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start} is not UTF-8 text"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return load_yaml_text(text)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path}: duplicate key {exc.key!r} at line {exc.line} (first at line "
            f"{exc.first_line}); YAML would keep only the last one, dropping the first silently"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML config, following ``extends: other.yaml`` (relative to the file) first.

    The file's own keys are deep-merged over those of the file it extends.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config {path} extends itself (cycle through {_seen[-1].name})")
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a file name, got {parent!r}")
    return deep_merge(read_yaml(path.parent / parent, (*_seen, resolved)), data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"optim.args.rho=0.1"`` → (["optim", "args", "rho"], 0.1); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key: {text!r}")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {key}: duplicate key {exc.key!r} in {raw!r}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {exc}") from exc
    return parts, value


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Sets ``data[a][b][c] = value`` for parts ``[a, b, c]``, creating mappings on the way."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(parts)}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> Config:
    """Builds a :class:`Config` from defaults, a YAML file, flag overrides and ``--set`` lines.

    Args:
        path: a YAML file (may ``extends`` another) or None for the defaults.
        overrides: dotted keys to values, e.g. ``{"optim.lr": 0.1}`` (from explicit flags).
        assignments: ``key=value`` strings (from ``--set``), applied last.
        base: nested values layered over the dataclass defaults, under everything else.
    """
    data = to_dict(Config())
    if base is not None:
        data = deep_merge(data, base)
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    for key, value in (overrides or {}).items():
        set_path(data, key.split("."), value)
    for text in assignments or []:
        set_path(data, *parse_assignment(text))
    return from_dict(data)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (keys in declaration order)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
