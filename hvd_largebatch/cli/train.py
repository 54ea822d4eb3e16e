"""``hvd-largebatch train CONFIG.yaml [--set key=value ...] [--resume PATH|auto | --overwrite]
[--synthetic] [--elastic]``.

Run it on every rank of a Horovod job (``horovodrun -np 8 hvd-largebatch train job.yaml`` or
``mpirun ... hvd-largebatch train job.yaml``), or as one process without a launcher.

Exit status:

* 0: training completed;
* 2: the config, the data, the world size, the output folder or the checkpoint is unusable on
  any rank, or the ranks disagree (config, data, package version): every rank exits before any
  training step and rank 0 prints one ``error:`` line naming the key (or file) and the ranks. In
  a multi-rank job a config that fails to load on some ranks only is agreed over Horovod first
  (so its message is printed); one process fails at once;
* 3: training diverged (``train.max_skipped_steps`` consecutive skipped updates, or non-finite
  weights / BN statistics at a checkpoint): one ``error:`` line, the last good checkpoint kept;
* 4: a rank made no progress for ``train.stall_timeout_s`` seconds (a frozen or dead rank): the
  watchdog of each waiting rank prints what it waited for and ends its process;
* 1: a rank failed during training (it prints its traceback and leaves at once, so that the
  launcher ends the job instead of leaving the other ranks waiting in an allreduce).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

#: seconds ranks other than 0 wait before exiting on a config error found before hvd.init in an
#: elastic job (see ``_fail``)
FAIL_GRACE_S = 10.0
#: environment variables holding the process's rank, by launcher (read before hvd.init)
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
#: ... and the job's size
SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
EXIT_SETUP, EXIT_DIVERGED = 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see hvd_largebatch/training/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.seed=3 "
                             "--set schedule.batch=1024 (the value is parsed as YAML); repeatable")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="PATH|auto", default=None,
                       help="continue from a checkpoint; auto: <output.dir>/checkpoint.pt if "
                            "it exists, else start from scratch")
    start.add_argument("--overwrite", action="store_true",
                       help="start from scratch even though output.dir holds a checkpoint "
                            "(replaced, with metrics.csv, as the new run writes); without it "
                            "such a start is refused")
    parser.add_argument("--synthetic", action="store_true",
                        help="rehearse the job on random data at tiny scale (few iterations, "
                             "batches scaled down, same schedule shape; see "
                             "hvd_largebatch/training/setup.py); writes to <output.dir>-synthetic")
    parser.add_argument("--elastic", action="store_true",
                        help="run under Horovod elastic (horovodrun --gloo --min-np/--max-np "
                             "--host-discovery-script): survive lost or added hosts by rolling "
                             "back to the state committed with the last checkpoint; needs "
                             "optimizer.shard_optimizer_state=false")


def launcher_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def launcher_size() -> int:
    """The job's rank count as the launcher set it (1 without a launcher)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 1


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.errors import ConfigError, DistributedMismatchError
    from hvd_largebatch.training.config import load_config

    def load():
        cfg = load_config(args.config, args.overrides)
        if args.elastic:
            from hvd_largebatch.training.elastic import check_elastic

            check_elastic(cfg)
        return cfg

    try:  # before importing torch and Horovod: a bad config on one process fails in a second
        cfg = load()
    except ConfigError as e:
        if launcher_size() == 1 or args.elastic:  # no other rank to tell / every rank fails alike
            return _fail(e, wait=launcher_size() > 1)
        cfg = load  # the trainer reads it again after hvd.init and reports it on every rank

    from hvd_largebatch.training.setup import SetupError
    from hvd_largebatch.training.trainer import Diverged, train

    if args.elastic:
        from hvd_largebatch.training.elastic import train_elastic as train

    try:
        summary = train(cfg, resume=args.resume, synthetic=args.synthetic, overwrite=args.overwrite)
    except (SetupError, DistributedMismatchError) as e:  # raised alike on every rank
        return _fail(e)
    except Diverged as e:  # decided alike on every rank
        return _fail(f"training diverged: {e}", status=EXIT_DIVERGED)
    except BaseException:  # noqa: BLE001 - a rank failed mid-training: end the job now
        rank = launcher_rank()
        print(f"hvd-largebatch train: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    if launcher_rank() == 0:
        val = (f", validation top-1 {summary['val_top1']:.2f}%" if "val_top1" in summary else "")
        print(f"hvd-largebatch train: done: {summary['updates']} updates in "
              f"{summary['wall_time']:.1f} s{val}; outputs in {summary['output_dir']}")
    return 0


def _fail(error: Exception | str, status: int = EXIT_SETUP, wait: bool = False) -> int:
    """Rank 0 prints the error (every rank holds the same one) and every rank returns
    ``status``. With ``wait`` (a failure before ``hvd.init`` in an elastic job) the other ranks
    wait up to ``FAIL_GRACE_S`` first, so that the launcher (which ends the whole job when the
    first rank exits non-zero) does not kill rank 0 before it has printed."""
    if launcher_rank() == 0:
        print(f"hvd-largebatch train: error: {error}", file=sys.stderr, flush=True)
    elif wait:
        time.sleep(FAIL_GRACE_S)
    return status
