"""hvd.DistributedOptimizer(FusedLARS(...)) on 2 real Horovod ranks (horovodrun --gloo)."""
import re

import pytest

from launch import MP, run_ranks

pytest.importorskip("horovod.torch")
SCRIPT = MP / "lars_horovod.py"
pytestmark = pytest.mark.multiprocess


def test_distributed_fused_lars_matches_single_process_reference():
    proc = run_ranks(SCRIPT, np=2, launcher="gloo", timeout=120)
    assert proc.returncode == 0, proc.stdout
    ok = re.findall(r"RANK (\d+)/2 LARS OK (\S+)", proc.stdout)
    assert sorted(int(r) for r, _ in ok) == [0, 1], proc.stdout
    assert all(float(err) < 1e-4 for _, err in ok)


@pytest.mark.parametrize("launcher,mode", [("gloo", "replicated"), ("mpirun", "sharded")])
def test_loss_scaled_overflow_on_one_rank_skips_everywhere(launcher, mode):
    proc = run_ranks(MP / "loss_scale_ranks.py", mode, np=2, launcher=launcher, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert len(re.findall(r"RANK \d/2 LOSS SCALE OK", proc.stdout)) == 2, proc.stdout
