"""Everything a run needs before its first step, built and checked on every rank.

Bad input must end every rank with one clear message, never leave some ranks waiting in a
collective. ``setup_run`` therefore takes no collective: it builds the schedule, indexes the
data, builds the model and reads the checkpoint on each rank, and :func:`agree` (one allgather
of error strings) turns a failure on any rank into the same ``SetupError`` on all of them.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

from hvd_largebatch.checkpoint import check_model_matches, load_checkpoint, resolve_resume
from hvd_largebatch.config import SYNTHETIC_CLASSES, Config, build_schedule, stated_dataset_size
from hvd_largebatch.data import GlobalSampler
from hvd_largebatch.errors import ConfigError, DataError, DistributedMismatchError
from hvd_largebatch.inputs import DataSets, index_data
from hvd_largebatch.models import build_model
from hvd_largebatch.schedules import Schedule, accumulation_steps

T = TypeVar("T")
EXPECTED_ERRORS = (ConfigError, DataError, DistributedMismatchError)


class SetupError(RuntimeError):
    """A run cannot start; raised identically on every rank (the message says which failed)."""


def agree(hvd, fn: Callable[[], T], what: str = "setup") -> T:
    """Run ``fn`` on every rank, then make all ranks agree on whether it failed.

    Returns ``fn()``'s result when it succeeded everywhere; otherwise raises ``SetupError`` on
    every rank with the failing rank's message (prefixed with the ranks when not all failed
    alike). Unexpected exceptions also print their traceback on the rank where they happened.
    """
    result, error = None, ""
    try:
        result = fn()
    except EXPECTED_ERRORS as e:
        error = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised there
        traceback.print_exc()
        error = f"{type(e).__name__} during {what}: {e}"
    errors = hvd.allgather_object(error) if hvd.size() > 1 else [error]
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return result
    messages = {e for _, e in failed}
    if len(failed) == len(errors) and len(messages) == 1:
        raise SetupError(failed[0][1])
    ranks = ", ".join(str(r) for r, _ in failed)
    raise SetupError(f"rank{'s' if len(failed) > 1 else ''} {ranks} of {len(errors)}: {failed[0][1]}")


@dataclass
class Run:
    """A checked run. ``micro_batches[k]``: micro-batches per iteration in schedule phase k
    (per-rank batch / micro-batches <= ``train.max_per_rank_batch``). ``checkpoint`` is the
    loaded state to resume from (None: a fresh start); the model and the sampler already hold
    its weights and data position."""

    cfg: Config
    schedule: Schedule
    data: DataSets
    model: nn.Module
    sampler: GlobalSampler
    device: torch.device
    micro_batches: tuple[int, ...]
    checkpoint: dict | None
    checkpoint_path: str | None
    world_size: int
    rank: int


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``train.device``: auto (CUDA device ``local_rank`` when available, else CPU), cpu, cuda."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was requested but this torch sees no CUDA device")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError("train.device", f"local rank {local_rank} has no GPU: this node has "
                          f"{count}; launch at most {count} ranks per node")
    return torch.device("cuda", local_rank)


def micro_batch_plan(schedule: Schedule, world_size: int, max_per_rank_batch: int) -> tuple[int, ...]:
    """Micro-batches per iteration for every phase; ConfigError naming the phase when its global
    batch does not divide by ``world_size``."""
    schedule.validate(world_size)
    return tuple(accumulation_steps(p.global_batch // world_size, max_per_rank_batch)
                 for p in schedule.phases)


def setup_run(cfg: Config, *, resume: str | None, synthetic: bool, world_size: int, rank: int,
              local_rank: int) -> Run:
    """Build and check the run on this rank (no collective; see the module docstring)."""
    if synthetic:
        cfg, schedule, data = _rehearsal(cfg, world_size)
    else:
        data = index_data(cfg, stated_dataset_size(cfg))
        schedule = build_schedule(cfg, data.num_train)
    device = resolve_device(cfg.train.device, local_rank)
    micro = micro_batch_plan(schedule, world_size, cfg.train.max_per_rank_batch)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.num_classes, cfg.model.options)
    sampler = GlobalSampler(schedule.dataset_size, schedule, world_size, rank,
                            seed=cfg.train.seed, drop_last=schedule.drop_last)
    path = resolve_resume(resume, cfg.output.dir)
    state = None
    if path is not None:
        state = load_checkpoint(path)
        check_model_matches(state, path, cfg.model.name, cfg.model.options, data.num_classes)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise DataError(f"{path}: the model state does not fit {cfg.model.name}: {e}") from e
        sampler.load_state_dict(state["sampler"])  # ConfigError if the schedule changed
    return Run(cfg, schedule, data, model, sampler, device, micro, state, path, world_size, rank)


def _rehearsal(cfg: Config, world_size: int) -> tuple[Config, Schedule, DataSets]:
    """``--synthetic``: the config's schedule and data shrunk by ``hvd_largebatch.rehearsal``."""
    from hvd_largebatch.rehearsal import rehearsal_config, rehearsal_schedule

    real = None
    if cfg.data.source != "synthetic":
        try:
            real = index_data(cfg, None)
        except DataError:  # the data is not on this machine: rehearsing is the point
            real = None
    full = build_schedule(cfg, real.num_train if real else None)
    schedule = rehearsal_schedule(full, world_size)
    num_classes = (cfg.model.num_classes or (real.num_classes if real else None)
                   or cfg.data.num_classes or SYNTHETIC_CLASSES)
    cfg = rehearsal_config(cfg, num_classes, schedule.max_global_batch)
    return cfg, schedule, index_data(cfg, schedule.dataset_size)
