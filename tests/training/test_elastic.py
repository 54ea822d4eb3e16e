"""``hvd-largebatch train --elastic`` on real Horovod elastic ranks (horovodrun --gloo with a
host-discovery script): the schedule followed step by step, a rolled-back failure that ends
with the same weights as an uninterrupted run, and the config / launcher errors."""
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.schedules import from_config
from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hvd_largebatch.training.metrics import read_metrics
from launch import BIN, CLI, MP, run_command

N_TRAIN = 256
# batch 32 for 3 iterations, then 64 (mid-epoch change) for 2 (the last 32 samples are dropped),
# 4 iterations of 64 in epoch 1; max_per_rank_batch 16 on 2 ranks: 1 then 2 micro-batches
PHASES = [
    {"end_epoch": 0.375, "global_batch": 32, "momentum": 0.9, "lr_start": 0.02, "lr_end": 0.1,
     "shape": "linear"},
    {"end_epoch": 2.0, "global_batch": 64, "momentum": 0.8, "lr_start": 0.1},
]


def config(out: Path, **optimizer) -> dict:
    return {
        "model": {"name": "small_resnet", "options": {"width": 4}},
        "data": {"source": "synthetic", "image_size": 8, "num_classes": 4,
                 "num_samples": N_TRAIN, "val_samples": 32},
        "schedule": {"name": "elastic", "dataset_size": N_TRAIN, "phases": PHASES},
        "optimizer": {"name": "lars", "weight_decay": 1.0e-4, "trust_coefficient": 0.02,
                      **optimizer},
        "train": {"max_per_rank_batch": 16, "log_every": 1, "checkpoint_every": 3},
        "output": {"dir": str(out), "progress": False, "plots": False, "tensorboard": False},
    }


def run_elastic(tmp_path: Path, *args: str, timeout: float = 60):
    """``horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script`` (localhost:2, or
    localhost:1 once ``tmp_path/shrink`` exists) --gloo; one host: the network interface is named
    (elastic resolves it across two hosts otherwise)."""
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\nif [ -e {tmp_path / 'shrink'} ]; then echo localhost:1; "
                        "else echo localhost:2; fi\n")
    discover.chmod(0o755)
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(discover), "--network-interface", "lo", "--gloo",
           sys.executable, *args, "--elastic"]
    proc = run_command(cmd, timeout)
    return proc.returncode, proc.stdout


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(str(out / "metrics.csv")) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("elastic")
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(work / "out")))
    rc, out = run_elastic(work, *CLI, "train", str(cfg))
    assert rc == 0, out
    return work / "out"


@pytest.mark.multiprocess
def test_elastic_run_follows_the_schedule_every_step(uninterrupted):
    schedule = from_config({"dataset_size": N_TRAIN, "phases": PHASES})
    rows = train_rows(uninterrupted)
    assert schedule.total_updates == 3 + 2 + 4
    assert [r["updates"] for r in rows] == list(range(1, schedule.total_updates + 1))
    for row in rows:
        point = schedule.at(row["epoch"], row["step"])
        assert row["lr"] == pytest.approx(point.lr, rel=1e-12)
        assert (row["momentum"], row["global_batch"]) == (point.momentum, point.global_batch)
        assert row["micro_batches"] == {32: 1, 64: 2}[point.global_batch]
    # by hand: lr 0.02 + 0.08 * 32 k / (0.375 * 256) at iteration k of the warmup
    assert [r["lr"] for r in rows[:3]] == pytest.approx([0.02 + 0.08 * k / 3 for k in range(3)])
    assert [r["global_batch"] for r in rows[:4]] == [32, 32, 32, 64]
    state = load_checkpoint(str(uninterrupted / CHECKPOINT_NAME))
    assert (state["epoch"], state["updates"], state["world_size"]) == (2, 9, 2)


@pytest.mark.multiprocess
def test_rolled_back_failure_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path):
    # commits after updates 3 (mid-epoch, where the batch grows), 5 (epoch end), 6 and 9: a
    # failure after update 5 (before its commit) rolls back to update 3 and redoes 4 and 5
    # with the same samples
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path / "out")))
    rc, out = run_elastic(tmp_path, MP / "train_elastic_fault.py", "5", str(cfg))
    assert rc == 0, out
    assert out.count("fault after update 5") == 2, out
    assert "resuming from the last elastic commit: epoch 0, iteration 3, 3 updates done" in out, out
    ours = load_checkpoint(str(tmp_path / "out" / CHECKPOINT_NAME))
    theirs = load_checkpoint(str(uninterrupted / CHECKPOINT_NAME))
    assert ours["updates"] == theirs["updates"] == 9
    for name, tensor in theirs["model"].items():
        assert torch.allclose(ours["model"][name], tensor, rtol=1e-6, atol=1e-8), name
    for name in theirs["model"]:
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(ours["model"][name], theirs["model"][name]), name
    # metrics.csv reads as one run: the rows of updates 4 and 5 before the failure were dropped
    rows, ref = train_rows(tmp_path / "out"), train_rows(uninterrupted)
    assert [r["updates"] for r in rows] == list(range(1, 10))
    assert [(r["lr"], r["global_batch"], r["loss"]) for r in rows] == \
        [(r["lr"], r["global_batch"], r["loss"]) for r in ref]


@pytest.mark.multiprocess
def test_losing_a_slot_continues_on_one_rank_with_the_same_schedule(uninterrupted, tmp_path):
    # after update 2 the discovery script drops to one slot; the commit after update 3 notices,
    # the job goes on with one rank from there: same samples, lr and batch, twice the micro-batches
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path / "out")))
    rc, out = run_elastic(tmp_path, MP / "train_elastic_fault.py", "2", str(cfg),
                          "--shrink", str(tmp_path / "shrink"))
    assert rc == 0, out
    assert "resuming from the last elastic commit: epoch 0, iteration 3, 3 updates done" in out, out
    rows, ref = train_rows(tmp_path / "out"), train_rows(uninterrupted)
    assert [r["updates"] for r in rows] == list(range(1, 10))
    for row, expected in zip(rows, ref):
        assert (row["epoch"], row["step"], row["lr"], row["momentum"], row["global_batch"]) == \
            (expected["epoch"], expected["step"], expected["lr"], expected["momentum"],
             expected["global_batch"])
    assert [r["micro_batches"] for r in rows] == [1, 1, 1] + [4] * 6  # 64 / 16 on one rank
    assert [r["loss"] for r in rows[:3]] == [r["loss"] for r in ref[:3]]  # before the change
    state = load_checkpoint(str(tmp_path / "out" / CHECKPOINT_NAME))
    assert (state["epoch"], state["updates"], state["world_size"]) == (2, 9, 1)
    assert state["sampler"] == load_checkpoint(str(uninterrupted / CHECKPOINT_NAME))["sampler"]


def test_elastic_config_errors(tmp_path):
    from hvd_largebatch.training.config import load_config
    from hvd_largebatch.training.elastic import check_elastic

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "out", shard_optimizer_state=True)))
    with pytest.raises(ConfigError, match="optimizer.shard_optimizer_state: must be false"):
        check_elastic(load_config(str(path), []), {"HOROVOD_ELASTIC": "1"})
    cfg = load_config(str(path), ["optimizer.shard_optimizer_state=false"])
    check_elastic(cfg, {"HOROVOD_ELASTIC": "1"})
    with pytest.raises(ConfigError, match="--elastic: .*started by mpirun.*horovodrun --gloo"):
        check_elastic(cfg, {"OMPI_COMM_WORLD_RANK": "0"})
    with pytest.raises(ConfigError, match="--elastic: needs a Horovod elastic job with Gloo"):
        check_elastic(cfg, {})
