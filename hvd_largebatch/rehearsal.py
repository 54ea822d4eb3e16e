"""``train --synthetic``: any config, shrunk to a few iterations on random data, so that a job
(for example a 256-GPU ImageNet config) can be rehearsed on a laptop before it is queued.

What is scaled (everything else -- model, image size, optimizer, lr and momentum values, lr
curve shapes, Nesterov, ``drop_last``, micro-batch cap, checkpointing, logging -- is kept):

* **global batch**: every phase's batch ``B`` becomes ``W * max(1, round(B * s / W))`` (``W``:
  the rehearsal's world size), with ``s = min(MIN_RANK_BATCH * W / B_min,
  MAX_RANK_BATCH * W / B_max)``: the smallest phase runs ``MIN_RANK_BATCH`` samples per rank,
  unless that would put more than ``MAX_RANK_BATCH`` per rank in the largest one. Ratios between
  phases are kept up to that rounding (and the clamp to ``W`` when they span more than
  ``MAX_RANK_BATCH / MIN_RANK_BATCH``).
* **epochs**: the run lasts ``EPOCHS`` epochs (or fewer if the config has fewer); every phase
  boundary is multiplied by ``EPOCHS / epochs``, so a phase keeps its share of training (Goyal's
  5 warmup epochs of 90 become 0.167 of 3).
* **dataset**: random images (``data.source: synthetic``) of ``N = max(STEPS_AT_MAX_BATCH *
  B'_max, max_k ceil(SAMPLES_PER_PHASE * B'_k / epochs_k))`` training samples, so that every
  phase (``epochs_k`` long after the stretch) spans at least ``SAMPLES_PER_PHASE`` of its
  batches and runs at least one iteration; one validation pass of ``B'_max`` samples.
  ``model.num_classes`` (else the data's class count when the data is there, else 1000) is kept.
* **device**: ``auto`` (a job written for GPUs rehearses on a laptop's CPU).
* **output**: ``<output.dir>-synthetic``, with a metrics row every iteration.
"""
from __future__ import annotations

import dataclasses
import math

from hvd_largebatch.config import Config
from hvd_largebatch.schedules import Schedule

MIN_RANK_BATCH = 2
MAX_RANK_BATCH = 64
EPOCHS = 3.0
STEPS_AT_MAX_BATCH = 2
SAMPLES_PER_PHASE = 3


def rehearsal_schedule(schedule: Schedule, world_size: int) -> Schedule:
    """``schedule`` scaled as the module docstring says, for ``world_size`` ranks."""
    batches = [p.global_batch for p in schedule.phases]
    s = min(MIN_RANK_BATCH * world_size / min(batches), MAX_RANK_BATCH * world_size / max(batches))
    stretch = min(EPOCHS, schedule.epochs) / schedule.epochs
    phases = []
    for p in schedule.phases:
        batch = world_size * max(1, round(p.global_batch * s / world_size))
        phases.append(dataclasses.replace(p, start_epoch=p.start_epoch * stretch,
                                          end_epoch=p.end_epoch * stretch, global_batch=batch))
    n = max(STEPS_AT_MAX_BATCH * max(p.global_batch for p in phases),
            *(math.ceil(SAMPLES_PER_PHASE * p.global_batch / p.epochs - 1e-9) for p in phases))
    name = f"{schedule.name} (synthetic rehearsal)" if schedule.name else "synthetic rehearsal"
    # a partial last epoch cannot keep every sample once: rehearse it with drop_last
    drop_last = schedule.drop_last or (phases[-1].end_epoch % 1 != 0)
    return dataclasses.replace(schedule, dataset_size=n, phases=tuple(phases),
                               drop_last=drop_last, name=name)


def rehearsal_config(cfg: Config, num_classes: int, val_samples: int) -> Config:
    """``cfg`` with synthetic data (same image size), device ``auto``, a metrics row every
    iteration and the ``-synthetic`` output folder."""
    data = dataclasses.replace(cfg.data, source="synthetic", path=None, train_list=None,
                               val_list=None, num_classes=num_classes, num_samples=None,
                               val_samples=val_samples)
    return cfg.replace(
        data=data, train=dataclasses.replace(cfg.train, log_every=1, device="auto"),
        output=dataclasses.replace(cfg.output, dir=f"{cfg.output.dir.rstrip('/')}-synthetic"))
