"""Per-rank script: ``hvd-largebatch train ARGS...`` in which rank R freezes right after update N.

Usage: train_freeze.py R N CONFIG [train options...]. Rank R prints ``rank R: frozen after
update N`` and stops itself with SIGSTOP, as ``kill -STOP`` (or a hung file system) would leave
it: alive, holding its sockets, answering nothing. The other ranks wait in their next collective
until their watchdog (``train.stall_timeout_s``) ends the job.
"""
import argparse
import os
import signal
import sys

from hvd_largebatch.cli.main import main
from hvd_largebatch.training import trainer as train_module

parser = argparse.ArgumentParser()
parser.add_argument("rank", type=int)
parser.add_argument("freeze_after", type=int)
args, train_args = parser.parse_known_args()
iteration = train_module.Trainer._iteration


def iteration_then_freeze(self, epoch, bar):
    iteration(self, epoch, bar)
    if self.updates == args.freeze_after and self.run.rank == args.rank:
        print(f"rank {self.run.rank}: frozen after update {self.updates}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


train_module.Trainer._iteration = iteration_then_freeze
sys.exit(main(["train", *train_args]))
