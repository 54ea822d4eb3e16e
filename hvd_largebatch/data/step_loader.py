"""The iterator interface shared by the DALI and synthetic loaders.

A loader walks the sampler's iterations of an epoch and yields one ``(images, labels)`` pair per
micro-batch: ``micro_batches`` pairs per iteration (one when gradients are not accumulated).
``images`` is an NCHW tensor, ``labels`` an int64 tensor of the same length. Every rank yields
the same number of pairs per epoch; a pair may be empty (0 samples) when a partial last batch has
fewer samples than there are ranks (x micro-batches).

The position (the next iteration) lives in the sampler and advances when the last micro-batch of
an iteration is handed out, however far the loader has read ahead; ``state_dict()`` is therefore
what a checkpoint taken after that iteration's optimizer step must store.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from hvd_largebatch.data.sampler import GlobalSampler, split_micro_batches
from hvd_largebatch.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # (images NCHW, labels int64)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WorkItem(NamedTuple):
    """One micro-batch to produce: its place in the epoch and this rank's sample indices."""

    epoch: int
    step: int
    micro: int
    indices: np.ndarray


class StepLoader:
    """Base class: subclasses implement ``_produce(items)``, yielding ``(item, (images, labels))``
    for the given work items, in order (they may read ahead)."""

    def __init__(self, sampler: GlobalSampler, micro_batches: int = 1):
        if micro_batches < 1:
            raise ConfigError("train.micro_batches", f"must be >= 1, got {micro_batches}")
        self.sampler = sampler
        self.micro_batches = int(micro_batches)

    def steps(self, epoch: int) -> int:
        """Iterations (optimizer steps) of ``epoch``; the loader yields ``micro_batches`` times as
        many pairs."""
        return self.sampler.num_steps(epoch)

    def max_micro_batch(self) -> int:
        """Largest micro-batch (per rank) the schedule can produce: the size pipelines build for."""
        return max(1, -(-self.sampler.max_rank_batch() // self.micro_batches))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield ``(images, labels)`` for every remaining micro-batch of ``epoch``."""
        for item, batch in self._produce(self._work(epoch)):
            if item.micro == self.micro_batches - 1:
                self.sampler.seek(item.epoch, item.step + 1)
            yield batch

    def close(self) -> None:
        """Release what the loader holds beyond its memory (DALI: the pipeline); a no-op here."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def _work(self, epoch: int) -> Iterator[WorkItem]:
        limit = self.max_micro_batch()
        for step in range(self.sampler.start_step(epoch), self.sampler.num_steps(epoch)):
            parts = split_micro_batches(self.sampler.rank_indices(epoch, step), self.micro_batches)
            for micro, part in enumerate(parts):
                if len(part) > limit:
                    raise ConfigError(
                        "schedule.max_global_batch",
                        f"epoch {epoch} iteration {step} has a micro-batch of {len(part)} "
                        f"samples per rank, more than the {limit} that max_global_batch allows")
                yield WorkItem(epoch, step, micro, part)

    def _produce(self, items: Iterator[WorkItem]) -> Iterator[tuple[WorkItem, Batch]]:
        raise NotImplementedError
