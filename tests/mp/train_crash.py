"""Per-rank script: ``hvd-largebatch train ARGS...`` that dies on every rank right after update N.

Usage: train_crash.py N [--usr1-at K] CONFIG [train options...]. The process leaves with
``os._exit(9)`` (no cleanup, no checkpoint), as a job killed by the scheduler would. With
``--usr1-at K`` rank 0 sends itself SIGUSR1 (a checkpoint request) right after update K.
"""
import argparse
import os
import signal
import sys

from hvd_largebatch.cli.main import main
from hvd_largebatch.training import trainer as train_module

parser = argparse.ArgumentParser()
parser.add_argument("crash_after", type=int)
parser.add_argument("--usr1-at", type=int, default=None)
args, train_args = parser.parse_known_args()
iteration = train_module.Trainer._iteration


def iteration_then_die(self, epoch, bar):
    iteration(self, epoch, bar)
    if self.updates == args.usr1_at and self.run.rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
    if self.updates == args.crash_after:
        print(f"rank {self.run.rank}: killed after update {self.updates}", flush=True)
        os._exit(9)


train_module.Trainer._iteration = iteration_then_die
sys.exit(main(["train", *train_args]))
