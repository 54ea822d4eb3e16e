"""From a config to a checked ``Run``, in one straight line, and the pieces the trainer builds
from it.

The line, run on every rank by :func:`agreed_run` (the only collective here):

0. **image check** (``data_check.agreed_check``, collective: the ranks share the files, or rank
   0 reads the cached result): every image read and decoded once, unusable ones named (error)
   or left out of the indexes;
1. **data index** (:func:`index_data`): the training and validation sets of ``data:``
   (sizes, class count), or ``--synthetic``'s rehearsal of the job (:func:`rehearsal_schedule`,
   :func:`rehearsal_config`);
2. **schedule**: ``schedule:`` resolved for the training set's size (``build_schedule``);
3. **device** (:func:`resolve_device`: the rank's GPU, made current) and **micro-batch plan**
   (:func:`micro_batch_plan`: micro-batches per iteration in each phase, so that per-rank batch
   / micro-batches <= ``train.max_per_rank_batch``);
4. **model** (in the memory format of ``train.channels_last``: :func:`memory_format`),
   **sampler** and the **checkpoint** to resume from (:func:`setup_run`);
5. **optimizer** (:func:`build_optimizer`) and 6. **loaders** (:func:`train_loader`,
   :func:`val_loader`): built by the trainer from the ``Run``, because the optimizer's
   construction is a collective and a training loader depends on the phase's micro-batch count.

Bad input must end every rank with one clear message, never leave some ranks waiting in a
collective. ``setup_run`` therefore takes no collective: it builds the schedule, indexes the
data, builds the model and reads the checkpoint on each rank, and :func:`agree` (one allgather
of error strings) turns a failure on any rank into the same ``SetupError`` on all of them. Then
:func:`agreed_run` checks that the ranks indexed the same data and resume from the same point
(:func:`describe_run`, round 2 of ``training/agreement.py``; the config itself was compared in
round 1, before any of this). On rank 0, the writer, ``setup_run`` also checks that
``output.dir`` can be written and holds no checkpoint that a fresh start would replace (unless
``overwrite``), and when resuming lists the config keys that differ from the checkpoint's.

Data layouts per ``data.source``:

* ``folder``: ``<path>/train/<class>/<image>`` and ``<path>/val/<class>/<image>``;
* ``filelist``: ``<path>/<train_list>`` and ``<path>/<val_list>``, ``path label`` lines with
  paths relative to ``<path>``;
* ``digits``: scikit-learn's digits written as a folder at ``<path>`` (default ``data/digits``)
  by ``prepare_digits`` (rank 0, 32x32 pixels) when it is not there yet, then read as a folder;
* ``synthetic``: random tensors, ``data.num_samples`` training samples (default: the schedule's
  ``dataset_size``), ``data.val_samples`` validation samples and ``data.num_classes`` classes.

Optimizer: both ``optimizer.name`` values are :class:`~hvd_largebatch.lars.FusedLARS`: ``lars``
with layer-wise trust ratios, ``sgd`` with ``lars=False`` in every group, i.e. momentum SGD in
the torch form (``u <- m u + (g + wd w); w <- w - lr u``, Goyal et al.'s momentum correction
when the lr changes), so that both can run with sharded optimizer state. With
``exclude_bn_and_bias`` (``lars.param_groups``) BN parameters and biases get no weight decay and
no LARS adaptation. The wrapper is :class:`~hvd_largebatch.distributed.DistributedOptimizer` with
gradients *summed* over ranks (``op=hvd.Sum``): the trainer divides each micro-batch's summed
loss by the global batch, so the sum is the exact mean gradient of the global batch. The lr and
momentum are held on the device (:func:`build_optimizer`); ``train.precision: fp16`` adds dynamic
loss scaling fused into the step. With an adaptive batch the noise-scale estimator's averages
decay by ``schedule.batch_increase.smoothing`` per measurement.

``--synthetic`` (rehearsal): any config, shrunk to a few iterations on random data, so that a
job (for example a 256-GPU ImageNet config) can be rehearsed on a laptop before it is queued.
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
* **adaptive batch**: the cap scaled as the batches, ``start_epoch`` stretched as the phases,
  and the decision ``interval`` shrunk with the run (at least one update), so that the rehearsal
  takes its decisions too.
* **device**: ``auto`` (a job written for GPUs rehearses on a laptop's CPU).
* **output**: ``<output.dir>-synthetic``, with a metrics row every iteration.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import traceback
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

from hvd_largebatch.data import (CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN,
                                 IMAGENET_STD, FileIndex, GlobalSampler, ImageTransform, StepLoader)
from hvd_largebatch.errors import ConfigError, DataError, DistributedMismatchError
from hvd_largebatch.lars import DynamicLossScale, FusedLARS, param_groups
from hvd_largebatch.models import build_model, use_ghost_batch_norm
from hvd_largebatch.schedules import Schedule, accumulation_steps
from hvd_largebatch.schedules.adaptive import replay
from hvd_largebatch.training.agreement import check_agreement, describe_data
from hvd_largebatch.training.checkpoint import (check_model_matches, check_output_dir,
                                                load_checkpoint, resolve_resume, resume_changes)
from hvd_largebatch.training.data_check import agreed_check, drop_unusable
from hvd_largebatch.training.config import (DEFAULT_DIGITS_PATH, SYNTHETIC_CLASSES,
                                            SYNTHETIC_VAL_SAMPLES, Config, DataConfig,
                                            build_schedule, stated_dataset_size)

T = TypeVar("T")
#: ``data.stats`` -> per-channel (mean, std) on the [0, 1] scale
STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
         "digits": (DIGITS_MEAN, DIGITS_STD)}
#: ``--synthetic`` scaling (see the module docstring)
MIN_RANK_BATCH = 2
MAX_RANK_BATCH = 64
EPOCHS = 3.0
STEPS_AT_MAX_BATCH = 2
SAMPLES_PER_PHASE = 3
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
    resume_changes: tuple[str, ...] = ()  # config keys that differ from the checkpoint's


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``train.device``: auto (CUDA device ``local_rank`` when available, else CPU), cpu, cuda.
    A CUDA device is made this process's current device (once per rank: every kernel, stream and
    allocation of the rank then goes to its own GPU, and no other GPU gets a context)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was requested but this torch sees no CUDA device")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError("train.device", f"local rank {local_rank} has no GPU: this node has "
                          f"{count}; launch at most {count} ranks per node")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def micro_batch_plan(schedule: Schedule, world_size: int, max_per_rank_batch: int,
                     bn_group: int | None = None) -> tuple[int, ...]:
    """Micro-batches per iteration for every phase; ConfigError naming the phase when its global
    batch does not divide by ``world_size``. With ``bn_group`` (ghost BN) every per-rank
    micro-batch is a multiple of ``bn_group`` samples, else ConfigError naming train.bn_group."""
    schedule.validate(world_size)
    if bn_group is None:
        return tuple(accumulation_steps(p.global_batch // world_size, max_per_rank_batch)
                     for p in schedule.phases)
    if not schedule.drop_last:
        raise ConfigError("train.bn_group", "needs schedule.drop_last: true (a partial last "
                          "batch cannot be cut into whole BN groups)")
    plan = []
    for k, p in enumerate(schedule.phases):
        per_rank = p.global_batch // world_size
        if per_rank % bn_group:
            raise ConfigError("train.bn_group", f"phase {k}: the per-rank batch of {per_rank} "
                              f"samples (global batch {p.global_batch} / {world_size} ranks) is "
                              f"not a multiple of {bn_group}")
        plan.append(accumulation_steps(per_rank // bn_group, max_per_rank_batch // bn_group))
    return tuple(plan)


def setup_run(cfg: Config, *, resume: str | None, synthetic: bool, world_size: int, rank: int,
              local_rank: int, local_size: int = 1, overwrite: bool = False,
              checks: dict | None = None, state: dict | None = None,
              state_name: str | None = None) -> Run:
    """Build and check the run on this rank (no collective; see the module docstring).
    ``overwrite``: a fresh start may replace a checkpoint in ``output.dir`` (checked on rank 0,
    the rank that writes, with the folder's writability). ``checks``: the image check's results
    (``data_check.check_run_data``), whose unusable files are left out of the indexes.
    ``state``: a checkpoint already in memory to continue from instead of ``resume``'s file (an
    elastic commit), called ``state_name`` in messages."""
    if synthetic:
        cfg, schedule, data = _rehearsal(cfg, world_size)
    else:
        data = index_data(cfg, stated_dataset_size(cfg), checks,
                          check_share=(local_rank, local_size))
        schedule = build_schedule(cfg, data.num_train)
    path = state_name if state is not None else resolve_resume(resume, cfg.output.dir)
    if rank == 0:
        check_output_dir(cfg.output.dir, resuming=path is not None, overwrite=overwrite)
    if state is None and path is not None:
        state = load_checkpoint(path)
    if state is not None:  # the batches an adaptive run decided so far
        schedule = replay(schedule, state.get("batch_decisions", ()))
    check_adaptive(cfg, schedule, world_size)
    if cfg.train.deterministic:
        deterministic_algorithms()
    device = resolve_device(cfg.train.device, local_rank)
    if cfg.train.cuda_graph != "none" and device.type != "cuda":
        raise ConfigError("train.cuda_graph", f"captures CUDA work, but this rank runs on {device}")
    micro = micro_batch_plan(schedule, world_size, cfg.train.max_per_rank_batch, cfg.train.bn_group)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.num_classes, cfg.model.options)
    if cfg.train.bn_group is not None:
        use_ghost_batch_norm(model, cfg.train.bn_group)
    model = model.to(memory_format=memory_format(cfg, device))
    sampler = GlobalSampler(schedule.dataset_size, schedule, world_size, rank,
                            seed=cfg.train.seed, drop_last=schedule.drop_last)
    changes = []
    if state is not None:
        check_model_matches(state, path, cfg.model.name, cfg.model.options, data.num_classes)
        changes = resume_changes(state["config"], cfg.to_dict(), path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise DataError(f"{path}: the model state does not fit {cfg.model.name}: {e}") from e
        sampler.load_state_dict(state["sampler"])  # ConfigError if the schedule changed
    return Run(cfg, schedule, data, model, sampler, device, micro, state, path, world_size, rank,
               tuple(changes))


def check_adaptive(cfg: Config, schedule: Schedule, world_size: int) -> None:
    """ConfigError unless an adaptive batch (``schedule.batch_increase.mode: adaptive``) can be
    decided in this run: B_simple is measured from the ranks' local gradients and their average,
    so it needs two ranks or more, measurements (``train.noise_scale_every``), and an optimizer
    step that is not replayed from a CUDA graph (which does not measure)."""
    if schedule.adaptive is None:
        return
    key = "schedule.batch_increase.mode"
    if world_size < 2:
        raise ConfigError(key, "adaptive measures the gradient noise scale from the ranks' own "
                          "gradients and their average: it needs 2 or more ranks (this run has 1)")
    if not cfg.train.noise_scale_every:
        raise ConfigError("train.noise_scale_every", "must be >= 1 with an adaptive batch "
                          "(schedule.batch_increase.mode: adaptive decides from the measurement)")
    if cfg.train.cuda_graph != "none":
        raise ConfigError("train.cuda_graph", "a graphed optimizer step measures no noise scale: "
                          "use none with an adaptive batch (schedule.batch_increase.mode)")


def _rehearsal(cfg: Config, world_size: int) -> tuple[Config, Schedule, DataSets]:
    """``--synthetic``: the config's schedule and data shrunk as the module docstring says."""
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


def agreed_run(cfg: Config, hvd, *, resume: str | None, synthetic: bool,
               overwrite: bool = False, state: dict | None = None,
               state_name: str | None = None) -> Run:
    """The checked run on this rank, agreed by all ranks (collective, after ``hvd.init()``):
    ``SetupError`` on every rank when any fails; ``DistributedMismatchError`` on every rank when
    their data sets or resume points differ (``training/agreement.py``). ``state``,
    ``state_name``: as :func:`setup_run`'s."""
    if cfg.data.source == "digits" and not synthetic:
        agree(hvd, lambda: prepare_digits(cfg.data) if hvd.rank() == 0 else None, "writing digits")
    # every image checked once (shared by the ranks), before any rank decodes one
    share = functools.partial(index_data, check_share=(hvd.local_rank(), hvd.local_size()))
    checks = None if synthetic else agreed_check(cfg, hvd, agree, share)
    run = agree(hvd, lambda: setup_run(cfg, resume=resume, synthetic=synthetic,
                                       world_size=hvd.size(), rank=hvd.rank(),
                                       local_rank=hvd.local_rank(), local_size=hvd.local_size(),
                                       overwrite=overwrite, checks=checks, state=state,
                                       state_name=state_name))
    check_agreement(hvd, describe_run(run), "data and resume point")
    return run


def describe_run(run: Run) -> dict:
    """What ranks must agree on once the data is indexed and the checkpoint read (round 2 of
    ``training/agreement.py``): each data set and the point the run starts from."""
    d = run.data
    out = {}
    for name, index, size in (("training", d.train, d.num_train), ("validation", d.val, d.num_val)):
        out.update(describe_data(name, size, index.fingerprint() if index is not None else None,
                                 d.num_classes))
    state = run.checkpoint or {}
    out["resume point (epoch, iteration, updates)"] = [state.get("epoch", 0), state.get("step", 0),
                                                       state.get("updates", 0)]
    return out


def horovod_environment(cfg: Config) -> None:
    """Settings Horovod reads at ``hvd.init()`` (call before it): with ``train.deterministic``,
    no tensor fusion (``HOROVOD_FUSION_THRESHOLD=0`` unless set), because which gradients share
    a fusion buffer depends on timing, and with it the order in which a ring allreduce adds an
    element's values on 3 or more ranks."""
    if cfg.train.deterministic:
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", "0")


def deterministic_algorithms() -> None:
    """``train.deterministic``: torch's deterministic algorithms (an error on an operation that
    has none), cuDNN deterministic and not benchmarking, cuBLAS with a fixed workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# -- 1. data index (and the digits set, written on first use) -------------------------------

@dataclass(frozen=True)
class DataSets:
    """Training and validation sets of a run (indexes are None for synthetic data)."""

    train: FileIndex | None
    val: FileIndex | None
    num_train: int
    num_val: int
    num_classes: int


def data_root(d: DataConfig) -> str:
    """Where the data lives (``data.path``, or the default digits folder)."""
    return d.path or DEFAULT_DIGITS_PATH


def prepare_digits(d: DataConfig) -> None:
    """Write scikit-learn's digits at ``data.path`` unless a digits set (of any image size,
    e.g. from ``hvd-largebatch prepare-data --size 8``) is already there. Call on one rank."""
    from hvd_largebatch.data.digits import MARKER, write_digits_folder

    if not os.path.exists(os.path.join(data_root(d), MARKER)):
        write_digits_folder(data_root(d))


def index_data(cfg: Config, schedule_dataset_size: int | None, checks: dict | None = None,
               check_share: tuple[int, int] = (0, 1)) -> DataSets:
    """Index the training and validation sets; DataError naming the missing folder or file.

    ``schedule_dataset_size`` is the size synthetic data takes when ``data.num_samples`` is
    not set; ``checks`` (the image check's results) leaves the unusable files out.
    ``check_share``: (local rank, ranks on this node): the share of a file list's files this rank
    checks for existence (see ``FileIndex.from_file_list``)."""
    d = cfg.data
    if d.source == "synthetic":
        n = d.num_samples or schedule_dataset_size
        if n is None:
            raise ConfigError("data.num_samples", "is required for synthetic data when the "
                              "schedule has no dataset_size")
        return DataSets(None, None, n, d.val_samples or SYNTHETIC_VAL_SAMPLES,
                        d.num_classes or cfg.model.num_classes or SYNTHETIC_CLASSES)
    root = data_root(d)
    if not os.path.isdir(root):
        raise DataError(f"{root}: data.path does not exist or is not a folder")
    if d.source == "filelist":
        # with skip_bad_files a missing file is skipped (and counted) when it is read instead
        check = not d.skip_bad_files
        train = FileIndex.from_file_list(os.path.join(root, d.train_list), root=root,
                                         check_files=check, check_share=check_share)
        val = FileIndex.from_file_list(os.path.join(root, d.val_list), root=root,
                                       check_files=check, check_share=check_share)
    else:
        train = FileIndex.from_folder(os.path.join(root, "train"))
        val = FileIndex.from_folder(os.path.join(root, "val"))
        if train.classes != val.classes:
            raise DataError(f"{root}: train/ has classes {_few(train.classes)} but val/ has "
                            f"{_few(val.classes)}; both need the same class folders")
    if checks is not None:
        train, val = drop_unusable(train, checks["train"]), drop_unusable(val, checks["val"])
    num_classes = cfg.model.num_classes or max(train.num_classes, val.num_classes)
    train.check_labels(num_classes)
    val.check_labels(num_classes)
    return DataSets(train, val, len(train), len(val), num_classes)


def _few(names) -> str:
    names = list(names or ())
    return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")


# -- --synthetic: the rehearsal ---------------------------------------------------------------

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
    rehearsal = dataclasses.replace(schedule, dataset_size=n, phases=tuple(phases),
                                    drop_last=drop_last, name=name, adaptive=None)
    rule = schedule.adaptive
    if rule is None:
        return rehearsal
    # the adaptive batch: cap scaled like the batches, start stretched, decisions as many
    # times per run as in the real one (at least every update)
    cap = world_size * max(1, round(rule.max_batch * s / world_size))
    interval = max(1, round(rule.interval * rehearsal.total_updates / schedule.total_updates))
    rule = dataclasses.replace(rule, max_batch=cap, start_epoch=rule.start_epoch * stretch,
                               interval=interval)
    return dataclasses.replace(rehearsal, dataset_size=max(n, cap), adaptive=rule)


def rehearsal_config(cfg: Config, num_classes: int, val_samples: int) -> Config:
    """``cfg`` with synthetic data (same image size), device ``auto``, a metrics row every
    iteration and the ``-synthetic`` output folder."""
    data = dataclasses.replace(cfg.data, source="synthetic", path=None, train_list=None,
                               val_list=None, num_classes=num_classes, num_samples=None,
                               val_samples=val_samples)
    return cfg.replace(
        data=data, train=dataclasses.replace(cfg.train, log_every=1, device="auto"),
        output=dataclasses.replace(cfg.output, dir=f"{cfg.output.dir.rstrip('/')}-synthetic"))


# -- 5. optimizer -----------------------------------------------------------------------------

def build_optimizer(cfg: Config, model: torch.nn.Module, schedule, point, micro_batches: int, hvd,
                    device: torch.device):
    """The wrapped optimizer for the run's first iteration ``point`` (a ``SchedulePoint``) with
    ``micro_batches`` backward passes per step.

    The lr and the momentum live in 0-dim fp32 tensors on ``device`` shared by every param group
    (``param_groups[0]["lr"]``...): the trainer fills them in place each iteration, with no host
    synchronization, and the kernels read them when they run. ``train.precision: fp16`` adds a
    :class:`~hvd_largebatch.lars.loss_scale.DynamicLossScale` (``optimizer.loss_scale``)."""
    from hvd_largebatch.distributed import DistributedOptimizer  # imports horovod

    o = cfg.optimizer
    nesterov = schedule.nesterov if o.nesterov is None else o.nesterov
    held = {name: torch.tensor(value, dtype=torch.float32, device=device)
            for name, value in (("lr", point.lr), ("momentum", point.momentum))}
    loss_scale = DynamicLossScale(device) if cfg.train.precision == "fp16" else None
    opt = FusedLARS(param_groups(model, o.weight_decay, o.exclude_bn_and_bias), **held,
                    weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient, eps=o.eps,
                    nesterov=nesterov, momentum_correction=o.momentum_correction,
                    denominator=o.denominator, lars=o.name == "lars", loss_scale=loss_scale)
    wrapped = DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   backward_passes_per_step=micro_batches, op=hvd.Sum,
                                   shard_optimizer_state=o.shard_optimizer_state,
                                   global_batch=point.global_batch,
                                   **({"noise_scale_decay": schedule.adaptive.smoothing}
                                      if schedule.adaptive is not None else {}))
    return wrapped


def memory_format(cfg: Config, device: torch.device) -> torch.memory_format:
    """``train.channels_last`` (default: on for CUDA, where cuDNN's NHWC kernels are faster; off
    on the CPU) as the memory format of the model and its inputs."""
    on = cfg.train.channels_last
    if on is None:
        on = device.type == "cuda"
    return torch.channels_last if on else torch.contiguous_format


# -- 6. loaders -------------------------------------------------------------------------------

def image_transform(d: DataConfig, dtype: str = "float32",
                    channels_last: bool = False) -> ImageTransform:
    """The pipelines' ``ImageTransform`` for this data section (batches of ``dtype``, in NHWC
    memory with ``channels_last``)."""
    stats = d.stats or ("digits" if d.source == "digits" else "imagenet")
    mean, std = STATS.get(stats, (None, None))
    return ImageTransform(
        crop_size=d.image_size,
        resize_shorter=d.resize_shorter or round(d.image_size * 256 / 224),
        scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), flip=d.flip,
        mean=tuple(d.mean or mean), std=tuple(d.std or std), dtype=dtype,
        channels_last=channels_last)


def train_loader(cfg: Config, data: DataSets, sampler: GlobalSampler, *, micro_batches: int,
                 device: torch.device, dtype: str, seed: int) -> StepLoader:
    """Training loader of this rank: ``micro_batches`` micro-batches per iteration."""
    return _loader(cfg, data, data.train, sampler, micro_batches=micro_batches, device=device,
                   dtype=dtype, seed=seed, train=True)


def val_loader(cfg: Config, data: DataSets, world_size: int, rank: int, *, device: torch.device,
               dtype: str) -> StepLoader:
    """Validation loader: every sample once, ``train.eval_batch`` (default
    ``max_per_rank_batch``) per rank and iteration."""
    per_rank = cfg.train.eval_batch or cfg.train.max_per_rank_batch
    per_rank = min(per_rank, -(-data.num_val // world_size))
    sampler = GlobalSampler.for_validation(data.num_val, per_rank * world_size, world_size, rank)
    return _loader(cfg, data, data.val, sampler, micro_batches=1, device=device, dtype=dtype,
                   seed=cfg.train.seed, train=False)


def _loader(cfg: Config, data: DataSets, index: FileIndex | None, sampler: GlobalSampler, *,
            micro_batches: int, device: torch.device, dtype: str, seed: int, train: bool) -> StepLoader:
    d = cfg.data
    nhwc = memory_format(cfg, device) == torch.channels_last  # the model's layout
    if d.source == "synthetic":
        from hvd_largebatch.data import SyntheticLoader

        return SyntheticLoader(sampler, image_shape=(3, d.image_size, d.image_size),
                               num_classes=data.num_classes, dtype=dtype, device=device,
                               micro_batches=micro_batches, seed=seed, channels_last=nhwc)
    from hvd_largebatch.data import DaliLoader

    device_id = None  # CPU pipeline; on a GPU, the rank's device (torch.device("cuda") has no index)
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    return DaliLoader(index, sampler, image_transform(d, dtype, nhwc), train=train,
                      device_id=device_id, num_threads=d.workers, micro_batches=micro_batches,
                      prefetch_depth=d.prefetch, seed=seed, skip_bad_files=d.skip_bad_files)
