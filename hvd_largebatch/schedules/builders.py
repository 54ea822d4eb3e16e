"""Phase builders: warmups and lr decays, in epochs, at one global batch and momentum.

Each returns ``Phase`` objects to put in a ``Schedule``; bad arguments raise ``ConfigError``
naming the ``schedule:`` config key they come from (``schedule.warmup.*``, ``schedule.decay.*``).
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from .schedule import Phase


def _check_lr(value: float, key: str, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def gradual_warmup(start_epoch: float, end_epoch: float, *, batch: int, momentum: float,
                   start_lr: float, lr: float) -> Phase:
    """Goyal et al.'s gradual warmup: the lr grows linearly from ``start_lr`` (the base lr)
    at ``start_epoch`` to ``lr`` (the scaled lr) at ``end_epoch``."""
    _check_lr(start_lr, "schedule.warmup.start_lr", allow_zero=True)
    return Phase(start_epoch, end_epoch, batch, momentum, start_lr, lr, "linear")


def constant_warmup(start_epoch: float, end_epoch: float, *, batch: int, momentum: float,
                    start_lr: float) -> Phase:
    """Goyal et al.'s constant warmup: hold ``start_lr`` until ``end_epoch``, then the next
    phase starts at the full lr."""
    _check_lr(start_lr, "schedule.warmup.start_lr")
    return Phase(start_epoch, end_epoch, batch, momentum, start_lr, start_lr, "constant")


def step_decay(start_epoch: float, end_epoch: float, *, batch: int, momentum: float, lr: float,
               milestones: Sequence[float], factor: float) -> list[Phase]:
    """Constant lr, multiplied by ``factor`` at each milestone (epochs, strictly increasing,
    strictly inside ``(start_epoch, end_epoch)``): one phase per lr value."""
    if not 0 < factor < 1:
        raise ConfigError("schedule.decay.factor", f"must be in (0, 1), got {factor!r}")
    edges = [start_epoch, *milestones, end_epoch]
    for previous, milestone in zip(edges, milestones):
        if not milestone > previous:
            raise ConfigError("schedule.decay.milestones",
                              f"must be increasing and after the warmup's end ({start_epoch:g}); "
                              f"got {list(milestones)}")
    if milestones and not milestones[-1] < end_epoch:
        raise ConfigError("schedule.decay.milestones", f"must be before the end of training "
                          f"({end_epoch:g}); got {list(milestones)}")
    return [Phase(a, b, batch, momentum, lr * factor ** i, lr * factor ** i, "constant")
            for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def poly_decay(start_epoch: float, end_epoch: float, *, batch: int, momentum: float, lr: float,
               power: float = 2.0, end_lr: float = 0.0) -> Phase:
    """LARS's polynomial decay ``lr_t = end_lr + (lr - end_lr) (1 - x)^power``, x the elapsed
    fraction of ``[start_epoch, end_epoch)`` (You et al.: power 2, end_lr 0)."""
    if not power > 0:
        raise ConfigError("schedule.decay.power", f"must be > 0, got {power!r}")
    _check_end_lr(end_lr, lr)
    return Phase(start_epoch, end_epoch, batch, momentum, lr, end_lr, "poly", power)


def cosine_decay(start_epoch: float, end_epoch: float, *, batch: int, momentum: float, lr: float,
                 end_lr: float = 0.0) -> Phase:
    """Half-cosine from ``lr`` at ``start_epoch`` to ``end_lr`` at ``end_epoch``."""
    _check_end_lr(end_lr, lr)
    return Phase(start_epoch, end_epoch, batch, momentum, lr, end_lr, "cosine")


def _check_end_lr(end_lr: float, lr: float) -> None:
    if not 0 <= end_lr < lr:
        raise ConfigError("schedule.decay.end_lr", f"must be in [0, lr={lr:g}), got {end_lr!r}")
