"""The ``Schedule``: lr, global batch and momentum as functions of (epoch, iteration).

Units. A schedule is written in *epochs* (floats; a phase boundary may fall mid-epoch) and is
read by *(epoch, iteration)*: ``epoch`` is the integer index of a pass over the N training
samples, ``iteration`` the index of one optimizer step (one *global* batch, summed over all
ranks) inside that pass.

Position inside an epoch. Iteration ``i`` of epoch ``e`` starts after ``s_i`` samples of the
epoch have been consumed (the sum of the global batches of iterations ``0 .. i-1``), and sits
at the fractional epoch::

    epoch_float = e + s_i / N

An iteration belongs to the phase that contains its *start* (``start_epoch <= epoch_float <
end_epoch``), uses that phase's global batch and momentum, and gets the lr the phase's curve
gives at ``epoch_float``. So the lr is a function of epochs, whatever the batch: during a linear
warmup it grows by the same amount per sample, i.e. by ``slope * B / N`` per iteration, and at an
epoch boundary additionally by the dropped remainder's share.

An epoch ends when its samples run out: with ``drop_last=True`` (the default) the last partial
batch of every epoch is dropped (fewer than the next batch's B samples are skipped; the
sampler reshuffles every epoch, so a different remainder is skipped each time); with
``drop_last=False`` the last iteration of the epoch takes the remaining ``N - s`` samples, so
the epoch's batches add up to N. Training ends at ``epochs``: an iteration runs if it starts
before it, so a fractional last epoch (drop_last only) runs the iterations that start before the
end.

Phase boundaries are compared exactly: a boundary ``b`` given as a float is read as the decimal
it prints as (``repr``), so 0.1 epochs of 50,000 samples is exactly 5,000 samples.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from numbers import Integral, Real

from ..errors import ConfigError

#: lr curves a phase can follow from ``lr_start`` (at ``start_epoch``) to ``lr_end`` (at
#: ``end_epoch``); ``x`` below is the fraction of the phase elapsed, in epochs.
#: constant: lr_start;  linear: lr_start + (lr_end - lr_start) x;
#: poly: lr_end + (lr_start - lr_end) (1 - x)^power;
#: cosine: lr_end + (lr_start - lr_end) (1 + cos(pi x)) / 2.
SHAPES = ("constant", "linear", "poly", "cosine")


@dataclass(frozen=True)
class Phase:
    """A stretch of training ``[start_epoch, end_epoch)`` (epochs) with one global batch and
    one momentum, along which the lr follows one curve (see ``SHAPES``).

    ``global_batch`` is summed over all ranks (samples per optimizer step). ``power`` is used by
    the ``poly`` shape only.
    """

    start_epoch: float
    end_epoch: float
    global_batch: int
    momentum: float
    lr_start: float
    lr_end: float
    shape: str = "constant"
    power: float = 2.0

    @property
    def epochs(self) -> float:
        """Length of the phase in epochs."""
        return self.end_epoch - self.start_epoch

    def lr_at(self, epoch_float: float) -> float:
        """The lr at a fractional epoch (clamped to the phase)."""
        if self.shape == "constant":
            return self.lr_start
        x = min(max((epoch_float - self.start_epoch) / self.epochs, 0.0), 1.0)
        if self.shape == "linear":
            return self.lr_start + (self.lr_end - self.lr_start) * x
        if self.shape == "poly":
            return self.lr_end + (self.lr_start - self.lr_end) * (1.0 - x) ** self.power
        return self.lr_end + (self.lr_start - self.lr_end) * 0.5 * (1.0 + math.cos(math.pi * x))


@dataclass(frozen=True)
class SchedulePoint:
    """What one iteration runs with: its fractional epoch, lr, global batch (all ranks),
    momentum, and the index of its phase in ``Schedule.phases``."""

    epoch_float: float
    lr: float
    global_batch: int
    momentum: float
    phase: int


@dataclass(frozen=True)
class AdaptiveBatch:
    """``schedule.batch_increase: {mode: adaptive, ...}``: the global batch is decided while
    training, from the measured gradient noise scale (McCandlish et al. 2018's B_simple).

    Every ``interval`` updates (counted from the start of training) whose next iteration starts
    at or after ``start_epoch``, the ranks take one decision together: when the smoothed B_simple
    is at least ``margin`` times the current global batch B, B becomes ``factor`` x B, capped at
    ``max_batch`` and rounded down to what the ranks can split (``schedules.adaptive``); the lr
    keeps following the schedule's curve (Smith et al.: increase the batch instead of decaying
    the lr). ``smoothing`` is the decay per measurement of the exponential moving averages the
    estimate is the ratio of (``train.noise_scale_every`` iterations apart). Batches are global
    (all ranks); ``interval`` is in updates (iterations), ``start_epoch`` in epochs.

    Only the batch changes: a decision sets the global batch of every later iteration (of the
    configured later phases too). The phases keep their lr curves, so every phase from
    ``start_epoch`` on must have a constant lr (a step decay is fine).
    """

    max_batch: int
    factor: float = 2.0
    margin: float | None = None  # None: equal to factor (grow while B x factor <= B_simple)
    interval: int = 100
    start_epoch: float = 0.0
    smoothing: float = 0.9

    @property
    def threshold(self) -> float:
        """The ratio B_simple / B at or above which the batch grows (``margin``, else
        ``factor``)."""
        return self.factor if self.margin is None else self.margin

    def to_config(self) -> dict:
        """This rule as a ``schedule.batch_increase`` mapping (``from_config`` reads it back)."""
        config = {"mode": "adaptive", "max_batch": self.max_batch, "factor": self.factor,
                  "interval": self.interval, "start_epoch": self.start_epoch,
                  "smoothing": self.smoothing}
        if self.margin is not None:
            config["margin"] = self.margin
        return config


@dataclass(frozen=True)
class _Run:
    """Consecutive iterations of one phase inside one epoch."""

    phase: int
    first_sample: int  # samples of the epoch consumed before the run's first iteration
    count: int
    batch: int
    last_batch: int  # == batch, except a partial last batch of the epoch (drop_last=False)


def _exact(value: float) -> Fraction:
    """An epoch value as the exact decimal it prints as."""
    return Fraction(repr(float(value)))


@dataclass(frozen=True)
class Schedule:
    """lr, global batch and momentum of every iteration of a training run.

    Args:
        dataset_size: N, training samples per epoch.
        phases: contiguous ``Phase`` objects, the first starting at epoch 0; the last one's
            ``end_epoch`` is the length of training.
        drop_last: drop each epoch's last partial global batch (see the module docstring).
        nesterov: the recipe uses Nesterov momentum (recorded for the optimizer, which owns it).
        workers: the number of ranks the recipe was written for (``None``: not stated).
        name, source: a short name and where the recipe comes from.
        adaptive: an ``AdaptiveBatch`` rule when the batch is decided at run time (the phases
            then hold the batch so far: the first batch, and the decisions applied with
            ``with_batch_from``); None for a batch fixed in advance.

    Bad phases raise ``ConfigError`` naming ``schedule.phases[k].<field>``.
    """

    dataset_size: int
    phases: tuple[Phase, ...]
    drop_last: bool = True
    nesterov: bool = False
    workers: int | None = None
    name: str = ""
    source: str = ""
    adaptive: AdaptiveBatch | None = None
    _bounds: tuple[Fraction, ...] = field(init=False, repr=False, compare=False)
    _runs_cache: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "phases", tuple(self.phases))
        self._check()
        object.__setattr__(self, "_bounds", tuple(_exact(p.end_epoch) for p in self.phases))
        object.__setattr__(self, "_runs_cache", {})

    # -- construction checks ---------------------------------------------------------------

    def _check(self) -> None:
        n = self.dataset_size
        if not isinstance(n, Integral) or isinstance(n, bool) or n < 1:
            raise ConfigError("schedule.dataset_size", f"must be an integer >= 1, got {n!r}")
        if not isinstance(self.drop_last, bool):
            raise ConfigError("schedule.drop_last",
                              f"must be true or false, got {self.drop_last!r}")
        if self.workers is not None and (not isinstance(self.workers, Integral)
                                         or isinstance(self.workers, bool) or self.workers < 1):
            raise ConfigError("schedule.workers", f"must be an integer >= 1, got {self.workers!r}")
        if not self.phases:
            raise ConfigError("schedule.phases", "a schedule needs at least one phase")
        previous_end = 0.0
        for k, p in enumerate(self.phases):
            key = f"schedule.phases[{k}]"
            if not isinstance(p, Phase):
                raise ConfigError(key, f"must be a Phase, got {type(p).__name__}")
            for name in ("start_epoch", "end_epoch", "momentum", "lr_start", "lr_end", "power"):
                value = getattr(p, name)
                if (not isinstance(value, Real) or isinstance(value, bool)
                        or not math.isfinite(value)):
                    raise ConfigError(f"{key}.{name}", f"must be a finite number, got {value!r}")
            if p.start_epoch != previous_end:
                raise ConfigError(f"{key}.start_epoch",
                                  f"must equal the previous phase's end ({previous_end:g}), "
                                  f"got {p.start_epoch:g}")
            if not p.end_epoch > p.start_epoch:
                raise ConfigError(f"{key}.end_epoch", f"must be after start_epoch "
                                  f"({p.start_epoch:g}), got {p.end_epoch:g}")
            b = p.global_batch
            if not isinstance(b, Integral) or isinstance(b, bool) or b < 1:
                raise ConfigError(f"{key}.global_batch", f"must be an integer >= 1, got {b!r}")
            if b > n:
                raise ConfigError(f"{key}.global_batch",
                                  f"global batch {b} is larger than the dataset (N={n})")
            if not 0.0 <= p.momentum < 1.0:
                raise ConfigError(f"{key}.momentum", f"must be in [0, 1), got {p.momentum!r}")
            if p.lr_start < 0 or p.lr_end < 0:
                raise ConfigError(f"{key}.lr_start", f"lr must be >= 0, got {p.lr_start!r} -> "
                                  f"{p.lr_end!r}")
            if p.lr_start == 0 and p.lr_end == 0:
                raise ConfigError(f"{key}.lr_start", "the lr is 0 throughout the phase")
            if p.shape not in SHAPES:
                raise ConfigError(f"{key}.shape",
                                  f"must be one of {', '.join(SHAPES)}, got {p.shape!r}")
            if p.shape == "constant" and p.lr_end != p.lr_start:
                raise ConfigError(f"{key}.lr_end", f"a constant phase needs lr_end == lr_start "
                                  f"({p.lr_start!r}), got {p.lr_end!r}")
            if p.shape == "poly" and not p.power > 0:
                raise ConfigError(f"{key}.power", f"must be > 0, got {p.power!r}")
            previous_end = p.end_epoch
        if not self.drop_last and _exact(previous_end).denominator != 1:
            raise ConfigError("schedule.drop_last", f"training ends mid-epoch (epoch "
                              f"{previous_end:g}); a partial last epoch needs drop_last: true")
        if self.adaptive is not None:
            self._check_adaptive()

    def _check_adaptive(self) -> None:
        """The ``AdaptiveBatch`` rule's values, and the phases it can change."""
        a, key = self.adaptive, "schedule.batch_increase"
        if not isinstance(a, AdaptiveBatch):
            raise ConfigError(key, f"must be an AdaptiveBatch, got {type(a).__name__}")
        first = self.phases[0].global_batch
        if not isinstance(a.max_batch, Integral) or isinstance(a.max_batch, bool) \
                or a.max_batch < first:
            raise ConfigError(f"{key}.max_batch", f"must be an integer >= the first global "
                              f"batch ({first}), got {a.max_batch!r}")
        if a.max_batch > self.dataset_size:
            raise ConfigError(f"{key}.max_batch",
                              f"{a.max_batch} is larger than the dataset (N={self.dataset_size})")
        if not (isinstance(a.factor, Real) and math.isfinite(a.factor) and a.factor > 1):
            raise ConfigError(f"{key}.factor", f"must be a number > 1, got {a.factor!r}")
        if a.margin is not None and not (isinstance(a.margin, Real) and math.isfinite(a.margin)
                                         and a.margin > 0):
            raise ConfigError(f"{key}.margin", f"must be a number > 0, got {a.margin!r}")
        if not isinstance(a.interval, Integral) or isinstance(a.interval, bool) or a.interval < 1:
            raise ConfigError(f"{key}.interval",
                              f"must be an integer >= 1 (updates), got {a.interval!r}")
        if not (isinstance(a.smoothing, Real) and 0 <= a.smoothing < 1):
            raise ConfigError(f"{key}.smoothing", f"must be in [0, 1), got {a.smoothing!r}")
        if not (isinstance(a.start_epoch, Real) and 0 <= a.start_epoch < self.epochs):
            raise ConfigError(f"{key}.start_epoch", f"must be in [0, {self.epochs:g}) epochs, "
                              f"got {a.start_epoch!r}")
        for k, p in enumerate(self.phases):
            if p.shape != "constant" and p.end_epoch > a.start_epoch:
                raise ConfigError(f"{key}.start_epoch",
                                  f"the adaptive batch changes only the batch, so the lr must "
                                  f"be constant where it may change: phase {k} (epochs "
                                  f"{p.start_epoch:g}-{p.end_epoch:g}) has a {p.shape} lr; "
                                  f"start at epoch {p.end_epoch:g} or later, or use a step "
                                  f"decay")

    # -- shape of the run -----------------------------------------------------------------

    @property
    def epochs(self) -> float:
        """Length of training in epochs (may be fractional)."""
        return self.phases[-1].end_epoch

    @property
    def num_epochs(self) -> int:
        """Number of epoch indices to iterate: ``ceil(epochs)`` (the last may be partial)."""
        return math.ceil(self._bounds[-1])

    @property
    def max_global_batch(self) -> int:
        """The largest global batch of any phase."""
        return max(p.global_batch for p in self.phases)

    def _threshold(self, bound: Fraction, epoch: int) -> int:
        """Smallest sample offset ``s`` of ``epoch`` with ``epoch + s/N >= bound``, in [0, N]."""
        x = (bound - epoch) * self.dataset_size
        if x <= 0:
            return 0
        return min(math.ceil(x), self.dataset_size)

    def _runs(self, epoch: int) -> tuple[tuple[_Run, ...], tuple[int, ...]]:
        """The runs of ``epoch`` and the index of each run's first iteration (cached)."""
        cached = self._runs_cache.get(epoch)
        if cached is not None:
            return cached
        if not isinstance(epoch, Integral) or not 0 <= epoch < self.num_epochs:
            raise IndexError(f"epoch {epoch!r} is outside the schedule's 0..{self.num_epochs - 1}")
        n = self.dataset_size
        stop = self._threshold(self._bounds[-1], epoch)  # iterations start at s < stop
        k = bisect.bisect_right(self._bounds, epoch)  # first phase ending after the epoch's start
        s, runs, starts, iteration = 0, [], [], 0
        while s < stop:
            batch = self.phases[k].global_batch
            limit = min(self._threshold(self._bounds[k], epoch), stop)
            count = max(0, -(-(limit - s) // batch))
            out_of_samples = self.drop_last and count > (n - s) // batch
            if out_of_samples:
                count = (n - s) // batch
            if count:
                last = min(batch, n - s - (count - 1) * batch)
                runs.append(_Run(k, s, count, batch, last))
                starts.append(iteration)
                iteration += count
                s += count * batch
            if out_of_samples:
                break
            k += 1
        result = (tuple(runs), tuple(starts))
        self._runs_cache[epoch] = result
        return result

    def epoch_batches(self, epoch: int) -> list[int]:
        """The global batch of every iteration of ``epoch``, in order.

        The single source of truth for how many iterations an epoch has (the sampler and the
        trainer both follow it). Built per run of equal batches, so ImageNet at B=256 (5,004
        iterations) costs a few list concatenations.
        """
        out: list[int] = []
        for run in self._runs(epoch)[0]:
            out += [run.batch] * (run.count - 1)
            out.append(run.last_batch)
        return out

    def epoch_iterations(self, epoch: int) -> int:
        """Number of iterations (optimizer steps) of ``epoch``: ``len(epoch_batches(epoch))``."""
        return sum(run.count for run in self._runs(epoch)[0])

    def at(self, epoch: int, iteration: int) -> SchedulePoint:
        """lr, global batch, momentum and phase of iteration ``iteration`` of epoch ``epoch``.

        Costs O(log(runs)) once the epoch's runs are cached (one entry per phase that the epoch
        touches; building them is one bisection over the phases plus one step per such phase).
        """
        runs, starts = self._runs(epoch)
        total = starts[-1] + runs[-1].count
        if not isinstance(iteration, Integral) or not 0 <= iteration < total:
            raise IndexError(f"iteration {iteration!r} is outside epoch {epoch}'s 0..{total - 1}")
        j = bisect.bisect_right(starts, iteration) - 1
        run = runs[j]
        offset = iteration - starts[j]
        samples = run.first_sample + offset * run.batch
        epoch_float = epoch + samples / self.dataset_size
        phase = self.phases[run.phase]
        batch = run.last_batch if offset == run.count - 1 else run.batch
        return SchedulePoint(epoch_float, phase.lr_at(epoch_float), batch, phase.momentum,
                             run.phase)

    # -- update counts --------------------------------------------------------------------

    @cached_property
    def phase_updates(self) -> tuple[int, ...]:
        """Optimizer steps executed in each phase (following ``epoch_batches``)."""
        counts = [0] * len(self.phases)
        for epoch in range(self.num_epochs):
            for run in self._runs(epoch)[0]:
                counts[run.phase] += run.count
        return tuple(counts)

    @property
    def total_updates(self) -> int:
        """Optimizer steps executed over the whole run (the sum of all epochs' iterations)."""
        return sum(self.phase_updates)

    @property
    def phase_nominal_updates(self) -> tuple[float, ...]:
        """The papers' count per phase: ``epochs x N / B`` (no batch is dropped or partial)."""
        return tuple(p.epochs * self.dataset_size / p.global_batch for p in self.phases)

    @property
    def nominal_updates(self) -> float:
        """The papers' count, ``sum over phases of epochs x N / B``. With ``drop_last`` and
        phase boundaries at whole epochs it exceeds ``total_updates`` by less than one update
        per epoch (each epoch drops fewer samples than one batch); Goyal 1 h: 14,075.3 vs
        14,040 executed."""
        return sum(self.phase_nominal_updates)

    # -- derived schedules and checks -----------------------------------------------------

    def with_dataset_size(self, n: int) -> Schedule:
        """The same schedule (in epochs) for a dataset of ``n`` samples."""
        if isinstance(n, Integral) and not isinstance(n, bool) and 1 <= n < self.max_global_batch:
            raise ConfigError("schedule.dataset_size",
                              f"{n} samples is fewer than the largest global batch "
                              f"({self.max_global_batch})")
        return dataclasses.replace(self, dataset_size=n)

    def validate(self, world_size: int, micro_batches: int = 1) -> None:
        """Check that every phase's global batch splits evenly into ``world_size`` ranks of
        ``micro_batches`` equal micro-batches; raise ``ConfigError`` naming the phase if not.

        (With ``drop_last=False`` the partial last batch of an epoch is split unevenly by the
        sampler and is not checked here.)
        """
        for key, value in (("world_size", world_size), ("micro_batches", micro_batches)):
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(key, f"must be an integer >= 1, got {value!r}")
        parts = world_size * micro_batches
        for k, p in enumerate(self.phases):
            if p.global_batch % parts:
                raise ConfigError(
                    f"schedule.phases[{k}].global_batch",
                    f"global batch {p.global_batch} (epochs {p.start_epoch:g}-{p.end_epoch:g}) "
                    f"is not divisible by world size {world_size} x micro-batches "
                    f"{micro_batches} = {parts}")

    def with_batch_from(self, epoch: int, iteration: int, batch: int) -> Schedule:
        """The same schedule with global batch ``batch`` from iteration ``iteration`` of
        ``epoch`` on (an adaptive batch decision). Iterations before it, and every lr and
        momentum, are unchanged.

        The phase holding the iteration is split exactly where the iteration starts (a float
        boundary that ``epoch_batches`` reads as that sample of the epoch), so the batches before
        it are those of this schedule; a phase with a non-constant lr cannot be split
        (``ValueError``: its curve would restart).
        """
        runs, starts = self._runs(epoch)
        total = starts[-1] + runs[-1].count
        if not isinstance(iteration, Integral) or not 0 <= iteration < total:
            raise IndexError(f"iteration {iteration!r} is outside epoch {epoch}'s 0..{total - 1}")
        j = bisect.bisect_right(starts, iteration) - 1
        sample = runs[j].first_sample + (iteration - starts[j]) * runs[j].batch
        boundary = self._boundary(epoch, sample)
        at = _exact(boundary)
        phases = []
        for k, p in enumerate(self.phases):
            if self._bounds[k] <= at:  # ends before the change
                phases.append(p)
            elif _exact(p.start_epoch) >= at:  # starts after it
                phases.append(dataclasses.replace(p, global_batch=batch))
            else:
                if p.shape != "constant":
                    raise ValueError(f"phase {k} (epochs {p.start_epoch:g}-{p.end_epoch:g}) has "
                                     f"a {p.shape} lr and cannot be split at epoch {boundary!r}")
                phases += [dataclasses.replace(p, end_epoch=boundary),
                           dataclasses.replace(p, start_epoch=boundary, global_batch=batch)]
        return dataclasses.replace(self, phases=tuple(phases))

    def _boundary(self, epoch: int, sample: int) -> float:
        """A float epoch ``b`` that the schedule reads as sample ``sample`` of ``epoch``
        (``_threshold(b, epoch) == sample``): an existing phase boundary when one is there, else
        the float nearest to ``epoch + sample / N`` that rounds the right way."""
        for k, bound in enumerate(self._bounds[:-1]):
            if epoch <= bound <= epoch + 1 and self._threshold(bound, epoch) == sample:
                return self.phases[k].end_epoch
        value = float(epoch + Fraction(sample, self.dataset_size))
        for _ in range(64):  # a few ulps at most
            got = self._threshold(_exact(value), epoch)
            if got == sample:
                return value
            value = math.nextafter(value, -math.inf if got > sample else math.inf)
        raise AssertionError(f"no float boundary for sample {sample} of epoch {epoch}")

    def to_config(self) -> dict:
        """This schedule as an explicit ``schedule:`` section (``from_config`` reads it back)."""
        config = {"name": self.name, "source": self.source, "dataset_size": self.dataset_size,
                  "drop_last": self.drop_last, "nesterov": self.nesterov}
        if self.workers is not None:
            config["workers"] = self.workers
        if self.adaptive is not None:
            config["batch_increase"] = self.adaptive.to_config()
        config["phases"] = []
        for p in self.phases:
            entry = {"end_epoch": p.end_epoch, "global_batch": p.global_batch,
                     "momentum": p.momentum, "lr_start": p.lr_start, "lr_end": p.lr_end,
                     "shape": p.shape}
            if p.shape == "poly":
                entry["power"] = p.power
            config["phases"].append(entry)
        return config


def accumulation_steps(per_rank_batch: int, max_micro_batch: int) -> int:
    """Fewest micro-batches K that split ``per_rank_batch`` into equal parts of at most
    ``max_micro_batch`` samples (K divides the per-rank batch)."""
    if max_micro_batch < 1:
        raise ConfigError("max_per_rank_batch", f"must be >= 1, got {max_micro_batch}")
    k = -(-per_rank_batch // max_micro_batch)
    while per_rank_batch % k:
        k += 1
    return k
