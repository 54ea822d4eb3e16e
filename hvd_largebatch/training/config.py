"""The YAML configuration of a training run: schema, ``--set`` overrides and validation.

A config has six sections; unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the dotted key, before any work starts. Every key but ``model.name`` and
the ``schedule`` section has a default::

    model:
      name: resnet50            # resnet50 | wrn | wrn_16_4 | wrn_28_10 | small_resnet |
                                # torchvision.<name> (see hvd_largebatch.models)
      num_classes: null         # default: the data's class count (folders / data.num_classes)
      options: {variant: goyal} # keyword arguments of the model (checked against its signature)
    data:
      source: folder            # folder | filelist | synthetic | digits
      path: /data/imagenet      # folder: holds train/<class>/<image> and val/<class>/<image>;
                                # filelist: root of the listed paths; digits: where scikit-learn's
                                # digits are written if absent (default data/digits)
      train_list: null          # filelist: `path label` list of the training set (relative to path)
      val_list: null            # filelist: the same for the validation set
      image_size: 224           # side of the crops fed to the model, pixels
      resize_shorter: null      # validation: shorter side before the center crop (default
                                # round(image_size * 256 / 224))
      stats: null               # normalization: imagenet | cifar10 | digits | custom (mean/std);
                                # default digits for data.source digits, else imagenet
      mean: null                # 3 per-channel means on the [0, 1] scale (overrides stats)
      std: null                 # 3 per-channel standard deviations (overrides stats)
      crop_scale: [0.08, 1.0]   # training random-resized-crop area fraction
      crop_ratio: [0.75, 1.3333333] # training crop aspect ratio (w / h)
      flip: true                # training horizontal flips
      workers: 4                # DALI CPU threads per rank
      prefetch: 2               # micro-batches DALI prepares ahead
      skip_bad_files: false     # drop unusable images (named and counted in the log) instead
                                # of stopping with DataError
      check_files: true         # read and decode every file once before its first use (cached
                                # by the index's fingerprint; see hvd_largebatch.data.check)
      num_classes: null         # synthetic: classes (default 1000)
      num_samples: null         # synthetic: training samples (default schedule.dataset_size)
      val_samples: null         # synthetic: validation samples (default 50,000)
    schedule:                   # passed to hvd_largebatch.schedules.from_config (see there):
      preset: goyal_1h          # lr, global batch and momentum per phase; dataset_size defaults
                                # to the data's training set size
    optimizer:
      name: sgd                 # sgd (momentum SGD) | lars (FusedLARS)
      weight_decay: 1.0e-4
      nesterov: null            # default: schedule's nesterov
      trust_coefficient: 0.001  # LARS eta
      eps: 0.0                  # LARS: added to the trust ratio's denominator
      exclude_bn_and_bias: true # no weight decay / no LARS adaptation for BN and biases
      momentum_correction: true # true: u <- m u + r d, w <- w - lr u (torch form; Goyal et al.'s
                                # momentum correction when the lr changes); false: You et al.'s
                                # Algorithm 1 as written, v <- m v + lr r d, w <- w - v
      denominator: separate     # LARS trust ratio: separate eta ||w|| / (||g|| + wd ||w|| + eps)
                                # (You et al.) | combined eta ||w|| / (||g + wd w|| + eps)
      shard_optimizer_state: false  # reduce-scatter gradients, shard momentum over ranks
    train:
      max_per_rank_batch: 256   # largest micro-batch per rank; larger per-rank batches are
                                # accumulated over micro-batches (backward_passes_per_step)
      seed: 0                   # model init, data order, augmentation
      eval_every: 1             # epochs between evaluations (0: only after the last epoch)
      checkpoint_every: 0       # iterations between extra checkpoints (0: only at epoch ends)
      log_every: 10             # iterations between metrics.csv / TensorBoard rows
      precision: fp32           # fp32 | bf16 (autocast) | fp16 (autocast, dynamic loss scaling
                                # fused into FusedLARS: for GPUs without bf16, e.g. V100)
      channels_last: null       # NHWC model and inputs (default: on for CUDA, off for the CPU)
      compile: false            # torch.compile the model (its forward and backward)
      cuda_graph: none          # none | optimizer: the optimizer step captured once in a CUDA
                                # graph and replayed (CUDA, replicated optimizer state)
      device: auto              # auto (cuda if available) | cpu | cuda
      eval_batch: null          # per-rank batch of evaluation (default max_per_rank_batch)
      average_bn_stats: true    # average BN running statistics over ranks before eval/checkpoint
      max_skipped_steps: 20     # stop (exit 3) after this many consecutive updates skipped for
                                # non-finite gradients (0: never stop; see trainer.py)
      stall_timeout_s: 300      # seconds without progress (an iteration, a collective, a
                                # checkpoint) before a rank ends the job (exit 4; 0: off)
      noise_scale_every: 10     # iterations between measurements of the gradient noise scale
                                # (one extra pass over the gradients each; 0: never)
      bn_group: null            # ghost batch norm: BN statistics over fixed groups of this many
                                # samples, whatever the world size and micro-batching (per-rank
                                # micro-batches must be multiples of it; needs drop_last)
      deterministic: false      # also torch.use_deterministic_algorithms(True), cuDNN's
                                # deterministic non-benchmark mode on a GPU, and no Horovod tensor
                                # fusion (a fixed reduction order on 3 or more ranks)
    output:
      dir: runs/default         # metrics.csv, events (TensorBoard), checkpoint.pt, plots
      tensorboard: true
      plots: true
      progress: true            # tqdm bar on rank 0 (stderr)

The momentum is part of the schedule (Smith et al. scale the batch with 1 / (1 - m)), so
``optimizer.momentum`` is an error that points to ``schedule.momentum``.

Numbers written as ``1e-4`` (PyYAML reads exponent floats without a dot as strings) are accepted
where a float is expected.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from hvd_largebatch.errors import ConfigError

DATA_SOURCES = ("folder", "filelist", "synthetic", "digits")
STATS = ("imagenet", "cifar10", "digits", "custom")
OPTIMIZERS = ("sgd", "lars")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("none", "optimizer")
DENOMINATORS = ("separate", "combined")
DEFAULT_DIGITS_PATH = "data/digits"
SYNTHETIC_CLASSES = 1000
SYNTHETIC_VAL_SAMPLES = 50_000


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_classes: int | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    source: str = "folder"
    path: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    image_size: int = 224
    resize_shorter: int | None = None
    stats: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    workers: int = 4
    prefetch: int = 2
    skip_bad_files: bool = False
    check_files: bool = True
    num_classes: int | None = None
    num_samples: int | None = None
    val_samples: int | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    weight_decay: float = 1e-4
    nesterov: bool | None = None
    trust_coefficient: float = 0.001
    eps: float = 0.0
    exclude_bn_and_bias: bool = True
    shard_optimizer_state: bool = False
    momentum_correction: bool = True
    denominator: str = "separate"


@dataclass(frozen=True)
class TrainConfig:
    max_per_rank_batch: int = 256
    seed: int = 0
    eval_every: int = 1
    checkpoint_every: int = 0
    log_every: int = 10
    precision: str = "fp32"
    channels_last: bool | None = None
    compile: bool = False
    cuda_graph: str = "none"
    device: str = "auto"
    eval_batch: int | None = None
    average_bn_stats: bool = True
    max_skipped_steps: int = 20
    stall_timeout_s: float = 300.0
    noise_scale_every: int = 10
    bn_group: int | None = None
    deterministic: bool = False


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
    "train": TrainConfig, "output": OutputConfig,
}
#: keys that are not in the schema but that users coming from other trainers write; the message
#: says where the setting lives instead.
MOVED_KEYS = {
    "optimizer.momentum": "the momentum is part of the schedule: set schedule.momentum "
                          "(Smith et al. scale the batch with 1 / (1 - m))",
    "optimizer.lr": "the lr is part of the schedule: set schedule.lr or schedule.base_lr",
    "train.epochs": "the length of training is part of the schedule: set schedule.epochs",
    "train.batch_size": "the global batch is part of the schedule (schedule.batch); "
                        "train.max_per_rank_batch caps the per-rank micro-batch",
}
CHOICES = {
    "data.source": DATA_SOURCES, "data.stats": STATS, "optimizer.name": OPTIMIZERS,
    "train.precision": PRECISIONS, "train.device": DEVICES, "train.cuda_graph": CUDA_GRAPHS,
    "optimizer.denominator": DENOMINATORS,
}


@dataclass(frozen=True)
class Config:
    """A validated config. ``schedule`` is the raw ``schedule:`` mapping (validated by
    ``schedules.from_config`` in :func:`parse_config`); ``to_dict()`` gives back the whole
    config with every default filled in (what the output folder and checkpoints record)."""

    model: ModelConfig
    data: DataConfig
    schedule: dict
    optimizer: OptimizerConfig
    train: TrainConfig
    output: OutputConfig

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["schedule"] = dict(self.schedule)
        return out

    def replace(self, **sections) -> "Config":
        """A copy with whole sections replaced (e.g. ``data=dataclasses.replace(cfg.data, ...)``)."""
        return dataclasses.replace(self, **sections)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and non-dict values are leaves."""
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


# -- loading --------------------------------------------------------------------------------

def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Read the YAML file ``path``, apply ``--set key=value`` overrides, validate."""
    try:
        with open(path, encoding="utf-8") as f:
            mapping = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path} ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError("config", f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                          f"at offset {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}") from e
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections, "
                          f"got {type(mapping).__name__}")
    return parse_config(apply_overrides(mapping, overrides))


def apply_overrides(mapping: dict, overrides: typing.Sequence[str]) -> dict:
    """A copy of ``mapping`` with each ``dotted.key=value`` set; ``value`` is parsed as YAML
    (``3`` is an int, ``1.0e-4`` a float, ``[1, 2]`` a list, ``null`` None). Intermediate
    mappings are created when absent."""
    import copy

    out = copy.deepcopy(mapping)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("--set", f"expected dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"--set value {text!r} is not valid YAML: {e}") from e
        node, parts = out, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[:depth + 1]),
                                  f"is {child!r}, not a mapping; cannot set {key}")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(mapping: Mapping) -> Config:
    """Validate a config mapping (the parsed YAML) and return a ``Config``."""
    if not isinstance(mapping, Mapping):
        raise ConfigError("config", f"must be a mapping of sections, got {type(mapping).__name__}")
    _check_stray_colons(mapping, "")
    known = (*SECTIONS, "schedule")
    for key in mapping:
        if key not in known:
            raise ConfigError(str(key), f"unknown section; sections are {', '.join(known)}")
    if mapping.get("model") is None:
        raise ConfigError("model.name", "is required (the model section is missing)")
    if mapping.get("schedule") is None:
        raise ConfigError("schedule", "is required (lr, global batch and epochs of the run)")
    sections = {name: _section(name, cls, mapping.get(name)) for name, cls in SECTIONS.items()}
    schedule = mapping["schedule"]
    if not isinstance(schedule, Mapping):
        raise ConfigError("schedule", f"must be a mapping, got {type(schedule).__name__}")
    cfg = Config(schedule=dict(schedule), **sections)
    _check_values(cfg)
    # the schedule's own checks (keys, types, ranges), with a stand-in dataset size when the
    # config leaves it to the data; the real size is checked again in build_schedule
    build_schedule(cfg, None)
    return cfg


def _check_stray_colons(node: Any, path: str) -> None:
    """ConfigError naming a key such as ``type:constant`` with no value: YAML's reading of
    ``{type:constant}`` (no space after the colon), which would otherwise surface as a missing
    ``type``."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_stray_colons(item, f"{path}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    for key, value in node.items():
        dotted = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and ":" in key and value is None:
            name, _, rest = key.partition(":")
            raise ConfigError(dotted, f"stray key {key!r}: YAML reads '{key}' without a space "
                              f"after the colon as one key with no value; write "
                              f"'{name}: {rest}'")
        _check_stray_colons(value, dotted)


def build_schedule(cfg: Config, dataset_size: int | None):
    """The run's ``Schedule`` for a training set of ``dataset_size`` samples.

    ``schedule.dataset_size`` defaults to ``dataset_size``; when the config gives another value
    the schedule (written in epochs) is moved to the real size with ``with_dataset_size``.
    ``dataset_size=None`` (validation before the data is indexed) builds it with the config's
    value, or a stand-in large enough for any batch.
    """
    from hvd_largebatch import schedules

    section = dict(cfg.schedule)
    if stated_dataset_size(cfg) is None:
        section["dataset_size"] = dataset_size if dataset_size is not None else 2**40
    schedule = schedules.from_config(section)
    if dataset_size is not None and schedule.dataset_size != dataset_size:
        schedule = schedule.with_dataset_size(dataset_size)
    return schedule


def stated_dataset_size(cfg: Config) -> int | None:
    """``schedule.dataset_size`` as the config states it (directly or through its preset)."""
    from hvd_largebatch.schedules import PRESETS

    if cfg.schedule.get("dataset_size") is not None:
        return cfg.schedule["dataset_size"]
    preset = PRESETS.get(cfg.schedule.get("preset"))
    return preset.get("dataset_size") if preset else None


# -- typed sections -------------------------------------------------------------------------

def _section(name: str, cls: type, value: Any):
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"must be a mapping, got {type(value).__name__} {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        dotted = f"{name}.{key}"
        if dotted in MOVED_KEYS:
            raise ConfigError(dotted, MOVED_KEYS[dotted])
        if key not in fields:
            raise ConfigError(dotted, f"unknown key; {name} takes {', '.join(sorted(fields))}")
        kwargs[key] = coerce(dotted, item, hints[key])
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kwargs]
        raise ConfigError(f"{name}.{missing[0]}", "is required") from None


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (int, float, bool, str, dict, list[float],
    ``X | None``); ints are accepted as floats and float strings such as ``"1e-4"`` too.
    ConfigError naming ``key`` otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    raise TypeError(f"no rule for {hint!r} ({key})")


def _check_values(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and value not in allowed:
            raise ConfigError(dotted, f"must be one of {', '.join(allowed)}, got {value!r}")
    _check_model(cfg.model)
    _check_data(cfg.data)
    o, t = cfg.optimizer, cfg.train
    _at_least("optimizer.weight_decay", o.weight_decay, 0.0)
    if not o.trust_coefficient > 0:
        raise ConfigError("optimizer.trust_coefficient", f"must be > 0, got {o.trust_coefficient}")
    _at_least("optimizer.eps", o.eps, 0.0)
    _at_least("train.max_per_rank_batch", t.max_per_rank_batch, 1)
    _at_least("train.seed", t.seed, 0)
    _at_least("train.eval_every", t.eval_every, 0)
    _at_least("train.checkpoint_every", t.checkpoint_every, 0)
    _at_least("train.log_every", t.log_every, 1)
    if t.eval_batch is not None:
        _at_least("train.eval_batch", t.eval_batch, 1)
    _at_least("train.max_skipped_steps", t.max_skipped_steps, 0)
    _at_least("train.stall_timeout_s", t.stall_timeout_s, 0.0)
    _at_least("train.noise_scale_every", t.noise_scale_every, 0)
    if t.cuda_graph != "none" and o.shard_optimizer_state:
        raise ConfigError("train.cuda_graph", "needs optimizer.shard_optimizer_state: false (the "
                          "sharded step has collectives inside, which a graph cannot hold)")
    if t.cuda_graph != "none" and t.device == "cpu":
        raise ConfigError("train.cuda_graph", "captures CUDA work: it needs train.device cuda or "
                          "auto on a GPU")
    if t.bn_group is not None:
        _at_least("train.bn_group", t.bn_group, 1)
        if t.bn_group > t.max_per_rank_batch:
            raise ConfigError("train.bn_group", f"{t.bn_group} is larger than "
                              f"train.max_per_rank_batch {t.max_per_rank_batch}")
    if not cfg.output.dir:
        raise ConfigError("output.dir", "must not be empty")


def _check_model(m: ModelConfig) -> None:
    from hvd_largebatch.models import check_model_options, model_options

    check_model_options(m.name, m.options)  # also rejects an unknown model name
    for key, default in model_options(m.name).items():
        if key in m.options and default is not None:
            coerce(f"model.options.{key}", m.options[key], type(default))
    if m.num_classes is not None:
        _at_least("model.num_classes", m.num_classes, 1)


def _check_data(d: DataConfig) -> None:
    if d.source in ("folder", "filelist") and not d.path:
        raise ConfigError("data.path", f"is required for data.source {d.source}")
    if d.source == "filelist":
        for key in ("train_list", "val_list"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key}", "is required for data.source filelist")
    elif d.train_list or d.val_list:
        key = "data.train_list" if d.train_list else "data.val_list"
        raise ConfigError(key, f"only for data.source filelist (this is {d.source})")
    _at_least("data.image_size", d.image_size, 1)
    if d.resize_shorter is not None and d.resize_shorter < d.image_size:
        raise ConfigError("data.resize_shorter",
                          f"{d.resize_shorter} is smaller than data.image_size {d.image_size}")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"data.{key}", f"needs 3 values (R, G, B), got {value}")
    if d.std is not None and min(d.std) <= 0:
        raise ConfigError("data.std", f"must be > 0, got {d.std}")
    if d.stats == "custom" and (d.mean is None or d.std is None):
        raise ConfigError("data.mean", "data.stats custom needs data.mean and data.std")
    for key, lo_bound in (("crop_scale", 0.0), ("crop_ratio", 0.0)):
        lo, hi = _pair(f"data.{key}", getattr(d, key))
        if not lo_bound < lo <= hi or (key == "crop_scale" and hi > 1):
            limit = "0 < min <= max <= 1" if key == "crop_scale" else "0 < min <= max"
            raise ConfigError(f"data.{key}", f"need {limit}, got {[lo, hi]}")
    _at_least("data.workers", d.workers, 1)
    _at_least("data.prefetch", d.prefetch, 1)
    for key in ("num_classes", "num_samples", "val_samples"):
        value = getattr(d, key)
        if value is None:
            continue
        if d.source != "synthetic":
            raise ConfigError(f"data.{key}", f"only for data.source synthetic (this is {d.source})")
        _at_least(f"data.{key}", value, 1)


def _pair(key: str, value: list) -> tuple[float, float]:
    if len(value) != 2:
        raise ConfigError(key, f"needs 2 values [min, max], got {value}")
    return value[0], value[1]


def _at_least(key: str, value, lowest) -> None:
    if value < lowest:
        raise ConfigError(key, f"must be >= {lowest}, got {value}")
