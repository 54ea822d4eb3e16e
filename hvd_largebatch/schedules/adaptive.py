"""The adaptive batch: when it may grow, to what, and what a run's decisions make of a schedule.

A schedule with an ``AdaptiveBatch`` rule (``schedule.batch_increase: {mode: adaptive}``) starts
at its first global batch; the trainer takes a *decision* after every ``interval``-th update
(``updates % interval == 0``, updates counted from the start of training) when the next
iteration starts at or after ``start_epoch`` and its batch is below the cap (:func:`decision_due`).
The measured, smoothed gradient noise scale B_simple (McCandlish et al. 2018, in samples) is then
compared with that iteration's global batch B: the batch grows when ``B_simple >= threshold x B``
(``threshold`` = ``margin``, by default ``factor``), to :func:`grown_batch` (``factor x B``,
capped and rounded down so that the ranks can split it), from the next iteration on. Everything
here is pure: the measurement and the collective that makes every rank take the same decision
are the trainer's.

A decision is recorded as a :class:`BatchDecision`; :func:`replay` applies the recorded ones
to the configured schedule, which is how a resumed run (on any world size) gets back the
batches it ran with. :func:`update_bounds` gives what ``plan`` shows: the most updates (the
batch never grows) and the fewest (it grows at every decision until the cap).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError
from .schedule import AdaptiveBatch, Schedule


@dataclass(frozen=True)
class BatchDecision:
    """One decision of a run: after ``updates`` updates, with B_simple measured at
    ``noise_scale`` samples (None: not resolved yet), the global batch ``batch`` became
    ``new_batch`` (equal when it was kept) from iteration ``iteration`` of ``epoch`` on."""

    updates: int
    epoch: int
    iteration: int
    noise_scale: float | None
    batch: int
    new_batch: int

    @property
    def grew(self) -> bool:
        return self.new_batch != self.batch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BatchDecision:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def next_iteration(schedule: Schedule, epoch: int, done: int) -> tuple[int, int] | None:
    """The next iteration to run once ``done`` iterations of ``epoch`` have run:
    ``(epoch, done)``, the first of the next epoch, or None at the end of training."""
    if done < schedule.epoch_iterations(epoch):
        return epoch, done
    if epoch + 1 < schedule.num_epochs and schedule.epoch_iterations(epoch + 1):
        return epoch + 1, 0
    return None


def decision_due(schedule: Schedule, updates: int, epoch: int, iteration: int) -> bool:
    """Whether a decision is taken after ``updates`` updates, the next iteration being
    ``(epoch, iteration)``: the same answer on every rank (it depends on counters only)."""
    rule = schedule.adaptive
    if rule is None or updates <= 0 or updates % rule.interval:
        return False
    point = schedule.at(epoch, iteration)
    return point.global_batch < rule.max_batch and point.epoch_float >= rule.start_epoch


def grown_batch(batch: int, rule: AdaptiveBatch, world_size: int, max_per_rank_batch: int,
                bn_group: int | None = None) -> int:
    """The global batch after growing ``batch``: ``factor x batch`` capped at ``max_batch``,
    rounded down to ``world_size`` equal per-rank batches that split into equal micro-batches
    of at most ``max_per_rank_batch`` samples (of whole ``bn_group`` groups with ghost BN).
    ``batch`` itself when rounding leaves nothing larger."""
    target = min(math.floor(batch * rule.factor), rule.max_batch)
    unit = bn_group or 1
    units = target // world_size // unit  # per rank, in BN groups (samples without ghost BN)
    per_micro = max(1, max_per_rank_batch // unit)
    micro = -(-units // per_micro)  # fewest micro-batches that hold them
    if micro > 1:
        units -= units % micro
    grown = units * unit * world_size
    return grown if grown > batch else batch


def decide(noise_scale: float | None, batch: int, rule: AdaptiveBatch, world_size: int,
           max_per_rank_batch: int, bn_group: int | None = None) -> int:
    """The global batch after a decision: :func:`grown_batch` when ``noise_scale`` (the smoothed
    B_simple, samples) is at least ``rule.threshold x batch``, else ``batch``."""
    if noise_scale is None or not math.isfinite(noise_scale):
        return batch
    if noise_scale >= rule.threshold * batch:
        return grown_batch(batch, rule, world_size, max_per_rank_batch, bn_group)
    return batch


def replay(schedule: Schedule, decisions) -> Schedule:
    """``schedule`` with the recorded decisions (``BatchDecision`` or their dicts, in order)
    applied; ConfigError when they do not fit it (the checkpoint comes from another schedule)."""
    for d in decisions:
        d = d if isinstance(d, BatchDecision) else BatchDecision.from_dict(d)
        if not d.grew:
            continue
        try:
            current = schedule.at(d.epoch, d.iteration).global_batch
        except IndexError:
            current = None
        if current != d.batch:
            raise ConfigError("schedule.batch_increase",
                              f"the checkpoint's batch decision after update {d.updates} "
                              f"({d.batch} -> {d.new_batch} at epoch {d.epoch}, iteration "
                              f"{d.iteration}) does not fit this schedule (batch {current} "
                              f"there): the schedule changed")
        schedule = schedule.with_batch_from(d.epoch, d.iteration, d.new_batch)
    return schedule


def update_bounds(schedule: Schedule, world_size: int, max_per_rank_batch: int,
                  bn_group: int | None = None) -> tuple[int, int, Schedule]:
    """``(fewest, most, fastest)``: the fewest updates an adaptive run can take (the batch grows
    at every decision until the cap), the most (it never grows), and the schedule of the
    fewest. ``max_per_rank_batch``: as ``train.max_per_rank_batch`` (the rounding)."""
    rule = schedule.adaptive
    if rule is None:
        raise ConfigError("schedule.batch_increase", "update bounds need mode: adaptive")
    fastest = schedule
    epoch, before = 0, 0  # the epoch holding update `updates`, and the updates before it
    updates = rule.interval
    while True:
        while (epoch < fastest.num_epochs
               and updates >= before + fastest.epoch_iterations(epoch)):
            before += fastest.epoch_iterations(epoch)
            epoch += 1
        if epoch >= fastest.num_epochs:
            return fastest.total_updates, schedule.total_updates, fastest
        iteration = updates - before
        if decision_due(fastest, updates, epoch, iteration):
            batch = fastest.at(epoch, iteration).global_batch
            grown = grown_batch(batch, rule, world_size, max_per_rank_batch, bn_group)
            if grown > batch:
                fastest = fastest.with_batch_from(epoch, iteration, grown)
        updates += rule.interval
