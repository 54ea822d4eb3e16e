"""Unusable image files in a training run on 2 real ranks at the batch size where DALI crashed
(issue 15: per-rank batches of 32): named in one error before any rank decodes, or skipped and
counted with ``data.skip_bad_files``, the global batch staying the schedule's."""
import json
import shutil

import numpy as np
import pytest

from hvd_largebatch.data import FileIndex
from hvd_largebatch.data.check import cache_path, default_cache_dir
from hvd_largebatch.training.metrics import read_metrics
from launch import CLI, run_ranks
from test_train import config, final_state, write_config

pytestmark = pytest.mark.multiprocess
#: why each of the 3 broken training files is unusable
REASONS = ("not an image DALI decodes", "empty file", "PNG: OSError: image file is truncated")


@pytest.fixture
def broken_digits(digits, tmp_path):
    """A copy of the digits set with 300 random bytes, an empty file and a truncated PNG in
    train/ and a text file named .png in val/."""
    root = tmp_path / "digits"
    shutil.copytree(digits, root)
    files = sorted((root / "train" / "3").iterdir())
    files[0].write_bytes(np.random.default_rng(0).bytes(300))
    files[1].write_bytes(b"")
    files[2].write_bytes(files[3].read_bytes()[:60])
    val = sorted((root / "val" / "5").iterdir())[0]
    val.write_text("not an image\n")
    return root, [str(f) for f in files[:3]], str(val)


def job(root, out, **data):
    mapping = config(str(root), out, max_per_rank_batch=32, log_every=1, eval_every=1)
    mapping["data"].update(data)
    mapping["schedule"] = {"epochs": 1, "batch": 64, "lr": 0.1}
    return write_config(out.parent / f"{out.name}.yaml", mapping)


def test_an_unusable_file_is_named_before_any_rank_decodes(broken_digits, tmp_path):
    root, bad, _ = broken_digits
    proc = run_ranks(*CLI, "train", str(job(root, tmp_path / "out")), np=2, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout.count("hvd-largebatch train: error:") == 1, proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "hvd-largebatch train: error:" in ln)
    assert f"{bad[0]}: not an image DALI decodes" in line and "(2 more unusable files)" in line
    assert "data.skip_bad_files" in line
    assert "pipeline" not in proc.stdout  # DALI never saw a file
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_skipped_files_are_named_and_counted_and_batches_stay_full(broken_digits, tmp_path):
    root, bad, val_bad = broken_digits
    proc = run_ranks(*CLI, "train", str(job(root, tmp_path / "out", skip_bad_files=True)), np=2,
                     timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("skipping 3 unusable of 1438 files") == 1, proc.stdout
    assert proc.stdout.count("skipping 1 unusable of 359 files") == 1, proc.stdout
    for name in (*bad, val_bad):
        assert proc.stdout.count(f"{name}: ") == 1, name  # logged once, on rank 0
    rows = [r for r in read_metrics(str(tmp_path / "out" / "metrics.csv")) if r["kind"] == "train"]
    # the sampler is built over the 1435 readable files: 22 full batches of 64, none smaller
    assert len(rows) == 1435 // 64 and all(r["global_batch"] == 64 for r in rows)
    state = final_state(tmp_path / "out")
    assert state["sampler"]["num_samples"] == 1435 and state["schedule"]["dataset_size"] == 1435
    assert "skipping sample" not in proc.stdout  # nothing left for the loader to drop
    # the two ranks checked alternate files (the 3 bad ones are consecutive samples); rank 0
    # cached the merged result, which the next run reads instead of the files
    index = FileIndex.from_folder(str(root / "train"))
    with open(cache_path(index, default_cache_dir())) as f:
        cached = json.load(f)
    assert cached["files"] == 1438 and len(cached["bad"]) == 3
    for name, why in zip(bad, REASONS):
        assert sum(r.startswith(f"{name}: ") and why in r for r in cached["bad"].values()) == 1
