"""``hvd-largebatch train CONFIG.yaml [--set key=value ...] [--resume PATH|auto] [--synthetic]
[--elastic]``.

Run it on every rank of a Horovod job (``horovodrun -np 8 hvd-largebatch train job.yaml`` or
``mpirun ... hvd-largebatch train job.yaml``), or as one process without a launcher.

Exit status: 0 on success; 2 when the config, the data, the world size or the checkpoint is
unusable (every rank exits, rank 0 prints one ``error:`` line, before any training step); 1 when
a rank fails during training (it prints its traceback and leaves at once, so that the launcher
ends the job instead of leaving the other ranks waiting in an allreduce).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

#: seconds ranks other than 0 wait before exiting on a bad config (see ``_fail``)
FAIL_GRACE_S = 10.0
#: environment variables holding the process's rank, by launcher (read before hvd.init)
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see hvd_largebatch/training/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.seed=3 "
                             "--set schedule.batch=1024 (the value is parsed as YAML); repeatable")
    parser.add_argument("--resume", metavar="PATH|auto", default=None,
                        help="continue from a checkpoint; auto: <output.dir>/checkpoint.pt if "
                             "it exists, else start from scratch")
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


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.errors import ConfigError
    from hvd_largebatch.training.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.elastic:
            from hvd_largebatch.training.elastic import check_elastic, train_elastic as train

            check_elastic(cfg)
        else:
            from hvd_largebatch.training.trainer import train
    except ConfigError as e:  # before hvd.init: every rank fails alike, on its own
        return _fail(e, wait=True)

    from hvd_largebatch.training.setup import SetupError

    try:
        summary = train(cfg, resume=args.resume, synthetic=args.synthetic)
    except SetupError as e:  # agreed by all ranks; Horovod's shutdown keeps them together
        return _fail(e, wait=False)
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


def _fail(error: Exception, wait: bool) -> int:
    """Rank 0 prints the error and exits. With ``wait`` (a failure before ``hvd.init``) the other
    ranks, which fail identically, wait up to ``FAIL_GRACE_S`` first, so that the launcher (which
    ends the whole job when the first rank exits non-zero) does not kill rank 0 before it has
    printed."""
    if launcher_rank() == 0:
        print(f"hvd-largebatch train: error: {error}", file=sys.stderr)
    elif wait:
        time.sleep(FAIL_GRACE_S)
    return 2
