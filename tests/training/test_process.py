"""Per-process settings of a training rank: torch threads per local rank, Horovod's stall
inspector (training/process.py). The 2-rank check of the logged value is in test_agreement.py."""
import os

from hvd_largebatch.training.process import horovod_stall_settings, torch_threads


def test_threads_are_this_nodes_cores_divided_by_its_ranks():
    cores = len(os.sched_getaffinity(0))
    assert torch_threads(1, {}) == (cores, f"{cores} cores / 1 ranks on this node; set "
                                           f"OMP_NUM_THREADS to choose")
    assert torch_threads(2, {})[0] == max(1, cores // 2)
    assert torch_threads(10 * cores, {})[0] == 1  # never 0
    assert torch_threads(2, {"OMP_NUM_THREADS": "3"}) is None  # the user chose


def test_stall_inspector_warns_within_half_the_watchdog_timeout_unless_set():
    env = {}
    horovod_stall_settings(300, env)
    assert env == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60"}  # Horovod's default period
    env = {}
    horovod_stall_settings(15, env)
    assert env == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "7"}
    env = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "30"}
    horovod_stall_settings(15, env)
    assert env == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "30"}  # the user's value stays
    env = {}
    horovod_stall_settings(0, env)  # watchdog off: Horovod's defaults
    assert env == {}
