"""A frozen rank (SIGSTOP) ends the job under horovodrun --gloo and mpirun: the waiting rank's
watchdog names the step and collective it waits in and ends its process (training/watchdog.py)."""
import os
import re
import signal
import subprocess

import pytest
import yaml

from hvd_largebatch.training.watchdog import EXIT_STALLED, Watchdog
from launch import MP, run_ranks

#: the tests' train.stall_timeout_s: above any setup phase of a 2-rank job on a busy 2-core
#: machine (a few seconds), far below Gloo's timeout, which is raised to 600 s below so that
#: only the watchdog can end the job
STALL_S = 15




@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["gloo", "mpirun"])
def test_a_frozen_rank_ends_the_job_naming_the_stalled_step(launcher, digits, tmp_path):
    mapping = {
        "model": {"name": "small_resnet", "options": {"width": 4, "blocks": 1}},
        "data": {"source": "digits", "path": str(digits), "image_size": 8, "resize_shorter": 8,
                 "workers": 1},
        "schedule": {"epochs": 1, "batch": 64, "lr": 0.05},
        "train": {"max_per_rank_batch": 32, "log_every": 10, "stall_timeout_s": STALL_S},
        "output": {"dir": str(tmp_path / "out"), "progress": False, "plots": False,
                   "tensorboard": False},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(mapping))
    proc = run_ranks(MP / "train_freeze.py", "1", "5", str(cfg), np=2, launcher=launcher,
                     timeout=240, env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "600"})
    try:
        assert proc.returncode != 0, proc.stdout
        assert "rank 1: frozen after update 5" in proc.stdout, proc.stdout
        found = re.search(r"hvd-largebatch train: error: rank 0: no progress for (\d+) s in "
                          r"gradient allreduce and optimizer step of epoch 0, iteration 5 "
                          r"\(update 6\) \(train\.stall_timeout_s = 15\)", proc.stdout)
        assert found, proc.stdout
        assert STALL_S <= int(found.group(1)) <= STALL_S + 2  # one check period late at most
        if launcher == "mpirun":
            assert re.search(rf"Exit code:\s+{EXIT_STALLED}", proc.stdout), proc.stdout
    finally:
        # the launcher must have taken the frozen rank down with the job
        left = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        assert not left, f"processes of the job still running: {left}"


def test_watchdog_reports_the_mark_held_longer_than_the_timeout():
    dog = Watchdog(10, rank=3)
    assert dog.stalled(now=1e9) is None  # nothing marked yet
    dog.mark("metrics allreduce (train.window) after update 7")
    since = dog._mark[1]
    assert dog.stalled(now=since + 10) is None
    assert dog.stalled(now=since + 10.5) == (
        "hvd-largebatch train: error: rank 3: no progress for 10 s in metrics allreduce "
        "(train.window) after update 7 (train.stall_timeout_s = 10): another rank is frozen, "
        "dead or much slower, or this rank is stuck; ending the job")
    dog.mark("next step")  # progress restarts the clock
    assert dog.stalled(now=dog._mark[1] + 9.9) is None
    dog.pause()
    assert dog.stalled(now=since + 1e6) is None


def test_disabled_watchdog_starts_no_thread():
    dog = Watchdog(0, rank=0).start()
    assert dog._thread is None
    dog.stop()
