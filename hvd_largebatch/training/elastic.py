"""``hvd-largebatch train --elastic``: the trainer (``training/trainer.py``) run under Horovod
elastic (``hvd.elastic.run``); the trainer itself does not know about elastic.

The run's state (weights, optimizer state, epoch / iteration / update counters, sampler position,
RNG: ``Trainer.state_dict()``) is committed in host memory by every rank with every checkpoint
(every ``train.checkpoint_every`` updates and at every epoch end), which is also when the workers
look for added or removed hosts (``state.commit()``).

When a rank fails (``HorovodInternalError``) or hosts come or go (``HostsUpdatedInterrupt``),
Horovod re-initializes on the new world; the reset callback releases the trainer (loader, metrics
file), and every worker, surviving or new, then runs the same steps in the same order: rank 0's
committed state is broadcast (``sync``), and the trainer is rebuilt for the new world size and
rank from it: the checked run (``agreed_run``: data index, micro-batch plan, sampler of the new
world size continuing at the committed position, so the global batch sequence is unchanged), a
fresh ``DistributedOptimizer`` (its construction re-runs the rank consistency check) loaded with
the committed optimizer state, and the metrics file cut back to the committed update. Rebuilding
inside ``hvd.elastic.run`` rather than in the callback matters: workers that join never run reset
callbacks, so a collective there would not be matched. Updates run since the last commit are
redone with the same samples.

Only replicated optimizer state is supported: sharded momentum lives on the rank that owns the
shard, so a lost host would take its shard with it. Horovod elastic needs Gloo (``horovodrun
--gloo`` with ``--min-np``/``--max-np``/``--host-discovery-script``); ``mpirun`` cannot add or
replace ranks.
"""
from __future__ import annotations

import copy
import os

import horovod.torch as hvd
from horovod.common.elastic import ObjectState

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.training.agreement import check_agreement, describe_config
from hvd_largebatch.training.config import Config
from hvd_largebatch.training.process import horovod_stall_settings, set_torch_threads
from hvd_largebatch.training.setup import agreed_run, horovod_environment
from hvd_largebatch.training.trainer import Trainer
from hvd_largebatch.training.watchdog import Watchdog

#: variables set by MPI launchers (an elastic job is never started by one)
_MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")
#: ``Run.checkpoint_path`` of a trainer rebuilt from the committed state
COMMITTED = "the last elastic commit"


def check_elastic(cfg: Config, environ=os.environ) -> None:
    """ConfigError unless ``cfg`` can run elastic in this process (no collective)."""
    if cfg.optimizer.shard_optimizer_state:
        raise ConfigError("optimizer.shard_optimizer_state",
                          "must be false with --elastic: sharded optimizer state cannot be "
                          "re-sharded when a host is lost (its shard goes with it)")
    if environ.get("HOROVOD_ELASTIC") != "1":
        started = ("this process was started by mpirun, which cannot add or replace ranks; "
                   if any(v in environ for v in _MPI_RANK_VARIABLES) else "")
        raise ConfigError("--elastic", f"needs a Horovod elastic job with Gloo: {started}launch "
                          "with horovodrun --gloo -np N --min-np .. --max-np .. "
                          "--host-discovery-script .. (jobs/launch/horovodrun_elastic.sh)")


def train_elastic(cfg: Config, *, resume: str | None = None, synthetic: bool = False,
                  overwrite: bool = False) -> dict:
    """Train ``cfg`` under ``hvd.elastic.run``; returns the summary (as ``trainer.train``).
    ``resume`` and ``overwrite`` apply to the first start only; later restarts continue from the
    commit. Every collective check (config agreement, setup) runs inside ``hvd.elastic.run``,
    where workers that join later take part in it too."""
    check_elastic(cfg)
    horovod_stall_settings(cfg.train.stall_timeout_s)
    horovod_environment(cfg)
    hvd.init()
    set_torch_threads(hvd.local_size(), log=hvd.rank() == 0)
    watchdog = Watchdog(cfg.train.stall_timeout_s, hvd.rank()).start()
    state = TrainerState(cfg, resume=resume, synthetic=synthetic, overwrite=overwrite,
                         watchdog=watchdog)
    state.register_reset_callbacks([state.release])

    @hvd.elastic.run
    def fit(state: TrainerState) -> dict:
        return state.build().fit()

    try:
        return fit(state)
    finally:
        watchdog.stop()


class TrainerState(ObjectState):
    """The committed state of an elastic run and the trainer built from it (see module doc)."""

    def __init__(self, cfg: Config, *, resume: str | None, synthetic: bool, overwrite: bool,
                 watchdog: Watchdog):
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.cfg, self.resume, self.synthetic = cfg, resume, synthetic
        self.overwrite, self.watchdog = overwrite, watchdog
        self.committed = None  # Trainer.state_dict() at the last commit; None before the first
        self.trainer = None

    def build(self):
        """A trainer for the current world from the committed state (collective)."""
        self.release()
        self.watchdog.rank = hvd.rank()
        self.watchdog.mark("elastic setup: comparing the ranks' configs")
        check_agreement(hvd, describe_config(self.cfg.to_dict()), "config")
        first = self.committed is None
        self.watchdog.mark("elastic setup: indexing the data, building the model")
        # after the first start the folder is this run's own: its checkpoint is not refused
        # the committed state: weights, the batches decided so far (an adaptive batch) and
        # the data position, split for this world (a copy: loading aliases tensors that steps
        # update)
        run = agreed_run(self.cfg, hvd, resume=self.resume if first else None,
                         synthetic=self.synthetic, overwrite=self.overwrite or not first,
                         state=None if first else copy.deepcopy(self.committed),
                         state_name=COMMITTED)
        self.trainer = Trainer(run, hvd, self.watchdog)
        self.trainer.on_save = self.commit
        return self.trainer

    def release(self) -> None:
        """Reset callback: drop the trainer built for the previous world."""
        self.watchdog.pause()  # Horovod elastic may wait for hosts for a long time
        if self.trainer is not None:
            self.trainer.release()
            self.trainer = None

    def save(self) -> None:
        self.committed = copy.deepcopy(self.trainer.state_dict())

    def restore(self) -> None:
        """Nothing to undo in place: ``build`` starts again from ``committed``."""

    def sync(self) -> None:
        self.committed = self._bcast_object(self.committed)
