"""The training loop: one iteration at a time along the schedule, over Horovod ranks.

Per iteration ``s`` of epoch ``e`` (``point = schedule.at(e, s)``):

* every param group gets ``point.lr`` and ``point.momentum``;
* the iteration's global batch ``B = point.global_batch`` is read by the ``GlobalSampler``
  (B / world_size samples per rank) in ``micro_batches`` micro-batches of at most
  ``train.max_per_rank_batch`` samples; gradients are accumulated over them
  (``backward_passes_per_step``) and allreduced once;
* the loss of every micro-batch is ``sum of per-sample losses / B`` (Goyal et al. remark 3:
  normalize by the global batch), and the gradients are *summed* over ranks, so the update uses
  the exact mean gradient of the global batch, also for uneven micro-batches or a partial last
  batch; an empty micro-batch (a partial last batch smaller than the rank count) contributes a
  zero gradient so that every rank takes part in the allreduce;
* one optimizer step (``updates`` += 1); with ``train.bn_group`` (ghost BN) one update of the BN
  running statistics from the groups of all ranks (one allreduce).

Phases may change the batch (and the micro-batch count) at any iteration, also mid-epoch: the
loader of the new micro-batch count continues from the sampler's position.

At the end of every epoch the model is evaluated on the validation set if due (top-1, top-5 and
loss, summed over ranks and divided by the sample count) and a checkpoint is written. Extra
checkpoints are written every ``train.checkpoint_every`` updates and after a ``SIGUSR1`` (sent
to any rank; honoured at the next ``log_every`` boundary). Before every evaluation BN running
statistics are averaged over ranks (``train.average_bn_stats``; BN normalizes with per-rank
batch statistics while training, as in Goyal et al., so this changes no update); a checkpoint
holds the averaged statistics and, beside them, every rank's own. ``--resume`` continues at the
exact epoch, iteration, phase and data position, on any world size that divides the schedule's
batches; on the same world size a run killed at any iteration and resumed ends bit for bit as
the uninterrupted run (weights, BN buffers, momentum: the augmentation is a function of
(seed, epoch, sample), each rank gets its BN statistics and RNG state back).

Inputs come from the loaders in the autocast dtype (float32 for fp32) and the model's memory
format (NHWC with ``train.channels_last``); ``train.precision: bf16`` runs forward passes under
autocast, ``fp16``
too, with the loss multiplied by the optimizer's loss scale (unscaled, checked and updated inside
the FusedLARS step, on the device). The lr and the momentum are 0-dim tensors on the device that
every iteration fills in place (no host synchronization). ``train.channels_last`` keeps the model
and its inputs in NHWC; ``train.compile`` runs the forward (and backward) through
``torch.compile`` (the checkpoint holds the plain module's state); ``train.cuda_graph: optimizer``
replays the optimizer step from a CUDA graph (``training/cuda_graph.py``). The gradient noise
scale is measured every ``train.noise_scale_every`` iterations (its local-norm pass costs about
10% of a small model's CPU step; its average spans the measured iterations).

Divergence. FusedLARS skips an update whose gradient (or weight) sums are non-finite on any rank
(``on_nonfinite="skip"``: no weight or momentum changes; the decision is taken from the allreduced
sums, so it is the same on every rank). The trainer counts skipped updates on the device (no
host synchronization per iteration) and reads the counts at the next ``train.log_every``
boundary, where it synchronizes anyway: ``skipped_steps`` (cumulative) is a column of
``metrics.csv`` and of the progress bar. When ``train.max_skipped_steps`` consecutive updates
were skipped (checked at those boundaries, so the stop comes at most ``log_every - 1`` updates
later), or when the weights or BN statistics hold a non-finite value at a checkpoint, the run
stops on every rank with :class:`Diverged`: no checkpoint is written (the last good one stays),
``summary.json`` says ``"status": "diverged"`` and why, and the command exits with status 3.

Adaptive batch (``schedule.batch_increase.mode: adaptive``, :mod:`hvd_largebatch.schedules.adaptive`).
After every update where a decision is due (every ``interval`` updates from ``start_epoch``,
below the cap) rank 0's smoothed noise-scale averages are broadcast (one collective, the only
host synchronization it adds) and every rank computes the same decision from the same numbers:
the batch grows from the next iteration on when B_simple >= threshold x B. The schedule is then
split there (``Schedule.with_batch_from``), the sampler follows it from its position, the
loader is rebuilt for the new per-rank batch and micro-batch count, and the lr keeps its curve.
Every decision (kept or grown) is logged: a line on stderr when the batch grows,
``batch_decisions.json`` and ``schedule.yaml`` (as decided) in ``output.dir``, ``summary.json``;
the checkpoint holds the decisions and the estimator's averages, and ``--resume`` replays the
decisions on the configured schedule (any world size that divides the batches), so a resumed run
continues with the batches it had and, on the same world size, takes the same later decisions.

Progress is reported to a :class:`~hvd_largebatch.training.watchdog.Watchdog` before every phase
that waits on other ranks or on storage; ``train.stall_timeout_s`` without progress ends the job.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from hvd_largebatch.models import apply_ghost_bn_statistics, ghost_bn_statistics
from hvd_largebatch.distributed.noise_scale import ratio
from hvd_largebatch.schedules import noise_scale
from hvd_largebatch.schedules.adaptive import BatchDecision, decide, decision_due, next_iteration
from hvd_largebatch.errors import ConfigError
from hvd_largebatch.training.agreement import check_agreement, describe_config
from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, save_checkpoint
from hvd_largebatch.training.config import Config
from hvd_largebatch.training.cuda_graph import CapturedStep
from hvd_largebatch.training.metrics import MetricsLogger, ProgressBar
from hvd_largebatch.training.process import horovod_stall_settings, set_torch_threads
from hvd_largebatch.training.setup import (Run, agree, agreed_run, build_optimizer,
                                           horovod_environment, memory_format, micro_batch_plan,
                                           train_loader, val_loader)
from hvd_largebatch.training.watchdog import Watchdog

SUMMARY_NAME = "summary.json"
DECISIONS_NAME = "batch_decisions.json"
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the loaders' output dtype per train.precision: inputs arrive in the autocast dtype
_INPUT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class Diverged(RuntimeError):
    """Training stopped because it diverged (see the module docstring); raised on every rank."""


def train(cfg: Config | Callable[[], Config], *, resume: str | None = None,
          synthetic: bool = False, overwrite: bool = False) -> dict:
    """Run ``cfg`` on the ranks of this Horovod job (a single process works too).

    ``cfg``: a Config, or a function that reads one; a ``ConfigError`` it raises on some ranks
    only is then reported on all of them, naming the ranks. ``overwrite``: a fresh start may
    replace the checkpoint and metrics of ``output.dir``.

    Returns the run's summary (also written to ``<output.dir>/summary.json`` by rank 0).
    Raises, on every rank and before the first step, ``SetupError`` when the config, the data,
    the world size or the checkpoint is unusable on any rank, ``DistributedMismatchError`` when
    ranks run different configs, data or package versions (``training/agreement.py``); during
    training, :class:`Diverged`.
    """
    import horovod.torch as hvd

    cfg, read = read_config(cfg)
    if cfg is not None:  # (settings Horovod reads at init)
        horovod_stall_settings(cfg.train.stall_timeout_s)
        horovod_environment(cfg)
    hvd.init()
    set_torch_threads(hvd.local_size(), log=hvd.rank() == 0)
    cfg = agree(hvd, read, "reading the config")
    watchdog = Watchdog(cfg.train.stall_timeout_s, hvd.rank()).start()
    try:
        watchdog.mark("setup: comparing the ranks' configs")
        check_agreement(hvd, describe_config(cfg.to_dict()), "config")
        watchdog.mark("setup: indexing the data, building the model, reading the checkpoint")
        run = agreed_run(cfg, hvd, resume=resume, synthetic=synthetic, overwrite=overwrite)
        return Trainer(run, hvd, watchdog).fit()
    finally:
        watchdog.stop()


def read_config(cfg: Config | Callable[[], Config]) -> tuple[Config | None, Callable[[], Config]]:
    """Read ``cfg`` now (before ``hvd.init``, so that its settings can shape Horovod's); returns
    the config (None on a ConfigError) and a function that gives it or raises that error again
    (for :func:`~hvd_largebatch.training.setup.agree`, after ``hvd.init``)."""
    if not callable(cfg):
        return cfg, lambda: cfg
    try:
        loaded = cfg()
    except ConfigError as e:
        error = e

        def fail():
            raise error
        return None, fail
    return loaded, lambda: loaded


class Trainer:
    """Holds the model, optimizer, sampler, loaders and counters of one run (see module doc)."""

    def __init__(self, run: Run, hvd, watchdog: Watchdog | None = None):
        self.run, self.hvd, self.cfg = run, hvd, run.cfg
        # progress marks; a disabled watchdog when the caller has none
        self.watch = watchdog if watchdog is not None else Watchdog(0, run.rank)
        self.schedule = run.schedule
        self.device = run.device
        self.is_root = run.rank == 0
        self.model = run.model.to(self.device)
        first = run.checkpoint or {"epoch": 0, "step": 0}
        if first["epoch"] < self.schedule.num_epochs:
            point = self.schedule.at(first["epoch"], first["step"])  # the first iteration to run
        else:  # a finished run: nothing left to do
            point = self.schedule.at(self.schedule.num_epochs - 1, 0)
        self.watch.mark("setup: building the optimizer (its rank agreement)")
        self.optimizer = build_optimizer(
            self.cfg, self.model, self.schedule, point, run.micro_batches[point.phase], hvd,
            self.device)
        self._lr = self.optimizer.param_groups[0]["lr"]  # device tensors shared by the groups
        self._momentum = self.optimizer.param_groups[0]["momentum"]
        self._filled = None  # (lr, momentum) last written into them (a resume overwrites them)
        self.loss_scale = self.optimizer.optimizer.loss_scale
        self.memory_format = memory_format(self.cfg, self.device)
        self.forward = torch.compile(self.model) if self.cfg.train.compile else self.model
        self._captured = None  # the graphed optimizer step (train.cuda_graph: optimizer)
        if self.cfg.train.cuda_graph == "optimizer":
            self.capture_optimizer_step()
        self.sampler = run.sampler
        self.autocast = _PRECISION_DTYPES.get(self.cfg.train.precision)
        self.watch.mark("setup: building the validation loader")
        self.val = val_loader(self.cfg, run.data, run.world_size, run.rank, device=self.device,
                              dtype=_INPUT_DTYPES[self.cfg.train.precision])
        self.epoch, self.step, self.updates, self.samples, self.wall_time = 0, 0, 0, 0, 0.0
        self.skipped_steps = 0  # updates skipped for non-finite gradients (whole run)
        self.decisions: list[BatchDecision] = []  # adaptive batch decisions (whole run)
        if run.checkpoint is not None:
            self._restore(run.checkpoint)
        else:
            # same seed everywhere, but make sure; a fresh optimizer has no state to send
            self.watch.mark("setup: broadcasting the initial weights from rank 0")
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self._loader, self._loader_k, self._batches = None, None, None
        self._requested = False  # set by SIGUSR1
        self._pending_request = False  # agreed by all ranks at the last window flush
        self._window = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, top-1
        self._window_count = 0  # samples of this rank in the window
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._last_count = 0  # samples of this rank in the last iteration
        self._last_point = point
        self._last_k = run.micro_batches[point.phase]
        # skipped updates on the device: in this window, current run of consecutive skips, the
        # longest run in this window (read at the window flush)
        self._skips = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.max_skip_run = 0  # longest run of consecutive skips seen so far
        self.last_saved = run.checkpoint.get("updates") if run.checkpoint else None
        self.logger = None
        self.on_save = None  # called by every rank after every checkpoint (e.g. a commit)
        if self.is_root:
            self._prepare_output()
            if run.checkpoint is not None:
                print(f"resuming from {run.checkpoint_path}: epoch {self.epoch}, iteration "
                      f"{self.step}, {self.updates} updates done", file=sys.stderr, flush=True)
            for change in run.resume_changes:
                print(f"hvd-largebatch train: warning: resuming with {change}", file=sys.stderr,
                      flush=True)

    # -- outputs ----------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        out = self.cfg.output.dir
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
        self._write_schedule()
        resumed = self.updates if self.run.checkpoint is not None else None
        self.logger = MetricsLogger(out, tensorboard=self.cfg.output.tensorboard,
                                    resume_updates=resumed)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint (collective: every rank must call it; only rank 0's result is kept)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = self.hvd.allgather_object(rng) if self.run.world_size > 1 else [rng]
        model, bn_local = self.model.state_dict(), None
        if self._bn_stats_per_rank:
            # the checkpoint's model holds the averaged statistics; each rank's own go beside
            # them, so that a resume on the same world size continues bit for bit
            local = {name: buf.detach().cpu().clone() for name, buf in self._bn_buffers()}
            bn_local = self.hvd.allgather_object(local)
            model = {**model, **dict(zip(local, self._averaged_bn_buffers()))}
        return {
            "model_name": self.cfg.model.name, "model_options": dict(self.cfg.model.options),
            "num_classes": self.run.data.num_classes, "bn_local": bn_local,
            "model": model, "optimizer": self.optimizer.gathered_state_dict(),
            "epoch": self.epoch, "step": self.step, "updates": self.updates,
            "samples": self.samples, "wall_time": self.wall_time,
            "skipped_steps": self.skipped_steps, "sampler": self.sampler.state_dict(),
            "rng": rngs, "world_size": self.run.world_size,
            "config": self.cfg.to_dict(), "schedule": self.schedule.to_config(),
            "loss_scale": None if self.loss_scale is None else self.loss_scale.state_dict(),
            "noise_scale": self.optimizer.noise_scale_state_dict(),
            "batch_decisions": [d.to_dict() for d in self.decisions],
        }

    def _restore(self, state: dict) -> None:
        """Optimizer state, counters and RNG from the checkpoint (``setup_run`` has loaded the
        weights and the sampler position)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])  # else: a fresh fp16 scale
        self.epoch, self.step = state["epoch"], state["step"]
        self.updates, self.samples = state["updates"], state["samples"]
        self.wall_time = state["wall_time"]
        self.skipped_steps = state.get("skipped_steps", 0)  # absent from older checkpoints
        self.decisions = [BatchDecision.from_dict(d) for d in state.get("batch_decisions", ())]
        if state.get("noise_scale") is not None:
            self.optimizer.load_noise_scale_state_dict(state["noise_scale"])
        rngs = state["rng"]
        local = state.get("bn_local")
        if local is not None and len(local) == self.run.world_size:
            with torch.no_grad():
                for name, buf in self._bn_buffers():
                    buf.copy_(local[self.run.rank][name])
        if len(rngs) == self.run.world_size:
            torch.set_rng_state(rngs[self.run.rank]["cpu"])
            if self.device.type == "cuda" and "cuda" in rngs[self.run.rank]:
                torch.cuda.set_rng_state(rngs[self.run.rank]["cuda"], self.device)
        else:  # another world size: a fresh, deterministic stream per rank
            torch.manual_seed(hash((self.cfg.train.seed, self.updates, self.run.rank)) % 2**63)

    def save(self) -> None:
        """Write ``checkpoint.pt`` (all ranks call this; rank 0 writes). ``Diverged`` instead,
        on every rank, when the weights or BN statistics hold a non-finite value on any rank:
        the previous checkpoint is kept."""
        self.watch.mark(f"checking the model state for non-finite values at update {self.updates}")
        bad = self._nonfinite_state()
        if bad:
            raise Diverged(f"non-finite values in {bad} at update {self.updates} (epoch "
                           f"{self.epoch}, iteration {self.step}); not checkpointed{self._kept()}")
        self.watch.mark(f"checkpoint of update {self.updates} (gather and write)")
        state = self.state_dict()
        if self.is_root:
            save_checkpoint(state, os.path.join(self.cfg.output.dir, CHECKPOINT_NAME))
        self.last_saved = self.updates
        if self.on_save is not None:
            self.on_save()

    def _nonfinite_state(self) -> str:
        """Collective: "" when every rank's weights and floating-point buffers (BN statistics)
        are finite, else the first offending tensor of the lowest such rank ("name (rank r)")."""
        tensors = [(n, t) for n, t in self.model.state_dict().items() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
        local = "" if bool(finite.all()) else \
            f"{tensors[int((~finite).nonzero()[0])][0]} (rank {self.run.rank})"
        if self.run.world_size == 1:
            return local
        return next((b for b in self.hvd.allgather_object(local, name="state.finite") if b), "")

    def _kept(self) -> str:
        if self.last_saved is None:
            return "; this run has no earlier checkpoint"
        return (f"; the last good checkpoint, {os.path.join(self.cfg.output.dir, CHECKPOINT_NAME)}"
                f" (update {self.last_saved}), is kept")

    def release(self) -> None:
        """Close the loader and the metrics file (this trainer will not be used again)."""
        self._close_loader()
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def capture_optimizer_step(self, graph_factory=None) -> None:
        """From now on the optimizer step (after the exchange) is captured once in a CUDA graph
        and replayed (``training/cuda_graph.py``); ``graph_factory`` replaces the CUDA graph in
        tests. Gradients are then zeroed in place, and the noise scale is not measured."""
        self._captured = CapturedStep(self.optimizer.optimizer.step, graph_factory=graph_factory)
        self.optimizer.set_global_batch(None)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the schedule; returns the summary. ``Diverged`` on every rank
        when training diverges (``summary.json`` then says so)."""
        self._install_signal_handler()
        self._last_eval = None
        try:
            self._fit()
        except Diverged as e:
            self._finish(self._last_eval, status="diverged", error=str(e))
            raise
        finally:
            self.watch.pause()
        return self._finish(self._last_eval)

    def _fit(self) -> None:
        start = time.perf_counter() - self.wall_time
        epochs = self.schedule.num_epochs
        while self.epoch < epochs:
            epoch = self.epoch
            total = self.sampler.num_steps(epoch)
            bar = ProgressBar(self.is_root and self.cfg.output.progress, epoch, total, self.step)
            while self.step < total:
                self._iteration(epoch, bar)
                if self._adapt_batch(epoch):
                    total = self.sampler.num_steps(epoch)
                    bar.set_total(total)
                self.wall_time = time.perf_counter() - start
                if self._checkpoint_due() and self.step < total:
                    self.save()
            self._flush_window(epoch, bar)
            bar.close()
            self._end_epoch(epoch)
            self.wall_time = time.perf_counter() - start
            every = self.cfg.train.eval_every
            if epoch == epochs - 1 or (every and (epoch + 1) % every == 0):
                self._average_bn_stats()
                self._last_eval = self.evaluate()
                self.wall_time = time.perf_counter() - start
                self._log_eval(epoch, self._last_eval)
            self.epoch, self.step = epoch + 1, 0
            self.save()

    def _iteration(self, epoch: int, bar: ProgressBar) -> None:
        point = self.schedule.at(epoch, self.step)
        k = self.run.micro_batches[point.phase]
        where = f"epoch {epoch}, iteration {self.step} (update {self.updates + 1})"
        self.watch.mark(f"reading the data of {where}")
        batches = self._micro_batches(epoch, k)
        opt = self.optimizer
        if (point.lr, point.momentum) != self._filled:
            self._lr.fill_(point.lr)  # in place, on the device: no synchronization
            self._momentum.fill_(point.momentum)
            self._filled = (point.lr, point.momentum)
        if k != opt.backward_passes_per_step:
            opt.set_backward_passes_per_step(k)
        every = self.cfg.train.noise_scale_every
        measure = self._captured is None and every and self.updates % every == 0
        opt.set_global_batch(point.global_batch if measure else None)  # the noise scale
        opt.zero_grad(set_to_none=self._captured is None)  # a graph reads the same p.grad
        scale = 1.0 / point.global_batch
        self._last_count = 0
        for _ in range(k):
            self.watch.mark(f"reading the data of {where}")
            images, labels = next(batches)
            self.watch.mark(f"forward/backward and gradient allreduce of {where}")
            self._micro_step(images, labels, scale)
        self.watch.mark(f"gradient allreduce and optimizer step of {where}")
        if self._captured is None:
            opt.step()
        else:
            opt.step_after_exchange(self._captured)
        self._count_skip(opt.last_step_skipped())
        if self.cfg.train.bn_group is not None:
            self.watch.mark(f"ghost BN statistics allreduce (bn.ghost) of {where}")
            self._update_ghost_bn()
        self.step += 1
        self.updates += 1
        self.samples += point.global_batch
        self._window_steps += 1
        self._last_point = point
        self._last_k = k
        if self._window_steps >= self.cfg.train.log_every:
            self._flush_window(epoch, bar=bar)

    def _adapt_batch(self, epoch: int) -> bool:
        """The adaptive batch decision after this update, when one is due (see the module
        docstring; collective then, on every rank alike). True when the batch grew."""
        after = next_iteration(self.schedule, epoch, self.step)
        if after is None:
            return False
        if not decision_due(self.schedule, self.updates, *after):
            return False
        batch = self.schedule.at(*after).global_batch  # the next iteration's, if kept
        self.watch.mark(f"adaptive batch decision (batch.adaptive) after update {self.updates}")
        averages = self.optimizer.noise_scale_averages()
        averages = (averages.cpu() if averages is not None
                    else torch.full((2,), math.nan, dtype=torch.float32))
        measured = ratio(*self.hvd.broadcast(averages, root_rank=0, name="batch.adaptive").tolist())
        rule, cfg = self.schedule.adaptive, self.cfg.train
        new = decide(measured, batch, rule, self.run.world_size, cfg.max_per_rank_batch,
                     cfg.bn_group)
        decision = BatchDecision(self.updates, *after, measured, batch, new)
        self.decisions.append(decision)
        if decision.grew:
            self._follow(self.schedule.with_batch_from(*after, new))
        if self.is_root:
            self._write_schedule()
            if decision.grew:
                print(f"hvd-largebatch train: update {self.updates}: B_simple {measured:.1f} >= "
                      f"{rule.threshold:g} x {batch}: global batch {batch} -> {new} from epoch "
                      f"{after[0]}, iteration {after[1]}", file=sys.stderr, flush=True)
        return decision.grew

    def _follow(self, schedule) -> None:
        """Train along ``schedule`` from the next iteration on (an adaptive batch decision)."""
        cfg = self.cfg.train
        micro = micro_batch_plan(schedule, self.run.world_size, cfg.max_per_rank_batch,
                                 cfg.bn_group)
        self.sampler.set_schedule(schedule)
        self.schedule = self.run.schedule = schedule
        self.run.micro_batches = micro
        self._close_loader()  # it reads ahead, with pipelines sized for the old batch

    def _write_schedule(self) -> None:
        """``schedule.yaml`` (the schedule as decided so far) and, for an adaptive batch,
        ``batch_decisions.json`` (its decisions so far: a resumed run's start from its
        checkpoint's). Rank 0, at the start and after every decision."""
        out = self.cfg.output.dir
        files = [("schedule.yaml", lambda f: yaml.safe_dump(self.schedule.to_config(), f,
                                                            sort_keys=False))]
        if self.schedule.adaptive is not None:
            files.append((DECISIONS_NAME, lambda f: json.dump(
                [d.to_dict() for d in self.decisions], f, indent=1)))
        for name, write in files:
            path = os.path.join(out, name)
            with open(path + ".tmp", "w") as f:
                write(f)
            os.replace(path + ".tmp", path)

    def _count_skip(self, skipped: torch.Tensor) -> None:
        """Add the last step's skip flag (0-dim bool, on the device) to the device counters."""
        s = skipped.to(device=self.device, dtype=torch.int64)
        skips = self._skips
        skips[0] += s
        skips[1] = (skips[1] + 1) * s
        skips[2] = torch.maximum(skips[2], skips[1])

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, scale: float) -> None:
        n = len(labels)
        if n == 0:  # no samples for this rank: a zero gradient keeps the allreduce in step
            (sum(p.sum() for p in self.model.parameters()) * 0.0).backward()
            return
        images = images.contiguous(memory_format=self.memory_format)  # no copy when it already is
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.forward(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = loss_sum * scale
        (loss if self.loss_scale is None else self.loss_scale.scale_loss(loss)).backward()
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
            self._window += torch.stack([loss_sum.detach().double(), correct.double()])
        self._window_count += n
        self._last_count += n

    def _micro_batches(self, epoch: int, k: int):
        """The micro-batch iterator of ``epoch`` for ``k`` micro-batches per iteration (a new
        loader when ``k`` changes; it continues at the sampler's position)."""
        if self._loader is None or self._loader_k != k:
            self.watch.mark(f"building the training loader for {k} micro-batches per update")
            self._close_loader()
            # augmentation: a function of (train.seed, epoch, sample) only
            self._loader = train_loader(self.cfg, self.run.data, self.sampler, micro_batches=k,
                                        device=self.device,
                                        dtype=_INPUT_DTYPES[self.cfg.train.precision],
                                        seed=self.cfg.train.seed)
            self._loader_k = k
        if self._batches is None:
            self._batches = iter(self._loader.epoch(epoch))
        return self._batches

    def _close_loader(self) -> None:
        """Drop the loader (its micro-batch count no longer applies)."""
        if self._batches is not None:
            self._batches.close()
        if self._loader is not None:
            self._loader.close()  # frees a DALI pipeline now, not at the next gc
        self._loader, self._loader_k, self._batches = None, None, None

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's iterations are done: its micro-batch iterator must be exhausted too
        (which lets the loader start the next epoch without rebuilding its pipeline)."""
        if self._batches is not None:
            extra = next(self._batches, None)
            self._batches = None
            if extra is not None:
                raise RuntimeError(f"the loader yielded more micro-batches in epoch {epoch} than "
                                   f"the schedule's {self.sampler.num_steps(epoch)} iterations")

    # -- logging ----------------------------------------------------------------------------
    def _flush_window(self, epoch: int, bar: ProgressBar) -> None:
        """Reduce the window's loss / accuracy / sample counts over ranks, write a train row
        (rank 0) and pick up checkpoint requests. Collective: every rank calls it at the same
        iterations (a no-op when no iteration ran since the last flush)."""
        if self._window_steps == 0:
            return
        self.watch.mark(f"metrics allreduce (train.window) after update {self.updates}")
        counts = [self._window_count, self._last_count, float(self._requested)]
        # skip counts are equal on every rank (the skip is decided from allreduced sums); summed
        # over ranks and divided by the rank count, every rank takes the same decision anyway
        local = torch.cat([self._window.cpu(), torch.tensor(counts, dtype=torch.float64),
                           self._skips[[0, 2]].cpu().double()])
        total = self.hvd.allreduce(local, op=self.hvd.Sum, name="train.window")
        loss_sum, correct, count, last_count, requested, skipped, skip_run = total.tolist()
        skipped = round(skipped / self.run.world_size)
        self.skipped_steps += skipped
        self.max_skip_run = max(self.max_skip_run, round(skip_run / self.run.world_size))
        now = time.perf_counter()
        point = self._last_point
        if self.is_root:
            row = {
                "kind": "train", "epoch": epoch, "step": self.step - 1,
                "epoch_float": point.epoch_float, "updates": self.updates, "samples": self.samples,
                "lr": point.lr, "momentum": point.momentum,
                "global_batch": int(last_count), "micro_batches": self._last_k,
                "noise_scale": _noise_scale(point, self.schedule.dataset_size),
                "loss": loss_sum / max(count, 1), "top1": 100.0 * correct / max(count, 1),
                "images_per_s": count / max(now - self._window_start, 1e-9),
                "wall_time": self.wall_time, "skipped_steps": self.skipped_steps,
                **self._optimizer_report(),
            }
            self.logger.log(row)
            bar.update(self._window_steps, images_per_s=row["images_per_s"], loss=row["loss"],
                       lr=row["lr"], batch=row["global_batch"], skipped=self.skipped_steps)
        self._window.zero_()
        self._skips[0] = 0
        self._skips[2] = 0
        self._window_count = 0
        self._window_steps = 0
        self._window_start = now
        if requested:
            self._requested = False
            self._pending_request = True
        limit = self.cfg.train.max_skipped_steps
        if limit and self.max_skip_run >= limit:
            raise Diverged(
                f"{self.max_skip_run} consecutive updates skipped for non-finite gradients by "
                f"update {self.updates} (epoch {epoch}, iteration {self.step - 1}; "
                f"train.max_skipped_steps = {limit}, {self.skipped_steps} skipped in all); "
                f"not checkpointed{self._kept()}. Lower the lr (schedule.lr) or check the data")

    def _optimizer_report(self) -> dict:
        """Trust-ratio summary (LARS) and measured gradient noise scale, when available."""
        report = {}
        if self.cfg.optimizer.name == "lars":
            values = self.optimizer.last_trust_ratios()[_lars_positions(self.optimizer)]
            values = values[torch.isfinite(values)]
            if values.numel():
                report.update(trust_ratio_min=values.min().item(),
                              trust_ratio_mean=values.mean().item(),
                              trust_ratio_max=values.max().item())
        measured = self.optimizer.noise_scale()  # None on one rank / before it is estimated
        if measured is not None and math.isfinite(measured):
            report["grad_noise_scale"] = measured
        return report

    def _log_eval(self, epoch: int, result: dict) -> None:
        if self.is_root:
            point = self._last_point
            self.logger.log({"kind": "eval", "epoch": epoch, "step": self.sampler.num_steps(epoch) - 1,
                             "epoch_float": epoch + 1.0, "updates": self.updates,
                             "samples": self.samples, "lr": point.lr, "momentum": point.momentum,
                             "global_batch": point.global_batch, "wall_time": self.wall_time,
                             **result})

    # -- checkpoints on request -------------------------------------------------------------
    def _install_signal_handler(self) -> None:
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (an embedding application): no signal requests
            pass

    def _on_signal(self, signum, frame) -> None:
        self._requested = True

    def _checkpoint_due(self) -> bool:
        every = self.cfg.train.checkpoint_every
        due = bool(every) and self.updates % every == 0
        if self._pending_request:
            self._pending_request = False
            due = True
        return due

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 (%) and mean loss over the whole validation set, all ranks together."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top-1, top-5, n
        self.val.sampler.seek(0, 0)
        num_classes = self.run.data.num_classes
        self.watch.mark(f"evaluation after update {self.updates}")
        for batch, (images, labels) in enumerate(self.val.epoch(0)):
            self.watch.mark(f"evaluation after update {self.updates}, batch {batch}")
            if len(labels) == 0:
                continue
            images = images.contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.forward(images)
            logits = logits.float()
            top = logits.topk(min(5, num_classes), dim=1).indices
            hits = top == labels[:, None]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 hits[:, 0].sum(), hits.any(1).sum(),
                                 torch.tensor(len(labels), device=labels.device)]).double()
        self.model.train()
        self.watch.mark(f"evaluation allreduce (eval.sums) after update {self.updates}")
        sums = self.hvd.allreduce(sums.cpu(), op=self.hvd.Sum, name="eval.sums")
        loss, top1, top5, n = sums.tolist()
        return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}

    def _update_ghost_bn(self) -> None:
        """Ghost BN: one running-statistics update per step from the groups of all ranks."""
        pending = ghost_bn_statistics(self.model)
        if pending is None:
            return
        if self.run.world_size > 1:  # on the device: no synchronization with the host
            pending = self.hvd.allreduce(pending, op=self.hvd.Sum, name="bn.ghost")
        apply_ghost_bn_statistics(self.model, pending)

    @property
    def _bn_stats_per_rank(self) -> bool:
        """Whether ranks hold different BN running statistics (averaged before evaluation);
        ghost BN's are global already."""
        return (self.cfg.train.average_bn_stats and self.run.world_size > 1
                and self.cfg.train.bn_group is None)

    def _bn_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, buf) for name, buf in self.model.named_buffers()
                if name.endswith(("running_mean", "running_var"))]

    def _averaged_bn_buffers(self) -> list[torch.Tensor]:
        """BN running statistics averaged over ranks (new tensors; collective)."""
        buffers = [buf for _, buf in self._bn_buffers()]
        if not buffers:
            return []
        self.watch.mark(f"BN statistics allreduce (bn.stats) after update {self.updates}")
        return self.hvd.grouped_allreduce(buffers, op=self.hvd.Average, name="bn.stats")

    def _average_bn_stats(self) -> None:
        """Replace every rank's BN running statistics with their average (before evaluation)."""
        if not self._bn_stats_per_rank:
            return
        with torch.no_grad():
            for (_, buf), avg in zip(self._bn_buffers(), self._averaged_bn_buffers()):
                buf.copy_(avg)

    # -- end --------------------------------------------------------------------------------
    def _finish(self, last_eval: dict | None, status: str = "completed",
                error: str | None = None) -> dict:
        """The summary (written by rank 0): ``status`` completed or diverged (with ``error``),
        updates, skipped updates, last checkpointed update, last evaluation."""
        summary = {
            "status": status, "model": self.cfg.model.name, "schedule": self.schedule.name,
            "world_size": self.run.world_size, "epochs": self.schedule.epochs,
            "updates": self.updates, "samples": self.samples,
            "skipped_steps": self.skipped_steps, "max_consecutive_skipped": self.max_skip_run,
            "last_checkpoint_updates": self.last_saved,
            "wall_time": self.wall_time, "output_dir": self.cfg.output.dir,
            **({"batch_decisions": [d.to_dict() for d in self.decisions if d.grew],
                "final_global_batch": self._last_point.global_batch}
               if self.schedule.adaptive is not None else {}),
            **({"error": error} if error else {}),
            **{f"val_{k}": v for k, v in (last_eval or {}).items()},
        }
        if self.is_root:
            self.logger.close()
            out = self.cfg.output.dir
            with open(os.path.join(out, SUMMARY_NAME), "w") as f:
                json.dump(summary, f, indent=1)
            if self.cfg.output.plots and status == "completed":
                from hvd_largebatch.training.plots import plot_run

                plot_run(self.logger.path, out, title=self.schedule.name or self.cfg.model.name)
        return summary


def _noise_scale(point, dataset_size: int) -> float | None:
    if point.global_batch >= dataset_size:
        return None
    value = noise_scale(point.lr, point.global_batch, point.momentum, dataset_size)
    return value if math.isfinite(value) else None


def _lars_positions(optimizer) -> torch.Tensor:
    """Indices (in ``last_trust_ratios`` order) of the params of groups that use LARS."""
    flags = [bool(g.get("lars", True)) for g in optimizer.param_groups for _ in g["params"]]
    return torch.tensor(flags, dtype=torch.bool)
