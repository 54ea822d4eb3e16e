"""The papers' rules between lr, global batch B and momentum m, and Smith's conversion.

- Goyal et al.'s linear scaling rule: ``lr = base_lr * B / base_batch``.
- Smith et al.'s SGD noise scale ``g = lr / (1 - m) * (N / B - 1)`` (N training samples); for
  B << N it is ``~ lr N / (B (1 - m))``, which is what their scaling rules hold fixed:
  B proportional to lr, and B proportional to 1 / (1 - m) (``equal_noise_lr``).
- Smith et al.'s "don't decay the lr, increase the batch": ``increase_batch``.
"""
from __future__ import annotations

import dataclasses
from numbers import Integral

from ..errors import ConfigError
from .schedule import Schedule

#: How ``increase_batch`` picks a phase's lr once its batch is chosen.
#: ``linear``: lr / (B (1 - m)) equals the original phase's (the papers' rule; it keeps the
#: noise scale's B << N form, and the full g within a factor (N - B') / (N - B)).
#: ``noise_scale``: lr makes g = lr / (1 - m) (N / B - 1) exactly the original phase's.
INCREASE_RULES = ("linear", "noise_scale")


def linear_scaling_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Goyal et al.'s linear scaling rule: the lr for global batch ``batch`` given ``base_lr``
    at ``base_batch`` (e.g. 0.1 at 256 -> 3.2 at 8192)."""
    return base_lr * batch / base_batch


def equal_noise_lr(lr: float, batch: int, momentum: float, new_batch: int,
                   new_momentum: float) -> float:
    """The lr that keeps ``lr / (B (1 - m))`` (the noise scale for B << N) when moving from
    ``(batch, momentum)`` to ``(new_batch, new_momentum)``: Smith et al.'s rules B ~ lr and
    B ~ 1 / (1 - m). E.g. (0.1, 128, 0.9) -> 640 at 0.9: 0.5; -> 3200 at 0.98: 0.5."""
    return linear_scaling_lr(lr, batch, new_batch) * (1.0 - new_momentum) / (1.0 - momentum)


def noise_scale(lr: float, batch: int, momentum: float, dataset_size: int) -> float:
    """Smith et al.'s SGD noise scale ``g = lr / (1 - m) * (N / B - 1)`` (B: global batch)."""
    return lr / (1.0 - momentum) * (dataset_size / batch - 1.0)


def increase_batch(schedule: Schedule, max_batch: int, rule: str = "linear") -> Schedule:
    """Smith et al.'s conversion: replace each lr drop by a batch increase of the same factor.

    Walks the phases in order. The first phase may be a warmup with any lr curve and is kept;
    every later phase must have a constant lr. Where the original lowers the noise
    (``lr / (B (1 - m))``) by a factor d > 1, the converted batch is the previous converted
    batch times d, rounded to an integer and capped at ``max_batch``; the phase's lr then
    follows ``rule`` (see ``INCREASE_RULES``) from the original phase's (lr, B, m), so the part
    of d that the cap refuses goes to the lr. Without a cap this gives Smith's "increasing
    batch" schedule, with one the "hybrid". Phase boundaries (epochs) and momenta are kept.

    Raises ``ConfigError`` (``schedule.batch_increase.*``) for a ``max_batch`` below the first
    batch or above the dataset, an unknown rule, or a decay that is not a step decay.
    """
    key = "schedule.batch_increase"
    if rule not in INCREASE_RULES:
        raise ConfigError(f"{key}.rule",
                          f"must be one of {', '.join(INCREASE_RULES)}, got {rule!r}")
    n = schedule.dataset_size
    first = schedule.phases[0].global_batch
    if not isinstance(max_batch, Integral) or isinstance(max_batch, bool) or max_batch < first:
        raise ConfigError(f"{key}.max_batch", f"must be an integer >= the first global batch "
                          f"({first}), got {max_batch!r}")
    if max_batch > n:
        raise ConfigError(f"{key}.max_batch",
                          f"{max_batch} is larger than the dataset (N={n})")
    if rule == "noise_scale" and max_batch == n:
        raise ConfigError(f"{key}.max_batch", "the noise_scale rule needs max_batch < N "
                          "(at B = N the noise scale is 0 whatever the lr)")

    def intensity(p):
        return p.lr_start / (p.global_batch * (1.0 - p.momentum))

    phases, previous = [], None  # previous: (original phase, converted batch)
    for k, p in enumerate(schedule.phases):
        if p.shape != "constant":
            if k > 0 or len(schedule.phases) == 1:
                raise ConfigError(key, f"needs a step decay (constant-lr phases after an "
                                  f"optional warmup); phase {k} (epochs {p.start_epoch:g}-"
                                  f"{p.end_epoch:g}) has a {p.shape} lr")
            phases.append(p)  # the warmup
            continue
        if previous is None:
            batch = p.global_batch
        else:
            original, prev_batch = previous
            factor = intensity(original) / intensity(p)
            batch = min(max_batch, round(prev_batch * factor)) if factor > 1 else prev_batch
        if rule == "linear":
            lr = equal_noise_lr(p.lr_start, p.global_batch, p.momentum, batch, p.momentum)
        else:
            lr = p.lr_start * (n / p.global_batch - 1.0) / (n / batch - 1.0)
        phases.append(dataclasses.replace(p, global_batch=batch, lr_start=lr, lr_end=lr))
        previous = (p, batch)
    return dataclasses.replace(schedule, phases=tuple(phases))
