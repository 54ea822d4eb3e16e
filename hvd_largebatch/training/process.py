"""Per-process settings of a training rank: Horovod's stall inspector (before ``hvd.init``) and the
number of torch CPU threads (after it, once the ranks on this node are known).

Threads: every rank's torch uses all the cores it can see by default, so N ranks on one node run
N x cores threads and spend their time preempting each other (2 ranks on 2 cores: an epoch of the
digits demo took 37.6 s instead of 1.2 s). Unless the user chose (``OMP_NUM_THREADS`` in the
environment), each rank gets ``max(1, cores // local ranks)`` threads, where cores are the CPUs
this process may run on (``os.sched_getaffinity``: cpusets of containers and batch systems count)
and local ranks ``hvd.local_size()``. A launcher that binds each rank to its own cores already
shrinks the affinity; the division then errs low (set ``OMP_NUM_THREADS`` there).
"""
from __future__ import annotations

import os

#: Horovod's default stall-inspector period, seconds
HOROVOD_STALL_CHECK_S = 60


def horovod_stall_settings(stall_timeout_s: float, environ=os.environ) -> None:
    """Horovod's stall inspector warns (on rank 0, naming the tensors and the ranks that did not
    submit them) when ranks submit *different* collectives; it checks every 60 s by default.
    Unless the user set ``HOROVOD_STALL_CHECK_TIME_SECONDS``, make it check within half of
    ``train.stall_timeout_s``, so that its warning is printed before the watchdog ends the job.
    Its shutdown setting is left alone: the watchdog (``watchdog.py``) ends the job with a message
    naming the stalled step, and it also covers a frozen rank, which the inspector (run by the
    coordinator, itself waiting on that rank) does not see."""
    if stall_timeout_s > 0:
        check = max(1, int(min(HOROVOD_STALL_CHECK_S, stall_timeout_s / 2)))
        environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(check))


def torch_threads(local_size: int, environ=os.environ) -> tuple[int, str] | None:
    """``(threads, why)`` to give torch on this rank, or None when the user chose
    (``OMP_NUM_THREADS`` set)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, local_size))
    return threads, f"{cores} cores / {local_size} ranks on this node; set OMP_NUM_THREADS to choose"


def set_torch_threads(local_size: int, log: bool) -> int:
    """Apply :func:`torch_threads`; print the value once (``log``, rank 0). Returns the count."""
    import sys

    import torch

    chosen = torch_threads(local_size)
    if chosen is None:
        return torch.get_num_threads()
    threads, why = chosen
    torch.set_num_threads(threads)
    if log:
        print(f"hvd-largebatch train: torch threads per rank: {threads} ({why})",
              file=sys.stderr, flush=True)
    return threads
