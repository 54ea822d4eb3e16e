"""Ranks that run different configs, data or code end the job at setup with one message naming the
first differing key and the ranks (training/agreement.py), under horovodrun --gloo and mpirun;
an error on one rank only is printed; keys exempt from the comparison may differ."""
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hvd_largebatch.data import FileIndex
from hvd_largebatch.training.agreement import (EXEMPT_KEYS, describe_config, mismatch,
                                               package_version)
from hvd_largebatch.training.config import load_config
from configs import small_digits_config
from launch import CLI, MP, MPIRUN, run_command, run_ranks

#: the job must end by itself well before this (the launcher helper kills it then)
HARD_TIMEOUT_S = 150
#: ... and within this: setup is seconds; Gloo's own timeout (the fallback for a hang) is set
#: far above it below, so a job that ends in time was ended by the agreement
ENDS_WITHIN_S = 60


def config(digits: Path, out: Path) -> dict:
    """The shared small digits job, micro-batches of at most 32 samples."""
    return small_digits_config(digits, out, max_per_rank_batch=32)


NO_GLOO_FALLBACK = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "600"}


def write(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


def one_error(out: str) -> str:
    lines = [line for line in out.splitlines() if "hvd-largebatch train: error:" in line]
    assert len(lines) == 1, out
    return lines[0].split("hvd-largebatch train: error: ", 1)[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("setting,launcher,expected", [
    ("train.log_every=7", "gloo",
     "ranks disagree on train.log_every (config): rank 0 has 10, rank 1 has 7; ranks that "
     "differ from rank 0: 1 of 2"),
    ("train.seed=1", "mpirun",
     "ranks disagree on train.seed (config): rank 0 has 0, rank 1 has 1"),
    ("data.image_size=6", "gloo",
     "ranks disagree on data.image_size (config): rank 0 has 8, rank 1 has 6"),
    ("train.average_bn_stats=false", "mpirun",
     "ranks disagree on train.average_bn_stats (config): rank 0 has True, rank 1 has False"),
    ("train.log_every=0", "mpirun",  # fails to load on rank 1 only: printed, naming the rank
     "rank 1 of 2: ConfigError: train.log_every: must be >= 1, got 0"),
])
def test_ranks_that_differ_end_the_job_at_setup(setting, launcher, expected, digits, tmp_path):
    cfg = write(tmp_path / "cfg.yaml", config(digits, tmp_path / "out"))
    start = time.monotonic()
    proc = run_ranks(MP / "train_per_rank.py", "1", setting, str(cfg), np=2, launcher=launcher,
                     timeout=HARD_TIMEOUT_S, env=NO_GLOO_FALLBACK)
    assert proc.returncode != 0, proc.stdout
    assert one_error(proc.stdout).startswith(expected), proc.stdout
    assert time.monotonic() - start < ENDS_WITHIN_S
    assert not (tmp_path / "out" / "metrics.csv").exists()


@pytest.mark.multiprocess
def test_mpmd_job_with_different_checkpoint_every_ends_at_setup(digits, tmp_path):
    # the reproduction: two mpirun app contexts with different command lines
    cfg = write(tmp_path / "cfg.yaml", config(digits, tmp_path / "out"))
    train = [sys.executable, *CLI, "train", str(cfg)]
    cmd = [*MPIRUN, "-np", "1", *train, "--set", "train.checkpoint_every=5", ":",
           "-np", "1", *train, "--set", "train.checkpoint_every=3"]
    proc = run_command(cmd, HARD_TIMEOUT_S)
    assert proc.returncode != 0, proc.stdout
    assert one_error(proc.stdout).startswith(
        "ranks disagree on train.checkpoint_every (config): rank 0 has 5, rank 1 has 3"), proc.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["gloo", "mpirun"])
def test_data_that_differs_under_the_same_path_ends_the_job(launcher, digits, tmp_path):
    # rank 1 reads a copy with 21 training images fewer (1,438 vs 1,417), the same config
    fewer = tmp_path / "fewer"
    shutil.copytree(digits, fewer)
    for image in sorted((fewer / "train" / "3").iterdir())[:21]:
        image.unlink()
    cfg = write(tmp_path / "cfg.yaml", config(digits, tmp_path / "out"))
    proc = run_ranks(MP / "train_per_rank.py", "1", f"data.path={fewer}", str(cfg), np=2,
                     launcher=launcher, timeout=HARD_TIMEOUT_S, env=NO_GLOO_FALLBACK)
    assert proc.returncode != 0, proc.stdout
    assert one_error(proc.stdout).startswith(
        "ranks disagree on training set size (data and resume point): rank 0 has 1438, "
        "rank 1 has 1417"), proc.stdout


@pytest.mark.multiprocess
def test_a_copy_of_the_data_at_another_path_is_accepted(digits, tmp_path):
    # data.path is exempt: a node-local copy at another mount point trains like the original.
    # The job runs without OMP_NUM_THREADS: the trainer chooses torch's threads and says so.
    copy = tmp_path / "node-local" / "digits"
    shutil.copytree(digits, copy)
    cfg = write(tmp_path / "cfg.yaml", config(digits, tmp_path / "out"))
    proc = run_ranks(MP / "train_per_rank.py", "1", f"data.path={copy}", str(cfg), np=2,
                     timeout=HARD_TIMEOUT_S, env={"OMP_NUM_THREADS": None})
    assert proc.returncode == 0, proc.stdout
    assert "hvd-largebatch train: done: 22 updates" in proc.stdout  # 1438 // 64
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert proc.stdout.count(f"torch threads per rank: {threads} (") == 1, proc.stdout


# -- units ------------------------------------------------------------------------------------

def test_description_holds_every_resolved_key_but_the_exempt_ones(digits, tmp_path):
    cfg = load_config(str(write(tmp_path / "c.yaml", config(digits, tmp_path / "out"))))
    described = describe_config(cfg.to_dict())
    assert described["hvd-largebatch version"] == package_version()
    assert described["train.max_skipped_steps"] == 20  # a default, filled in
    assert described["optimizer.denominator"] == "separate"
    assert not set(EXEMPT_KEYS) & set(described)
    assert set(EXEMPT_KEYS) == {"data.path", "data.workers", "data.prefetch"}


def test_mismatch_names_the_first_key_in_order_and_every_differing_rank():
    base = {"hvd-largebatch version": "0.1.0", "train.seed": 0, "train.log_every": 10}
    ranks = [base, base, {**base, "train.log_every": 7, "train.seed": 2}, {**base, "train.seed": 3}]
    assert mismatch(ranks, "config") == (
        "ranks disagree on train.seed (config): rank 0 has 0, rank 2 has 2; ranks that differ "
        "from rank 0: 2, 3 of 4. Every rank must run the same config, data and package version")
    version = [base, {**base, "hvd-largebatch version": "0.2.0"}]
    assert mismatch(version, "config").startswith(
        "ranks disagree on hvd-largebatch version (config): rank 0 has '0.1.0', rank 1 has '0.2.0'")


def test_fingerprint_sees_paths_relative_to_the_root_and_labels(digits, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(digits / "train", copy)
    a = FileIndex.from_folder(str(digits / "train"))
    b = FileIndex.from_folder(str(copy))
    assert a.fingerprint() == b.fingerprint()  # same set, another root
    relabelled = FileIndex(a.root, [a.rel_path(i) for i in range(len(a))],
                           np.roll(a.labels, 1), a.classes, a.source)
    assert relabelled.fingerprint() != a.fingerprint()
    (copy / "0" / sorted(p.name for p in (copy / "0").iterdir())[0]).rename(copy / "0" / "zz.png")
    assert FileIndex.from_folder(str(copy)).fingerprint() != a.fingerprint()
