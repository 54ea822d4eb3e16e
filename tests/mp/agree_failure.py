"""Per-rank script: ``training.setup.agree`` when only rank R fails (rank-dependent bad input).

Usage: agree_failure.py R. Rank R raises DataError naming a file; every rank must then raise
the same SetupError (naming rank R) instead of waiting, print it, and exit with status 2.
"""
import sys

import horovod.torch as hvd

from hvd_largebatch.errors import DataError
from hvd_largebatch.training.setup import SetupError, agree

failing = int(sys.argv[1])
hvd.init()


def check():
    if hvd.rank() == failing:
        raise DataError(f"/scratch/node{failing}/ckpt.pt: checkpoint not found")
    return "fine"


try:
    agree(hvd, check)
except SetupError as e:
    print(f"RANK {hvd.rank()} SetupError: {e}", flush=True)
    sys.exit(2)
print(f"RANK {hvd.rank()} no error", flush=True)
