"""Real multi-process Horovod: collectives on 2 ranks under horovodrun --gloo and mpirun."""
import re
import time

import pytest

from hvd_largebatch.distributed.horovod_check import check_horovod_build, parse_check_build
from launch import MP, run_ranks

SCRIPT = MP / "collectives.py"
pytestmark = pytest.mark.multiprocess


def test_installed_horovod_has_pytorch_gloo_mpi():
    report = check_horovod_build()
    assert report["Frameworks"]["PyTorch"]
    assert report["Controllers"]["Gloo"] and report["Controllers"]["MPI"]


def test_check_build_parser_reads_unchecked_boxes():
    text = """Horovod v0.28.1:

Available Frameworks:
    [ ] TensorFlow
    [X] PyTorch

Available Controllers:
    [X] MPI
    [ ] Gloo
"""
    report = parse_check_build(text)
    assert report == {"Frameworks": {"TensorFlow": False, "PyTorch": True},
                      "Controllers": {"MPI": True, "Gloo": False}}


@pytest.mark.parametrize("launcher", ["gloo", "mpirun"])
def test_collectives_on_two_ranks(launcher):
    proc = run_ranks(SCRIPT, np=2, launcher=launcher, timeout=120)
    assert proc.returncode == 0, proc.stdout
    ranks = sorted(int(m) for m in re.findall(r"RANK (\d+)/2 COLLECTIVES OK", proc.stdout))
    assert ranks == [0, 1], proc.stdout


@pytest.mark.parametrize("launcher", ["gloo", "mpirun"])
def test_dead_rank_fails_the_job_in_bounded_time(launcher):
    # the launcher helper's limit is far above the bound asserted below, and Gloo's own timeout
    # above both: the launcher itself must end the job when rank 1 dies
    start = time.monotonic()
    proc = run_ranks(SCRIPT, "--die-rank", "1", np=2, launcher=launcher, timeout=150,
                     env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "600"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout
    assert "rank 1: exiting on purpose" in proc.stdout
    assert "COLLECTIVES OK" not in proc.stdout
    assert elapsed < 60
