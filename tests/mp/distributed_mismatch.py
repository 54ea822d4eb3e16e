"""Per-rank script: ranks that disagree fail fast with DistributedMismatchError, never hang.

1. rank 1 uses another lr: the error is caught and printed as ``RANK r CAUGHT <message>``;
2. rank 1's model has an extra parameter: the error is not caught, so the job must end with a
   non-zero status and the message in its output (the launcher's timeout catches a hang).
"""
import sys

import horovod.torch as hvd
from torch import nn

from hvd_largebatch import DistributedOptimizer, FusedLARS
from hvd_largebatch.errors import DistributedMismatchError

hvd.init()
rank = hvd.rank()
model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))

lr = 0.2 if rank == 1 else 0.1
try:
    DistributedOptimizer(FusedLARS(model.parameters(), lr=lr),
                         named_parameters=model.named_parameters())
    raise AssertionError("a different lr on rank 1 was not detected")
except DistributedMismatchError as exc:
    sys.stdout.write(f"RANK {rank} CAUGHT {exc}\n")  # one write: lines of ranks do not mix
    sys.stdout.flush()

if rank == 1:
    model.add_module("extra", nn.Linear(2, 2))
DistributedOptimizer(FusedLARS(model.parameters(), lr=0.1),
                     named_parameters=model.named_parameters())
print(f"RANK {rank} NOT REACHED", flush=True)
