"""Two real Horovod ranks read one image folder through DaliLoader: together they read every
sample of every epoch exactly once, in the same global batches a single rank would read."""
import numpy as np
import pytest
import torch

pytest.importorskip("horovod.torch")
pytest.importorskip("nvidia.dali")
from launch import REPO, run_ranks  # noqa: E402
from test_data_pipelines import decoded_sample_ids, write_coded_folder  # noqa: E402

from hvd_largebatch.data import GlobalSampler  # noqa: E402
from hvd_largebatch.schedules import Phase, Schedule  # noqa: E402

pytestmark = pytest.mark.multiprocess
SCRIPT = REPO / "tests" / "mp" / "data_union.py"


def test_two_ranks_read_each_epoch_exactly_once(tmp_path):
    n = 30
    index = write_coded_folder(str(tmp_path / "images"), n)
    proc = run_ranks(SCRIPT, tmp_path / "images", tmp_path, np=2, launcher="gloo", timeout=120)
    assert proc.returncode == 0, proc.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # the same schedule as the script: batch 4 until epoch 0.4, then 8; drop_last=False
    schedule = Schedule(dataset_size=n, drop_last=False,
                        phases=(Phase(0.0, 0.4, 4, 0.9, 0.1, 0.1), Phase(0.4, 2.0, 8, 0.9, 0.1, 0.1)))
    single = GlobalSampler(n, schedule, 1, 0, seed=5, drop_last=False)
    assert schedule.epoch_batches(0) == [4, 4, 4, 8, 8, 2]  # 12 samples at batch 4, then 8
    for epoch in range(2):
        steps0, steps1 = (r[epoch] for r in ranks)
        batches = schedule.epoch_batches(epoch)
        assert len(steps0) == len(steps1) == len(batches)  # no rank waits alone
        read = []
        for s, (a, b) in enumerate(zip(steps0, steps1)):
            ids = np.concatenate([decoded_sample_ids(a["images"]), decoded_sample_ids(b["images"])])
            assert ids.tolist() == single.global_indices(epoch, s).tolist()
            labels = torch.cat([a["labels"], b["labels"]]).tolist()
            assert labels == index.labels[ids].tolist()
            assert a["global"] == b["global"] == batches[s]
            read.extend(ids.tolist())
        assert sorted(read) == list(range(n))
