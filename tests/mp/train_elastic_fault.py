"""Per-rank script: ``hvd-largebatch train ARGS... --elastic`` with one event right after update N.

Usage: train_elastic_fault.py N CONFIG [train options...] [--shrink MARKER].

* default: every rank raises ``HorovodInternalError`` once (as a failed collective would), so
  that Horovod elastic rolls the job back to the last commit and continues; prints ``rank R:
  fault after update N``.
* ``--shrink MARKER``: rank 0 creates the file MARKER (the test's host-discovery script then
  reports one slot fewer) and every rank waits ``SHRINK_WAIT_S`` so that the driver's
  notification has arrived by the next commit; prints ``rank R: shrink after update N``.
"""
import argparse
import sys
import time
from pathlib import Path

from horovod.common.exceptions import HorovodInternalError

from hvd_largebatch.cli.main import main
from hvd_largebatch.training import trainer as train_module

SHRINK_WAIT_S = 2.5
parser = argparse.ArgumentParser()
parser.add_argument("event_after", type=int)
parser.add_argument("--shrink", metavar="MARKER", default=None)
args, train_args = parser.parse_known_args()
iteration = train_module.Trainer._iteration
done = []


def iteration_then_event(self, epoch, bar):
    iteration(self, epoch, bar)
    if self.updates != args.event_after or done:
        return
    done.append(True)
    if args.shrink:
        print(f"rank {self.run.rank}: shrink after update {self.updates}", flush=True)
        if self.run.rank == 0:
            Path(args.shrink).touch()
        time.sleep(SHRINK_WAIT_S)
        return
    print(f"rank {self.run.rank}: fault after update {self.updates}", flush=True)
    raise HorovodInternalError("simulated collective failure")


train_module.Trainer._iteration = iteration_then_event
sys.exit(main(["train", *train_args]))
