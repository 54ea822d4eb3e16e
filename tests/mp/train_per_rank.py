"""Per-rank script: ``hvd-largebatch train ARGS...`` where rank R adds ``--set KEY=VALUE``.

Usage: train_per_rank.py R KEY=VALUE CONFIG [train options...]. The rank is the launcher's
(read before ``hvd.init``, as the command line does), so the other ranks run the config as
given: a job whose ranks were started with different settings.
"""
import sys

from hvd_largebatch.cli.main import main
from hvd_largebatch.cli.train import launcher_rank

rank, setting, *train_args = sys.argv[1:]
extra = ["--set", setting] if launcher_rank() == int(rank) else []
sys.exit(main(["train", *train_args, *extra]))
