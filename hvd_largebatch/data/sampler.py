"""The global sampler: which samples every rank reads at every iteration.

Goyal et al. remark 4: one random shuffle of the whole training set per epoch, split into k
parts. Here the split follows the batch-size schedule instead of a fixed shard per rank:

* The permutation of epoch ``e`` depends only on ``(seed, e)``, never on the world size or rank.
* Iteration ``s`` takes the next ``B(s)`` indices of that permutation, where ``B(s)`` is the
  *global* batch the schedule gives for that iteration (``schedule.epoch_batches(e)[s]``); the
  batch may change at any phase boundary, also in the middle of an epoch.
* Rank ``r`` of ``W`` takes the contiguous slice ``[r*B // W, (r+1)*B // W)`` of that global
  batch, so the global batch of every iteration is the same for any world size that divides it,
  and a run can continue on a different number of ranks (resume from ``state_dict()``) and read
  exactly the samples it would have read without the interruption, in the same order.

Guarantees within an epoch: no sample is read twice; with ``drop_last=False`` every sample is
read exactly once over all ranks (the schedule's batches must then add up to the dataset size and
the last batch may be partial; it is split as evenly as possible, so ranks may get slices that
differ by one sample, and a rank gets an empty slice when the last batch has fewer samples than
there are ranks). Every rank takes the same number of iterations, so no rank waits alone in an
allreduce. Every batch but a partial last one must be divisible by the world size.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np

from hvd_largebatch.errors import ConfigError


class BatchSchedule(Protocol):
    """The part of ``hvd_largebatch.schedules.Schedule`` the sampler reads."""

    dataset_size: int
    max_global_batch: int

    def epoch_batches(self, epoch: int) -> Sequence[int]:
        """Global batch of every iteration of ``epoch``, in order."""


class FixedBatchSchedule:
    """A constant global batch every iteration: the schedule of a validation pass.

    ``epoch_batches`` gives ``dataset_size // global_batch`` full batches and, unless
    ``drop_last``, one final partial batch with the remaining samples.
    """

    def __init__(self, dataset_size: int, global_batch: int, drop_last: bool = False):
        if dataset_size < 1:
            raise ConfigError("schedule.dataset_size", f"must be >= 1, got {dataset_size}")
        if global_batch < 1:
            raise ConfigError("schedule.global_batch", f"must be >= 1, got {global_batch}")
        self.dataset_size = int(dataset_size)
        self.max_global_batch = int(global_batch)
        self.drop_last = bool(drop_last)

    def epoch_batches(self, epoch: int) -> list[int]:
        full, rest = divmod(self.dataset_size, self.max_global_batch)
        batches = [self.max_global_batch] * full
        if rest and not self.drop_last:
            batches.append(rest)
        return batches


def even_split_bounds(n: int, parts: int) -> np.ndarray:
    """Boundaries ``[j*n // parts for j in 0..parts]`` of ``parts`` contiguous pieces of ``n``.

    Piece sizes differ by at most one; they are all ``n / parts`` when ``parts`` divides ``n``.
    """
    return (np.arange(parts + 1, dtype=np.int64) * n) // parts


def split_micro_batches(indices: np.ndarray, k: int) -> list[np.ndarray]:
    """Split one rank's share of an iteration into ``k`` contiguous micro-batches (views).

    Used for gradient accumulation: the micro-batches of all ranks, concatenated in rank order
    and then micro-batch order per rank, are the global batch of the iteration. Sizes differ by at
    most one (only a partial last batch is not divisible).
    """
    if k < 1:
        raise ConfigError("train.micro_batches", f"must be >= 1, got {k}")
    bounds = even_split_bounds(len(indices), k)
    return [indices[bounds[j]:bounds[j + 1]] for j in range(k)]


class GlobalSampler:
    """Per-iteration sample indices of one rank, following a batch-size schedule.

    Args:
        num_samples: dataset size N (must equal ``schedule.dataset_size``).
        schedule: gives the global batch of every iteration (``epoch_batches(epoch)``).
        world_size, rank: this rank's place among the data-parallel ranks.
        seed: the per-epoch permutation is a function of ``(seed, epoch)`` only.
        drop_last: ``False`` requires the schedule to cover the whole dataset every epoch
            (exactly-once reading); ``True`` allows it to leave a remainder unread.
        shuffle: ``False`` reads the dataset in index order (validation).

    ``epoch(e)`` yields this rank's indices (int64 numpy array) per iteration and records the
    position; ``state_dict()`` / ``load_state_dict()`` resume at (epoch, iteration) exactly, also
    on a different world size.
    """

    def __init__(self, num_samples: int, schedule: BatchSchedule, world_size: int, rank: int,
                 seed: int = 0, drop_last: bool = True, shuffle: bool = True):
        if num_samples < 1:
            raise ConfigError("data.num_samples", f"must be >= 1, got {num_samples}")
        if int(schedule.dataset_size) != num_samples:
            raise ConfigError(
                "schedule.dataset_size",
                f"the schedule is for {schedule.dataset_size} samples but the data has "
                f"{num_samples}; build it with schedule.with_dataset_size({num_samples})")
        if world_size < 1:
            raise ConfigError("world_size", f"must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError("rank", f"must be in [0, {world_size}), got {rank}")
        if seed < 0:
            raise ConfigError("data.seed", f"must be >= 0, got {seed}")
        schedule_drop_last = getattr(schedule, "drop_last", drop_last)
        if bool(schedule_drop_last) != bool(drop_last):
            raise ConfigError(
                "schedule.drop_last",
                f"the schedule has drop_last={schedule_drop_last} but the sampler was asked for "
                f"drop_last={drop_last}")
        self.num_samples = int(num_samples)
        self.schedule = schedule
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self._offsets: dict[int, np.ndarray] = {}
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._epoch = 0
        self._step = 0

    @classmethod
    def for_validation(cls, num_samples: int, global_batch: int, world_size: int,
                       rank: int) -> "GlobalSampler":
        """Every sample once per pass, in index order, ``global_batch`` per iteration (a partial
        last batch takes the rest); ``global_batch`` must be divisible by ``world_size``."""
        schedule = FixedBatchSchedule(num_samples, global_batch, drop_last=False)
        return cls(num_samples, schedule, world_size, rank, drop_last=False, shuffle=False)

    # -- plan of an epoch -------------------------------------------------------------------
    def offsets(self, epoch: int) -> np.ndarray:
        """Cumulative global batch sizes of ``epoch``: iteration s reads permutation entries
        ``[offsets[s], offsets[s+1])``. Length = iterations + 1. Validated once per epoch."""
        cached = self._offsets.get(epoch)
        if cached is not None:
            return cached
        if epoch < 0:
            raise ConfigError("epoch", f"must be >= 0, got {epoch}")
        batches = np.asarray(list(self.schedule.epoch_batches(epoch)), dtype=np.int64)
        where = f"epoch {epoch}"
        if batches.size and batches.min() < 1:
            s = int(np.argmin(batches))
            raise ConfigError("schedule", f"{where} iteration {s}: global batch {batches[s]} < 1")
        total = int(batches.sum())
        if total > self.num_samples:
            raise ConfigError(
                "schedule", f"{where} reads {total} samples but the dataset has {self.num_samples}")
        if not self.drop_last and total != self.num_samples:
            raise ConfigError(
                "schedule",
                f"{where} reads {total} of {self.num_samples} samples; drop_last=False needs "
                f"every sample read once per epoch")
        # A partial last batch (only with drop_last=False) may be split unevenly; all others
        # must divide by the world size so that every rank gets B / world_size samples.
        must_divide = batches if self.drop_last else batches[:-1]
        bad = np.flatnonzero(must_divide % self.world_size)
        if bad.size:
            s = int(bad[0])
            raise ConfigError(
                "schedule",
                f"{where} iteration {s}: global batch {batches[s]} is not divisible by "
                f"world size {self.world_size}")
        offsets = np.zeros(batches.size + 1, dtype=np.int64)
        np.cumsum(batches, out=offsets[1:])
        if len(self._offsets) > 8:
            self._offsets.clear()
        self._offsets[epoch] = offsets
        return offsets

    def num_steps(self, epoch: int) -> int:
        """Iterations in ``epoch`` (identical on every rank)."""
        return len(self.offsets(epoch)) - 1

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` reads the dataset; depends only on (seed, epoch)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                self._perm = rng.permutation(self.num_samples).astype(np.int64, copy=False)
            else:
                self._perm = np.arange(self.num_samples, dtype=np.int64)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """All samples of iteration ``step`` of ``epoch`` (the global batch), in rank order."""
        offsets = self._checked_offsets(epoch, step)
        return self.permutation(epoch)[offsets[step]:offsets[step + 1]]

    def rank_indices(self, epoch: int, step: int) -> np.ndarray:
        """This rank's contiguous slice of the global batch of iteration ``step``."""
        batch = self.global_indices(epoch, step)
        bounds = even_split_bounds(len(batch), self.world_size)
        return batch[bounds[self.rank]:bounds[self.rank + 1]]

    def max_rank_batch(self) -> int:
        """Largest per-rank batch the schedule can ask for: ceil(max_global_batch / world size)."""
        return -(-int(self.schedule.max_global_batch) // self.world_size)

    def _checked_offsets(self, epoch: int, step: int) -> np.ndarray:
        offsets = self.offsets(epoch)
        if not 0 <= step < len(offsets) - 1:
            raise IndexError(f"epoch {epoch} has {len(offsets) - 1} iterations; no iteration {step}")
        return offsets

    # -- iteration and position -------------------------------------------------------------
    def start_step(self, epoch: int) -> int:
        """First iteration ``epoch(epoch)`` yields: the recorded position when it is in this
        epoch (after ``load_state_dict`` or an interrupted epoch), else 0."""
        return self._step if epoch == self._epoch else 0

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield this rank's indices (int64 numpy array) for every remaining iteration of
        ``epoch``. The position advances as each array is handed out."""
        for step in range(self.start_step(epoch), self.num_steps(epoch)):
            indices = self.rank_indices(epoch, step)
            self.seek(epoch, step + 1)
            yield indices

    def seek(self, epoch: int, step: int) -> None:
        """Record that iterations ``[0, step)`` of ``epoch`` have been consumed."""
        if not 0 <= step <= self.num_steps(epoch):
            raise ConfigError(
                "sampler.step", f"epoch {epoch} has {self.num_steps(epoch)} iterations; got {step}")
        self._epoch, self._step = int(epoch), int(step)

    def set_schedule(self, schedule: BatchSchedule) -> None:
        """Follow ``schedule`` from the current position on (an adaptive batch decision): it must
        give the iterations already read in this epoch the same batches, so the position stays
        the same samples; ValueError otherwise."""
        if int(schedule.dataset_size) != self.num_samples:
            raise ValueError(f"the new schedule is for {schedule.dataset_size} samples, the "
                             f"sampler has {self.num_samples}")
        before = self.offsets(self._epoch)[:self._step + 1]
        old = self.schedule, self._offsets
        self.schedule, self._offsets = schedule, {}
        after = self.offsets(self._epoch)
        if len(after) <= self._step or not np.array_equal(after[:self._step + 1], before):
            self.schedule, self._offsets = old
            raise ValueError(f"the new schedule changes iterations 0..{self._step - 1} of epoch "
                             f"{self._epoch}, which were read already")

    def state_dict(self) -> dict:
        """Position (the next iteration to read) plus what must match on resume.

        Holds no world size or rank: a state saved on W ranks loads on W' ranks.
        ``samples_seen`` (global samples read this epoch) lets ``load_state_dict`` detect a
        checkpoint taken under a different batch schedule.
        """
        return {
            "epoch": self._epoch,
            "step": self._step,
            "samples_seen": int(self.offsets(self._epoch)[self._step]),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s (epoch, iteration); the next ``epoch(state['epoch'])`` continues
        from there."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples),
                          ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ConfigError(
                    f"sampler.{key}", f"checkpoint has {key}={state[key]!r}, this run {mine!r}")
        epoch, step = int(state["epoch"]), int(state["step"])
        offsets = self.offsets(epoch)
        if not 0 <= step < len(offsets):
            raise ConfigError(
                "sampler.step", f"epoch {epoch} has {len(offsets) - 1} iterations; got {step}")
        if int(offsets[step]) != int(state["samples_seen"]):
            raise ConfigError(
                "schedule",
                f"checkpoint at epoch {epoch} iteration {step} had read {state['samples_seen']} "
                f"samples, this schedule reads {offsets[step]} by then: the batch schedule changed")
        self.seek(epoch, step)
