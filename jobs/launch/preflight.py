"""Pre-flight check run on every rank before a job trains: one Horovod allreduce, fast failure.

Every rank sums a 1 on its device (``cuda:<local rank>``, or the CPU when
``PREFLIGHT_DEVICE=cpu``); the result must equal the world size. A rank without a GPU for its
local rank, a broken NCCL/MPI/Gloo setup or a missing Horovod ends the job within seconds (the
launch templates also wrap it in ``timeout``), instead of minutes into the real job. Rank 0
prints one ``preflight ok`` line with the world size and the hosts it found.
"""
import os
import socket
import sys

import horovod.torch as hvd
import torch

hvd.init()
where = f"rank {hvd.rank()} on {socket.gethostname()}"
if os.environ.get("PREFLIGHT_DEVICE", "cuda") == "cpu":
    device = torch.device("cpu")
else:
    visible = torch.cuda.device_count()
    if hvd.local_rank() >= visible:
        sys.exit(f"preflight: {where}: local rank {hvd.local_rank()} has no GPU "
                 f"({visible} visible; check --gpus-per-task / --gpu-bind / CUDA_VISIBLE_DEVICES)")
    device = torch.device("cuda", hvd.local_rank())
    torch.cuda.set_device(device)
total = hvd.allreduce(torch.ones(1, device=device), op=hvd.Sum, name="preflight").item()
if total != hvd.size():
    sys.exit(f"preflight: {where}: allreduce gave {total:g}, expected the world size {hvd.size()}")
hosts = hvd.allgather_object(socket.gethostname())
if hvd.rank() == 0:
    print(f"preflight ok: allreduce over {hvd.size()} ranks on {len(set(hosts))} hosts "
          f"({device.type})", flush=True)
