"""Schedules: lr, global batch and momentum as functions of (epoch, iteration), and presets.

The one object the trainer, the data pipeline and the optimizer all read. It carries the
papers' rules, so an existing recipe converts into a large-batch or increasing-batch one
without tuning:

- ``schedule``: ``Schedule`` (``epoch_batches``, ``at``, update counts, ``validate``,
  ``with_batch_from``), ``Phase``, ``SchedulePoint``, ``AdaptiveBatch``, ``accumulation_steps``.
- ``adaptive``: the adaptive batch (``batch_increase: {mode: adaptive}``): when a decision is
  due, the grown batch, replaying a run's decisions, the bounds ``plan`` shows.
- ``builders``: gradual / constant warmup, step, polynomial and cosine decay phases.
- ``rules``: the linear scaling rule, Smith et al.'s noise scale and equal-noise rules, and
  ``increase_batch`` (lr drops -> batch increases, then the hybrid at a batch cap).
- ``config``: ``from_config`` (the ``schedule:`` section of a YAML config) and ``preset``.
- ``presets``: the papers' recipes (``PRESETS``).
- ``timing``: the predicted seconds per iteration and time to train of a job (compute,
  gradient exchange, overlap, optimizer step, input pipeline), used by ``plan`` and ``launch``.
"""
from .builders import constant_warmup, cosine_decay, gradual_warmup, poly_decay, step_decay
from .config import from_config, preset
from .presets import PRESETS
from .rules import (INCREASE_RULES, equal_noise_lr, increase_batch, linear_scaling_lr,
                    noise_scale)
from .schedule import SHAPES, AdaptiveBatch, Phase, Schedule, SchedulePoint, accumulation_steps

__all__ = [
    "INCREASE_RULES", "PRESETS", "AdaptiveBatch", "SHAPES", "Phase", "Schedule", "SchedulePoint",
    "accumulation_steps", "constant_warmup", "cosine_decay", "equal_noise_lr", "from_config",
    "gradual_warmup", "increase_batch", "linear_scaling_lr", "noise_scale", "poly_decay",
    "preset", "step_decay",
]
