"""Per-rank script: ``hvd-largebatch train ARGS... --elastic`` with one event right after update N.

Usage: train_elastic_fault.py N CONFIG [train options...] [--shrink MARKER].

* default: every rank raises ``HorovodInternalError`` once (as a failed collective would), so
  that Horovod elastic rolls the job back to the last commit and continues; prints ``rank R:
  fault after update N``.
* ``--shrink MARKER``: rank 0 creates the file MARKER (the test's host-discovery script then
  reports one slot fewer) and waits until the driver's notification of the host change has
  reached its elastic state (the driver notifies the coordinator, rank 0, only; the next commit
  broadcasts it to the other ranks, which meanwhile wait in their next collective); every rank
  prints ``rank R: shrink after update N``; rank 0 exits 3 if no notification came within
  ``NOTIFY_TIMEOUT_S``.
"""
import argparse
import sys
import time
from pathlib import Path

from horovod.common.exceptions import HorovodInternalError

from hvd_largebatch.cli.main import main
from hvd_largebatch.training import elastic as elastic_module
from hvd_largebatch.training import trainer as train_module

#: how long a rank waits for the host-change notification before the test fails
NOTIFY_TIMEOUT_S = 60
parser = argparse.ArgumentParser()
parser.add_argument("event_after", type=int)
parser.add_argument("--shrink", metavar="MARKER", default=None)
args, train_args = parser.parse_known_args()
iteration = train_module.Trainer._iteration
build = elastic_module.TrainerState.build
done = []
states = []  # the elastic state of this worker (it receives the driver's notifications)


def remember_state(self):
    states[:] = [self]
    return build(self)


def wait_for_host_change() -> None:
    """Until the driver's host-change message sits in the state's queue (which ``commit``
    reads); Horovod's ObjectState keeps it in ``_host_messages``."""
    deadline = time.monotonic() + NOTIFY_TIMEOUT_S
    while states[0]._host_messages.empty():
        if time.monotonic() > deadline:
            print(f"no host-change notification within {NOTIFY_TIMEOUT_S} s", flush=True)
            sys.exit(3)
        time.sleep(0.05)


def iteration_then_event(self, epoch, bar):
    iteration(self, epoch, bar)
    if self.updates != args.event_after or done:
        return
    done.append(True)
    if args.shrink:
        print(f"rank {self.run.rank}: shrink after update {self.updates}", flush=True)
        if self.run.rank == 0:
            Path(args.shrink).touch()
            wait_for_host_change()
        return
    print(f"rank {self.run.rank}: fault after update {self.updates}", flush=True)
    raise HorovodInternalError("simulated collective failure")


train_module.Trainer._iteration = iteration_then_event
elastic_module.TrainerState.build = remember_state
sys.exit(main(["train", *train_args]))
