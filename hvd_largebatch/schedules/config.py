"""Build a ``Schedule`` from the ``schedule:`` section of a YAML config, or from a preset.

The section has one of two forms (unknown keys are errors naming the key):

Recipe form (how the papers write schedules; epochs are floats, batches are global)::

    schedule:
      preset: goyal_1h         # optional: start from a preset; the keys below override it
      dataset_size: 1281167    # N, training samples per epoch
      epochs: 90               # length of training
      batch: 8192              # global batch (all ranks) at the start
      lr: 3.2                  # the lr at `batch` after warmup; or instead:
      base_lr: 0.1             #   a reference point, moved to (batch, momentum) by the papers'
      base_batch: 256          #   rules: lr = base_lr * batch / base_batch
      base_momentum: 0.9       #   * (1 - momentum) / (1 - base_momentum) (default: momentum)
      momentum: 0.9            # default 0.9
      nesterov: true           # default false; recorded for the optimizer
      drop_last: true          # default true: drop each epoch's last partial batch
      workers: 256             # ranks the recipe assumes (default world size of `plan`)
      warmup: {epochs: 5, mode: gradual, start_lr: 0.1}
          # mode gradual (linear from start_lr to lr) or constant (hold start_lr);
          # start_lr defaults to base_lr; the warmup must end before training does
      decay: {type: step, milestones: [30, 60, 80], factor: 0.1}
          # or {type: poly, power: 2, end_lr: 0}, {type: cosine, end_lr: 0}, {type: constant}
          # (default constant); poly and cosine run from the warmup's end to `epochs`
      batch_increase: {max_batch: 16384, rule: linear}
          # Smith et al.: each lr drop of the step decay becomes a batch increase of the same
          # factor up to max_batch, the lr takes the rest (see rules.increase_batch); or
      batch_increase: {mode: adaptive, max_batch: 16384, factor: 2, margin: 2, interval: 100,
                       start_epoch: 5, smoothing: 0.9}
          # the batch is decided while training: every `interval` updates from `start_epoch`
          # (default: the warmup's end), x factor when the measured gradient noise scale
          # B_simple >= margin (default: factor) x the batch, up to max_batch; the lr keeps its
          # curve (Schedule.AdaptiveBatch, schedules.adaptive)
      name: my_run             # optional labels
      source: "where the recipe comes from"

Explicit form (what ``Schedule.to_config()`` writes; phases are contiguous from epoch 0)::

    schedule:
      dataset_size: 50000
      phases:
        - {end_epoch: 5, global_batch: 8192, momentum: 0.9, lr_start: 0.1, lr_end: 3.2,
           shape: linear}                          # shape: constant (default), linear, poly
        - {end_epoch: 90, global_batch: 8192, momentum: 0.9, lr_start: 3.2}  # or cosine
      # plus drop_last, nesterov, workers, name, source, and an adaptive batch_increase
      # (mode: adaptive) as above

Overriding a preset: top-level keys replace the preset's; the ``warmup``, ``decay`` and
``batch_increase`` mappings are merged key by key, unless the override changes ``decay.type``
or ``batch_increase.mode`` (then it replaces the mapping); a key set to null removes the preset's (for
example ``batch_increase: null``). Setting ``lr`` drops the preset's ``base_*`` reference point
and setting ``base_lr`` drops its ``lr``. Float values may be written as strings such as
``"1e-4"`` (PyYAML reads exponent floats without a dot as strings).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

from ..errors import ConfigError
from .builders import constant_warmup, cosine_decay, gradual_warmup, poly_decay, step_decay
from .presets import PRESETS
from .rules import equal_noise_lr, increase_batch
from .schedule import AdaptiveBatch, Phase, Schedule

_COMMON_KEYS = ("preset", "name", "source", "workers", "dataset_size", "drop_last", "nesterov")
_RECIPE_KEYS = ("epochs", "batch", "lr", "base_lr", "base_batch", "base_momentum", "momentum",
                "warmup", "decay", "batch_increase")
_WARMUP_KEYS = ("epochs", "mode", "start_lr")
_DECAY_KEYS = {"constant": ("type",), "step": ("type", "milestones", "factor"),
               "poly": ("type", "power", "end_lr"), "cosine": ("type", "end_lr")}
_INCREASE_KEYS = ("mode", "max_batch", "rule")
_ADAPTIVE_KEYS = ("mode", "max_batch", "factor", "margin", "interval", "start_epoch", "smoothing")
INCREASE_MODES = ("rule", "adaptive")
_PHASE_KEYS = ("end_epoch", "global_batch", "momentum", "lr_start", "lr_end", "shape", "power")
_REPLACING_FIELD = {"decay": "type", "batch_increase": "mode"}  # changing it replaces the preset's whole mapping
_MISSING = object()


def preset(name: str) -> Schedule:
    """The named preset (see ``presets.PRESETS``) as a ``Schedule``."""
    return from_config({"preset": name})


def from_config(mapping: Mapping) -> Schedule:
    """Build a ``Schedule`` from a ``schedule:`` section (see the module docstring).

    Raises ``ConfigError`` naming the offending key (``schedule.<key>``) before any work.
    """
    cfg = _mapping(mapping, "schedule")
    if cfg.get("preset") is not None:
        cfg = _apply_preset(cfg)
    _check_keys(cfg, _COMMON_KEYS + _RECIPE_KEYS + ("phases",), "schedule")
    common = {
        "dataset_size": _get(cfg, "dataset_size", "schedule", int),
        "drop_last": _get(cfg, "drop_last", "schedule", bool, True),
        "nesterov": _get(cfg, "nesterov", "schedule", bool, False),
        "workers": _get(cfg, "workers", "schedule", int, None),
        "name": _get(cfg, "name", "schedule", str, ""),
        "source": _get(cfg, "source", "schedule", str, ""),
    }
    if common["dataset_size"] < 1:
        raise ConfigError("schedule.dataset_size", f"must be >= 1, got {common['dataset_size']}")
    if cfg.get("phases") is not None:
        increase = _increase_section(cfg)
        adaptive = increase is not None and increase.get("mode") == "adaptive"
        for key in _RECIPE_KEYS:
            if cfg.get(key) is not None and not (key == "batch_increase" and adaptive):
                raise ConfigError(f"schedule.{key}", "not allowed together with schedule.phases"
                                  + (" (except batch_increase with mode adaptive)"
                                     if key == "batch_increase" else ""))
        phases = _explicit_phases(cfg["phases"])
        return Schedule(phases=phases, adaptive=_adaptive(increase, 0.0) if adaptive else None,
                        **common)
    return _recipe(cfg, common)


def _increase_section(cfg: Mapping) -> dict | None:
    """``schedule.batch_increase`` with its keys checked for its ``mode``."""
    increase = _section(cfg, "batch_increase", "schedule.batch_increase", None)
    if increase is None:
        return None
    mode = _get(increase, "mode", "schedule.batch_increase", str, "rule")
    if mode not in INCREASE_MODES:
        raise ConfigError("schedule.batch_increase.mode",
                          f"must be one of {', '.join(INCREASE_MODES)}, got {mode!r}")
    _check_keys(increase, _ADAPTIVE_KEYS if mode == "adaptive" else _INCREASE_KEYS,
                "schedule.batch_increase")
    return increase


def _adaptive(increase: Mapping, warmup_end: float) -> AdaptiveBatch:
    """The ``AdaptiveBatch`` rule of a ``batch_increase`` section with ``mode: adaptive``
    (``start_epoch`` defaults to ``warmup_end``); its values are checked by ``Schedule``."""
    path = "schedule.batch_increase"
    return AdaptiveBatch(
        max_batch=_get(increase, "max_batch", path, int),
        factor=_get(increase, "factor", path, float, 2.0),
        margin=_get(increase, "margin", path, float, None),
        interval=_get(increase, "interval", path, int, 100),
        start_epoch=_get(increase, "start_epoch", path, float, warmup_end),
        smoothing=_get(increase, "smoothing", path, float, 0.9))


# -- presets ----------------------------------------------------------------------------------

def _apply_preset(cfg: dict) -> dict:
    name = cfg["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError("schedule.preset",
                          f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    merged = copy.deepcopy(PRESETS[name])
    overrides = {k: v for k, v in cfg.items() if k != "preset"}
    if overrides.get("lr") is not None:
        for key in ("base_lr", "base_batch", "base_momentum"):
            merged.pop(key, None)
    if overrides.get("base_lr") is not None:
        merged.pop("lr", None)
    for key, value in overrides.items():
        old = merged.get(key)
        kind = _REPLACING_FIELD.get(key)
        if value is None:
            merged.pop(key, None)
        elif (isinstance(value, Mapping) and isinstance(old, Mapping)
              and (kind is None or value.get(kind, old.get(kind)) == old.get(kind))):
            merged[key] = {k: v for k, v in {**old, **value}.items() if v is not None}
        else:
            merged[key] = copy.deepcopy(value)
    if "name" not in overrides:
        changed = sorted(set(overrides) - {"source", "workers"})
        merged["name"] = name + (f" (overridden: {', '.join(changed)})" if changed else "")
    return merged


# -- recipe form ------------------------------------------------------------------------------

def _recipe(cfg: dict, common: dict) -> Schedule:
    n = common["dataset_size"]
    epochs = _get(cfg, "epochs", "schedule", float)
    if not epochs > 0:
        raise ConfigError("schedule.epochs", f"must be > 0, got {epochs!r}")
    batch = _get(cfg, "batch", "schedule", int)
    if not 1 <= batch <= n:
        raise ConfigError("schedule.batch", f"global batch {batch} must be in 1..N (N={n})")
    momentum = _momentum(cfg, "momentum", 0.9)
    lr, base_lr = _peak_lr(cfg, batch, momentum)
    shared = {"batch": batch, "momentum": momentum}

    phases, decay_start = [], 0.0
    warmup = _section(cfg, "warmup", "schedule.warmup", _WARMUP_KEYS)
    if warmup is not None:
        decay_start = _get(warmup, "epochs", "schedule.warmup", float)
        if not 0 < decay_start < epochs:
            raise ConfigError("schedule.warmup.epochs",
                              f"must be > 0 and end before training does ({epochs:g} epochs), "
                              f"got {decay_start:g}")
        mode = _get(warmup, "mode", "schedule.warmup", str, "gradual")
        start_lr = _get(warmup, "start_lr", "schedule.warmup", float,
                        base_lr if base_lr is not None else _MISSING)
        if mode == "gradual":
            phases.append(gradual_warmup(0.0, decay_start, start_lr=start_lr, lr=lr, **shared))
        elif mode == "constant":
            phases.append(constant_warmup(0.0, decay_start, start_lr=start_lr, **shared))
        else:
            raise ConfigError("schedule.warmup.mode", f"must be gradual or constant, got {mode!r}")

    decay = _section(cfg, "decay", "schedule.decay", None) or {"type": "constant"}
    kind = _get(decay, "type", "schedule.decay", str)
    if kind not in _DECAY_KEYS:
        raise ConfigError("schedule.decay.type",
                          f"must be one of {', '.join(_DECAY_KEYS)}, got {kind!r}")
    _check_keys(decay, _DECAY_KEYS[kind], "schedule.decay")
    span, path = (decay_start, epochs), "schedule.decay"
    if kind == "constant":
        phases.append(Phase(*span, batch, momentum, lr, lr))
    elif kind == "step":
        phases += step_decay(*span, lr=lr, milestones=_floats(decay, "milestones", path),
                             factor=_get(decay, "factor", path, float), **shared)
    elif kind == "poly":
        phases.append(poly_decay(*span, lr=lr, power=_get(decay, "power", path, float, 2.0),
                                 end_lr=_get(decay, "end_lr", path, float, 0.0), **shared))
    else:
        phases.append(cosine_decay(*span, lr=lr, end_lr=_get(decay, "end_lr", path, float, 0.0),
                                   **shared))

    increase = _increase_section(cfg)
    if increase is not None and increase.get("mode") == "adaptive":
        return Schedule(phases=phases, adaptive=_adaptive(increase, decay_start), **common)
    schedule = Schedule(phases=phases, **common)
    if increase is not None:
        schedule = increase_batch(schedule,
                                  _get(increase, "max_batch", "schedule.batch_increase", int),
                                  _get(increase, "rule", "schedule.batch_increase", str, "linear"))
    return schedule


def _peak_lr(cfg: dict, batch: int, momentum: float) -> tuple[float, float | None]:
    """The lr at ``batch`` after warmup, and the base lr (None without a reference point)."""
    if cfg.get("lr") is not None:
        for key in ("base_lr", "base_batch", "base_momentum"):
            if cfg.get(key) is not None:
                raise ConfigError(f"schedule.{key}", "give either lr, or base_lr with base_batch")
        lr = _get(cfg, "lr", "schedule", float)
        if not lr > 0:
            raise ConfigError("schedule.lr", f"must be > 0, got {lr!r}")
        return lr, None
    if cfg.get("base_lr") is None:
        raise ConfigError("schedule.lr", "is required (or base_lr with base_batch)")
    base_lr = _get(cfg, "base_lr", "schedule", float)
    if not base_lr > 0:
        raise ConfigError("schedule.base_lr", f"must be > 0, got {base_lr!r}")
    base_batch = _get(cfg, "base_batch", "schedule", int)
    if base_batch < 1:
        raise ConfigError("schedule.base_batch", f"must be >= 1, got {base_batch}")
    base_momentum = _momentum(cfg, "base_momentum", momentum)
    return equal_noise_lr(base_lr, base_batch, base_momentum, batch, momentum), base_lr


def _momentum(cfg: dict, key: str, default: float) -> float:
    value = _get(cfg, key, "schedule", float, default)
    if not 0 <= value < 1:
        raise ConfigError(f"schedule.{key}", f"must be in [0, 1), got {value!r}")
    return value


# -- explicit form ----------------------------------------------------------------------------

def _explicit_phases(entries) -> list[Phase]:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError("schedule.phases", "must be a non-empty list of phases")
    phases, start = [], 0.0
    for k, entry in enumerate(entries):
        path = f"schedule.phases[{k}]"
        entry = _mapping(entry, path)
        _check_keys(entry, _PHASE_KEYS, path)
        shape = _get(entry, "shape", path, str, "constant")
        if shape != "poly" and entry.get("power") is not None:
            raise ConfigError(f"{path}.power", f"only for shape poly (this phase is {shape})")
        lr_start = _get(entry, "lr_start", path, float)
        phases.append(Phase(
            start_epoch=start,
            end_epoch=_get(entry, "end_epoch", path, float),
            global_batch=_get(entry, "global_batch", path, int),
            momentum=_get(entry, "momentum", path, float),
            lr_start=lr_start,
            lr_end=_get(entry, "lr_end", path, float, lr_start),
            shape=shape,
            power=_get(entry, "power", path, float, 2.0)))
        start = phases[-1].end_epoch
    return phases


# -- typed access -----------------------------------------------------------------------------

def _mapping(value, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{path}.{key}", "keys must be strings")
    return dict(value)


def _check_keys(section: Mapping, allowed, path: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}", f"unknown key; allowed: {', '.join(allowed)}")


def _section(cfg: Mapping, key: str, path: str, allowed) -> dict | None:
    """A nested mapping (None when absent or null); ``allowed=None`` defers the key check."""
    if cfg.get(key) is None:
        return None
    section = _mapping(cfg[key], path)
    if allowed is not None:
        _check_keys(section, allowed, path)
    return section


def _get(section: Mapping, key: str, path: str, kind: type, default=_MISSING):
    """``section[key]`` as ``kind`` (int, float, bool or str); null counts as absent."""
    value = section.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{path}.{key}", "is required")
        return default
    where = f"{path}.{key}"
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise ConfigError(where, f"must be {'true or false' if kind is bool else 'a string'}, "
                              f"got {value!r}")
        return value
    if isinstance(value, str) and kind is float:
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(where, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(where, f"must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ConfigError(where, f"must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _floats(section: Mapping, key: str, path: str) -> list[float]:
    values = section.get(key)
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{path}.{key}", f"must be a list of epochs, got {values!r}")
    return [_get({key: v}, key, path, float) for v in values]
