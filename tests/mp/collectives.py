"""Per-rank script: check allreduce, reducescatter and allgather against hand-computed values.

Usage: collectives.py [--die-rank R]. With --die-rank, rank R exits with status 3 before the
first collective, so the launcher must end the whole job (the test checks it does not hang).
"""
import argparse
import sys

import horovod.torch as hvd
import torch

parser = argparse.ArgumentParser()
parser.add_argument("--die-rank", type=int, default=None)
args = parser.parse_args()

hvd.init()
rank, size = hvd.rank(), hvd.size()
if args.die_rank == rank:
    print(f"rank {rank}: exiting on purpose", flush=True)
    sys.exit(3)

# every rank contributes rank+1 times a ramp; sums are computed by hand below
ramp = torch.arange(6 * size, dtype=torch.float64).reshape(2 * size, 3)
local = ramp * (rank + 1)
total = size * (size + 1) / 2  # sum over ranks of (rank + 1)

summed = hvd.allreduce(local, op=hvd.Sum, name="sum")
assert torch.equal(summed, ramp * total), (rank, summed)
averaged = hvd.allreduce(local, op=hvd.Average, name="avg")
assert torch.allclose(averaged, ramp * total / size), (rank, averaged)

# reducescatter splits dim 0 evenly: rank r receives rows [2r, 2r + 2) of the sum
scattered = hvd.reducescatter(local, op=hvd.Sum, name="rs")
assert torch.equal(scattered, (ramp * total)[2 * rank: 2 * rank + 2]), (rank, scattered)

# allgather concatenates along dim 0 in rank order; ranks contribute rank+1 rows of value rank
mine = torch.full((rank + 1, 2), float(rank))
gathered = hvd.allgather(mine, name="ag")
expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(size)])
assert torch.equal(gathered, expected), (rank, gathered)

print(f"RANK {rank}/{size} COLLECTIVES OK", flush=True)
